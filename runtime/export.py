"""Export a run to a Hugging Face model directory, and load a run's model back.

The generated model's parameter names are Hugging Face's without the ``model.``
prefix, so export is a rename. A recipe with qkv_bias exports as
Qwen2ForCausalLM (bias on q, k, v only); otherwise as LlamaForCausalLM, or with
model.sliding_window as MistralForCausalLM (Qwen2ForCausalLM with its sliding
window on every layer when it also has qkv_bias).
Encoders (model.family bert) with BERT's architecture export as BertForMaskedLM
(objective mlm) or, the discriminator alone, ElectraForPreTraining (objective rtd);
MosaicBERT variants (ALiBi, GeGLU, pre-norm) are refused before anything is written.
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
    plan = trained_plan(run_dir, plan)
    m = plan["model"]
    if plan.get("phases"):  # the depth and rotary base of the phase the checkpoint ended in (growth, context extension)
        model = module.Transformer(n_layers=m["n_layers"])
        if hasattr(model, "set_rope"):
            model.set_rope(m["rope_theta"])
    else:
        model = module.Transformer()
    load_weights(run_dir, model)
    model.eval()
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise RunError(f"{tok_path} not found", "the run directory is incomplete; re-run `malt run RECIPE --resume`")
    return model, Tokenizer.from_file(str(tok_path)), plan


def trained_plan(run_dir, plan: dict) -> dict:
    """plan.json as of the run's newest checkpoint: with phases, its model's n_layers and rope_theta are those
    of the phase that checkpoint's last step trained in (a run stopped before a growth is still small; a context
    extension phase trains with its own rotary base). A copy; plan.json's own values are the final phase's."""
    from .checkpoint import latest

    phases = plan.get("phases") or []
    found = latest(run_dir)
    if not phases or found is None:
        return plan
    last = max(0, found[0] - 1)
    phase = next((ph for ph in phases if ph["start_step"] <= last < ph["end_step"]), phases[-1])
    model = dict(plan["model"])
    for key in ("n_layers", "rope_theta"):
        if key in phase:
            model[key] = phase[key]
    return {**plan, "model": model}


def _model_section(plan: dict, lock: dict | None) -> dict:
    """The model's shape: plan.json's ``model`` section, with the fields it does not carry
    (norm_eps, rope_theta, init_std) taken from the resolved recipe (recipe.lock.yaml)."""
    m = dict(plan["model"])
    recipe_model = (lock or {}).get("model") or {}
    for key in ("norm_eps", "rope_theta", "init_std"):
        if key not in m:
            if key not in recipe_model:
                raise RunError(f"model.{key} is in neither plan.json nor recipe.lock.yaml",
                               "the run directory is incomplete or from another malt version; compile the recipe again")
            m[key] = recipe_model[key]
    return m


def read_lock(run_dir) -> dict:
    """The resolved recipe a run was compiled from (recipe.lock.yaml)."""
    import yaml

    path = Path(run_dir) / "recipe.lock.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} not found: {path.parent} is not a malt run directory",
                       "pass the directory `malt run` trained in, such as runs/tiny-llama")
    except yaml.YAMLError as e:
        raise RunError(f"{path} is corrupt: {e}")
    if not isinstance(data, dict):
        raise RunError(f"{path} is corrupt: expected a mapping")
    return data


# post-processors that add special tokens around encoded text (a BOS, [CLS]/[SEP]); ByteLevel only trims offsets
_ADDS_TOKENS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def as_trained(tokenizer: dict) -> dict:
    """tokenizer.json that encodes text as the run's data was encoded: without the post-processor steps that add
    special tokens. A `kind: file` tokenizer (a Llama's, say) may prepend a BOS by default, which the data pipeline
    never did (it encodes with add_special_tokens=False): transformers' tokenizer(text) would feed the model a
    first token it never saw there."""
    post = tokenizer.get("post_processor")
    if not post:
        return tokenizer
    if post.get("type") in _ADDS_TOKENS:
        return {**tokenizer, "post_processor": None}
    if post.get("type") == "Sequence":
        kept = [p for p in post.get("processors", []) if p.get("type") not in _ADDS_TOKENS]
        return {**tokenizer, "post_processor": {**post, "processors": kept} if kept else None}
    return tokenizer


def end_of_text(tokenizer, lock: dict) -> tuple[str | None, int | None]:
    """(token, id) of the run's end-of-text token: the tokenizer's first special token (tokenizer.special_tokens),
    which the data puts between documents; it also serves as BOS. (None, None) without one."""
    specials = (lock.get("tokenizer") or {}).get("special_tokens") or []
    token = specials[0] if specials else None
    token_id = tokenizer.token_to_id(token) if token is not None else None
    return (token, token_id) if token_id is not None else (None, None)


def longest_seq_len(plan: dict) -> int:
    """The longest sequence the run trained on (plan.json: train.seq_len and every phase's)."""
    return max([plan["batch"]["seq_len"]] + [ph["seq_len"] for ph in plan.get("phases") or []])


def hf_config(plan: dict, eos_id: int, lock: dict | None = None) -> tuple[str, dict]:
    """(architecture, config.json contents) of the Hugging Face model equivalent to the plan's.

    ``plan`` is plan.json (``Plan.to_json()``); ``lock`` the resolved recipe
    (recipe.lock.yaml), needed for the fields plan.json lacks.
    """
    m = _model_section(plan, lock)
    seq_len = longest_seq_len(plan)  # the model was trained (and its MAX_SEQ_LEN built) for the longest phase
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
        "rope_theta": m["rope_theta"],                                                  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": m["rope_theta"]},    # transformers 5.x
        "tie_word_embeddings": m["tie_embeddings"],
        "initializer_range": m["init_std"],
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    window = m.get("sliding_window")  # model.sliding_window: query i attends to keys i - window < j <= i, as Mistral's
    if m["qkv_bias"] and window is not None:  # Qwen2's sliding window on every layer (layers from max_window_layers on)
        return "Qwen2ForCausalLM", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common,
                                    "use_sliding_window": True, "sliding_window": window, "max_window_layers": 0,
                                    "layer_types": ["sliding_attention"] * m["n_layers"], "attention_dropout": 0.0}
    if m["qkv_bias"]:
        return "Qwen2ForCausalLM", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common,
                                    "use_sliding_window": False, "sliding_window": None, "max_window_layers": m["n_layers"],
                                    "attention_dropout": 0.0}
    if window is not None:  # Mistral is Llama's architecture and parameter names plus the window
        return "MistralForCausalLM", {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **common,
                                      "sliding_window": window, "attention_dropout": 0.0}
    return "LlamaForCausalLM", {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                                "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1}


def encoder_refusal(plan: dict, lock: dict | None) -> str | None:
    """Why an encoder run has no Hugging Face architecture that loads it (None: plain BERT, BertForMaskedLM loads it)."""
    m = _model_section(plan, lock)
    odd = [f"model.{k} {m.get(k)}" for k, plain in (("position", "learned"), ("activation", "gelu"), ("norm_position", "post"))
           if m.get(k, plain) != plain]
    if odd:
        arch = "ElectraForPreTraining" if _is_rtd(lock) else "BertForMaskedLM"
        return (f"this encoder ({', '.join(odd)}: MosaicBERT options) has no Hugging Face architecture that loads it; "
                f"{arch} has learned positions, GELU and post-norm")
    return None


def _is_rtd(lock: dict | None) -> bool:
    return ((lock or {}).get("objective") or {}).get("kind") == "rtd"


def bert_config(plan: dict, lock: dict | None = None) -> dict:
    """config.json of the BertForMaskedLM equal to a plain-BERT run, or of the ElectraForPreTraining equal to an rtd
    run's discriminator (no dropout: malt trains without it)."""
    m = _model_section(plan, lock)
    rtd = _is_rtd(lock)  # ELECTRA: the discriminator alone, as ElectraForPreTraining (the generator is not exported)
    return {
        "architectures": ["ElectraForPreTraining" if rtd else "BertForMaskedLM"],
        "model_type": "electra" if rtd else "bert",
        **({"embedding_size": m["d_model"]} if rtd else {}),
        "vocab_size": m["padded_vocab"],
        "hidden_size": m["d_model"],
        "num_hidden_layers": m["n_layers"],
        "num_attention_heads": m["n_heads"],
        "intermediate_size": m["d_ff"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": longest_seq_len(plan),
        "type_vocab_size": 2,
        "initializer_range": m["init_std"],
        "layer_norm_eps": m["norm_eps"],
        "pad_token_id": None,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": m["tie_embeddings"],
        "torch_dtype": "float32",
    }


def export_hf(run_dir, out, force: bool = False) -> str:
    """Write the run's latest checkpoint to ``out`` as a Hugging Face model directory; returns the architecture."""
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a directory", "choose another output directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise RunError(f"{out} already exists and is not empty", "choose another directory, or pass --force to replace it")
    if run_dir.exists() and (out.resolve() == run_dir.resolve() or out.resolve() in run_dir.resolve().parents):
        raise RunError(f"{out} is or contains the run directory {run_dir}; exporting there would replace the run",
                       "choose an output directory outside the run, such as hf/NAME")
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise RunError(f"{out} is or contains the current directory; exporting replaces the whole output directory",
                       "export into a folder of its own, such as hf/NAME")
    out = out.resolve()  # absolute: "hf/" and "hf" name the same folder, and its temporary sibling is beside it
    encoder = (run_dir / "plan.json").is_file() and _read_json(run_dir / "plan.json").get("model", {}).get("family") == "bert"
    if encoder:  # refuse before writing anything: never a half-valid directory
        why = encoder_refusal(_read_json(run_dir / "plan.json"), read_lock(run_dir))
        if why:
            raise RunError(f"cannot export {run_dir}: {why}",
                           "export works for plain BERT recipes (model.position learned, activation gelu, norm_position post); "
                           "the run's checkpoints (safetensors) and model.py hold the weights")
    model, tokenizer, plan = load_run_model(run_dir)
    lock = read_lock(run_dir)
    eos_token, eos_id = end_of_text(tokenizer, lock)
    state = {}
    if encoder and _is_rtd(lock):  # ElectraForPreTraining: `electra.` before the encoder's names; no generator
        config = bert_config(plan, lock)
        arch = config["architectures"][0]
        for key, tensor in model.state_dict().items():
            if not key.startswith("generator."):
                state[key if key.startswith("discriminator_predictions.") else "electra." + key] = tensor.contiguous()
    elif encoder:  # BertForMaskedLM: `bert.` before the encoder's names, `cls.` (the MLM head) as it is
        config = bert_config(plan, lock)
        arch = config["architectures"][0]
        for key, tensor in model.state_dict().items():
            state[key if key.startswith("cls.") else "bert." + key] = tensor.contiguous()
        # the decoder's bias is the head's bias (transformers ties the two only when the embeddings are tied)
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
    else:
        arch, config = hf_config(plan, eos_id, lock)
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
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if not encoder:
            (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id}, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(json.dumps(as_trained(json.loads((run_dir / "tokenizer.json").read_text())),
                                                       ensure_ascii=False, indent=2) + "\n")
        specials_map = {"eos_token": eos_token, "bos_token": eos_token} if eos_token is not None else {}
        if encoder:  # the fill-mask pipeline needs the mask token; the end-of-text token separates (and pads) sequences
            specials_map = {"mask_token": ((lock.get("objective") or {}).get("mask_token") or "[MASK]"),
                            **({"sep_token": eos_token, "pad_token": eos_token} if eos_token is not None else {})}
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials_map, "unk_token": None,
                      "model_max_length": longest_seq_len(plan), "clean_up_tokenization_spaces": False,
                      # a decoder, as its data was encoded: text that spells a special token is that text, not the
                      # token (an encoder's fill-mask input spells [MASK] to mean the token)
                      **({} if encoder else {"split_special_tokens": True})}
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(specials_map, indent=2) + "\n")
    except BaseException:  # an interrupted or failed export leaves nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, out)
    return arch
