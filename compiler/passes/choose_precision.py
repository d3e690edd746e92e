"""Resolve target.precision: bf16 autocast with fp32 master weights, plain fp32, or pure bf16 where asked.

On a CPU, bf16 pays only where the CPU multiplies bf16 natively (AVX512_BF16 or AMX, the Host's
``cpu_bf16``); elsewhere autocast would convert to and from bf16 around emulated matmuls.
Measured by bench/ablate.py (docs/performance.md).
"""

from __future__ import annotations

from ..plan import Plan

# tokens/s of bf16 autocast over fp32 on a 2-core AMD EPYC (Zen 4, avx512_bf16), torch 2.13 (docs/performance.md):
# 1.38× at 5.3M parameters (bench/ablate.py --shape tiny), 1.67× at 29.5M (bench/compare_hf.py --shape small)
CPU_BF16_SPEEDUP = (1.38, 1.67)


def run(plan: Plan) -> Plan:
    p = plan.recipe.target.precision
    if p == "pure_bf16":
        return plan.decide("precision", "pure_bf16", "target.precision pure_bf16: weights, gradients and AdamW moments in bf16, no fp32 "
                           "master copy and no autocast (half the state memory of bf16 autocast; updates smaller than bf16's "
                           "resolution of a weight are lost)", precision="bf16", master_weights="bf16")
    if p != "auto":
        return plan.decide("precision", p, f"target.precision {p}", precision=p)
    if plan.device == "tpu":
        return plan.decide("precision", "bf16", "auto on tpu: the TPU's matrix units multiply bf16; bf16 autocast (XLA), fp32 master "
                           "weights and optimizer state", precision="bf16")
    if plan.device == "cuda":
        return plan.decide("precision", "bf16", "auto on cuda: bf16 autocast, fp32 master weights and optimizer state", precision="bf16")
    if plan.host.cpu_bf16:
        return plan.decide("precision", "bf16",
                           f"auto on cpu: this CPU multiplies bf16 natively (avx512_bf16/amx_bf16): bf16 autocast, fp32 master weights "
                           f"and optimizer state ({CPU_BF16_SPEEDUP[0]:.2f}-{CPU_BF16_SPEEDUP[1]:.2f}× the fp32 tokens/s measured by bench/)", precision="bf16")
    return plan.decide("precision", "fp32", "auto on cpu: no native bf16 on this CPU (avx512_bf16/amx_bf16): fp32, since autocast "
                       "would emulate bf16 matmuls; set target.precision: bf16 to force it", precision="fp32")
