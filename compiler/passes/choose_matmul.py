"""Choose the library that multiplies fp32 matrices on a CPU: torch's own (its BLAS, MKL) or oneDNN.

torch's fp32 ``mm`` calls MKL's sgemm. MKL picks its kernels by the processor's vendor: on AMD
processors it takes its AVX2 path even where the CPU has AVX-512. On Zen 4, which runs AVX-512 at
half width, that costs nothing; Zen 5 (cpu family 26) has full-width AVX-512 units, and there sgemm
reaches half the CPU's fp32 rate. oneDNN (which torch also carries, and uses for its bf16 matmuls)
runs its AVX-512 kernels on any vendor's CPU. On a 2-core Zen 5 EPYC, oneDNN ran a step's fp32
products at 2.0× MKL's rate (1.8-2.3× each) and the fp32 training step 1.53× (bench/recipes/tiny.yaml)
and 1.66× (small.yaml) as fast (bench/matmul.py, bench/ablate.py --groups matmul; docs/performance.md).
The arithmetic is fp32 in both: the sums are taken in another order.

Taken where the step is fp32 and eager on an AMD CPU of family 26 or later with AVX-512:
target.precision fp32 (auto is bf16 on these CPUs, which multiply bf16 natively), no torch.compile
(inductor's products are MKL's; choose_compile's auto stays eager here, as the eager oneDNN step beats
the compiled one). model.py's linear layers then run x @ Wᵀ and both products of their backward
through oneDNN (``Linear`` and ``linear`` in model.py: nn.Linear's parameters and state dict), and so
do a decoder's chunked loss's products and a distillation teacher's (malt.runtime.teacher.onednn_matmuls).
Attention (SDPA) and GaLore's projections keep torch's. Elsewhere torch's matmul stays: Intel CPUs (MKL's AVX-512
kernels run there), AMD CPUs before Zen 5 (not measured; MKL ran at their peak), CPUs without
AVX-512, and bf16 (whose products torch gives to oneDNN already).
"""

from __future__ import annotations

from ..plan import Host, Plan

# measured on a 2-core AMD EPYC (Zen 5), torch 2.13 (docs/performance.md): oneDNN's fp32 rate over MKL's on a step's
# products (bench/matmul.py), and the fp32 training step of bench/recipes/{tiny,small}.yaml (bench/ablate.py)
ONEDNN_MATMUL_SPEEDUP = 2.0
ONEDNN_STEP_SPEEDUP = (1.53, 1.66)
ZEN5_FAMILY = 26  # AMD's cpu family of Zen 5 (/proc/cpuinfo): the first with full-width AVX-512 units


def onednn_fp32(host: Host) -> bool:
    """oneDNN multiplies fp32 faster than torch's matmul here: an AMD CPU of Zen 5 or later with AVX-512, where MKL's
    sgemm runs its AVX2 kernels at half the CPU's rate (measured on Zen 5 only)."""
    return host.cpu_vendor == "AuthenticAMD" and host.cpu_avx512 and host.cpu_family >= ZEN5_FAMILY


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
    elif host.cpu_vendor == "AuthenticAMD" and host.cpu_family < ZEN5_FAMILY:
        why = (f"an AMD CPU of family {host.cpu_family}, before Zen 5 ({ZEN5_FAMILY}): MKL's AVX2 kernels ran at Zen 4's peak"
               if host.cpu_family else "an AMD CPU of unknown family: oneDNN was measured faster on Zen 5 only")
    elif not onednn_fp32(host):
        why = f"CPU vendor {host.cpu_vendor or 'unknown'}: oneDNN measured only on AMD's"
    else:
        return plan.decide("matmul", "onednn",
                           "fp32 on an AMD CPU of Zen 5 or later with AVX-512, eager: MKL's sgemm takes its AVX2 kernels on AMD "
                           "processors, at half this CPU's rate, "
                           "oneDNN its AVX-512 ones; the linear layers (forward and backward) and the chunked loss multiply "
                           f"through oneDNN: {ONEDNN_MATMUL_SPEEDUP}× MKL's fp32 rate, {ONEDNN_STEP_SPEEDUP[0]}-"
                           f"{ONEDNN_STEP_SPEEDUP[1]}× the fp32 step (bench/recipes/tiny.yaml, small.yaml) on a 2-core AMD "
                           "EPYC (Zen 5); the same fp32 arithmetic, summed in another order", matmul="onednn")
    return plan.decide("matmul", "torch", f"torch's matmul (MKL) for fp32 products: {why}", matmul="torch")
