"""Choose the library that multiplies fp32 matrices on a CPU: torch's own (its BLAS, MKL) or oneDNN.

torch's fp32 ``mm`` calls MKL's sgemm. MKL picks its kernels by the processor's vendor: on AMD
processors it takes its AVX2 path even where the CPU has AVX-512. oneDNN (which torch also carries,
and uses for its bf16 matmuls) runs its AVX-512 kernels there. On a 2-core AMD EPYC of the Zen 5
generation (full-width AVX-512), oneDNN ran a step's fp32 products at 2.0× MKL's rate (1.8-2.3× each)
and the fp32 training step 1.53× (bench/recipes/tiny.yaml) and 1.66× (small.yaml) as fast
(bench/matmul.py, bench/ablate.py --groups matmul; docs/performance.md). The arithmetic is fp32 in
both: the sums are taken in another order.

Taken where the step is fp32 and eager on an AMD CPU with AVX-512: target.precision fp32 (or auto
where the CPU has no native bf16), no torch.compile (inductor picks its own kernels). model.py's
linear layers then run x @ Wᵀ and both products of their backward through oneDNN (``Linear`` and
``linear`` in model.py: nn.Linear's parameters and state dict), and so do a decoder's chunked loss's
products. Elsewhere torch's matmul stays: Intel CPUs (MKL's AVX-512 kernels run there), CPUs without
AVX-512, and bf16 (whose products torch gives to oneDNN already).
"""

from __future__ import annotations

from ..plan import Host, Plan

# measured on a 2-core AMD EPYC (Zen 5), torch 2.13 (docs/performance.md): oneDNN's fp32 rate over MKL's on a step's
# products (bench/matmul.py), and the fp32 training step of bench/recipes/{tiny,small}.yaml (bench/ablate.py)
ONEDNN_MATMUL_SPEEDUP = 2.0
ONEDNN_STEP_SPEEDUP = (1.53, 1.66)


def mkl_avx2_only(host: Host) -> bool:
    """MKL takes its AVX2 kernels on this host although the CPU has AVX-512 (an AMD processor)."""
    return host.cpu_vendor == "AuthenticAMD" and host.cpu_avx512


def run(plan: Plan) -> Plan:
    if plan.device != "cpu":
        return plan
    host = plan.host
    if plan.precision != "fp32":
        why = f"precision {plan.precision}: torch gives bf16 products to oneDNN already"
    elif plan.compile:
        why = "torch.compile: inductor chooses the kernels"
    elif not host.cpu_avx512:
        why = "this CPU has no AVX-512"
    elif host.cpu_vendor == "GenuineIntel":
        why = "an Intel CPU: MKL's sgemm runs its AVX-512 kernels here"
    elif not mkl_avx2_only(host):
        why = f"CPU vendor {host.cpu_vendor or 'unknown'}: oneDNN measured only on AMD's"
    else:
        return plan.decide("matmul", "onednn",
                           "fp32 on an AMD CPU with AVX-512, eager: MKL's sgemm takes its AVX2 kernels on AMD processors, "
                           "oneDNN its AVX-512 ones; the linear layers (forward and backward) and the chunked loss multiply "
                           f"through oneDNN: {ONEDNN_MATMUL_SPEEDUP}× MKL's fp32 rate, {ONEDNN_STEP_SPEEDUP[0]}-"
                           f"{ONEDNN_STEP_SPEEDUP[1]}× the fp32 step (bench/recipes/tiny.yaml, small.yaml) on a 2-core AMD "
                           "EPYC (Zen 5); the same fp32 arithmetic, summed in another order", matmul="onednn")
    return plan.decide("matmul", "torch", f"torch's matmul (MKL) for fp32 products: {why}", matmul="torch")
