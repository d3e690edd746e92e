"""malt's generated program against the hand-written transformers baseline, on this CPU, in one run.

    python bench/compare_hf.py --shape tiny            # ~5.3M params, vocab 8192, seq 256, batch 8
    python bench/compare_hf.py --shape small           # ~29.5M params, vocab 8192, seq 512, batch 4
    python bench/compare_hf.py --shape tiny --rows hf-fp32,malt-fp32 --rounds 5

What runs: each row is a whole program started as a subprocess, N steps, on the same batches.
- malt rows run the generated train.py itself (`malt compile bench/recipes/SHAPE.yaml`, then
  `python train.py --quiet`); tokens/s per step come from its metrics.jsonl (train.log_every 1).
  "+" rows run a copy of that program with the proposed train.py changes (bench/patches.py).
- hf rows run bench/hf_baseline.py: transformers' LlamaForCausalLM of the same shape, the same
  data, batch, loss and clipping, with `torch.optim.AdamW(model.parameters(), lr)`.
Rows are alternated, round after round (the order rotates every round), so a slow spell of this
shared machine falls on all of them. tokens/s is the median over every step after --skip warm-up
steps of every round; "vs hf-fp32" divides medians. MFU counts the plan's flops_per_token (6 ×
matmul params + attention, PaLM) against the matmul peak of the row's precision, measured here
(best 2048³ matmul, torch's or oneDNN's, before and after the rounds). Time to first step is from process start to the
first logged step: imports, data ready (tokenized data cached), model, compile (cold: each run
gets an empty TORCHINDUCTOR_CACHE_DIR unless --warm-compile-cache), one step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, OUT, cache_dir, compile_program, load_program, machine, matmul_peak, median, plan_of, wait_quiet  # noqa: E402
from patches import patched  # noqa: E402

PROPOSED = {"loss", "alloc"}
# name: (description, kind, program, patches or hf precision)
ROWS = {
    "hf-fp32": ("transformers Llama + torch AdamW, fp32, eager", "hf", "fp32", "fp32"),
    "hf-bf16": ("transformers Llama + torch AdamW, bf16 autocast, eager", "hf", "fp32", "bf16"),
    "hf-fp32-compile": ("transformers Llama + torch AdamW, fp32, torch.compile(model)", "hf", "fp32", "fp32+compile"),
    "malt-fp32": ("malt, fp32, eager (--set target.precision=fp32 target.compile=off)", "malt", "fp32", set()),
    "malt-fp32+": ("malt, fp32, eager, + proposed train.py changes", "malt", "fp32", PROPOSED),
    "malt-auto": ("malt, its passes' choices for this CPU and run length", "malt", "auto", set()),
    "malt-auto+": ("malt, its passes' choices, + proposed train.py changes", "malt", "auto", PROPOSED),
    "malt-bf16c": ("malt, bf16 autocast + torch.compile (auto's choice for long runs)", "malt", "bf16c", set()),
    "malt-bf16c+": ("malt, bf16 + compile, + proposed changes (loss compiled with the model)", "malt", "bf16c", PROPOSED),
}
PROGRAMS = {"fp32": ["target.precision=fp32", "target.compile=off"], "auto": [], "bf16c": ["target.precision=bf16", "target.compile=on"]}
DEFAULT_ROWS = "hf-fp32,malt-fp32,malt-fp32+,hf-bf16,malt-auto,malt-auto+,malt-bf16c+"


def run_row(key: str, programs: dict, steps: int | None, env: dict) -> dict:
    desc, kind, prog_key, what = ROWS[key]
    program = programs[(prog_key, frozenset(what) if kind == "malt" else frozenset())]
    if kind == "hf":
        metrics = OUT / f"hf-{key}.jsonl"
        metrics.unlink(missing_ok=True)
        cmd = [sys.executable, str(BENCH / "hf_baseline.py"), str(program), "--metrics", str(metrics),
               "--precision", what.split("+")[0]] + (["--compile"] if "compile" in what else [])
        if steps:
            cmd += ["--steps", str(steps)]
    else:
        metrics = program / "metrics.jsonl"
        shutil.rmtree(program / "checkpoints", ignore_errors=True)
        metrics.unlink(missing_ok=True)
        cmd = [sys.executable, str(program / "train.py"), "--quiet"]
    waited = wait_quiet()
    if env.get("MALT_BENCH_COLD_COMPILE") == "1":   # each run compiles from scratch, as a first run on a machine does
        env = {**env, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-", dir=OUT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=program, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, seen, marks = None, 0, []    # marks: (wall, child CPU seconds) when each metrics line appeared
    while proc.poll() is None:
        n = metrics.read_bytes().count(b"\n") if metrics.exists() else 0
        if n > seen:
            now, cpu = time.perf_counter(), _cpu_seconds(proc.pid)
            first = first if first is not None else now - t0
            marks += [(now, cpu)] * (n - seen)
            seen = n
        time.sleep(0.01)
    output = proc.stdout.read()
    if "TORCHINDUCTOR_CACHE_DIR" in env and env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(OUT)):
        shutil.rmtree(env["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"{key} failed (exit {proc.returncode}):\n{output[-3000:]}")
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    idx = [i for i, r in enumerate(recs) if "loss" in r and "tokens_per_s" in r]
    # CPU utilisation of each step, from the polled marks; a step that shared the cores with other
    # work is dropped (as common.clean does in-process). Marks can lag a poll interval: ±10 ms.
    util = [None] + [(marks[i][1] - marks[i - 1][1]) / max(1e-3, marks[i][0] - marks[i - 1][0])
                     if i < len(marks) and marks[i][0] > marks[i - 1][0] else None for i in idx[1:]]
    return {"first_step_s": first if first is not None else float("nan"), "rates": [recs[i]["tokens_per_s"] for i in idx],
            "util": util, "losses": [recs[i]["loss"] for i in idx], "wall_s": time.perf_counter() - t0, "waited_s": waited}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def kept(res: dict, skip: int) -> list:
    """Tokens/s of the steps after warm-up that got their CPUs (utilisation ≥ 80% of the run's best)."""
    pairs = [(r, u) for r, u in list(zip(res["rates"], res["util"]))[skip:]]
    best = max((u for _, u in pairs if u is not None and u == u), default=None)
    if not best:
        return [r for r, _ in pairs]
    return [r for r, u in pairs if u is not None and u >= 0.8 * best]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, of: {', '.join(ROWS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: the bench recipe's train.steps)")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps dropped from each run")
    ap.add_argument("--warm-compile-cache", action="store_true",
                    help="let torch.compile reuse its on-disk cache between runs (default: every run compiles cold)")
    args = ap.parse_args()
    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row {unknown[0]!r}; rows: {', '.join(ROWS)}")

    OUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MALT_CACHE_DIR": cache_dir(), "PYTHONUNBUFFERED": "1",
           "MALT_BENCH_COLD_COMPILE": "0" if args.warm_compile_cache else "1"}
    os.environ["MALT_CACHE_DIR"] = env["MALT_CACHE_DIR"]
    steps_set = [f"train.steps={args.steps}"] if args.steps else []
    programs = {}
    for key in rows:
        _, kind, prog_key, what = ROWS[key]
        base = programs.get((prog_key, frozenset()))
        if base is None:
            base = programs[(prog_key, frozenset())] = compile_program(args.shape, prog_key, PROGRAMS[prog_key] + steps_set)
        if kind == "malt" and what:
            programs[(prog_key, frozenset(what))] = patched(base, set(what), "+".join(sorted(what)))
    any_prog = next(iter(programs.values()))
    plan = plan_of(any_prog)
    auto = plan_of(programs[("auto", frozenset())]) if ("auto", frozenset()) in programs else None

    print(machine())
    # data ready once, so that every row's time to first step finds it cached

    from malt.runtime import data

    train, _ = load_program(any_prog)
    t = time.perf_counter()
    data.prepare({**train.DATA, "base_dir": str(any_prog)}, cache_dir=cache_dir(), log=lambda m: None)
    data_s = time.perf_counter() - t
    peaks = {"fp32": matmul_peak("fp32"), "bf16": matmul_peak("bf16")}
    print(f"shape {args.shape}: {plan['params']:,} params, vocab {plan['model']['padded_vocab']}, seq {plan['batch']['seq_len']}, "
          f"batch {plan['batch']['global_batch']} = {plan['batch']['tokens_per_step']:,} tokens/step, "
          f"{plan['flops_per_token'] / 1e6:.1f} MFLOPs/token; data ready in {data_s:.1f} s")
    if auto:
        ex = auto["execution"]
        print(f"malt-auto: precision {ex['precision']}, compile {ex['compile']} ("
              + "; ".join(f"{d['name']}: {d['reason']}" for d in auto["decisions"] if d["name"] in ("precision", "compile")) + ")")
    results = {k: [] for k in rows}
    for r in range(args.rounds):
        order = rows[r % len(rows):] + rows[:r % len(rows)]
        if r % 2:
            order = order[::-1]
        for key in order:
            res = run_row(key, programs, args.steps, env)
            results[key].append(res)
            k = kept(res, args.skip)
            print(f"  round {r + 1} {key:16s} {median(k) if k else float('nan'):9.0f} tok/s  first step {res['first_step_s']:5.1f} s  "
                  f"({len(k)}/{len(res['rates']) - args.skip} steps kept, waited {res['waited_s']:.0f} s for a quiet machine)", flush=True)
    for p in ("fp32", "bf16"):
        peaks[p] = max(peaks[p], matmul_peak(p))

    summary = {}
    for key in rows:
        rates = [x for res in results[key] for x in kept(res, args.skip)]
        precision = "bf16" if ("bf16" in key or (key.startswith("malt-auto") and auto and auto["execution"]["precision"] == "bf16")) else "fp32"
        tok_s = median(rates)
        summary[key] = {"description": ROWS[key][0], "tokens_per_s": tok_s, "precision": precision,
                        "mfu": tok_s * plan["flops_per_token"] / peaks[precision],
                        "first_step_s": median([res["first_step_s"] for res in results[key]]),
                        "per_round": [median(kept(res, args.skip)) for res in results[key]],
                        "steps_kept": f"{len(rates)}/{sum(len(res['rates']) - args.skip for res in results[key])}",
                        "final_loss": median([res["losses"][-1] for res in results[key]])}
    base = summary.get("hf-fp32", next(iter(summary.values())))["tokens_per_s"]
    print(f"\nmatmul peak measured: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s\n")
    print("| row | tokens/s (median) | vs hf-fp32 | MFU (of its precision's peak) | time to first step | loss at last step |")
    print("|---|---|---|---|---|---|")
    for key, s in summary.items():
        print(f"| {key}: {s['description']} | {s['tokens_per_s']:,.0f} | {s['tokens_per_s'] / base:.2f}× | "
              f"{s['mfu']:.1%} ({s['precision']}) | {s['first_step_s']:.1f} s | {s['final_loss']:.4f} |")
    out = OUT / f"compare-{args.shape}.json"
    out.write_text(json.dumps({"machine": machine(), "shape": args.shape, "plan": {k: plan[k] for k in ("params", "flops_per_token")},
                               "batch": plan["batch"], "peaks": peaks, "data_ready_s": data_s, "rounds": args.rounds,
                               "skip": args.skip, "rows": summary}, indent=2))
    print(f"\n(written to {out.relative_to(BENCH.parent)})")


if __name__ == "__main__":
    main()
