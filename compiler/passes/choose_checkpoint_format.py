"""Choose how checkpoints are written: whole tensors in safetensors, or sharded with torch.distributed.checkpoint;
and whether a full checkpoint is written in the background (checkpoint_writes).

With FSDP2 (or HSDP) each process holds a shard of the weights and AdamW state;
writing the whole tensors would gather them on one process (its memory must hold
the full model and optimizer, and one process does all the writing). A sharded
checkpoint (DCP) has every process write its own shards in parallel, and loads
onto another number of processes by resharding. ``malt export`` consolidates it.
"""

from __future__ import annotations

from ..plan import Plan


# on a CPU the copy of the weights and optimizer state a background write holds is host memory, which the run's
# own memory also is: background only while that copy is a small share of it
CPU_COPY_SHARE = 0.10


def run(plan: Plan) -> Plan:
    return _writes(_format(plan))


def _writes(plan: Plan) -> Plan:
    """A full checkpoint: the main process copies the tensors to host memory while training waits, then a thread
    writes, syncs and renames them while training goes on (checkpoint.save(background=True))."""
    if plan.device == "tpu":
        return plan.decide("checkpoint_writes", "foreground", "tpu: the XLA program writes its checkpoints from host "
                           "copies as it makes them", checkpoint_writes="foreground")
    if plan.checkpoint_format == "sharded":
        return plan.decide("checkpoint_writes", "foreground", "sharded: every process writes its own shards "
                           "(torch.distributed.checkpoint) before training goes on", checkpoint_writes="foreground")
    how = ("weights and optimizer state are copied to host memory at the step, then a thread writes the checkpoint "
           "while training goes on (the next save, a stop and the end wait for it)")
    if plan.device == "cpu":
        from ..estimates import state_bytes
        from ..units import human_bytes
        from .estimate import memory_of, model_counts

        full = state_bytes(model_counts(plan)["params"], plan.precision, plan.master_weights)
        copy, memory = full["weights"] + full["optimizer"], memory_of(plan)[0]
        whose = "the machine's" if plan.recipe.target.devices == 1 else "each process's share of the machine,"
        if copy > CPU_COPY_SHARE * memory:
            return plan.decide("checkpoint_writes", "foreground",
                               f"cpu: a background write would hold a {human_bytes(copy)} copy of weights and optimizer "
                               f"state, over {CPU_COPY_SHARE:.0%} of {whose} {human_bytes(memory)}: written while "
                               "training waits", checkpoint_writes="foreground")
        return plan.decide("checkpoint_writes", "background", f"{how}; cpu: a {human_bytes(copy)} copy",
                           checkpoint_writes="background")
    return plan.decide("checkpoint_writes", "background", how, checkpoint_writes="background")


def _format(plan: Plan) -> Plan:
    fmt = plan.recipe.train.checkpoint_format
    if plan.device == "tpu":  # validation rejects sharded for tpu
        return plan.decide("checkpoint_format", "full", "tpu: the XLA program writes whole tensors (safetensors) from CPU copies, "
                           "assembled from each device's shards on the host", checkpoint_format="full")
    if fmt != "auto":
        return plan.decide("checkpoint_format", fmt, f"train.checkpoint_format {fmt}", checkpoint_format=fmt)
    if plan.device == "tpu":
        return plan.decide("checkpoint_format", "full", "auto: the XLA program writes whole tensors from CPU copies",
                           checkpoint_format="full")
    if plan.parallelism in ("fsdp", "hsdp"):
        why = (f"auto: {plan.parallelism} shards weights and optimizer state; each process writes its own shards "
               "(torch.distributed.checkpoint), no gathering on one process")
        return plan.decide("checkpoint_format", "sharded", why, checkpoint_format="sharded")
    why = ("auto: one process, whole tensors (safetensors)" if plan.parallelism == "single" else
           f"auto: {plan.parallelism} holds whole tensors on each process; the main process writes them (safetensors)")
    return plan.decide("checkpoint_format", "full", why, checkpoint_format="full")
