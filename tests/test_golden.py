"""Golden files: every recipe in recipes/ renders to the files under tests/golden/<recipe>/.

To accept a change, re-render them and read the diff as a reviewer would:

    MALT_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

from malt.compiler.api import compile_files
from malt.compiler.plan import Host

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
GOLDEN = ROOT / "tests" / "golden"
UPDATE = os.environ.get("MALT_UPDATE_GOLDEN") == "1"
HOST = Host(cuda=False, cuda_name="", cpu_cores=2, memory_bytes=24 * 2**30)

ALLOWED_IMPORTS = {"torch", "malt", "model"} | set(sys.stdlib_module_names)


def render(recipe: Path) -> dict[str, str]:
    cwd = os.getcwd()
    os.chdir(ROOT)  # recipe paths in headers are shown relative to the working directory
    try:
        _, files = compile_files(recipe.relative_to(ROOT), GOLDEN / recipe.stem, host=HOST)
    finally:
        os.chdir(cwd)
    return files


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_golden(recipe):
    files = render(recipe)
    out = GOLDEN / recipe.stem
    if UPDATE:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)
    for name, text in files.items():
        expected = (out / name)
        assert expected.exists(), f"no golden file {expected}; run with MALT_UPDATE_GOLDEN=1"
        assert text == expected.read_text(), f"{name} of {recipe.name} differs from its golden file; if intended, MALT_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_render_is_deterministic_and_clean(recipe):
    a, b = render(recipe), render(recipe)
    assert a == b
    for name in ("train.py", "model.py"):
        tree = ast.parse(a[name])  # it parses
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
                if node.module and node.module.startswith("malt"):
                    assert node.module.startswith("malt.runtime"), f"{name} imports {node.module}"
            else:
                continue
            assert roots <= ALLOWED_IMPORTS, f"{name} imports {roots - ALLOWED_IMPORTS}"
        assert str(ROOT) not in a[name], "absolute paths must not leak into generated code"
    assert "malt.compiler" not in a["train.py"]
