"""Gradient synchronisation on accumulation micro-steps, on and off, with 2 processes on this CPU.

    python bench/ablate_ddp.py [--shape tiny] [--rounds 3] [--steps 16] [--skip 4] [--parallelism ddp,fsdp]

What runs: the generated program itself, through its launch.sh (torchrun, 2 gloo processes, one
thread each), compiled from bench/recipes/SHAPE.yaml for 2 devices with 4 micro-batches per device
per step, in fp32 eager. "as generated" synchronises gradients only on the last micro-step of a
step (`distributed.grad_sync`: DDP's no_sync(), FSDP2's set_requires_gradient_sync(False)); "sync
every micro-step" is a copy of its train.py with `sync=True`, what a loop without that care does.
Both give the same losses (checked below: the final loss of every run is printed). Variants
alternate round after round (ABBA); a run's tokens/s is the median of its steps after --skip. One
JSON line per variant: the median over rounds of its tokens/s, and of its ratio to the same round's
"sync every micro-step" run, with the range of those ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, cache_dir, compile_program, machine, wait_quiet


def variants(shape: str, parallelism: str, steps: int) -> dict[str, Path]:
    sets = ["target.devices=2", f"target.parallelism={parallelism}", "target.precision=fp32", "target.compile=off",
            "train.global_batch=16", "train.micro_batch=2", f"train.steps={steps}", "train.log_every=1"]
    generated = compile_program(shape, f"{parallelism}2-nosync", sets)
    every = OUT / f"cpu-{shape}-{parallelism}2-sync-every"
    shutil.rmtree(every, ignore_errors=True)
    shutil.copytree(generated, every)
    train = (every / "train.py").read_text()
    marker = "sync=micro == GRAD_ACCUM - 1"
    if marker not in train:
        raise SystemExit(f"{generated}/train.py has no `{marker}`: the template changed, update this benchmark")
    (every / "train.py").write_text(train.replace(marker, "sync=True"))
    return {f"{parallelism}, as generated (sync on the last micro-step)": generated,
            f"{parallelism}, sync every micro-step": every}


def run(program: Path) -> tuple[list[float], float]:
    for stale in ("checkpoints", "metrics.jsonl"):
        p = program / stale
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    env = {**os.environ, "MALT_CACHE_DIR": cache_dir(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(["bash", str(program / "launch.sh"), "--quiet"], check=False, cwd=program, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{program.name} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    recs = [json.loads(line) for line in (program / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    return [r["tokens_per_s"] for r in steps], steps[-1]["loss"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--skip", type=int, default=4)
    ap.add_argument("--parallelism", default="ddp,fsdp")
    args = ap.parse_args()
    print(json.dumps({"machine": machine()}), flush=True)
    for parallelism in args.parallelism.split(","):
        vs = variants(args.shape, parallelism, args.steps)
        rates = {name: [] for name in vs}     # per round: the median tokens/s of the steps after --skip
        losses = {name: [] for name in vs}
        for r in range(args.rounds):
            order = list(vs) if r % 2 == 0 else list(reversed(vs))
            for name in order:
                wait_quiet()
                tok_s, loss = run(vs[name])
                rates[name].append(statistics.median(tok_s[args.skip:]))
                losses[name].append(loss)
        base = rates[list(vs)[1]]
        for name in vs:
            ratios = [a / b for a, b in zip(rates[name], base)]  # paired by round: a slow spell hits both runs of a round
            print(json.dumps({"variant": name, "tokens_per_s": round(statistics.median(rates[name]), 1),
                              "vs_sync_every": round(statistics.median(ratios), 3),
                              "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                              "final_losses": sorted(set(losses[name])), "rounds": args.rounds}), flush=True)


if __name__ == "__main__":
    main()
