"""Resolve the objective: its derived numbers (UL2 raw lengths, sentinel counts, the teacher) for plan.json and render."""

from __future__ import annotations

from dataclasses import replace

from ..objectives import describe_objective, objective_tokens
from ..plan import Plan

_WHY = {
    "causal_lm": "next-token prediction over every position",
    "prefix_lm": "prefix LM: a random prefix per row (uniform in [1, seq_len - 1]) attended bidirectionally, loss after it",
    "span_corruption": "T5 span corruption laid out for a decoder-only model as UL2 does: [inputs with sentinels] [targets], "
                       "a prefix-LM mask over the inputs, loss on the targets",
    "ul2": "UL2 mixture of denoisers, one drawn per example; each row is [mode] [inputs] [targets] with a prefix-LM mask",
    "fim": "fill-in-the-middle: documents reordered around sentinels, then next-token prediction over every position",
    "distill": "knowledge distillation: KL to the teacher's softened distribution mixed with next-token cross-entropy",
}


def run(plan: Plan) -> Plan:
    r = plan.recipe
    obj = describe_objective(r, teacher=plan.teacher)
    why = _WHY.get(r.objective.kind, r.objective.kind)
    added = objective_tokens(r)
    if added:
        why += f"; adds {len(added)} special token(s) to the tokenizer ({', '.join(added[:4])}{' ...' if len(added) > 4 else ''})"
    plan = plan.decide("objective", r.objective.kind, why)
    return replace(plan, objective=obj)
