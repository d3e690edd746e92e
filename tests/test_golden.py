"""Golden files: every recipe in recipes/ renders to the files under tests/golden/<recipe>/.

To accept a change, re-render them and read the diff as a reviewer would:

    MALT_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest

from malt.compiler.api import compile_files
from malt.compiler.plan import Host

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
GOLDEN = ROOT / "tests" / "golden"
UPDATE = os.environ.get("MALT_UPDATE_GOLDEN") == "1"
HOST = Host(cuda=False, cuda_name="", cpu_cores=2, memory_bytes=24 * 2**30)

ALLOWED_IMPORTS = {"torch", "malt", "model", "torch_xla"} | set(sys.stdlib_module_names)  # torch_xla: TPU programs


def render(recipe: Path) -> dict[str, str]:
    cwd = os.getcwd()
    os.chdir(ROOT)  # recipe paths in headers are shown relative to the working directory
    try:
        _, files = compile_files(recipe.relative_to(ROOT), GOLDEN / recipe.stem, host=HOST)
    finally:
        os.chdir(cwd)
    return files


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_golden(recipe):
    files = render(recipe)
    out = GOLDEN / recipe.stem
    if UPDATE:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text)
    for name, text in files.items():
        expected = (out / name)
        assert expected.exists(), f"no golden file {expected}; run with MALT_UPDATE_GOLDEN=1"
        assert text == expected.read_text(), f"{name} of {recipe.name} differs from its golden file; if intended, MALT_UPDATE_GOLDEN=1"


# one recipe on other targets (only the target changes): the files the target changes, under tests/golden/targets/<case>/
TARGET_CASES = {
    "llama-124m-1-device": ("llama-124m", [], ["launch.sh"]),
    "llama-124m-1-node-8-gpus": ("llama-124m", ["target.devices=8"], ["launch.sh"]),
    "llama-124m-4-nodes-8-gpus": ("llama-124m", ["target.nodes=4", "target.devices=8", "target.parallelism=fsdp"],
                                  ["launch.sh", "slurm.sbatch"]),
    "tiny-2-nodes-2-cpus": ("tiny", ["target.accelerator=cpu", "target.nodes=2", "target.devices=2", "target.parallelism=hsdp"],
                            ["launch.sh", "slurm.sbatch", "train.py"]),
    "tiny-selective-checkpointing": ("tiny", ["target.activation_checkpointing=selective"], ["model.py"]),
    "tiny-full-checkpointing": ("tiny", ["target.activation_checkpointing=full"], ["model.py"]),
    # the TPU program on one device (recipes/tiny-tpu.yaml's golden is the 4-device SPMD one)
    "tiny-1-tpu": ("tiny", ["target.accelerator=tpu"], ["launch.sh", "train.py", "model.py"]),
    # fp32 on an AMD Zen 5 CPU (AVX-512): the linears and the chunked loss multiply in oneDNN (choose_matmul)
    "tiny-fp32-amd-avx512": ("tiny", ["target.precision=fp32"], ["model.py"],
                             Host(cpu_cores=2, memory_bytes=24 * 2**30, cpu_vendor="AuthenticAMD", cpu_avx512=True, cpu_family=26)),
}


@pytest.mark.parametrize("case", sorted(TARGET_CASES))
def test_target_golden(case):
    name, sets, wanted, *host = TARGET_CASES[case]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        _, files = compile_files(Path("recipes") / f"{name}.yaml", GOLDEN / "targets" / case, sets, host=host[0] if host else HOST)
    finally:
        os.chdir(cwd)
    assert ("slurm.sbatch" in files) == any(s.startswith("target.nodes") for s in sets)
    out = GOLDEN / "targets" / case
    if UPDATE:
        out.mkdir(parents=True, exist_ok=True)
        for f in out.iterdir():
            f.unlink()
        for k in wanted:
            (out / k).write_text(files[k])
    assert sorted(p.name for p in out.iterdir()) == sorted(wanted), f"golden files of {case} differ; MALT_UPDATE_GOLDEN=1"
    for k in wanted:
        assert files[k] == (out / k).read_text(), f"{k} of {case} differs from its golden file; if intended, MALT_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_render_is_deterministic_and_clean(recipe):
    a, b = render(recipe), render(recipe)
    assert a == b
    for name in ("train.py", "model.py"):
        tree = ast.parse(a[name])  # it parses
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = {(node.module or "").split(".")[0]}
                if node.module and node.module.startswith("malt"):
                    assert node.module.startswith("malt.runtime"), f"{name} imports {node.module}"
            else:
                continue
            assert roots <= ALLOWED_IMPORTS, f"{name} imports {roots - ALLOWED_IMPORTS}"
        assert str(ROOT) not in a[name], "absolute paths must not leak into generated code"
    assert "malt.compiler" not in a["train.py"]
