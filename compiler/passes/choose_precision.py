"""Resolve target.precision: bf16 autocast with fp32 master weights, or plain fp32."""

from __future__ import annotations

from ..plan import Plan


def run(plan: Plan) -> Plan:
    p = plan.recipe.target.precision
    if p != "auto":
        return plan.decide("precision", p, f"target.precision {p}", precision=p)
    if plan.device == "cuda":
        return plan.decide("precision", "bf16", "auto on cuda: bf16 autocast, fp32 master weights and optimizer state", precision="bf16")
    return plan.decide("precision", "fp32", "auto on cpu: fp32, so runs are exactly reproducible; set target.precision: bf16 for autocast",
                       precision="fp32")
