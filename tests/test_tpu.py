"""target.accelerator: tpu on the compiling side: validation, the passes' decisions, the rendered program.

None of this needs torch-xla: compiling for a TPU must work on any machine. The
generated program's training runs in tests/xla/, inside the torch-xla environment
(.ci/xla-tests.sh).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

import pytest
from malt.compiler.api import check, compile_files
from malt.compiler.diagnostics import RecipeError

TPU = {"target": {"accelerator": "tpu", "precision": "auto", "compile": "auto"}}


def _errors(path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        check(path)
    return [d.format() for d in info.value.diagnostics]


def _compile(make_recipe, tmp_path, host, overrides):
    p, files = compile_files(make_recipe(overrides), tmp_path / "build", host=host)
    return p, files


def test_tpu_is_accepted_and_xla_is_not(make_recipe):
    check(make_recipe(TPU))
    out = _errors(make_recipe({"target": {"accelerator": "xla"}}))
    assert len(out) == 1 and "target.accelerator: 'xla' is not built yet" in out[0] and "use accelerator: tpu" in out[0]


@pytest.mark.parametrize("overrides, path, words", [
    ({"target": {"parallelism": "ddp", "devices": 2}}, "target.parallelism", "XLA SPMD"),
    ({"target": {"compile": "on"}}, "target.compile", "XLA already compiles"),
    ({"target": {"nodes": 2}}, "target.nodes", "several hosts"),
    ({"target": {"chip": "h100"}}, "target.chip", "not a TPU"),
    ({"target": {"activation_checkpointing": "full"}}, "target.activation_checkpointing", "not built"),
    ({"data": {"packing": "document"}}, "data.packing", "concat packing only"),
    ({"train": {"checkpoint_format": "sharded"}}, "train.checkpoint_format", "whole tensors"),
    ({"phases": [{"name": "a", "share": "50%"}, {"name": "b", "share": "50%"}]}, "phases", "not built"),
])
def test_what_the_tpu_program_does_not_build_is_rejected(make_recipe, overrides, path, words):
    from tests.conftest import merge

    out = _errors(make_recipe(merge(TPU, overrides)))
    mine = [o for o in out if f"error: {path}:" in o]
    assert [m for m in mine if words in m and "\n    hint: " in m], out


def test_passes_decide_for_one_tpu_device(make_recipe, tmp_path, host):
    p, files = _compile(make_recipe, tmp_path, host, TPU)
    d = {x.name: x.value for x in p.decisions}
    assert (p.device, p.chip, p.precision, p.compile, p.fused_adamw) == ("tpu", "tpu-v5e", "bf16", False, False)
    assert (p.parallelism, p.world, p.checkpoint_format, p.activation_checkpointing) == ("single", 1, "full", "none")
    assert d["device"] == "tpu" and "torch.compile" in next(x.reason for x in p.decisions if x.name == "compile")
    train = files["train.py"]
    ast.parse(train)
    ast.parse(files["model.py"])
    for idiom in ("import torch_xla", "torch_xla.sync()", "xla.setup(DEVICES)", "xla.loader(", "xla.save(",
                  'torch.autocast("xla", dtype=torch.bfloat16)', "DEVICES = 1"):
        assert idiom in train, idiom
    assert "torch.compile" not in train and "torch.distributed" not in train and ".item()" in train
    # the step's loop reads no device value: .item() only at log points and in evaluate()
    step_loop = train[train.index("    for step in range(start_step, MAX_STEPS):\n        lr"):train.index("        done = step + 1")]
    assert ".item()" not in step_loop and "float(" not in step_loop
    # the model is the shared Llama with the plain loss (XLA fuses it), no chunked loss
    assert "ChunkedCrossEntropy" not in files["model.py"] and "F.cross_entropy(" in files["model.py"]
    assert 'PJRT_DEVICE="${PJRT_DEVICE:-TPU}"' in files["launch.sh"] and "torch.distributed.run" not in files["launch.sh"] and "malt.runtime.launch" not in files["launch.sh"]
    assert p.to_json()["execution"]["device"] == "tpu"


def test_several_tpu_devices_are_one_spmd_program(make_recipe, tmp_path, host):
    p, files = _compile(make_recipe, tmp_path, host, {**TPU, "target": {**TPU["target"], "devices": 2},
                                                      "train": {"global_batch": 8, "micro_batch": 2}})
    assert (p.parallelism, p.world, p.micro_batch, p.grad_accum) == ("fsdp", 2, 2, 2)
    assert "XLA SPMD" in next(x.reason for x in p.decisions if x.name == "parallelism")
    train = files["train.py"]
    assert "DEVICES = 2" in train and "GRAD_ACCUM = 2" in train and "2 devices × micro_batch 2" in train
    assert "forward = xla.shard(model, mesh, optimizer)" in train
    assert 'dataset.batch("train", step, micro * MICRO_BATCH * DEVICES, MICRO_BATCH * DEVICES, SEQ_LEN)' in train
    assert "DEVICE_BATCH" not in train and "torchrun" not in files["launch.sh"] and "SPMD over 2 devices" in files["launch.sh"]
    # memory is planned per device with the state sharded over the mesh
    one, _ = _compile(make_recipe, tmp_path / "one", host, TPU)
    assert p.estimates["memory_per_device_bytes"]["weights"] < one.estimates["memory_per_device_bytes"]["weights"]


def test_fp32_on_tpu(make_recipe, tmp_path, host):
    p, files = _compile(make_recipe, tmp_path, host, {"target": {"accelerator": "tpu", "precision": "fp32"}})
    assert p.precision == "fp32" and "autocast = nullcontext()" in files["train.py"]
    assert "from contextlib import nullcontext" in files["train.py"]


def test_compiling_for_tpu_does_not_import_torch_xla(make_recipe, tmp_path):
    """malt compile runs where torch-xla is not installed (and must not import it where it is)."""
    recipe = make_recipe(TPU)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch_xla"] = None  # importing it would fail
        from malt.compiler.api import compile_to
        from malt.compiler.plan import Host
        compile_to({str(recipe)!r}, {str(tmp_path / "out")!r}, host=Host())
        assert not [m for m in sys.modules if m.startswith("torch_xla") and sys.modules[m] is not None]
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert (tmp_path / "out" / "train.py").exists()


def test_tpu_program_without_torch_xla_says_how_to_install(make_recipe, tmp_path):
    """Started where torch-xla is missing, the program ends with the install hint, not a traceback."""
    recipe = make_recipe(TPU)
    from malt.compiler.api import compile_to
    from malt.compiler.plan import Host

    compile_to(recipe, tmp_path / "out", host=Host())
    code = ("import runpy, sys; sys.modules['torch_xla'] = None; sys.argv = ['train.py']; "
            f"runpy.run_path({str(tmp_path / 'out' / 'train.py')!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "needs torch-xla" in r.stderr and "pip install -e '.[tpu]'" in r.stderr and "Traceback" not in r.stderr


def test_malt_run_for_tpu_without_torch_xla_stops_before_preparing_data(make_recipe, tmp_path):
    """`malt run` says torch-xla is missing before it tokenizes anything (a corpus can take hours)."""
    import importlib.util
    import os

    if importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("this environment has torch-xla: the run would start")  # the main suite's venv never does
    recipe = make_recipe(TPU)
    cache = tmp_path / "cache"
    env = {**os.environ, "MALT_CACHE_DIR": str(cache)}
    r = subprocess.run([sys.executable, "-m", "malt.compiler.cli", "run", str(recipe), "--run-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "torch-xla is not installed" in r.stderr and "pip install -e '.[tpu]'" in r.stderr and "Traceback" not in r.stderr
    assert not cache.exists() or not any(cache.rglob("*.npy"))
