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
    sets = ["train.steps=1000", "schedule.warmup=100", f"schedule.decay={decay}", "optimizer.lr=1e-3"]
    sets += ["schedule.min_lr_ratio=10%"] if decay != "constant" else []
    sets += ["schedule.decay_share=20%"] if decay == "wsd" else []
    compile_to(recipe, run, sets=sets, host=Host())
    t = load_train(run)
    lr, lo = 1e-3, 1e-4
    assert t.WARMUP_STEPS == 100 and t.MAX_STEPS == 1000
    assert decay == "constant" or t.MIN_LR == pytest.approx(lo)
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


def test_inverse_sqrt_and_infinite_schedules(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r")
    lr = 1e-3
    run = tmp_path / "isqrt"
    compile_to(recipe, run, sets=["train.steps=1000", "schedule.warmup=100", "schedule.decay=inverse_sqrt", "optimizer.lr=1e-3"],
               host=Host())
    t = load_train(run)
    assert t.lr_at(99) == pytest.approx(lr)
    assert t.lr_at(399) == pytest.approx(lr * math.sqrt(100 / 400))
    assert t.lr_at(999) == pytest.approx(lr * math.sqrt(100 / 1000))

    run = tmp_path / "inf"
    compile_to(recipe, run, sets=["train.steps=1000", "schedule.warmup=100", "schedule.decay=infinite", "optimizer.lr=1e-3",
                                  "schedule.cooldown_share=20%", "schedule.constant_ratio=50%", "schedule.decay_share=10%",
                                  "schedule.min_lr_ratio=1%"], host=Host())
    t = load_train(run)
    plateau, lo = 5e-4, 1e-5
    assert (t.COOLDOWN_END, t.DECAY_START) == (300, 900)
    assert t.lr_at(100) == pytest.approx(lr)                                      # cooldown starts at the peak
    assert t.lr_at(200) == pytest.approx(plateau + (lr - plateau) * 0.5)           # halfway down the cosine
    assert t.lr_at(300) == t.lr_at(650) == t.lr_at(899) == pytest.approx(plateau)  # the plateau
    # annealing: exponential, plateau × (η_min / plateau)^progress (Ibrahim et al. 2024): halfway, the geometric mean
    assert t.lr_at(950) == pytest.approx(math.sqrt(plateau * lo))
    assert t.lr_at(925) == pytest.approx(plateau * (lo / plateau) ** 0.25)
    assert t.lr_at(1000) == pytest.approx(lo)


def test_the_infinite_schedule_needs_a_final_lr_above_zero(tmp_path):
    """Its exponential annealing cannot reach 0: min_lr_ratio 0 is an error, for the recipe's schedule and a phase's."""
    from malt.compiler.api import check
    from malt.compiler.diagnostics import RecipeError

    recipe = write_tiny_recipe(tmp_path / "r", steps=100)
    with pytest.raises(RecipeError, match="schedule.min_lr_ratio: the infinite schedule anneals exponentially"):
        check(recipe, ["schedule.decay=infinite", "schedule.min_lr_ratio=0"])
    phased = recipe.read_text() + "phases:\n  - {name: a, share: 50%}\n  - {name: b, share: 50%, schedule: {decay: infinite, min_lr_ratio: 0}}\n"
    recipe.write_text(phased)
    with pytest.raises(RecipeError, match=r"recipe.yaml:15:55: error: phases\.1\.schedule\.min_lr_ratio: the infinite schedule anneals exponentially"):
        check(recipe)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant", "wsd", "inverse_sqrt", "infinite"])
def test_compiler_schedule_equals_generated_lr_at(tmp_path, decay):
    """`malt plan --lr` computes the curve in the compiler; it must be the generated program's, step for step."""
    from malt.compiler.phases import lr_at

    recipe = write_tiny_recipe(tmp_path / "r")
    p = compile_to(recipe, tmp_path / "run", sets=["train.steps=300", "schedule.warmup=7%", f"schedule.decay={decay}"], host=Host())
    t = load_train(tmp_path / "run")
    assert [t.lr_at(s) for s in range(300)] == [lr_at(p, s) for s in range(300)]


def test_schedule_field_for_another_decay_is_an_error(tmp_path):
    from malt.compiler.api import check
    from malt.compiler.diagnostics import RecipeError

    recipe = write_tiny_recipe(tmp_path / "r")
    with pytest.raises(RecipeError, match="cooldown_share is not used by decay 'cosine'"):
        check(recipe, ["schedule.cooldown_share=10%"])
    with pytest.raises(RecipeError, match="min_lr_ratio is not used by decay 'inverse_sqrt'"):
        check(recipe, ["schedule.decay=inverse_sqrt", "schedule.min_lr_ratio=5%"])
