"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically.

Layout: ``RUN/checkpoints/step_00000200/{model.safetensors, optimizer.safetensors,
state.json}`` and ``RUN/checkpoints/latest`` naming the newest complete one. A
checkpoint is written into a temporary directory, synced, then renamed into
place, so a kill at any moment leaves either the old or the new checkpoint,
never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from .run import Run, RunError

FORMAT = 1


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
    except OSError:
        return None


def latest(run_dir: Path):
    """(step, path) of the newest complete checkpoint, or None."""
    ck = Path(run_dir) / "checkpoints"
    pointer = ck / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        path = ck / name
        if (path / "state.json").is_file():
            return int(name.split("_")[-1]), path
    found = sorted(p for p in ck.glob("step_*") if (p / "state.json").is_file()) if ck.is_dir() else []
    if found:
        return int(found[-1].name.split("_")[-1]), found[-1]
    return None


def _optimizer_tensors(optimizer: torch.optim.Optimizer):
    sd = optimizer.state_dict()
    tensors, plain = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "plain_state": plain}


def save(run: Run, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, keep: int = 2, extra: dict | None = None) -> Path:
    ck = run.checkpoints
    ck.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = ck / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    state = {
        "format": FORMAT,
        "step": step,
        "name": run.name,
        "recipe_hash": run.recipe_hash,
        "data": {"sampler": "stateless", "next_step": step},  # batches are a pure function of (seed, step, index)
        "optimizer": meta,
        "recipe": _read_text(run.dir / "recipe.lock.yaml"),  # the resolved recipe that produced this checkpoint
        **(extra or {}),
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        _fsync_file(f)
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
    # prune: keep the newest `keep` checkpoints
    done = sorted(p for p in ck.glob("step_*") if p.is_dir())
    for old in done[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def restore(run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Load the newest checkpoint of ``run`` into model and optimizer; returns its step."""
    found = latest(run.dir)
    if found is None:
        return 0
    step, path = found
    try:
        state = json.loads((path / "state.json").read_text())
    except ValueError as e:
        raise RunError(f"checkpoint {path / 'state.json'} is corrupt: {e}", "remove that checkpoint directory to resume from an older one")
    if state.get("recipe_hash") != run.recipe_hash:
        raise RunError(f"checkpoint {path} was written by a different version of the recipe "
                       f"(hash {str(state.get('recipe_hash'))[:12]}, now {run.recipe_hash[:12]})",
                       "resume with the recipe that started the run, or start a new run in another directory")
    device = next(model.parameters()).device
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), device=str(device))
        if optimizer is not None:
            tensors = load_file(str(path / "optimizer.safetensors"), device=str(device))
            rng = load_file(str(path / "rng.safetensors"))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RunError(f"checkpoint {path} cannot be read: {e}", "remove that checkpoint directory to resume from an older one")
    if optimizer is not None:
        meta = state["optimizer"]
        opt_state: dict = {}
        for key, value in tensors.items():
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = value
        for key, value in meta["plain_state"].items():
            pid, name = key.split(".", 1)
            opt_state.setdefault(int(pid), {})[name] = value
        groups = meta["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return step


def load_weights(run_dir: Path, model: torch.nn.Module) -> int:
    """Load the newest checkpoint's weights into ``model`` (for sampling and export); returns its step."""
    found = latest(run_dir)
    if found is None:
        raise RunError(f"no checkpoint in {run_dir}", "train it first with `malt run RECIPE`")
    step, path = found
    try:
        load_model(model, str(path / "model.safetensors"))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise RunError(f"checkpoint {path / 'model.safetensors'} cannot be read: {e}")
    return step
