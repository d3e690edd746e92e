"""Export a run to a Hugging Face model directory, and load a run's model back.

The generated model's parameter names are Hugging Face's without the ``model.``
prefix, so export is a rename. A recipe with qkv_bias exports as
Qwen2ForCausalLM (bias on q, k, v only); otherwise as LlamaForCausalLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from .run import RunError


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} not found: {path.parent} is not a malt run directory",
                       "pass the directory `malt run` trained in, such as runs/tiny-llama")
    except ValueError as e:
        raise RunError(f"{path} is corrupt: {e}")


def load_run_model(run_dir):
    """(model, tokenizer, plan) from a run directory's model.py, latest checkpoint and tokenizer.json."""
    from tokenizers import Tokenizer

    from .checkpoint import load_weights

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory not found: {run_dir}", "runs live in runs/NAME after `malt run RECIPE`")
    plan = _read_json(run_dir / "plan.json")
    model_py = run_dir / "model.py"
    if not model_py.is_file():
        raise RunError(f"{model_py} not found: {run_dir} is not a malt run directory")
    name = f"malt_run_model_{abs(hash(str(run_dir.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, model_py)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    model = module.Transformer()
    load_weights(run_dir, model)
    model.eval()
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise RunError(f"{tok_path} not found", "the run directory is incomplete; re-run `malt run RECIPE --resume`")
    return model, Tokenizer.from_file(str(tok_path)), plan


def hf_config(plan: dict, eos_id: int) -> tuple[str, dict]:
    m = plan["model"]
    seq_len = plan["batch"]["seq_len"]
    lock_rope = plan.get("rope_theta")
    common = {
        "vocab_size": m["padded_vocab"],
        "hidden_size": m["d_model"],
        "intermediate_size": m["d_ff"],
        "num_hidden_layers": m["n_layers"],
        "num_attention_heads": m["n_heads"],
        "num_key_value_heads": m["n_kv_heads"],
        "head_dim": m["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": seq_len,
        "rms_norm_eps": m["norm_eps"],
        "rope_theta": m["rope_theta"],
        "rope_parameters": {"rope_type": "default", "rope_theta": m["rope_theta"]},
        "tie_word_embeddings": m["tie_embeddings"],
        "initializer_range": m["init_std"],
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    del lock_rope
    if m["qkv_bias"]:
        return "Qwen2ForCausalLM", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common,
                                    "use_sliding_window": False, "sliding_window": None, "max_window_layers": m["n_layers"],
                                    "attention_dropout": 0.0}
    return "LlamaForCausalLM", {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                                "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1}


def export_hf(run_dir, out, force: bool = False) -> str:
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise RunError(f"{out} already exists and is not empty", "choose another directory, or pass --force to replace it")
    model, tokenizer, plan = load_run_model(run_dir)
    specials = _read_json(run_dir / "recipe.lock.yaml.json") if (run_dir / "recipe.lock.yaml.json").exists() else None
    del specials
    eos_token = plan.get("eos_token", "<|endoftext|>")
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        eos_id = 0
    arch, config = hf_config(plan, eos_id)
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            if config["tie_word_embeddings"]:
                continue
            state[key] = tensor.contiguous()
        else:
            state["model." + key] = tensor.contiguous()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id}, indent=2) + "\n")
    shutil.copyfile(run_dir / "tokenizer.json", tmp / "tokenizer.json")
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "bos_token": eos_token,
                  "unk_token": None, "model_max_length": plan["batch"]["seq_len"], "clean_up_tokenization_spaces": False}
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos_token, "bos_token": eos_token}, indent=2) + "\n")
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, out)
    return arch
