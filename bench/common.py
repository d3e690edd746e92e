"""Shared parts of the benchmarks (bench/compare_hf.py, bench/ablate.py) and GPU checks (bench/gpu_*_check.py).

- compile a bench recipe into a generated program (the real `malt compile` path);
- import a generated program's model.py / train.py as modules;
- the Hugging Face baseline model of the same shape;
- this machine's matmul peak, measured;
- step-by-step alternation of variants, and medians;
- for the GPU checks (which run with malt's runtime only, no compiler): a program's model.py alone, one JSON line
  per result, and the median time of a training step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
SHAPES = {"tiny": BENCH / "recipes" / "tiny.yaml", "small": BENCH / "recipes" / "small.yaml"}


def cache_dir() -> str:
    """Tokenized data for the benchmarks (MALT_CACHE_DIR, else bench/out/cache)."""
    return os.environ.get("MALT_CACHE_DIR") or str(OUT / "cache")


def compile_program(shape: str, name: str, sets: list[str], host=None) -> Path:
    """`malt compile bench/recipes/SHAPE.yaml -o bench/out/cpu-SHAPE-NAME --set ...` (this host's choices, or `host`'s)."""
    from malt.compiler.api import compile_to
    from malt.compiler.plan import Host

    out = OUT / f"cpu-{shape}-{name}"
    for attempt in range(30):
        try:
            compile_to(SHAPES[shape], out, sets=list(sets), host=host or Host.detect())
            return out
        except Exception as e:  # noqa: BLE001  the tree may be mid-edit (shared working tree): wait and retry
            if attempt == 29:
                raise
            print(f"(compiling {out.name} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}; retrying in 10 s)", flush=True)
            time.sleep(10)


def plan_of(program: Path) -> dict:
    return json.loads((Path(program) / "plan.json").read_text())


_loaded = 0


def load_program(program: Path):
    """Import a generated program's train.py (and the model.py beside it) as a fresh module.

    train.py does `from model import Transformer` after putting its own directory first on
    sys.path; a previously imported `model` module is dropped so each program gets its own.
    """
    global _loaded
    _loaded += 1
    program = Path(program).resolve()
    sys.modules.pop("model", None)
    name = f"malt_bench_train_{_loaded}"
    spec = importlib.util.spec_from_file_location(name, program / "train.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # torch.compile (dynamo) looks modules up by name
    spec.loader.exec_module(mod)
    model_mod = sys.modules.pop("model")
    sys.modules[f"malt_bench_model_{_loaded}"] = model_mod
    model_mod.__name__ = f"malt_bench_model_{_loaded}"
    sys.path.remove(str(program)) if str(program) in sys.path else None
    return mod, model_mod


def hf_model(plan: dict):
    """transformers' LlamaForCausalLM with the plan's shape (its own default init and attention: SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    m = plan["model"]
    cfg = LlamaConfig(
        vocab_size=m["padded_vocab"], hidden_size=m["d_model"], intermediate_size=m["d_ff"],
        num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"], num_key_value_heads=m["n_kv_heads"],
        head_dim=m["head_dim"], max_position_embeddings=plan["batch"]["seq_len"], rms_norm_eps=m["norm_eps"],
        rope_theta=m["rope_theta"], rope_parameters={"rope_type": "default", "rope_theta": m["rope_theta"]},
        tie_word_embeddings=m["tie_embeddings"], attention_bias=False, mlp_bias=False, use_cache=False,
        initializer_range=m["init_std"],
    )
    return LlamaForCausalLM(cfg)


def matmul_peak(dtype_name: str = "fp32", n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of the best of `reps` n×n×n matmuls, through torch's matmul and through oneDNN, whichever is faster:
    the machine's practical dense peak for that dtype. (On AMD Zen 5 CPUs, torch's fp32 matmul, MKL's
    sgemm, runs AVX2 kernels at about half the rate of oneDNN's: choose_matmul.)"""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    products = [lambda: a @ b]
    if torch.backends.mkldnn.is_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = float("inf")
    for product in products:
        product()
        for _ in range(reps):
            t = time.perf_counter()
            product()
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def tune_allocator() -> bool:
    """The runtime's allocator setting (malt.runtime.host), for the baselines and children that measure it."""
    from malt.runtime.host import tune_allocator as tune

    return tune()


def others_busy(interval: float = 0.3) -> float:
    """Share of this machine's CPU time used during `interval` while this process sleeps: other work."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]      # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(threshold: float = 0.15, max_wait: float = 60.0) -> float:
    """Wait (at most max_wait s) until other processes use under `threshold` of the CPUs; returns the wait.
    The machine is shared (tests of other sessions): measuring while they run measures them."""
    t0 = time.perf_counter()
    while others_busy() > threshold and time.perf_counter() - t0 < max_wait:
        pass
    return time.perf_counter() - t0


def clean(samples: list) -> list:
    """Steps that got their CPUs: (wall, cpu) samples whose CPU utilisation (cpu / wall) is at least
    80% of the best seen for that variant. A step that shared the cores with another process has a
    long wall time but not more CPU time; dropping it keeps the medians about this program."""
    best = max(c / w for w, c in samples)
    return [(w, c) for w, c in samples if c / w >= 0.8 * best]


def alternate(variants: dict, reps: int, warmup: int) -> dict:
    """Run each zero-argument step function in turn, `warmup + reps` times, reversing the order on
    every other round (ABBA) and waiting for a quiet machine before each round. Returns
    name -> list of (wall seconds, process CPU seconds) per step, warm-up dropped."""
    times = {k: [] for k in variants}
    names = list(variants)
    for i in range(warmup + reps):
        if i >= warmup:
            wait_quiet()
        for k in (names if i % 2 == 0 else names[::-1]):
            t, c = time.perf_counter(), time.process_time()
            variants[k]()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if i >= warmup:
                times[k].append((dt, dc))
    return times


def paired_speedup(base: list, other: list) -> float:
    """Median over rounds of base_time / other_time (each pair ran back to back), over the rounds in
    which both steps got their CPUs (see clean)."""
    ok_b, ok_o = set(clean(base)), set(clean(other))
    pairs = [(b[0], o[0]) for b, o in zip(base, other) if b in ok_b and o in ok_o] or [(b[0], o[0]) for b, o in zip(base, other)]
    return statistics.median(b / o for b, o in pairs)


def clean_median(samples: list) -> float:
    """Median wall seconds per step over the clean steps."""
    return statistics.median(w for w, _ in clean(samples))


def median(xs):
    return statistics.median(xs)


def machine() -> str:
    import platform

    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return (f"{model or platform.processor()} ({cores} cores, {torch.backends.cpu.get_cpu_capability()}"
            f"{', avx512_bf16' if bf16 else ''}), torch {torch.__version__}, {torch.get_num_threads()} threads")


def load_model_module(program: Path, name: str = "model_under_check"):
    """Import a generated program's model.py alone, registered as ``name`` (torch.compile looks its globals up there)."""
    spec = importlib.util.spec_from_file_location(name, Path(program) / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def report(**fields) -> None:
    """One result of a check as a JSON line on stdout."""
    print(json.dumps(fields), flush=True)


def verdict(check: str, ok: bool, **fields) -> bool:
    """Report a check that passes or fails (``ok``, with its figures); returns ``ok``."""
    report(check=check, **fields, ok=ok)
    return ok


def median_step_seconds(step, steps: int, warmup: int = 5, cuda: bool = True) -> float:
    """The median wall time of ``step()`` over ``steps`` calls after ``warmup`` untimed ones (CUDA-synchronised)."""
    import torch

    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def grads_of(model) -> dict:
    """A copy of every parameter's gradient, by name; the gradients are then cleared for the reference's backward."""
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def max_rel_grad_err(grads: dict, model) -> float:
    """The largest difference of ``grads`` from the model's present gradients, relative to each one's largest entry."""
    return max(((grads[n] - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)).item()
               for n, p in model.named_parameters())


def check_setup(batch: int, cpu_help: str):
    """A GPU check's command line (PROGRAM, --batch, --steps, --device), fp32 matmuls without TF32, the program's
    plan and its model.py: (args, plan, module)."""
    import argparse

    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("program", type=Path)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda", help=cpu_help)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return args, plan_of(args.program), load_model_module(args.program)
