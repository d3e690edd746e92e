"""Resolve the model's shape: kv heads, head dimension, feed-forward width, vocabulary."""

from __future__ import annotations

from dataclasses import replace

from ..plan import Plan


def llama_d_ff(d_model: int, multiple_of: int = 256) -> int:
    """Llama's rule: 2/3 of 4·d_model (SwiGLU keeps the parameter count of a 4·d MLP), rounded up."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def run(plan: Plan) -> Plan:
    m = plan.recipe.model
    kv = m.n_kv_heads or m.n_heads
    head_dim = m.d_model // m.n_heads
    if m.d_ff is not None:
        d_ff = m.d_ff
    elif m.family == "bert":
        d_ff = 4 * m.d_model
        plan = plan.decide("d_ff", d_ff, f"model.d_ff not set: BERT's rule 4 × d_model {m.d_model}")
    else:
        d_ff = llama_d_ff(m.d_model)
        plan = plan.decide("d_ff", d_ff, f"model.d_ff not set: Llama's rule 8/3 × d_model {m.d_model}, rounded up to a multiple of 256")
    obj = plan.recipe.objective
    if obj.kind == "rtd":  # ELECTRA's generator: the discriminator's head size and depth, generator_width of its heads
        from ..encoder import generator_shape

        g = generator_shape(m.d_model, m.n_heads, d_ff, obj.generator_width)
        plan = plan.decide("generator", g, f"objective.generator_width {obj.generator_width:g} of n_heads {m.n_heads}, rounded: "
                           f"{g['n_heads']} heads of {g['head_dim']} = d_model {g['d_model']}, d_ff {d_ff} scaled alike to {g['d_ff']}")
    vocab = m.vocab_size if m.vocab_size is not None else plan.tokenizer_vocab
    return replace(plan, n_kv_heads=kv, head_dim=head_dim, d_ff=d_ff, vocab_size=vocab)
