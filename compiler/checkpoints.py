"""Reading what a checkpoint directory holds, without torch: for init_from checks.

Two kinds: a malt run directory (plan.json and checkpoints/step_*/model.safetensors, or step_*/dcp/ when sharded)
and a Hugging Face model directory (config.json and *.safetensors) of the Llama,
Mistral or Qwen2 architectures.
"""

from __future__ import annotations

import json
from pathlib import Path

HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def hf_window(arch: str, c: dict) -> int | None:
    """The sliding window a Hugging Face config applies to any layer, or None: Mistral windows every layer when
    sliding_window is set; Qwen2 only with use_sliding_window, from layer max_window_layers on (layer_types where given)."""
    window = c.get("sliding_window")
    if not window:
        return None
    if arch == "MistralForCausalLM":
        return window
    if arch == "Qwen2ForCausalLM" and c.get("use_sliding_window"):
        if "layer_types" in c:
            return window if "sliding_attention" in c["layer_types"] else None
        return window if c.get("max_window_layers", 0) < c["num_hidden_layers"] else None
    return None


def describe(path: Path, longest_seq: int | None = None) -> tuple[dict | None, str | None]:
    """({kind, shape, norm_eps, rope_theta, ...}, None) for a usable checkpoint directory, else (None, what is wrong).

    Usable means malt's decoder computes what the checkpoint computes once the shape, norm_eps and rope_theta
    agree: a Hugging Face model with another activation or scaled rotary embeddings is refused here, and one with a
    sliding window unless ``longest_seq`` (the run's longest sequence) is given and the window covers it."""
    if not path.is_dir():
        return None, f"no directory {path}"
    if (path / "plan.json").is_file():
        try:
            plan = json.loads((path / "plan.json").read_text())
            m = plan["model"]
        except (ValueError, KeyError) as e:
            return None, f"{path / 'plan.json'} is not a readable malt plan ({e})"
        ck = path / "checkpoints"
        if not ck.is_dir() or not any((d / "model.safetensors").is_file() or (d / "dcp" / ".metadata").is_file()
                                      for d in ck.glob("step_*")):  # full (format 2) or sharded (format 3) checkpoints
            return None, f"{path} is a malt run directory without a checkpoint yet"
        phases = plan.get("phases") or []
        return {"kind": "malt", "shape": {
            "d_model": m["d_model"], "n_layers": m["n_layers"], "n_heads": m["n_heads"], "n_kv_heads": m["n_kv_heads"],
            "d_ff": m["d_ff"], "vocab": m["padded_vocab"], "tie_embeddings": m["tie_embeddings"], "qkv_bias": m["qkv_bias"]},
            "sliding_window": m.get("sliding_window"),  # model.sliding_window (plan.json has it when set)
            "norm_eps": m.get("norm_eps"),
            "rope_theta": phases[-1].get("rope_theta") if phases else m.get("rope_theta")}, None  # the last phase's: where it ended
    if (path / "config.json").is_file():
        try:
            c = json.loads((path / "config.json").read_text())
        except ValueError as e:
            return None, f"{path / 'config.json'} is not valid JSON ({e})"
        arch = (c.get("architectures") or ["?"])[0]
        if arch not in HF_ARCHITECTURES:
            return None, f"{path} holds a {arch}; init_from reads {', '.join(HF_ARCHITECTURES)}"
        if not list(path.glob("*.safetensors")):
            return None, f"{path} has no .safetensors weights (pickled .bin checkpoints are not read)"
        if c.get("mlp_bias") or (arch != "Qwen2ForCausalLM" and c.get("attention_bias")):
            return None, f"{path}: bias on the output or MLP projections has no counterpart in malt's model"
        window = hf_window(arch, c)
        if window is not None and (longest_seq is None or window < longest_seq):  # a window no sequence reaches changes nothing
            return None, (f"{path} uses sliding-window attention ({window}" + (f", shorter than this run's {longest_seq}-token "
                          "sequences" if longest_seq else "") + "); starting from or distilling a Hugging Face sliding-window "
                          "checkpoint is not built yet")
        heads = c["num_attention_heads"]
        if c.get("head_dim") not in (None, c["hidden_size"] // heads):
            return None, (f"{path} has head_dim {c['head_dim']} ≠ hidden_size / heads ({c['hidden_size'] // heads}); malt's "
                          "model derives the head size from d_model and n_heads, so this checkpoint cannot be read")
        if c.get("hidden_act", "silu") != "silu":
            return None, f"{path} uses hidden_act {c['hidden_act']!r}; malt's model is SwiGLU (silu)"
        rope = c.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
        if c.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            return None, f"{path} scales its rotary embeddings ({c.get('rope_scaling') or rope}), which malt's model does not"
        try:  # a null or text value in config.json is a problem of the directory, not a crash
            norm_eps = float(c.get("rms_norm_eps") if c.get("rms_norm_eps") is not None else 1e-6)
            rope_theta = float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        except (TypeError, ValueError):
            return None, f"{path / 'config.json'} has an unreadable rms_norm_eps or rope_theta ({c.get('rms_norm_eps')!r}, " \
                         f"{c.get('rope_theta') or rope.get('rope_theta')!r})"
        return {"kind": "hf", "architecture": arch, "shape": {
            "d_model": c["hidden_size"], "n_layers": c["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": c.get("num_key_value_heads") or heads, "d_ff": c["intermediate_size"], "vocab": c["vocab_size"],
            "tie_embeddings": bool(c.get("tie_word_embeddings", False)), "qkv_bias": arch == "Qwen2ForCausalLM"},
            "norm_eps": norm_eps, "rope_theta": rope_theta}, None
    return None, f"{path} is neither a malt run directory (plan.json) nor a Hugging Face model directory (config.json)"
