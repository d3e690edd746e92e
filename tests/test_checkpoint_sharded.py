"""Sharded checkpoints (format 3, torch.distributed.checkpoint) in one process: round trip, atomicity, consolidation.

The multi-process cases (2 processes -> 1, 1 -> 2, export of a sharded run) are in tests/test_targets.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from malt.runtime import checkpoint
from malt.runtime.run import Run, RunError
from torch import nn

from .helpers import hold_writes


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(11, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.lm_head = nn.Linear(8, 11, bias=False)

    def forward(self, x):
        h = self.embed_tokens(x)
        for layer in self.layers:
            h = layer(h).relu()
        return self.lm_head(h)


def trained(seed=0, steps=2):
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.arange(6).view(2, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def make_run(tmp_path):
    return Run(tmp_path, "t", "hash", resume=True, quiet=True)


def test_sharded_round_trip(tmp_path):
    run = make_run(tmp_path)
    model, opt = trained()
    path = checkpoint.save(run, 2, model, opt, fmt="sharded")
    state = json.loads((path / "state.json").read_text())
    assert state["format"] == checkpoint.FORMAT_SHARDED == 3
    assert (path / "dcp" / ".metadata").is_file() and not (path / "model.safetensors").exists()
    fresh, fresh_opt = trained(seed=1, steps=1)
    assert checkpoint.restore(run, fresh, fresh_opt) == 2
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    for p, q in zip(model.parameters(), fresh.parameters()):
        sa, sb = opt.state[p], fresh_opt.state[q]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert float(sa["step"]) == float(sb["step"]) == 2
    # malt sample / export: the weights alone, into an unsharded model
    other, _ = trained(seed=2, steps=0)
    assert checkpoint.load_weights(tmp_path, other) == 2
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_a_failed_sharded_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    run = make_run(tmp_path)
    model, opt = trained()
    checkpoint.save(run, 2, model, opt, fmt="sharded")
    real = dcp.save

    def dies_half_way(state, checkpoint_id, **kw):
        real({"model": state["model"]}, checkpoint_id=checkpoint_id)  # some shards on disk, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(run, 4, model, opt, fmt="sharded")
    assert checkpoint.latest(tmp_path)[0] == 2
    assert not (tmp_path / "checkpoints" / "step_00000004").exists()
    monkeypatch.setattr(dcp, "save", real)
    checkpoint.save(run, 4, model, opt, fmt="sharded")  # the leftover temporary directory is replaced
    assert checkpoint.latest(tmp_path)[0] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000004"]


def test_full_and_sharded_checkpoints_resume_each_other(tmp_path):
    model, opt = trained()
    run = make_run(tmp_path / "a")
    checkpoint.save(run, 2, model, opt)  # format 2 stays readable
    a, a_opt = trained(seed=3, steps=1)
    checkpoint.restore(run, a, a_opt)
    run_b = make_run(tmp_path / "b")
    checkpoint.save(run_b, 2, a, a_opt, fmt="sharded")
    b, b_opt = trained(seed=4, steps=1)
    checkpoint.restore(run_b, b, b_opt)
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), b.state_dict().values()))


def test_a_sharded_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    run = make_run(tmp_path)
    model, opt = trained()
    checkpoint.save(run, 2, model, opt, fmt="sharded")
    wider = Tiny()
    wider.layers[0] = nn.Linear(8, 16)
    wider.layers[1] = nn.Linear(16, 8)
    with pytest.raises(RunError, match="cannot be loaded into this model"):
        checkpoint.restore(run, wider, torch.optim.AdamW(wider.parameters()))


def test_init_from_a_sharded_run(tmp_path):
    run = make_run(tmp_path)
    model, opt = trained()
    checkpoint.save(run, 2, model, opt, fmt="sharded")
    fresh, fresh_opt = trained(seed=5, steps=0)
    logged = []
    checkpoint.init_from(tmp_path, "malt", fresh, fresh_opt, log=logged.append)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    p0, q0 = next(iter(model.parameters())), next(iter(fresh.parameters()))
    assert torch.equal(opt.state[p0]["exp_avg"], fresh_opt.state[q0]["exp_avg"])
    assert logged and "sharded" in logged[0] and "with its optimizer state" in logged[0]


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_a_resumed_optimizer_keeps_its_own_implementation(tmp_path, fmt):
    """A CPU or CUDA run saves fused AdamW's param_groups ("fused": True); the TPU program runs foreach AdamW, on which
    a fused flag fails (torch-xla's functionalization). Resuming takes the state, and keeps the running optimizer's kind."""
    torch.manual_seed(0)
    model = Tiny()
    fused = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(torch.arange(6).view(2, 3)).sum().backward()
    fused.step()
    run = make_run(tmp_path)
    checkpoint.save(run, 1, model, fused, fmt=fmt)
    other = Tiny()
    foreach = torch.optim.AdamW(other.parameters(), lr=1e-2, foreach=True)
    assert checkpoint.restore(run, other, foreach) == 1
    group = foreach.param_groups[0]
    assert group["foreach"] is True and not group.get("fused")
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(fused.state[p]["exp_avg"], foreach.state[q]["exp_avg"])
    other(torch.arange(6).view(2, 3)).sum().backward()
    foreach.step()                                             # and it steps as foreach


@pytest.mark.parametrize("damage", ["truncated shard", "no metadata"])
def test_a_damaged_sharded_checkpoint_says_so(tmp_path, damage):
    """A truncated .distcp file or a lost .metadata: 'corrupt or incomplete' with the way out, not 'another shape'."""
    run = make_run(tmp_path)
    model, opt = trained()
    path = checkpoint.save(run, 2, model, opt, fmt="sharded")
    if damage == "truncated shard":
        shard = next((path / "dcp").glob("*.distcp"))
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        (path / "dcp" / ".metadata").unlink()
    fresh, fresh_opt = trained(seed=3, steps=0)
    with pytest.raises(RunError) as info:
        checkpoint.restore(run, fresh, fresh_opt)
    assert "is corrupt or incomplete" in info.value.message and "remove that checkpoint folder" in info.value.hint


def test_a_full_disk_during_a_sharded_save_is_a_clear_error(tmp_path, monkeypatch):
    """DCP wraps the OSError of each process in a CheckpointException: the run says what the full format says."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    run = make_run(tmp_path)
    model, opt = trained()

    def full_disk(state, checkpoint_id, **kw):
        raise CheckpointException("save", {0: (OSError(28, "No space left on device"), None)})

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(RunError, match="cannot write the checkpoint of step 2 .*No space left on device") as info:
        checkpoint.save(run, 2, model, opt, fmt="sharded")
    assert "free disk space" in info.value.hint
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]


@pytest.fixture
def held_dcp(monkeypatch):
    """DCP's save blocked until the test lets it go: a sharded checkpoint caught in flight in its writer thread."""
    import torch.distributed.checkpoint as dcp

    yield from hold_writes(monkeypatch, dcp, "save")


def test_a_sharded_checkpoint_written_in_the_background_is_its_steps_state(tmp_path, held_dcp):
    """The shards are copied to host buffers at the step (kept and reused at the next checkpoint): training goes on
    changing the weights, moments and RNG while the thread writes, and the checkpoint holds the step's; it appears
    (latest) only once complete."""
    run = make_run(tmp_path)
    model, opt = trained()
    states, buffers = {}, {}
    for step in (2, 4):
        want = {k: v.clone() for k, v in model.state_dict().items()}
        moments = [opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
        rng = torch.get_rng_state()
        held_dcp.clear()
        checkpoint.save(run, step, model, opt, fmt="sharded", background=True)
        assert checkpoint.writing() == step
        model(torch.arange(6).view(2, 3)).sum().backward()  # training goes on
        opt.step()
        opt.zero_grad()
        torch.rand(3)
        assert checkpoint.latest(tmp_path) is None or checkpoint.latest(tmp_path)[0] < step
        held_dcp.set()
        checkpoint.wait()
        assert checkpoint.latest(tmp_path)[0] == step and checkpoint.writing() is None
        states[step] = want, moments, rng
        buffers[step] = {k: getattr(v, "to_local", lambda v=v: v)().data_ptr() for k, v in checkpoint._Staging.buffers.items()}
    assert buffers[4] == buffers[2]  # the second checkpoint was copied into the first one's host buffers
    for step, (want, moments, rng) in states.items():  # ... and both checkpoints are right
        (tmp_path / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
        fresh, fresh_opt = trained(seed=1, steps=1)
        assert checkpoint.restore(run, fresh, fresh_opt) == step
        assert all(torch.equal(want[k], v) for k, v in fresh.state_dict().items())
        assert all(torch.equal(m, fresh_opt.state[p]["exp_avg_sq"]) for m, p in zip(moments, fresh.parameters()))
        assert torch.equal(torch.get_rng_state(), rng)


def test_a_full_disk_during_a_background_sharded_save_is_said_at_the_wait(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    run = make_run(tmp_path)
    model, opt = trained()
    checkpoint.save(run, 2, model, opt, fmt="sharded", background=True)
    checkpoint.wait()

    def full_disk(state, checkpoint_id, **kw):
        raise CheckpointException("save", {0: (OSError(28, "No space left on device"), None)})

    monkeypatch.setattr(dcp, "save", full_disk)
    checkpoint.save(run, 4, model, opt, fmt="sharded", background=True)  # returns: the thread meets the full disk
    with pytest.raises(RunError, match="cannot write the checkpoint of step 4 .*No space left on device"):
        checkpoint.wait()
    assert checkpoint.latest(tmp_path)[0] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000002"]
