"""fp32 products through oneDNN (choose_matmul's onednn: fp32, eager, an AMD CPU of Zen 5 or later with AVX-512).

The pass takes it only there. The generated Linear is nn.Linear exactly (parameters, state dict), and its forward
and both backward products, like the chunked loss's, are fp32 products: against an fp64 reference their error is of
the order of torch's own fp32 matmul's, the logits equal transformers' Llama and Qwen2 on the same weights, and a
run trains as the MKL program does. oneDNN runs on any x86 CPU, so these tests run wherever CI does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from malt.compiler.api import compile_to
from malt.compiler.plan import Host, resolved_recipe

from .helpers import run_env, write_tiny_recipe
from .test_numerics import build_hf, copy_weights, perturb_norms_and_biases

AMD512 = Host(cpu_vendor="AuthenticAMD", cpu_avx512=True, cpu_family=26)   # Zen 5
FP32 = ["target.precision=fp32", "target.compile=off"]


def build(make_recipe, tmp_path, overrides=None, host=AMD512, sets=FP32):
    return compile_to(make_recipe(overrides or {}), tmp_path / "build", host=host, sets=list(sets))


@pytest.mark.parametrize("sets, host, want", [
    (FP32, AMD512, "onednn"),
    (FP32 + ["data.packing=document"], AMD512, "onednn"),
    (["target.precision=fp32", "target.compile=auto", "train.tokens=2B", "train.steps=null"], replace(AMD512, cxx_compiler=True), "onednn"),  # auto: eager
    (["target.precision=auto", "target.compile=off"], replace(AMD512, cpu_bf16=True), "torch"),  # auto: bf16 on Zen 5
    (["target.precision=bf16", "target.compile=off"], AMD512, "torch"),     # torch multiplies bf16 in oneDNN already
    (["target.precision=fp32", "target.compile=on"], replace(AMD512, cxx_compiler=True), "torch"),
    (FP32, replace(AMD512, cpu_family=25), "torch"),                         # Zen 4: MKL's AVX2 kernels ran at its peak
    (FP32, replace(AMD512, cpu_family=0), "torch"),                          # family unknown: not measured
    (FP32, Host(cpu_vendor="GenuineIntel", cpu_avx512=True, cpu_family=6), "torch"),  # MKL's AVX-512 kernels run on Intel
    (FP32, replace(AMD512, cpu_avx512=False), "torch"),                      # no AVX-512 for oneDNN either
    (FP32, Host(), "torch"),
])
def test_the_pass_takes_onednn_only_for_fp32_on_amd_avx512(make_recipe, tmp_path, sets, host, want):
    plan = build(make_recipe, tmp_path, host=host, sets=sets)
    assert plan.matmul == want
    assert plan.to_json()["execution"]["matmul"] == want
    reason = next(d.reason for d in plan.decisions if d.name == "matmul")
    text = (tmp_path / "build" / "model.py").read_text()
    assert ("class Linear(nn.Linear)" in text) == (want == "onednn")
    assert ("nn.Linear(D_MODEL" in text) == (want != "onednn")
    if any(x.startswith("train.tokens") for x in sets):  # long enough that auto compiles where oneDNN does not pay
        assert plan.compile is False and "oneDNN" in next(d.reason for d in plan.decisions if d.name == "compile")
        zen4 = build(make_recipe, tmp_path / "zen4", host=replace(host, cpu_family=25), sets=sets)
        assert zen4.compile is True and zen4.matmul == "torch"
    if want == "onednn":
        assert "AVX2" in reason and "bench/recipes/tiny.yaml, small.yaml" in reason
        assert "grad_w += mm_nt(p.t(), hc.t())" in text   # the chunked loss's products too


def test_no_decision_off_the_cpu(make_recipe, tmp_path):
    h100 = Host(cuda=True, cuda_name="NVIDIA H100 80GB HBM3", cpu_cores=16, memory_bytes=128 * 2**30,
                cpu_vendor="AuthenticAMD", cpu_avx512=True)
    plan = build(make_recipe, tmp_path, host=h100, sets=["target.accelerator=auto", "target.precision=fp32"])
    assert plan.device == "cuda" and plan.matmul == "torch"
    assert not any(d.name == "matmul" for d in plan.decisions)


@pytest.fixture
def onednn_module(make_recipe, load_model_module, tmp_path):
    build(make_recipe, tmp_path, {"model": {"qkv_bias": True}})
    return load_model_module(tmp_path / "build")


def _grads(fn, x, w, b, g):
    ts = [t.clone().requires_grad_() for t in (x, w, b)]
    fn(*ts).backward(g)
    return [t.grad for t in ts]


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("out", [40, 150])   # narrower and wider than the input: grad w's two orientations
def test_linear_products_are_fp32_products(onednn_module, strided, out):
    """Output, grad x, grad w, grad b against fp64: within 4× the error of torch's own fp32 F.linear, which sums in
    another order (and far below a bf16 product's); a transposed (strided) input as attention's output reshapes."""
    m = onednn_module
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, 96, generator=gen)
    if strided:
        x = torch.randn(3, 96, 70, generator=gen).transpose(1, 2)
    w, b, g = torch.randn(out, 96, generator=gen), torch.randn(out, generator=gen), torch.randn(3, 70, out, generator=gen)
    lin = m.Linear(96, out)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)

    def onednn(x, w, b):
        return m.OneDNNLinear.apply(x, w, b)

    ref = [t.double() for t in [F.linear(x.double(), w.double(), b.double())] + _grads(F.linear, x.double(), w.double(), b.double(), g.double())]
    ours = [onednn(x, w, b)] + _grads(onednn, x, w, b, g)
    torchs = [F.linear(x, w, b)] + _grads(F.linear, x, w, b, g)
    bf16 = F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).double()
    assert torch.equal(lin(x), ours[0])                                     # the module takes OneDNNLinear in fp32
    for name, o, t, r in zip(("output", "grad x", "grad w", "grad b"), ours, torchs, ref):
        err, torch_err = ((o.double() - r).norm() / r.norm()).item(), ((t.double() - r).norm() / r.norm()).item()
        assert err < 1e-6, f"{name}: oneDNN {err:.2e} relative to fp64 (torch's fp32: {torch_err:.2e})"  # fp32 rounding
    assert (bf16 - ref[0]).norm() > 100 * (ours[0].double() - ref[0]).norm()   # not a bf16 product


def _products(module, with_loss: bool) -> dict:
    """Calls of each matrix-product op in a forward and backward of the generated model (torch.profiler)."""
    torch.manual_seed(0)
    model = module.Transformer()
    x = torch.randint(0, module.VOCAB_SIZE, (2, 32))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        (model(x, x) if with_loss else model(x).float().square().mean()).backward()
    names = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul")
    counts = dict.fromkeys(names, 0)
    for e in prof.events():
        if e.name in counts:
            counts[e.name] += 1
    return counts


@pytest.mark.parametrize("with_loss", [True, False])
def test_every_product_goes_to_onednn(make_recipe, load_model_module, tmp_path, with_loss):
    """In the onednn program every product of a training step (the 2 layers' 7 linears, forward and both backward
    products; the chunked loss's three per chunk, or the head as a linear) is oneDNN's, none torch's mm; the MKL
    program of the same recipe has them all as aten::mm/addmm."""
    build(make_recipe, tmp_path / "a", {"model": {"tie_embeddings": False}})
    build(make_recipe, tmp_path / "b", {"model": {"tie_embeddings": False}}, host=Host())
    ours = _products(load_model_module(tmp_path / "a" / "build"), with_loss)
    torchs = _products(load_model_module(tmp_path / "b" / "build"), with_loss)
    linears = 2 * 7 * 3 + (0 if with_loss else 3)      # forward, grad x, grad w; the head when it is a linear
    assert ours["mkldnn::_linear_pointwise"] == linears + (3 if with_loss else 0), ours   # 64 positions: one chunk
    assert sum(v for k, v in ours.items() if k != "mkldnn::_linear_pointwise") == 0, ours
    assert torchs["mkldnn::_linear_pointwise"] == 0 and torchs["aten::mm"] + torchs["aten::addmm_"] >= linears, torchs


def test_linear_is_nn_linear_elsewhere(onednn_module):
    """Same state dict as nn.Linear; bf16 weights, autocast and an empty input (oneDNN refuses 0 rows: an encoder's
    micro-batch with no selected position) take F.linear's product, no oneDNN call; no double backward."""
    m = onednn_module
    lin = m.Linear(16, 8)
    assert isinstance(lin, torch.nn.Linear) and set(lin.state_dict()) == {"weight", "bias"}
    x = torch.randn(4, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert lin(x).dtype == torch.bfloat16
        assert lin(x[:0]).shape == (0, 8)
        assert lin.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    assert "mkldnn::_linear_pointwise" not in {e.name for e in prof.events()}
    lin = m.Linear(16, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        lin(x)
    assert "mkldnn::_linear_pointwise" in {e.name for e in prof.events()}   # the check above can fail
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(lin(xg).square().sum(), xg, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()


SHAPES = {
    "llama_gqa_untied": ({"model": {"d_model": 128, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "d_ff": 256,
                                    "tie_embeddings": False, "init_std": 0.05}, "train": {"seq_len": 96}}, "llama"),
    "qwen2_tied": ({"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 192, "qkv_bias": True},
                    "train": {"seq_len": 80}}, "qwen2"),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_and_loss_match_transformers(shape, make_recipe, load_model_module, tmp_path):
    """The onednn program's logits equal transformers' (SDPA) on the same weights; its chunked loss and gradients
    equal transformers' logits + F.cross_entropy."""
    overrides, model_type = SHAPES[shape]
    plan = build(make_recipe, tmp_path, overrides)
    assert plan.matmul == "onednn"
    module = load_model_module(tmp_path / "build")
    torch.manual_seed(0)
    model = module.Transformer()
    gen = torch.Generator().manual_seed(1)
    perturb_norms_and_biases(model, gen)
    pj = plan.to_json()
    hf = build_hf(pj, resolved_recipe(plan.recipe), model_type, "sdpa")
    copy_weights(model, hf, pj["model"]["tie_embeddings"])
    x = torch.randint(0, pj["model"]["vocab_size"], (3, pj["batch"]["seq_len"]), generator=gen)
    y = torch.randint(0, pj["model"]["vocab_size"], x.shape, generator=gen)
    with torch.no_grad():
        logits = model(x)
        assert logits.std() > 0.05
        torch.testing.assert_close(hf(input_ids=x).logits, logits, atol=2e-5, rtol=2e-5)
    loss = model(x, y)
    loss.backward()
    hf_loss = F.cross_entropy(hf(input_ids=x).logits.view(-1, logits.shape[-1]), y.view(-1))
    hf_loss.backward()
    torch.testing.assert_close(loss, hf_loss, atol=1e-5, rtol=1e-5)
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        want = hf_params.get("model." + name, hf_params.get(name)).grad
        err = ((p.grad - want).norm() / want.norm()).item()
        assert err < 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.slow
def test_a_run_trains_as_the_mkl_program_does(tmp_path):
    """The same recipe compiled for an AMD AVX-512 host (oneDNN) and for a host without (MKL), 8 steps each: the same
    losses to fp32 rounding, step by step, and the same validation loss."""
    recipe = write_tiny_recipe(tmp_path / "r", steps=8, eval_every=8, checkpoint_every=0)
    losses = {}
    for name, host in (("onednn", AMD512), ("torch", Host())):
        plan = compile_to(recipe, tmp_path / name, host=host)
        assert plan.matmul == name
        proc = subprocess.run([sys.executable, str(tmp_path / name / "train.py"), "--quiet"], env=run_env(tmp_path / "cache"),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        recs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in recs if "loss" in r] + [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(losses["onednn"]) == 8 + 2
    assert losses["onednn"][-3] < losses["onednn"][0] - 0.5      # it learns
    for a, b in zip(losses["onednn"], losses["torch"]):
        assert abs(a - b) < 2e-4 * max(1.0, abs(b)), (losses["onednn"], losses["torch"])


# ---- encoders (model.family bert): the same Linear and linear() in encoder.py.j2 ------------------------------

ENCODERS = {  # name -> recipe overrides on test_encoder's BERT
    "bert_untied": {"model": {"d_model": 96, "n_heads": 3, "d_ff": 200, "tie_embeddings": False}},
    "mosaic": {"model": {"position": "alibi", "activation": "geglu", "unpad": True}, "objective": {"mask_rate": 0.3}},
    "electra": {"objective": {"kind": "rtd", "discriminator_weight": 50}},
}


def _encoder(tmp_path, name, host):
    from .conftest import import_model_module, merge, write_recipe
    from .test_encoder import BERT

    recipe = write_recipe(tmp_path / name, merge(BERT, ENCODERS[name]))
    plan = compile_to(recipe, tmp_path / name / ("onednn" if host is AMD512 else "torch"), host=host)
    return plan, import_model_module(tmp_path / name / ("onednn" if host is AMD512 else "torch"))


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoders_train_as_the_mkl_program_does(name, tmp_path):
    """The onednn encoder's loss and every gradient equal the MKL program's on the same weights and batch (to fp32
    rounding), and every product of its step is oneDNN's."""
    from malt.runtime import objectives

    from .test_encoder import randomize

    (plan, ours), (_, torchs) = _encoder(tmp_path, name, AMD512), _encoder(tmp_path, name, Host())
    assert plan.matmul == "onednn" and "class Linear(nn.Linear)" in (tmp_path / name / "onednn" / "model.py").read_text()
    torch.manual_seed(0)
    a = randomize(ours.Transformer()).train()
    b = torchs.Transformer().train()
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(4))
    x, y = objectives.mlm_batch(tokens, 0.3, 257, 258, [256], objectives.row_generators(1, 0, 0, 4))
    kw = {"uniforms": torch.rand(4, 32, generator=torch.Generator().manual_seed(9))} if name == "electra" else {}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss_a = a(x, y, **kw)
        loss_a.backward()
    loss_b = b(x, y, **kw)
    loss_b.backward()
    names = [e.name for e in prof.events()]
    assert names.count("mkldnn::_linear_pointwise") >= 3 * 2 * 6       # 2 layers' q, k, v, out, intermediate, output
    # (attention's own products stay SDPA's: with ALiBi's float bias its math kernel, batched matmuls)
    assert not {"aten::mm", "aten::addmm", "aten::linear"} & set(names), sorted(set(names))
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    # a micro-batch with no selected position: the head decodes 0 rows (F.linear's; oneDNN refuses them)
    nothing = torch.full_like(y, -100)
    with torch.no_grad():
        torch.testing.assert_close(a(x, nothing, **kw), b(x, nothing, **kw), atol=1e-5, rtol=1e-5)
    grads_b = dict(b.named_parameters())
    for n, p in a.named_parameters():
        if p.grad is None:
            assert grads_b[n].grad is None, n
            continue
        want = grads_b[n].grad
        # relative to the gradient, or to 1e-3 for a gradient that is zero but for rounding (the key bias's)
        err = ((p.grad - want).norm() / want.norm().clamp(min=1e-3)).item()
        assert err < 1e-5, f"{n}: relative error {err:.2e}"


def test_a_distillation_teacher_multiplies_in_onednn(tmp_path):
    """The onednn program's train.py sets the frozen teacher's products to oneDNN; its logits equal torch's to fp32
    rounding, every product is oneDNN's, and with gradients on (never in the program) it is nn.Linear's."""
    from malt.runtime.teacher import Teacher, TeacherShape, onednn_matmuls

    torch.manual_seed(0)
    shape = TeacherShape(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96, vocab=300,
                         norm_eps=1e-6, rope_theta=1e4, qkv_bias=True, tie_embeddings=False)
    teacher = Teacher(shape).eval()
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        want = teacher(x)
        onednn_matmuls(teacher)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = teacher(x)
    names = [e.name for e in prof.events()]
    assert names.count("mkldnn::_linear_pointwise") == 2 * 7 + 1 and "aten::linear" not in names
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        teacher(x)
    assert "mkldnn::_linear_pointwise" not in {e.name for e in prof.events()}
    root = Path(__file__).resolve().parent.parent
    plan = compile_to(root / "recipes" / "tiny-distill.yaml", tmp_path / "distill", host=AMD512, sets=FP32)
    assert plan.matmul == "onednn"
    assert "    teacher = onednn_matmuls(teacher)  # choose_matmul" in (tmp_path / "distill" / "train.py").read_text()


def test_malt_plan_says_so(make_recipe, tmp_path):
    from malt.compiler.cli import _plan_text

    ours, torchs = build(make_recipe, tmp_path / "a"), build(make_recipe, tmp_path / "b", host=Host())
    assert "attention sdpa_causal, oneDNN matmuls, fused AdamW" in _plan_text(ours)
    assert "oneDNN" not in _plan_text(torchs).split("execution", 1)[1].splitlines()[0]
