"""Choose the AdamW implementation: fused (one kernel over all parameters) where torch has it."""

from __future__ import annotations

from ..plan import Plan


def run(plan: Plan) -> Plan:
    # torch >= 2.4 has fused AdamW for CPU and CUDA tensors
    return plan.decide("fused_adamw", True, f"torch has a fused AdamW for {plan.device}", fused_adamw=True)
