"""Generated programs with data.packing document and best_fit: real training steps and exact resume on CPU."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from malt.compiler.api import compile_to
from malt.compiler.plan import Host

from .helpers import run_program, write_tiny_recipe

pytestmark = pytest.mark.slow


def records(run_dir, key):
    return {r["step"]: r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r}


def recipe_with(tmp_path, packing, steps):
    recipe = write_tiny_recipe(tmp_path / "r", steps=steps, eval_every=4, checkpoint_every=4)
    recipe.write_text(recipe.read_text().replace("  validation: 5%", f"  validation: 5%\n  packing: {packing}"))
    return recipe


@pytest.mark.parametrize("packing", ["document", "best_fit"])
def test_training_steps_lower_the_loss(tmp_path, packing):
    recipe = recipe_with(tmp_path, packing, steps=16)
    run = tmp_path / "run"
    compile_to(recipe, run, host=Host())
    proc = run_program(run, tmp_path / "cache")
    loss = records(run, "loss")
    assert sorted(loss) == list(range(1, 17)) and all(math.isfinite(v) for v in loss.values())
    assert sum(loss[s] for s in range(13, 17)) < sum(loss[s] for s in range(1, 5)) - 0.5  # falling
    val = records(run, "val_loss")
    assert val[16] < val[0]
    log = proc.stdout + proc.stderr
    if packing == "best_fit":
        assert "best_fit packing of corpus (train) at seq_len 32" in log and "padding" in log


@pytest.mark.parametrize("packing", ["document", "best_fit"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, packing):
    recipe = recipe_with(tmp_path, packing, steps=8)
    cache = tmp_path / "cache"
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    compile_to(recipe, full, host=Host())
    compile_to(recipe, resumed, host=Host())
    run_program(full, cache, "--quiet")
    run_program(resumed, cache, "--quiet")
    # go back to the step-4 checkpoint, as if the run had stopped there, and resume
    ckpts = resumed / "checkpoints"
    shutil.rmtree(ckpts / "step_00000008")
    (ckpts / "latest").write_text("step_00000004\n")
    run_program(resumed, cache, "--quiet", "--resume")
    assert records(resumed, "loss") == records(full, "loss")   # steps 5-8 again, bit for bit
    assert records(resumed, "val_loss") == records(full, "val_loss")
