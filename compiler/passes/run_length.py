"""Turn train.tokens or train.steps into steps, tokens per step and the schedule's step counts."""

from __future__ import annotations

from ..plan import Plan
from ..schema import steps_of


def run(plan: Plan) -> Plan:
    tr, sch = plan.recipe.train, plan.recipe.schedule
    per_step = tr.global_batch * tr.seq_len
    if tr.steps is not None:
        steps = tr.steps
        reason = f"train.steps {steps}"
    else:
        steps = tr.tokens // per_step
        reason = f"train.tokens {tr.tokens:,} / (global_batch {tr.global_batch} × seq_len {tr.seq_len} = {per_step:,} tokens per step), rounded down"
    warmup = steps_of(sch.warmup, steps)
    if sch.decay == "wsd":
        decay_start = steps - round(sch.decay_share * steps)
    else:
        decay_start = warmup
    plan = plan.decide("steps", steps, reason, steps=steps, tokens_per_step=per_step, tokens=steps * per_step,
                       warmup_steps=warmup, decay_start=decay_start)
    return plan
