"""Template values for encoders (model.family bert) and their objectives (mlm, rtd).

model.py of an encoder is rendered from templates/encoder.py.j2 (the Llama template stays a decoder);
train.py gets the objective's constants and its ``make_batch`` (masking per sequence) from here.
"""

from __future__ import annotations

import textwrap

from .encoder import generator_shape
from .plan import Plan

_DOC = {
    "mlm": "masked language modelling",
    "rtd": "replaced token detection (ELECTRA: an MLM generator corrupts, the model detects)",
}


def context(plan: Plan) -> dict:
    """Values that replace or add to render.context's for an encoder; for a decoder only ``encoder: False``."""
    from .render import Const, _blank, _num, const

    r = plan.recipe
    m, obj = r.model, r.objective
    if m.family != "bert":
        return {"encoder": False, "family_doc": "Llama"}
    rtd = obj.kind == "rtd"
    max_seq = max([ph.seq_len for ph in plan.phases] or [r.train.seq_len])
    model_constants = [
        const("VOCAB_SIZE", plan.padded_vocab, f"tokenizer's {_num(plan.vocab_size)} tokens padded to a multiple of {m.pad_vocab_multiple}"
              if plan.padded_vocab != plan.vocab_size else "model.vocab_size (the tokenizer's)"),
        const("D_MODEL", m.d_model, "model.d_model"),
        const("N_LAYERS", plan.n_layers or m.n_layers, "model.n_layers"),
        const("N_HEADS", m.n_heads, "model.n_heads"),
        const("D_FF", plan.d_ff, "model.d_ff" if m.d_ff is not None else f"4 × d_model {m.d_model} (BERT)"),
        const("NORM_EPS", m.norm_eps, "model.norm_eps (LayerNorm)"),
        const("INIT_STD", m.init_std, "model.init_std"),
        const("MAX_SEQ_LEN", max_seq, ("train.seq_len" if not r.phases else "the longest phase's seq_len")
              + (": rows of the position embedding" if m.position == "learned" else ": size of the ALiBi bias table")),
        const("TYPE_VOCAB_SIZE", 2, "BERT's two segments (A, B); every token here is segment A"),
    ]
    if rtd:
        g = generator_shape(m.d_model, m.n_heads, plan.d_ff, obj.generator_width)
        model_constants += [
            const("GEN_D_MODEL", g["d_model"], f"generator: {g['n_heads']} head(s) × head_dim {g['head_dim']} (objective.generator_width "
                  f"{obj.generator_width:g})"),
            const("GEN_N_HEADS", g["n_heads"], f"objective.generator_width {obj.generator_width:g} × n_heads {m.n_heads}, rounded"),
            const("GEN_D_FF", g["d_ff"], f"d_ff {plan.d_ff} × {g['d_model']} / {m.d_model}, rounded"),
            const("TOKENIZER_VOCAB", plan.vocab_size, "the tokenizer's tokens: replacements are sampled among these"),
            const("DISCRIMINATOR_WEIGHT", obj.discriminator_weight, "objective.discriminator_weight (ELECTRA's λ)"),
        ]
    split_note = "objective.split: selected tokens to [MASK], to a random token, unchanged"
    consts = [
        _blank(),
        Const(f"# objective ({obj.kind})"),
        const("MASK_RATE", obj.mask_rate, "objective.mask_rate: share of tokens selected " + ("for prediction" if not rtd else
                                                                                                 "for the generator to replace")),
        const("MASK_SPLIT", tuple(obj.split), split_note),
        const("MASK_TOKEN", obj.mask_token, "objective.mask_token (added to the tokenizer when it lacks it)"),
    ]
    enc = {
        "mask_rate": obj.mask_rate,
        "title": ("An ELECTRA discriminator and generator (BERT-family encoders)" if rtd
                  else "A BERT-family bidirectional encoder with a masked-LM head"),
        "doc": _doc(m, rtd),
        "learned": m.position == "learned",
        "alibi": m.position == "alibi",
        "geglu": m.activation == "geglu",
        "pre_norm": m.norm_position == "pre",
        "unpad": m.unpad,
        "rtd": rtd,
        "documents": r.data.packing != "concat",   # batches carry doc_ids: attention within documents
        "unpad_note": ("; with model.unpad it is\n        dropped before the dense layers" if m.unpad else ""),
    }
    return {
        "encoder": True,
        "family_doc": "BERT-family encoder" + (" (ELECTRA)" if rtd else ""),
        "enc": enc,
        "model_constants": model_constants,
        "objective_doc": _DOC[obj.kind],
        "objective_constants": consts,
        "make_batch": True,
        "uses_objectives": True,
        "batch_fn": "make_batch",
        "batch_out": "x, y, uniforms" if rtd else "x, y",
        # rtd: each position's uniform for the generator's sample, and the counts the model divides its loss sums by
        "rtd_arg": ", uniforms=uniforms, counts=counts" if rtd else "",
        "loss_note": ("its part of the step's generator MLM + DISCRIMINATOR_WEIGHT × replaced-token loss"
                      if rtd else "masked-LM loss on the selected tokens"),
    }


def _doc(m, rtd: bool) -> list[str]:
    plain = m.position == "learned" and m.activation == "gelu" and m.norm_position == "post"
    opts = [("ALiBi attention biases instead of position embeddings" if m.position == "alibi" else "learned positions"),
            ("GeGLU feed-forward" if m.activation == "geglu" else "GELU feed-forward"),
            f"{m.norm_position}-norm LayerNorm"] + (["unpadding"] if m.unpad else [])
    lines = textwrap.wrap(("Plain BERT (Devlin et al. 2019): " if plain else "MosaicBERT-style options (Portes et al. 2023): ")
                          + ", ".join(opts) + ", token types.", 100)
    if plain and rtd:
        lines += ["The discriminator's parameter names are Hugging Face's ElectraForPreTraining without its `electra.`",
                  "prefix, so `malt export` writes it by renaming (the generator is not exported)."]
    elif plain:
        lines += ["Parameter names follow Hugging Face's BertForMaskedLM without its `bert.` prefix",
                  "(`encoder.layer.0.attention.self.query.weight` is `bert.encoder.layer.0.attention.self.query.weight`",
                  "there; `cls.` names are the same), so `malt export` is a rename."]
    else:
        lines += ["Names follow Hugging Face's BERT where a module exists there; no Hugging Face architecture",
                  "loads this variant, so `malt export` refuses it."]
    return lines
