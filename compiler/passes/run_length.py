"""Resolve the run's length: the phases' step ranges, tokens per step and the schedules' step counts."""

from __future__ import annotations

from dataclasses import replace

from ..phases import resolve, resolve_schedule
from ..plan import Plan


def run(plan: Plan) -> Plan:
    r = plan.recipe
    tr = r.train
    res = resolve(r)  # validated already: no problems here
    phases = []
    for ph in res.phases:
        own = resolve_schedule(ph.own_schedule, ph.lr, ph.steps) if ph.own_schedule is not None else None
        phases.append(replace(ph, schedule=own))
    steps = sum(ph.steps for ph in phases)
    tokens = sum(ph.steps * ph.tokens_per_step for ph in phases)
    per_step = tr.global_batch * tr.seq_len
    if r.phases:
        reason = " + ".join(f"{ph.name} {ph.steps:,}" for ph in phases) + f" = {steps:,} steps, {tokens:,} tokens"
    elif tr.steps is not None:
        reason = f"train.steps {steps}"
    else:
        reason = (f"train.tokens {tr.tokens:,} / (global_batch {tr.global_batch} × seq_len {tr.seq_len} = {per_step:,} "
                  f"tokens per step), rounded down")
    schedule = resolve_schedule(r.schedule, r.optimizer.lr, steps)
    return plan.decide("steps", steps, reason, steps=steps, tokens_per_step=per_step, tokens=tokens,
                       warmup_steps=schedule.warmup, decay_start=schedule.decay_start, schedule=schedule,
                       phases=tuple(phases), sources=tuple(res.sources), n_layers=phases[-1].n_layers)
