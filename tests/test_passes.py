"""Fixture tests for each compiler pass: one Plan in, one Plan out, the decision recorded."""

from __future__ import annotations

from dataclasses import replace

import pytest

from malt.compiler.api import plan as make_plan
from malt.compiler.estimates import flops_per_token, param_counts
from malt.compiler.passes import choose_compile, choose_device, choose_precision, pad_vocab, resolve_shape, run_length
from malt.compiler.plan import Host, lower
from malt.compiler.validate import validate
from malt.compiler.loader import load

from .helpers import write_tiny_recipe

CPU = Host(cuda=False, cpu_cores=2, memory_bytes=24 * 2**30)
H100 = Host(cuda=True, cuda_name="NVIDIA H100 80GB HBM3", cpu_cores=16, memory_bytes=128 * 2**30)


@pytest.fixture
def recipe(tmp_path):
    return write_tiny_recipe(tmp_path)


def start(recipe, sets=(), host=CPU):
    loaded = load(recipe, list(sets))
    r = validate(loaded)
    return lower(r, loaded.file, 257, host)


def decision(plan, name):
    return next(d for d in plan.decisions if d.name == name)


def test_resolve_shape_llama_d_ff_rule_and_kv_default(recipe):
    p = resolve_shape.run(start(recipe, ["model.d_ff=null", "model.d_model=4096", "model.n_heads=32", "model.n_kv_heads=null"]))
    assert p.d_ff == 11008  # Llama-7B's width: 8/3 × 4096 rounded up to 256
    assert p.n_kv_heads == 32 and p.head_dim == 128
    assert "8/3" in decision(p, "d_ff").reason


def test_pad_vocab_rounds_up_to_multiple(recipe):
    p = pad_vocab.run(resolve_shape.run(start(recipe)))
    assert (p.vocab_size, p.padded_vocab) == (257, 320)
    p = pad_vocab.run(resolve_shape.run(start(recipe, ["model.pad_vocab_multiple=1"])))
    assert p.padded_vocab == 257


def test_pass_does_not_mutate_its_input(recipe):
    p0 = resolve_shape.run(start(recipe))
    before = p0.to_json()
    pad_vocab.run(p0)
    assert p0.to_json() == before and p0.padded_vocab == 0


@pytest.mark.parametrize("sets, steps, warmup, decay_start", [
    (["train.steps=null", "train.tokens=1M", "train.seq_len=128", "train.global_batch=16", "schedule.warmup=5%"], 488, 24, 24),
    (["train.steps=1000", "schedule.warmup=100", "schedule.decay=wsd", "schedule.decay_share=20%"], 1000, 100, 800),
    (["train.steps=2k", "schedule.warmup=0"], 2000, 0, 0),
])
def test_run_length(recipe, sets, steps, warmup, decay_start):
    p = run_length.run(start(recipe, sets))
    assert (p.steps, p.warmup_steps, p.decay_start) == (steps, warmup, decay_start)
    assert p.tokens == steps * p.tokens_per_step


def test_device_precision_compile_on_a_gpu_host(recipe):
    p = start(recipe, ["target.accelerator=auto", "target.precision=auto", "target.compile=auto"], host=H100)
    p = choose_compile.run(choose_precision.run(choose_device.run(p)))
    assert (p.device, p.chip, p.precision, p.compile) == ("cuda", "h100", "bf16", True)
    assert "H100" in decision(p, "device").reason


def test_device_precision_compile_on_this_cpu(recipe):
    p = start(recipe, ["target.accelerator=auto", "target.precision=auto", "target.compile=auto"], host=CPU)
    p = choose_compile.run(choose_precision.run(choose_device.run(p)))
    assert (p.device, p.chip, p.precision, p.compile) == ("cpu", "cpu", "fp32", False)


def test_cpu_with_native_bf16_gets_bf16_autocast(recipe):
    auto = ["target.accelerator=auto", "target.precision=auto"]
    p = choose_precision.run(choose_device.run(start(recipe, auto, host=replace(CPU, cpu_bf16=True))))
    assert p.precision == "bf16" and "avx512_bf16" in decision(p, "precision").reason
    p = choose_precision.run(choose_device.run(start(recipe, auto, host=CPU)))
    assert p.precision == "fp32" and "no native bf16" in decision(p, "precision").reason


def test_cpu_compile_auto_only_where_it_pays_off(recipe):
    def compiled(host, steps):
        sets = ["target.accelerator=cpu", "target.precision=fp32", "target.compile=auto", f"train.steps={steps}"]
        p = choose_compile.run(choose_precision.run(choose_device.run(run_length.run(pad_vocab.run(resolve_shape.run(
            start(recipe, sets, host=host)))))))
        return p.compile, decision(p, "compile").reason

    with_cxx = replace(CPU, cxx_compiler=True)
    short, why = compiled(with_cxx, 100)
    assert not short and "does not pay off" in why
    steps = int(choose_compile.CPU_COMPILE_SECONDS / choose_compile.CPU_COMPILE_GAIN * 2 * 80e9 * 0.5
                / (flops_per_token(param_counts(64, 2, 4, 2, 16, 128, 320, True, False)["matmul_params"], 2, 4, 16, 32) * 8 * 32)) + 1
    long_, why = compiled(with_cxx, steps)
    assert long_ and "pays off" in why
    assert compiled(with_cxx, steps - 2)[0] is False          # the threshold is where the estimate says
    no_cxx, why = compiled(CPU, steps)
    assert not no_cxx and "C++ compiler" in why


def test_explicit_target_wins(recipe):
    p = start(recipe, ["target.accelerator=cuda", "target.chip=a100-40gb", "target.precision=fp32", "target.compile=off"], host=CPU)
    p = choose_compile.run(choose_precision.run(choose_device.run(p)))
    assert (p.device, p.chip, p.precision, p.compile) == ("cuda", "a100-40gb", "fp32", False)


def test_batch_split_auto_fits_memory(recipe):
    # a 1.3B-parameter model at seq 2048 does not fit 512 sequences at once on a 40 GB A100
    sets = ["model.d_model=2048", "model.n_layers=24", "model.n_heads=16", "model.n_kv_heads=16", "model.d_ff=5504",
            "train.seq_len=2048", "train.global_batch=512", "train.micro_batch=auto",
            "target.accelerator=cuda", "target.chip=a100-40gb", "target.precision=bf16"]
    p, _ = make_plan(recipe, sets, host=CPU)
    assert p.micro_batch * p.grad_accum == 512
    assert 1 <= p.micro_batch < 512
    mem = p.estimates["memory_per_device_bytes"]
    assert mem["total"] <= 0.8 * 40 * 2**30
    # one size up would not have fit
    bigger = replace(p, micro_batch=p.micro_batch * 2, phases=tuple(replace(ph, micro_batch=ph.micro_batch * 2) for ph in p.phases))
    from malt.compiler.passes import estimate
    assert estimate.run(bigger).estimates["memory_per_device_bytes"]["total"] > 0.8 * 40 * 2**30
    assert "accumulation" in decision(p, "micro_batch").reason


def test_batch_split_explicit(recipe):
    p, _ = make_plan(recipe, ["train.micro_batch=2"], host=CPU)
    assert (p.micro_batch, p.grad_accum) == (2, 4)


def test_estimates_by_hand(recipe):
    # d 64, 2 layers, 4 heads (2 kv) of 16, d_ff 128, vocab 257 -> 320, tied
    p, _ = make_plan(recipe, [], host=CPU)
    est = p.estimates
    attn = 64 * 64 + 2 * 64 * 32 + 64 * 64
    mlp = 3 * 64 * 128
    per_layer = attn + mlp + 2 * 64
    assert est["params"] == 320 * 64 + 2 * per_layer + 64
    assert est["flops_per_token"] == 6 * (2 * (attn + mlp) + 320 * 64) + 12 * 2 * 4 * 16 * 32
    assert est["total_flops"] == est["flops_per_token"] * p.tokens
    # evaluations at steps 0, 4 and 8, each a forward (a third of the FLOPs) of eval_batches 2 × global_batch 8 × 32 tokens
    assert (p.steps, p.recipe.train.eval_every, p.recipe.train.global_batch) == (8, 4, 8)
    assert est["eval_flops"] == pytest.approx(3 * est["flops_per_token"] / 3 * 2 * 8 * 32)
    assert est["estimated_seconds"] == pytest.approx((est["total_flops"] + est["eval_flops"]) / (2 * 80e9 * 0.5), rel=1e-3)
    mem = est["memory_per_device_bytes"]
    assert mem["weights"] == 4 * est["params"] and mem["optimizer"] == 8 * est["params"]
    assert mem["total"] == mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["activations"]


def test_param_counts_untied_bias():
    c = param_counts(d_model=96, n_layers=3, n_heads=3, n_kv_heads=1, head_dim=32, d_ff=200, vocab=512,
                     tie_embeddings=False, qkv_bias=True)
    attn = 96 * 96 + 2 * 96 * 32 + 96 * 96 + (96 + 2 * 32)
    assert c["params"] == 512 * 96 * 2 + 3 * (attn + 3 * 96 * 200 + 2 * 96) + 96
    assert flops_per_token(c["matmul_params"], 3, 3, 32, 10) == 6 * c["matmul_params"] + 12 * 3 * 3 * 32 * 10


def test_plan_is_deterministic(recipe):
    a, _ = make_plan(recipe, [], host=CPU)
    b, _ = make_plan(recipe, [], host=CPU)
    assert a.to_json() == b.to_json()
    assert list(a.passes) == ["resolve_shape", "pad_vocab", "run_length", "resolve_objective", "choose_device", "choose_precision",
                              "choose_parallelism", "choose_compile", "choose_attention", "choose_matmul", "choose_loss",
                              "choose_optimizer", "choose_checkpoint_format", "choose_checkpointing", "batch_split", "settle_attention", "estimate"]


def test_cpu_processes_share_the_machines_compute_in_the_time_estimate():
    """target.devices on a CPU starts processes that share its cores: the estimate does not divide by them
    (it was 2× optimistic for 2 processes); GPUs each bring their own."""
    from pathlib import Path

    from malt.compiler.api import plan as make_plan
    from malt.compiler.plan import Host

    tiny = Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml"
    one, _ = make_plan(tiny, ["target.accelerator=cpu"], host=Host())
    two, _ = make_plan(tiny, ["target.accelerator=cpu", "target.devices=2"], host=Host())
    assert two.estimates["estimated_seconds"] == one.estimates["estimated_seconds"]
    g1, _ = make_plan(tiny, ["target.accelerator=cuda"], host=Host())
    g2, _ = make_plan(tiny, ["target.accelerator=cuda", "target.devices=2"], host=Host())
    assert abs(g2.estimates["estimated_seconds"] * 2 / g1.estimates["estimated_seconds"] - 1) < 1e-3


def test_the_time_estimate_counts_the_evaluations():
    """Evaluations take eval_batches global batches' forwards every eval_every steps: llama-124m evaluating every 10
    steps spends over 20 minutes of an H100's time on them, which the plan shows; with evaluation off, none."""
    from pathlib import Path

    from malt.compiler.api import plan as make_plan
    from malt.compiler.plan import Host

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "llama-124m.yaml"
    often, _ = make_plan(recipe, ["train.eval_every=10"], host=Host())
    never, _ = make_plan(recipe, ["train.eval_every=0"], host=Host())
    est = often.estimates
    evaluations = len(range(0, often.steps + 1, 10)) + (often.steps % 10 != 0)  # step 0, every 10 steps, the last
    assert est["eval_flops"] == pytest.approx(evaluations * est["flops_per_token"] / 3 * 8 * 64 * 1024)
    assert est["eval_seconds"] > 20 * 60
    assert "eval_flops" not in never.estimates
    assert est["estimated_seconds"] == pytest.approx(never.estimates["estimated_seconds"] + est["eval_seconds"], rel=1e-4)


def test_an_evaluation_on_a_phase_boundary_costs_the_ending_phase():
    """tiny-stack grows from 2 to 4 layers at step 122: the evaluation after step 122 runs before the growth, on 2
    layers (it was costed at 4)."""
    from pathlib import Path

    from malt.compiler.api import plan as make_plan
    from malt.compiler.estimates import flops_per_token
    from malt.compiler.passes.estimate import model_counts
    from malt.compiler.plan import Host

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "tiny-stack.yaml"
    p, _ = make_plan(recipe, ["train.eval_every=122", "target.accelerator=cpu"], host=Host())
    assert [(ph.start, ph.end, ph.n_layers) for ph in p.phases] == [(0, 122, 2), (122, 488, 4)]
    tokens = p.recipe.train.eval_batches * p.recipe.train.global_batch * 128

    def forward(layers):
        return flops_per_token(model_counts(p, layers)["matmul_params"], layers, p.recipe.model.n_heads, p.head_dim, 128) / 3
    # after steps 0 and 122 on 2 layers; after 244, 366 and 488 on 4
    assert p.estimates["eval_flops"] == pytest.approx(tokens * (2 * forward(2) + 3 * forward(4)))
