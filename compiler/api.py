"""The compiler's entry points, used by the CLI and the tests."""

from __future__ import annotations

from pathlib import Path

from .loader import Loaded, load
from .objectives import teacher_spec
from .plan import Host, Plan, lower, run_passes
from .validate import tokenizer_vocab, validate


def check(recipe_path: str | Path, sets: list[str] | None = None, resuming: bool = False):
    """Load and validate; raises RecipeError with every problem found. ``resuming``: for `malt run --resume`, where
    the init_from checkpoint, which only a first start reads, may be gone."""
    loaded = load(recipe_path, sets)
    loaded.resuming = resuming
    return validate(loaded), loaded


def plan(recipe_path: str | Path, sets: list[str] | None = None, host: Host | None = None,
         check_fit: bool = True, resuming: bool = False) -> tuple[Plan, Loaded]:
    """Validate and plan; with ``check_fit``, a run that does not fit its devices' memory is a RecipeError."""
    recipe, loaded = check(recipe_path, sets, resuming)
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
                  host: Host | None = None, resuming: bool = False) -> tuple[Plan, dict[str, str]]:
    """Plan and render, without writing: (plan, {file name: text})."""
    from .render import render

    p, loaded = plan(recipe_path, sets, host, resuming=resuming)
    return p, render(p, loaded.base_dir, Path(out_dir))


def compile_to(recipe_path: str | Path, out_dir: str | Path, sets: list[str] | None = None, host: Host | None = None) -> Plan:
    from .render import write

    p, files = compile_files(recipe_path, out_dir, sets, host)
    write(files, Path(out_dir))
    return p
