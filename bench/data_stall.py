"""How long the data loader takes to build a step's batches, against the step it feeds.

    python bench/data_stall.py [--seq-len 1024] [--global-batch 64] [--micro-batch 16]

Builds a synthetic corpus (about 24M bytes-level tokens, nothing downloaded), prepares it with
malt.runtime.data (the generated program's loader), and times `Dataset.batch` for one optimizer
step of llama-124m's shape (64 × 1024 tokens in 4 micro-batches) with each packing. The step
times it compares against are the measured GPU figures in docs/performance.md: a batch built
inline stalls the GPU for its whole duration, since the generated loop builds it between steps.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

# measured steps that the loader feeds (docs/performance.md): tokens/s of the generated program
GPU_STEPS = {"H200 llama-124m (524k tok/s)": 65_536 / 524_140, "H200 llama-350m (192k tok/s)": 65_536 / 191_640}


def corpus(path: Path, n_docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = "the model reads tokens and learns to predict the next one from the ones before it".split()
    with path.open("w") as f:
        for _ in range(n_docs):
            n = int(rng.lognormvariate(5.0, 1.0))            # documents of a few to a few thousand words
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(max(n, 3)))}) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--docs", type=int, default=20_000)
    args = ap.parse_args(argv)
    from malt.runtime import data

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus(tmp / "corpus.jsonl", args.docs)
        rows = []
        for packing in ("concat", "document", "best_fit"):
            spec = {"base_dir": str(tmp), "seed": 1, "packing": packing, "validation": 0.01,
                    "tokenizer": {"kind": "bytes"},
                    "sources": [{"name": "corpus", "path": "corpus.jsonl", "weight": 1.0}]}
            ds = data.prepare(spec, cache_dir=tmp / "cache", log=lambda m: None)
            accum = args.global_batch // args.micro_batch

            def step(s):
                return [ds.batch("train", s, m * args.micro_batch, args.micro_batch, args.seq_len) for m in range(accum)]

            step(0)                                            # first use (best_fit builds its packing here)
            times = []
            for s in range(1, args.steps + 1):
                t0 = time.perf_counter()
                step(s)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            rows.append((packing, med))
        tokens = args.global_batch * args.seq_len
        print(f"one step's batches: {args.global_batch} × {args.seq_len} = {tokens:,} tokens "
              f"in {args.global_batch // args.micro_batch} micro-batches; median of {args.steps} steps")
        print("| packing | batch build (ms) | loader tokens/s | " + " | ".join(f"share of a step, {k}" for k in GPU_STEPS) + " |")
        for packing, med in rows:
            shares = " | ".join(f"{med / (med + t):.1%}" for t in GPU_STEPS.values())
            print(f"| {packing} | {med * 1e3:.1f} | {tokens / med:,.0f} | {shares} |")


if __name__ == "__main__":
    sys.exit(main())
