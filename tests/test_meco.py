"""MeCo end to end (issue 6's two-phase test): 90% of the run with metadata prefixes that carry no loss,
a 10% cooldown on the same documents without them, and a resume inside the cooldown that continues exactly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from malt.compiler.api import compile_to
from malt.compiler.api import plan as make_plan
from malt.compiler.plan import Host
from malt.runtime.data import prepare

from .helpers import run_program
from .test_conditioning import write_records
from .test_golden import ROOT
from .test_run import losses, val_losses
from .test_schedule import load_train

MECO = """\
name: meco
seed: 7
model: {d_model: 64, n_layers: 2, n_heads: 4, d_ff: 128}
tokenizer: {kind: bytes}
data:
  sources:
    - {name: web, path: web.jsonl, metadata: "URL: {domain}\\n\\n"}
  validation: 10%
optimizer: {lr: 3e-3}
schedule: {warmup: 2, decay: cosine}
train: {seq_len: 64, global_batch: 8, micro_batch: 4, steps: 20, log_every: 1, eval_every: 5, checkpoint_every: 1,
        keep_checkpoints: 30, eval_batches: 2, sample_tokens: 8}
target: {accelerator: cpu, precision: fp32, compile: off}
phases:
  - {name: with-metadata, share: 90%}
  - {name: cooldown, share: 10%, data: {metadata: off}}
"""


def test_the_shipped_meco_recipe_plans_a_metadata_phase_then_a_cooldown():
    p, _ = make_plan(ROOT / "recipes" / "tiny-meco.yaml", host=Host())
    main, cool = p.phases
    assert (main.metadata, cool.metadata) == (True, False) and cool.changes == ("data.metadata off",)
    assert abs(main.steps / p.steps - 0.9) < 0.01 and p.masked_targets
    # recipe.lock.yaml means the same: its written-out nulls are "not set", not "off"
    import yaml

    from malt.compiler.conditioning import phase_metadata
    from malt.compiler.plan import resolved_recipe
    from malt.compiler.schema import Recipe

    again = Recipe.model_validate(yaml.safe_load(yaml.safe_dump(resolved_recipe(p.recipe))))
    assert [phase_metadata(ph) for ph in again.phases] == [True, False] and again == p.recipe


@pytest.mark.slow
def test_metadata_then_cooldown_trains_and_resumes_inside_the_cooldown(tmp_path):
    (tmp_path / "r").mkdir()
    write_records(tmp_path / "r" / "web.jsonl", n=150)
    recipe = tmp_path / "r" / "recipe.yaml"
    recipe.write_text(MECO)
    cache, full, resumed = tmp_path / "cache", tmp_path / "full", tmp_path / "resumed"
    compile_to(recipe, full, host=Host())
    out = run_program(full, cache)
    assert "phase cooldown: steps 18 to 20" in out.stdout
    ref = losses(full)
    assert sorted(ref) == list(range(1, 21)) and all(np.isfinite(v) for v in ref.values())

    # what the program reads in each phase: the batches its calls ask for (train.py passes metadata=phase["metadata"])
    t = load_train(full)
    source = (full / "train.py").read_text()
    assert 'weights=phase["weights"], metadata=phase["metadata"])' in source
    ds = prepare({**t.DATA, "base_dir": str(full)}, cache, log=lambda m: None)
    prefixes = 0
    for phase in t.PHASES:
        for step in range(phase["start"], phase["end"]):
            x, y = ds.batch("train", step, 0, 8, phase["seq_len"], weights=phase["weights"], metadata=phase["metadata"])
            text = ds.decode(x.flatten().tolist())
            if phase["metadata"]:   # prefixes present, and exactly their tokens are without loss
                src, pos = ds.sample_plan("train", step, 0, 8, phase["seq_len"], phase["weights"])
                masks = np.stack([ds.no_loss("train", int(s), int(p), phase["seq_len"] + 1)[1:] for s, p in zip(src, pos)])
                assert ((y.numpy() == -100) == masks).all()
                prefixes += text.count("URL: site")
            else:                   # absent: no prefix text, every target counts
                assert "URL: " not in text and not (y == -100).any()
    assert prefixes > 10

    # resume from the checkpoint after step 19, inside the cooldown: the rest is the uninterrupted run's
    compile_to(recipe, resumed, host=Host())
    shutil.copytree(full / "checkpoints" / "step_00000019", resumed / "checkpoints" / "step_00000019")
    (resumed / "checkpoints" / "latest").write_text("step_00000019\n")
    shutil.copy(full / "tokenizer.json", resumed / "tokenizer.json")
    out = run_program(resumed, cache, "--resume")
    assert "phase cooldown" in out.stdout
    assert losses(resumed) == {s: v for s, v in ref.items() if s > 19}
    assert val_losses(resumed) == {s: v for s, v in val_losses(full).items() if s > 19}
