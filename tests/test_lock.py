"""recipe.lock.yaml, "the recipe with every default written out": it must itself be a valid recipe that means the
same run (same hash, same plan), wherever the program was compiled to."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from malt.compiler.api import check, compile_to
from malt.compiler.plan import Host

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_the_lock_of_every_shipped_recipe_checks_and_hashes_the_same(name, tmp_path):
    out = tmp_path / "deep" / "build"                        # another folder than the recipe's: paths are rebased
    plan = compile_to(ROOT / "recipes" / name, out, host=Host())
    lock = out / "recipe.lock.yaml"
    check(lock)                                              # a valid recipe: nothing it writes out is refused
    relocked = compile_to(lock, out / "again", host=Host())  # and the same run (paths differ in text, so the hash may)
    a, b = plan.to_json(), relocked.to_json()
    for key in ("params", "steps", "tokens", "total_flops", "model", "batch", "schedule"):
        assert b[key] == a[key], key


def test_the_lock_leaves_out_what_the_recipe_does_not_read(tmp_path):
    compile_to(ROOT / "recipes" / "tiny.yaml", tmp_path / "b", host=Host())
    lock = yaml.safe_load((tmp_path / "b" / "recipe.lock.yaml").read_text())
    assert lock["schedule"]["decay"] == "cosine" and "decay_share" not in lock["schedule"] and "min_lr_ratio" in lock["schedule"]
    assert "rank" not in lock["optimizer"]                    # GaLore's, with adamw
    assert lock["data"]["sources"][0]["path"] == "builtin:python-docs"
