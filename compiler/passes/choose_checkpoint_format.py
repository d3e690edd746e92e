"""Choose how checkpoints are written: whole tensors in safetensors, or sharded with torch.distributed.checkpoint.

With FSDP2 (or HSDP) each process holds a shard of the weights and AdamW state;
writing the whole tensors would gather them on one process (its memory must hold
the full model and optimizer, and one process does all the writing). A sharded
checkpoint (DCP) has every process write its own shards in parallel, and loads
onto another number of processes by resharding. ``malt export`` consolidates it.
"""

from __future__ import annotations

from ..plan import Plan


def run(plan: Plan) -> Plan:
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
