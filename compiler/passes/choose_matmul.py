"""Choose the library that multiplies fp32 matrices on a CPU: torch's own (its BLAS, MKL) or oneDNN.

torch's fp32 ``mm`` calls MKL's sgemm. MKL picks its kernels by the processor's vendor: on AMD
processors it takes its AVX2 path even where the CPU has AVX-512. oneDNN (which torch also
carries, and uses for its bf16 matmuls) runs its AVX-512 kernels there. On a 2-core AMD EPYC
with AVX-512 (Zen 5), at the bench shapes' products, oneDNN ran 2.2× MKL's GFLOP/s in fp32,
and the whole fp32 training step of bench/recipes/small.yaml 1.46× as fast
(bench/matmul.py, docs/performance.md). The arithmetic is fp32 in both: the sums are only
taken in another order.

Taken where every product of the model is an fp32 matmul run eagerly on a CPU, and the host is an
AMD CPU with AVX-512: target.precision fp32 (or auto where the CPU has no native bf16), no
torch.compile (inductor picks its own kernels), a decoder (the encoder template keeps nn.Linear).
The model's linear layers then run x @ Wᵀ and both products of their backward through oneDNN
(``Linear`` in model.py, the same parameters and state dict as nn.Linear), and so does the
chunked loss. Elsewhere (Intel CPUs, whose MKL path is AVX-512 already; CPUs without AVX-512;
bf16, whose matmuls torch already gives to oneDNN) torch's matmul stays.
"""

from __future__ import annotations

from ..plan import Host, Plan

# the measured ratio (bench/matmul.py on a 2-core AMD EPYC, Zen 5, torch 2.13): oneDNN over MKL in fp32 GFLOP/s, and
# the fp32 training step of bench/recipes/small.yaml (29.5M parameters, seq 512) with every product in oneDNN
ONEDNN_MATMUL_SPEEDUP = 2.2
ONEDNN_STEP_SPEEDUP = 1.46


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
    elif plan.recipe.model.family == "bert":
        why = "an encoder: its template keeps nn.Linear"
    elif not host.cpu_avx512:
        why = "this CPU has no AVX-512"
    elif not mkl_avx2_only(host):
        why = f"{host.cpu_vendor or 'this CPU'}: MKL's sgemm runs its AVX-512 kernels here"
    else:
        return plan.decide("matmul", "onednn",
                           "fp32 on an AMD CPU with AVX-512, eager: MKL's sgemm takes its AVX2 kernels on AMD processors, "
                           "oneDNN its AVX-512 ones; the linear layers (forward and backward) and the chunked loss multiply "
                           f"through oneDNN: {ONEDNN_MATMUL_SPEEDUP}× MKL's fp32 GFLOP/s, {ONEDNN_STEP_SPEEDUP}× the step of "
                           "bench/recipes/small.yaml on a 2-core AMD EPYC (Zen 5); the same fp32 arithmetic, summed in "
                           "another order", matmul="onednn")
    return plan.decide("matmul", "torch", f"torch's matmul (MKL) for fp32 products: {why}", matmul="torch")
