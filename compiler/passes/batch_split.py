"""Split the global batch into micro-batches and gradient accumulation within the memory budget."""

from __future__ import annotations

from ..estimates import activation_bytes
from ..plan import Plan
from .estimate import chip_of, states

# share of device memory the planner lets a run use (the rest is for the allocator, kernels' workspace, the data)
BUDGET_SHARE = 0.8


def run(plan: Plan) -> Plan:
    r = plan.recipe
    tr = r.train
    gb = tr.global_batch
    if tr.micro_batch != "auto":
        mb = tr.micro_batch
        return plan.decide("micro_batch", mb, f"train.micro_batch {mb}: {gb} / {mb} = {gb // mb} accumulation steps",
                           micro_batch=mb, grad_accum=gb // mb)
    chip = chip_of(plan)
    budget = int(chip.memory_bytes * BUDGET_SHARE)
    fixed = sum(states(plan).values())
    divisors = [d for d in range(gb, 0, -1) if gb % d == 0]
    for mb in divisors:
        act = activation_bytes(mb, tr.seq_len, r.model.d_model, r.model.n_layers, plan.n_kv_heads * plan.head_dim,
                               plan.d_ff, plan.padded_vocab, plan.precision)
        if fixed + act <= budget:
            reason = (f"auto: the whole global batch ({gb}) fits in {BUDGET_SHARE:.0%} of {chip.name} memory" if mb == gb else
                      f"auto: largest divisor of global_batch {gb} whose activations fit in {BUDGET_SHARE:.0%} of {chip.name} memory; "
                      f"{gb} / {mb} = {gb // mb} accumulation steps")
            return plan.decide("micro_batch", mb, reason, micro_batch=mb, grad_accum=gb // mb)
    return plan.decide("micro_batch", 1, f"auto: even micro_batch 1 exceeds the memory budget of {chip.name}; see memory estimate",
                       micro_batch=1, grad_accum=gb)
