"""Phases: the plan's step ranges, the generated program's schedule and switches, resume inside a later phase."""

from __future__ import annotations

import json

import torch
import shutil

import pytest

from malt.compiler.api import compile_to, plan as make_plan
from malt.compiler.diagnostics import RecipeError
from malt.compiler.phases import lr_at
from malt.compiler.plan import Host

from .helpers import run_program, write_corpus, write_tiny_recipe
from .test_run import losses, val_losses
from .test_schedule import load_train

TWO_PHASES = """
phases:
  - {name: main, share: 70%}
  - name: long
    share: 30%
    train: {seq_len: 64, global_batch: 4}
    model: {rope_theta: 40000}
    optimizer: {lr: 1e-3, weight_decay: 0.0}
    schedule: {warmup: 10%, decay: linear}
"""


def phased_recipe(tmp_path, extra=TWO_PHASES, steps=20):
    recipe = write_tiny_recipe(tmp_path / "r", steps=steps, eval_every=4, checkpoint_every=2)
    recipe.write_text(recipe.read_text().replace("micro_batch: 4, ", "") + extra)
    return recipe


def test_plan_splits_the_run_into_phases(tmp_path):
    p, _ = make_plan(phased_recipe(tmp_path), host=Host())
    main, long = p.phases
    assert (main.start, main.end, long.start, long.end) == (0, 14, 14, 20)
    assert (long.seq_len, long.global_batch, long.micro_batch, long.grad_accum) == (64, 4, 4, 1)
    assert long.rope_theta == 40000 and long.weight_decay == 0.0 and main.weight_decay == 0.1
    assert p.steps == 20 and p.tokens == 14 * 8 * 32 + 6 * 4 * 64
    j = p.to_json()
    assert [ph["name"] for ph in j["phases"]] == ["main", "long"]
    assert j["phases"][1]["changes"] == ["train.seq_len", "train.global_batch", "model.rope_theta", "optimizer.lr",
                                         "optimizer.weight_decay", "schedule"]
    # attention FLOPs grow with seq_len: the long phase costs more per token
    flops = p.estimates["phase_flops"]
    assert flops["long"] / (6 * 4 * 64) > flops["main"] / (14 * 8 * 32)
    assert p.estimates["total_flops"] == sum(flops.values())


def test_the_plans_memory_line_names_the_phase_it_counts(tmp_path):
    """Phases with other batch shapes: the memory plan is the largest phase's activations, and says which phase."""
    from malt.compiler.cli import _plan_text
    from malt.compiler.passes.estimate import activations

    long = TWO_PHASES.replace("global_batch: 4}", "global_batch: 8}")  # 8 × 64 tokens a micro-batch against main's 8 × 32
    p, _ = make_plan(phased_recipe(tmp_path, long), host=Host())
    main_ph, long_ph = p.phases
    assert p.estimates["memory_per_device_bytes"]["activations"] == activations(p, long_ph.micro_batch, long_ph.seq_len)
    assert p.estimates["activations_phase"] == "long"
    assert "(phase long's, the most of the phases)" in _plan_text(p)
    plain, _ = make_plan(write_tiny_recipe(tmp_path / "plain"), host=Host())
    assert "activations_phase" not in plain.estimates and "the most of the phases" not in _plan_text(plain)



def test_the_plans_batch_line_is_the_first_phases_own(tmp_path):
    """With phases of other batch shapes the batch line is labelled with the first phase, so it shows that
    phase's numbers, not the recipe's train section (a first phase may set its own)."""
    from malt.compiler.cli import _plan_text

    first_own = TWO_PHASES.replace("- {name: main, share: 70%}", "- {name: main, share: 70%, train: {seq_len: 16, global_batch: 16}}")
    p, _ = make_plan(phased_recipe(tmp_path, first_own), host=Host())
    main_ph = p.phases[0]
    assert (main_ph.seq_len, main_ph.global_batch) == (16, 16) != (p.recipe.train.seq_len, p.recipe.train.global_batch)
    line = next(x for x in _plan_text(p).splitlines() if x.startswith("batch"))
    assert line == (f"batch      16 sequences × seq_len 16; micro_batch {main_ph.micro_batch} × {main_ph.grad_accum} "
                    "accumulation (phase main)")
    long_ph = p.phases[1]  # the phases list gives each phase's own split
    assert (f"seq_len 64 × batch 4 (micro_batch {long_ph.micro_batch} × {long_ph.grad_accum})") in _plan_text(p)
    # the same batches split differently: the first phase's split, not the recipe's (found by a review)
    micro_only = "\nphases:\n  - {name: a, share: 50%, train: {micro_batch: 4}}\n  - {name: b, share: 50%, train: {micro_batch: 2}}\n"
    q, _ = make_plan(phased_recipe(tmp_path / "m", micro_only), host=Host())
    a, b = q.phases
    text = _plan_text(q)
    assert next(x for x in text.splitlines() if x.startswith("batch")).endswith(
        f"micro_batch 4 × {a.grad_accum} accumulation (phase a)")
    assert f"(micro_batch 2 × {b.grad_accum})" in text and b.grad_accum == 2 * a.grad_accum

def test_phase_tokens_and_steps_define_the_run_without_train_length(tmp_path):
    extra = """
phases:
  - {name: a, steps: 5}
  - {name: b, tokens: 2048, train: {seq_len: 64}}
"""
    recipe = phased_recipe(tmp_path, extra)
    recipe.write_text(recipe.read_text().replace("steps: 20, ", ""))
    p, _ = make_plan(recipe, host=Host())
    assert [(ph.start, ph.end) for ph in p.phases] == [(0, 5), (5, 9)]  # 2048 tokens / (8 × 64) = 4 steps


@pytest.mark.parametrize("extra, message", [
    ("phases:\n  - {name: a, share: 50%}\n  - {name: b, share: 40%}\n", "add up to 90%, not 100%"),
    ("phases:\n  - {name: a, share: 60%}\n  - {name: a, share: 40%}\n", "another phase is already named 'a'"),
    ("phases:\n  - {name: a, share: 60%}\n  - {name: b, share: 40%, optimizer: {lr: 1e-4}}\n", "needs its own schedule"),
    ("phases:\n  - {name: a, share: 60%}\n  - {name: b, share: 40%, data: {weights: {corpsu: 1}}}\n", "did you mean 'corpus'?"),
    ("phases:\n  - {name: a, share: 60%, steps: 3}\n  - {name: b, share: 40%}\n", "exactly one of share, tokens or steps"),
    ("phases:\n  - {name: a, share: 60%}\n  - {name: b, share: 40%, train: {global_batch: 6, micro_batch: 4}}\n", "not divisible"),
    ("phases:\n  - {name: a, share: 60%}\n  - {name: b, share: 40%, schedule: {decay: cosine, decay_share: 10%}}\n",
     "decay_share is not used by decay 'cosine'"),
    ("phases:\n  - {name: a, steps: 5}\n  - {name: b, steps: 5}\n", "the phases cover 10 steps but train.steps is 20"),
])
def test_phase_problems_point_into_the_recipe(tmp_path, extra, message):
    recipe = phased_recipe(tmp_path, extra)
    with pytest.raises(RecipeError) as err:
        make_plan(recipe, host=Host())
    text = str(err.value)
    assert message in text
    assert "recipe.yaml:" in text and "hint:" in text


def test_generated_lr_matches_the_plan_at_every_step(tmp_path):
    recipe = phased_recipe(tmp_path)
    p = compile_to(recipe, tmp_path / "run", host=Host())
    t = load_train(tmp_path / "run")
    assert [t.lr_at(s) for s in range(p.steps)] == [lr_at(p, s) for s in range(p.steps)]
    assert t.lr_at(14) == pytest.approx(1e-3 / 1)  # re-warming: 10% of 6 steps rounds to 1 warmup step to the new peak
    assert t.lr_at(19) == pytest.approx(1e-3 - (1e-3 - 1e-4) * 4 / 5)


@pytest.mark.slow
def test_two_phase_run_resumes_inside_the_second_phase_exactly(tmp_path):
    recipe = phased_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("eval_batches: 2,", "eval_batches: 2, keep_checkpoints: 20,"))
    cache = tmp_path / "cache"
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    compile_to(recipe, full, host=Host())
    proc = run_program(full, cache)
    assert "phase long: steps 14 to 20" in proc.stdout
    ref = losses(full)
    assert sorted(ref) == list(range(1, 21))
    # the same run as if it had stopped after its checkpoint at step 16, inside phase 'long'
    compile_to(recipe, resumed, host=Host())
    shutil.copytree(full / "checkpoints" / "step_00000016", resumed / "checkpoints" / "step_00000016")
    (resumed / "checkpoints" / "latest").write_text("step_00000016\n")
    shutil.copy(full / "tokenizer.json", resumed / "tokenizer.json")
    out = run_program(resumed, cache, "--resume")
    assert "resumed t at step 16" in out.stdout and "phase long" in out.stdout
    assert {s: l for s, l in losses(resumed).items()} == {s: l for s, l in ref.items() if s > 16}
    assert {s: v for s, v in val_losses(resumed).items()} == {s: v for s, v in val_losses(full).items() if s > 16}
    tokens = [json.loads(line)["tokens"] for line in (resumed / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert tokens == [14 * 8 * 32 + (s - 14) * 4 * 64 for s in range(17, 21)]
    # the exported model has the rotary base it was last trained with (phase long's), not model.rope_theta's
    from malt.runtime.export import export_hf

    export_hf(full, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 40000
    from transformers import AutoModelForCausalLM

    from malt.runtime.export import load_run_model

    model, _, _ = load_run_model(full)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 257, (1, 48))
    with torch.no_grad():
        assert torch.allclose(model(x), hf(x).logits, atol=1e-5)


@pytest.mark.slow
def test_two_processes_evaluate_each_phase_as_one(tmp_path):
    """Each phase's validation set (eval_batches of its global batches, at its seq_len) is the same on two DDP
    processes as on one: the val losses of both phases agree, and so do the training losses."""
    from .test_distributed import torchrun

    recipe = phased_recipe(tmp_path)
    cache = tmp_path / "cache"
    one, two = tmp_path / "one", tmp_path / "two"
    compile_to(recipe, one, host=Host())
    compile_to(recipe, two, sets=["target.devices=2", "target.parallelism=ddp"], host=Host())
    assert 'phase["device_batch"]' in (two / "train.py").read_text()
    run_program(one, cache, "--quiet")
    torchrun(two, cache)
    ref, got = val_losses(one), val_losses(two)
    assert sorted(got) == sorted(ref) == [0, 4, 8, 12, 16, 20]  # 16 and 20 in phase long
    for step, v in ref.items():
        assert got[step] == pytest.approx(v, rel=2e-5, abs=2e-5), step
    for step, v in losses(one).items():
        assert losses(two)[step] == pytest.approx(v, rel=2e-5, abs=2e-5), step


def test_phase_mixture_over_sources_only_a_phase_uses(tmp_path):
    extra = """
phases:
  - {name: main, share: 50%}
  - name: cooldown
    share: 50%
    data:
      sources:
        - {name: extra, path: extra.jsonl, weight: 3}
        - {name: corpus, path: corpus.jsonl, weight: 1}
"""
    recipe = phased_recipe(tmp_path, extra)
    write_corpus(recipe.parent / "extra.jsonl", 50, seed=3)
    p = compile_to(recipe, tmp_path / "run", host=Host())
    assert [s.name for s in p.sources] == ["corpus", "extra"]
    assert [ph.weights for ph in p.phases] == [(1.0, 0.0), (1.0, 3.0)]
    src = (tmp_path / "run" / "train.py").read_text()
    assert "'weights': {'corpus': 1.0, 'extra': 3.0}" in src.replace("\n", " ").replace("  ", " ") or "'extra': 3.0" in src


def test_phase_model_changes_are_not_built_yet(tmp_path):
    extra = """
phases:
  - {name: small, share: 50%}
  - {name: big, share: 50%, model: {n_layers: 4}}
"""
    with pytest.raises(RecipeError) as err:
        make_plan(phased_recipe(tmp_path, extra), host=Host())
    text = str(err.value)
    assert "phases.1.model.n_layers: a phase that changes model.n_layers is not built yet" in text
    assert "growth: {method: stack, factor: 2}" in text
    assert "unknown key" not in text


GROWTH = """
phases:
  - {name: small, share: 40%}
  - {name: grown, share: 60%, growth: {method: stack, factor: 2}}
"""


def test_growth_plan_counts_parameters_and_flops_per_phase(tmp_path):
    p, _ = make_plan(phased_recipe(tmp_path, GROWTH), host=Host())
    small, grown = p.phases
    assert (small.n_layers, grown.n_layers, p.n_layers) == (2, 4, 4)
    j = p.to_json()
    per_layer = p.estimates["params"] - j["phases"][0]["params"]
    assert j["phases"][1]["params"] == p.estimates["params"] and per_layer > 0
    assert j["model"]["n_layers"] == 4
    fl = p.estimates["phase_flops"]
    assert fl["grown"] / grown.steps > fl["small"] / small.steps  # a deeper model costs more per step


@pytest.mark.slow
def test_growth_by_stacking_preserves_weights_and_resumes_across_it(tmp_path):
    recipe = phased_recipe(tmp_path, GROWTH)
    recipe.write_text(recipe.read_text().replace("eval_batches: 2,", "eval_batches: 2, keep_checkpoints: 20,"))
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    compile_to(recipe, full, host=Host())
    out = run_program(full, cache)
    assert "growth: stacked to 4 layers" in out.stdout
    ref = losses(full)
    assert sorted(ref) == list(range(1, 21))

    # the grown model's layers are the small model's, tiled: load the checkpoint taken just before growth
    import importlib.util

    spec = importlib.util.spec_from_file_location("grown_model", full / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from safetensors.torch import load_model
    small = mod.Transformer(n_layers=2)
    load_model(small, str(full / "checkpoints" / "step_00000008" / "model.safetensors"))
    big = mod.grow_by_stacking(small, 2)
    assert len(big.layers) == 4
    sd_small, sd_big = small.state_dict(), big.state_dict()
    for i in range(4):
        for k, v in small.layers[i % 2].state_dict().items():
            assert torch.equal(sd_big[f"layers.{i}.{k}"], v)
    for k in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        assert torch.equal(sd_big[k], sd_small[k])
    with torch.no_grad():
        tokens = torch.randint(0, 257, (1, 16))
        assert big(tokens).shape == small(tokens).shape

    # a run stopped before its growth is still small: sample and export see its 2 layers
    from malt.runtime.export import export_hf, load_run_model

    stopped = tmp_path / "stopped"
    compile_to(recipe, stopped, host=Host())
    shutil.copytree(full / "checkpoints" / "step_00000008", stopped / "checkpoints" / "step_00000008")
    (stopped / "checkpoints" / "latest").write_text("step_00000008\n")
    shutil.copy(full / "tokenizer.json", stopped / "tokenizer.json")
    model, _, _ = load_run_model(stopped)
    assert len(model.layers) == 2 and torch.equal(model.lm_head.weight, sd_small["lm_head.weight"])
    export_hf(stopped, tmp_path / "hf-small")
    assert json.loads((tmp_path / "hf-small" / "config.json").read_text())["num_hidden_layers"] == 2

    # resume from the last checkpoint before growth (step 8: small model) and from one after it (step 10)
    for at in (8, 10):
        resumed = tmp_path / f"resumed{at}"
        compile_to(recipe, resumed, host=Host())
        shutil.copytree(full / "checkpoints" / f"step_{at:08d}", resumed / "checkpoints" / f"step_{at:08d}")
        (resumed / "checkpoints" / "latest").write_text(f"step_{at:08d}\n")
        run_program(resumed, cache, "--resume")
        assert losses(resumed) == {s: v for s, v in ref.items() if s > at}


def test_growth_by_stacking_under_pure_bf16_stays_bf16_and_resumes(tmp_path):
    """target.precision pure_bf16: the grown model is bf16 like the small one (no fp32 copy appears at the
    growth), trains on, and a resume after the growth repeats the uninterrupted run."""
    from safetensors import safe_open

    recipe = phased_recipe(tmp_path, GROWTH)
    recipe.write_text(recipe.read_text().replace("eval_batches: 2,", "eval_batches: 2, keep_checkpoints: 20,"))
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    compile_to(recipe, full, sets=["target.precision=pure_bf16"], host=Host())
    out = run_program(full, cache)
    assert "growth: stacked to 4 layers" in out.stdout
    ref = losses(full)
    assert sorted(ref) == list(range(1, 21)) and all(v == v for v in ref.values())  # no NaN
    with safe_open(str(full / "checkpoints" / "step_00000020" / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
        assert any(k.startswith("layers.3.") for k in f.keys())
    with safe_open(str(full / "checkpoints" / "step_00000020" / "optimizer.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys() if k.endswith(("exp_avg", "exp_avg_sq"))} == {"torch.bfloat16"}
    resumed = tmp_path / "resumed"
    compile_to(recipe, resumed, sets=["target.precision=pure_bf16"], host=Host())
    shutil.copytree(full / "checkpoints" / "step_00000010", resumed / "checkpoints" / "step_00000010")
    (resumed / "checkpoints" / "latest").write_text("step_00000010\n")
    run_program(resumed, cache, "--resume")
    assert losses(resumed) == {s: v for s, v in ref.items() if s > 10}


def test_phase_schedules_are_named_after_their_phases(tmp_path):
    """A phase's own schedule reads PHASE_<NAME>_LR ... and is lr_phase_<name>; names that make no unique
    identifier fall back to the phase's number."""
    extra = TWO_PHASES.replace("name: long", "name: long-ctx")
    compile_to(phased_recipe(tmp_path / "a", extra), tmp_path / "a" / "run", host=Host())
    text = (tmp_path / "a" / "run" / "train.py").read_text()
    assert "PHASE_LONG_CTX_LR = 0.001" in text and "def lr_phase_long_ctx(t: int)" in text
    assert "Phase long-ctx's own schedule (phases[1])" in text
    clash = """
phases:
  - {name: a-b, share: 50%, schedule: {warmup: 0, decay: constant}}
  - {name: a_b, share: 50%, schedule: {warmup: 0, decay: linear}}
"""
    compile_to(phased_recipe(tmp_path / "b", clash), tmp_path / "b" / "run", host=Host())
    text = (tmp_path / "b" / "run" / "train.py").read_text()
    assert "def lr_phase_1(t: int)" in text and "def lr_phase_2(t: int)" in text and "PHASE_2_MIN_LR" in text


def test_the_lr_plot_marks_phases_and_keeps_short_peaks(tmp_path):
    """malt plan --lr: a column shows the highest lr of its steps, so a short re-warmed phase far below the peak
    still shows; phase starts are marked under the axis and named in the table; the axis ends at the last step."""
    from typer.testing import CliRunner

    from malt.compiler.cli import app

    extra = """
phases:
  - {name: main, share: 97%}
  - {name: rewarm, share: 3%, optimizer: {lr: 1e-5}, schedule: {warmup: 0, decay: constant}}
"""
    recipe = phased_recipe(tmp_path, extra, steps=200)
    out = CliRunner().invoke(app, ["plan", str(recipe), "--lr"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    axis = next(i for i, line in enumerate(lines) if line.lstrip().startswith("+---"))
    assert lines[axis - 1].rstrip().endswith("▁")                   # the low last phase, below the bottom row's cut
    assert "^" in lines[axis + 1] and "(^ phase starts)" in lines[axis + 1]
    assert lines[axis + 2].rstrip().endswith("199")                  # steps 0..199
    assert any(line.startswith("194 ") and line.endswith("phase rewarm starts") for line in lines), out.output
