"""Attach the cost estimates (parameters, FLOPs, memory per device, time) to the plan."""

from __future__ import annotations

from dataclasses import replace

from ..estimates import CHIPS, activation_bytes, cpu_chip, flops_per_token, param_counts, state_bytes
from ..plan import Plan


def chip_of(plan: Plan):
    if plan.chip == "cpu":
        return cpu_chip(plan.host.cpu_cores, plan.host.memory_bytes, plan.host.cpu_bf16)
    return CHIPS[plan.chip]


def model_counts(plan: Plan, n_layers: int | None = None) -> dict:
    """Parameter counts of the model with ``n_layers`` layers (default: the final model's depth)."""
    m = plan.recipe.model
    return param_counts(m.d_model, n_layers or plan.n_layers or m.n_layers, m.n_heads, plan.n_kv_heads, plan.head_dim, plan.d_ff,
                        plan.padded_vocab, m.tie_embeddings, m.qkv_bias)


def states(plan: Plan) -> dict:
    """Bytes per device of weights, gradients and optimizer state; FSDP shards all three over the devices."""
    full = state_bytes(model_counts(plan)["params"], plan.precision)
    if plan.parallelism == "fsdp":
        return {k: -(-v // plan.world) for k, v in full.items()}
    return full


def run(plan: Plan) -> Plan:
    r = plan.recipe
    m, tr = r.model, r.train
    counts = model_counts(plan)
    n_layers = plan.n_layers or m.n_layers
    fpt = flops_per_token(counts["matmul_params"], n_layers, m.n_heads, plan.head_dim, tr.seq_len)
    # each phase at its own depth and sequence length (attention FLOPs grow with it); the peak memory is the largest phase's
    phase_counts = {ph.name: model_counts(plan, ph.n_layers) for ph in plan.phases}
    phase_flops = {ph.name: flops_per_token(phase_counts[ph.name]["matmul_params"], ph.n_layers, m.n_heads, plan.head_dim, ph.seq_len)
                   * ph.steps * ph.tokens_per_step for ph in plan.phases}
    total = sum(phase_flops.values()) if plan.phases else fpt * plan.tokens
    mem = dict(states(plan))
    kv_dim = plan.n_kv_heads * plan.head_dim
    shapes = [(ph.micro_batch, ph.seq_len) for ph in plan.phases] or [(plan.micro_batch, tr.seq_len)]
    mem["activations"] = max(activation_bytes(mb, seq, m.d_model, n_layers, kv_dim, plan.d_ff, plan.padded_vocab, plan.precision)
                             for mb, seq in shapes)
    mem["total"] = sum(mem.values())
    chip = chip_of(plan)
    mfu = chip.default_mfu if r.target.mfu == "auto" else r.target.mfu
    peak = chip.peak_flops[plan.precision]
    seconds = total / (peak * mfu * r.target.devices)
    est = {
        **{k: counts[k] for k in ("params", "params_non_embedding", "params_embedding", "params_head", "matmul_params")},
        "flops_per_token": fpt,
        "total_flops": total,
        **({"phase_flops": phase_flops, "phase_params": {k: c["params"] for k, c in phase_counts.items()}}
           if len(plan.phases) > 1 else {}),
        "memory_per_device_bytes": mem,
        "memory_budget_bytes": chip.memory_bytes,
        "estimated_seconds": float(f"{seconds:.6g}"),
        "basis": {
            "chip": chip.name, "peak_flops": peak, "peak_source": chip.note, "mfu": mfu, "devices": r.target.devices,
            "flops": "6 × matmul params + 12 × n_layers × n_heads × head_dim × seq_len per token (PaLM, appendix B)",
            "memory": "fp32 weights, gradients and AdamW moments (sharded over the devices with FSDP); activations saved for "
                      "backward of one micro-batch",
        },
    }
    return replace(plan, estimates=est)
