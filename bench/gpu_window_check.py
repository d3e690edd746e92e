"""On one GPU: the CUDA program's sliding-window attention (FlexAttention block mask) against the dense mask.

    python bench/gpu_window_check.py PROGRAM_DIR      # a program compiled for cuda with model.sliding_window

The CPU tests check the window against transformers' Mistral and run the FlexAttention path eagerly
(forward only); only a GPU runs it as the compiled kernel with its backward. In fp32 (TF32 off) on a
random model and batch, the block-mask path (the run's lengths, FLEX_SEQ_LENS) is compared with the
same model forced onto the dense mask (FLEX_SEQ_LENS emptied: SDPA with a (1, 1, T, T) bool mask):
eager logits, torch.compile(model) logits without gradients, and the compiled loss and gradients.
One JSON line per check; exit 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_flex_check import load_model_module


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("program", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run (FlexAttention eager, no compile, no backward)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    module = load_model_module(args.program)
    T = module.FLEX_SEQ_LENS[0]
    torch.manual_seed(0)
    model = module.Transformer().to(args.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, module.VOCAB_SIZE, (args.batch, T), generator=g).to(args.device)
    y = torch.randint(0, module.VOCAB_SIZE, (args.batch, T), generator=g).to(args.device)
    lengths = module.FLEX_SEQ_LENS

    def dense(fn):
        module.FLEX_SEQ_LENS = ()
        try:
            return fn()
        finally:
            module.FLEX_SEQ_LENS = lengths

    failed = False

    def report(check, err, tol, **kw):
        nonlocal failed
        ok = err < tol
        failed |= not ok
        print(json.dumps({"check": check, "max_err": err, "ok": ok, **kw}), flush=True)

    with torch.no_grad():
        ref = dense(lambda: model(x))
        report("eager: block mask == dense mask", (model(x) - ref).abs().max().item(), 2e-4, window=module.SLIDING_WINDOW, T=T)
    if args.device == "cpu":
        sys.exit(1 if failed else 0)
    compiled = torch.compile(model)
    with torch.no_grad():
        report("compiled, no gradients: block mask == dense mask", (compiled(x) - ref).abs().max().item(), 2e-4)
    loss = compiled(x, y)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref_loss = dense(lambda: model(x, y))
    ref_loss.backward()
    gerr = max(((got[n] - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)).item() for n, p in model.named_parameters())
    report("compiled loss == dense loss", abs(loss.item() - ref_loss.item()), 1e-4)
    report("compiled gradients == dense gradients (relative)", gerr, 1e-3)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
