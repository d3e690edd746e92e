"""The memory plan against the generated model's real allocations: the activations `malt plan` counts for a micro-batch
are what a training step keeps, measured from the CPU allocator's events (torch.profiler, profile_memory) at the peak of
a step, fp32 and bf16 autocast, with and without activation checkpointing. The plan must not under-count (the
micro-batch planner leaves only a 20% margin) nor over-count wildly."""

from __future__ import annotations

import bisect
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from malt.compiler.api import compile_to
from malt.compiler.plan import Host

ROOT = Path(__file__).resolve().parents[1]


def _load_model(directory: Path):
    spec = importlib.util.spec_from_file_location(f"memplan_{directory.name}", directory / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def measured_peak(directory: Path, bf16: bool, mask_rate: float | None = None, rtd: bool = False) -> tuple[int, int]:
    """(bytes live at the start of the second training step of the generated model (weights, AdamW state), the peak
    of bytes live during it). ``mask_rate``: an encoder's share of targets with a loss (the others -100); ``rtd``:
    ELECTRA's forward, with its uniforms and the batch's counts."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    plan = json.loads((directory / "plan.json").read_text())
    B, T, V = plan["batch"]["micro_batch"], plan["batch"]["seq_len"], plan["model"]["vocab_size"]
    module = _load_model(directory)
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("##begin"):
            torch.zeros(1)                                # an allocation event: what the process held before
        model = module.Transformer()
        matrices = [p for p in model.parameters() if p.dim() >= 2]
        others = [p for p in model.parameters() if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": matrices}, {"params": others, "weight_decay": 0.0}], lr=1e-3, fused=True)
        for step in range(2):
            x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
            if mask_rate is not None:
                y[torch.rand(B, T) >= mask_rate] = -100
            extra = {"uniforms": torch.rand(B, T), "counts": torch.tensor([float((y != -100).sum()), float(x.numel())])} if rtd else {}
            with record_function(f"##step{step}"):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = model(x, y, **extra)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            del loss

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)
    events, marks = [], {}
    for n in walk(prof.profiler.kineto_results.experimental_event_tree()):
        if n.tag == _EventType.Allocation:
            events.append((n.start_time_ns, n.extra_fields.total_allocated, n.extra_fields.alloc_size))
        elif n.name.startswith("##"):
            marks[n.name] = (n.start_time_ns, n.end_time_ns)
    events.sort()
    times = [t for t, *_ in events]

    def live_at(t):
        return events[bisect.bisect_right(times, t) - 1][1]
    held = events[0][1] - events[0][2]                   # before the first allocation: earlier tests' tensors, if any
    start, end = marks["##step1"]
    return live_at(start) - held, max(total for t, total, _ in events if start <= t <= end) - held


@pytest.mark.slow
@pytest.mark.parametrize("precision, checkpointing, cpu_bf16", [
    ("fp32", "none", False), ("bf16", "none", False), ("bf16", "selective", False), ("bf16", "full", False),
    # a CPU with bf16 matmuls: choose_attention's blocked causal attention keeps each block's probabilities
    ("bf16", "none", True), ("bf16", "full", True)])
def test_the_plans_activations_are_what_a_step_keeps(tmp_path, precision, checkpointing, cpu_bf16):
    out = tmp_path / "build"
    plan = compile_to(ROOT / "recipes" / "tiny.yaml", out, host=Host(cpu_bf16=cpu_bf16), sets=[
        f"target.precision={precision}", "target.compile=off", "target.accelerator=cpu", "train.micro_batch=16",
        f"target.activation_checkpointing={checkpointing}"])
    assert (plan.attention == "blocked_causal") == cpu_bf16
    memory = plan.estimates["memory_per_device_bytes"]
    before, peak = measured_peak(out, bf16=precision == "bf16")
    state = memory["weights"] + memory["optimizer"]
    # what is live between steps is the fp32 weights and AdamW's moments (autocast's bf16 copies are made in the step)
    assert abs(before - (state - (memory["weights"] - plan.estimates["params"] * 4))) < 0.02 * state
    ratio = memory["total"] / peak
    # measured on torch 2.13 (CPU), 2026-11-26: 0.99-1.25 in fp32; in bf16 0.82 (none) and 0.83 (selective) before the
    # fp32 tensors that eager autocast keeps were counted (estimates.AUTOCAST_FP32_PER_LAYER)
    assert 0.9 <= ratio <= 1.5, f"plan {memory['total'] / 2**20:.1f} MiB, measured peak {peak / 2**20:.1f} MiB: {ratio:.2f}"


@pytest.mark.slow
@pytest.mark.parametrize("name, mask_rate", [("tiny-bert", 0.15), ("tiny-mosaicbert", 0.3), ("tiny-electra", 0.15)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_plans_encoder_activations_are_what_a_step_keeps(tmp_path, name, mask_rate, precision):
    """BERT-style layers (no rotary copies; gelu keeps 2·d_ff, geglu 4·d_ff), the fp32 probabilities SDPA's math path keeps
    per layer for an ALiBi bias off cuda, and ELECTRA's generator: the plan was 1.42-1.49 × the peak for tiny-bert and
    0.87-0.93 × for tiny-mosaicbert before they were counted (measured on torch 2.13 CPU, 2026-11-26)."""
    out = tmp_path / "build"
    plan = compile_to(ROOT / "recipes" / f"{name}.yaml", out, host=Host(), sets=[
        f"target.precision={precision}", "target.compile=off", "target.accelerator=cpu", "train.micro_batch=16",
        "target.activation_checkpointing=none"])
    _, peak = measured_peak(out, bf16=precision == "bf16", mask_rate=mask_rate, rtd=name == "tiny-electra")
    ratio = plan.estimates["memory_per_device_bytes"]["total"] / peak
    # measured after: bert 1.08 / 1.15, mosaicbert 0.98 / 0.96, electra 1.04 / 1.17 (fp32 / bf16)
    assert 0.93 <= ratio <= 1.3, f"plan / measured peak {ratio:.2f}"
