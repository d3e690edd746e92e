"""Fixtures shared by the tests: a fixed host, recipes from dicts, generated models imported from a directory."""

from __future__ import annotations

import copy
import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import yaml

from malt.compiler.plan import Host

# tests/xla/ trains the TPU program on torch-xla's CPU backend: it runs in the torch-xla environment
# (.ci/xla-tests.sh: torch 2.9 with torch-xla 2.9), not with the main suite's torch
if importlib.util.find_spec("torch_xla") is None:
    collect_ignore = ["xla"]

# A complete, small recipe (bytes tokenizer, local .txt data); `make_recipe` merges overrides into it.
BASE_RECIPE = {
    "name": "test",
    "seed": 1,
    "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128},
    "tokenizer": {"kind": "bytes"},
    "data": {"sources": [{"name": "text", "path": "data.txt"}], "validation": "10%"},
    "optimizer": {"lr": 1e-3},
    "train": {"seq_len": 32, "global_batch": 4, "steps": 6, "eval_every": 3, "eval_batches": 2,
              "checkpoint_every": 3, "sample_tokens": 8, "log_every": 1},
    "target": {"accelerator": "cpu", "precision": "fp32", "compile": "off"},
}

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog, and the model learns to predict it.\n"
               for i in range(300))


def merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in, recursively for dicts (a value of None deletes the key)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture
def host() -> Host:
    """The fixed CPU host (2 cores, no CUDA) that tests and golden files compile for."""
    return Host()


def write_recipe(directory, overrides: dict | None = None, name: str = "recipe.yaml") -> Path:
    """Write BASE_RECIPE with ``overrides`` merged in to directory/name, beside a small data.txt
    (about 28 KB of text), so it compiles and trains as is. Returns the recipe's path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "data.txt").exists():
        (d / "data.txt").write_text(TEXT)
    path = d / name
    path.write_text(yaml.safe_dump(merge(BASE_RECIPE, overrides or {}), sort_keys=False))
    return path


@pytest.fixture
def make_recipe(tmp_path):
    """make_recipe(overrides=None, directory=tmp_path, name="recipe.yaml") -> Path: see write_recipe."""
    def make(overrides: dict | None = None, directory: Path | None = None, name: str = "recipe.yaml") -> Path:
        return write_recipe(directory if directory is not None else tmp_path, overrides, name)
    return make


_counter = itertools.count()


def import_model_module(directory):
    """Import DIR/model.py (a generated model) as a fresh module."""
    path = Path(directory) / "model.py"
    name = f"malt_test_model_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_model_module():
    """load_model_module(directory) -> the module of directory/model.py, imported afresh."""
    return import_model_module
