"""The generated causal_attention (choose_attention's blocked_causal: on a CPU with bf16 matmuls, bf16, seq_len <= 512).

It must be causal attention exactly: in fp32 the generated model's logits equal transformers' Llama (eager and SDPA)
at lengths below, at and across its query blocks, with grouped-query attention; its fp32 gradients equal
scaled_dot_product_attention's; in bf16 its error against an fp64 reference is no larger than SDPA's own bf16 kernel's.
And the pass takes it only where bench/attention.py measured it faster.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from malt.compiler.api import compile_to
from malt.compiler.passes.choose_attention import BLOCKED_MAX_SEQ, QUERY_BLOCK, blocked_scores
from malt.compiler.plan import Host, resolved_recipe

from .test_numerics import build_hf, copy_weights, perturb_norms_and_biases

BF16_CPU = Host(cpu_bf16=True)
H100 = Host(cuda=True, cuda_name="NVIDIA H100 80GB HBM3", cpu_cores=16, memory_bytes=128 * 2**30)
BF16 = {"target": {"precision": "bf16"}}


def plan_of(make_recipe, tmp_path, overrides=None, host=BF16_CPU, sets=()):
    return compile_to(make_recipe(overrides or {}), tmp_path / "build", host=host, sets=list(sets))


@pytest.mark.parametrize("sets, host, want", [
    (["target.precision=bf16"], BF16_CPU, "blocked_causal"),
    (["target.precision=pure_bf16"], BF16_CPU, "blocked_causal"),
    (["target.precision=auto"], BF16_CPU, "blocked_causal"),             # auto is bf16 on this host
    (["target.precision=bf16", f"train.seq_len={BLOCKED_MAX_SEQ}"], BF16_CPU, "blocked_causal"),
    (["target.precision=bf16", f"train.seq_len={BLOCKED_MAX_SEQ + 1}"], BF16_CPU, "sdpa_causal"),  # measured slower from 1024
    (["target.precision=fp32"], BF16_CPU, "sdpa_causal"),                # level with SDPA in fp32 (bench/attention.py)
    (["target.precision=bf16", "target.compile=on"], BF16_CPU, "sdpa_causal"),  # longer cold compiles, not costed
    (["target.precision=bf16"], Host(), "sdpa_causal"),                  # bf16 emulated: not measured, SDPA
    (["target.precision=bf16", "data.packing=document"], BF16_CPU, "blocked_causal"),   # with the document mask
    (["target.precision=bf16", "data.packing=best_fit"], BF16_CPU, "blocked_causal"),
    (["target.precision=bf16", "model.sliding_window=16"], BF16_CPU, "blocked_causal"),  # with the window's mask
    (["target.precision=fp32", "data.packing=document"], BF16_CPU, "sdpa_mask"),
    (["target.precision=bf16", "objective.kind=prefix_lm"], BF16_CPU, "sdpa_mask"),      # a prefix sees later keys
    (["target.precision=bf16", "target.accelerator=auto"], H100, "sdpa_causal"),
])
def test_choose_attention_takes_blocked_only_where_it_was_measured_faster(make_recipe, tmp_path, sets, host, want):
    plan = plan_of(make_recipe, tmp_path, host=host, sets=sets)
    assert plan.attention == want
    text = (tmp_path / "build" / "model.py").read_text()
    assert ("def causal_attention(" in text) == (want == "blocked_causal")
    masked = any(x.startswith(("data.packing", "model.sliding_window")) for x in sets)
    assert ("y = causal_attention(q, k, v" + (", mask)" if masked else ")") in text) == (want == "blocked_causal")
    if want == "blocked_causal":
        reason = next(d.reason for d in plan.decisions if d.name == "attention")
        assert "bench/attention.py" in reason and f"{QUERY_BLOCK} queries at a time" in reason


def test_blocked_scores_count_each_blocks_keys():
    assert blocked_scores(128) == 128 * 128
    assert blocked_scores(256) == 128 * 128 + 128 * 256
    assert blocked_scores(300) == 128 * 128 + 128 * 256 + 44 * 300
    assert blocked_scores(7) == 49


def test_the_plan_counts_the_kept_probabilities(make_recipe, tmp_path):
    """The memory plan adds what the blocks keep (fp32 and bf16 probabilities, fp32 q and k) to SDPA's plan."""
    sets = ["target.precision=bf16", "train.seq_len=256", "train.micro_batch=4"]
    blocked = plan_of(make_recipe, tmp_path / "a", sets=sets)
    sdpa = plan_of(make_recipe, tmp_path / "b", host=Host(), sets=sets)
    assert (blocked.attention, sdpa.attention) == ("blocked_causal", "sdpa_causal")
    a = blocked.estimates["memory_per_device_bytes"]["activations"]
    b = sdpa.estimates["memory_per_device_bytes"]["activations"]
    layers, heads, head_dim = 2, 4, 16
    assert a - b == layers * 4 * heads * (blocked_scores(256) * 6 + 2 * 256 * head_dim * 4)


SHAPES = {
    # 3 query blocks, the last partial; multi-head, tied
    "mha_300": ({"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128}, "train": {"seq_len": 300}}, "llama"),
    # grouped-query attention (8 query heads on 2 kv heads), untied, 2 blocks exactly
    "gqa_256": ({"model": {"d_model": 128, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "d_ff": 256,
                           "tie_embeddings": False, "init_std": 0.05}, "train": {"seq_len": 256}}, "llama"),
    # Qwen2: q/k/v biases with GQA
    "qwen2_160": ({"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 192, "qkv_bias": True},
                   "train": {"seq_len": 160}}, "qwen2"),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_transformers(shape, make_recipe, load_model_module, tmp_path):
    overrides, model_type = SHAPES[shape]
    plan = plan_of(make_recipe, tmp_path, {**overrides, **BF16})
    assert plan.attention == "blocked_causal"
    module = load_model_module(tmp_path / "build")
    torch.manual_seed(0)
    model = module.Transformer().eval()
    gen = torch.Generator().manual_seed(1)
    perturb_norms_and_biases(model, gen)
    pj = plan.to_json()
    T = pj["batch"]["seq_len"]
    vocab = pj["model"]["vocab_size"]
    lengths = sorted({T, 7, QUERY_BLOCK, QUERY_BLOCK + 1, T - 1})
    inputs = [torch.randint(0, vocab, (2, n), generator=gen) for n in lengths]
    with torch.no_grad():
        expected = [model(x) for x in inputs]   # fp32: the dtypes causal_attention sets are fp32 here
    assert expected[0].std() > 0.05
    for attn in ("eager", "sdpa"):
        hf = build_hf(pj, resolved_recipe(plan.recipe), model_type, attn)
        copy_weights(model, hf, pj["model"]["tie_embeddings"])
        with torch.no_grad():
            for x, want in zip(inputs, expected):
                torch.testing.assert_close(hf(input_ids=x).logits, want, atol=1e-5, rtol=1e-5,
                                           msg=lambda m: f"{shape}, {x.shape[1]} tokens, vs {model_type} ({attn}): {m}")


def test_the_plan_counts_the_mask_and_its_negations(make_recipe, tmp_path):
    """With document masks: the (batch, 1, T, T) bool mask once, and each layer's negated blocks (masked_fill keeps them)."""
    sets = ["target.precision=bf16", "train.seq_len=256", "train.micro_batch=4"]
    plain = plan_of(make_recipe, tmp_path / "a", sets=sets)
    docs = plan_of(make_recipe, tmp_path / "b", sets=sets + ["data.packing=document"])
    assert (plain.attention, docs.attention) == ("blocked_causal", "blocked_causal")
    a = plain.estimates["memory_per_device_bytes"]["activations"]
    b = docs.estimates["memory_per_device_bytes"]["activations"]
    assert b - a == 4 * 256 * 256 + 2 * 4 * blocked_scores(256)


def _attention(make_recipe, load_model_module, tmp_path, gqa=False, masked=False):
    overrides = {"model": {"d_model": 128, "n_layers": 1, "n_heads": 8, "n_kv_heads": 2 if gqa else 8, "d_ff": 128},
                 "train": {"seq_len": 320}, **BF16, **({"data": {"packing": "document"}} if masked else {})}
    plan_of(make_recipe, tmp_path, overrides)
    return load_model_module(tmp_path / "build").causal_attention


def _qkv(B, H, KV, T, D, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (scale * torch.randn(B, H, T, D, generator=g)).to(dtype)
    k, v = ((scale * torch.randn(B, KV, T, D, generator=g)).to(dtype) for _ in range(2))
    return q, k, v, torch.randn(B, H, T, D, generator=g).to(dtype)


def _forward_backward(fn, q, k, v, do, dtype, **kw):
    ts = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    out = fn(*ts, **kw)
    out.backward(do.to(dtype))
    return [out.double()] + [t.grad.double() for t in ts]


@pytest.mark.parametrize("gqa", [False, True])
def test_fp32_gradients_equal_sdpa(make_recipe, load_model_module, tmp_path, gqa):
    attention = _attention(make_recipe, load_model_module, tmp_path, gqa)
    q, k, v, do = _qkv(2, 8, 2 if gqa else 8, 320, 16, torch.float32)
    got = _forward_backward(attention, q, k, v, do, torch.float32)
    want = _forward_backward(F.scaled_dot_product_attention, q, k, v, do, torch.float32, is_causal=True, enable_gqa=gqa)
    for name, g, w in zip(("output", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_bf16_error_is_no_larger_than_sdpas(make_recipe, load_model_module, tmp_path, scale):
    """Under bf16 autocast, as the program runs it, against fp64 on the same bf16 inputs: relative errors of the
    output and each gradient within 1.5× those of SDPA's bf16 kernel. (Scores rounded to bf16 before the softmax, as
    an explicit bf16 q @ kᵀ does, were 4-7× SDPA's at scale 3.)"""
    attention = _attention(make_recipe, load_model_module, tmp_path)
    q, k, v, do = _qkv(2, 8, 8, 320, 16, torch.bfloat16, scale=scale)
    ref = _forward_backward(F.scaled_dot_product_attention, q, k, v, do, torch.float64, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _forward_backward(attention, q, k, v, do, torch.bfloat16)
    sdpa = _forward_backward(F.scaled_dot_product_attention, q, k, v, do, torch.bfloat16, is_causal=True)
    for name, g, s, r in zip(("output", "dq", "dk", "dv"), got, sdpa, ref):
        err, sdpa_err = ((g - r).norm() / r.norm()).item(), ((s - r).norm() / r.norm()).item()
        assert err <= 1.5 * sdpa_err + 1e-4, f"{name}: blocked {err:.2e}, SDPA {sdpa_err:.2e}"


def test_masks_equal_sdpa_with_the_same_mask(make_recipe, load_model_module, tmp_path):
    """Across three query blocks in fp32: documents (batch, 1, T, T) and a window (1, 1, T, T), outputs and gradients."""
    attention = _attention(make_recipe, load_model_module, tmp_path, masked=True)
    B, T = 2, 320
    q, k, v, do = _qkv(B, 8, 8, T, 16, torch.float32)
    ids = torch.cumsum(torch.rand(B, T, generator=torch.Generator().manual_seed(4)) < 0.02, dim=1)
    pos = torch.arange(T)
    causal = pos[None, :] <= pos[:, None]
    documents = (causal & (ids[:, :, None] == ids[:, None, :]))[:, None]
    window = (causal & (pos[:, None] - pos[None, :] < 40))[None, None]
    assert int(ids[:, -1].min()) >= 3  # several documents a row
    for mask in (documents, window):
        got = _forward_backward(attention, q, k, v, do, torch.float32, mask=mask)
        want = _forward_backward(F.scaled_dot_product_attention, q, k, v, do, torch.float32, attn_mask=mask)
        for name, g, w in zip(("output", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        # the test can fail: without the mask the rows see other documents / keys outside the window
        assert (_forward_backward(attention, q, k, v, do, torch.float32)[0] - want[0]).abs().max() > 1e-2


def _peaks(make_recipe, tmp_path, sets):
    """(peak bytes per device with causal_attention, with SDPA) of the same pinned layout, memory to spare."""
    from malt.compiler.passes.estimate import step_peak

    blocked = plan_of(make_recipe, tmp_path / "peak-b", sets=sets + ["target.memory_per_device=64GiB"])
    sdpa = plan_of(make_recipe, tmp_path / "peak-s", host=Host(), sets=sets + ["target.memory_per_device=64GiB"])
    assert (blocked.attention, sdpa.attention) == ("blocked_causal", "sdpa_causal")
    return [step_peak(p, p.micro_batch, p.recipe.train.seq_len, checkpointing="none") for p in (blocked, sdpa)]


SETTLE = ["target.precision=bf16", "train.seq_len=512", "train.global_batch=16", "train.micro_batch=16"]


def test_settle_keeps_sdpa_where_causal_attention_would_need_checkpointing(make_recipe, tmp_path):
    blocked, sdpa = _peaks(make_recipe, tmp_path, SETTLE)
    memory = int((blocked + sdpa) / 2 / 0.8)  # the budget (80%) holds SDPA's step without checkpointing, not causal_attention's
    plan = plan_of(make_recipe, tmp_path, sets=SETTLE + [f"target.memory_per_device={memory}B"])
    assert (plan.attention, plan.activation_checkpointing) == ("sdpa_causal", "none")
    reason = next(d.reason for d in plan.decisions if d.name == "attention")
    assert "with it, selective activation checkpointing instead of none" in reason or "with it, full" in reason
    assert "def causal_attention(" not in (tmp_path / "build" / "model.py").read_text()
    # pinned to no checkpointing, it would not fit: SDPA, which does
    pinned = plan_of(make_recipe, tmp_path / "pinned", sets=SETTLE + [f"target.memory_per_device={memory}B",
                                                                     "target.activation_checkpointing=none"])
    assert pinned.attention == "sdpa_causal"
    assert "the run would not fit the memory budget" in next(d.reason for d in pinned.decisions if d.name == "attention")


def test_settle_keeps_causal_attention_with_a_smaller_micro_batch(make_recipe, tmp_path):
    blocked, sdpa = _peaks(make_recipe, tmp_path, SETTLE)
    memory = int((blocked + sdpa) / 2 / 0.8)
    plan = plan_of(make_recipe, tmp_path, sets=SETTLE[:-1] + [f"target.memory_per_device={memory}B"])  # micro_batch auto
    assert (plan.attention, plan.activation_checkpointing) == ("blocked_causal", "none")
    assert plan.micro_batch < 16  # SDPA's plan would take all 16 at once; accumulation costs a CPU no work
