"""Choose the attention kernel, per device.

- concat packing (causal LM): SDPA with is_causal (flash or memory-efficient kernels, no mask tensor).
- document and best_fit packing: attention never crosses a document (a block-diagonal causal mask from
  the batch's document ids). On cuda FlexAttention with a block mask (work only where the mask has
  something); elsewhere SDPA with an explicit boolean mask, because FlexAttention has no CPU backward.
- prefix_lm, span_corruption, ul2: a bidirectional prefix per row: on cuda FlexAttention with a block mask from each
  row's prefix length; elsewhere SDPA with an explicit boolean prefix-LM mask.
- bf16 on a CPU that multiplies bf16 natively, seq_len <= 512, eager, concat or document packing or a sliding window (every
  mask here never lets a query see a later key): attention written as batched matmuls, 128 queries at a time against
  only the keys up to the block's last query (`causal_attention` in model.py, with the explicit mask if any):
  1.2-1.8× SDPA's CPU kernel there (forward and backward, bench/attention.py), whose bf16 path does not use the
  CPU's bf16 matmuls; it keeps each block's probabilities for the backward (mask_bytes in estimate.py).
- model.sliding_window W (any packing): position i attends to j when i - W < j <= i (and, with document masks, j
  in i's document). On cuda FlexAttention with a block mask from that rule (blocks outside every window are
  skipped); elsewhere SDPA with the explicit boolean mask.
"""

from __future__ import annotations

from dataclasses import replace

from ..objectives import PREFIX_OBJECTIVES, seq_lens
from ..plan import Plan

BLOCK = 128  # FlexAttention's block size (create_block_mask's default)
QUERY_BLOCK = 128     # queries per block of the generated causal_attention (bench/attention.py: 64 and 256 are slower)
BLOCKED_MAX_SEQ = 512  # the longest seq_len where it beats SDPA's CPU kernel (bench/attention.py: 0.83× at 1024, 0.78× at 2048)


def blocked_scores(seq_len: int, block: int = QUERY_BLOCK) -> int:
    """Query-key pairs causal_attention computes for one row and head: each block of queries against every key up
    to its last (the diagonal block's future keys are computed and masked)."""
    return sum((min(s + block, seq_len) - s) * min(s + block, seq_len) for s in range(0, seq_len, block))


def cpu_blocked(plan: Plan) -> bool:
    """Whether the generated causal_attention beats SDPA here: bf16 on a CPU with bf16 matmuls, seq_len <= 512, eager.
    Under torch.compile it cost 14-44 s more of cold compile (bench tiny, small) for a step 1.0-1.15× as fast: not
    counted by choose_compile's cost model, so a compiled program keeps SDPA."""
    return (plan.device == "cpu" and plan.precision == "bf16" and plan.host.cpu_bf16 and not plan.compile
            and max(seq_lens(plan.recipe)) <= BLOCKED_MAX_SEQ)


BLOCKED_WHY = (f"causal_attention: bf16 on a CPU with bf16 matmuls, seq_len <= {BLOCKED_MAX_SEQ}, no torch.compile: attention as batched "
               f"matmuls, {QUERY_BLOCK} queries at a time against only the keys up to the block's last (fp32 scores, bf16 "
               "probabilities times values): 1.2-1.8× scaled_dot_product_attention's CPU kernel at these lengths "
               "(bench/attention.py, causal and document masks); it keeps each block's probabilities for the backward")


def window_blocks(seq_len: int, window: int) -> tuple[int, int]:
    """(BLOCK × BLOCK blocks of a seq_len × seq_len causal mask that hold a (query, key) pair inside the window,
    all blocks on or below the diagonal). A block `back` blocks left of the diagonal holds one when its closest
    pair, BLOCK × back - (BLOCK - 1) positions apart, is closer than the window."""
    n = -(-seq_len // BLOCK)
    back = min(n - 1, (window + BLOCK - 2) // BLOCK)   # the farthest block to the left of the diagonal that is touched
    return sum(min(q, back) + 1 for q in range(n)), n * (n + 1) // 2


def _sliding_window(plan: Plan, window: int) -> Plan:
    packing = plan.recipe.data.packing
    docs = packing != "concat"
    rule = (f"model.sliding_window {window}: position i attends to position j when i - {window} < j <= i (the last {window} "
            "positions, itself included, as Mistral)" + (f" and j is in i's document (data.packing {packing})" if docs else ""))
    if plan.device == "cuda":
        T = max(seq_lens(plan.recipe))
        touched, causal = window_blocks(T, window)
        return plan.decide("attention", "flex",
                           f"{rule}: on cuda FlexAttention with a block mask built from that rule computes only the "
                           f"{BLOCK}×{BLOCK} blocks that hold a pair inside a window (at seq_len {T}: at most {touched} of the "
                           f"{causal} causal blocks) and skips the rest; other lengths than the run's (sampling) take "
                           "scaled_dot_product_attention with the same rule as a dense mask", attention="flex")
    return plan.decide("attention", "sdpa_mask",
                       f"{rule}: scaled_dot_product_attention with an explicit ({'batch' if docs else '1'}, 1, seq, seq) "
                       f"boolean mask; FlexAttention has no backward on {plan.device}", attention="sdpa_mask")


def run(plan: Plan) -> Plan:
    """The kernel below (_sdpa_or_flex), or in its place causal_attention where cpu_blocked says it is faster and every
    mask the kernel would take is causal (no bidirectional prefix, no encoder)."""
    chosen = _sdpa_or_flex(plan)
    if (chosen.attention in ("sdpa_causal", "sdpa_mask") and cpu_blocked(plan) and plan.recipe.model.family != "bert"
            and plan.recipe.objective.kind not in PREFIX_OBJECTIVES):
        sdpa = next(d.reason for d in chosen.decisions if d.name == "attention")
        return plan.decide("attention", "blocked_causal", f"{BLOCKED_WHY}; in place of: {sdpa}", attention="blocked_causal")
    return chosen


def _sdpa_or_flex(plan: Plan) -> Plan:
    m = plan.recipe.model
    if m.family == "bert":  # encoders (OBJ-ENC): every position attends to every other (of its document)
        docs = plan.recipe.data.packing != "concat"
        where = (f"; data.packing {plan.recipe.data.packing}: a (batch, 1, seq, seq) same-document mask from the document ids, "
                 "padding only seeing padding" if docs else "")
        if m.position == "alibi":
            return plan.decide("attention", "sdpa_alibi",
                               "bidirectional encoder with ALiBi: scaled_dot_product_attention with the (heads, T, T) linear "
                               f"distance bias as attn_mask (a float mask rules out the flash kernel){where}", attention="sdpa_alibi")
        return plan.decide("attention", "sdpa_mask" if docs else "sdpa_bidirectional",
                           "bidirectional encoder with learned positions: scaled_dot_product_attention "
                           + (where[2:] if docs else "without a mask (a key-padding mask only when a batch carries padding)"),
                           attention="sdpa_mask" if docs else "sdpa_bidirectional")
    if m.sliding_window is not None:  # validation keeps windows to the llama family, off TPUs, without prefix objectives
        return _sliding_window(plan, m.sliding_window)
    kind = plan.recipe.objective.kind
    if kind in PREFIX_OBJECTIVES:  # a bidirectional prefix per row (validation keeps these objectives to concat packing)
        rule = f"objective {kind} attends bidirectionally over each row's prefix (j <= i or j < prefix_len)"
        if plan.device == "cuda":
            return plan.decide("attention", "flex",
                               f"{rule}: on cuda FlexAttention with a block mask built from each row's prefix length "
                               "computes only the 128×128 blocks on or below the diagonal or inside the prefix and skips "
                               "the rest (a dense seq×seq mask would rule out the flash kernel and cost a mask copy per "
                               "layer)", attention="flex")
        return plan.decide("attention", "sdpa_mask",
                           f"{rule}: scaled_dot_product_attention with an explicit (batch, 1, seq, seq) boolean "
                           f"prefix-LM mask; FlexAttention has no backward on {plan.device}", attention="sdpa_mask")
    packing = plan.recipe.data.packing
    if packing != "concat":  # attention must stay inside each document: a block-diagonal causal mask
        if plan.device == "cuda":
            return plan.decide("attention", "flex",
                               f"data.packing {packing} on cuda: FlexAttention with a block mask built from the document ids "
                               "computes only the 128×128 blocks where a token may see another of its document and skips "
                               "the rest (a dense seq×seq mask would rule out the flash kernel)", attention="flex")
        return plan.decide("attention", "sdpa_mask",
                           f"data.packing {packing} on {plan.device}: scaled_dot_product_attention with an explicit "
                           "(batch, 1, seq, seq) boolean block-diagonal causal mask; FlexAttention has no backward "
                           f"on {plan.device}", attention="sdpa_mask")
    if plan.device == "tpu":
        return plan.decide("attention", "sdpa_causal",
                           "causal_lm with concat packing on tpu: scaled_dot_product_attention(is_causal=True), which XLA lowers "
                           "to matmuls and a masked softmax fused into the step graph (no seq×seq mask tensor in the program)",
                           attention="sdpa_causal")
    return plan.decide("attention", "sdpa_causal",
                       "causal_lm with concat packing needs only a causal mask: scaled_dot_product_attention(is_causal=True) "
                       "picks flash/memory-efficient kernels and never builds a seq×seq mask", attention="sdpa_causal")


def settle(plan: Plan) -> Plan:
    """After choose_checkpointing and batch_split: keep causal_attention only where its kept probabilities cost the run
    no recomputation and no failed fit. If SDPA's plan needs less activation checkpointing, or fits the memory budget
    where this one does not, that plan is the run's (the kernel choose_attention takes without causal_attention, then
    the two passes again), with the reason. A smaller micro-batch is kept: on a CPU the step's matmuls stay large (micro-batches of
    seq_len <= 512 tokens and more), and accumulation adds no work."""
    if plan.attention != "blocked_causal":
        return plan
    from . import batch_split, choose_checkpointing
    from .estimate import memory_of, step_peak

    def asked(ph):  # the phase's micro-batch as the recipe asks it ("auto" or a number), as batch_split first saw it
        spec = plan.recipe.phases[ph.index].train if plan.recipe.phases else None
        return replace(ph, micro_batch=spec.micro_batch if spec and spec.micro_batch is not None else plan.recipe.train.micro_batch)
    sdpa = batch_split.run(choose_checkpointing.run(replace(_sdpa_or_flex(plan), phases=tuple(map(asked, plan.phases)))))

    def layout(p: Plan):
        shapes = [(ph.micro_batch, ph.seq_len) for ph in p.phases] or [(p.micro_batch, p.recipe.train.seq_len)]
        fits = max(step_peak(p, mb, seq) for mb, seq in shapes) <= memory_of(p)[0] * batch_split.BUDGET_SHARE
        return fits, -choose_checkpointing.MODES.index(p.activation_checkpointing)
    (fits_b, ck_b), (fits_s, ck_s) = layout(plan), layout(sdpa)
    costs = []
    if fits_s and not fits_b:
        costs.append("the run would not fit the memory budget")
    if ck_b < ck_s:
        costs.append(f"{plan.activation_checkpointing} activation checkpointing instead of {sdpa.activation_checkpointing}")
    if not costs:
        return plan
    why = next(d.reason for d in sdpa.decisions if d.name == "attention")
    return sdpa.decide("attention", sdpa.attention, f"{why} (causal_attention, faster on this CPU, keeps each block's "
                       f"probabilities for the backward: with it, {'; '.join(costs)})")
