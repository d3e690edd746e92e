"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically.

Layout: ``RUN/checkpoints/step_00000200/{model.safetensors, optimizer.safetensors,
state.json}`` and ``RUN/checkpoints/latest`` naming the newest complete one. A
checkpoint is written into a temporary directory, synced, then renamed into
place, so a kill at any moment leaves either the old or the new checkpoint,
never half of one.

Sharded checkpoints (format 3, for FSDP2/HSDP runs) hold ``dcp/`` instead of the
two safetensors files: every process writes its own shards of the model and
AdamW state with torch.distributed.checkpoint (DCP), keyed by parameter name
with each tensor's global shape, so they load onto another number of processes
(DCP reshards) or into one unsharded model (``malt export``, ``malt sample``).
They are written the same way: into a temporary directory, renamed by the main
process once every process has finished, and ``state.json`` is written last.

A checkpoint may be written in the background (``save(..., background=True)``, the plan's
``checkpoint_writes``): the step's tensors are copied to host memory while training waits, then a
thread writes, syncs and renames them while training goes on (sharded: every process its own shards). One checkpoint is in flight at a time;
``wait()`` blocks until it is in place (the next save, the end of the run, a stop, an error all wait),
so a checkpoint is never reported saved, pruned or pointed at by ``latest`` before it is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file

from .run import Run, RunError
from .run import barrier as _barrier

FORMAT = 2  # 2: tensors keyed by parameter name (full, unsharded), optimizer state by parameter name
FORMAT_SHARDED = 3  # 3: model and optimizer state written by every process with torch.distributed.checkpoint (dcp/)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError):  # unreadable, or not UTF-8 (damaged)
        return None


NAME = re.compile(r"step_(\d{8,})")  # a checkpoint's folder; any other name in checkpoints/ is not malt's to read or prune


def checkpoint_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder named as a checkpoint in ``run_dir``/checkpoints, oldest first, complete or not."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted((int(m[1]), p) for p in ck.iterdir() if (m := NAME.fullmatch(p.name)) and p.is_dir())


def damaged(run_dir: Path) -> list[Path]:
    """Checkpoint folders without state.json, which malt writes into every checkpoint before it is renamed into place:
    a partial copy of a run, or a file deleted by hand. Training would skip them and might write over them."""
    return [p for _, p in checkpoint_dirs(run_dir) if not (p / "state.json").is_file()]


def latest(run_dir: Path):
    """(step, path) of the newest complete checkpoint, or None."""
    ck = Path(run_dir) / "checkpoints"
    name = (_read_text(ck / "latest") or "").strip()
    m = NAME.fullmatch(name)
    if m and (ck / name / "state.json").is_file():
        return int(m[1]), ck / name
    found = [(step, p) for step, p in checkpoint_dirs(run_dir) if (p / "state.json").is_file()]
    return found[-1] if found else None


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def _model_tensors(model: torch.nn.Module) -> dict:
    """The full (unsharded) model state on the CPU, keyed by parameter name; a tied head is stored once."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_options())
    seen, out = {}, {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen or (k == "lm_head.weight" and _tied(model)):
            continue
        seen[key] = k
        out[k] = v.contiguous()
    return out


def _tied(model) -> bool:
    m = getattr(model, "module", model)
    return hasattr(m, "lm_head") and m.lm_head.weight is m.embed_tokens.weight


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """The full optimizer state keyed by parameter name (world-size independent): tensors and JSON metadata."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_options())  # gathered on the main process only
    tensors, plain = {}, {}
    for name, st in osd.get("state", {}).items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{name}::{key}"] = value
    return tensors, {"param_groups": osd.get("param_groups", []), "plain_state": plain}


class _Writer:
    """The checkpoint being written in the background: at most one. ``done`` is set by the thread when it ends:
    Thread.join() cannot tell, once a signal handler raised inside it (CPython 3.11 then marks a running thread
    as stopped), and Event.wait() can be interrupted safely."""

    thread: threading.Thread | None = None
    step: int | None = None
    error: BaseException | None = None
    done: threading.Event = threading.Event()


_WRITER = _Writer()


def writing() -> int | None:
    """The step of the checkpoint being written in the background, or None."""
    return _WRITER.step if _WRITER.thread is not None and not _WRITER.done.is_set() else None


def wait(raise_error: bool = True) -> None:
    """Block until the checkpoint being written in the background (if any) is in place. Its error, such as a full
    disk (a RunError; the unfinished checkpoint is removed and the older ones stay), is raised here."""
    if _WRITER.thread is None:
        return
    _WRITER.done.wait()
    _WRITER.thread.join()  # it has ended: only its last instructions are left
    error, _WRITER.thread, _WRITER.step, _WRITER.error = _WRITER.error, None, None, None
    if error is not None and raise_error:
        raise error


def _in_background(write, *args) -> None:
    try:
        write(*args)
    except BaseException as e:  # noqa: BLE001  (raised in the training thread by wait())
        _WRITER.error = e
    finally:
        _WRITER.done.set()


def _start_writer(step: int, write, *args) -> None:
    _WRITER.step, _WRITER.error = step, None
    _WRITER.done.clear()
    _WRITER.thread = threading.Thread(target=_in_background, name=f"checkpoint-{step}", daemon=True, args=(write, *args))
    _WRITER.thread.start()


def _own_copies(staged: dict, live) -> dict:
    """``staged`` with every tensor that shares storage with a ``live`` one (what training goes on changing) cloned:
    on a CPU the state dicts hold the parameters and moments themselves; on a GPU, state kept on the host (GaLore's
    step counters) is passed through as well."""
    shared = {t.untyped_storage().data_ptr() for t in live if t.device.type == "cpu" and t.numel()}
    return {k: v.clone() if v.numel() and v.untyped_storage().data_ptr() in shared else v for k, v in staged.items()}


def _live_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    for t in [*model.parameters(), *model.buffers(),
              *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))]:
        yield t.to_local() if hasattr(t, "to_local") else t


def save(run: Run, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: int = 2, extra: dict | None = None,
         fmt: str = "full", background: bool = False) -> Path:
    """Write a checkpoint of ``model`` (the unwrapped module; sharded or not) and ``optimizer``.

    Every process must call it (gathering a sharded model is collective). ``fmt`` "full": the main
    process writes whole tensors; "sharded": every process writes its shards (torch.distributed.checkpoint).
    ``background``: copy the tensors to host memory and return; a thread writes them (see wait()). Sharded, every
    process copies its shards into host buffers kept from one checkpoint to the next, and its thread writes them with
    DCP over a process group of its own (the training's collectives go on beside it on the default one).
    """
    wait()  # one checkpoint in flight at a time, in step order
    stop_if_not_finite(run, step, model.named_parameters(), optimizer_state(model, optimizer))
    extra = {**(extra or {}), "elapsed_s": round(run.elapsed(), 3)}
    if fmt == "sharded":
        return _save_sharded(run, step, model, optimizer, keep, extra, background)
    tensors = _model_tensors(model)
    opt_tensors, meta = _optimizer_tensors(model, optimizer)
    final = run.checkpoints / f"step_{step:08d}"
    if getattr(run, "is_main", True):
        rng = _rng_state()  # now: training goes on drawing from the generators while the thread writes
        if background:
            live = list(_live_tensors(model, optimizer))
            if all(t.device.type == "cpu" for t in live):  # the state dicts hold the live tensors: copy all of them
                tensors, opt_tensors = _staged([tensors, opt_tensors])
            else:  # on a GPU they are host copies already, except state kept on the host (GaLore's step counters)
                tensors, opt_tensors = _own_copies(tensors, live), _own_copies(opt_tensors, live)
            _start_writer(step, _write, run, step, tensors, opt_tensors, meta, keep, extra, rng)
        else:
            _write(run, step, tensors, opt_tensors, meta, keep, extra, rng)
    _barrier()
    return final


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """(``name::key``, tensor) for the optimizer's floating-point state on this process (its shards under FSDP2):
    AdamW's moments, GaLore's projectors; step counters left out."""
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    yield f"{names.get(id(p), '?')}::{key}", value


def stop_if_not_finite(run: Run, step: int, named_tensors, named_states=()) -> None:
    """Never write a checkpoint from weights or optimizer state that hold nan or inf (a diverged run): stop the run
    instead, so the newest checkpoint stays the last good one. The state matters on its own: without gradient
    clipping a gradient above about 1.8e19 squares to inf in AdamW's exp_avg_sq, whose updates are then 0, so the
    weights stay finite while that tensor never trains again."""
    what = not_finite(named_tensors, named_states)
    if what:
        raise run.diverged(step, what + ", so this step's checkpoint was not written")


def not_finite(named_tensors, named_states=()) -> str | None:
    """Which weight and optimizer-state tensors hold nan or inf, in words, or None. Each process checks its own shards
    on its device; one all-reduce makes every process see every shard's result (every process must call it)."""
    from .distributed import reduce_sum

    names, tensors, count = [], [], {"weight": 0, "state": 0}
    for kind, pairs in (("weight", named_tensors), ("state", named_states)):
        for name, t in pairs:
            local = t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 parameter or its state: this process's shard
            count[kind] += 1
            names.append((kind, name))
            tensors.append(local.detach())
    if not tensors:
        return None
    # the largest magnitude of each tensor: nan if it holds a nan, inf if an inf (one pass, no copy of the tensor);
    # an empty shard (FSDP2 on many processes) holds nothing, but keeps its place: every process reduces as many flags
    full = [t for t in tensors if t.numel()]
    largest = iter(torch._foreach_norm(full, float("inf")) if full else [])
    flags = [next(largest).isfinite().logical_not() if t.numel() else torch.zeros((), dtype=torch.bool, device=t.device)
             for t in tensors]
    counts = reduce_sum(torch.stack(flags).to(torch.int32)).tolist()
    weights = [n for (kind, n), c in zip(names, counts) if c and kind == "weight"]
    states = [n for (kind, n), c in zip(names, counts) if c and kind == "state"]

    def shown(bad):
        return ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")

    what = []
    if weights:
        what.append(f"{len(weights)} of the model's {count['weight']} weight tensors hold nan or inf ({shown(weights)})")
    if states:
        what.append(f"{len(states)} of the optimizer's {count['state']} state tensors hold nan or inf ({shown(states)})")
    return " and ".join(what) or None


@contextmanager
def _one_process_is_fine():
    """DCP warns when it runs without a process group (one process, as intended here): silence that warning only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class _Staging:
    """What checkpoints written in the background keep for the whole run, made at the first one: the host buffers the
    tensors are copied into, reused at the next checkpoint (no new host memory, and no page faults to touch it, at
    each one): every process's shards, sharded; the whole state on a CPU, full. And, sharded, a gloo process group of
    all processes for DCP's collectives in the writer thread (collectives of two threads on one group would interleave
    differently on each process)."""

    group = None
    buffers: dict = {}


def _host_copies(value, buffers: dict, kept: dict, key: str = ""):
    """``value`` (a state dict: dicts and lists of tensors, DTensors and plain values) with every tensor copied into a
    host buffer: the one in ``buffers`` under the same key where shape and dtype match, else a new one; ``kept`` gets
    the buffers used. A DTensor keeps its mesh and placements around the host copy of its local shard."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, dict):
        return {k: _host_copies(v, buffers, kept, f"{key}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copies(v, buffers, kept, f"{key}/{i}") for i, v in enumerate(value))
    if not torch.is_tensor(value):
        return value  # numbers, strings, None: immutable
    old = buffers.get(key)
    if isinstance(value, DTensor):  # DCP reads its mesh, placements and global shape, and writes its local shard
        if (isinstance(old, DTensor) and old.shape == value.shape and old.dtype == value.dtype
                and old.placements == value.placements and old.to_local().shape == value.to_local().shape):
            old.to_local().copy_(value.to_local().detach())  # to_local() is a view of the kept host shard
        else:  # a DTensor whose local shard is a host copy (from_local would move it back to the mesh's device)
            old = value.detach().to("cpu", copy=True)
    elif old is None or isinstance(old, DTensor) or old.shape != value.shape or old.dtype != value.dtype:
        old = value.detach().to("cpu", copy=True)
    else:
        old.copy_(value.detach())
    kept[key] = old
    return old


def _staged(value):
    """``value`` with its tensors copied into the host buffers kept from the last checkpoint (_host_copies)."""
    kept = {}
    staged = _host_copies(value, _Staging.buffers, kept)
    _Staging.buffers = kept
    return staged


def _staged_for_background(state: dict):
    """Host copies of this process's shards (``state``: DCP's state dicts) and the process group to write them over."""
    import torch.distributed as dist

    if _Staging.group is None and dist.is_available() and dist.is_initialized():
        try:
            _Staging.group = dist.new_group(backend="gloo")  # every process saves at the same step: they all make it
        except RuntimeError as e:
            raise RunError(f"cannot connect the processes for a checkpoint written in the background (a gloo process "
                           f"group): {e}", "set GLOO_SOCKET_IFNAME to the network interface the nodes reach each other "
                           "on, or write checkpoints in the foreground: train.checkpoint_writes: foreground") from None
    return _staged(state), _Staging.group


def _save_sharded(run: Run, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: int,
                  extra: dict | None, background: bool = False) -> Path:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"step_{step:08d}"
    tmp = run.checkpoints / f".tmp-{name}-sharded"  # one name every process (on every node) agrees on
    main = getattr(run, "is_main", True)
    if main:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run killed while saving
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)  # this process's shards, keyed by parameter name
    state = {"model": model_sd, "optimizer": optim_sd}
    if background:
        staged, group = _staged_for_background(state)  # host copies of this step's shards: training goes on changing them
        _start_writer(step, _write_sharded, run, step, tmp, staged, group, keep, extra, _rng_state() if main else None)
        return run.checkpoints / name
    _write_sharded(run, step, tmp, state, None, keep, extra, None, foreground=True)
    _barrier()
    return run.checkpoints / name


def _write_sharded(run: Run, step: int, tmp: Path, state: dict, group, keep: int, extra: dict | None,
                   rng: dict | None, foreground: bool = False) -> None:
    """Every process writes its shards into ``tmp``/dcp, DCP's collectives over ``group`` (None: the default one);
    DCP's last collective has the first process write .metadata once every process's files are written and synced,
    so its dcp.save returns after all of them. Then the first process finishes the checkpoint."""
    import torch.distributed.checkpoint as dcp

    with _one_process_is_fine(), _unfinished(tmp, step):
        dcp.save(state, checkpoint_id=str(tmp / "dcp"), **({"process_group": group} if group is not None else {}))
    if foreground:
        _barrier()
    if getattr(run, "is_main", True):
        with _unfinished(tmp, step):
            _finish(run, step, tmp, {"optimizer": {"layout": "dcp"}}, keep, extra, FORMAT_SHARDED, rng)


def _write(run: Run, step: int, tensors: dict, opt_tensors: dict, meta: dict, keep: int, extra: dict | None,
           rng: dict | None = None) -> None:
    ck = run.checkpoints
    ck.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = ck / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with _unfinished(tmp, step):
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        _finish(run, step, tmp, {"optimizer": meta}, keep, extra, FORMAT, rng)


@contextmanager
def _unfinished(tmp: Path, step: int):
    """A checkpoint being written in ``tmp``: if writing fails or is interrupted, remove it (the checkpoints already
    written stay complete) and say why in words, for a full disk or any other OS error."""
    try:
        yield
    except BaseException as e:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        from_dcp = type(e).__name__ == "CheckpointException"
        e = _dcp_cause(e)  # a sharded save: DCP wraps each process's own error
        # safetensors reports I/O errors as its own; inside DCP, torch.save reports a full disk as a RuntimeError
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError" or (from_dcp and isinstance(e, RuntimeError)):
            raise RunError(f"cannot write the checkpoint of step {step:,} in {tmp.parent}: {e}",
                           "free disk space (or lower train.keep_checkpoints); the checkpoints already written are complete: "
                           "continue with --resume") from None
        raise


def _dcp_cause(e: BaseException) -> BaseException:
    """The first process's own error inside torch.distributed.checkpoint's CheckpointException, else ``e``."""
    if type(e).__name__ == "CheckpointException" and getattr(e, "failures", None):
        cause = next(iter(e.failures.values()))
        return cause[0] if isinstance(cause, tuple) else cause
    return e


@contextmanager
def _dcp_quiet():
    """DCP logs a traceback per file it cannot read before raising; the RunError says it once."""
    import logging

    # DCP's loader also logs its tracebacks through the root logger
    logs = [logging.getLogger(name) for name in ("torch.distributed.checkpoint", "c10d-NullHandler-dcp_logger", "")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for log, level in zip(logs, levels):
            log.setLevel(level)


def remove_unfinished(run: Run) -> None:
    """Remove the temporary folders of checkpoints whose writing was killed (SIGKILL, power loss): a run that
    holds the run directory's lock (Run.acquire) is the only writer, so anything unfinished is dead."""
    if not run.checkpoints.is_dir():
        return
    for d in (sorted(run.checkpoints.glob(".tmp-step_*")) + sorted(run.checkpoints.glob(".old-step_*"))
              + sorted(run.checkpoints.glob(".pruned-step_*"))):
        if not d.is_dir():
            continue
        m = re.fullmatch(r"\.(?:tmp|old)-(step_\d{8,})-.+", d.name)
        if m and (d / "state.json").is_file() and not (run.checkpoints / m[1]).exists():
            # complete (state.json is written last) but not in place: killed between replacing a checkpoint of the same
            # step (_finish: the old one aside, then the new one in) or before the rename: keep it, the newer first
            os.rename(d, run.checkpoints / m[1])
            continue
        shutil.rmtree(d, ignore_errors=True)


def _rng_state() -> dict:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _finish(run: Run, step: int, tmp: Path, fields: dict, keep: int, extra: dict | None, fmt: int,
            rng: dict | None = None) -> None:
    """Add the RNG state (``rng``: as taken at the step; None: now) and state.json to the checkpoint in ``tmp``,
    sync it, rename it into place, point latest at it."""
    ck = run.checkpoints
    name = f"step_{step:08d}"
    save_file(rng if rng is not None else _rng_state(), str(tmp / "rng.safetensors"))
    state = {
        "format": fmt,
        "step": step,
        "name": run.name,
        "recipe_hash": run.recipe_hash,
        "world_size": getattr(run, "world_size", 1),
        "data": {"sampler": "stateless", "next_step": step},  # batches are a pure function of (seed, step, index)
        **({"tokenizer_sha256": run.tokenizer_sha256} if getattr(run, "tokenizer_sha256", None) else {}),  # token → id
        **fields,
        "recipe": _read_text(run.dir / "recipe.lock.yaml"),  # the resolved recipe that produced this checkpoint
        **(extra or {}),
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        if f.is_file():
            _fsync_file(f)
    if (tmp / "dcp").is_dir():
        _fsync_dir(tmp / "dcp")
    _fsync_dir(tmp)
    final = ck / name
    if final.exists():  # the same step written again (a resumed run repeating its last save)
        trash = ck / f".old-{name}-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, final)
    _fsync_dir(ck)
    _atomic_text(ck / "latest", name + "\n")
    # prune: keep the newest `keep` complete checkpoints (folders of other names, or without state.json, are not malt's)
    done = [p for _, p in checkpoint_dirs(run.dir) if (p / "state.json").is_file()]
    for old in done[:-keep]:
        if old != final:  # renamed out of the checkpoints' names first: a kill mid-delete leaves no half checkpoint
            gone = ck / f".pruned-{old.name}-{os.getpid()}"
            os.rename(old, gone)
            shutil.rmtree(gone, ignore_errors=True)


def _set_model(model: torch.nn.Module, tensors: dict, source) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if _tied(model) and "lm_head.weight" not in tensors and "embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    try:
        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = " ".join(lines[:2])[:400]  # torch's first line is a heading; the second names the tensor that differs
        raise RunError(f"checkpoint {source} does not fit this model: {detail}",
                       "resume with the recipe that wrote it (same model shape)")


def _way_out(path: Path) -> str:
    """The hint for a damaged checkpoint ``path``: the one before it, if the run has one."""
    older = [step for step, p in checkpoint_dirs(Path(path).parent.parent) if p != Path(path) and (p / "state.json").is_file()]
    return (f"remove that checkpoint folder (or move it out of checkpoints/): resume, export and sample then read step "
            f"{older[-1]:,}, the one before" if older else "remove that checkpoint folder (or move it out of checkpoints/); "
            "no older one is left: the run trains again from step 0")


def read_state(path: Path) -> dict:
    """A checkpoint's state.json, or a RunError that says it is corrupt."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (ValueError, OSError) as e:
        raise RunError(f"checkpoint {path / 'state.json'} is corrupt: {e}", _way_out(path))
    missing = [k for k in ("format", "step", "recipe_hash", "optimizer") if k not in state] if isinstance(state, dict) else ["all"]
    if missing:
        raise RunError(f"checkpoint {path / 'state.json'} is corrupt: it lacks {', '.join(missing)}",
                       _way_out(path))
    opt = state["optimizer"]
    if not isinstance(opt, dict) or (opt.get("layout") != "dcp" and not (
            isinstance(opt.get("param_groups"), list) and all(isinstance(g, dict) for g in opt["param_groups"])
            and isinstance(opt.get("plain_state"), dict))):
        raise RunError(f"checkpoint {path / 'state.json'} is corrupt: its optimizer entry is not what malt writes",
                       _way_out(path))
    return state


def restore(run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Load the newest checkpoint of ``run`` into model and optimizer (on every process); returns its step.

    Checkpoints hold full tensors keyed by name, so a run may resume on another number of processes.
    """
    found = latest(run.dir)
    if found is None:
        return 0
    step, path = found
    state = read_state(path)
    if state.get("format") not in (FORMAT, FORMAT_SHARDED):
        raise RunError(f"checkpoint {path} has format {state.get('format')!r}, this malt reads formats {FORMAT} and {FORMAT_SHARDED}",
                       "resume it with the malt version that wrote it")
    if state.get("recipe_hash") != run.recipe_hash:
        raise RunError(f"checkpoint {path} was written by a different version of the recipe "
                       f"(hash {str(state.get('recipe_hash'))[:12]}, now {run.recipe_hash[:12]})",
                       "resume with the recipe that started the run, or start a new run in another directory")
    if state["format"] == FORMAT_SHARDED:
        _load_sharded(path, model, optimizer)
        if optimizer is not None:
            _load_rng(path)
        _refuse_not_finite(path, model, optimizer)
        return step
    try:
        tensors = load_file(str(path / "model.safetensors"))
        if optimizer is not None:
            opt_tensors = load_file(str(path / "optimizer.safetensors"))
            rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RunError(f"checkpoint {path} cannot be read: {e}", _way_out(path))
    _set_model(model, tensors, path)
    if optimizer is not None:
        _load_optimizer(model, optimizer, state, opt_tensors)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    _refuse_not_finite(path, model, optimizer)
    return step


def _refuse_not_finite(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """A checkpoint malt wrote holds finite weights and optimizer state (save checks them): nan or inf in one that is
    read back means its files were damaged since (disk, copy). Every process checks its shards (one all-reduce)."""
    what = not_finite(model.named_parameters(), optimizer_state(model, optimizer) if optimizer is not None else ())
    if what:
        raise RunError(f"checkpoint {path} is damaged: {what} (malt never writes such a checkpoint: its files changed "
                       "since)", _way_out(path))


def _load_rng(path: Path) -> None:
    try:
        rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RunError(f"checkpoint {path} cannot be read: {e}", _way_out(path))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def state_of(path: Path) -> dict | None:
    """A checkpoint's state.json, or None if it cannot be read as one (read_state says why)."""
    try:
        state = json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint directory ``path`` is a sharded (DCP) one."""
    return (state_of(path) or {}).get("format") == FORMAT_SHARDED


def _load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a sharded (DCP) checkpoint into ``model`` (sharded or not, on any number of processes) and ``optimizer``.

    DCP reads, for each tensor this process holds, the slice of the saved global tensor it covers,
    whatever number of processes wrote it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict

    try:
        if optimizer is None:
            state = {"model": get_model_state_dict(model)}
            with _one_process_is_fine(), _dcp_quiet():
                dcp.load(state, checkpoint_id=str(path / "dcp"))
            set_model_state_dict(model, state["model"])
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)  # this process's layout, filled in place by dcp.load
            state = {"model": model_sd, "optimizer": optim_sd}
            with _one_process_is_fine(), _dcp_quiet():
                dcp.load(state, checkpoint_id=str(path / "dcp"))
            _keep_implementation(state["optimizer"].get("param_groups") or [], optimizer)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    except (RuntimeError, KeyError, ValueError, OSError, CheckpointException) as e:  # DCP wraps each process's failure
        cause = _dcp_cause(e)
        text = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0][:300] if str(cause).strip() else ''}"
        if isinstance(cause, (OSError, EOFError)) or any(w in text.lower() for w in ("unpickl", "corrupt", "no such file", "metadata")):
            raise RunError(f"sharded checkpoint {path} is corrupt or incomplete ({text})",
                           _way_out(path)) from None
        raise RunError(f"sharded checkpoint {path} cannot be loaded into this model: {text}",
                       "resume with the recipe that wrote it (same model shape), or remove that checkpoint to use an older one") from None


# how an optimizer computes, not what it has learned: the running program's choice (fused AdamW on CPU and CUDA,
# foreach on a TPU), never the one of the program that wrote the checkpoint
IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def _keep_implementation(groups: list, optimizer: torch.optim.Optimizer) -> None:
    """Give saved param_groups the running optimizer's implementation flags (a CPU or CUDA checkpoint resumes on a TPU)."""
    for saved, mine in zip(groups, optimizer.param_groups):
        for key in IMPLEMENTATION:
            if key in mine:
                saved[key] = mine[key]
            else:
                saved.pop(key, None)


def _load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, tensors: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    meta = state["optimizer"]
    opt_state: dict = {}
    for key, value in list(tensors.items()) + list(meta["plain_state"].items()):
        name, field = key.rsplit("::", 1)
        opt_state.setdefault(name, {})[field] = value
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    _keep_implementation(groups, optimizer)
    try:
        set_optimizer_state_dict(model, optimizer, {"state": opt_state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True))
    except (ValueError, KeyError, RuntimeError) as e:
        raise RunError(f"the optimizer state does not fit this model: {str(e).splitlines()[0]}", "use init_from.optimizer: fresh")


def init_from(path: Path, kind: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, log=print,
              tokenizer=None) -> None:
    """Load the weights a new run starts from: a malt run's latest checkpoint or a Hugging Face directory.

    With ``optimizer`` (malt runs only), the checkpoint's AdamW moments come too; the
    learning rate and schedule are the new recipe's. With ``tokenizer`` (the run's), the checkpoint's
    tokenizer.json, where it has one, must give every token the same id: an embedding row belongs to a token.
    """
    path = Path(path)
    if tokenizer is not None and (path / "tokenizer.json").is_file():
        from .tokenizer import differing_tokens

        differ = differing_tokens(path / "tokenizer.json", tokenizer, "init_from: the checkpoint's tokenizer",
                                  "copy it back from a backup of that run (or the model directory it came from)")
        if differ:
            raise RunError(f"init_from: the checkpoint's tokenizer ({path / 'tokenizer.json'}) differs from this run's: "
                           f"{len(differ):,} token(s) have another id or are missing there, e.g. {differ[:5]}; each embedding "
                           "row would start as another token's",
                           f"use the checkpoint's tokenizer: tokenizer: {{kind: file, path: {path.resolve() / 'tokenizer.json'}}} "
                           "(a path relative to the recipe works too)")
    if kind == "malt":
        found = latest(path)
        if found is None:
            raise RunError(f"init_from: no checkpoint in {path}")
        step, ck = found
        if is_sharded(ck):  # DCP loads it into this model (sharded or not) by parameter name
            _load_sharded(ck, model, optimizer)
            n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
            log(f"init_from: {n:,} parameters from {path} (step {step:,}, sharded)"
                + (" with its optimizer state" if optimizer is not None else ""))
            return
        state_dict = _read_tensors(ck / "model.safetensors", "init_from")
        source = f"{path} (step {step:,})"
    else:
        state_dict = _hf_state_dict(path)
        source = str(path)
    own = model.state_dict()
    if "lm_head.weight" not in state_dict and "embed_tokens.weight" in state_dict and "lm_head.weight" in own:
        state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"]  # tied: stored once
    if "embed_tokens.weight" not in state_dict and "lm_head.weight" in state_dict:
        state_dict["embed_tokens.weight"] = state_dict["lm_head.weight"]
    wrong = [f"{k}: {tuple(state_dict[k].shape)} there, {tuple(v.shape)} here" for k, v in own.items()
             if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state_dict]
    if wrong or missing:
        raise RunError(f"init_from {source} does not fit this model: " + "; ".join(wrong + [f"{k} missing" for k in missing][:8]),
                       "make the model section match the checkpoint's shape")
    _set_model(model, {k: state_dict[k] for k in own}, source)
    if optimizer is not None:
        state = read_state(ck)
        _load_optimizer(model, optimizer, state, _read_tensors(ck / "optimizer.safetensors", "init_from"))
    n = sum(v.numel() for k, v in own.items() if not (k == "lm_head.weight" and _tied(model)))
    log(f"init_from: {n:,} parameters from {source}" + (" with its optimizer state" if optimizer is not None else ""))


def _read_tensors(path: Path, what: str) -> dict:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RunError(f"{what}: {path} cannot be read: {e}",
                       "that checkpoint is damaged: start from another run, or from an older checkpoint of it (copy that "
                       "run and remove the damaged checkpoint folder from the copy)") from None


def _hf_state_dict(path: Path) -> dict:
    """A Hugging Face Llama/Mistral/Qwen2 checkpoint's tensors under malt's names (``model.`` prefix removed)."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise RunError(f"init_from: no .safetensors files in {path}")
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    name = key[len("model."):] if key.startswith("model.") else key
                    out[name] = handle.get_tensor(key).float()
        except (SafetensorError, OSError) as e:
            raise RunError(f"init_from: {f} cannot be read: {e}")
    return out


def load_weights(run_dir: Path, model: torch.nn.Module) -> int:
    """Load the newest checkpoint's weights into ``model`` (for sampling and export); returns its step."""
    found = latest(run_dir)
    if found is None:
        raise RunError(f"no checkpoint in {run_dir}", "train it first with `malt run RECIPE`")
    step, path = found
    if is_sharded(path):  # consolidated into this one unsharded model
        _load_sharded(path, model, None)
    else:
        try:
            load_model(model, str(path / "model.safetensors"))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise RunError(f"checkpoint {path / 'model.safetensors'} cannot be read: {e}", _way_out(path))
    _refuse_not_finite(path, model, None)  # export and sample: never a model that computes nan
    return step
