"""Encoder models (model.family: bert) and their objectives (mlm, rtd): the rules the compiler applies to them.

- :func:`problems`: cross-field checks between the model's family, its options and the objective
  (called by :mod:`.validate`, reported at the field's file:line).
- The [MASK] token the objectives need is appended to the tokenizer by :func:`.objectives.objective_tokens`.
- :func:`generator_shape`: the ELECTRA generator's width, heads and feed-forward size.
"""

from __future__ import annotations

ENCODER_FAMILIES = ("bert",)
ENCODER_OBJECTIVES = ("mlm", "rtd")

# what each family builds: field -> values (the first is the family's default)
BUILT = {
    "llama": {"activation": ("swiglu",), "norm": ("rmsnorm",), "position": ("rope",), "norm_position": ("pre",)},
    "bert": {"activation": ("gelu", "geglu"), "norm": ("layernorm",), "position": ("learned", "alibi"),
             "norm_position": ("post", "pre")},
}


def is_encoder(recipe) -> bool:
    return recipe.model is not None and recipe.model.family in ENCODER_FAMILIES


def generator_shape(d_model: int, n_heads: int, d_ff: int, width: float) -> dict:
    """ELECTRA's generator: the discriminator's head size and depth, ``width`` of its heads (at least one),
    so d_model and d_ff shrink by the same share (ELECTRA-Base: 768 → 256 with 12 → 4 heads of 64)."""
    head_dim = d_model // n_heads
    heads = max(1, round(n_heads * width))
    d = heads * head_dim
    return {"d_model": d, "n_heads": heads, "head_dim": head_dim, "d_ff": max(1, round(d_ff * d / d_model))}


def problems(r, origins) -> list[tuple[tuple, str, str]]:
    """(path, message, hint) for every family/option/objective mismatch. ``origins``: the paths the recipe sets."""
    out = []
    m, obj = r.model, getattr(r, "objective", None)
    if m is None:
        return out
    fam = m.family
    built = BUILT[fam]
    for field, values in built.items():
        v = getattr(m, field)
        if v not in values:
            other = next((f for f, b in BUILT.items() if v in b[field]), None)
            msg = (f"{field} {v!r} is built for model.family {other} only, not {fam}" if other
                   else f"{field} {v!r} is not built for model.family {fam}")
            out.append((("model", field), msg, f"use one of {', '.join(values)} (or remove model.{field}: default {values[0]})"))
    if m.unpad and fam != "bert":
        out.append((("model", "unpad"), "unpadding is built for model.family bert only (decoder batches hold no padding)",
                    "remove model.unpad"))
    if fam == "bert":
        if m.n_kv_heads is not None and m.n_kv_heads != m.n_heads:
            out.append((("model", "n_kv_heads"), "grouped-query attention is not built for model.family bert",
                        f"remove model.n_kv_heads (or set it to n_heads {m.n_heads})"))
        if not m.qkv_bias:
            msg = "model.family bert has biases on every linear layer (BERT, MosaicBERT); a bias-free encoder is not built"
            out.append((("model", "qkv_bias"), msg, "remove model.qkv_bias"))
        if ("model", "rope_theta") in origins and m.position != "rope":
            out.append((("model", "rope_theta"), f"rope_theta is unused with position {m.position}", "remove model.rope_theta"))
    kind = getattr(obj, "kind", None)
    if kind is not None:
        if fam in ENCODER_FAMILIES and kind not in ENCODER_OBJECTIVES:
            out.append((("objective", "kind"), f"objective {kind!r} trains a decoder; model.family {fam} is a bidirectional encoder",
                        "use objective: {kind: mlm} (or rtd) with an encoder, or model.family: llama"))
        if fam not in ENCODER_FAMILIES and kind in ENCODER_OBJECTIVES:
            out.append((("objective", "kind"), f"objective {kind!r} needs a bidirectional encoder; model.family {fam} is a decoder",
                        "set model.family: bert"))
    if kind in ENCODER_OBJECTIVES:
        if not 0 < obj.mask_rate < 1:
            out.append((("objective", "mask_rate"), f"mask_rate must be between 0% and 100% (exclusive), got {obj.mask_rate:g}",
                        "BERT uses 15%, MosaicBERT 30%"))
        if abs(sum(obj.split) - 1.0) > 1e-6:
            got = " + ".join(f"{s:g}" for s in obj.split)
            msg = f"the three shares ([MASK], random, unchanged) must add up to 100%, got {got}"
            out.append((("objective", "split"), msg, "BERT's split is [0.8, 0.1, 0.1]"))
        if not obj.mask_token:
            out.append((("objective", "mask_token"), "must not be empty", "remove it to use [MASK]"))
    if kind == "rtd":
        if obj.generator_width <= 0:
            out.append((("objective", "generator_width"), "must be more than 0", "ELECTRA uses 1/4 to 1/3 of the discriminator's width"))
        if obj.discriminator_weight < 0:
            out.append((("objective", "discriminator_weight"), f"must not be negative, got {obj.discriminator_weight:g}",
                        "ELECTRA uses 50"))
    if fam in ENCODER_FAMILIES:
        tr = getattr(r, "train", None)
        if tr is not None and ("train", "sample_tokens") in origins and tr.sample_tokens:
            out.append((("train", "sample_tokens"), "an encoder does not generate text: there is no end-of-run sample",
                        "remove train.sample_tokens"))
        if tr is not None and ("train", "sample_prompt") in origins:
            out.append((("train", "sample_prompt"), "an encoder does not generate text: nothing reads a sample prompt",
                        "remove train.sample_prompt"))
        for i, ph in enumerate(getattr(r, "phases", None) or []):
            if ph.growth is not None:
                out.append((("phases", i, "growth"), "growth by stacking is built for model.family llama only", "remove growth:"))
            if getattr(ph, "objective", None) is not None:
                out.append((("phases", i, "objective"), "a phase that changes an encoder's objective is not built",
                            "remove the phase's objective: (the recipe's objective applies to every phase)"))
            if ph.model is not None and ph.model.rope_theta is not None:
                out.append((("phases", i, "model", "rope_theta"), "model.family bert has no rotary embeddings", "remove it"))
        if getattr(r, "init_from", None) is not None:
            out.append((("init_from",), "init_from is built for model.family llama only", "remove init_from"))
        if m.unpad and kind == "rtd":
            out.append((("model", "unpad"), "unpadding is not built for objective rtd", "remove model.unpad"))
        data = getattr(r, "data", None)
        for i, s in enumerate(data.sources if data is not None else []):
            for key in ("metadata", "control"):
                if getattr(s, key, None) is not None:
                    out.append((("data", "sources", i, key), f"{key} conditioning is built for decoders (model.family llama) only",
                                f"remove data.sources[{i}].{key}"))
    return out


def _stack_counts(d: int, n_layers: int, d_ff: int, activation: str, pre_norm: bool) -> tuple[int, int]:
    """(parameters, matmul weights) of an encoder stack of ``n_layers`` BERT layers of width ``d``.

    Per layer: q, k, v and the attention output (weights and biases), two LayerNorms (weight and
    bias), the feed-forward layers (gelu: in and out with biases; geglu: a bias-free in layer of
    2·d_ff, as MosaicBERT, and the out layer with bias). Pre-norm adds a final LayerNorm.
    """
    attn = 4 * (d * d + d)
    if activation == "geglu":
        ffn, ffn_matmul = d * 2 * d_ff + d_ff * d + d, 3 * d * d_ff
    else:
        ffn, ffn_matmul = d * d_ff + d_ff + d_ff * d + d, 2 * d * d_ff
    per_layer = attn + ffn + 2 * 2 * d
    return n_layers * per_layer + (2 * d if pre_norm else 0), n_layers * (4 * d * d + ffn_matmul)


def head_positions(n: int, mask_rate: float) -> int:
    """How many of a micro-batch's ``n`` positions a compiled masked-LM model decodes (the generated model.py's
    ``head_positions``): the selected ones first, up to the mean + 8 standard deviations (+ 8) of a Bernoulli draw."""
    import math

    return min(n, math.ceil(n * mask_rate + 8 * math.sqrt(n * mask_rate * (1 - mask_rate))) + 8)


def param_counts(m, n_layers: int, d_ff: int, vocab: int, max_positions: int, objective=None) -> dict:
    """Exact parameter counts of the generated encoder (equal to HF BertForMaskedLM's num_parameters() for plain BERT).

    ``matmul_params`` weighs each matmul by the share of positions it runs at, for the FLOP estimate:
    the MLM head (transform and decoder) runs at the selected positions only (``mask_rate`` of them).
    With objective rtd, the ELECTRA generator is included (its embeddings are the discriminator's).
    """
    d = m.d_model
    pre = m.norm_position == "pre"
    positions = max_positions * d if m.position == "learned" else 0
    embedding = vocab * d + positions + 2 * d           # word, position (learned only) and two token-type embeddings
    embed_norm = 2 * d
    stack, stack_matmul = _stack_counts(d, n_layers, d_ff, m.activation, pre)
    kind = getattr(objective, "kind", "mlm")
    rate = getattr(objective, "mask_rate", 0.15)
    untied = 0 if m.tie_embeddings else vocab * d
    if kind == "rtd":
        # discriminator head: dense d → d, dense d → 1 (replaced or not), at every position
        head = (d * d + d) + (d + 1)
        head_matmul = d * d + d
        g = generator_shape(d, m.n_heads, d_ff, objective.generator_width)
        gd = g["d_model"]
        g_stack, g_stack_matmul = _stack_counts(gd, n_layers, g["d_ff"], m.activation, pre)
        # generator: project the shared embeddings d → gd, its stack, its MLM head gd → d, LayerNorm, decoder (tied) + bias
        gen = (d * gd + gd) + g_stack + (gd * d + d) + 2 * d + vocab + untied
        gen_matmul = d * gd + g_stack_matmul + rate * (gd * d + vocab * d)
        total = embedding + embed_norm + stack + head + gen
        return {"params": total, "params_embedding": embedding, "params_head": untied,
                "params_non_embedding": total - embedding - untied, "params_generator": gen,
                "matmul_params": round(stack_matmul + head_matmul + gen_matmul),
                "attention_heads": m.n_heads + g["n_heads"]}
    # MLM head: transform dense d → d, LayerNorm, decoder (tied to the word embeddings unless untied) + bias
    head = (d * d + d) + 2 * d + vocab + untied
    total = embedding + embed_norm + stack + head
    return {"params": total, "params_embedding": embedding, "params_head": untied,
            "params_non_embedding": total - embedding - untied,
            "matmul_params": round(stack_matmul + rate * (d * d + vocab * d)), "attention_heads": m.n_heads}
