"""The recipe hash: what a run trains, so that --resume refuses a changed recipe and accepts everything else."""

from __future__ import annotations

from malt.compiler.api import check
from malt.compiler.plan import recipe_hash

from .helpers import write_tiny_recipe


def _hash(recipe, sets=()):
    r, _ = check(recipe, list(sets))
    return recipe_hash(r)


def test_defaults_written_out_or_left_out_hash_the_same(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r")
    base = _hash(recipe)
    # values equal to malt's defaults: the same training, the same hash (and a malt that adds a field keeps old hashes)
    assert _hash(recipe, ["data.packing=concat", "train.eval_per_source=false", "objective.kind=causal_lm",
                          "model.unpad=false"]) == base
    # the hardware, and how the run is evaluated, logged and saved, are not what is trained
    assert _hash(recipe, ["target.devices=2", "target.precision=bf16", "train.checkpoint_format=sharded"]) == base
    assert _hash(recipe, ["train.eval_every=7", "train.eval_batches=3", "train.eval_per_source=true", "train.log_every=2",
                          "train.checkpoint_every=5", "train.keep_checkpoints=9", "train.sample_tokens=0"]) == base


def test_what_is_trained_changes_the_hash(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r")
    base = _hash(recipe)
    changed = {_hash(recipe, [s]) for s in ["data.packing=document", "optimizer.lr=1e-3", "train.seq_len=64",
                                            "seed=8", "objective.kind=prefix_lm", "train.global_batch=16"]}
    assert base not in changed and len(changed) == 6


def test_the_micro_batch_split_is_not_in_the_hash(tmp_path):
    """Another number of devices may need another micro_batch: the batches are the same, so the hash is."""
    recipe = write_tiny_recipe(tmp_path / "r")
    base = _hash(recipe)
    assert _hash(recipe, ["train.micro_batch=2"]) == _hash(recipe, ["train.micro_batch=auto"]) == base
    phased = ["phases=[{name: a, share: 50%}, {name: b, share: 50%}]"]
    assert _hash(recipe, phased) == _hash(recipe, [*phased, "phases.1.train={micro_batch: 2}"])


def test_a_refused_resume_names_only_what_the_hash_covers():
    from malt.compiler.cli import changed_fields

    old = "train: {steps: 20, log_every: 10, micro_batch: auto}\ntarget: {devices: 1}\noptimizer: {lr: 0.001}\n"
    new = "train: {steps: 21, log_every: 5, micro_batch: 8}\ntarget: {devices: 2}\noptimizer: {lr: 0.001}\n"
    assert changed_fields(old, new) == ["train.steps: 20 → 21"]
