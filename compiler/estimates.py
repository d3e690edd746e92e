"""Cost estimates: parameters, FLOPs, memory per device and time, from the shape alone.

The parameter count is exact (it equals ``sum(p.numel())`` of the generated model
and of the equivalent Hugging Face model). FLOPs follow the PaLM paper's
accounting (appendix B): ``6 × N_matmul`` per token for the dense layers,
forward and backward, plus ``12 × n_layers × n_heads × head_dim × seq_len`` for
attention scores and values. Memory and time are estimates; the basis of each is
stated in ``estimate_basis``.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: dict      # precision -> dense FLOP/s of one device
    memory_bytes: int
    default_mfu: float
    note: str


# Dense (non-sparse) peak FLOP/s from the vendors' data sheets. fp32 on GPUs is
# counted as TF32 tensor-core math, which PyTorch uses for matmuls when allowed.
CHIPS = {
    "a100-40gb": Chip("NVIDIA A100 40GB", {"bf16": 312e12, "fp32": 156e12}, 40 * GiB, 0.40, "data sheet, dense"),
    "a100-80gb": Chip("NVIDIA A100 80GB", {"bf16": 312e12, "fp32": 156e12}, 80 * GiB, 0.40, "data sheet, dense"),
    "h100": Chip("NVIDIA H100 SXM", {"bf16": 989e12, "fp32": 494e12}, 80 * GiB, 0.40, "data sheet, dense"),
    "h200": Chip("NVIDIA H200", {"bf16": 989e12, "fp32": 494e12}, 141 * 10**9, 0.40, "data sheet, dense"),
    # TPU chips (one chip = one device): HBM per chip; XLA runs fp32 matmuls as one bf16 pass by default
    "tpu-v4": Chip("TPU v4", {"bf16": 275e12, "fp32": 275e12}, 32 * GiB, 0.40, "Cloud TPU docs, per chip"),
    "tpu-v5e": Chip("TPU v5e", {"bf16": 197e12, "fp32": 197e12}, 16 * GiB, 0.40, "Cloud TPU docs, per chip"),
    "tpu-v5p": Chip("TPU v5p", {"bf16": 459e12, "fp32": 459e12}, 95 * 10**9, 0.40, "Cloud TPU docs, per chip"),
}
# A CPU core is taken as 2 FMA units × 8 fp32 lanes × 2 FLOPs × 2.5 GHz = 80 GFLOP/s
# (AVX2); it is a nominal figure, bench/ measures the real one.
CPU_CORE_FLOPS = 80e9
CPU_MFU = 0.50


# A CPU with native bf16 dot products (AVX512_BF16, AMX) does two bf16 multiply-adds per fp32 lane:
# twice the fp32 rate (a 2-core AMD EPYC Zen 4 measured 185 fp32 and 420 bf16 GFLOP/s, bench/).
CPU_BF16_FACTOR = 2


def cpu_chip(cores: int, memory_bytes: int, bf16_native: bool = False) -> Chip:
    peak = cores * CPU_CORE_FLOPS
    return Chip(f"CPU ({cores} cores)", {"fp32": peak, "bf16": peak * (CPU_BF16_FACTOR if bf16_native else 1)}, memory_bytes, CPU_MFU,
                f"nominal {CPU_CORE_FLOPS / 1e9:g} GFLOP/s per core" + (f", ×{CPU_BF16_FACTOR} in bf16 (native)" if bf16_native else ""))


def param_counts(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int,
                 vocab: int, tie_embeddings: bool, qkv_bias: bool) -> dict:
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    attn = d_model * q_dim + 2 * d_model * kv_dim + q_dim * d_model
    if qkv_bias:
        attn += q_dim + 2 * kv_dim
    mlp = 3 * d_model * d_ff                       # gate, up, down (SwiGLU)
    norms = 2 * d_model
    per_layer = attn + mlp + norms
    embedding = vocab * d_model
    head = 0 if tie_embeddings else vocab * d_model
    total = embedding + n_layers * per_layer + d_model + head
    matmul = n_layers * (attn - (q_dim + 2 * kv_dim if qkv_bias else 0) + mlp) + vocab * d_model
    return {
        "params": total,
        "params_non_embedding": total - embedding - head,
        "params_per_layer": per_layer,
        "params_embedding": embedding,
        "params_head": head,
        "matmul_params": matmul,
    }


def galore_elements(m: int, n: int, rank: int) -> int:
    """Optimizer-state elements GaLore keeps for one m × n weight: Adam's two moments in the projected space
    (m × r when m >= n, else r × n) and the projector (n × r, else m × r)."""
    r = min(rank, m, n)
    return 2 * m * r + n * r if m >= n else 2 * r * n + m * r


def galore_state(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int, rank: int) -> tuple[int, int]:
    """(elements of the blocks' weight matrices, elements of GaLore's state for them); the rest of the model is plain AdamW."""
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    shapes = [(q, d_model), (kv, d_model), (kv, d_model), (d_model, q), (d_ff, d_model), (d_ff, d_model), (d_model, d_ff)]
    return n_layers * sum(m * n for m, n in shapes), n_layers * sum(galore_elements(m, n, rank) for m, n in shapes)


def flops_per_token(matmul_params: int, n_layers: int, n_heads: int, head_dim: int, seq_len: int,
                    window: int | None = None) -> int:
    """Training FLOPs per token, forward and backward (3 × the forward's 2 FLOPs per weight).

    The attention term counts the keys a query attends to as seq_len (PaLM's accounting, which does not halve
    for causality); with a sliding window (model.sliding_window) a query attends to at most ``window`` keys,
    so the term counts min(seq_len, window) keys instead.
    """
    keys = seq_len if window is None else min(seq_len, window)
    return 6 * matmul_params + 12 * n_layers * n_heads * head_dim * keys


# positions per chunk of the generated model's training loss (LOSS_CHUNK in model.py, rendered from here)
LOSS_CHUNK = 512


# bf16 autocast in eager mode keeps more than its bf16 copies: the residual stream stays fp32 (fp32 master weights), and
# so do the norms' internals and the rotary products with the fp32 cos/sin tables, as in Hugging Face's Llama. Measured
# with the profiler's allocation events on the generated model (tests/test_memory_estimate.py): 15.1·d (d 768) and
# 16.4·d (d 192) bytes per token and layer beyond the bf16 accounting. A compiled model fuses most of them away.
AUTOCAST_FP32_PER_LAYER = 16


def activation_bytes(micro_batch: int, seq_len: int, d_model: int, n_layers: int, kv_dim: int, d_ff: int,
                     vocab: int, precision: str, checkpointing: str = "none", loss_chunk: int | None = LOSS_CHUNK,
                     eager: bool | None = None, encoder: str | None = None) -> int:
    """Tensors saved for the backward pass of one micro-batch, at their peak.

    Per layer and token: the two residual inputs, two norm outputs, q and k before
    and after rotation, v, the attention output (7·d + 3·kv_dim elements) and the
    SwiGLU gate, up, activation and product (4·d_ff).

    Activation checkpointing (target.activation_checkpointing) keeps less and
    recomputes the rest in backward, one layer at a time:
    - selective: each block's MLP is recomputed, so a layer keeps 7·d + 3·kv_dim
      and one MLP's 4·d_ff is live again while its layer runs backward;
    - full: each block keeps only its input (d), and one whole block's
      activations are live again during its recomputation.

    The loss: the generated model's chunked cross-entropy (``loss_chunk``
    positions at a time) keeps the final norm's input and the gradient of its
    output (2·d per token), the head's weight gradient (vocab·d, fp32) and one
    chunk of fp32 logits with their gradient; a compiled model (``loss_chunk``
    None: torch.compile or XLA fuse the loss with the head) keeps about one
    (tokens, vocab) tensor in the compute dtype (measured on an H200: llama-124m's
    step peaked at 25.9 GiB where counting fp32 logits and their gradient planned
    40.8; on this CPU tiny compiled peaked at 109 MiB, planned 171).

    bf16 autocast without compile (``eager``, default: not compiled, as
    ``loss_chunk`` says) adds the fp32 tensors it keeps (AUTOCAST_FP32_PER_LAYER·d
    bytes per token and layer), and a checkpointed block's input is fp32.

    A BERT-style layer (``encoder``: its feed-forward, "gelu" or "geglu") keeps 8·d in
    attention (the block's input, q, k, v, the attention output, the output
    projection's input, the two LayerNorms' inputs; no rotary copies) and 2·d_ff
    (gelu: its input and output) or 4·d_ff (geglu: gate, its gelu, up, their product),
    as saved_tensors_hooks count them in the generated model (tiny-bert, tiny-mosaicbert).
    """
    tokens = micro_batch * seq_len
    width = 2 if precision == "bf16" else 4
    eager = loss_chunk is not None if eager is None else eager
    fp32_kept = AUTOCAST_FP32_PER_LAYER * d_model if precision == "bf16" and eager else 0
    block_input = d_model * (4 if fp32_kept else width)
    attn = (8 * d_model if encoder else 7 * d_model + 3 * kv_dim) * width
    mlp = (2 if encoder == "gelu" else 4) * d_ff * width
    if checkpointing == "full":
        layers = tokens * (n_layers * block_input + attn + mlp + fp32_kept)
    elif checkpointing == "selective":
        layers = tokens * (n_layers * (attn + fp32_kept) + mlp)
    else:
        layers = tokens * n_layers * (attn + mlp + fp32_kept)
    if loss_chunk is None:
        head = tokens * (d_model * width + vocab * width)
    else:
        head = tokens * (d_model * width + d_model * 4) + vocab * d_model * 4 + min(loss_chunk, tokens) * vocab * (4 + width)
    return layers + head


def state_bytes(params: int, precision: str, master_weights: str = "fp32") -> dict:
    if master_weights == "bf16":              # pure bf16: weights, gradients and both AdamW moments in bf16
        return {"weights": params * 2, "gradients": params * 2, "optimizer": params * 4}
    weights = params * 4                      # fp32 master weights
    if precision == "bf16":
        weights += params * 2                 # autocast's bf16 copies of the weights
    return {"weights": weights, "gradients": params * 4, "optimizer": params * 8}  # AdamW: two fp32 moments
