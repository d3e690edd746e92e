"""Resolve target.compile: whether the generated program wraps the model in torch.compile."""

from __future__ import annotations

from ..plan import Plan


def run(plan: Plan) -> Plan:
    c = plan.recipe.target.compile
    if c != "auto":
        return plan.decide("compile", c == "on", f"target.compile {c}", compile=c == "on")
    if plan.device == "cuda":
        return plan.decide("compile", True, "auto on cuda: torch.compile fuses the elementwise work between matmuls", compile=True)
    return plan.decide("compile", False, "auto on cpu: compile time outweighs its gain for short CPU runs", compile=False)
