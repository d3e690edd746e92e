"""TPU support for generated programs (``target.accelerator: tpu``), through torch-xla.

torch-xla 2.9 pairs with torch 2.9 only: install both with malt's tpu extra (``pip install -e '.[tpu]'`` in malt's checkout)
(see README). The generated program itself uses torch-xla's idioms in the open
(``torch_xla.device()``, ``torch_xla.sync()`` after each optimizer step, an SPMD
mesh); this module holds what every TPU program shares:

- :func:`setup`: the XLA device and, for several devices, SPMD mode and a 1-D mesh
  whose axis is named ``fsdp``;
- :func:`shard`: FSDPv2 (torch-xla's ``SpmdFullyShardedDataParallel``): every weight
  sharded along its largest dimension over the mesh; gradients and AdamW state follow;
- :func:`loader`: torch-xla's ``ParallelLoader`` over the program's batches (its items taken
  with ``next_item``, not through ``MpDeviceLoader``): moved to the device in a background
  thread, each batch sharded along its batch dimension;
- :func:`save` and :func:`host_state`: checkpoints from CPU copies (a sharded tensor
  is assembled on the host from its local shards, which compiles no XLA program);
- :func:`compiled_graphs`: how many graphs XLA has compiled (metrics.jsonl records it,
  so a run whose graphs recompile every step shows it).

Importing this module without torch-xla ends the program with the install hint.
"""

from __future__ import annotations

import os
import sys

PJRT_CHOSEN = "PJRT_DEVICE" in os.environ  # before torch-xla, which sets it when it falls back to a backend by itself

try:
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.distributed.spmd as xs
    import torch_xla.runtime as xr
    from torch_xla.debug import metrics
    from torch_xla.distributed import parallel_loader
except ImportError as e:  # the program is started before anything could catch a RunError
    print(f"error: this program was compiled for tpu and needs torch-xla ({e})\n"
          "    hint: pip install -e '.[tpu]' in malt's checkout (torch 2.9.0 with torch-xla 2.9.0), or compile for this machine: "
          "--set target.accelerator=cpu (or auto)", file=sys.stderr)
    raise SystemExit(2)

import numpy as np
import torch

from . import checkpoint
from .run import Run, RunError

MESH_AXIS = "fsdp"  # FSDPv2 shards along the mesh axis of this name


def setup(devices: int):
    """(device, mesh): the XLA device, and with several devices an SPMD mesh over them (None for one)."""
    if devices > 1:
        xr.use_spmd()  # before any tensor reaches the device: one program for all devices, sharded by annotations
    try:
        found, kind = xr.global_runtime_device_count(), xr.device_type()
    except (RuntimeError, OSError) as e:  # such as PJRT_DEVICE=TPU without libtpu
        raise RunError(f"XLA could not start its {os.environ.get('PJRT_DEVICE', 'default')} backend: {str(e).splitlines()[0]}",
                       "on a TPU host, check that libtpu is installed (malt's tpu extra: pip install -e '.[tpu]'); PJRT_DEVICE=CPU runs on the CPU")
    if kind != "TPU" and not PJRT_CHOSEN:  # torch-xla fell back to another backend by itself
        raise RunError(f"this program was compiled for tpu, but XLA finds no TPU here (it would run on {kind})",
                       "run it on a TPU host, or set PJRT_DEVICE=CPU to run it on this CPU anyway (slowly; the tests do)")
    if devices > 1 and found != devices:
        raise RunError(f"this program was compiled for {devices} TPU devices, but XLA sees {found} ({xr.device_type()})",
                       f"compile with --set target.devices={found}")
    device = torch_xla.device()
    if devices == 1:
        return device, None
    mesh = xs.Mesh(np.arange(devices), (devices,), (MESH_AXIS,))
    xs.set_global_mesh(mesh)
    return device, mesh


def shard(model: torch.nn.Module, mesh, optimizer: torch.optim.Optimizer | None = None) -> torch.nn.Module:
    """The module the step calls: FSDPv2 around ``model`` on a mesh, or ``model`` itself on one device.

    FSDPv2 annotates each parameter with a sharding along its largest dimension; XLA's SPMD
    partitioner then all-gathers weights for the matmuls and reduce-scatters gradients. The
    wrapper keeps the parameters (and their names in ``model``), so the optimizer, checkpoints
    and export see the plain model. The loss (a scalar) is left replicated.

    After a resume the restored weights and AdamW moments arrive replicated (loading annotates them so),
    and FSDPv2 would leave an annotated weight as it is: their annotations are cleared first, and each
    restored moment then takes its weight's sharding (fresh moments are made from the sharded weights).
    """
    if mesh is None:
        return model
    from torch_xla.experimental.spmd_fully_sharded_data_parallel import (
        SpmdFullyShardedDataParallel as FSDPv2,
    )

    for p in model.parameters():
        torch_xla._XLAC._xla_clear_sharding(p)
    wrapped = FSDPv2(model, mesh=mesh, shard_output=lambda output, mesh: None)
    for p in model.parameters():
        for value in (optimizer.state.get(p, {}) if optimizer is not None else {}).values():
            if torch.is_tensor(value) and value.device.type == "xla" and value.shape == p.shape:
                torch_xla._XLAC._xla_clear_sharding(value)
                torch_xla._XLAC._xla_mark_sharding(value, torch_xla._XLAC._get_xla_op_sharding(p))
    return wrapped


def loader(batches, device, mesh, expected: int | None = None):
    """(x, y) on the device, from an iterable of CPU batches, through torch-xla's ParallelLoader.

    Background threads move the next batches to the device while it computes; on a mesh each
    batch is placed sharded along its first (batch) dimension. The items are taken with
    ``next_item`` rather than through MpDeviceLoader's iterator, which marks a step every
    ``batches_per_execution`` batches by itself and would cut a step of several micro-batches
    in two: the program marks its steps itself (``torch_xla.sync()`` after the optimizer step).
    ``expected``: how many batches there are; fewer (the loader's thread failed) is a RunError, not a bare StopIteration.
    """
    sharding = {"input_sharding": xs.ShardingSpec(mesh, (MESH_AXIS, None))} if mesh is not None else {}
    feeder = parallel_loader.ParallelLoader(batches, [device], **sharding)
    given = 0
    try:
        while True:
            item = feeder.next_item(device)
            if item is None:  # the batches are exhausted, or their thread failed (its error is printed above)
                if expected is not None and given < expected:
                    raise RunError(f"the batches stopped after {given:,} of {expected:,}: the loader's thread failed "
                                   "(its error is above)", "fix what it says (often the data), then continue with --resume")
                return
            given += 1
            yield item
    finally:
        feeder.close()


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of an XLA tensor; a sharded one is assembled from its local shards (no XLA program is compiled)."""
    t = t.detach()
    if t.device.type != "xla" or not torch_xla._XLAC._get_xla_sharding_spec(t):
        return t.cpu()
    xm.wait_device_ops()  # the shards are read as they are: the step that computes them must have finished
    shards = torch_xla._XLAC._get_local_shards([t])[0]
    places = torch_xla._XLAC._get_local_shard_replica_and_indices([t])[0]
    out = torch.empty(t.shape, dtype=t.dtype)
    for (data, _), (_, indices) in zip(shards, places):
        if indices is Ellipsis:  # replicated: any shard is the whole tensor
            return data.cpu()
        piece = data.cpu()[tuple(slice(0, s.stop - s.start) for s in indices)]  # a shard may be padded
        out[tuple(indices)] = piece
    return out


def host_state(model: torch.nn.Module) -> dict:
    """``model.state_dict()`` as CPU tensors (a tied head included, as load_state_dict expects)."""
    torch_xla.sync(wait=True)
    return {k: host_copy(v) for k, v in model.state_dict().items()}


def save(run: Run, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: int = 2) -> None:
    """A checkpoint in malt's format (the same files as on cpu and cuda), written from CPU copies."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    torch_xla.sync(wait=True)  # the step's results are on the device before they are read
    tensors = {k: host_copy(v).contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and checkpoint._tied(model))}  # a tied head is stored once
    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))  # keyed by name
    opt_tensors, plain = {}, {}
    for name, st in osd.get("state", {}).items():
        for key, value in st.items():
            if torch.is_tensor(value):
                opt_tensors[f"{name}::{key}"] = host_copy(value).contiguous()
            else:
                plain[f"{name}::{key}"] = value
    states = [(k, v) for k, v in opt_tensors.items() if not k.endswith("::step") and v.is_floating_point()]
    checkpoint.stop_if_not_finite(run, step, tensors.items(), states)  # host copies: one process holds the whole model
    checkpoint._write(run, step, tensors, opt_tensors, {"param_groups": osd.get("param_groups", []), "plain_state": plain},
                      keep, {"elapsed_s": round(run.elapsed(), 3)})


def compiled_graphs() -> int:
    """Graphs XLA has compiled in this process (torch_xla.debug.metrics CompileTime): flat after the first steps."""
    data = metrics.metric_data("CompileTime")
    return int(data[0]) if data else 0
