"""Data-parallel training across processes with torch.distributed: DDP, FSDP2 (fully_shard) or HSDP.

Generated programs for ``target.devices > 1`` are started by torchrun, one process
per device, and call :func:`setup` first. malt writes no parallelism of its own:
DDP replicates the model and all-reduces gradients; FSDP2 shards parameters,
gradients and optimizer state across processes. Every process reads its own
slice of each step's global batch (sequence indices are global, so the data is
the same whatever the number of processes).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: str            # "cpu" or "cuda:N"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local, device)


def wrap(model: torch.nn.Module, parallelism: str, ctx: Dist, nodes: int = 1) -> torch.nn.Module:
    """The module the training step calls: DDP around the model, or the model with its blocks sharded (FSDP2).

    HSDP is FSDP2 on a 2-D DeviceMesh (replicate over ``nodes``, shard over each node's processes):
    parameters are all-gathered within a node and gradients reduce-scattered there, then all-reduced
    across nodes. torchrun numbers a node's processes consecutively, so mesh row i is node i.
    """
    if parallelism == "ddp":
        # gradients as views into DDP's communication buckets: no second copy of every gradient (PyTorch's DDP docs)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.startswith("cuda") else None,
                                                         gradient_as_bucket_view=True)
    if parallelism in ("fsdp", "hsdp"):
        from torch.distributed.fsdp import fully_shard

        mesh = None
        if parallelism == "hsdp":
            from torch.distributed.device_mesh import init_device_mesh

            if ctx.world % nodes:
                raise ValueError(f"HSDP over {nodes} nodes needs a multiple of {nodes} processes, got {ctx.world}")
            mesh = init_device_mesh(ctx.device.split(":")[0], (nodes, ctx.world // nodes), mesh_dim_names=("replicate", "shard"))
        for layer in model.layers:   # each block is one all-gather / reduce-scatter unit
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return model


def shard_frozen(model: torch.nn.Module, parallelism: str, ctx: Dist, nodes: int = 1) -> torch.nn.Module:
    """A frozen module (a distillation teacher) sharded like the student under FSDP2 / HSDP: each device keeps
    its shard of every block's weights, and a block is all-gathered for its forward and freed after it.
    Under DDP or on one device it stays whole. Call its forward under torch.no_grad()."""
    if parallelism in ("fsdp", "hsdp"):
        return wrap(model, parallelism, ctx, nodes)
    return model


def grad_sync(wrapped: torch.nn.Module, parallelism: str, sync: bool):
    """Context for one micro-step: gradients are synchronised only on the last micro-step of a step."""
    if parallelism == "ddp" and not sync:
        return wrapped.no_sync()
    if parallelism in ("fsdp", "hsdp"):
        wrapped.set_requires_gradient_sync(sync)
    return nullcontext()


def mean(value: torch.Tensor) -> float:
    """The mean of a scalar over all processes (a Python float)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return float(value)


def reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over all processes, as a tensor on the device (no wait for the host)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def largest(value: int) -> int:
    """The largest of a Python int over all processes (every process calls it; on NCCL through this process's GPU)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor(int(value), dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)
    return value


def total(value: float, device) -> float:
    """The sum of a Python float over all processes."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(float(value), dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)
    return value


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
