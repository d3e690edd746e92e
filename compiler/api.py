"""The compiler's entry points, used by the CLI and the tests."""

from __future__ import annotations

from pathlib import Path

from .loader import Loaded, load
from .objectives import teacher_spec
from .plan import Host, Plan, lower, run_passes
from .validate import tokenizer_vocab, validate


def check(recipe_path: str | Path, sets: list[str] | None = None):
    """Load and validate; raises RecipeError with every problem found."""
    loaded = load(recipe_path, sets)
    return validate(loaded), loaded


def plan(recipe_path: str | Path, sets: list[str] | None = None, host: Host | None = None,
         check_fit: bool = True) -> tuple[Plan, Loaded]:
    """Validate and plan; with ``check_fit``, a run that does not fit its devices' memory is a RecipeError."""
    recipe, loaded = check(recipe_path, sets)
    vocab = tokenizer_vocab(recipe, loaded.base_dir)
    p = run_passes(lower(recipe, loaded.file, vocab, host or Host.detect(), teacher=teacher_spec(recipe, loaded.base_dir)))
    if check_fit:
        from .diagnostics import RecipeError
        from .fit import problems

        found = problems(p, loaded)
        if found:
            raise RecipeError(found)
    return p, loaded


def compile_files(recipe_path: str | Path, out_dir: str | Path, sets: list[str] | None = None,
                  host: Host | None = None) -> tuple[Plan, dict[str, str]]:
    """Plan and render, without writing: (plan, {file name: text})."""
    from .render import render

    p, loaded = plan(recipe_path, sets, host)
    return p, render(p, loaded.base_dir, Path(out_dir))


def compile_to(recipe_path: str | Path, out_dir: str | Path, sets: list[str] | None = None, host: Host | None = None) -> Plan:
    from .render import write

    p, files = compile_files(recipe_path, out_dir, sets, host)
    write(files, Path(out_dir))
    return p
