"""What the TPU program (torch-xla) covers, checked when a recipe says ``target.accelerator: tpu``.

The generated XLA program (templates/train_xla.py.j2) trains a llama-family model on
causal language modelling with concat packing, one device or an SPMD mesh of the host's
TPU devices (FSDPv2 sharding). Everything else is rejected here with the setting to
change, rather than compiled into a program that would ignore it. Compiling for a TPU
needs no torch-xla: only the generated program imports it.
"""

from __future__ import annotations

# TPU chip assumed for the estimates when target.chip is auto (compile time cannot see the TPU host)
DEFAULT_CHIP = "tpu-v5e"


def problems(r) -> list[tuple[tuple, str, str]]:
    """(path, message, hint) for each setting of recipe sections ``r`` that the TPU program does not build.

    ``r`` holds the recipe's sections (a section that failed the schema is None).
    """
    out = []
    hint_cpu = "train it on cuda or cpu (target.accelerator), or remove the setting"
    tg = r.target
    m = getattr(r, "model", None)
    if m is not None and m.family != "llama":
        out.append((("model", "family"), f"the TPU program is built for the llama family only, not {m.family!r}", hint_cpu))
    obj = getattr(r, "objective", None)
    if obj is not None and obj.kind != "causal_lm":
        out.append((("objective", "kind"), f"the TPU program is built for causal_lm only, not {obj.kind!r}", hint_cpu))
    d = getattr(r, "data", None)
    if d is not None:
        if d.packing != "concat":
            out.append((("data", "packing"), f"the TPU program is built for concat packing only, not {d.packing!r}", hint_cpu))
        for i, s in enumerate(d.sources):
            for key in ("metadata", "control"):
                if getattr(s, key, None) is not None:
                    out.append((("data", "sources", i, key), f"{key} on a TPU is not built yet", hint_cpu))
    if getattr(r, "phases", None):
        out.append((("phases",), "phases on a TPU are not built yet (each phase's shapes would compile new XLA graphs)",
                    "train the phases on cuda or cpu, or remove `phases:`"))
    if getattr(r, "init_from", None) is not None:
        out.append((("init_from",), "init_from on a TPU is not built yet", "start from scratch on the TPU, or train on cuda or cpu"))
    tr = getattr(r, "train", None)
    if tr is not None and tr.checkpoint_format == "sharded":
        out.append((("train", "checkpoint_format"), ("sharded checkpoints on a TPU are not built yet: the TPU program writes "
                    "whole tensors from CPU copies"), "use checkpoint_format: full (or auto)"))
    if tr is not None and tr.checkpoint_writes == "background":
        out.append((("train", "checkpoint_writes"), ("checkpoints written in the background on a TPU are not built yet: the TPU "
                    "program writes them from the host copies it makes"), "use checkpoint_writes: foreground (or auto)"))
    if tg.nodes > 1:
        out.append((("target", "nodes"), "TPU slices of several hosts are not built yet: the TPU program uses the devices of one host",
                    "set target.nodes: 1"))
    if tg.parallelism in ("ddp", "hsdp"):
        out.append((("target", "parallelism"), (f"{tg.parallelism} is not built on a TPU: several TPU devices train with XLA SPMD "
                    "and FSDPv2 sharding"), "use parallelism: auto or fsdp"))
    if tg.compile == "on":
        out.append((("target", "compile"), "torch.compile is not used on a TPU: XLA already compiles the traced training step",
                    "use compile: auto or off"))
    if tr is not None and tr.eval_per_source:
        out.append((("train", "eval_per_source"), "per-source validation on a TPU is not built yet", "remove train.eval_per_source"))
    if tg.precision == "pure_bf16":
        out.append((("target", "precision"), "pure_bf16 on a TPU is not built yet: the TPU program trains with bf16 autocast",
                    "use precision: bf16 (or auto)"))
    if tg.activation_checkpointing in ("selective", "full"):
        out.append((("target", "activation_checkpointing"), "activation checkpointing on a TPU is not built yet",
                    "use activation_checkpointing: auto or none"))
    if tg.chip != "auto" and not tg.chip.startswith("tpu"):
        out.append((("target", "chip"), f"chip {tg.chip!r} is not a TPU but accelerator is tpu",
                    "set target.chip to tpu-v4, tpu-v5e or tpu-v5p (or auto)"))
    return out
