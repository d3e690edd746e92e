"""Choose the AdamW implementation: fused (one kernel over all parameters) where torch has it."""

from __future__ import annotations

from ..plan import Plan


def run(plan: Plan) -> Plan:
    if plan.device == "tpu":
        return plan.decide("fused_adamw", False, "tpu: torch's fused AdamW kernels are for CPU and CUDA; the foreach AdamW "
                           "traces into the XLA step graph", fused_adamw=False)
    # torch >= 2.4 has fused AdamW for CPU and CUDA tensors
    # bench/ablate.py, 5.3M params on a 2-core CPU: fused 1.01×, foreach 1.00× the step of the default for-loop AdamW
    # (the optimizer is about 2% of a step there); on GPUs the for-loop launches kernels per parameter
    why = (f"torch has a fused AdamW for {plan.device}: one kernel over all parameters"
           + (" (on a 2-core CPU 1.01× the tokens/s of the default for-loop AdamW at 5.3M parameters, bench/ablate.py)"
              if plan.device == "cpu" else ""))
    return plan.decide("fused_adamw", True, why, fused_adamw=True)
