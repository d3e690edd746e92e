"""ELECTRA's replaced token detection (objective rtd) does not depend on how a step's rows are split.

Each row's replacement samples come from that row's own random stream (one uniform per position, drawn in
make_batch), and each micro-batch's generator and discriminator means are weighted by its shares of the step's
masked positions and tokens. So the same global batch gives the same losses in 1 or 4 micro-batches, on 1 or 2
processes, with or without padding (best_fit).
"""

from __future__ import annotations

import pytest

from .helpers import run_program
from .test_distributed import torchrun
from .test_encoder import reference
from .test_run import losses, val_losses

pytestmark = pytest.mark.slow

STEPS = 6
# the losses are about 40 (50 × the discriminator's ~0.7 + the generator's): the runs agree to ~1e-7 relative (fp32
# sums in another order); drawing the replacements per micro-batch, as before, moved step 2 by 2.4e-5 relative
TOL = 2e-6


def _same(ref: dict, got: dict):
    assert sorted(ref) == sorted(got), (ref, got)
    for step, want in ref.items():
        assert got[step] == pytest.approx(want, rel=TOL, abs=0), (step, ref, got)


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_one_or_four_micro_batches_give_the_same_steps(packing, tmp_path):
    # global batch 8 in 1 or 4 micro-batches; validation reads eval_batches × global_batch = 16 sequences in both
    one = reference("tiny-electra", tmp_path / "one", steps=STEPS, packing=packing, micro_batch=8, eval_batches=2,
                    eval_every=3)
    four = reference("tiny-electra", tmp_path / "four", steps=STEPS, packing=packing, micro_batch=2, eval_batches=2,
                     eval_every=3)
    for d in (one, four):
        run_program(d, tmp_path / "cache", "--quiet")
    assert sorted(losses(one)) == list(range(1, STEPS + 1))
    _same(losses(one), losses(four))
    assert sorted(val_losses(one)) == [0, 3, 6]
    _same(val_losses(one), val_losses(four))


def test_two_processes_give_the_same_steps_as_one(tmp_path):
    one = reference("tiny-electra", tmp_path / "one", steps=STEPS, micro_batch=4, eval_batches=2, eval_every=3)
    two = reference("tiny-electra", tmp_path / "two", steps=STEPS, micro_batch=2, eval_batches=2, eval_every=3,
                    target={"devices": 2, "parallelism": "ddp"})
    assert "distributed.reduce_sum" in (two / "train.py").read_text()
    run_program(one, tmp_path / "cache", "--quiet")
    torchrun(two, tmp_path / "cache")
    assert sorted(losses(one)) == list(range(1, STEPS + 1))
    _same(losses(one), losses(two))
    assert sorted(val_losses(one)) == [0, 3, 6]
    _same(val_losses(one), val_losses(two))
