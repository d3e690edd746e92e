"""train.eval_per_source: each source's own validation loss beside the mixture's."""

from __future__ import annotations

import json
import math
import random

import pytest

from malt.compiler.api import check, compile_to
from malt.compiler.diagnostics import RecipeError
from malt.compiler.plan import Host

from .helpers import run_program, write_tiny_recipe

TWO_SOURCES = """
data:
  sources:
    - {name: words, path: corpus.jsonl, weight: 0.5}
    - {name: digits, path: digits.jsonl, weight: 0.5}
  validation: 10%
"""


def _evals(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


@pytest.mark.slow
def test_single_source_loss_equals_the_mixture_and_two_sources_are_told_apart(tmp_path):
    one = write_tiny_recipe(tmp_path / "one", steps=8, eval_every=4, checkpoint_every=0)
    compile_to(one, tmp_path / "run1", sets=["train.eval_per_source=true"], host=Host())
    run_program(tmp_path / "run1", tmp_path / "cache", "--quiet")
    for r in _evals(tmp_path / "run1"):   # one source: weights {corpus: 1} are the mixture's own batches
        assert r["val_loss/corpus"] == r["val_loss"]

    two = write_tiny_recipe(tmp_path / "two", steps=12, eval_every=6, checkpoint_every=0)
    rng = random.Random(0)
    (tmp_path / "two" / "digits.jsonl").write_text("".join(
        json.dumps({"text": "".join(rng.choice("0123456789") for _ in range(200))}) + "\n" for _ in range(100)))
    two.write_text(two.read_text().split("data:")[0] + TWO_SOURCES.lstrip("\n") + "optimizer:" + two.read_text().split("optimizer:", 1)[1])
    compile_to(two, tmp_path / "run2", sets=["train.eval_per_source=true"], host=Host())
    out = run_program(tmp_path / "run2", tmp_path / "cache")
    assert "| words " in out.stdout and "| digits " in out.stdout
    evals = _evals(tmp_path / "run2")
    assert [r["step"] for r in evals] == [0, 6, 12]
    last = evals[-1]
    assert all(math.isfinite(last[k]) for k in ("val_loss", "val_loss/words", "val_loss/digits"))
    # random digits and words are learned at different rates: their losses differ, the 50/50 mixture's lies between
    words, digits = last["val_loss/words"], last["val_loss/digits"]
    assert abs(words - digits) > 0.2
    assert min(words, digits) < last["val_loss"] < max(words, digits)


def test_per_source_validation_on_a_tpu_is_rejected(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r")
    with pytest.raises(RecipeError) as info:
        check(recipe, ["train.eval_per_source=true", "target.accelerator=tpu", "target.precision=auto"])
    assert any(d.path == "train.eval_per_source" for d in info.value.diagnostics)
