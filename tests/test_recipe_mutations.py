"""Random mutations of every recipe in recipes/ end in diagnostics, never in a traceback.

Each mutation sets a value to one from a pool of plausible and implausible values, deletes a key or
adds one of the recipe language's keys somewhere, then runs the whole compiler (check, plan, render)
as `malt compile` does. Any exception other than the user-facing RecipeError/UserError is a bug.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import yaml

from malt.compiler.api import compile_files
from malt.compiler.diagnostics import RecipeError, UserError
from malt.compiler.plan import Host

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
VALUES = [-1, 0, 1, 2, 3, 7, 0.5, -0.5, 1e9, 1e-12, "abc", "", None, [], {}, [1, 2], {"a": 1}, True, False, "10%", "150%",
          "1M", "2k", "auto", "on", "off", "cpu", "cuda", "tpu", "bert", "llama", "mlm", "ul2", "fim", "rtd", "distill",
          "prefix_lm", "span_corruption", "best_fit", "document", "concat", "fsdp", "ddp", "hsdp", "pure_bf16", "bf16", "fp32",
          "selective", "full", "sharded", "alibi", "geglu", "pre", "post", "builtin:python-docs", "nonexistent.jsonl",
          "URL: {domain}", {"template": "x {domain}"}, {"field": "score", "threshold": 0.5},
          [{"kind": "R", "mean_span": 3, "rate": 0.15, "weight": 1}], {"name": "x", "share": "50%"},
          [{"name": "a", "share": "50%"}, {"name": "b", "share": "50%"}]]
KEYS = ["family", "position", "activation", "norm_position", "unpad", "kind", "packing", "metadata", "control",
        "validation_path", "accelerator", "precision", "parallelism", "nodes", "devices", "activation_checkpointing",
        "checkpoint_format", "eval_per_source", "mask_rate", "teacher", "rate", "order", "denoisers", "mode_tokens", "growth",
        "objective", "phases", "init_from", "weights", "memory_per_device", "chip", "micro_batch", "global_batch", "seq_len",
        "n_heads", "n_kv_heads", "d_model", "vocab_size", "sliding_window"]


def _paths(node, prefix=()):
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _mutate(tree: dict, rng: random.Random) -> dict:
    t = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(_paths(t)))
        parent = t
        for k in path[:-1]:
            parent = parent[k]
        node = parent[path[-1]]
        op = rng.random()
        if op < 0.5:
            parent[path[-1]] = copy.deepcopy(rng.choice(VALUES))
        elif op < 0.65 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(node, dict) or isinstance(parent, dict):
            (node if isinstance(node, dict) else parent)[rng.choice(KEYS)] = copy.deepcopy(rng.choice(VALUES))
    return t


@pytest.mark.parametrize("seed", range(8))
def test_mutated_recipes_give_diagnostics_not_tracebacks(tmp_path, seed):
    for folder in ("data", "teachers"):  # recipes name their data and teachers relative to their own folder
        (tmp_path / folder).symlink_to(RECIPES / folder)
    rng = random.Random(seed)
    recipes = sorted(RECIPES.glob("*.yaml"))
    host = Host()
    for i in range(60):
        source = rng.choice(recipes)
        tree = yaml.safe_load(source.read_text())
        if "extends" in tree:
            tree["extends"] = str(RECIPES / tree["extends"])
        mutated = _mutate(tree, rng)
        path = tmp_path / f"m{i}.yaml"
        path.write_text(yaml.safe_dump(mutated))
        try:
            compile_files(path, tmp_path / "out", host=host)
        except (RecipeError, UserError):
            pass
        except Exception as e:  # the point of the test
            raise AssertionError(f"{type(e).__name__}: {e}\nfrom mutating {source.name} into:\n{path.read_text()}") from e
