"""Resolve target.accelerator and the chip used for estimates."""

from __future__ import annotations

from ..plan import Plan
from ..tpu import DEFAULT_CHIP as TPU_CHIP


def run(plan: Plan) -> Plan:
    t = plan.recipe.target
    host = plan.host
    if t.accelerator == "auto" and t.chip not in ("auto", "cpu"):  # a named GPU says which device the recipe targets
        device, reason = "cuda", f"accelerator auto with target.chip {t.chip}: a GPU"  # (a TPU chip needs accelerator: tpu)
    elif t.accelerator == "auto":
        device = "cuda" if host.cuda else "cpu"
        reason = f"accelerator auto: {'a CUDA device (' + host.cuda_name + ') is' if host.cuda else 'no CUDA device is'} visible on the compiling machine"
    else:
        device, reason = t.accelerator, f"target.accelerator {t.accelerator}"
    plan = plan.decide("device", device, reason, device=device)
    if t.chip != "auto":
        chip, why = t.chip, f"target.chip {t.chip}"
    elif device == "cpu":
        chip, why = "cpu", "device is cpu"
    elif device == "tpu":  # the TPU host is not the compiling machine: nothing to detect
        chip, why = TPU_CHIP, f"accelerator tpu: assuming {TPU_CHIP} for the estimates (set target.chip: tpu-v4, tpu-v5e or tpu-v5p)"
    else:
        name = host.cuda_name.lower()
        chip = next((c for c, key in (("h200", "h200"), ("h100", "h100"), ("a100-80gb", "a100-sxm4-80"), ("a100-80gb", "a100 80"),
                                      ("a100-40gb", "a100")) if key in name), "h100")
        why = f"detected {host.cuda_name}" if host.cuda_name else "no GPU visible to name it: assuming h100 (set target.chip)"
    return plan.decide("chip", chip, why, chip=chip)
