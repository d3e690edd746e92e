"""How long a checkpoint stops training: checkpoint.save in the foreground against background=True.

    python bench/checkpoint_stall.py                       # llama-124m's shape, fp32, on this machine
    python bench/checkpoint_stall.py --recipe recipes/tiny.yaml --rounds 6
    python bench/checkpoint_stall.py --format sharded      # torch.distributed.checkpoint, one process
    python bench/checkpoint_stall.py --device cuda --program bench/out/gpu2/124m-bf16   # a GPU machine (gpu_checks.sh)

Builds the generated model of a recipe (compiled for cpu, fp32) with an AdamW state, then alternates the two
kinds of save (ABBA over rounds) into a scratch run directory. For each it reports the time save() blocks the
caller (what a training loop waits for: the finiteness check, the copy to host memory and, in the foreground,
the write) and, for background saves, the time until the checkpoint is in place. A background write still in
flight when the next save comes is waited for outside the timing (a run's next save would wait for it).
Between saves a busy loop of matmuls stands in for training, so the background write competes with compute as
it does in a run. Medians over the rounds; one JSON line per row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def build(recipe: Path, out: Path, device: str, program: Path | None):
    if program is None:
        from malt.compiler.api import compile_to

        compile_to(recipe, out, ["target.accelerator=cpu", "target.precision=fp32", "target.compile=off"])
    else:  # a program compiled elsewhere (a GPU machine with malt's runtime only)
        out = program
    spec = importlib.util.spec_from_file_location("stall_model", out / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Transformer().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    return model, optimizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "llama-124m.yaml")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--work", type=float, default=4.0, help="seconds of matmuls between saves (the training)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--format", choices=["full", "sharded"], default="full",
                    help="full: safetensors from the first process; sharded: torch.distributed.checkpoint (here one process)")
    ap.add_argument("--program", type=Path, help="an already compiled program's directory (its model.py) instead of --recipe")
    args = ap.parse_args()
    from malt.runtime import checkpoint
    from malt.runtime.run import Run

    scratch = Path(tempfile.mkdtemp(prefix="malt-stall-"))
    try:
        model, optimizer = build(args.recipe, scratch / "program", args.device, args.program)
        params = sum(p.numel() for p in model.parameters())
        run = Run(scratch / "run", "stall", "hash", resume=False, quiet=True)
        a = torch.randn(512, 512, device=args.device)
        times = {"foreground": [], "background": []}
        landed = []
        step = 0
        for r in range(args.rounds):
            order = ("foreground", "background") if r % 2 == 0 else ("background", "foreground")
            for kind in order:
                step += 1
                checkpoint.wait()  # the last background write is in place: each save is timed alone
                t0 = time.perf_counter()
                checkpoint.save(run, step, model, optimizer, keep=2, fmt=args.format, background=kind == "background")
                blocked = time.perf_counter() - t0
                t_end = time.perf_counter() + args.work  # "training" while the thread writes
                while time.perf_counter() < t_end:
                    a = torch.tanh(a @ a)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    if kind == "background" and checkpoint.writing() is None and len(landed) < len(times["background"]) + 1:
                        landed.append(time.perf_counter() - t0)
                if kind == "background" and checkpoint.writing() is not None:
                    checkpoint.wait()
                    landed.append(time.perf_counter() - t0)
                times[kind].append(blocked)
        size = sum(f.stat().st_size for f in (run.checkpoints / f"step_{step:08d}").rglob("*") if f.is_file())
        for kind, ts in times.items():
            row = {"save": kind, "format": args.format, "device": args.device, "params": params, "checkpoint_bytes": size, "blocked_s": round(statistics.median(ts), 3),
                   "blocked_each_s": [round(t, 3) for t in ts]}
            if kind == "background":
                row["in_place_after_s"] = round(statistics.median(landed), 3)
            print(json.dumps(row), flush=True)
        fg, bg = statistics.median(times["foreground"]), statistics.median(times["background"])
        print(json.dumps({"training_waits_less": f"{fg / bg:.1f}x"}), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
