"""Several processes with torch.distributed (gloo on this CPU): DDP and FSDP2 against one process."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from malt.compiler.api import compile_to, plan as make_plan
from malt.compiler.plan import Host
from malt.compiler.render import launch_command

from .helpers import run_env, run_program, write_tiny_recipe
from .test_run import losses, val_losses

pytestmark = pytest.mark.slow


def torchrun(run_dir, cache, *args, world=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(run_dir / "train.py"), "--quiet", *args]
    proc = subprocess.run(cmd, env=run_env(cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    recipe = write_tiny_recipe(tmp / "r", steps=8, eval_every=4, checkpoint_every=4)
    cache = tmp / "cache"
    out = {}
    # DDP also splits each device's 4 sequences into 2 micro-batches: the losses and the validation set (3 global
    # batches, each device its slice) stay those of one process with micro-batches of 4
    for name, sets in {"single": [], "ddp": ["target.devices=2", "target.parallelism=ddp", "train.micro_batch=2"],
                       "fsdp": ["target.devices=2", "target.parallelism=fsdp"]}.items():
        out[name] = tmp / name
        compile_to(recipe, out[name], sets=[*sets, "train.eval_batches=3"], host=Host())
    # FSDP2 with the fp32 products in oneDNN (choose_matmul on an AMD Zen 5 CPU): model.py's Linear on the
    # parameters FSDP2 unshards for each forward and backward
    out["fsdp_onednn"] = tmp / "fsdp_onednn"
    plan = compile_to(recipe, out["fsdp_onednn"], sets=["target.devices=2", "target.parallelism=fsdp", "train.eval_batches=3"],
                      host=Host(cpu_vendor="AuthenticAMD", cpu_avx512=True, cpu_family=26))
    assert plan.matmul == "onednn"
    run_program(out["single"], cache, "--quiet")
    torchrun(out["ddp"], cache)
    torchrun(out["fsdp"], cache)
    torchrun(out["fsdp_onednn"], cache)
    return tmp, recipe, cache, out


@pytest.mark.parametrize("kind", ["ddp", "fsdp", "fsdp_onednn"])
def test_two_processes_follow_the_single_process_loss_curve(runs, kind):
    _, _, _, out = runs
    ref, got = losses(out["single"]), losses(out[kind])
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), step
    for step, v in val_losses(out["single"]).items():
        assert val_losses(out[kind])[step] == pytest.approx(v, rel=2e-5, abs=2e-5)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_checkpoint_of_two_processes_resumes(runs, tmp_path, kind):
    tmp, recipe, cache, out = runs
    resumed = tmp_path / kind
    compile_to(recipe, resumed, sets=["target.devices=2", f"target.parallelism={kind}", *(["train.micro_batch=2"] if kind == "ddp" else [])],
               host=Host())
    shutil.copytree(out[kind] / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000004\n")
    torchrun(resumed, cache, "--resume")
    full = losses(out[kind])
    assert losses(resumed) == {s: v for s, v in full.items() if s > 4}


def test_two_process_checkpoint_resumes_on_one_process(runs, tmp_path):
    """2 -> 1: an FSDP run's checkpoint (sharded, torch.distributed.checkpoint) continues on another number of processes."""
    tmp, recipe, cache, out = runs
    one = tmp_path / "one"
    compile_to(recipe, one, host=Host())  # same recipe, target.devices 1: the same recipe hash
    shutil.copytree(out["fsdp"] / "checkpoints" / "step_00000004", one / "checkpoints" / "step_00000004")
    (one / "checkpoints" / "latest").write_text("step_00000004\n")
    run_program(one, cache, "--resume", "--quiet")
    ref = losses(out["single"])
    for step, v in losses(one).items():
        assert v == pytest.approx(ref[step], rel=2e-5, abs=2e-5)


def test_parallelism_and_memory_plan(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r")
    small, _ = make_plan(recipe, ["target.devices=4", "train.global_batch=16"], host=Host())
    assert (small.parallelism, small.world, small.micro_batch * small.grad_accum) == ("ddp", 4, 4)
    big_sets = ["model.d_model=4096", "model.n_layers=32", "model.n_heads=32", "model.n_kv_heads=8", "model.d_ff=11008",
                "train.seq_len=2048", "train.global_batch=64", "target.accelerator=cuda", "target.chip=h100", "target.precision=bf16",
                "target.activation_checkpointing=none", "train.micro_batch=2"]
    one, _ = make_plan(recipe, big_sets, host=Host(), check_fit=False)  # 7B does not fit one H100 (tests/test_memory_planner.py)
    eight, _ = make_plan(recipe, big_sets + ["target.devices=8"], host=Host())
    assert eight.parallelism == "fsdp" and "FSDP2" in next(d.reason for d in eight.decisions if d.name == "parallelism")
    m1, m8 = one.estimates["memory_per_device_bytes"], eight.estimates["memory_per_device_bytes"]
    assert m8["optimizer"] == -(-m1["optimizer"] // 8) and m8["weights"] == -(-m1["weights"] // 8)
    assert eight.estimates["estimated_seconds"] == pytest.approx(one.estimates["estimated_seconds"] / 8, rel=1e-3)
    assert launch_command(eight, "train.py")[1:6] == ["-m", "malt.runtime.launch", "--standalone", "--nproc_per_node", "8"]


def test_devices_must_split_the_batch(tmp_path):
    from malt.compiler.api import check
    from malt.compiler.diagnostics import RecipeError

    recipe = write_tiny_recipe(tmp_path / "r")
    with pytest.raises(RecipeError, match="does not split evenly over 3 devices"):
        check(recipe, ["target.devices=3"])
    with pytest.raises(RecipeError, match="ddp needs more than one device"):
        check(recipe, ["target.parallelism=ddp"])
    check(recipe, ["target.parallelism=fsdp"])  # FSDP2 on one device: the sharded code path (the GPU check runs it)


def test_phased_run_on_two_processes_follows_one_process(tmp_path):
    from .test_phases import phased_recipe

    recipe = phased_recipe(tmp_path)  # two phases: the second changes seq_len, batch, rope_theta, lr and schedule
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    compile_to(recipe, one, host=Host())
    compile_to(recipe, two, sets=["target.devices=2", "target.parallelism=fsdp"], host=Host())
    run_program(one, cache, "--quiet")
    torchrun(two, cache)
    ref, got = losses(one), losses(two)
    assert sorted(got) == sorted(ref) == list(range(1, 21))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), step


def test_fsdp_compiles_each_block_and_the_loss(tmp_path):
    """torch.compile of the whole model stops at FSDP2's first hook and runs all of it eagerly (the loss too, on whole
    fp32 logits): the program compiles each block and the output norm, head and loss apart. No graph break, and the
    losses of one compiled process; the final sample runs eagerly (no recompilation for its lengths)."""
    recipe = write_tiny_recipe(tmp_path / "r", steps=4, eval_every=2, checkpoint_every=4)
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    compile_to(recipe, one, sets=["target.compile=on"], host=Host())
    compile_to(recipe, two, sets=["target.compile=on", "target.devices=2", "target.parallelism=fsdp"], host=Host())
    assert "layer.compile()" in (two / "train.py").read_text()
    run_program(one, cache, "--quiet")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(two / "train.py"),
           "--quiet"]
    proc = subprocess.run(cmd, env={**run_env(cache), "TORCH_LOGS": "graph_breaks,recompiles"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Graph break" not in proc.stderr and "falling back to eager" not in proc.stderr, proc.stderr[-3000:]
    assert "size mismatch" not in proc.stderr, proc.stderr[-3000:]  # the sample's lengths compiled nothing
    ref, got = losses(one), losses(two)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), step
    assert val_losses(two) == pytest.approx(val_losses(one), rel=2e-5, abs=2e-5)
