"""The generated model against implementations nobody here wrote: Hugging Face transformers.

For several Llama-family shapes, render model.py, initialise it from a seed,
copy the weights into LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM
built from the config that `malt export` writes (runtime.export.hf_config),
and compare logits in fp32 with both the eager and the SDPA attention of
transformers. Also: the plan's parameter count is the real one, in both models.
Nothing is downloaded: the Hugging Face models are built from configs.
"""

from __future__ import annotations

import json

import pytest
import torch

from malt.compiler.api import compile_to
from malt.compiler.plan import resolved_recipe
from malt.runtime.export import hf_config

import transformers  # noqa: E402  (the test extra; a missing one must fail, not skip)

EOS_ID = 256  # the bytes tokenizer's <|endoftext|>

# name -> (recipe overrides, Hugging Face model types to compare against)
SHAPES = {
    # multi-head attention, tied input/output embeddings, bytes vocab 257 padded to 320
    "mha_tied": ({"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 160, "tie_embeddings": True}},
                 ["llama"]),
    # grouped-query attention (8 query heads share 2 kv heads), untied head; Mistral without sliding window is the same model
    "gqa_untied": ({"model": {"d_model": 128, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "d_ff": 256,
                              "tie_embeddings": False, "init_std": 0.05}},
                   ["llama", "mistral"]),
    # bias on q, k, v only: Qwen2; with GQA and tied embeddings, as the small Qwen2 models have
    "qkv_bias_qwen2": ({"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 192,
                                  "qkv_bias": True, "tie_embeddings": True}},
                       ["qwen2"]),
    # odd-ish sizes: 3 heads of 32, d_ff not a multiple of 64, Llama 3's rope_theta, small eps, seq_len 48
    "odd_sizes": ({"model": {"d_model": 96, "n_layers": 3, "n_heads": 3, "d_ff": 200, "rope_theta": 500000,
                             "norm_eps": 1e-6, "tie_embeddings": False, "init_std": 0.05},
                   "train": {"seq_len": 48}},
                  ["llama"]),
    # bpe vocabulary 300 padded to a multiple of 128 (384); d_ff from Llama's 8/3 rule
    "vocab_padding": ({"model": {"d_model": 64, "n_layers": 1, "n_heads": 2, "d_ff": None, "pad_vocab_multiple": 128,
                                 "tie_embeddings": False},
                       "tokenizer": {"kind": "bpe", "vocab_size": 300}},
                      ["llama"]),
    # no padding at all: 257 rows, an odd vocabulary
    "vocab_unpadded": ({"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "pad_vocab_multiple": 1,
                                  "qkv_bias": True, "tie_embeddings": False}},
                       ["qwen2"]),
}


def build_malt(make_recipe, load_model_module, host, tmp_path, overrides):
    """(plan, plan.json dict, malt model with seeded random weights in eval mode)."""
    recipe = make_recipe(overrides)
    plan = compile_to(recipe, tmp_path / "build", host=host)
    module = load_model_module(tmp_path / "build")
    torch.manual_seed(0)
    model = module.Transformer()
    # the default init leaves norms at 1 and biases at 0; make every parameter matter
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.eval()
    return plan, plan.to_json(), model


def build_hf(plan_json: dict, lock: dict, model_type: str, attn: str):
    arch, config = hf_config(plan_json, EOS_ID, lock)
    config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
    if model_type == "mistral":
        assert arch == "LlamaForCausalLM"
        for k in ("attention_bias", "mlp_bias", "pretraining_tp"):
            config.pop(k)
        config["sliding_window"] = None
    else:
        assert arch == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    cfg = transformers.AutoConfig.for_model(model_type, **config)
    torch.manual_seed(123)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, torch_dtype=torch.float32)
    return hf.eval()


def perturb_norms_and_biases(model, gen: torch.Generator) -> None:
    """Norm weights off 1 and biases off 0 (by 0.2 × normal noise), so that every parameter matters in a comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=gen))


def copy_weights(malt_model, hf, tied: bool):
    """Rename malt's parameters into the HF model (the rename `malt export` does) and check nothing is left out."""
    state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v for k, v in malt_model.state_dict().items()}
    if tied:
        state.pop("lm_head.weight")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= ({"lm_head.weight"} if tied else set()), missing
    hf_params = dict(hf.named_parameters())  # tied weights appear once
    assert set(hf_params) == set(state), set(hf_params) ^ set(state)
    for k, v in state.items():
        assert torch.equal(hf_params[k], v), k
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_match_transformers(shape, make_recipe, load_model_module, host, tmp_path):
    overrides, model_types = SHAPES[shape]
    plan, pj, model = build_malt(make_recipe, load_model_module, host, tmp_path, overrides)
    lock = resolved_recipe(plan.recipe)
    tied = pj["model"]["tie_embeddings"]
    seq_len = pj["batch"]["seq_len"]
    gen = torch.Generator().manual_seed(2)
    # the full context, and a shorter odd length (the rotary tables are sliced)
    inputs = [torch.randint(0, pj["model"]["vocab_size"], (2, seq_len), generator=gen),
              torch.randint(0, pj["model"]["vocab_size"], (3, 7), generator=gen)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    assert expected[0].dtype == torch.float32
    assert expected[0].shape == (2, seq_len, pj["model"]["padded_vocab"])
    assert expected[0].std() > 0.05  # logits far from zero, so the tolerance below means something

    for model_type in model_types:
        for attn in ("eager", "sdpa"):
            hf = build_hf(pj, lock, model_type, attn)
            assert hf.dtype == torch.float32
            assert hf.config._attn_implementation == attn
            copy_weights(model, hf, tied)
            with torch.no_grad():
                for x, want in zip(inputs, expected):
                    got = hf(input_ids=x).logits
                    assert got.shape == want.shape
                    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5,
                                               msg=lambda m: f"{shape} vs {model_type} ({attn}): {m}")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_param_count_is_exact(shape, make_recipe, load_model_module, host, tmp_path):
    overrides, model_types = SHAPES[shape]
    plan, pj, model = build_malt(make_recipe, load_model_module, host, tmp_path, overrides)
    on_disk = json.loads((tmp_path / "build" / "plan.json").read_text())
    counted = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert plan.estimates["params"] == pj["params"] == on_disk["params"] == counted
    lock = resolved_recipe(plan.recipe)
    for model_type in model_types:
        hf = build_hf(pj, lock, model_type, "eager")
        assert hf.num_parameters() == counted, model_type
    # the embedding/non-embedding split adds up
    head = 0 if pj["model"]["tie_embeddings"] else pj["model"]["padded_vocab"] * pj["model"]["d_model"]
    embed = pj["model"]["padded_vocab"] * pj["model"]["d_model"]
    assert pj["params_non_embedding"] == counted - embed - head
