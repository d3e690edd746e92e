"""Encoders (model.family bert) and their objectives (mlm, rtd).

- plain BERT against Hugging Face's BertForMaskedLM on the same weights (fp32, eager and SDPA, with padding);
- the plan's parameter count against the generated model's and Hugging Face's;
- ALiBi's bias element by element against its formula, and inside attention;
- unpadding against the padded computation on the real tokens;
- the MLM loss against its definition, RTD's loss against its parts;
- what validation rejects, export refusing MosaicBERT variants;
- the reference recipes (tiny-bert, tiny-mosaicbert, tiny-electra) train with a falling loss, export, resume exactly.
Nothing is downloaded: Hugging Face models are built from configs.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from malt.compiler.api import compile_to
from malt.compiler.diagnostics import RecipeError
from malt.compiler.plan import Host
from malt.runtime import objectives
from malt.runtime.export import bert_config, export_hf, load_run_model
from malt.runtime.run import RunError

from .conftest import import_model_module, merge, write_recipe
from .helpers import run_env, run_program, write_corpus

import transformers  # noqa: E402  (the test extra; a missing one must fail, not skip)

ROOT = Path(__file__).resolve().parent.parent
BERT = {"model": {"family": "bert", "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128},
        "objective": {"kind": "mlm"}, "train": {"sample_tokens": None}}
MOSAIC = {"model": {"position": "alibi", "activation": "geglu", "unpad": True}, "objective": {"mask_rate": 0.3}}

# name -> recipe overrides on BERT (all plain BERT: Hugging Face's BertForMaskedLM loads them)
SHAPES = {
    "tied": {},
    # untied MLM decoder, 3 heads of 32, d_ff not a multiple of 64, small eps, seq_len 48
    "untied_odd": {"model": {"d_model": 96, "n_heads": 3, "d_ff": 200, "tie_embeddings": False, "norm_eps": 1e-6,
                             "init_std": 0.05}, "train": {"seq_len": 48}},
    # a trained bpe vocabulary of 300 (+ [MASK]) padded to a multiple of 128, d_ff from BERT's 4 × d_model rule
    "bpe_pad128": {"model": {"d_ff": None, "pad_vocab_multiple": 128}, "tokenizer": {"kind": "bpe", "vocab_size": 300}},
}


def build(tmp_path: Path, overrides: dict, name: str = "build"):
    """(plan, generated model.py module) of BERT merged with ``overrides``."""
    recipe = write_recipe(tmp_path, merge(BERT, overrides))
    plan = compile_to(recipe, tmp_path / name, host=Host())
    return plan, import_model_module(tmp_path / name)


def randomize(model, seed: int = 1):
    """Seeded random weights, LayerNorms and biases away from (1, 0) so that every parameter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_bert(plan, model, attn: str):
    cfg = bert_config(plan.to_json(), plan.recipe.model_dump(mode="json"))
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**cfg, attn_implementation=attn)).eval()
    # the rename `malt export` does: `bert.` before the encoder's names, `cls.` as is
    state = {(k if k.startswith("cls.") else "bert." + k): v for k, v in model.state_dict().items()}
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]  # transformers 5 ties them only with tied embeddings
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    tied = plan.recipe.model.tie_embeddings
    assert set(missing) == ({"cls.predictions.decoder.weight"} if tied else set()), missing
    assert torch.equal(hf.cls.predictions.decoder.bias, hf.cls.predictions.bias)
    if tied:
        assert hf.cls.predictions.decoder.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()
    return hf


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bert_logits_match_transformers(shape, tmp_path):
    plan, module = build(tmp_path, SHAPES[shape])
    torch.manual_seed(0)
    model = randomize(module.Transformer())
    seq = plan.recipe.train.seq_len
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, plan.vocab_size, (3, seq), generator=gen)
    mask = torch.ones(3, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0                      # a padded row
    mask[2, 5:] = 0
    short = torch.randint(0, plan.vocab_size, (2, 7), generator=gen)
    with torch.no_grad():
        want = [model(x), model(x, attention_mask=mask), model(short)]
    assert want[0].shape == (3, seq, plan.padded_vocab) and want[0].dtype == torch.float32
    assert want[0].std() > 0.1  # far from zero, so the tolerance means something
    for attn in ("eager", "sdpa"):
        hf = hf_bert(plan, model, attn)
        assert hf.config._attn_implementation == attn
        with torch.no_grad():
            got = [hf(input_ids=x).logits, hf(input_ids=x, attention_mask=mask).logits, hf(input_ids=short).logits]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_bert_param_count_is_exact(shape, tmp_path):
    plan, module = build(tmp_path, SHAPES[shape])
    model = module.Transformer()
    counted = sum(p.numel() for p in model.parameters())
    on_disk = json.loads((tmp_path / "build" / "plan.json").read_text())
    assert plan.estimates["params"] == on_disk["params"] == counted
    m = plan.recipe.model
    # transformers 5 ties cls.predictions.decoder.bias to cls.predictions.bias only with tied embeddings: untied, it
    # holds the same vector twice (export writes both); malt's model holds it once
    assert hf_bert(plan, model, "eager").num_parameters() == counted + (0 if m.tie_embeddings else plan.padded_vocab)
    embedding = (plan.padded_vocab + plan.recipe.train.seq_len + 2) * m.d_model  # word, position, token type
    head = 0 if m.tie_embeddings else plan.padded_vocab * m.d_model
    assert on_disk["params_non_embedding"] == counted - embedding - head


VARIANTS = {
    "mosaic": MOSAIC,
    "pre_norm_untied_alibi_6_heads": {"model": {"norm_position": "pre", "tie_embeddings": False, "position": "alibi",
                                                "d_model": 96, "n_heads": 6}},
    "geglu_learned_pre": {"model": {"activation": "geglu", "norm_position": "pre"}},
    "electra": {"objective": {"kind": "rtd"}},
    "electra_alibi_untied": {"model": {"position": "alibi", "tie_embeddings": False, "n_heads": 8},
                             "objective": {"kind": "rtd", "generator_width": 0.5}},
    # two phases at two sequence lengths: the position table has the longest's rows
    "phased": {"phases": [{"name": "short", "share": "50%", "train": {"seq_len": 16}}, {"name": "long", "share": "50%"}],
               "train": {"seq_len": 48}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_param_count_is_exact(variant, tmp_path):
    plan, module = build(tmp_path, VARIANTS[variant])
    model = module.Transformer(n_layers=plan.n_layers)  # as a phased train.py builds it
    assert plan.estimates["params"] == sum(p.numel() for p in model.parameters())
    assert plan.estimates["flops_per_token"] > 6 * 2 * plan.n_layers * plan.recipe.model.d_model ** 2


def test_rtd_plan_counts_the_generator(tmp_path):
    mlm, _ = build(tmp_path / "mlm", {})
    rtd, module = build(tmp_path / "rtd", {"objective": {"kind": "rtd", "generator_width": 0.5}})
    model = module.Transformer()
    generator = sum(p.numel() for p in model.generator.parameters())
    assert rtd.estimates["params_generator"] == generator > 0
    assert rtd.to_json()["params_generator"] == generator and "params_generator" not in mlm.to_json()  # `malt plan --json`
    assert rtd.estimates["flops_per_token"] > mlm.estimates["flops_per_token"] * 1.2  # the generator's forward and backward
    g = next(d.value for d in rtd.decisions if d.name == "generator")
    assert g == {"d_model": 32, "n_heads": 2, "head_dim": 16, "d_ff": 64}
    assert model.generator.encoder.layer[0].attention.self.query.weight.shape == (32, 32)
    # tied embeddings: the generator reads and decodes the discriminator's word embeddings (no copy of them)
    assert not any("word_embeddings" in n for n, _ in model.generator.named_parameters())


def test_the_time_counts_the_positions_a_compiled_mlm_head_decodes(tmp_path):
    """The FLOPs (MFU's) count the MLM head at the selected mask_rate of the positions; compiled whole, the model
    decodes a static head_positions(n) of a micro-batch's n positions, a little more, and the time counts the rest
    too. Eager, or compiled per block under FSDP2 (the head then runs eagerly), it decodes the selected ones only."""
    from malt.compiler.encoder import head_positions

    eager, _ = build(tmp_path / "eager", {"target": {"compile": "off"}})
    compiled, module = build(tmp_path / "compiled", {"target": {"compile": "on"}})
    sharded, _ = build(tmp_path / "fsdp", {"target": {"compile": "on", "devices": 2, "parallelism": "fsdp"}})
    m, rate = compiled.recipe.model, compiled.recipe.objective.mask_rate
    for n in (1, 7, 64, 4096, 65536):  # the generated model's rule is the compiler's
        assert module.head_positions(n) == head_positions(n, rate) <= n
    assert head_positions(65536, 0.15) / 65536 < 0.17
    n = compiled.micro_batch * compiled.recipe.train.seq_len
    assert compiled.estimates["total_flops"] == eager.estimates["total_flops"]
    extra = 6 * (head_positions(n, rate) / n - rate) * (m.d_model ** 2 + compiled.padded_vocab * m.d_model) * compiled.tokens
    assert compiled.estimates["unselected_head_flops"] == round(extra) > 0
    assert compiled.to_json()["unselected_head_flops"] == round(extra)
    assert compiled.estimates["estimated_seconds"] == pytest.approx(
        eager.estimates["estimated_seconds"] * (1 + extra / (eager.estimates["total_flops"]
                                                             + eager.estimates.get("eval_flops", 0))), rel=1e-4)
    assert "unselected_head_flops" not in eager.estimates and "unselected_head_flops" not in sharded.estimates


def test_the_time_counts_the_positions_a_compiled_electra_generator_decodes(tmp_path):
    """Compiled, ELECTRA's generator head (gen_d → d transform, tied decoder) also runs at head_positions(n)."""
    from malt.compiler.encoder import generator_shape, head_positions

    rtd = {"objective": {"kind": "rtd", "generator_width": 0.5}}
    eager, _ = build(tmp_path / "eager", merge(rtd, {"target": {"compile": "off"}}))
    compiled, _ = build(tmp_path / "compiled", merge(rtd, {"target": {"compile": "on"}}))
    m, rate = compiled.recipe.model, compiled.recipe.objective.mask_rate
    gd = generator_shape(m.d_model, m.n_heads, compiled.d_ff, 0.5)["d_model"]
    n = compiled.micro_batch * compiled.recipe.train.seq_len
    extra = 6 * (head_positions(n, rate) / n - rate) * (gd * m.d_model + compiled.padded_vocab * m.d_model) * compiled.tokens
    assert compiled.estimates["unselected_head_flops"] == round(extra) > 0
    assert "unselected_head_flops" not in eager.estimates
    assert "generator's head decodes a fixed number of positions" in next(d.reason for d in compiled.decisions if d.name == "loss")


def test_a_compiled_mlm_loss_over_no_selected_position_is_zero(tmp_path):
    """Masking is a coin flip per token, so a small micro-batch may select nothing: compiled, the loss was 0/0 = nan
    (and the run stopped as diverged); it is 0, as eager, and otherwise the eager loss."""
    _, module = build(tmp_path / "b", {"target": {"compile": "on"}})
    torch.manual_seed(0)
    model = module.Transformer()
    compiled = torch.compile(model)
    tokens = torch.randint(5, 200, (2, 16))
    none = torch.full_like(tokens, objectives.IGNORE)
    assert compiled(tokens, none).item() == 0.0 == model(tokens, none).item()
    some = none.clone()
    some[0, 3], some[1, 7] = 11, 12
    assert compiled(tokens, some).item() == pytest.approx(model(tokens, some).item(), rel=1e-5)



def test_a_compiled_mlm_model_decodes_the_selected_positions_first(tmp_path):
    """Compiled, the head decodes head_positions(n) rows, the selected positions first: the loss and every gradient
    are the eager model's, which decodes the selected positions only."""
    _, module = build(tmp_path / "b", {"target": {"compile": "on"}})
    torch.manual_seed(0)
    model = module.Transformer()
    tokens = torch.randint(5, 200, (4, 32))
    inputs, targets = objectives.mlm_batch(tokens, module.MASK_RATE, 4, 200, generator=torch.Generator().manual_seed(3))
    assert 0 < (targets != objectives.IGNORE).sum() < module.head_positions(targets.numel()) < targets.numel()
    decoded = []
    hook = model.cls.predictions.transform.register_forward_hook(lambda mod, args, out: decoded.append(out.shape[0]))
    eager = model(inputs, targets)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model)(inputs, targets)
    compiled.backward()
    hook.remove()
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name], rtol=1e-4, atol=1e-6), name
    assert decoded[0] == (targets != objectives.IGNORE).sum()  # eager: the selected positions only


# ---- ALiBi ---------------------------------------------------------------------------------------------------


def _slopes(n: int) -> list[float]:
    """Press et al.'s slopes: 2^(-8k/n) for k = 1..n when n is a power of two, else interleaved (as MosaicBERT)."""
    if math.log2(n).is_integer():
        return [2 ** (-8 * k / n) for k in range(1, n + 1)]
    p = 2 ** math.floor(math.log2(n))
    return _slopes(p) + _slopes(2 * p)[0::2][: n - p]


@pytest.mark.parametrize("n_heads", [4, 6, 8])
def test_alibi_bias_element_by_element(n_heads, tmp_path):
    d = 16 * n_heads
    plan, module = build(tmp_path, {"model": {"position": "alibi", "d_model": d, "n_heads": n_heads}})
    assert module.alibi_slopes(8) == [2 ** -k for k in range(1, 9)]  # the paper's 8-head slopes 1/2 .. 1/256
    slopes = _slopes(n_heads)
    assert module.alibi_slopes(n_heads) == pytest.approx(slopes, rel=1e-12)
    T = plan.recipe.train.seq_len
    bias = module.alibi_bias(T, n_heads)
    assert bias.shape == (n_heads, T, T)
    for h in range(n_heads):
        for i in range(T):
            for j in range(T):
                assert bias[h, i, j].item() == pytest.approx(-slopes[h] * abs(i - j), rel=1e-6, abs=1e-7), (h, i, j)
    model = module.Transformer()
    assert torch.equal(model.alibi, bias)
    assert not any("position" in n for n, _ in model.named_parameters())  # no position embeddings


def test_alibi_attention_against_explicit_softmax(tmp_path):
    _, module = build(tmp_path, {"model": {"position": "alibi"}})
    torch.manual_seed(0)
    attn = module.SelfAttention(64, 4).eval()
    x = torch.randn(2, 10, 64)
    bias = module.alibi_bias(10, 4)
    pad = torch.ones(2, 10, dtype=torch.long)
    pad[1, 7:] = 0
    masked = bias.masked_fill(pad[:, None, None, :] == 0, float("-inf"))
    with torch.no_grad():
        got = attn(x, masked)
        q, k, v = (lin(x).view(2, 10, 4, 16).transpose(1, 2) for lin in (attn.query, attn.key, attn.value))
        scores = q @ k.transpose(-1, -2) / math.sqrt(16) + masked       # softmax(q·k/√d - slope·|i-j|)
        want = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 64)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# ---- unpadding -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["alibi", "learned"])
def test_unpadding_equals_padded_computation(position, tmp_path):
    over = merge(MOSAIC, {"model": {"position": position}})
    _, unpadded = build(tmp_path, over, "unpad")
    _, padded = build(tmp_path, merge(over, {"model": {"unpad": False}}), "pad")
    assert "class Unpadded" in (tmp_path / "unpad" / "model.py").read_text()
    assert "Unpadded" not in (tmp_path / "pad" / "model.py").read_text()
    torch.manual_seed(0)
    a = randomize(unpadded.Transformer())
    b = padded.Transformer().eval()
    b.load_state_dict(a.state_dict())
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 250, (3, 32), generator=gen)
    mask = torch.ones(3, 32, dtype=torch.long)
    mask[0, 20:] = 0
    mask[2, 3:] = 0
    real = mask.bool()
    # count the rows the first feed-forward layer computes
    rows = []
    hook = a.encoder.layer[0].intermediate.gated_layers.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape))
    with torch.no_grad():
        la, lb = a(x, attention_mask=mask), b(x, attention_mask=mask)
    hook.remove()
    assert rows == [(int(mask.sum()), 64)]          # only the 32 + 12 + 3 real tokens, no padding
    torch.testing.assert_close(la[real], lb[real], atol=1e-5, rtol=1e-5)
    assert (la[~real] == 0).all()                    # nothing is computed at padding
    # what sits in the padding changes nothing
    y = x.clone()
    y[~real] = 7
    with torch.no_grad():
        torch.testing.assert_close(a(y, attention_mask=mask)[real], la[real], atol=1e-6, rtol=1e-6)
    # the loss too (targets on real tokens only), with gradients
    targets = torch.full_like(x, -100)
    targets[real & (torch.rand(x.shape, generator=gen) < 0.5)] = 5
    la_loss, lb_loss = a(x, targets, attention_mask=mask), b(x, targets, attention_mask=mask)
    torch.testing.assert_close(la_loss, lb_loss, atol=1e-5, rtol=1e-5)
    la_loss.backward()
    lb_loss.backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    # without padding the unpadded model takes the plain path and agrees with itself
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


# ---- packed documents ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["learned", "alibi_unpad", "electra"])
def test_documents_are_encoded_as_if_alone(variant, tmp_path):
    """With data.packing document/best_fit, a row of two documents and padding (document id -1) gives each document
    what it gives alone: attention stays inside documents and learned positions restart at each one."""
    over = {"learned": {}, "alibi_unpad": MOSAIC, "electra": {"objective": {"kind": "rtd"}}}[variant]
    plan, module = build(tmp_path, merge(over, {"data": {"packing": "best_fit"}}))
    assert plan.attention in ("sdpa_mask", "sdpa_alibi")
    torch.manual_seed(0)
    model = randomize(module.Transformer())
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (2, 32), generator=gen)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14 + [-1] * 8, [0] * 32])
    with torch.no_grad():
        got = model(x, doc_ids=doc_ids)
        for lo, hi in ((0, 10), (10, 24)):
            torch.testing.assert_close(got[0, lo:hi], model(x[:1, lo:hi])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], model(x[1:])[0], atol=1e-5, rtol=1e-5)
    if variant == "learned":
        assert module.document_positions(doc_ids)[0].tolist() == [*range(10), *range(14), *range(8)]
    # the masked-LM loss at the selected positions equals the documents' own
    if variant != "electra":
        y = torch.full_like(x, -100)
        y[0, [2, 12, 20]] = x[0, [2, 12, 20]]
        with torch.no_grad():
            logits = torch.cat([model(x[:1, :10])[0, [2]], model(x[:1, 10:24])[0, [2, 10]]])
            torch.testing.assert_close(model(x, y, doc_ids=doc_ids), F.cross_entropy(logits, x[0, [2, 12, 20]]),
                                       atol=1e-5, rtol=1e-5)


# ---- losses --------------------------------------------------------------------------------------------------


def test_mlm_loss_is_cross_entropy_on_selected_positions(tmp_path):
    _, module = build(tmp_path, MOSAIC)
    torch.manual_seed(0)
    model = randomize(module.Transformer())
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(4))
    x, y = objectives.mlm_batch(tokens, 0.3, 257, 258, [256], objectives.row_generators(1, 0, 0, 4))
    assert 0 < (y != -100).sum() < y.numel()
    with torch.no_grad():
        logits = model(x)
        want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        torch.testing.assert_close(model(x, y), want, atol=1e-6, rtol=1e-6)
        assert model(x, torch.full_like(y, -100)).item() == 0.0   # nothing selected: no loss, no NaN


def rtd_case(tmp_path, target: dict | None = None):
    """(generated module, seeded random ELECTRA model in train mode, x, y, uniforms) of a 4 × 32 masked batch."""
    _, module = build(tmp_path, {"objective": {"kind": "rtd", "discriminator_weight": 50}, **({"target": target} if target else {})})
    torch.manual_seed(0)
    model = randomize(module.Transformer())
    model.train()
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    x, y = objectives.mlm_batch(tokens, 0.3, 257, 258, [256], objectives.row_generators(1, 0, 0, 4), split=(0.85, 0, 0.15))
    uniforms = torch.rand(4, 32, generator=torch.Generator().manual_seed(9))
    return module, model, x, y, uniforms


def test_rtd_loss_is_generator_mlm_plus_weighted_discriminator(tmp_path):
    _, model, x, y, uniforms = rtd_case(tmp_path)
    loss = model(x, y, uniforms=uniforms)
    # the same by hand, drawing the same samples
    masked = y != -100
    with torch.no_grad():
        gen_logits = model.generator_decode(model.generator_hidden(model.embeddings(x, torch.arange(32)), None))[masked]
        gen_loss = F.cross_entropy(gen_logits, y[masked])
        sampled = objectives.sample_replacements(gen_logits[:, :258], uniforms[masked])
        corrupted = torch.where(masked, y, x)
        corrupted[masked] = sampled
        replaced = (masked & (corrupted != torch.where(masked, y, x))).float()
        assert 0 < replaced.sum() <= masked.sum()
        disc = model.discriminator_predictions(model.encoder(model.embeddings(corrupted, torch.arange(32)), None))
        want = gen_loss + 50 * F.binary_cross_entropy_with_logits(disc, replaced)
    torch.testing.assert_close(loss.detach(), want, atol=1e-5, rtol=1e-5)
    # the samples carry no gradient: the generator learns from its MLM loss only
    model.zero_grad()
    gen_only = model(x, y, uniforms=uniforms)
    gen_only.backward()
    g1 = model.generator.embeddings_project.weight.grad.clone()
    model.zero_grad()
    gl = F.cross_entropy(model.generator_decode(model.generator_hidden(model.embeddings(x, torch.arange(32)), None))[masked], y[masked])
    gl.backward()
    torch.testing.assert_close(model.generator.embeddings_project.weight.grad, g1, atol=1e-6, rtol=1e-5)
    # inference: one replaced/original logit per token
    with torch.no_grad():
        assert model(x).shape == (4, 32)


@pytest.mark.parametrize("counts", [False, True])
def test_compiled_rtd_equals_eager(counts, tmp_path):
    """Compiled, ELECTRA selects its masked positions with a static shape (the masked ones first, head_positions(n) of
    them) and weights the discriminator's positions instead of selecting them: no boolean indexing, which breaks the
    graph and waits for the GPU. The same samples, loss and gradients as eager."""
    module, model, x, y, uniforms = rtd_case(tmp_path, {"compile": "on"})
    kw = {"uniforms": uniforms, **({"counts": torch.tensor([60.0, 150.0])} if counts else {})}
    assert 0 < (y != -100).sum() < module.head_positions(y.numel()) < y.numel()
    eager = model(x, y, **kw)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model)(x, y, **kw)
    compiled.backward()
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-5)
    for name, p in model.named_parameters():
        if name in grads:
            assert torch.allclose(p.grad, grads[name], rtol=1e-4, atol=1e-6), name


def test_rtd_loss_and_gradients_add_up_over_micro_batches(tmp_path):
    """Each row's replacements come from its own uniforms, and with the batch's counts the micro-batches' losses
    (and gradients) add up to the whole batch's: what makes an rtd step independent of its split (train.py)."""
    _, module = build(tmp_path, {"objective": {"kind": "rtd", "discriminator_weight": 50}})
    torch.manual_seed(0)
    model = randomize(module.Transformer())
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    x, y = objectives.mlm_batch(tokens, 0.3, 257, 258, [256], objectives.row_generators(1, 0, 0, 4))
    uniforms = torch.rand(4, 32, generator=torch.Generator().manual_seed(9))
    counts = torch.tensor([float((y != -100).sum()), float(y.numel())])
    assert len({int((y[r] != -100).sum()) for r in range(4)}) > 1   # rows mask differently: a mean of means would differ

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return out

    whole = model(x, y, uniforms=uniforms)          # counts None: the batch's own means
    whole.backward()
    want = grads()
    assert set(want) >= {"generator.embeddings_project.weight", "discriminator_predictions.dense.weight"}
    parts = []
    for rows in (slice(0, 1), slice(1, 3), slice(3, 4)):
        part = model(x[rows], y[rows], uniforms=uniforms[rows], counts=counts)
        part.backward()
        parts.append(part.detach())
    torch.testing.assert_close(sum(parts), whole.detach(), atol=1e-5, rtol=1e-5)
    got = grads()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-4, msg=name)
    # other uniforms, other samples: the loss does depend on them
    with torch.no_grad():
        assert abs(model(x, y, uniforms=1 - uniforms).item() - whole.item()) > 1e-3


# ---- validation and export -----------------------------------------------------------------------------------


BAD = {
    "alibi_on_llama": ({"model": {"position": "alibi"}}, "model.position", "built for model.family bert only"),
    "geglu_on_llama": ({"model": {"activation": "geglu"}}, "model.activation", "built for model.family bert only"),
    "unpad_on_llama": ({"model": {"unpad": True}}, "model.unpad", "bert only"),
    "mlm_on_llama": ({"objective": {"kind": "mlm"}}, "objective.kind", "needs a bidirectional encoder"),
    "bert_causal": (merge(BERT, {"objective": {"kind": "causal_lm"}}), "objective.kind", "trains a decoder"),
    "bert_swiglu": (merge(BERT, {"model": {"activation": "swiglu"}}), "model.activation", "built for model.family llama only"),
    "bert_rope": (merge(BERT, {"model": {"position": "rope"}}), "model.position", "built for model.family llama only"),
    "bert_rmsnorm": (merge(BERT, {"model": {"norm": "rmsnorm"}}), "model.norm", "built for model.family llama only"),
    "bert_gqa": (merge(BERT, {"model": {"n_kv_heads": 2}}), "model.n_kv_heads", "grouped-query attention"),
    "bert_sample": (merge(BERT, {"train": {"sample_tokens": 16}}), "train.sample_tokens", "does not generate text"),
    "mask_rate": (merge(BERT, {"objective": {"mask_rate": 1.0}}), "objective.mask_rate", "between 0% and 100%"),
    "split": (merge(BERT, {"objective": {"split": [0.8, 0.1, 0.2]}}), "objective.split", "add up to 100%"),
    "rtd_width": (merge(BERT, {"objective": {"kind": "rtd", "generator_width": 0}}), "objective.generator_width", "more than 0"),
    "rtd_on_llama": ({"objective": {"kind": "rtd"}}, "objective.kind", "needs a bidirectional encoder"),
    "rtd_unpad": (merge(BERT, {"model": {"unpad": True}, "objective": {"kind": "rtd"}}), "model.unpad", "not built for objective rtd"),
    "bert_init_from": (merge(BERT, {"init_from": "elsewhere"}), "init_from", "llama only"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_validation_rejects_with_a_clear_message(case, tmp_path):
    overrides, path, text = BAD[case]
    recipe = write_recipe(tmp_path, overrides)
    with pytest.raises(RecipeError) as err:
        compile_to(recipe, tmp_path / "build", host=Host())
    found = [d for d in err.value.diagnostics if d.path == path]
    assert found and text in found[0].message, [d.format() for d in err.value.diagnostics]
    assert found[0].origin is not None and found[0].origin.line > 0
    assert not (tmp_path / "build").exists()


def test_mask_token_is_added_to_the_tokenizer(tmp_path):
    plan, _ = build(tmp_path, {})
    assert plan.tokenizer_vocab == 256 + 1 + 1  # bytes, <|endoftext|>, [MASK]
    text = (tmp_path / "build" / "train.py").read_text()
    assert "'add_special_tokens': ['[MASK]']" in text
    assert "sample" not in text.split("def main", 1)[1]  # no end-of-run sample for an encoder
    assert "from malt.runtime import checkpoint, data, objectives\n" in text
    # a tokenizer that already has [MASK] gets no second one
    plan2, _ = build(tmp_path / "own", {"tokenizer": {"add_special_tokens": ["[MASK]"]}})
    assert plan2.tokenizer_vocab == 258


@pytest.mark.parametrize("variant", ["mosaic", "geglu_learned_pre", "electra_alibi_untied"])
def test_export_refuses_what_transformers_cannot_load(variant, tmp_path):
    build(tmp_path, VARIANTS[variant])
    out = tmp_path / "hf"
    with pytest.raises(RunError) as err:
        export_hf(tmp_path / "build", out)
    assert "MosaicBERT" in err.value.message and "no Hugging Face architecture" in err.value.message
    assert ("ElectraForPreTraining" if variant.startswith("electra") else "BertForMaskedLM") in err.value.message
    assert not out.exists() and not list(tmp_path.glob(".hf*"))  # nothing written


def test_electra_discriminator_matches_transformers(tmp_path):
    plan, module = build(tmp_path, {"model": {"tie_embeddings": False, "init_std": 0.2},
                                    "objective": {"kind": "rtd", "generator_width": 0.5}})
    torch.manual_seed(0)
    model = randomize(module.Transformer())
    cfg = bert_config(plan.to_json(), plan.recipe.model_dump(mode="json"))
    assert cfg["architectures"] == ["ElectraForPreTraining"]
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    hf = transformers.ElectraForPreTraining(transformers.ElectraConfig(**cfg)).eval()
    # the rename `malt export` does: `electra.` before the discriminator's encoder, its head as is, no generator
    state = {(k if k.startswith("discriminator_predictions.") else "electra." + k): v
             for k, v in model.state_dict().items() if not k.startswith("generator.")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    assert hf.num_parameters() == plan.estimates["params"] - plan.estimates["params_generator"]
    x = torch.randint(0, plan.vocab_size, (2, 32), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            want = model(x, **kw)
            assert want.shape == (2, 32) and want.std() > 0.1
            torch.testing.assert_close(hf(input_ids=x, **kw).logits, want, atol=1e-5, rtol=1e-5)


# ---- the reference recipes, trained ------------------------------------------------------------------------


def _losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def reference(recipe: str, tmp_path: Path, steps: int = 12, target: dict | None = None, packing: str = "concat", **train) -> Path:
    """recipes/RECIPE with a small local corpus, a bytes tokenizer, a tiny model and `steps` steps, compiled."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_corpus(tmp_path / "corpus.jsonl", 150)
    child = {
        "extends": str(ROOT / "recipes" / f"{recipe}.yaml"),
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128},
        "tokenizer": {"kind": "bytes", "vocab_size": None, "train_on": []},
        "data": {"sources": [{"name": "corpus", "path": "corpus.jsonl"}], "validation": "5%", "packing": packing},
        "train": {"seq_len": 64, "global_batch": 8, "micro_batch": 4, "tokens": None, "steps": steps, "log_every": 1,
                  "eval_every": steps, "checkpoint_every": steps // 2, "eval_batches": 2, **train},
        "schedule": {"warmup": 2},
        "optimizer": {"lr": 3e-3},
        "target": {"accelerator": "cpu", "precision": "fp32", "compile": "off", **(target or {})},
    }
    import yaml

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(child, sort_keys=False))
    compile_to(tmp_path / "recipe.yaml", tmp_path / "run", host=Host())
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("recipe, packing", [("tiny-bert", "concat"), ("tiny-mosaicbert", "concat"), ("tiny-electra", "concat"),
                                             ("tiny-mosaicbert", "best_fit"), ("tiny-bert", "document")])
def test_reference_recipe_trains(recipe, packing, tmp_path):
    run = reference(recipe, tmp_path, packing=packing)
    proc = run_program(run, tmp_path / "cache", "--quiet")
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 13))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.1, losses
    assert "sample" not in proc.stdout


@pytest.mark.slow
def test_mlm_resume_is_exact(tmp_path):
    """Masking is a function of (seed, step, row): a run resumed from its step-4 checkpoint repeats steps 5-8 exactly."""
    full = reference("tiny-mosaicbert", tmp_path, steps=8)
    run_program(full, tmp_path / "cache", "--quiet")
    want = _losses(full)
    # the same run, as if it had stopped after its step-4 checkpoint
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_00000008")
    (part / "checkpoints" / "latest").write_text("step_00000004\n")
    lines = (part / "metrics.jsonl").read_text().splitlines()
    (part / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line).get("step", 0) <= 4))
    run_program(part, tmp_path / "cache", "--quiet", "--resume")
    got = _losses(part)
    assert sorted(got) == list(range(1, 9))
    assert got == want


@pytest.mark.slow
def test_mlm_on_two_processes_follows_one_process(tmp_path):
    """Each sequence is masked from its own stream: two DDP processes see the batches one process sees."""
    import subprocess
    import sys

    one = reference("tiny-mosaicbert", tmp_path / "one", steps=6)
    two = reference("tiny-mosaicbert", tmp_path / "two", steps=6, target={"devices": 2, "parallelism": "ddp"})
    run_program(one, tmp_path / "cache", "--quiet")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(two / "train.py"), "--quiet"]
    proc = subprocess.run(cmd, env=run_env(tmp_path / "cache"), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = _losses(one), _losses(two)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), step


def test_recipe_mask_rate_and_split(tmp_path):
    """tiny-mosaicbert's program masks 30% of the (non-special) tokens, 80/10/10, as its make_batch calls mlm_batch."""
    import ast

    consts = {}
    for node in ast.parse((ROOT / "tests" / "golden" / "tiny-mosaicbert" / "train.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.startswith("MASK_"):
            consts[node.targets[0].id] = ast.literal_eval(node.value)
    assert consts == {"MASK_RATE": 0.3, "MASK_SPLIT": (0.8, 0.1, 0.1), "MASK_TOKEN": "[MASK]"}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 4096, (64, 128), generator=gen)
    tokens[:, ::17] = 4096                                    # the end-of-text token: special, never selected
    specials = [4096, 4097]                                   # <|endoftext|>, [MASK]
    x, y = objectives.mlm_batch(tokens, consts["MASK_RATE"], 4097, 4098, specials, objectives.row_generators(1337, 5, 0, 64),
                                split=consts["MASK_SPLIT"])
    selected = y != -100
    eligible = tokens != 4096
    n = int(eligible.sum())
    rate = selected.sum().item() / n
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)     # within four standard deviations
    assert not (selected & ~eligible).any()
    assert torch.equal(y[selected], tokens[selected]) and torch.equal(x[~selected], tokens[~selected])
    k = int(selected.sum())
    shares = [(x[selected] == 4097).sum().item() / k, ((x[selected] != 4097) & (x[selected] != tokens[selected])).sum().item() / k]
    assert abs(shares[0] - 0.8) < 4 * math.sqrt(0.16 / k)
    assert abs(shares[1] - 0.1 * (1 - 1 / 4096)) < 4 * math.sqrt(0.09 / k)  # a random token equal to the original looks kept
    # and the rows of micro-batches are the rows of the whole batch
    halves = [objectives.mlm_batch(tokens[s:s + 32], 0.3, 4097, 4098, specials, objectives.row_generators(1337, 5, s, 32))
              for s in (0, 32)]
    assert torch.equal(torch.cat([h[1] for h in halves]), objectives.mlm_batch(
        tokens, 0.3, 4097, 4098, specials, objectives.row_generators(1337, 5, 0, 64))[1])


@pytest.mark.slow
def test_electra_export_round_trip(tmp_path):
    run = reference("tiny-electra", tmp_path, steps=4)
    run_program(run, tmp_path / "cache", "--quiet")
    out = tmp_path / "hf"
    assert export_hf(run, out) == "ElectraForPreTraining"
    hf = transformers.AutoModelForPreTraining.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "ElectraForPreTraining"
    model, malt_tok, _ = load_run_model(run)
    ids = tok("the model reads tokens")["input_ids"]
    assert ids == malt_tok.encode("the model reads tokens").ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_bert_export_round_trip_and_no_sample(tmp_path):
    import subprocess
    import sys

    run = reference("tiny-bert", tmp_path, steps=4)
    run_program(run, tmp_path / "cache", "--quiet")
    out = tmp_path / "hf"
    assert export_hf(run, out) == "BertForMaskedLM"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "BertForMaskedLM"
    model, malt_tok, plan = load_run_model(run)
    assert hf.num_parameters() == plan["params"] == sum(p.numel() for p in model.parameters())
    text = "the model [MASK] tokens"
    ids = tok(text)["input_ids"]
    assert ids == malt_tok.encode(text).ids
    assert tok.mask_token == "[MASK]" and tok.mask_token_id == malt_tok.token_to_id("[MASK]") in ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), atol=1e-5, rtol=1e-5)
    filled = transformers.pipeline("fill-mask", model=hf, tokenizer=tok)(text)
    assert len(filled) == 5 and all("[MASK]" not in f["sequence"] for f in filled)
    # malt sample refuses an encoder, clearly
    proc = subprocess.run([sys.executable, "-m", "malt.compiler.cli", "sample", str(run), "--prompt", "ab"], capture_output=True,
                          text=True, env=run_env(tmp_path / "cache"), timeout=120, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "encoder" in proc.stderr and "fill-mask" in proc.stderr
