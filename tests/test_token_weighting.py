"""With targets that carry no loss (-100), a step's loss is the mean over the targets that do, whatever the split.

Each micro-batch's mean is weighted by its share of the step's counted targets (over all devices), so the
same global batch gives the same loss and update in 1 or 4 micro-batches, on 1 or 2 processes.
"""

from __future__ import annotations

import pytest

from malt.compiler.api import compile_to
from malt.compiler.plan import Host

from .helpers import run_program, write_tiny_recipe
from .test_distributed import torchrun
from .test_run import losses, val_losses

pytestmark = pytest.mark.slow

PREFIX_LM = ["objective.kind=prefix_lm"]   # each row's prefix (no loss) has a random length: micro-batches count differently


def _compile(tmp_path, name, sets):
    recipe = write_tiny_recipe(tmp_path / "r", steps=6, eval_every=3, checkpoint_every=0)
    compile_to(recipe, tmp_path / name, sets=PREFIX_LM + sets, host=Host())
    return tmp_path / name


def test_one_or_four_micro_batches_give_the_same_steps(tmp_path):
    # evaluation reads eval_batches × global_batch sequences: 16 in both, the same ones
    one = _compile(tmp_path, "one", ["train.micro_batch=8", "train.eval_batches=2"])
    four = _compile(tmp_path, "four", ["train.micro_batch=2", "train.eval_batches=2"])
    assert "step_counted" in (four / "train.py").read_text()
    for d in (one, four):
        run_program(d, tmp_path / "cache", "--quiet")
    ref, got = losses(one), losses(four)
    assert sorted(ref) == sorted(got) == list(range(1, 7))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step
    for step, v in val_losses(one).items():
        assert val_losses(four)[step] == pytest.approx(v, rel=1e-5, abs=1e-5), step


def test_two_processes_give_the_same_steps_as_one(tmp_path):
    one = _compile(tmp_path, "one", ["train.micro_batch=4", "train.eval_batches=4"])
    two = _compile(tmp_path, "two", ["train.micro_batch=2", "train.eval_batches=4", "target.devices=2", "target.parallelism=ddp"])
    assert "distributed.reduce_sum" in (two / "train.py").read_text()
    run_program(one, tmp_path / "cache", "--quiet")
    torchrun(two, tmp_path / "cache")
    ref, got = losses(one), losses(two)
    assert sorted(ref) == sorted(got) == list(range(1, 7))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), step
    for step, v in val_losses(one).items():
        assert val_losses(two)[step] == pytest.approx(v, rel=2e-5, abs=2e-5), step
