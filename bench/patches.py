"""Proposed changes to the generated train.py, applied to a copy of a generated program so the
benchmarks can measure them before they are made in templates/train.py.j2 / malt.runtime.

- "loss": the training step asks the model for the loss, `forward(x, y)`, instead of
  `loss_fn(forward(x), y)`: eager, the model computes it chunk by chunk (ChunkedCrossEntropy in
  model.py); with torch.compile, the loss is compiled together with the model.
- "alloc": glibc's allocator keeps freed memory (mallopt, see common.tune_allocator); proposed as
  a malt.runtime call made by start_run() on CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

BENCH = Path(__file__).resolve().parent

STEP_LOSS = "loss = loss_fn(forward(x.to(DEVICE, non_blocking=True)), y.to(DEVICE, non_blocking=True))"
STEP_LOSS_FUSED = "loss = forward(x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True))"
AFTER_IMPORTS = "from malt.runtime.run import entry, start_run\n"
ALLOC = (f"sys.path.insert(0, {str(BENCH)!r})  # bench patch: the proposed runtime allocator setting\n"
         "from common import tune_allocator  # noqa: E402\n\ntune_allocator()\n")


class PatchError(Exception):
    pass


def patched(program: Path, patches: set[str], suffix: str = "proposed") -> Path:
    """Copy `program` to `<program>-<suffix>` and apply `patches` ("loss", "alloc") to its train.py."""
    program = Path(program)
    out = program.with_name(f"{program.name}-{suffix}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("train.py", "model.py", "plan.json", "recipe.lock.yaml", "launch.sh"):
        if (program / name).exists():
            shutil.copy2(program / name, out / name)
    text = (out / "train.py").read_text()
    if "loss" in patches and "loss = forward(x" not in text:   # (skipped once train.py.j2 does it)
        if STEP_LOSS not in text:
            raise PatchError(f"{program}/train.py has no line {STEP_LOSS!r}: the template changed; update bench/patches.py")
        if "targets=None" not in (out / "model.py").read_text():
            raise PatchError(f"{program}/model.py's forward takes no targets: templates/model.py.j2 lacks the chunked loss")
        text = text.replace(STEP_LOSS, STEP_LOSS_FUSED)
    if "alloc" in patches:
        if AFTER_IMPORTS not in text:
            raise PatchError(f"{program}/train.py has no line {AFTER_IMPORTS.strip()!r}; update bench/patches.py")
        text = text.replace(AFTER_IMPORTS, AFTER_IMPORTS + ALLOC, 1)
    (out / "train.py").write_text(text)
    return out
