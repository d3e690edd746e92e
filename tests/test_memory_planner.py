"""The memory planner: (model size × device memory) → layout (parallelism, micro-batch, accumulation, checkpointing).

Table-driven fixtures over the passes that share the memory budget (choose_parallelism,
choose_checkpointing, batch_split, estimate) and the fit check (compiler/fit.py) that
stops a recipe that cannot fit with the smallest change that would make it fit.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from malt.compiler.api import check
from malt.compiler.api import plan as make_plan
from malt.compiler.diagnostics import RecipeError
from malt.compiler.estimates import AUTOCAST_FP32_PER_LAYER, CHIPS, GiB, activation_bytes
from malt.compiler.passes import estimate
from malt.compiler.passes.batch_split import BUDGET_SHARE
from malt.compiler.plan import Host

from .helpers import write_tiny_recipe

SIZES = {  # Llama shapes: 124M (GPT-2 small), 1.3B, 7B (Llama-2), 70B (Llama-2, GQA)
    "124M": ["model.d_model=768", "model.n_layers=12", "model.n_heads=12", "model.n_kv_heads=12", "model.d_ff=2048"],
    "1.3B": ["model.d_model=2048", "model.n_layers=24", "model.n_heads=16", "model.n_kv_heads=16", "model.d_ff=5504"],
    "7B": ["model.d_model=4096", "model.n_layers=32", "model.n_heads=32", "model.n_kv_heads=32", "model.d_ff=11008"],
    "70B": ["model.d_model=8192", "model.n_layers=80", "model.n_heads=64", "model.n_kv_heads=8", "model.d_ff=28672"],
}
BASE = ["model.vocab_size=32000", "train.seq_len=2048", "train.global_batch=256", "train.micro_batch=auto",
        "target.accelerator=cuda", "target.precision=bf16", "target.compile=off"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return write_tiny_recipe(tmp_path_factory.mktemp("planner"))


def planned(recipe, size, chip, devices=1, nodes=1, extra=()):
    sets = BASE + SIZES[size] + [f"target.chip={chip}", f"target.devices={devices}", f"target.nodes={nodes}", *extra]
    p, _ = make_plan(recipe, sets, host=Host())
    return p


@pytest.mark.parametrize("size, chip, devices, nodes, layout", [
    # size   chip         per node  nodes  (parallelism, micro_batch, grad_accum, activation checkpointing)
    ("124M", "a100-40gb", 1, 1, ("single", 16, 16, "none")),
    ("124M", "h200",      1, 1, ("single", 64, 4, "none")),
    ("124M", "h100",      8, 4, ("ddp", 8, 1, "none")),          # 256 / 32 devices = 8 each, all at once
    ("1.3B", "a100-40gb", 1, 1, ("single", 1, 256, "none")),
    ("1.3B", "a100-80gb", 1, 1, ("single", 4, 64, "none")),
    ("1.3B", "a100-40gb", 8, 1, ("fsdp", 4, 8, "none")),         # 24 GiB of replicated state > 50% of 40 GB: shard
    ("7B",   "h100",      8, 1, ("fsdp", 2, 16, "none")),
    ("7B",   "h100",      8, 4, ("hsdp", 2, 4, "none")),         # sharded over a node's 8 fits: no cross-node all-gathers
    ("70B",  "h100",      8, 4, ("fsdp", 2, 4, "full")),         # one sequence needs more than selective; full fits 4
    ("70B",  "h100",      8, 8, ("fsdp", 4, 1, "full")),         # selective does not fit one sequence; full fits 4
    ("70B",  "h200",      8, 4, ("fsdp", 1, 8, "selective")),    # one sequence fits with the MLPs recomputed
    ("70B",  "tpu-v5p",   8, 4, ("fsdp", 2, 4, "full")),
    ("7B",   "tpu-v4",    8, 1, ("fsdp", 4, 8, "full")),         # 32 GiB chips
    ("7B",   "tpu-v5e",   8, 4, ("fsdp", 2, 4, "full")),         # 16 GiB chips: a node's share is too big for HSDP
])
def test_layout_table(recipe, size, chip, devices, nodes, layout):
    if chip.startswith("tpu"):  # a TPU chip goes with accelerator tpu (its own pass); here only its memory matters
        p = planned(recipe, size, "h100", devices, nodes, [f"target.memory_per_device={CHIPS[chip].memory_bytes}B"])
    else:
        p = planned(recipe, size, chip, devices, nodes)
    assert (p.parallelism, p.micro_batch, p.grad_accum, p.activation_checkpointing) == layout
    assert p.world == devices * nodes and p.micro_batch * p.grad_accum * p.world == 256
    budget = BUDGET_SHARE * p.estimates["memory_budget_bytes"]
    assert p.estimates["memory_per_device_bytes"]["total"] <= budget
    # and the choice is the least costly that fits: twice the micro-batch would not fit, nor less checkpointing
    device_batch = 256 // p.world
    if p.micro_batch < device_batch:
        bigger = replace(p, micro_batch=p.micro_batch * 2, phases=tuple(replace(ph, micro_batch=ph.micro_batch * 2) for ph in p.phases))
        assert estimate.run(bigger).estimates["memory_per_device_bytes"]["total"] > budget
    if p.activation_checkpointing != "none":
        less = {"selective": "none", "full": "selective"}[p.activation_checkpointing]
        assert estimate.run(replace(p, activation_checkpointing=less)).estimates["memory_per_device_bytes"]["total"] > budget


def test_known_accelerator_memory():
    assert {k: round(c.memory_bytes / GiB, 1) for k, c in CHIPS.items()} == {
        "a100-40gb": 40.0, "a100-80gb": 80.0, "h100": 80.0, "h200": 131.3, "tpu-v4": 32.0, "tpu-v5e": 16.0, "tpu-v5p": 88.5}


def test_memory_per_device_overrides_the_table(recipe):
    small = planned(recipe, "1.3B", "h100", extra=["target.memory_per_device=40GiB"])
    table = planned(recipe, "1.3B", "a100-40gb")
    assert small.estimates["memory_budget_bytes"] == 40 * GiB
    assert (small.micro_batch, small.grad_accum) == (table.micro_batch, table.grad_accum)
    assert "target.memory_per_device" in next(d.reason for d in small.decisions if d.name == "micro_batch")
    with pytest.raises(RecipeError, match="memory size such as 80GB"):
        check(recipe, ["target.memory_per_device=lots"])


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_explicit_checkpointing_is_kept_and_shrinks_activations(recipe, mode):
    p = planned(recipe, "1.3B", "h100", extra=[f"target.activation_checkpointing={mode}", "train.micro_batch=1"])
    assert p.activation_checkpointing == mode
    assert next(d.reason for d in p.decisions if d.name == "activation_checkpointing") == f"target.activation_checkpointing {mode}"


def test_activation_bytes_by_hand():
    # 2 sequences × 8 tokens, d 16, 3 layers, kv 8, d_ff 32, vocab 100, fp32
    t, w = 16, 4
    attn, mlp = (7 * 16 + 3 * 8) * w, 4 * 32 * w
    chunked_head = t * (16 * w + 16 * 4) + 100 * 16 * 4 + min(512, t) * 100 * (4 + w)
    assert activation_bytes(2, 8, 16, 3, 8, 32, 100, "fp32") == t * 3 * (attn + mlp) + chunked_head
    assert activation_bytes(2, 8, 16, 3, 8, 32, 100, "fp32", "selective") == t * (3 * attn + mlp) + chunked_head
    assert activation_bytes(2, 8, 16, 3, 8, 32, 100, "fp32", "full") == t * (3 * 16 * w + attn + mlp) + chunked_head
    # compiled: the whole fp32 logits and their gradient
    # compiled: the loss fused with the head keeps about one (tokens, vocab) tensor in the compute dtype
    assert activation_bytes(2, 8, 16, 3, 8, 32, 100, "fp32", loss_chunk=None) == t * 3 * (attn + mlp) + t * (16 * w + 100 * w)


def test_chunked_loss_is_counted_as_chunked(recipe):
    # 124M at seq 2048, micro_batch 8: compiled, one bf16 (tokens, vocab) tensor, 16k × 32k × 2 bytes = 1 GiB
    eager = planned(recipe, "124M", "h100", extra=["train.micro_batch=8"])
    compiled = planned(recipe, "124M", "h100", extra=["train.micro_batch=8", "target.compile=on"])
    gap = compiled.estimates["memory_per_device_bytes"]["activations"] - eager.estimates["memory_per_device_bytes"]["activations"]
    tokens = 8 * 2048
    eager_fp32 = tokens * 12 * AUTOCAST_FP32_PER_LAYER * 768   # the fp32 tensors eager bf16 autocast keeps (12 layers); compiled: fused
    assert gap == tokens * 32000 * 2 - (tokens * 768 * 4 + 32000 * 768 * 4 + 512 * 32000 * 6) - eager_fp32


def test_explicit_attention_masks_are_counted(recipe):
    """The CPU's document mask (batch, 1, T, T) bool is kept for the backward, and each layer keeps SDPA's fp32 copy
    of it; causal SDPA keeps none."""
    sets = ["train.seq_len=256", "train.global_batch=8", "train.micro_batch=4", "target.accelerator=cpu",
            "target.precision=fp32", "target.compile=off"]
    concat, _ = make_plan(recipe, sets, host=Host())
    packed, _ = make_plan(recipe, [*sets, "data.packing=document"], host=Host())
    assert (concat.attention, packed.attention) == ("sdpa_causal", "sdpa_mask")
    gap = packed.estimates["memory_per_device_bytes"]["activations"] - concat.estimates["memory_per_device_bytes"]["activations"]
    assert gap == 4 * 256 * 256 * (1 + 4 * packed.n_layers)


def test_checkpointing_adds_recompute_time(recipe):
    none = planned(recipe, "1.3B", "h100", extra=["target.activation_checkpointing=none", "train.micro_batch=1"])
    full = planned(recipe, "1.3B", "h100", extra=["target.activation_checkpointing=full", "train.micro_batch=1"])
    assert "recompute_flops" not in none.estimates
    # full recomputes the forward of every block: about a third of the model's training FLOPs
    ratio = full.estimates["estimated_seconds"] / none.estimates["estimated_seconds"]
    assert 1.25 < ratio < 1.34


# ---- recipes that cannot fit: the smallest change that would -----------------------------------

def fit_error(recipe, sets):
    with pytest.raises(RecipeError) as info:
        make_plan(recipe, BASE + sets, host=Host())
    (d,) = info.value.diagnostics
    assert d.path == "target" and "the run does not fit" in d.message
    return d


@pytest.mark.parametrize("sets, fix", [
    (SIZES["124M"] + ["target.chip=a100-40gb", "train.micro_batch=256", "target.activation_checkpointing=none"],
     "a smaller micro-batch: train.micro_batch: 16 (or auto) instead of 256, with 16 accumulation steps"),
    (SIZES["1.3B"] + ["target.chip=a100-40gb", "train.micro_batch=1", "train.seq_len=8192", "target.activation_checkpointing=none"],
     "activation checkpointing: target.activation_checkpointing: full (or auto)"),
    (SIZES["7B"] + ["target.chip=h100", "target.devices=8", "target.parallelism=ddp"],
     "FSDP: target.parallelism: fsdp (shards weights, gradients and AdamW state over the 8 devices)"),
    (SIZES["7B"] + ["target.chip=a100-40gb"], "more devices: target.devices: 8 and target.parallelism: fsdp"),  # 5-7 do not divide 256
    (SIZES["70B"] + ["target.chip=h100", "target.devices=8"],
     "more devices: target.nodes: 4 with target.devices: 8 and target.parallelism: fsdp"),
])
def test_a_recipe_that_cannot_fit_names_the_smallest_change(recipe, sets, fix):
    d = fit_error(recipe, sets)
    assert d.hint.startswith(f"the smallest change that fits: {fix}"), d.hint


def test_fit_error_points_at_the_target_section_and_fails_check(tmp_path):
    from malt.compiler.cli import app
    from typer.testing import CliRunner

    path = write_tiny_recipe(tmp_path)
    text = path.read_text().replace("target: {accelerator: cpu, precision: fp32, compile: off}",
                                    "target: {accelerator: cpu, precision: fp32, compile: off, memory_per_device: 2MB}")
    path.write_text(text)
    line = text.splitlines().index(next(ln for ln in text.splitlines() if ln.startswith("target:"))) + 1
    for command in ("check", "plan"):
        r = CliRunner().invoke(app, [command, str(path)])
        assert r.exit_code == 2, r.output
        assert f"recipe.yaml:{line}:1: error: target: the run does not fit" in r.stderr
        assert "hint: the smallest change that fits" in r.stderr and "Traceback" not in r.stderr


def test_auto_checkpointing_makes_a_pinned_micro_batch_fit(recipe):
    p = planned(recipe, "124M", "a100-40gb", extra=["train.micro_batch=128"])
    assert (p.micro_batch, p.activation_checkpointing) == (128, "full")
    assert "full activation checkpointing" in next(d.reason for d in p.decisions if d.name == "activation_checkpointing")


def test_nothing_fits_says_so(recipe):
    d = fit_error(recipe, SIZES["70B"] + ["target.chip=h100", "target.memory_per_device=1GB"])
    assert "make the model smaller" in d.hint


@pytest.mark.parametrize("text, value", [("80GB", 80 * 10**9), ("40GiB", 40 * GiB), ("1.5 TB", 15 * 10**11), ("512MiB", 2**29),
                                         ("1024B", 1024)])
def test_memory_sizes(text, value):
    from malt.compiler.units import parse_bytes

    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["80", 80, "lots", "-1GB", "0GB", True])
def test_bad_memory_sizes(bad):
    from malt.compiler.units import parse_bytes

    with pytest.raises(ValueError, match="memory size such as 80GB"):
        parse_bytes(bad)


def test_detected_gpu_memory_wins_over_the_table(recipe):
    gpu = Host(cuda=True, cuda_name="NVIDIA H100 PCIe", cuda_memory=40 * GiB, cpu_cores=16, memory_bytes=128 * GiB)
    p, _ = make_plan(recipe, BASE + SIZES["1.3B"] + ["target.chip=auto"], host=gpu)
    assert p.chip == "h100" and p.estimates["memory_budget_bytes"] == 40 * GiB
    assert (p.micro_batch, p.grad_accum) == (1, 256)  # as on a 40 GB A100 (the table above), not 80 GB
    assert "NVIDIA H100 PCIe (detected)" in next(d.reason for d in p.decisions if d.name == "micro_batch")
    named, _ = make_plan(recipe, BASE + SIZES["1.3B"] + ["target.chip=h100"], host=gpu)  # a named chip: its table entry
    assert named.estimates["memory_budget_bytes"] == 80 * GiB


def test_a_distillation_teacher_is_in_the_auto_choices(tmp_path):
    """A 13B teacher for a 124M student: its matmul weights count 2 bytes a parameter (stored in bf16) and the rest 4,
    parallelism auto shards when student and teacher do not fit replicated, and checkpointing auto counts them too."""
    import json

    from malt.compiler.objectives import teacher_weight_bytes

    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 5120, "intermediate_size": 13824,
        "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}))
    (teacher / "model.safetensors").write_bytes(b"")
    recipe = write_tiny_recipe(tmp_path / "r")
    recipe.write_text(recipe.read_text() + f"objective: {{kind: distill, teacher: {teacher}, weight: 50%}}\n")
    p = planned(recipe, "124M", "a100-40gb", devices=2)
    t = p.teacher
    # bf16 autocast: the matmul weights are stored in bf16 (teacher.matmuls_in); the tied embedding and norms in fp32
    fp32_params = 32000 * 5120 + (2 * 40 + 1) * 5120
    assert p.estimates["teacher_params"] == fp32_params + 40 * (4 * 5120 * 5120 + 3 * 5120 * 13824)
    assert teacher_weight_bytes(p) * 2 == fp32_params * 4 + (p.estimates["teacher_params"] - fp32_params) * 2
    assert p.parallelism == "fsdp" and "with the distillation teacher's weights" in next(
        d.reason for d in p.decisions if d.name == "parallelism")
    assert t["n_layers"] == 40
    from malt.compiler.objectives import distill_logits_bytes
    from malt.compiler.passes.choose_checkpointing import fits
    from malt.compiler.passes.estimate import activations, states

    one = planned(recipe, "124M", "a100-40gb", extra=["train.global_batch=8"])
    _, peak = fits(one, "none")  # what checkpointing auto weighs: the teacher's weights and logits included
    mb = one.phases[0].micro_batch
    assert peak == (sum(states(one).values()) + teacher_weight_bytes(one) + activations(one, mb, 2048, checkpointing="none")
                    + distill_logits_bytes(one, mb, 2048))


def test_a_fix_names_every_setting_it_relied_on(recipe):
    """A 7B model with micro_batch 8 and no checkpointing on one A100 80GB: the suggested layout fits only with a
    smaller micro-batch and checkpointing; the hint names them, and applying it as written fits."""
    from malt.compiler.fit import smallest_fix

    sets = BASE + SIZES["7B"] + ["target.chip=a100-80gb", "target.activation_checkpointing=none", "train.micro_batch=8"]
    p, _ = make_plan(recipe, sets, host=Host(), check_fit=False)
    text, fixed = smallest_fix(p)
    assert "more devices: target.devices: 2 and target.parallelism: fsdp" in text
    assert f"with train.micro_batch: {fixed.micro_batch} (or auto) and target.activation_checkpointing: " \
           f"{fixed.activation_checkpointing} (or auto)" in text
    applied = planned(recipe, "7B", "a100-80gb", devices=2, extra=[
        "target.parallelism=fsdp", f"train.micro_batch={fixed.micro_batch}",
        f"target.activation_checkpointing={fixed.activation_checkpointing}"])
    from malt.compiler.fit import fits
    assert fits(applied)


def test_recomputed_flops_follow_each_phases_depth():
    """Growth by stacking with full activation checkpointing: the small phase recomputes the small model's blocks."""
    from pathlib import Path

    from malt.compiler.passes.estimate import recompute_flops

    stack = Path(__file__).resolve().parent.parent / "recipes" / "tiny-stack.yaml"
    p, _ = make_plan(stack, ["target.activation_checkpointing=full"], host=Host())
    small, big = p.phases[0], p.phases[-1]
    assert small.n_layers < big.n_layers
    expected = sum(recompute_flops(p, ph.n_layers, ph.seq_len) * ph.steps * ph.tokens_per_step for ph in p.phases)
    assert p.estimates["recompute_flops"] == expected < recompute_flops(p) * sum(ph.steps * ph.tokens_per_step for ph in p.phases)
