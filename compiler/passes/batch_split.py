"""Split each phase's global batch into micro-batches and gradient accumulation within the memory budget."""

from __future__ import annotations

from dataclasses import replace

from ..objectives import phase_objective
from ..plan import Plan
from ..units import divisors
from .estimate import memory_of, step_peak

# share of device memory the planner lets a run use (the rest is for the allocator, kernels' workspace, the data)
BUDGET_SHARE = 0.8


def split(plan: Plan, global_batch: int, seq_len: int, micro_batch, distill: bool = False) -> tuple[int, str]:
    """(micro_batch, reason) for one batch shape; the micro-batch is per device, and each device
    takes global_batch / devices sequences of every step. ``distill``: the batches run through a teacher too,
    whose weights and whole logits (objectives.teacher_costs) take memory beside the student's."""
    world = plan.world or 1
    gb = global_batch // world
    per = f"{global_batch} / {world} devices = {gb} per device; " if world > 1 else ""
    if micro_batch != "auto":
        return micro_batch, f"train.micro_batch {micro_batch}: {per}{gb} / {micro_batch} = {gb // micro_batch} accumulation steps"
    memory, where = memory_of(plan)
    budget = int(memory * BUDGET_SHARE)
    ac = "" if plan.activation_checkpointing == "none" else f" with {plan.activation_checkpointing} activation checkpointing"
    for mb in reversed(divisors(gb)):
        if step_peak(plan, mb, seq_len, distill=distill) <= budget:
            if mb == gb:
                return mb, f"auto: {per}the whole {'device' if world > 1 else 'global'} batch ({gb}) fits in {BUDGET_SHARE:.0%} of the memory of {where}{ac}"
            return mb, (f"auto: {per}largest divisor of {gb} whose activations fit in {BUDGET_SHARE:.0%} of the memory of {where}{ac}; "
                        f"{gb} / {mb} = {gb // mb} accumulation steps")
    return 1, f"auto: even micro_batch 1 exceeds the memory budget of {where}; see memory estimate"


def run(plan: Plan) -> Plan:
    tr = plan.recipe.train
    mb, reason = split(plan, tr.global_batch, tr.seq_len, tr.micro_batch, distill=plan.recipe.objective.kind == "distill")
    phases = []
    for ph in plan.phases:
        pmb, preason = split(plan, ph.global_batch, ph.seq_len, ph.micro_batch,
                             distill=phase_objective(plan.recipe, ph.index).kind == "distill")
        phases.append(replace(ph, micro_batch=pmb, grad_accum=ph.global_batch // (plan.world or 1) // pmb))
        if plan.recipe.phases and (ph.global_batch, ph.seq_len, ph.micro_batch) != (tr.global_batch, tr.seq_len, tr.micro_batch):
            plan = plan.decide(f"micro_batch[{ph.name}]", pmb, preason)
    return plan.decide("micro_batch", mb, reason, micro_batch=mb, grad_accum=tr.global_batch // (plan.world or 1) // mb,
                       phases=tuple(phases))
