"""Activation checkpointing: keep fewer activations for backward and recompute the rest, when memory needs it.

none keeps every activation; selective recomputes each block's MLP (the SwiGLU's
four d_ff-wide tensors, over half of a Llama block's activations, for one more
MLP forward); full recomputes each whole block from its input (one more forward
of every block). ``auto`` takes the first of none, selective, full with which
the smallest micro-batch the batch split may choose fits the memory budget.
"""

from __future__ import annotations

from ..plan import Plan
from ..units import human_bytes
from .batch_split import BUDGET_SHARE
from .estimate import memory_of, step_peak

MODES = ("none", "selective", "full")
WHAT = {"none": "no activation checkpointing", "selective": "selective activation checkpointing (each MLP recomputed)",
        "full": "full activation checkpointing (each block recomputed)"}


def smallest_shapes(plan: Plan) -> list[tuple[int, int]]:
    """(micro_batch, seq_len) of each batch shape at the smallest micro-batch the batch split may choose."""
    tr = plan.recipe.train
    shapes = [(ph.micro_batch, ph.seq_len) for ph in plan.phases] or [(tr.micro_batch, tr.seq_len)]
    return [(1 if mb == "auto" else mb, seq) for mb, seq in shapes]


def fits(plan: Plan, mode: str) -> tuple[bool, int]:
    """(whether the smallest micro-batches fit with ``mode``, the peak bytes per device)."""
    budget, _ = memory_of(plan)
    peak = max(step_peak(plan, mb, seq, checkpointing=mode) for mb, seq in smallest_shapes(plan))
    return peak <= budget * BUDGET_SHARE, peak


def available(plan: Plan) -> bool:
    """Activation checkpointing is built into the decoder's model.py on cpu and cuda (not the encoder's, not the XLA program)."""
    from ..encoder import is_encoder

    return plan.device != "tpu" and not is_encoder(plan.recipe)


def run(plan: Plan) -> Plan:
    mode = plan.recipe.target.activation_checkpointing
    if plan.device == "tpu":  # validation allows only auto and none there
        return plan.decide("activation_checkpointing", "none", f"{'auto' if mode == 'auto' else 'target.activation_checkpointing none'} "
                           "on tpu: activation checkpointing is not built into the XLA program", activation_checkpointing="none")
    if mode == "auto" and not available(plan):  # an encoder (validation allows only auto and none there)
        return plan.decide("activation_checkpointing", "none", "auto: activation checkpointing is not built for encoders",
                           activation_checkpointing="none")
    if mode != "auto":
        return plan.decide("activation_checkpointing", mode, f"target.activation_checkpointing {mode}", activation_checkpointing=mode)
    budget, where = memory_of(plan)
    mb = ", ".join(sorted({str(m) for m, _ in smallest_shapes(plan)}))
    for m in MODES:
        ok, peak = fits(plan, m)
        if ok:
            if m == "none":
                why = f"auto: micro_batch {mb} fits in {BUDGET_SHARE:.0%} of the {human_bytes(budget)} of {where}, without it"
            else:
                why = (f"auto: micro_batch {mb} needs more than {BUDGET_SHARE:.0%} of the {human_bytes(budget)} of {where} "
                       f"with less; {WHAT[m]} brings it to {human_bytes(peak)}")
            return plan.decide("activation_checkpointing", m, why, activation_checkpointing=m)
    why = f"auto: even with full checkpointing micro_batch {mb} needs {human_bytes(peak)}, over {BUDGET_SHARE:.0%} of {where}"
    return plan.decide("activation_checkpointing", "full", why, activation_checkpointing="full")
