"""The learning-rate schedule written into train.py, checked against its formula at chosen steps."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from malt.compiler.api import compile_to
from malt.compiler.plan import Host

from .helpers import write_tiny_recipe


def load_train(run_dir):
    sys.path.insert(0, str(run_dir))
    try:
        spec = importlib.util.spec_from_file_location(f"train_{abs(hash(str(run_dir)))}", run_dir / "train.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # defines constants and functions; main() is not called
    finally:
        sys.path.remove(str(run_dir))
        sys.modules.pop("model", None)
    return module


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant", "wsd"])
def test_lr_schedule_matches_formula(tmp_path, decay):
    recipe = write_tiny_recipe(tmp_path / "r")
    run = tmp_path / "run"
    compile_to(recipe, run, sets=["train.steps=1000", "schedule.warmup=100", f"schedule.decay={decay}",
                                  "schedule.min_lr_ratio=10%", "schedule.decay_share=20%", "optimizer.lr=1e-3"], host=Host())
    t = load_train(run)
    lr, lo = 1e-3, 1e-4
    assert t.WARMUP_STEPS == 100 and t.MAX_STEPS == 1000 and t.MIN_LR == pytest.approx(lo)
    # linear warmup: step s (0-based) uses lr × (s + 1) / warmup
    assert t.lr_at(0) == pytest.approx(lr / 100)
    assert t.lr_at(49) == pytest.approx(lr / 2)
    assert t.lr_at(99) == pytest.approx(lr)

    def expected(s):
        if decay == "cosine":
            return lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * (s - 100) / 900))
        if decay == "linear":
            return lr - (lr - lo) * (s - 100) / 900
        if decay == "constant":
            return lr
        return lr if s < 800 else lr - (lr - lo) * (s - 800) / 200  # wsd: stable, then the last 20% decays

    for s in (100, 250, 550, 799, 800, 900, 999, 1000):
        assert t.lr_at(s) == pytest.approx(expected(s), rel=1e-12), s
    if decay != "constant":
        assert t.lr_at(1000) == pytest.approx(lo)
