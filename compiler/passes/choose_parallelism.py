"""Choose how several devices share the work: DDP (replicas), FSDP2 (sharded weights, gradients, optimizer),
or HSDP (FSDP2 over a 2-D mesh: sharded within a node, replicated across nodes)."""

from __future__ import annotations

from ..objectives import teacher_weight_bytes
from ..plan import Plan
from .estimate import memory_of, states

# replicated training state (weights, gradients, AdamW moments) may take this share of a device before sharding pays
REPLICA_SHARE = 0.5


def run(plan: Plan) -> Plan:
    t = plan.recipe.target
    nodes = t.nodes
    n = t.devices * nodes
    on = f" ({nodes} nodes × {t.devices})" if nodes > 1 else ""
    if plan.device == "tpu":  # one process; several devices are one SPMD program (validation allows auto, single, fsdp)
        if n == 1:
            return plan.decide("parallelism", "single", "one TPU device: no mesh, no sharding", parallelism="single", world=1, nodes=1)
        why = (f"tpu with {n} devices: XLA SPMD in one process over a mesh of the {n} devices (axis fsdp), FSDPv2 sharding: "
               "each weight and its AdamW state sharded along its largest dimension, each batch split along the batch dimension")
        return plan.decide("parallelism", "fsdp", why, parallelism="fsdp", world=n, nodes=1)
    if n == 1 and t.parallelism == "fsdp":
        return plan.decide("parallelism", "fsdp", "target.parallelism fsdp on one device: the sharded code path, nothing saved",
                           parallelism="fsdp", world=1, nodes=1)
    if n == 1:
        return plan.decide("parallelism", "single", "one device", parallelism="single", world=1, nodes=1)
    if t.parallelism != "auto":
        return plan.decide("parallelism", t.parallelism, f"target.parallelism {t.parallelism} over {n} devices{on}",
                           parallelism=t.parallelism, world=n, nodes=nodes)
    if plan.recipe.optimizer.kind == "galore":
        return plan.decide("parallelism", "ddp", f"auto with optimizer galore: its projector needs each weight's whole gradient, "
                           f"so DDP over {n} devices{on} (FSDP would shard them)", parallelism="ddp", world=n, nodes=nodes)
    budget, where = memory_of(plan)
    state = "weights, gradients and AdamW state" + (" with the distillation teacher's weights" if plan.teacher else "")
    # the training state, and a distillation teacher's weights (replicated under DDP like the student's)
    replicated = sum(states(plan.decide("parallelism", "ddp", "", parallelism="ddp", world=n)).values()) + teacher_weight_bytes(
        plan.decide("parallelism", "ddp", "", parallelism="ddp", world=n))
    if replicated <= REPLICA_SHARE * budget:
        why = (f"auto: {state} ({replicated / 2**30:.2f} GiB) fit in {REPLICA_SHARE:.0%} of one "
               f"device ({where}): replicate with DDP over {n} devices{on}")
        return plan.decide("parallelism", "ddp", why, parallelism="ddp", world=n, nodes=nodes)
    if nodes > 1 and t.devices > 1:
        hsdp = plan.decide("parallelism", "hsdp", "", parallelism="hsdp", world=n, nodes=nodes)
        per_node = sum(states(hsdp).values()) + teacher_weight_bytes(hsdp)
        if per_node <= REPLICA_SHARE * budget:
            why = (f"auto: {state} ({replicated / 2**30:.2f} GiB) exceed {REPLICA_SHARE:.0%} of one "
                   f"device ({where}), sharded over a node's {t.devices} devices they fit: HSDP, sharded within each node and "
                   f"replicated across the {nodes} nodes (all-gathers stay inside a node)")
            return plan.decide("parallelism", "hsdp", why, parallelism="hsdp", world=n, nodes=nodes)
    why = (f"auto: {state} ({replicated / 2**30:.2f} GiB) exceed {REPLICA_SHARE:.0%} of one "
           f"device ({where}): shard them with FSDP2 over {n} devices{on}")
    return plan.decide("parallelism", "fsdp", why, parallelism="fsdp", world=n, nodes=nodes)
