"""The hand-written baseline: Hugging Face transformers' LlamaForCausalLM and a plain PyTorch AdamW loop.

    python bench/hf_baseline.py PROGRAM_DIR --metrics FILE [--precision fp32|bf16] [--compile]

It trains the same shape as the malt program in PROGRAM_DIR (read from its plan.json) on the
same batches (the program's own DATA spec and malt.runtime.data, step by step), with the same
step structure: forward, F.cross_entropy on the fp32 logits against the same targets, backward,
global-norm clipping, optimizer step. What differs is what a user would write by default:
transformers' model (SDPA attention), `torch.optim.AdamW(model.parameters(), lr)` (on CPU the
default is the per-parameter for-loop implementation), logits materialised whole, no allocator
settings. One JSON line per step goes to FILE (step, loss, tokens_per_s, elapsed_s), as the
generated program writes metrics.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cache_dir, hf_model, load_program, plan_of  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("program", type=Path)
    ap.add_argument("--metrics", type=Path, required=True)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (forward and backward)")
    ap.add_argument("--steps", type=int, default=None, help="default: the program's MAX_STEPS")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from malt.runtime import data

    train, _ = load_program(args.program)
    plan = plan_of(args.program)
    torch.manual_seed(train.SEED)
    dataset = data.prepare({**train.DATA, "base_dir": str(args.program.resolve())}, cache_dir=cache_dir(), log=lambda m: None)
    B, T, accum = train.MICRO_BATCH, train.SEQ_LEN, train.GRAD_ACCUM
    steps = args.steps or train.MAX_STEPS
    tokens_per_step = B * T * accum

    model = hf_model(plan)
    model.train()
    vocab = model.config.vocab_size
    forward = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.LR, betas=train.BETAS, weight_decay=train.WEIGHT_DECAY)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    out = open(args.metrics, "w", encoding="utf-8")
    t0 = t_last = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(step)
        loss_sum = 0.0
        for micro in range(accum):
            x, y = dataset.batch("train", step, micro * B, B, T)
            with autocast:
                logits = forward(input_ids=x).logits
                loss = F.cross_entropy(logits.float().view(-1, vocab), y.view(-1))
            (loss / accum).backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        out.write(json.dumps({"step": step + 1, "loss": loss_sum / accum, "tokens_per_s": round(tokens_per_step / (now - t_last), 1),
                              "elapsed_s": round(now - t0, 3)}) + "\n")
        out.flush()
        t_last = now
    out.close()


if __name__ == "__main__":
    main()
