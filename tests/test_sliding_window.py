"""Sliding-window attention (model.sliding_window), from recipe to trained and exported model.

A window of W means what Hugging Face's MistralForCausalLM means: query i attends to key j when
i - W < j <= i. Checked against transformers (its mask function, and MistralForCausalLM /
Qwen2ForCausalLM with the same weights), with document packing (each document alone), for the CUDA
program's FlexAttention path (forward, eagerly on this CPU), in the plan (FLOPs, mask memory), in what
`malt check` rejects, in export, and in a real training run of recipes/tiny-swa.yaml.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # the test extra; a missing one must fail, not skip
from malt.compiler.api import compile_to
from malt.compiler.api import plan as make_plan
from malt.compiler.cli import app
from malt.compiler.diagnostics import RecipeError
from malt.compiler.estimates import flops_per_token
from malt.compiler.loader import load
from malt.compiler.passes.choose_attention import window_blocks
from malt.compiler.plan import Host, recipe_hash, resolved_recipe
from malt.compiler.validate import validate
from malt.runtime.export import hf_config
from malt.runtime.packing import document_ids
from transformers.masking_utils import sliding_window_causal_mask_function
from typer.testing import CliRunner

from .helpers import run_program, write_corpus

ROOT = Path(__file__).resolve().parents[1]
EOS_ID = 256  # the bytes tokenizer's <|endoftext|>
W = 8         # the window of these tests, at seq_len 32 (BASE_RECIPE's)
H100 = Host(cuda=True, cuda_name="NVIDIA H100 80GB HBM3", cpu_cores=16, memory_bytes=128 * 2**30)
CUDA = ["target.accelerator=auto", "target.precision=fp32", "target.compile=off"]

# name -> (model section, the Hugging Face architecture the export writes)
SHAPES = {
    "gqa_untied": ({"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 96, "tie_embeddings": False,
                    "init_std": 0.05}, "MistralForCausalLM"),
    "mha_tied": ({"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "tie_embeddings": True, "init_std": 0.05},
                 "MistralForCausalLM"),
    "qkv_bias": ({"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 96, "qkv_bias": True,
                  "tie_embeddings": True, "init_std": 0.05}, "Qwen2ForCausalLM"),
}


def build(make_recipe, load_model_module, directory, model: dict, window: int | None = W, packing: str = "concat",
          host: Host | None = None, sets=()):
    """(plan, model module, model with weights from seed 0, biases and norms randomised, in eval mode)."""
    overrides = {"model": {**model, **({"sliding_window": window} if window else {})}, "data": {"packing": packing}}
    recipe = make_recipe(overrides, directory=directory)
    plan = compile_to(recipe, directory / "build", sets=list(sets), host=host or Host())
    module = load_model_module(directory / "build")
    torch.manual_seed(0)
    net = module.Transformer()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: make every parameter matter
        for name, p in net.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return plan, module, net.eval()


def hf_model(plan, net, attn: str):
    """The Hugging Face model `malt export` describes (hf_config), with net's weights copied in."""
    arch, config = hf_config(plan.to_json(), EOS_ID, resolved_recipe(plan.recipe))
    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **kwargs)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()
    state = {k if k == "lm_head.weight" else "model." + k: v for k, v in net.state_dict().items()}
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert hf.num_parameters() == sum(p.numel() for p in net.parameters())
    return arch, hf


def packed_row(lengths, seed=0):
    """One row of documents of the given lengths (each ending with EOS), its document ids, and the documents."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.randint(0, 256, (n - 1,), generator=g), torch.tensor([EOS_ID])]) for n in lengths]
    x = torch.cat(docs)[None]
    return x, torch.from_numpy(document_ids(x.numpy(), EOS_ID)), docs


# --------------------------------------------------------------------------- numerics against transformers


def test_mask_is_transformers_sliding_window_mask(make_recipe, load_model_module, tmp_path):
    """sliding_window_mask element by element against transformers' own mask function (masking_utils)."""
    _, module, _ = build(make_recipe, load_model_module, tmp_path, SHAPES["mha_tied"][0])
    hf_rule = sliding_window_causal_mask_function(W)
    mask = module.sliding_window_mask(29, "cpu")
    assert mask.shape == (1, 1, 29, 29) and mask.dtype == torch.bool
    pos = torch.arange(29)
    want = hf_rule(torch.tensor(0), torch.tensor(0), pos[:, None], pos[None, :])    # (29, 29), transformers' rule
    assert want.shape == (29, 29) and torch.equal(mask[0, 0], want)
    for i in range(29):
        for j in range(29):
            assert bool(mask[0, 0, i, j]) == (i - W < j <= i), (i, j)
    assert int(mask[0, 0].sum(1).max()) == W


# the CPU kernels of a window: SDPA with the mask, and (bf16 on a CPU with bf16 matmuls) the generated
# causal_attention with it; the models run in fp32 here, where both must be exact
KERNELS = {"sdpa_mask": (Host(), []), "blocked_causal": (Host(cpu_bf16=True), ["target.precision=bf16"])}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_match_transformers(make_recipe, load_model_module, tmp_path, shape, attn, kernel):
    model, want_arch = SHAPES[shape]
    host, sets = KERNELS[kernel]
    plan, _, net = build(make_recipe, load_model_module, tmp_path / "w", model, host=host, sets=sets)
    assert plan.attention == kernel
    arch, hf = hf_model(plan, net, attn)
    assert arch == want_arch and type(hf).__name__ == want_arch and hf.config.sliding_window == W
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 257, (2, 32), generator=gen)    # 4 windows long
    short = torch.randint(0, 257, (3, 11), generator=gen)
    with torch.no_grad():
        got, want = net(x), hf(input_ids=x).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net(short), hf(input_ids=short).logits, rtol=1e-5, atol=1e-5)
    # the test can fail: the same weights with full causal attention agree inside the first window only
    _, _, full = build(make_recipe, load_model_module, tmp_path / "full", model, window=None)
    full.load_state_dict(net.state_dict())
    with torch.no_grad():
        causal = full(x)
    torch.testing.assert_close(causal[:, :W], got[:, :W], rtol=1e-5, atol=1e-5)
    assert (causal[:, W:] - got[:, W:]).abs().amax(-1).min() > 1e-3  # every position past the window differs


# --------------------------------------------------------------------------- document packing


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("packing", ["document", "best_fit"])
def test_each_documents_logits_equal_running_it_alone(make_recipe, load_model_module, tmp_path, packing, kernel):
    host, sets = KERNELS[kernel]
    plan, module, net = build(make_recipe, load_model_module, tmp_path / "w", SHAPES["gqa_untied"][0], packing=packing,
                              host=host, sets=sets)
    assert plan.attention == kernel
    lengths = [19, 1, 9, 3]                # documents longer and shorter than the window, a one-token one; 32 = seq_len
    x, ids, docs = packed_row(lengths)
    x1, ids1, docs1 = packed_row([14, 11], seed=3)
    x = torch.cat([x, torch.cat([x1, torch.full((1, 7), EOS_ID)], 1)])    # a second row: two documents, then padding
    ids = torch.cat([ids, torch.cat([ids1, torch.full((1, 7), 2)], 1)])
    with torch.no_grad():
        packed = net(x, doc_ids=ids)
        for row, row_docs in ((0, docs), (1, docs1)):
            at = 0
            for d in row_docs:
                torch.testing.assert_close(packed[row, at:at + len(d)], net(d[None])[0], rtol=1e-5, atol=1e-5)
                at += len(d)
    # the test can fail: with document masks but no window, the first document differs past its first W tokens
    _, _, no_window = build(make_recipe, load_model_module, tmp_path / "full", SHAPES["gqa_untied"][0], window=None,
                            packing=packing)
    no_window.load_state_dict(net.state_dict())
    with torch.no_grad():
        docs_only = no_window(x, doc_ids=ids)
    torch.testing.assert_close(docs_only[0, :W], packed[0, :W], rtol=1e-5, atol=1e-5)
    assert (docs_only[0, W:19] - packed[0, W:19]).abs().amax(-1).min() > 1e-3
    mask = module.sliding_window_mask(32, "cpu", ids)
    assert mask.shape == (2, 1, 32, 32)
    for b in range(2):
        for i in range(32):
            for j in range(32):
                assert bool(mask[b, 0, i, j]) == (i - W < j <= i and int(ids[b, i]) == int(ids[b, j])), (b, i, j)


def test_training_with_a_window_chunked_loss_and_gradients_match(make_recipe, load_model_module, tmp_path):
    """Eager training with doc_ids and a window: the chunked loss and its gradients equal the unchunked path's."""
    _, _, net = build(make_recipe, load_model_module, tmp_path, SHAPES["mha_tied"][0], packing="document")
    net.train()
    x, ids, _ = packed_row([20, 12], seed=5)
    y = torch.roll(x, -1, 1)
    loss = net(x, y, doc_ids=ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    ref = torch.nn.functional.cross_entropy(net(x, doc_ids=ids).float().flatten(0, 1), y.flatten())
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in net.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- the CUDA program's FlexAttention path


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_flex_attention_program_equals_the_sdpa_program(make_recipe, load_model_module, tmp_path, packing):
    """The CUDA program (FlexAttention at the run's length, dense SDPA at others) run eagerly on this CPU, forward
    only, against the CPU program with the same weights."""
    import torch.nn.attention.flex_attention as flex

    model = SHAPES["gqa_untied"][0]
    plan, module, gpu_net = build(make_recipe, load_model_module, tmp_path / "cuda", model, packing=packing, host=H100,
                                  sets=CUDA)
    assert (plan.device, plan.attention) == ("cuda", "flex")
    src = (tmp_path / "cuda" / "build" / "model.py").read_text()
    assert "flex_attention(q, k, v, block_mask=mask, enable_gqa=True)" in src and "FLEX_SEQ_LENS = (32,)" in src
    assert "return (kv <= q) & (q - kv < SLIDING_WINDOW)" in src or "in_window = (kv <= q) & (q - kv < SLIDING_WINDOW)" in src
    module.flex_attention = flex.flex_attention         # the eager kernel: compiling FlexAttention on a CPU takes minutes
    _, cpu_module, cpu_net = build(make_recipe, load_model_module, tmp_path / "cpu", model, packing=packing)
    cpu_net.load_state_dict(gpu_net.state_dict())
    if packing == "concat":
        x, kwargs = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(4)), {}
        assert isinstance(module.sliding_window_mask(32, "cpu"), flex.BlockMask)
    else:
        x, ids, _ = packed_row([13, 10, 9], seed=4)
        kwargs = {"doc_ids": ids}
        assert isinstance(module.sliding_window_mask(32, "cpu", ids), flex.BlockMask)
    with torch.no_grad():
        torch.testing.assert_close(gpu_net(x, **kwargs), cpu_net(x, **kwargs), rtol=1e-5, atol=1e-5)
        short = x[:, :13]                                # another length (as when sampling): the dense mask
        dense = module.sliding_window_mask(13, "cpu")
        assert isinstance(dense, torch.Tensor) and torch.equal(dense, cpu_module.sliding_window_mask(13, "cpu"))
        torch.testing.assert_close(gpu_net(short), cpu_net(short), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the plan


def test_flops_per_token_counts_the_window(make_recipe, tmp_path):
    with_window, _ = make_plan(make_recipe({"model": {"sliding_window": W}}, directory=tmp_path / "w"), host=Host())
    without, _ = make_plan(make_recipe({}, directory=tmp_path / "full"), host=Host())
    m = without.recipe.model
    attention_per_key = 12 * m.n_layers * m.n_heads * without.head_dim
    fewer = without.estimates["flops_per_token"] - with_window.estimates["flops_per_token"]
    assert fewer == attention_per_key * (32 - W) > 0
    assert with_window.estimates["total_flops"] == with_window.estimates["flops_per_token"] * with_window.tokens
    assert "model.sliding_window 8" in with_window.estimates["basis"]["flops"]
    assert flops_per_token(1000, 2, 4, 16, 32, window=64) == flops_per_token(1000, 2, 4, 16, 32)  # a longer window cuts nothing


def test_the_time_counts_the_keys_a_dense_mask_computes(make_recipe, tmp_path):
    """On a CPU the window is SDPA's explicit mask: every query's seq_len keys are computed, the time counts them
    (the FLOPs, MFU's model FLOPs, count the window's); on cuda FlexAttention skips the blocks, and the time does too."""
    recipe = make_recipe({"model": {"sliding_window": W}, "train": {"eval_every": 0}}, directory=tmp_path / "w")
    cpu, _ = make_plan(recipe, ["target.accelerator=cpu"], host=Host())
    gpu, _ = make_plan(recipe, ["target.accelerator=cuda"], host=Host())
    m = cpu.recipe.model
    assert (cpu.attention, gpu.attention) == ("sdpa_mask", "flex")
    est = cpu.estimates
    assert est["masked_attention_flops"] == 12 * m.n_layers * m.n_heads * cpu.head_dim * (32 - W) * cpu.tokens
    basis = est["basis"]
    assert est["estimated_seconds"] == pytest.approx((est["total_flops"] + est["masked_attention_flops"])
                                                     / (basis["peak_flops"] * basis["mfu"]), rel=1e-4)
    assert "masked_attention_flops" not in gpu.estimates
    assert gpu.estimates["estimated_seconds"] == pytest.approx(
        gpu.estimates["total_flops"] / (gpu.estimates["basis"]["peak_flops"] * gpu.estimates["basis"]["mfu"]), rel=1e-4)


def test_memory_counts_the_explicit_mask(make_recipe, tmp_path):
    from malt.compiler.passes.estimate import activations, mask_bytes

    concat, _ = make_plan(make_recipe({"model": {"sliding_window": W}}, directory=tmp_path / "c"), host=Host())
    docs, _ = make_plan(make_recipe({"model": {"sliding_window": W}, "data": {"packing": "document"}},
                                    directory=tmp_path / "d"), host=Host())
    flex, _ = make_plan(make_recipe({"model": {"sliding_window": W}}, directory=tmp_path / "f"), CUDA, host=H100)
    # the bool mask, and the copy in the compute dtype SDPA keeps in each layer (fp32 here: 4 bytes)
    per_element = 1 + 4 * concat.n_layers
    assert concat.precision == "fp32" and mask_bytes(concat, 4, 32) == 32 * 32 * per_element  # (1, 1, T, T): every row's
    assert mask_bytes(docs, 4, 32) == 4 * 32 * 32 * per_element       # (batch, 1, T, T): each row's documents
    assert mask_bytes(docs, 4, 32, "full") == 4 * 32 * 32 * (1 + 4)   # recomputed: one layer's copy at a time
    assert mask_bytes(flex, 4, 32) == 0                                # a block mask, no (T, T) tensor
    assert activations(concat, 4, 32) - activations(flex, 4, 32) == 32 * 32 * per_element
    assert concat.estimates["memory_per_device_bytes"]["activations"] == activations(concat, concat.micro_batch, 32)


def test_choose_attention_records_the_window(make_recipe, tmp_path):
    cpu, _ = make_plan(make_recipe({"model": {"sliding_window": W}}, directory=tmp_path / "c"), host=Host())
    gpu, _ = make_plan(make_recipe({"model": {"sliding_window": W}, "data": {"packing": "best_fit"}}, directory=tmp_path / "g"),
                       CUDA, host=H100)
    reasons = {p.device: next(d for d in p.decisions if d.name == "attention") for p in (cpu, gpu)}
    assert reasons["cpu"].value == "sdpa_mask" and "i - 8 < j <= i" in reasons["cpu"].reason
    assert "(1, 1, seq, seq) boolean mask" in reasons["cpu"].reason and "FlexAttention has no backward" in reasons["cpu"].reason
    assert reasons["cuda"].value == "flex" and "block mask" in reasons["cuda"].reason
    assert "data.packing best_fit" in reasons["cuda"].reason
    assert window_blocks(4096, 1024) == (252, 528)           # 32 blocks a side; 8 blocks left of the diagonal are touched
    assert window_blocks(256, 1) == (2, 3) and window_blocks(256, 129) == (3, 3)
    assert json.loads((ROOT / "tests" / "golden" / "tiny-swa" / "plan.json").read_text())["model"]["sliding_window"] == 32


def test_no_window_keeps_the_hash_and_the_program(make_recipe, tmp_path):
    plain = validate(load(make_recipe({}, directory=tmp_path / "a"), []))
    explicit = validate(load(make_recipe({"model": {"sliding_window": None}}, directory=tmp_path / "b"), []))
    windowed = validate(load(make_recipe({"model": {"sliding_window": W}}, directory=tmp_path / "c"), []))
    assert recipe_hash(plain) == recipe_hash(explicit) != recipe_hash(windowed)
    compile_to(tmp_path / "a" / "recipe.yaml", tmp_path / "a" / "build", host=Host())
    src = (tmp_path / "a" / "build" / "model.py").read_text()
    assert "SLIDING_WINDOW" not in src and "is_causal=True" in src


# --------------------------------------------------------------------------- what malt check rejects


def line_of(recipe: Path, text: str) -> int:
    return next(i for i, line in enumerate(recipe.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize("overrides, words", [
    ({"model": {"sliding_window": 32}}, ("sliding_window 32 is not shorter than train.seq_len 32: every position already "
                                         "attends to all earlier ones, so the window would have no effect")),
    ({"model": {"sliding_window": 64}}, "is not shorter than train.seq_len 32"),
    ({"model": {"sliding_window": 40}, "phases": [{"name": "a", "share": "50%"},
                                                  {"name": "b", "share": "50%", "train": {"seq_len": 16}}]},
     "is not shorter than any sequence length of the run (the longest is 32)"),
    ({"model": {"sliding_window": W, "family": "bert"}, "objective": {"kind": "mlm"}},
     "sliding-window attention is built for model.family llama only, not bert"),
    ({"model": {"sliding_window": W}, "target": {"accelerator": "tpu", "precision": "auto", "compile": "auto"}},
     "sliding-window attention on a TPU is not built yet"),
    ({"model": {"sliding_window": W}, "objective": {"kind": "prefix_lm"}},
     "sliding-window attention with objective prefix_lm (the objective) is not built yet"),
    ({"model": {"sliding_window": W}, "objective": {"kind": "span_corruption"}},
     "with objective span_corruption (the objective) is not built yet"),
    ({"model": {"sliding_window": W}, "objective": {"kind": "ul2"}}, "with objective ul2 (the objective) is not built yet"),
])
def test_check_rejects_what_is_not_built(make_recipe, overrides, words):
    recipe = make_recipe(overrides)
    with pytest.raises(RecipeError) as info:
        validate(load(recipe, []))
    found = [d for d in info.value.diagnostics if d.path == "model.sliding_window"]
    assert len(found) == 1 and words in found[0].message, [d.format() for d in info.value.diagnostics]
    assert found[0].origin.file.endswith("recipe.yaml") and found[0].origin.line == line_of(recipe, "sliding_window:")
    assert found[0].hint


def test_check_rejects_a_window_only_in_a_phase(make_recipe):
    recipe = make_recipe({"phases": [{"name": "a", "share": "50%"}, {"name": "b", "share": "50%", "model": {"sliding_window": W}}]})
    with pytest.raises(RecipeError) as info:
        validate(load(recipe, []))
    (d,) = info.value.diagnostics
    assert d.path == "phases.1.model.sliding_window" and "a phase that changes model.sliding_window is not built yet" in d.message


def test_check_rejects_a_teacher_trained_with_a_window(make_recipe, tmp_path):
    teacher = tmp_path / "teacher"
    (teacher / "checkpoints" / "step_00000001").mkdir(parents=True)
    (teacher / "checkpoints" / "step_00000001" / "model.safetensors").write_bytes(b"")
    shape = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "head_dim": 16, "d_ff": 128, "padded_vocab": 320,
             "tie_embeddings": True, "qkv_bias": False, "norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 16}
    (teacher / "plan.json").write_text(json.dumps({"model": shape}))
    recipe = make_recipe({"objective": {"kind": "distill", "teacher": "teacher"}})
    with pytest.raises(RecipeError) as info:
        validate(load(recipe, []))
    found = [d for d in info.value.diagnostics if d.path == "objective.teacher"]
    assert any("trained with model.sliding_window 16" in d.message and "not built yet" in d.message for d in found), \
        [d.format() for d in info.value.diagnostics]


@pytest.mark.parametrize("arch,extra,windowed", [
    ("MistralForCausalLM", {"sliding_window": 16}, True),
    ("MistralForCausalLM", {"sliding_window": None}, False),
    ("Qwen2ForCausalLM", {"sliding_window": 16, "use_sliding_window": True, "max_window_layers": 0}, True),  # malt's export
    ("Qwen2ForCausalLM", {"sliding_window": 16, "use_sliding_window": True, "max_window_layers": 2}, False),  # no layer past 2
    ("Qwen2ForCausalLM", {"sliding_window": 16, "use_sliding_window": False}, False),
    ("Qwen2ForCausalLM", {"sliding_window": 16, "use_sliding_window": True,
                          "layer_types": ["full_attention", "sliding_attention"]}, True),
    ("LlamaForCausalLM", {"sliding_window": 16}, False),
])
def test_a_hugging_face_windowed_checkpoint_is_refused_as_teacher_or_start(tmp_path, arch, extra, windowed):
    """init_from and distillation teachers read Hugging Face directories: a windowed one (Mistral, or Qwen2 with
    use_sliding_window, as malt exports a windowed model with qkv_bias) is refused, not run with full attention."""
    from malt.compiler.checkpoints import describe

    d = tmp_path / "hf"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"")
    config = {"architectures": [arch], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
              "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 320, **extra}
    (d / "config.json").write_text(json.dumps(config))
    found, problem = describe(d)
    if windowed:
        assert found is None and "sliding-window attention (16)" in problem and "not built yet" in problem
        found, problem = describe(d, longest_seq=32)
        assert found is None and "(16, shorter than this run's 32-token sequences)" in problem
        # a window that covers every sequence of the run changes nothing (transformers' MistralConfig default: 4096)
        found, problem = describe(d, longest_seq=16)
        assert problem is None and found["shape"]["n_layers"] == 2
    else:
        assert problem is None and found["shape"]["n_layers"] == 2


def test_malt_check_cli_points_at_the_line(make_recipe):
    recipe = make_recipe({"model": {"sliding_window": 48}})
    result = CliRunner().invoke(app, ["check", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = line_of(recipe, "sliding_window:")
    assert f"recipe.yaml:{line}:" in result.output and "error: model.sliding_window: sliding_window 48" in result.output
    ok = CliRunner().invoke(app, ["check", str(recipe), "--set", "model.sliding_window=16"])
    assert ok.exit_code == 0, ok.output


# --------------------------------------------------------------------------- export and training


@pytest.mark.slow
def test_export_loads_as_mistral_with_the_same_logits(make_recipe, tmp_path):
    from malt.runtime.export import export_hf, load_run_model
    from malt.runtime.sample import generate

    recipe = make_recipe({"model": {"sliding_window": W, "n_kv_heads": 2}})
    run_dir = tmp_path / "run"
    compile_to(recipe, run_dir, host=Host())
    run_program(run_dir, tmp_path / "cache", "--quiet")
    out = tmp_path / "hf"
    assert export_hf(run_dir, out) == "MistralForCausalLM"
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == W and config["model_type"] == "mistral" and config["tie_word_embeddings"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "MistralForCausalLM" and hf.config.sliding_window == W
    model, malt_tok, plan = load_run_model(run_dir)
    assert hf.num_parameters() == plan["params"] == sum(p.numel() for p in model.parameters())
    x = torch.tensor([malt_tok.encode("Line 12: the quick brown fox ju").ids])  # 30 tokens, past the window of 8
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), atol=1e-5, rtol=1e-5)
        prompt = "Line 3: the quick"                                                 # 17 tokens, then 8 more greedy ones
        hf_ids = hf.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.eos_token_id)
    assert tok.decode(hf_ids[0]) == generate(model, malt_tok, prompt, 8, temperature=0)


def tiny_swa(tmp_path, steps: int) -> Path:
    """recipes/tiny-swa.yaml as written, on a small local corpus with the bytes tokenizer and a short run."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", 300)
    run = tmp_path / "run"
    sets = ["tokenizer.kind=bytes", "tokenizer.vocab_size=null", "tokenizer.train_on=[]",
            f"data.sources=[{{name: prose, path: {corpus}}}]", "data.validation=5%",
            "train.tokens=null", f"train.steps={steps}", "train.global_batch=8", "train.eval_every=4", "train.eval_batches=2",
            "train.checkpoint_every=4", "train.keep_checkpoints=8", "train.log_every=1", "train.sample_tokens=40",
            "target.accelerator=cpu", "target.precision=fp32", "target.compile=off"]
    plan = compile_to(ROOT / "recipes" / "tiny-swa.yaml", run, sets=sets, host=Host())
    assert plan.recipe.model.sliding_window == 32 and plan.recipe.train.seq_len == 128 and plan.attention == "sdpa_mask"
    return run


def records(run_dir: Path, key: str) -> dict:
    return {r["step"]: r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r}


@pytest.mark.slow
def test_tiny_swa_trains_and_resumes_exactly(tmp_path):
    cache = tmp_path / "cache"
    run = tiny_swa(tmp_path, 16)
    proc = run_program(run, cache)
    loss = records(run, "loss")
    assert sorted(loss) == list(range(1, 17)) and all(math.isfinite(v) for v in loss.values())
    assert sum(loss[s] for s in range(13, 17)) < sum(loss[s] for s in range(1, 5)) - 0.5   # falling
    assert records(run, "val_loss")[16] < records(run, "val_loss")[0]
    assert "sample (40 tokens after" in proc.stdout                                        # sampling past the window
    # go back to the step-8 checkpoint, as if the run had stopped there, and resume: the same losses, bit for bit
    ckpts = run / "checkpoints"
    for later in ("step_00000012", "step_00000016"):
        shutil.rmtree(ckpts / later, ignore_errors=True)
    (ckpts / "latest").write_text("step_00000008\n")
    run_program(run, cache, "--quiet", "--resume")
    assert records(run, "loss") == loss    # metrics.jsonl gets steps 9-16 again; the later records replace the first
