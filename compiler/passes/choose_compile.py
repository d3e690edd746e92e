"""Resolve target.compile: whether the generated program wraps the model in torch.compile.

On a GPU compiling always pays. On a CPU it pays only for long runs: inductor's C++ compile of
the forward and backward graphs costs tens of seconds before the first step, and saves a share
of every step. `auto` compiles when the run's estimated eager time times that share exceeds the
compile time (both measured by bench/, docs/performance.md), and a C++ compiler is on PATH.
"""

from __future__ import annotations

from ..estimates import CPU_MFU, cpu_chip, flops_per_token
from ..plan import Plan
from .choose_matmul import ONEDNN_STEP_SPEEDUP, onednn_fp32
from .estimate import model_counts

# bench/compare_hf.py on a 2-core AMD EPYC (Zen 4), torch 2.13, bf16, cold inductor cache (docs/performance.md):
# compile(model) added 25 s (5.3M params) and 40 s (29.5M) before the first step, and saved 9% and 2% of each step
CPU_COMPILE_SECONDS = 40.0    # time to first step added by torch.compile(model)
CPU_COMPILE_GAIN = 0.10       # share of an eager step's time that compile(model + loss) saves


def estimated_eager_seconds(plan: Plan) -> float:
    """The run's time on this CPU, eager, at the nominal CPU peak (twice in bf16 where native) and MFU."""
    m = plan.recipe.model
    n_layers = plan.n_layers or m.n_layers
    counts = model_counts(plan)
    fpt = flops_per_token(counts["matmul_params"], n_layers, counts.get("attention_heads", m.n_heads), plan.head_dim,
                          plan.recipe.train.seq_len, m.sliding_window)
    chip = cpu_chip(plan.host.cpu_cores, plan.host.memory_bytes, plan.host.cpu_bf16)
    return fpt * plan.tokens / (chip.peak_flops[plan.precision] * CPU_MFU)


def run(plan: Plan) -> Plan:
    c = plan.recipe.target.compile
    if plan.device == "tpu":  # validation rejects compile: on for tpu
        return plan.decide("compile", False, f"{'target.compile off' if c == 'off' else 'auto'} on tpu: no torch.compile; XLA traces "
                           "each step into a graph and compiles it once (torch_xla.sync() marks the step)", compile=False)
    if c != "auto":
        return plan.decide("compile", c == "on", f"target.compile {c}", compile=c == "on")
    if plan.device == "cuda":
        return plan.decide("compile", True, "auto on cuda: torch.compile fuses the elementwise work between matmuls", compile=True)
    if not plan.host.cxx_compiler:
        return plan.decide("compile", False, "auto on cpu: no C++ compiler on PATH (torch.compile's CPU backend needs one)", compile=False)
    if plan.precision == "fp32" and onednn_fp32(plan.host):
        return plan.decide("compile", False,
                           f"auto on cpu: fp32 on an AMD CPU of Zen 5 or later, where eager multiplies through oneDNN (choose_matmul: "
                           f"{ONEDNN_STEP_SPEEDUP[0]}-{ONEDNN_STEP_SPEEDUP[1]}× the step) and a compiled program through MKL's "
                           f"AVX2 kernels: compiling saves about {CPU_COMPILE_GAIN:.0%} of a step, oneDNN more", compile=False)
    eager = estimated_eager_seconds(plan)
    worth = CPU_COMPILE_SECONDS / CPU_COMPILE_GAIN
    on = eager >= worth
    return plan.decide("compile", on,
                       f"auto on cpu: the run's estimated {eager:,.0f} s eager is {'at least' if on else 'under'} {worth:,.0f} s, where compiling "
                       f"(about {CPU_COMPILE_SECONDS:.0f} s before the first step, {CPU_COMPILE_GAIN:.0%} of each step saved, "
                       f"bench/) {'pays off' if on else 'does not pay off'}", compile=on)
