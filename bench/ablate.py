"""Each optimization on and off, at equal precision, on this CPU: the on/off table of docs/performance.md.

    python bench/ablate.py --shape tiny [--groups adamw,attention,matmul,vocab,precision,loss,compile,allocator] [--reps 12]

What runs: the generated program's own model.py and the step of its train.py loop, imported
in-process (common.load_program) and driven step by step as the loop does (set lr, forward
under the program's autocast, loss, backward, clip, optimizer.step, zero_grad, loss.item()),
on one fixed random batch. Within a group the variants alternate step by step (ABBA order), so
machine noise hits them alike; "speedup" is the median over rounds of (first variant's step
time / this variant's), the first variant being the baseline "off". Off-variants are made by
compiling the recipe with other settings (precision, vocabulary padding) or by editing a copy
of model.py (explicit attention). The allocator group needs separate processes (mallopt is
process-wide): it alternates child processes instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (OUT, alternate, clean, clean_median, compile_program, load_program, machine, median, paired_speedup,  # noqa: E402
                    plan_of, tune_allocator, wait_quiet)

SDPA = "y = F.scaled_dot_product_attention(q, k, v, is_causal=True)"
EXPLICIT = ("att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(HEAD_DIM))  # bench: explicit attention\n"
            "        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float(\"-inf\"))\n"
            "        y = att.softmax(dim=-1) @ v")
BLOCKED = "y = causal_attention(q, k, v)"
GROUPS = ["adamw", "attention", "matmul", "vocab", "precision", "loss", "compile", "allocator"]


class Variant:
    """One model + optimizer built as the generated train.py builds them, and its training step."""

    def __init__(self, program: Path, adamw: str = "fused", precision: str | None = None, compile: str = "off",
                 loss: str = "chunked", batch=None):
        import torch

        self.train, self.model_mod = load_program(program)
        t = self.train
        torch.manual_seed(0)
        self.model = self.model_mod.Transformer().to(t.DEVICE)  # as train.py: MAX_SEQ_LEN = SEQ_LEN
        params = [p for p in self.model.parameters() if p.requires_grad]
        impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[adamw]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": t.WEIGHT_DECAY},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
            lr=t.LR, betas=t.BETAS, eps=t.EPS, **impl)
        precision = precision or t.PRECISION
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
        self.loss = loss
        if compile == "model":          # torch.compile(model), the loss on its logits outside (loss="full")
            self.forward = torch.compile(self.model)
        elif compile == "model+loss":   # as generated: the loss asked of the (compiled) model, forward(x, y)
            self.forward = torch.compile(self.model)
            self.loss = "in-model"
        else:
            self.forward = self.model
        self.x, self.y = batch
        self.step_i = 0
        self.first_step_s = None

    def __call__(self):
        import torch

        t = self.train
        for group in self.optimizer.param_groups:
            group["lr"] = t.lr_at(self.step_i)
        with self.autocast():
            if self.loss == "full":     # logits, then F.cross_entropy on them in fp32 (the program before the loss moved in)
                logits = self.forward(self.x)
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.y.flatten())
            else:                       # "chunked" (eager) or "in-model" (compiled): the model computes it
                loss = self.forward(self.x, self.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.GRAD_CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_i += 1
        return loss.item()

    def warm(self):
        t = time.perf_counter()
        self()
        self.first_step_s = time.perf_counter() - t


def edited_copy(program: Path, suffix: str, line: str, replacement: str) -> Path:
    """A copy of a program whose model.py has ``line`` replaced (an off-variant of a group)."""
    out = program.with_name(program.name + suffix)
    out.mkdir(exist_ok=True)
    for name in ("train.py", "plan.json"):
        (out / name).write_text((program / name).read_text())
    text = (program / "model.py").read_text()
    if line not in text:
        raise SystemExit(f"{program}/model.py has no line {line!r}; update bench/ablate.py")
    (out / "model.py").write_text(text.replace(line, replacement))
    return out


def explicit_attention(program: Path) -> Path:
    return edited_copy(program, "-explicit-attention", SDPA, EXPLICIT)


def sdpa_attention(program: Path) -> Path:
    """choose_attention's blocked causal_attention (bf16 on a CPU with bf16 matmuls) replaced by SDPA; a program that
    has SDPA already (a CPU without bf16 matmuls) as it is."""
    if BLOCKED not in (program / "model.py").read_text():
        return program
    return edited_copy(program, "-sdpa", BLOCKED, SDPA)


def batch_for(plan: dict, vocab: int | None = None):
    import torch

    g = torch.Generator().manual_seed(1)
    b, t = plan["batch"]["micro_batch"], plan["batch"]["seq_len"]
    v = vocab or plan["model"]["vocab_size"]
    return torch.randint(0, v, (b, t), generator=g), torch.randint(0, v, (b, t), generator=g)


def measure(group: str, variants: dict, reps: int, warmup: int, tokens: int) -> list:
    for v in variants.values():
        v.warm()
    times = alternate(variants, reps, warmup)
    names = list(variants)
    rows = []
    for k in names:
        rows.append({"group": group, "variant": k, "tokens_per_s": tokens / clean_median(times[k]),
                     "speedup": paired_speedup(times[names[0]], times[k]), "first_step_s": variants[k].first_step_s,
                     "steps_kept": f"{len(clean(times[k]))}/{len(times[k])}"})
        print(f"  {group:10s} {k:40s} {rows[-1]['tokens_per_s']:8.0f} tok/s  ×{rows[-1]['speedup']:.3f}  "
              f"(first step {rows[-1]['first_step_s']:.1f} s; {rows[-1]['steps_kept']} steps kept)", flush=True)
    return rows


def child(program: Path, alloc: bool, steps: int) -> None:
    """--child: run `steps` steps of the program's step in this process, print the median step time."""
    if alloc:
        tune_allocator()
    plan = plan_of(program)
    v = Variant(program, batch=batch_for(plan))
    for _ in range(3):
        v()
    ts = []
    for _ in range(steps):
        t, c = time.perf_counter(), time.process_time()
        v()
        ts.append((time.perf_counter() - t, time.process_time() - c))
    print(json.dumps({"median_s": clean_median(ts)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--groups", default=",".join(GROUPS))
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--alloc", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.alloc, args.reps)

    os.environ.setdefault("MALT_CACHE_DIR", str(OUT / "cache"))
    groups = args.groups.split(",")
    fp32 = compile_program(args.shape, "fp32", ["target.precision=fp32", "target.compile=off"])
    bf16 = compile_program(args.shape, "bf16", ["target.precision=bf16", "target.compile=off"])
    plan = plan_of(fp32)
    odd = plan["model"]["vocab_size"] - 92             # 8100 for vocab 8192: not a multiple of 64
    if "vocab" in groups:
        sets = [f"tokenizer.vocab_size={odd}", "target.precision=fp32", "target.compile=off"]
        p1 = compile_program(args.shape, "vocab-unpadded", sets + ["model.pad_vocab_multiple=1"])
        p64 = compile_program(args.shape, "vocab-pad64", sets + ["model.pad_vocab_multiple=64"])
    tokens = plan["batch"]["tokens_per_step"]
    batch = batch_for(plan)
    print(machine())
    print(f"shape {args.shape}: {plan['params']:,} params, {tokens:,} tokens/step; {args.reps} alternated steps per variant after {args.warmup} warm-up")
    rows = []
    for group in groups:
        if group == "adamw":
            vs = {f"AdamW {impl}": Variant(fp32, adamw=impl, batch=batch) for impl in ("for-loop", "foreach", "fused")}
        elif group == "attention":
            vs = {"explicit softmax(QKᵀ)V, causal mask": Variant(explicit_attention(fp32), batch=batch),
                  "SDPA is_causal": Variant(fp32, batch=batch)}
            rows += measure(group, vs, args.reps, args.warmup, tokens)
            if BLOCKED not in (bf16 / "model.py").read_text():
                print("  (bf16 keeps SDPA on this CPU: no causal_attention to compare)")
                continue
            # bf16 on a CPU with bf16 matmuls: choose_attention's blocked causal_attention (bench/attention.py)
            vs = {"bf16, SDPA is_causal": Variant(sdpa_attention(bf16), batch=batch),
                  "bf16, causal_attention (blocked, generated)": Variant(bf16, batch=batch)}
        elif group == "matmul":    # choose_matmul: fp32 products in oneDNN on an AMD Zen 5 CPU
            if plan["execution"]["matmul"] != "onednn":
                print("  (this CPU keeps torch's fp32 matmul: no oneDNN program to compare)")
                continue
            from dataclasses import replace

            from malt.compiler.plan import Host

            mkl = compile_program(args.shape, "fp32-mkl", ["target.precision=fp32", "target.compile=off"],
                                  host=replace(Host.detect(), cpu_avx512=False))     # the pass's rule off: torch's matmul
            vs = {"fp32, torch's matmul (MKL)": Variant(mkl, batch=batch), "fp32, oneDNN (generated)": Variant(fp32, batch=batch)}
        elif group == "vocab":
            b = batch_for(plan, odd)
            vs = {f"vocab {plan_of(p1)['model']['padded_vocab']} (unpadded)": Variant(p1, batch=b),
                  f"vocab {plan_of(p64)['model']['padded_vocab']} (padded to 64)": Variant(p64, batch=b)}
        elif group == "precision":
            vs = {"fp32": Variant(fp32, batch=batch), "bf16 autocast (same attention kernel)": Variant(sdpa_attention(bf16), batch=batch)}
        elif group == "loss":
            vs = {"fp32, logits + F.cross_entropy": Variant(fp32, loss="full", batch=batch),
                  "fp32, chunked (generated)": Variant(fp32, loss="chunked", batch=batch)}
            rows += measure(group, vs, args.reps, args.warmup, tokens)
            vs = {"bf16, logits + F.cross_entropy": Variant(bf16, loss="full", batch=batch),
                  "bf16, chunked (generated)": Variant(bf16, loss="chunked", batch=batch)}
        elif group == "compile":
            for prog, prec in ((fp32, "fp32"), (sdpa_attention(bf16), "bf16")):  # compiled programs keep SDPA
                vs = {f"{prec} eager": Variant(prog, batch=batch),
                      f"{prec} compile(model), loss outside": Variant(prog, compile="model", loss="full", batch=batch),
                      f"{prec} compile(model + loss) (generated)": Variant(prog, compile="model+loss", batch=batch)}
                rows += measure(group, vs, args.reps, args.warmup, tokens)
            continue
        elif group == "allocator":
            times = {"glibc default": [], "mallopt: no trim, no mmap (proposed)": []}
            for i in range(max(3, args.reps // 4)):
                for alloc in ((False, True) if i % 2 == 0 else (True, False)):
                    wait_quiet()
                    out = subprocess.run([sys.executable, __file__, "--child", str(fp32), "--reps", "8"] + (["--alloc"] if alloc else []),
                                         capture_output=True, text=True, check=True)
                    times[list(times)[alloc]].append(json.loads(out.stdout.strip().splitlines()[-1])["median_s"])
            names = list(times)
            for k in names:
                rows.append({"group": group, "variant": k, "tokens_per_s": tokens / median(times[k]), "first_step_s": None,
                             "speedup": median([b / o for b, o in zip(times[names[0]], times[k])])})
                print(f"  {group:10s} {k:34s} {rows[-1]['tokens_per_s']:8.0f} tok/s  ×{rows[-1]['speedup']:.3f}", flush=True)
            continue
        else:
            raise SystemExit(f"unknown group {group!r}; groups: {', '.join(GROUPS)}")
        rows += measure(group, vs, args.reps, args.warmup, tokens)

    print("\n| optimization | variant | tokens/s | speedup vs first row of its group | first step |\n|---|---|---|---|---|")
    for r in rows:
        first = f"{r['first_step_s']:.1f} s" if r["first_step_s"] is not None else ""
        print(f"| {r['group']} | {r['variant']} | {r['tokens_per_s']:,.0f} | ×{r['speedup']:.2f} | {first} |")
    out = OUT / f"ablate-{args.shape}.json"
    out.write_text(json.dumps({"machine": machine(), "shape": args.shape, "rows": rows}, indent=2))
    print(f"\n(written to {out.relative_to(OUT.parent.parent)})")


if __name__ == "__main__":
    main()
