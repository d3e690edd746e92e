"""fp32 matrix products on this CPU: torch's matmul (MKL's sgemm) against oneDNN, at a model's linear-layer shapes.

    python bench/matmul.py                      # bench/recipes/small.yaml's shapes (d_model 512, d_ff 1376, vocab 8192, 2048 positions)
    python bench/matmul.py --shape tiny --reps 30

For each linear layer of the shape (q/k/v/o, gate/up, down, and the head) and each of its three products in a
training step (forward x @ Wᵀ, grad x = g @ W, grad W = gᵀ @ x), GFLOP/s of:
- torch: `a @ b` in fp32 (at::mm: MKL's sgemm in torch's CPU wheels);
- oneDNN: `torch.ops.mkldnn._linear_pointwise(a, b)` in fp32 on the same strided views (what the generated `mm_nt`
  runs where choose_matmul picks oneDNN);
- bf16: `a @ b` in bf16 (torch gives bf16 products to oneDNN already), for scale.
Each is the median of --reps calls after warm-up, the three alternated call by call. The last line is the
ratio oneDNN / torch over one block's products (q, k, v, o four times, gate and up twice) and the head's.
The errors against fp64 show both are fp32 products.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

SHAPES = {  # positions per micro-batch, d_model, d_ff, vocab (bench/recipes/*.yaml)
    "tiny": (8 * 256, 256, 688, 8192),
    "small": (4 * 512, 512, 1376, 8192),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="small")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()

    import torch

    if not torch.backends.mkldnn.is_available():
        raise SystemExit("this torch has no oneDNN (torch.backends.mkldnn.is_available() is False)")
    n, d, ff, vocab = SHAPES[args.shape]
    # (out, in, layers of that shape in a block or the model): the bench shapes have as many kv heads as heads
    layers = {"q, k, v, o": (d, d, 4), "gate, up": (ff, d, 2), "down": (d, ff, 1), "head": (vocab, d, 1)}

    def onednn(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")

    print(machine())
    print(f"shape {args.shape}: {n} positions, d_model {d}, d_ff {ff}, vocab {vocab}; median of {args.reps} calls\n")
    print("| layer | product | m × k × n | torch fp32 GFLOP/s | oneDNN fp32 GFLOP/s | oneDNN / torch | bf16 GFLOP/s | max error vs fp64: torch, oneDNN |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    weighted = {"torch": 0.0, "onednn": 0.0}
    for layer, (out, inp, count) in layers.items():
        x, w, gy = torch.randn(n, inp, generator=g), torch.randn(out, inp, generator=g), torch.randn(n, out, generator=g)
        # (name, a, b) with the product a @ bᵀ: b as the (n, k) "weight" oneDNN takes, a strided view where it is one
        # grad W of a layer wider than its input as (xᵀ g)ᵀ, as the generated OneDNNLinear takes it (oneDNN is faster so)
        wide = out > inp
        for product, a, b in (("forward x @ Wᵀ", x, w), ("grad x = g @ W", gy, w.t()),
                              ("grad W = (xᵀ @ g)ᵀ" if wide else "grad W = gᵀ @ x", x.t() if wide else gy.t(), gy.t() if wide else x.t())):
            fl = 2 * a.shape[0] * a.shape[1] * b.shape[0]
            ab, bb = a.bfloat16(), b.bfloat16()
            flip = wide and product.startswith("grad W")   # MKL and bf16 take gᵀ @ x as torch's autograd does
            ta, tb = (b, a) if flip else (a, b)
            tab, tbb = (bb, ab) if flip else (ab, bb)
            calls = {"torch": lambda: ta @ tb.t(), "onednn": (lambda: onednn(a, b).t().contiguous()) if flip else (lambda: onednn(a, b)),
                     "bf16": lambda: tab @ tbb.t()}
            for f in calls.values():
                f()
            times = {k: [] for k in calls}
            for _ in range(args.reps):
                for k, f in calls.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            rate = {k: fl / sorted(v)[len(v) // 2] / 1e9 for k, v in times.items()}
            ref = ta.double() @ tb.double().t()
            err = {k: (calls[k]().double() - ref).abs().max().item() for k in ("torch", "onednn")}
            for k in weighted:
                weighted[k] += count * fl / rate[k]
            print(f"| {layer} | {product} | {ta.shape[0]} × {ta.shape[1]} × {tb.shape[0]} | {rate['torch']:.0f} | {rate['onednn']:.0f} "
                  f"| {rate['onednn'] / rate['torch']:.2f}× | {rate['bf16']:.0f} | {err['torch']:.1e}, {err['onednn']:.1e} |")
    print(f"\none block's linear products (q, k, v, o four times, gate and up twice) and the head's: oneDNN "
          f"{weighted['torch'] / weighted['onednn']:.2f}× torch's fp32 rate")


if __name__ == "__main__":
    main()
