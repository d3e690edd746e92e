"""Causal attention on this CPU: the generated causal_attention (choose_attention's blocked_causal) against
scaled_dot_product_attention(is_causal=True), forward and backward, at several lengths, bf16 and fp32.

    python bench/attention.py [--reps 9] [--blocks 64,128,256] [--mask documents]

What runs: the causal_attention of a program malt generates (bench/recipes/tiny.yaml compiled for bf16 on a CPU
with bf16 matmuls, so the function is in its model.py whatever this machine is), imported as is, and SDPA, on the
same random (batch, heads, T, head_dim) q, k, v; one step is forward + backward of the output against a fixed
gradient. bf16 rows run under bf16 autocast as the program does. Variants alternate step by step (ABBA) after
warm-up, with the quiet-machine wait and CPU-utilisation filter of bench/common.py; "speedup" is the median over
rounds of SDPA's time / the variant's. --blocks also times copies with other QUERY_BLOCK values. --mask documents
gives both a (batch, 1, T, T) block-diagonal causal mask of documents about 100 tokens long (data.packing document):
SDPA as attn_mask, causal_attention as its mask argument. The table in
docs/performance.md (and choose_attention's BLOCKED_MAX_SEQ, QUERY_BLOCK) come from this script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, alternate, clean_median, load_model_module, machine, paired_speedup, tune_allocator  # noqa: E402

# (batch, heads, T, head_dim): the default recipe's, bench/recipes tiny's and small's micro-batches, and longer rows
SHAPES = [(16, 4, 128, 48), (8, 4, 256, 64), (4, 8, 512, 64), (2, 12, 1024, 64), (1, 12, 2048, 64)]


def generated_attention(block: int):
    """causal_attention from a freshly generated model.py, with QUERY_BLOCK set to ``block``."""
    from malt.compiler.api import compile_to
    from malt.compiler.plan import Host

    out = OUT / "attention-program"
    plan = compile_to(Path(__file__).resolve().parent / "recipes" / "tiny.yaml", out, host=Host(cpu_bf16=True),
                      sets=["target.precision=bf16", "target.compile=off", "data.packing=document"])  # mask=None: causal
    if plan.attention != "blocked_causal":
        raise SystemExit(f"choose_attention chose {plan.attention} for bench/recipes/tiny.yaml in bf16; update bench/attention.py")
    module = load_model_module(out, f"attention_block_{block}")
    module.QUERY_BLOCK = block
    return module.causal_attention


def main():
    import torch
    import torch.nn.functional as F

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--blocks", default="128", help="QUERY_BLOCK values to time (comma-separated); 128 is the generated one")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--mask", choices=["causal", "documents"], default="causal")
    args = ap.parse_args()
    tune_allocator()
    blocks = [int(b) for b in args.blocks.split(",")]
    fns = {b: generated_attention(b) for b in blocks}
    print(machine())
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
        autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype_name == "bf16" else contextlib.nullcontext
        for B, H, T, D in SHAPES:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype).requires_grad_() for _ in range(3))
            grad = torch.randn(B, H, T, D, generator=g).to(dtype)
            mask = None
            if args.mask == "documents":
                ids = torch.cumsum(torch.rand(B, T, generator=g) < 0.01, dim=1)
                pos = torch.arange(T)
                mask = ((pos[None, :] <= pos[:, None]) & (ids[:, :, None] == ids[:, None, :]))[:, None]

            def step(fn):
                def run():
                    for t in (q, k, v):
                        t.grad = None
                    with autocast():
                        out = fn(q, k, v)
                    out.backward(grad)
                return run
            variants = {"sdpa": step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None))}
            variants.update({f"blocked {b}": step(lambda q, k, v, f=fns[b]: f(q, k, v, mask)) for b in blocks})
            times = alternate(variants, args.reps, args.warmup)
            base = times["sdpa"]
            for name, t in times.items():
                rows.append({"dtype": dtype_name, "shape": [B, H, T, D], "variant": name,
                             "ms": 1e3 * clean_median(t), "speedup": paired_speedup(base, t)})
                print(f"  {dtype_name} B{B} H{H} T{T} D{D}  {name:12s} {rows[-1]['ms']:7.1f} ms  ×{rows[-1]['speedup']:.2f}", flush=True)

    print("\n| dtype | batch × heads × T × head_dim | SDPA (ms, fwd + bwd) | " + " | ".join(f"blocked {b}" for b in blocks) + " |")
    print("|---|---|---|" + "---|" * len(blocks))
    for i in range(0, len(rows), 1 + len(blocks)):
        sdpa, *others = rows[i:i + 1 + len(blocks)]
        print(f"| {sdpa['dtype']} | {' × '.join(map(str, sdpa['shape']))} | {sdpa['ms']:.1f} | "
              + " | ".join(f"{o['ms']:.1f} ({o['speedup']:.2f}×)" for o in others) + " |")
    out = OUT / f"attention-{args.mask}.json"
    out.write_text(json.dumps({"machine": machine(), "mask": args.mask, "rows": rows}, indent=2))
    print(f"\n(written to {out.relative_to(OUT.parent.parent)})")


if __name__ == "__main__":
    main()
