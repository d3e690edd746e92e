"""The TPU program (target.accelerator: tpu) trained on torch-xla's CPU backend (PJRT_DEVICE=CPU).

Runs in the torch-xla environment only (torch 2.9.0 with torch-xla 2.9.0, built by
.ci/xla-env.sh, run by .ci/xla-tests.sh); the main suite does not collect this folder.
A tiny recipe is compiled for one TPU device and for an SPMD mesh of two (CPU_NUM_DEVICES=2
gives the CPU backend two devices), and as the plain CPU program; each trains 8 steps:

- its loss falls, and XLA compiles no new graph after the first steps (metrics.jsonl's
  xla_graphs, torch_xla.debug.metrics' CompileTime count);
- in fp32 it computes the loss curve of the CPU program (the same weights and batches);
  the 2-device SPMD program computes the 1-device one;
- its checkpoints have the CPU program's format, and a run resumed from one continues
  the uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch_xla  # noqa: F401  (this suite needs torch-xla: without it, it fails here instead of skipping)
from malt.compiler.api import compile_to
from malt.compiler.plan import Host
from safetensors.torch import load_file

from tests.helpers import run_env, write_tiny_recipe

STEPS = 8

# name -> --set overrides of the tiny recipe (tests/helpers.py: 8 steps, global batch 8, micro-batch 4, eval and checkpoint every 4)
RUNS = {
    "cpu_fp32": [],
    "tpu_fp32": ["target.accelerator=tpu"],
    "tpu2_fp32": ["target.accelerator=tpu", "target.devices=2", "train.micro_batch=2"],
    "tpu_bf16": ["target.accelerator=tpu", "target.precision=auto"],
}


def _env(cache: Path, devices: int) -> dict:
    env = run_env(cache)
    env["PJRT_DEVICE"] = "CPU"
    env["CPU_NUM_DEVICES"] = str(devices)  # the CPU backend's device count
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _train(run_dir: Path, cache: Path, devices: int, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(run_dir / "train.py"), *args], check=False, env=_env(cache, devices),
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{run_dir.name}/train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")


def _steps(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("xla")
    recipe = write_tiny_recipe(root / "recipe", steps=STEPS)
    cache = root / "cache"
    out = {}
    for name, sets in RUNS.items():
        out[name] = root / name
        plan = compile_to(recipe, out[name], sets=sets, host=Host())
        _train(out[name], cache, plan.world)
    return out


@pytest.mark.parametrize("name", ["tpu_bf16", "tpu2_fp32"])
def test_loss_falls_and_graphs_compile_once(runs, name):
    steps = _steps(runs[name])
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in steps]
    assert losses[-1] < losses[0] - 0.5, losses
    graphs = [r["xla_graphs"] for r in steps]
    # the first step compiles the step graph with the optimizer's state created, the second the steady one (and the
    # first evaluation its own); after that every step, evaluation and checkpoint reuses them
    assert graphs[2] == graphs[-1], graphs
    assert graphs[-1] <= 6, graphs


def test_tpu_program_computes_the_cpu_program(runs):
    """fp32: the same weights (built on the CPU from the seed) and batches give the CPU program's losses."""
    xla, cpu = _steps(runs["tpu_fp32"]), _steps(runs["cpu_fp32"])
    for a, b in zip(xla, cpu):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-4), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=2e-3), (a, b)


def test_spmd_over_two_devices_computes_one_device(runs):
    one, two = _steps(runs["tpu_fp32"]), _steps(runs["tpu2_fp32"])
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-4), (a, b)


def test_the_validation_set_is_the_cpu_programs_on_any_mesh(runs):
    """eval_batches global batches: one TPU device (micro-batches of 4), a mesh of two (2 per device) and the CPU
    program evaluate the same sequences, so their val losses agree."""
    def vals(name):
        records = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    cpu, one, two = vals("cpu_fp32"), vals("tpu_fp32"), vals("tpu2_fp32")
    assert sorted(cpu) == sorted(one) == sorted(two) == [0, 4, 8]
    for step, v in cpu.items():
        assert one[step] == pytest.approx(v, abs=2e-4) and two[step] == pytest.approx(v, abs=2e-4), step


@pytest.mark.parametrize("name", ["tpu_fp32", "tpu2_fp32"])
def test_checkpoints_have_the_cpu_programs_format(runs, name):
    ck = runs[name] / "checkpoints" / f"step_{STEPS:08d}"
    ref = runs["cpu_fp32"] / "checkpoints" / f"step_{STEPS:08d}"
    for file in ("model.safetensors", "optimizer.safetensors"):
        got, want = load_file(str(ck / file)), load_file(str(ref / file))
        assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}, file
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].device.type == "cpu", k
            assert (got[k].float() - want[k].float()).abs().max() < 5e-3, k  # whole tensors, assembled from the shards
    state = json.loads((ck / "state.json").read_text())
    assert state["step"] == STEPS and state["format"] == json.loads((ref / "state.json").read_text())["format"]


@pytest.mark.parametrize("name, devices", [("tpu_fp32", 1), ("tpu2_fp32", 2)])
def test_resume_continues_the_run(runs, name, devices):
    """Resumed from its step-4 checkpoint (on a mesh: loaded whole, then sharded), the TPU program logs the losses
    of the uninterrupted run."""
    src = runs[name]
    run_dir = src.parent / f"{name}_resumed"  # beside the recipe: DATA's paths are relative to the program
    shutil.copytree(src, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    (run_dir / "checkpoints" / "latest").write_text(f"step_{4:08d}\n")
    _train(run_dir, src.parent / "cache", devices, "--resume")
    full, resumed = _steps(src), _steps(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(full[4:], resumed[4:]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)


@pytest.mark.parametrize("pjrt, message", [
    (None, "XLA finds no TPU here (it would run on CPU)"),     # torch-xla would fall back to its CPU backend by itself
    ("TPU", "XLA could not start its TPU backend"),           # no libtpu on this machine
])
def test_without_a_tpu_the_program_says_so(tmp_path, pjrt, message):
    recipe = write_tiny_recipe(tmp_path / "recipe", steps=STEPS)
    compile_to(recipe, tmp_path / "run", sets=["target.accelerator=tpu"], host=Host())
    env = _env(tmp_path / "cache", 1)
    env.pop("PJRT_DEVICE")
    if pjrt:
        env["PJRT_DEVICE"] = pjrt
    proc = subprocess.run([sys.executable, str(tmp_path / "run" / "train.py")], check=False, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "hint: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]


SPMD_CHECK = """
import torch, torch_xla
from malt.runtime import xla

spec = torch_xla._XLAC._get_xla_sharding_spec
device, mesh = xla.setup(2)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6)).to(device)
forward = xla.shard(model, mesh)
optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
x, y = next(xla.loader([(torch.randn(4, 8), torch.randn(4, 6))], device, mesh))
((forward(x) - y) ** 2).mean().backward()
optimizer.step()
torch_xla.sync()
assert spec(x).startswith("{devices=[2,1]"), spec(x)                       # the batch split over the mesh
for name, p in model.named_parameters():                                   # FSDPv2: each weight along its largest dimension
    assert "devices=[" in spec(p) and "replicated" not in spec(p), (name, spec(p))
    assert "devices=[" in spec(optimizer.state[p]["exp_avg"]), name       # AdamW state sharded like its weight
w = model[2].weight
assert spec(w).startswith("{devices=[1,2]"), spec(w)                       # (6, 16): the 16 columns are split
graphs = xla.compiled_graphs()
whole = xla.host_copy(w)                                                   # assembled from the shards on the host
assert xla.compiled_graphs() == graphs and whole.shape == (6, 16)
assert torch.equal(whole, w.cpu())
print("ok")
"""


def test_spmd_shards_weights_batches_and_optimizer_state(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SPMD_CHECK], check=False, env=_env(tmp_path, 2), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


RESUME_SHARDING_CHECK = """
import sys
from pathlib import Path

import torch, torch_xla
from malt.runtime import checkpoint, xla
from malt.runtime.run import Run

spec = torch_xla._XLAC._get_xla_sharding_spec
device, mesh = xla.setup(2)


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6)).to(device)
    return model, torch.optim.AdamW(model.parameters(), foreach=True)


def step(forward, optimizer):
    x, y = next(xla.loader([(torch.randn(4, 8), torch.randn(4, 6))], device, mesh))
    ((forward(x) - y) ** 2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    torch_xla.sync()


model, optimizer = build()
step(xla.shard(model, mesh, optimizer), optimizer)
run = Run(Path(sys.argv[1]), "t", "h", resume=True, quiet=True)
xla.save(run, 1, model, optimizer)
again, again_opt = build()
assert checkpoint.restore(run, again, again_opt) == 1                      # as the TPU program resumes: restore, then shard
forward = xla.shard(again, mesh, again_opt)
for (name, p), q in zip(again.named_parameters(), model.parameters()):
    assert "devices=[" in spec(p) and spec(p) == spec(q), (name, spec(p), spec(q))      # sharded as in the first run
    assert spec(again_opt.state[p]["exp_avg"]) == spec(p), name                       # and its moments with it
    assert torch.equal(again_opt.state[p]["exp_avg"].cpu(), optimizer.state[q]["exp_avg"].cpu()), name
step(forward, again_opt)                                                    # and it trains on
print("ok")
"""


def test_a_resumed_run_on_a_mesh_is_sharded_like_the_first(tmp_path):
    """Restored weights and AdamW moments arrive replicated: xla.shard must still shard them (FSDPv2 would leave an
    annotated tensor as it is), or a model that fits only sharded runs out of memory on resume."""
    proc = subprocess.run([sys.executable, "-c", RESUME_SHARDING_CHECK, str(tmp_path / "run")], check=False,
                          env=_env(tmp_path / "cache", 2), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


NOT_FINITE_CHECK = """
import sys
from pathlib import Path

import torch, torch_xla
from malt.runtime import checkpoint, xla
from malt.runtime.run import Diverged, Run

device, mesh = xla.setup(2)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.SiLU(), torch.nn.Linear(16, 6)).to(device)
optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
forward = xla.shard(model, mesh, optimizer)
run = Run(Path(sys.argv[1]), "t", "h", resume=False, quiet=True)
xla.save(run, 1, model, optimizer)
with torch.no_grad():
    model[2].weight.fill_(float("nan"))   # a sharded weight
try:
    xla.save(run, 2, model, optimizer)
except Diverged as e:
    assert "at step 2: 1 of the model's 4 weight tensors hold nan or inf (2.weight)" in e.message, e.message
else:
    raise AssertionError("a checkpoint was written from nan weights")
assert checkpoint.latest(run.dir)[0] == 1 and not (run.checkpoints / "step_00000002").exists()
print("ok")
"""


def test_no_checkpoint_is_written_from_weights_that_are_not_finite(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NOT_FINITE_CHECK, str(tmp_path / "run")], check=False,
                          env=_env(tmp_path, 2), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
