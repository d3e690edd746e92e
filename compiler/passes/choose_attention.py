"""Choose the attention kernel. Causal LM on one device: SDPA with is_causal (flash or memory-efficient kernels)."""

from __future__ import annotations

from ..plan import Plan


def run(plan: Plan) -> Plan:
    return plan.decide("attention", "sdpa_causal",
                       "causal_lm with concat packing needs only a causal mask: scaled_dot_product_attention(is_causal=True) "
                       "picks flash/memory-efficient kernels and never builds a seq×seq mask", attention="sdpa_causal")
