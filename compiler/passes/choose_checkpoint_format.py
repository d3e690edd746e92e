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
    """Full: the main process copies the tensors to host memory while training waits, then a thread writes, syncs
    and renames them while training goes on (checkpoint.save(background=True)). Sharded: every process copies its
    shards into host buffers it keeps for the run, then its thread writes them with DCP over a gloo group of its own."""
    if plan.device == "tpu":
        return plan.decide("checkpoint_writes", "foreground", "tpu: the XLA program writes its checkpoints from host "
                           "copies as it makes them", checkpoint_writes="foreground")
    asked = plan.recipe.train.checkpoint_writes
    if asked != "auto":
        return plan.decide("checkpoint_writes", asked, f"train.checkpoint_writes {asked}", checkpoint_writes=asked)
    sharded = plan.checkpoint_format == "sharded"
    how = ("every process copies its shards of the weights and optimizer state to host buffers (kept for the run and "
           "reused) at the step, then a thread writes them (torch.distributed.checkpoint) while training goes on"
           if sharded else
           "weights and optimizer state are copied to host memory at the step, then a thread writes the checkpoint "
           "while training goes on") + " (the next save, a stop and the end wait for it)"
    if plan.device == "cpu":
        from ..units import human_bytes
        from .estimate import memory_of

        copy, memory, devices = copy_bytes(plan), memory_of(plan)[0], plan.recipe.target.devices
        whose = "the machine's" if devices == 1 else "each process's share of the machine,"
        what = "its process's shards of the" if sharded and devices > 1 else "the"
        if copy > CPU_COPY_SHARE * memory:
            return plan.decide("checkpoint_writes", "foreground",
                               f"cpu: a background write would hold a {human_bytes(copy)} copy of {what} weights and "
                               f"optimizer state, over {CPU_COPY_SHARE:.0%} of {whose} {human_bytes(memory)}: written "
                               "while training waits", checkpoint_writes="foreground")
        return plan.decide("checkpoint_writes", "background", f"{how}; cpu: a {human_bytes(copy)} copy"
                           + (" per process" if sharded and devices > 1 else ""), checkpoint_writes="background")
    return plan.decide("checkpoint_writes", "background", how, checkpoint_writes="background")


def copy_bytes(plan: Plan) -> int:
    """What a background write copies on one process: the tensors of a checkpoint, the master weights (not autocast's
    copies) and the optimizer's state; sharded, this process's shards of them."""
    from .estimate import model_counts, shards_of, whole_states

    copy = model_counts(plan)["params"] * (2 if plan.master_weights == "bf16" else 4) + whole_states(plan)["optimizer"]
    return -(-copy // shards_of(plan)) if plan.checkpoint_format == "sharded" else copy


def _format(plan: Plan) -> Plan:
    fmt = plan.recipe.train.checkpoint_format
    if plan.device == "tpu":  # validation rejects sharded for tpu
        return plan.decide("checkpoint_format", "full", "tpu: the XLA program writes whole tensors (safetensors) from CPU copies, "
                           "assembled from each device's shards on the host", checkpoint_format="full")
    if fmt != "auto":
        return plan.decide("checkpoint_format", fmt, f"train.checkpoint_format {fmt}", checkpoint_format=fmt)
    if plan.parallelism in ("fsdp", "hsdp"):
        why = (f"auto: {plan.parallelism} shards weights and optimizer state; each process writes its own shards "
               "(torch.distributed.checkpoint), no gathering on one process")
        return plan.decide("checkpoint_format", "sharded", why, checkpoint_format="sharded")
    why = ("auto: one process, whole tensors (safetensors)" if plan.parallelism == "single" else
           f"auto: {plan.parallelism} holds whole tensors on each process; the main process writes them (safetensors)")
    return plan.decide("checkpoint_format", "full", why, checkpoint_format="full")
