"""Choose how several devices share the work: DDP (replicas) or FSDP2 (sharded weights, gradients, optimizer)."""

from __future__ import annotations

from ..plan import Plan
from .estimate import chip_of, states

# replicated training state (weights, gradients, AdamW moments) may take this share of a device before sharding pays
REPLICA_SHARE = 0.5


def run(plan: Plan) -> Plan:
    t = plan.recipe.target
    n = t.devices
    if n == 1 and t.parallelism == "fsdp":
        return plan.decide("parallelism", "fsdp", "target.parallelism fsdp on one device: the sharded code path, nothing saved",
                           parallelism="fsdp", world=1)
    if n == 1:
        return plan.decide("parallelism", "single", "one device", parallelism="single", world=1)
    if t.parallelism != "auto":
        return plan.decide("parallelism", t.parallelism, f"target.parallelism {t.parallelism} over {n} devices",
                           parallelism=t.parallelism, world=n)
    chip = chip_of(plan)
    replicated = sum(states(plan).values())
    if replicated <= REPLICA_SHARE * chip.memory_bytes:
        why = (f"auto: weights, gradients and AdamW state ({replicated / 2**30:.2f} GiB) fit in {REPLICA_SHARE:.0%} of one "
               f"{chip.name}: replicate with DDP over {n} devices")
        return plan.decide("parallelism", "ddp", why, parallelism="ddp", world=n)
    why = (f"auto: weights, gradients and AdamW state ({replicated / 2**30:.2f} GiB) exceed {REPLICA_SHARE:.0%} of one "
           f"{chip.name}: shard them with FSDP2 over {n} devices")
    return plan.decide("parallelism", "fsdp", why, parallelism="fsdp", world=n)
