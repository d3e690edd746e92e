"""Checkpoints written in the background (checkpoint.save(background=True), the plan's checkpoint_writes): the step's
tensors and RNG state are taken when save() returns, the checkpoint is invisible until it is complete, one is in
flight at a time, a failed write is reported with its step, and an error or a stop lets an in-flight one land."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from malt.compiler.api import plan as make_plan
from malt.compiler.diagnostics import RecipeError
from malt.compiler.plan import Host
from malt.runtime import checkpoint
from malt.runtime.run import Run, RunError, _main_with_messages

from .helpers import hold_writes, write_tiny_recipe


@pytest.fixture
def held(monkeypatch):
    """checkpoint's save_file blocked until the test lets it go: a write caught in flight."""
    yield from hold_writes(monkeypatch, checkpoint, "save_file")


def model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_background_checkpoint_is_the_state_of_its_step_and_appears_only_when_complete(tmp_path, held):
    run = Run(tmp_path / "run", "t", "hash", resume=False, quiet=True)
    model, optimizer = model_and_optimizer()
    held.set()
    checkpoint.save(run, 1, model, optimizer)  # in the foreground: the one before
    held.clear()
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_moment = optimizer.state[model[0].weight]["exp_avg"].clone()
    rng = torch.get_rng_state()
    checkpoint.save(run, 2, model, optimizer, background=True)
    assert checkpoint.writing() == 2
    # training goes on while the thread is held: the weights, moments and the RNG change
    model(torch.ones(3, 4)).sum().backward()
    optimizer.step()
    torch.rand(5)
    assert not torch.equal(model[0].weight, want["0.weight"])
    assert checkpoint.latest(run.dir)[0] == 1  # not visible before it is complete
    assert not (run.checkpoints / "step_00000002").exists()
    held.set()
    checkpoint.wait()
    assert checkpoint.writing() is None and checkpoint.latest(run.dir)[0] == 2
    path = run.checkpoints / "step_00000002"
    got = load_file(path / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(load_file(path / "optimizer.safetensors")["0.weight::exp_avg"], want_moment)
    assert torch.equal(load_file(path / "rng.safetensors")["cpu"], rng)


def test_the_next_save_waits_for_the_one_in_flight(tmp_path, held):
    run = Run(tmp_path / "run", "t", "hash", resume=False, quiet=True)
    model, optimizer = model_and_optimizer()
    checkpoint.save(run, 1, model, optimizer, background=True)
    threading.Timer(0.3, held.set).start()
    checkpoint.save(run, 2, model, optimizer, background=True)  # blocks until step 1 is in place
    assert (run.checkpoints / "step_00000001" / "state.json").is_file()
    checkpoint.wait()
    assert checkpoint.latest(run.dir)[0] == 2


def test_a_failed_background_write_is_reported_with_its_step_and_leaves_the_older_ones(tmp_path, monkeypatch):
    run = Run(tmp_path / "run", "t", "hash", resume=False, quiet=True)
    model, optimizer = model_and_optimizer()
    checkpoint.save(run, 1, model, optimizer, background=True)
    checkpoint.wait()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    checkpoint.save(run, 2, model, optimizer, background=True)  # returns: the error comes with the wait
    with pytest.raises(RunError, match=r"cannot write the checkpoint of step 2 in .*No space left on device"):
        checkpoint.wait()
    assert checkpoint.latest(run.dir)[0] == 1
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["latest", "step_00000001"]
    checkpoint.wait()  # reported once


def test_an_error_during_training_lets_the_checkpoint_in_flight_land_first(tmp_path, held, capsys):
    run = Run(tmp_path / "run", "t", "hash", resume=False, quiet=True)
    model, optimizer = model_and_optimizer()

    def main():
        checkpoint.save(run, 3, model, optimizer, background=True)
        threading.Timer(0.3, held.set).start()
        raise RunError("something else went wrong", "fix it")

    with pytest.raises(SystemExit) as exit_:
        _main_with_messages(main)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.index("waiting for the checkpoint of step 3 to be written") < err.index("error: something else went wrong")
    assert checkpoint.latest(run.dir)[0] == 3


def test_the_plan_writes_full_checkpoints_in_the_background(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r")
    cpu, _ = make_plan(recipe, host=Host())
    assert cpu.checkpoint_writes == "background"
    assert "cpu: a " in next(d.reason for d in cpu.decisions if d.name == "checkpoint_writes")
    h100 = Host(cuda=True, cuda_name="NVIDIA H100 80GB HBM3")
    gpu, _ = make_plan(recipe, ["target.accelerator=cuda"], host=h100)
    assert gpu.checkpoint_writes == "background" and gpu.to_json()["execution"]["checkpoint_writes"] == "background"
    sharded, _ = make_plan(recipe, ["target.accelerator=cuda", "target.devices=2", "target.parallelism=fsdp"], host=h100)
    assert (sharded.checkpoint_format, sharded.checkpoint_writes) == ("sharded", "background")
    assert "every process copies its shards" in next(d.reason for d in sharded.decisions if d.name == "checkpoint_writes")
    cpu_fsdp, _ = make_plan(recipe, ["target.devices=2", "target.parallelism=fsdp"], host=Host())
    assert (cpu_fsdp.checkpoint_format, cpu_fsdp.checkpoint_writes) == ("sharded", "background")
    assert " per process" in next(d.reason for d in cpu_fsdp.decisions if d.name == "checkpoint_writes")
    tpu, _ = make_plan(recipe, ["target.accelerator=tpu", "target.precision=bf16"], host=Host())
    assert tpu.checkpoint_writes == "foreground"
    # on a CPU the copy is host memory: a model whose copy is over 10% of the machine's is saved in the foreground
    big, _ = make_plan(recipe, ["target.memory_per_device=8MiB"], host=Host())
    assert big.checkpoint_writes == "foreground"
    assert "over 10% of the machine's" in next(d.reason for d in big.decisions if d.name == "checkpoint_writes")
    # the recipe may say which (an escape hatch: memory, a host where gloo cannot reach its peers)
    asked, _ = make_plan(recipe, ["train.checkpoint_writes=foreground", "target.accelerator=cuda"], host=h100)
    assert asked.checkpoint_writes == "foreground"
    assert next(d.reason for d in asked.decisions if d.name == "checkpoint_writes") == "train.checkpoint_writes foreground"
    forced, _ = make_plan(recipe, ["target.memory_per_device=8MiB", "train.checkpoint_writes=background"], host=Host())
    assert forced.checkpoint_writes == "background"
    with pytest.raises(RecipeError, match="checkpoints written in the background on a TPU are not built yet"):
        make_plan(recipe, ["target.accelerator=tpu", "target.precision=bf16", "train.checkpoint_writes=background"], host=Host())


def test_a_wait_interrupted_by_a_signal_still_knows_the_write_is_in_flight(tmp_path, held):
    """A stop signal's handler raising inside the wait (a second Ctrl-C): Thread.join() then reports the running
    writer as stopped (CPython 3.11), and the checkpoint was abandoned by the exit. The writer's own done event
    still says it is in flight, so the exit path waits for it (found by a review)."""
    import signal

    run = Run(tmp_path / "run", "t", "hash", resume=False, quiet=True)
    model, optimizer = model_and_optimizer()

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        checkpoint.save(run, 4, model, optimizer, background=True)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert checkpoint.writing() == 4  # still in flight: the write was held all along
    held.set()
    checkpoint.wait()
    assert checkpoint.writing() is None and checkpoint.latest(run.dir)[0] == 4


def test_only_the_tensors_training_goes_on_changing_are_copied():
    """On a GPU the state dicts are host copies already, except state kept on the host (GaLore's step counters):
    those, and everything on a CPU, are cloned; fresh copies pass through as they are."""
    live_counter = torch.zeros(())
    fresh = torch.ones(3)
    weight = torch.nn.Parameter(torch.ones(2, 2))
    staged = checkpoint._own_copies({"counter": live_counter, "fresh": fresh, "weight": weight.detach()},
                                    [live_counter, weight])
    assert staged["fresh"] is fresh
    for name, live in (("counter", live_counter), ("weight", weight)):
        assert staged[name].untyped_storage().data_ptr() != live.untyped_storage().data_ptr()
        assert torch.equal(staged[name], live)
    live_counter += 1  # training goes on
    assert staged["counter"] == 0


@pytest.mark.parametrize("sets", [[], ["target.precision=bf16"], ["target.precision=pure_bf16"]])
def test_the_plans_copy_is_what_a_checkpoint_holds(tmp_path, sets):
    """The CPU rule weighs the bytes a checkpoint's tensors take: the master weights (not autocast's bf16 copies) and
    the optimizer's state, measured on the generated model with its AdamW state."""
    import importlib.util

    from malt.compiler.api import compile_to
    from malt.compiler.passes.choose_checkpoint_format import copy_bytes

    recipe = write_tiny_recipe(tmp_path / "r")
    plan, _ = make_plan(recipe, sets, host=Host())
    compile_to(recipe, tmp_path / "p", sets, host=Host())
    spec = importlib.util.spec_from_file_location("copy_model", tmp_path / "p" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Transformer()
    if plan.master_weights == "bf16":
        model = model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    tensors = checkpoint._model_tensors(model)
    states, _ = checkpoint._optimizer_tensors(model, optimizer)
    held = sum(t.numel() * t.element_size() for t in [*tensors.values(), *states.values()] if t.dim())  # not step counters
    assert copy_bytes(plan) == held
