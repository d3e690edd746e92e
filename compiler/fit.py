"""Does the planned run fit its devices' memory? If not, the smallest change to the recipe that makes it fit.

The passes choose a layout within the memory budget when they can (batch_split,
choose_checkpointing, choose_parallelism). When the recipe pins a choice, or no
choice fits, `malt check`, `malt plan` and `malt compile` stop here with a
diagnostic that states the peak memory per device and the first of these
changes that fits, tried in this order (each is re-planned with the passes):

1. a smaller micro-batch (``train.micro_batch: auto``, when it was set);
2. activation checkpointing (selective, then full, when it was set to less);
3. FSDP instead of replicas (when there are several devices);
4. more devices: GPUs per node up to 8, then more nodes (with FSDP).
"""

from __future__ import annotations

from dataclasses import replace

from .diagnostics import Diagnostic
from .passes.choose_checkpointing import available
from .plan import Plan, lower, run_passes
from .units import human_bytes

MAX_DEVICES_PER_NODE = 8
MAX_NODES = 1024


def budget(plan: Plan) -> int:
    from .passes.batch_split import BUDGET_SHARE
    from .passes.estimate import memory_of

    return int(memory_of(plan)[0] * BUDGET_SHARE)


def peak(plan: Plan) -> int:
    return plan.estimates["memory_per_device_bytes"]["total"]


def fits(plan: Plan) -> bool:
    return peak(plan) <= budget(plan)


def _replan(plan: Plan, target: dict | None = None, train: dict | None = None) -> Plan:
    r = plan.recipe
    recipe = r.model_copy(update={"target": r.target.model_copy(update=target or {}),
                                  "train": r.train.model_copy(update=train or {})})
    start = lower(recipe, plan.recipe_file, plan.tokenizer_vocab, plan.host)
    # what lower() takes besides the recipe (a distillation teacher's shape, ...) comes from the plan as it was lowered
    kept = {f: getattr(plan, f) for f in ("teacher",) if hasattr(plan, f)}
    return run_passes(replace(start, recipe_hash=plan.recipe_hash, **kept))


def _batches(plan: Plan) -> list[int]:
    return [ph.global_batch for ph in plan.phases] or [plan.recipe.train.global_batch]


def smallest_fix(plan: Plan) -> tuple[str, Plan] | None:
    """(the change, the plan with it) for the first change in the module's order that fits, or None."""
    r = plan.recipe
    t, tr = r.target, r.train
    if tr.micro_batch != "auto" and tr.micro_batch > 1:
        p = _replan(plan, train={"micro_batch": "auto"})
        if fits(p):
            return (f"a smaller micro-batch: train.micro_batch: {p.micro_batch} (or auto) instead of {tr.micro_batch}, "
                    f"with {p.grad_accum} accumulation steps"), p
    if t.activation_checkpointing in ("none", "selective") and available(plan):
        for mode in ("selective", "full"):
            if mode == "selective" and t.activation_checkpointing == "selective":
                continue
            p = _replan(plan, target={"activation_checkpointing": mode})
            if fits(p):
                return f"activation checkpointing: target.activation_checkpointing: {mode} (or auto)", p
    if plan.world > 1 and plan.parallelism in ("ddp", "hsdp"):
        p = _replan(plan, target={"parallelism": "fsdp"}, train={"micro_batch": "auto"})
        if fits(p):
            return (f"FSDP: target.parallelism: fsdp (shards weights, gradients and AdamW state over the {plan.world} devices)"
                    + _also(plan, p)), p
    more = {"parallelism": "fsdp", "activation_checkpointing": "auto"}
    if plan.device == "tpu":  # one host's chips in one SPMD program (the TPU program has no nodes)
        layouts = [(1, d) for d in (2 ** k for k in range(1, 9)) if d > t.devices]
    else:
        layouts = [(nodes, devices) for nodes in [t.nodes] + [n for n in (2 ** k for k in range(11)) if t.nodes < n <= MAX_NODES]
                   for devices in range(t.devices + 1 if nodes == t.nodes else MAX_DEVICES_PER_NODE, MAX_DEVICES_PER_NODE + 1)]
    for nodes, devices in layouts:
        world = nodes * devices
        if any(gb % world for gb in _batches(plan)):
            continue
        p = _replan(plan, target={**more, "nodes": nodes, "devices": devices}, train={"micro_batch": "auto"})
        if fits(p):
            where = f"target.devices: {devices}" if nodes == 1 else f"target.nodes: {nodes} with target.devices: {devices}"
            return (f"more devices: {where} and target.parallelism: fsdp ({world} devices, {human_bytes(peak(p))} each)"
                    + _also(plan, p)), p
    return None


def _also(before: Plan, after: Plan) -> str:
    """The other settings a suggested fix relied on (it re-plans micro_batch and checkpointing as auto): named, so
    that applying the hint as written fits."""
    changes = []
    if before.recipe.train.micro_batch != "auto" and after.micro_batch != before.micro_batch:
        changes.append(f"train.micro_batch: {after.micro_batch} (or auto)")
    if after.activation_checkpointing != before.activation_checkpointing:
        changes.append(f"target.activation_checkpointing: {after.activation_checkpointing}"
                       + (" (or auto)" if before.recipe.target.activation_checkpointing != "auto" else ""))
    return ", with " + " and ".join(changes) if changes else ""


def problems(plan: Plan, loaded) -> list[Diagnostic]:
    """A diagnostic at the recipe's target section when the run does not fit its devices' memory; else none."""
    if fits(plan):
        return []
    from .passes.batch_split import BUDGET_SHARE
    from .passes.estimate import memory_of

    mem = plan.estimates["memory_per_device_bytes"]
    memory, where = memory_of(plan)
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in mem.items() if k != "total")
    layout = (f"{plan.world} × {plan.device} ({plan.parallelism})" if plan.world > 1 else plan.device)
    message = (f"the run does not fit: it needs {human_bytes(peak(plan))} per device ({parts}; micro_batch {plan.micro_batch}, "
               f"activation checkpointing {plan.activation_checkpointing}, {layout}), over the {human_bytes(budget(plan))} "
               f"the planner allows ({BUDGET_SHARE:.0%} of {human_bytes(memory)}, {where})")
    fix = smallest_fix(plan)
    hint = (f"the smallest change that fits: {fix[0]}" if fix else
            "no change of micro-batch, checkpointing, sharding or device count up to "
            f"{MAX_NODES} nodes × {MAX_DEVICES_PER_NODE} fits: make the model smaller, or set target.memory_per_device if the "
            "devices have more memory than assumed")
    return [Diagnostic("target", message, loaded.origin(("target",)), hint=hint)]
