"""Summarise a run directory's metrics.jsonl: median tokens/s after warm-up, and MFU against a stated peak.

    python bench/report.py RUN_DIR [--peak-tflops 989] [--skip 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense peak of the device (default: the plan's)")
    ap.add_argument("--skip", type=int, default=3, help="logged intervals to drop as warm-up (compile, allocator)")
    args = ap.parse_args()
    plan = json.loads((args.run_dir / "plan.json").read_text())
    recs = [json.loads(l) for l in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    rates = [r["tokens_per_s"] for r in steps[args.skip:]]
    tok_s = statistics.median(rates)
    peak = (args.peak_tflops * 1e12) if args.peak_tflops else plan["estimate_basis"]["peak_flops"]
    mfu = tok_s * plan["flops_per_token"] / peak
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    first = steps[0]
    print(json.dumps({
        "run": plan["name"], "params": plan["params"], "precision": plan["execution"]["precision"],
        "compile": plan["execution"]["compile"], "tokens_per_step": plan["batch"]["tokens_per_step"],
        "median_tokens_per_s": tok_s, "mfu": round(mfu, 4), "peak_flops": peak,
        "seconds_to_first_logged_step": first["elapsed_s"], "first_loss": first["loss"], "last_loss": steps[-1]["loss"],
        "val_losses": vals, "max_memory_gib": max((r.get("max_memory_gib", 0) for r in steps), default=None),
    }, indent=2))


if __name__ == "__main__":
    main()
