"""Attach the cost estimates (parameters, FLOPs, memory per device, time) to the plan."""

from __future__ import annotations

from dataclasses import replace

from ..estimates import CHIPS, LOSS_CHUNK, activation_bytes, cpu_chip, flops_per_token, galore_state, param_counts, state_bytes
from .. import encoder
from ..objectives import seq_lens, teacher_costs
from ..plan import Plan
from .choose_attention import blocked_scores


def chip_of(plan: Plan):
    if plan.chip == "cpu":
        return cpu_chip(plan.host.cpu_cores, plan.host.memory_bytes, plan.host.cpu_bf16)
    return CHIPS[plan.chip]


def memory_of(plan: Plan) -> tuple[int, str]:
    """(bytes of memory one device offers, where the figure comes from)."""
    t = plan.recipe.target
    if t.memory_per_device is not None:
        return t.memory_per_device, "target.memory_per_device"
    if plan.device == "cuda" and t.chip == "auto" and plan.host.cuda and plan.host.cuda_memory:
        return plan.host.cuda_memory, f"{plan.host.cuda_name} (detected)"
    chip = chip_of(plan)
    if plan.chip == "cpu" and t.devices > 1:  # the processes of one machine share its memory
        return chip.memory_bytes // t.devices, f"this machine, shared by {t.devices} processes"
    return chip.memory_bytes, chip.name


def mask_bytes(plan: Plan, micro_batch: int, seq_len: int, checkpointing: str = "none") -> int:
    """The attention mask a micro-batch builds once and every layer keeps for its backward (choose_attention):
    sdpa_mask, a (batch, 1, T, T) bool block mask (documents, prefixes; a sliding window with concat packing is
    the same for every row: (1, 1, T, T)), plus the copy in the compute dtype that scaled_dot_product_attention
    makes of a bool mask in each layer and keeps for that layer's backward (measured on this CPU: 8 MiB a layer
    at 4 × 1024² in bf16; with full checkpointing one layer's at a time); sdpa_alibi, the (batch, heads, T, T)
    fp32 ALiBi bias with padding at -inf (ELECTRA's generator has its own). Causal SDPA, FlexAttention's block
    mask and unmasked encoders keep no (T, T) tensor. blocked_causal (the generated causal_attention) keeps each
    query block's probabilities, fp32 for the softmax's backward and bf16 for the product with v, and fp32 copies of
    q and k for the scores' backward (and, with grouped-query attention, v repeated to every head), in every layer
    (one with full checkpointing); with document masks or a sliding window also the bool mask and, per layer, its
    blocks' negation (masked_fill's backward keeps it)."""
    if plan.attention == "blocked_causal":
        layers = 1 if checkpointing == "full" else (plan.n_layers or plan.recipe.model.n_layers)
        heads = plan.recipe.model.n_heads
        expanded_v = 2 * seq_len * plan.head_dim if plan.n_kv_heads < heads else 0  # grouped-query: v repeated per head (bf16)
        kept = layers * micro_batch * heads * (blocked_scores(seq_len) * (4 + 2) + 2 * seq_len * plan.head_dim * 4 + expanded_v)
        if plan.recipe.data.packing == "concat" and plan.recipe.model.sliding_window is None:
            return kept
        # an explicit bool mask, (batch or 1, 1, T, T), built once a micro-batch; each layer keeps its blocks' negation
        rows = 1 if plan.recipe.data.packing == "concat" else micro_batch
        return kept + rows * seq_len * seq_len + layers * rows * blocked_scores(seq_len)
    if plan.attention == "sdpa_mask":
        shared = plan.recipe.model.sliding_window is not None and plan.recipe.data.packing == "concat"
        elements = (1 if shared else micro_batch) * seq_len * seq_len
        width = 2 if plan.precision == "bf16" else 4
        layers = 1 if checkpointing == "full" else (plan.n_layers or plan.recipe.model.n_layers)
        return elements * (1 + width * layers)
    if plan.attention == "sdpa_alibi":
        biases = 2 if plan.recipe.objective.kind == "rtd" else 1
        bias = biases * micro_batch * plan.recipe.model.n_heads * seq_len * seq_len * 4
        if plan.device == "cuda":
            return bias
        # off cuda SDPA takes its math path for a float bias and keeps each layer's fp32 probabilities for backward
        # (saved_tensors_hooks on the generated tiny-mosaicbert, torch 2.13 CPU, fp32 and bf16 autocast alike)
        layers = 1 if checkpointing == "full" else (plan.n_layers or plan.recipe.model.n_layers)
        return bias + layers * micro_batch * plan.recipe.model.n_heads * seq_len * seq_len * 4
    return 0


def activations(plan: Plan, micro_batch: int, seq_len: int, checkpointing: str | None = None, n_layers: int | None = None) -> int:
    """activation_bytes for this plan's model at one batch shape (default: the plan's activation checkpointing),
    with its attention mask (mask_bytes)."""
    m = plan.recipe.model
    checkpointing = checkpointing or plan.activation_checkpointing
    layers = n_layers or plan.n_layers or m.n_layers
    chunk = None if plan.compile or plan.device == "tpu" else LOSS_CHUNK
    kind = m.activation if m.family in encoder.ENCODER_FAMILIES else None
    total = mask_bytes(plan, micro_batch, seq_len, checkpointing) + activation_bytes(
        micro_batch, seq_len, m.d_model, layers, plan.n_kv_heads * plan.head_dim, plan.d_ff, plan.padded_vocab, plan.precision,
        checkpointing, chunk, encoder=kind)
    if plan.recipe.objective.kind == "rtd":
        # ELECTRA's generator keeps its own layers' activations, as deep and a fraction as wide; the head's count above
        # stands for its MLM logits (the discriminator's head is one wide). Measured with tiny-electra on this CPU:
        # plan / peak 1.04 (fp32) and 1.17 (bf16), 0.90 and 1.02 without the generator
        g = encoder.generator_shape(m.d_model, m.n_heads, plan.d_ff, plan.recipe.objective.generator_width)
        total += activation_bytes(micro_batch, seq_len, g["d_model"], layers, g["d_model"], g["d_ff"], 0, plan.precision,
                                  checkpointing, chunk, encoder=kind)
    return total


def step_peak(plan: Plan, micro_batch: int, seq_len: int, checkpointing: str | None = None, distill: bool | None = None) -> int:
    """Bytes one device holds at the peak of a step: the training state, a distillation teacher's weights (loaded
    for the whole run), one micro-batch's activations and, where the step distills (``distill``, default: the run
    has a teacher), the logits the distillation loss keeps. What batch_split and choose_checkpointing weigh."""
    from ..objectives import distill_logits_bytes, teacher_weight_bytes

    distill = plan.teacher is not None if distill is None else distill and plan.teacher is not None
    return (sum(states(plan).values()) + teacher_weight_bytes(plan) + activations(plan, micro_batch, seq_len, checkpointing)
            + (distill_logits_bytes(plan, micro_batch, seq_len) if distill else 0))


def model_counts(plan: Plan, n_layers: int | None = None) -> dict:
    """Parameter counts of the model with ``n_layers`` layers (default: the final model's depth)."""
    m = plan.recipe.model
    if m.family in encoder.ENCODER_FAMILIES:  # BERT-style encoders (and ELECTRA's generator with objective rtd)
        return encoder.param_counts(m, n_layers or plan.n_layers or m.n_layers, plan.d_ff, plan.padded_vocab,
                                    max(seq_lens(plan.recipe)), plan.recipe.objective)
    return param_counts(m.d_model, n_layers or plan.n_layers or m.n_layers, m.n_heads, plan.n_kv_heads, plan.head_dim, plan.d_ff,
                        plan.padded_vocab, m.tie_embeddings, m.qkv_bias)


def whole_states(plan: Plan, counts: dict | None = None) -> dict:
    """Bytes of the whole model's weights (with autocast's bf16 copies), gradients and optimizer state, unsharded."""
    counts = counts or model_counts(plan)
    full = state_bytes(counts["params"], plan.precision, plan.master_weights)
    if plan.galore:  # the blocks' matrices keep projected moments and a projector instead of two full moments
        m = plan.recipe.model
        width = 2 if plan.master_weights == "bf16" else 4
        matrices, kept = galore_state(m.d_model, plan.n_layers or m.n_layers, m.n_heads, plan.n_kv_heads, plan.head_dim,
                                      plan.d_ff, plan.galore["rank"])
        full = {**full, "optimizer": full["optimizer"] - 2 * matrices * width + kept * width}
    return full


def shards_of(plan: Plan) -> int:
    """Over how many processes FSDP2 shards weights and optimizer state (HSDP: within a node); 1 unsharded."""
    return {"fsdp": plan.world, "hsdp": plan.recipe.target.devices}.get(plan.parallelism, 1)


def states(plan: Plan) -> dict:
    """Bytes per device of weights, gradients and optimizer state; FSDP shards all three over the devices.

    Sharded, a device also holds whole copies of what it is computing with: FSDP2 all-gathers one
    block's weights (and the next one's, prefetched) and its gradients before the reduce-scatter,
    and the root's embedding and head for the whole step ("gathered", fp32 as the weights are).
    """
    counts = model_counts(plan)
    full = whole_states(plan, counts)
    shards = shards_of(plan)
    if shards == 1:
        return full
    out = {k: -(-v // shards) for k, v in full.items()}
    n_layers = plan.n_layers or plan.recipe.model.n_layers
    per_layer = counts.get("params_per_layer") or counts["params_non_embedding"] // max(1, n_layers)
    width = 2 if plan.master_weights == "bf16" else 4  # pure_bf16 gathers bf16 weights and gradients
    out["gathered"] = 2 * per_layer * width * 2 + (counts["params_embedding"] + counts.get("params_head", 0)) * width
    return out


def recompute_flops(plan: Plan, n_layers: int | None = None, seq_len: int | None = None) -> int:
    """FLOPs per token that activation checkpointing adds: one more forward of each MLP (selective) or block (full),
    for a model of ``n_layers`` (default: the final depth) at ``seq_len`` (default: train.seq_len)."""
    m = plan.recipe.model
    n_layers = n_layers or plan.n_layers or m.n_layers
    seq_len = seq_len or plan.recipe.train.seq_len
    if plan.activation_checkpointing == "selective":
        return 2 * n_layers * 3 * m.d_model * plan.d_ff
    if plan.activation_checkpointing == "full":
        c = model_counts(plan, n_layers)
        keys = seq_len if m.sliding_window is None else min(seq_len, m.sliding_window)
        return 2 * (c["matmul_params"] - plan.padded_vocab * m.d_model) + 4 * n_layers * m.n_heads * plan.head_dim * keys
    return 0


def evaluates(recipe) -> bool:
    """Whether the program evaluates: train.eval_every above 0 and a validation split to read."""
    return recipe.train.eval_every > 0 and (recipe.data.validation > 0 or any(s.validation_path for s in recipe.data.sources))


def eval_flops(plan: Plan, heads: int, window: int | None) -> float:
    """The evaluations' forward FLOPs (a third of a training token's): at step 0, every eval_every steps and at the end,
    each over eval_batches global batches of the phase it falls in (and once more per source with eval_per_source)."""
    r, tr = plan.recipe, plan.recipe.train
    if not evaluates(r):
        return 0.0
    at = sorted({0, *range(tr.eval_every, plan.steps + 1, tr.eval_every), plan.steps})
    sets = 1 + (len(r.data.sources) if tr.eval_per_source else 0)
    if not plan.phases:
        fpt = flops_per_token(model_counts(plan)["matmul_params"], plan.n_layers or r.model.n_layers, heads, plan.head_dim,
                              tr.seq_len, window)
        return fpt / 3 * tr.eval_batches * tr.global_batch * tr.seq_len * sets * len(at)
    total = 0.0
    for step in at:  # the evaluation after step s runs before the next step enters its phase: the phase of step s - 1
        ph = next(ph for ph in plan.phases if ph.start <= max(step - 1, 0) < ph.end)
        fpt = flops_per_token(model_counts(plan, ph.n_layers)["matmul_params"], ph.n_layers, heads, plan.head_dim, ph.seq_len, window)
        total += fpt / 3 * tr.eval_batches * ph.global_batch * ph.seq_len * sets
    return total


def run(plan: Plan) -> Plan:
    r = plan.recipe
    m, tr = r.model, r.train
    counts = model_counts(plan)
    n_layers = plan.n_layers or m.n_layers
    heads = counts.get("attention_heads", m.n_heads)  # an ELECTRA generator's heads attend too
    window = m.sliding_window  # a query attends to at most this many keys (None: all earlier ones)
    fpt = flops_per_token(counts["matmul_params"], n_layers, heads, plan.head_dim, tr.seq_len, window)
    # each phase at its own depth and sequence length (attention FLOPs grow with it); the peak memory is the largest phase's
    phase_counts = {ph.name: model_counts(plan, ph.n_layers) for ph in plan.phases}
    phase_flops = {ph.name: flops_per_token(phase_counts[ph.name]["matmul_params"], ph.n_layers, heads, plan.head_dim, ph.seq_len,
                                            window)
                   * ph.steps * ph.tokens_per_step for ph in plan.phases}
    total = sum(phase_flops.values()) if plan.phases else fpt * plan.tokens
    mem = dict(states(plan))
    shapes = [(ph.micro_batch, ph.seq_len) for ph in plan.phases] or [(plan.micro_batch, tr.seq_len)]
    per_shape = [activations(plan, mb, seq) for mb, seq in shapes]
    mem["activations"] = max(per_shape)
    # the phase whose micro-batches keep the most (the plan's memory line names it when the phases' shapes differ)
    largest = plan.phases[per_shape.index(mem["activations"])].name if len(set(shapes)) > 1 else None
    teacher = teacher_costs(plan)  # distillation: the frozen teacher's forward pass and weights, the whole logits of the loss
    if teacher:
        total += teacher["flops"]
        for name, flops in teacher["phase_flops"].items():
            phase_flops[name] += flops
        mem["teacher_weights"] = teacher["weights_bytes"]
        mem["distill_logits"] = teacher["logits_bytes"]
    mem["total"] = sum(mem.values())
    chip = chip_of(plan)
    mfu = chip.default_mfu if r.target.mfu == "auto" else r.target.mfu
    peak = chip.peak_flops[plan.precision]
    recompute = (sum(recompute_flops(plan, ph.n_layers, ph.seq_len) * ph.steps * ph.tokens_per_step for ph in plan.phases)
                 if plan.phases else recompute_flops(plan) * plan.tokens)  # each phase at its own depth and length
    # MFU counts model FLOPs; recomputed ones take time too. CPU processes of one machine share its cores (the
    # chip's peak is the machine's), so they add no compute; devices of any other kind each bring their own
    engines = plan.nodes if plan.device == "cpu" else plan.world
    evaluation = eval_flops(plan, heads, window)
    # a sliding window as SDPA's explicit mask (every device but cuda, where FlexAttention skips the blocks outside
    # every window) computes all seq_len keys of each query and masks most away: those FLOPs take time too
    masked = 0
    if window is not None and plan.attention != "flex":
        masked = (sum(12 * ph.n_layers * heads * plan.head_dim * max(0, ph.seq_len - window) * ph.steps * ph.tokens_per_step
                      for ph in plan.phases) if plan.phases
                  else 12 * n_layers * heads * plan.head_dim * max(0, tr.seq_len - window) * plan.tokens)
    # a compiled masked-LM model (whole, not under FSDP2: there the head runs eagerly) decodes a static number of positions,
    # encoder.head_positions of a micro-batch, a little more than the selected mask_rate the FLOPs count: those take time too
    # (ELECTRA's generator head likewise: its gen_d → d transform and the tied decoder)
    unselected = 0
    if r.objective.kind in ("mlm", "rtd") and plan.compile and plan.parallelism not in ("fsdp", "hsdp"):
        rate = r.objective.mask_rate
        if r.objective.kind == "rtd":
            gd = encoder.generator_shape(m.d_model, m.n_heads, plan.d_ff, r.objective.generator_width)["d_model"]
            head = gd * m.d_model + plan.padded_vocab * m.d_model
        else:
            head = m.d_model ** 2 + plan.padded_vocab * m.d_model
        shapes = [(ph.micro_batch * ph.seq_len, ph.steps * ph.tokens_per_step) for ph in plan.phases] or [
            (plan.micro_batch * tr.seq_len, plan.tokens)]
        unselected = round(sum(6 * (encoder.head_positions(n, rate) / n - rate) * head * trained for n, trained in shapes))
    seconds = (total + recompute + masked + unselected + evaluation) / (peak * mfu * engines)
    est = {
        **{k: counts[k] for k in ("params", "params_non_embedding", "params_embedding", "params_head", "matmul_params")},
        **({"params_generator": counts["params_generator"]} if "params_generator" in counts else {}),  # ELECTRA's, in params
        "flops_per_token": fpt,
        **({"teacher_params": teacher["params"], "teacher_flops_per_token": teacher["flops_per_token"]} if teacher else {}),
        "total_flops": total,
        **({"phase_flops": phase_flops, "phase_params": {k: c["params"] for k, c in phase_counts.items()}}
           if len(plan.phases) > 1 else {}),
        "memory_per_device_bytes": mem,
        **({"activations_phase": largest} if largest else {}),
        "memory_budget_bytes": memory_of(plan)[0],
        "estimated_seconds": float(f"{seconds:.6g}"),
        **({"recompute_flops": recompute} if recompute else {}),
        **({"masked_attention_flops": masked} if masked else {}),
        **({"unselected_head_flops": unselected} if unselected else {}),
        **({"eval_flops": evaluation, "eval_seconds": float(f"{evaluation / (peak * mfu * engines):.6g}")} if evaluation else {}),
        "basis": {
            "chip": chip.name, "peak_flops": peak, "peak_source": chip.note, "mfu": mfu, "devices": plan.world,
            "flops": "6 × matmul params + 12 × n_layers × n_heads × head_dim × seq_len per token (PaLM, appendix B)"
                     + (f"; seq_len counted as at most model.sliding_window {window}, the keys a query attends to"
                        if window is not None else ""),
            "memory": "fp32 weights, gradients and AdamW moments (sharded over the devices with FSDP, over a node's devices "
                      "with HSDP, plus the blocks FSDP gathers whole); activations saved for backward of one micro-batch, with "
                      "the plan's activation checkpointing",
        },
    }
    return replace(plan, estimates=est)
