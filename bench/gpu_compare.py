"""On one GPU, side by side in one process: malt's model and training step against transformers' LlamaForCausalLM.

    python bench/gpu_compare.py bench/out/gpu-124m [bench/out/gpu-350m ...] [--steps 20] [--variants ...]

Each PROGRAM_DIR is a program compiled by `malt compile` (model.py and plan.json are read from it).
Variants, all bf16 autocast with fp32 master weights, on the same random batch:
  malt         the generated step: compiled model, loss (fp32 cross-entropy) outside the compiled graph, fused AdamW
  malt-loss    the same, with the loss computed inside the compiled forward (model(x, targets))
  hf           transformers' LlamaForCausalLM (SDPA), eager, torch.optim.AdamW(model.parameters()): the usual hand-written loop
  hf-compile   the same with torch.compile(model)
Reports tokens/s (median of per-step times after warm-up, CUDA-synchronised), MFU against --peak-tflops
(dense bf16 data sheet, default 989 for H100/H200) with the plan's flops_per_token, and time to the
first step (compile included). One JSON line per (program, variant) on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEVICE = "cuda"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def load_model_module(program: Path):
    spec = importlib.util.spec_from_file_location(f"model_{abs(hash(str(program)))}", program / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(variant: str, program: Path, plan: dict):
    if variant.startswith("malt"):
        model = load_model_module(program).Transformer().to(DEVICE)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        fwd = torch.compile(model)
        if variant == "malt-loss":
            def loss_of(x, y):
                return fwd(x, y)
        else:
            def loss_of(x, y):
                logits = fwd(x)
                return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        return model, opt, loss_of
    import transformers

    from malt.runtime.export import hf_config

    arch, cfg = hf_config(plan, 0, None)
    config = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    model = transformers.LlamaForCausalLM(config).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model) if variant == "hf-compile" else model

    def loss_of(x, y):
        logits = fwd(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
    return model, opt, loss_of


def run(program: Path, variant: str, steps: int, warmup: int, batch: int, peak: float) -> dict:
    plan = json.loads((program / "plan.json").read_text())
    seq, vocab = plan["batch"]["seq_len"], plan["model"]["vocab_size"]
    torch.manual_seed(0)
    data = torch.randint(0, vocab, (batch, seq + 1), device=DEVICE)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    t0 = time.perf_counter()
    model, opt, loss_of = build(variant, program, plan)
    times = []
    for i in range(warmup + steps):
        sync()
        s = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i == 0:
            first = time.perf_counter() - t0
        if i >= warmup:
            times.append(time.perf_counter() - s)
    tok_s = batch * seq / statistics.median(times)
    out = {"program": plan["name"], "variant": variant, "params": plan["params"], "batch": batch, "seq_len": seq,
           "tokens_per_s": round(tok_s), "mfu": round(tok_s * plan["flops_per_token"] / peak, 4),
           "seconds_to_first_step": round(first, 1), "loss": round(float(loss), 4),
           "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEVICE == "cuda" else None}
    del model, opt
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("programs", type=Path, nargs="+")
    ap.add_argument("--variants", default="malt,malt-loss,hf")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__}), flush=True)
    for program in args.programs:
        for variant in args.variants.split(","):
            print(json.dumps(run(program, variant, args.steps, args.warmup, args.batch, args.peak_tflops * 1e12)), flush=True)


if __name__ == "__main__":
    main()
