"""Targets beyond one process: several nodes (rendezvous, Slurm), HSDP, activation checkpointing,
and sharded checkpoints that move between numbers of processes.

Nodes are simulated on this machine: each "node" is one run of the generated launch.sh,
and they meet at a c10d rendezvous on localhost, as real nodes meet on the first node.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from malt.compiler.api import compile_to
from malt.compiler.plan import Host

from .helpers import run_env, run_program, write_tiny_recipe
from .test_distributed import torchrun
from .test_run import losses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def formats(run_dir) -> set:
    return {json.loads(p.read_text())["format"] for p in (run_dir / "checkpoints").glob("step_*/state.json")}


# ---- fast: what is generated, and what `malt run` does with several nodes ---------------------

def test_multinode_target_writes_rendezvous_and_slurm_scripts(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r")
    out = tmp_path / "b"
    p = compile_to(recipe, out, sets=["target.nodes=2", "target.devices=2", "target.parallelism=hsdp", "train.micro_batch=2"], host=Host())
    assert (p.world, p.nodes, p.parallelism, p.checkpoint_format) == (4, 2, "hsdp", "sharded")
    launch = (out / "launch.sh").read_text()
    assert "--nnodes 2 --nproc-per-node 2" in launch and "--rdzv-backend c10d" in launch
    assert '"${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}"' in launch
    sbatch = (out / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n" in sbatch and "--gpus-per-node" not in sbatch  # cpu target
    assert "\n#SBATCH --exclusive\n" in sbatch  # whole nodes: Slurm would otherwise give the one task one core
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in sbatch and "srun" in sbatch
    train = (out / "train.py").read_text()
    assert "NODES = 2" in train and "distributed.wrap(model, PARALLELISM, dist, nodes=NODES)" in train
    assert "fmt=CHECKPOINT_FORMAT" in train
    # bash can read both scripts
    for name in ("launch.sh", "slurm.sbatch"):
        assert subprocess.run(["bash", "-n", str(out / name)], check=False).returncode == 0
    single = compile_to(recipe, tmp_path / "one", sets=["train.micro_batch=2"], host=Host())
    assert single.recipe_hash == p.recipe_hash and not (tmp_path / "one" / "slurm.sbatch").exists()


def test_slurm_script_refuses_an_allocation_of_another_size(tmp_path):
    """sbatch --nodes=3 on a program compiled for 2 nodes: a clear error at once (it waited out the rendezvous);
    with 2 nodes it starts launch.sh on each (scontrol and srun stand-ins here)."""
    recipe = write_tiny_recipe(tmp_path / "r")
    out = tmp_path / "b"
    compile_to(recipe, out, sets=["target.nodes=2", "target.devices=2", "train.micro_batch=2"], host=Host())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\necho "srun $* MASTER_ADDR=$MASTER_ADDR"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "7",
           "SLURM_SUBMIT_DIR": str(out)}
    wrong = subprocess.run(["bash", str(out / "slurm.sbatch")], env={**env, "SLURM_JOB_NUM_NODES": "3"}, capture_output=True, text=True)
    assert wrong.returncode == 2 and "compiled for 2 nodes (target.nodes), the job has 3" in wrong.stderr
    assert "--set target.nodes=3" in wrong.stderr and "srun" not in wrong.stdout
    right = subprocess.run(["bash", str(out / "slurm.sbatch"), "--resume"], env={**env, "SLURM_JOB_NUM_NODES": "2"},
                           capture_output=True, text=True)
    assert right.returncode == 0, right.stderr
    assert right.stdout.strip() == f"srun --kill-on-bad-exit=1 {out}/launch.sh --resume MASTER_ADDR=node-a"


def test_malt_run_refuses_several_nodes_and_says_how(tmp_path):
    from malt.compiler.cli import app
    from typer.testing import CliRunner

    recipe = write_tiny_recipe(tmp_path / "r")
    run_dir = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", str(recipe), "--run-dir", str(run_dir), "--set", "target.nodes=2"])
    assert r.exit_code == 1, r.output
    assert "spans 2 nodes" in r.stderr and f"cd {run_dir} && sbatch slurm.sbatch" in r.stderr
    assert "MASTER_ADDR=<first node's host name>" in r.stderr and "Traceback" not in r.stderr
    assert (run_dir / "slurm.sbatch").is_file() and not (run_dir / "metrics.jsonl").exists()


def test_hsdp_needs_several_nodes_of_several_devices(tmp_path):
    from malt.compiler.api import check
    from malt.compiler.diagnostics import RecipeError

    recipe = write_tiny_recipe(tmp_path / "r")
    with pytest.raises(RecipeError, match="hsdp shards within a node"):
        check(recipe, ["target.devices=2", "target.parallelism=hsdp"])
    with pytest.raises(RecipeError, match=r"does not split evenly over 24 devices \(3 nodes × 8\)"):
        check(recipe, ["target.nodes=3", "target.devices=8"])


def test_activation_checkpointing_recomputes_what_it_says(tmp_path):
    """The generated model keeps fewer tensors for backward with selective, fewer still with full."""
    import importlib.util

    recipe = write_tiny_recipe(tmp_path / "r")
    saved = {}
    for mode in ("none", "selective", "full"):
        out = tmp_path / mode
        compile_to(recipe, out, sets=[f"target.activation_checkpointing={mode}"], host=Host())
        text = (out / "model.py").read_text()
        assert ("from torch.utils.checkpoint import checkpoint" in text) == (mode != "none")
        spec = importlib.util.spec_from_file_location(f"model_{mode}", out / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        torch.manual_seed(0)
        model = module.Transformer()
        tokens = torch.randint(0, 100, (4, 32))
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, sizes=sizes: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = model(tokens, tokens)
        loss.backward()
        saved[mode] = (sum(sizes), loss.item(), model.layers[0].mlp.up_proj.weight.grad.clone())
    assert saved["full"][0] < saved["selective"][0] < saved["none"][0]
    for mode in ("selective", "full"):  # the same loss and gradients: recomputation changes memory, not numbers
        assert saved[mode][1] == saved["none"][1]
        assert torch.equal(saved[mode][2], saved["none"][2])


# ---- several processes (gloo on this CPU) ------------------------------------------------------

@pytest.mark.slow
def test_two_nodes_of_two_processes_hsdp_follow_one_process(tmp_path):
    """Two launch.sh runs meet at a c10d rendezvous (two "nodes" of this machine), train with HSDP on a
    2 × 2 mesh and full activation checkpointing, and follow the single-process loss curve."""
    recipe = write_tiny_recipe(tmp_path / "r", steps=6, eval_every=0, checkpoint_every=3)
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    compile_to(recipe, one, host=Host())
    compile_to(recipe, two, sets=["target.nodes=2", "target.devices=2", "target.parallelism=hsdp", "train.micro_batch=2",
                                  "target.activation_checkpointing=full"], host=Host())
    run_program(one, cache, "--quiet")
    env = run_env(cache) | {"MASTER_PORT": str(free_port()), "RDZV_ID": "malt-test", "PYTHON": sys.executable}
    nodes = [subprocess.Popen(["bash", str(two / "launch.sh"), "--quiet"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    ref, got = losses(one), losses(two)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), step
    assert formats(two) == {3}
    # 4 -> 1: the HSDP run's sharded checkpoint resumes in one process
    back = tmp_path / "back"
    compile_to(recipe, back, sets=["train.micro_batch=2"], host=Host())  # the same recipe hash as the HSDP run
    shutil.copytree(two / "checkpoints" / "step_00000003", back / "checkpoints" / "step_00000003")
    (back / "checkpoints" / "latest").write_text("step_00000003\n")
    run_program(back, cache, "--resume", "--quiet")
    resumed = losses(back)
    assert sorted(resumed) == [4, 5, 6]
    for step, v in resumed.items():
        assert v == pytest.approx(ref[step], rel=2e-5, abs=2e-5), step


@pytest.mark.slow
def test_one_process_sharded_checkpoint_resumes_on_two(tmp_path):
    """1 -> 2 processes: a sharded checkpoint written by one process loads into FSDP2 shards on two."""
    recipe = write_tiny_recipe(tmp_path / "r", steps=8, eval_every=0, checkpoint_every=4)
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    compile_to(recipe, one, sets=["train.checkpoint_format=sharded"], host=Host())
    run_program(one, cache, "--quiet")
    assert formats(one) == {3}
    p = compile_to(recipe, two, sets=["target.devices=2", "target.parallelism=fsdp"], host=Host())
    assert p.checkpoint_format == "sharded"
    shutil.copytree(one / "checkpoints" / "step_00000004", two / "checkpoints" / "step_00000004")
    (two / "checkpoints" / "latest").write_text("step_00000004\n")
    torchrun(two, cache, "--resume")
    ref = losses(one)
    got = losses(two)
    assert sorted(got) == [5, 6, 7, 8]
    for step, v in got.items():
        assert v == pytest.approx(ref[step], rel=2e-5, abs=2e-5), step


@pytest.mark.slow
def test_sharded_fsdp_run_exports_consolidated(tmp_path):
    """2 -> 1: `malt export` consolidates the sharded checkpoint of two processes into one model.safetensors."""
    from malt.runtime.export import export_hf
    from safetensors.torch import load_file

    recipe = write_tiny_recipe(tmp_path / "r", steps=4, eval_every=0, checkpoint_every=4)
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    compile_to(recipe, one, host=Host())
    compile_to(recipe, two, sets=["target.devices=2", "target.parallelism=fsdp"], host=Host())
    run_program(one, cache, "--quiet")
    torchrun(two, cache)
    assert formats(one) == {2} and formats(two) == {3}
    assert not list((two / "checkpoints").glob("step_*/model.safetensors"))
    export_hf(one, tmp_path / "hf-one")
    export_hf(two, tmp_path / "hf-two")
    a, b = load_file(str(tmp_path / "hf-one" / "model.safetensors")), load_file(str(tmp_path / "hf-two" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_a_named_chip_decides_what_accelerator_auto_means():
    """chip h100 with accelerator auto plans a GPU (it planned this CPU against an H100's memory and speed); a TPU
    chip with auto is an error (auto never means tpu)."""
    from malt.compiler.api import plan as make_plan
    from malt.compiler.diagnostics import RecipeError
    from malt.compiler.plan import Host

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    p, _ = make_plan(recipes / "tiny.yaml", ["target.chip=h100"], host=Host())
    assert p.device == "cuda" and p.chip == "h100"
    with pytest.raises(RecipeError, match="is a TPU, but accelerator auto never means tpu"):
        make_plan(recipes / "tiny-tpu.yaml", ["target.accelerator=auto"], host=Host())
    p, _ = make_plan(recipes / "tiny-tpu.yaml", ["target.accelerator=cpu", "target.chip=auto", "target.devices=1"], host=Host())
    assert p.device == "cpu"
