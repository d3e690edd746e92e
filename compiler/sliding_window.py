"""Sliding-window attention (``model.sliding_window``): what the compiler builds and what it rejects.

A window of W means what Hugging Face's MistralForCausalLM means by ``sliding_window: W``
(transformers' ``sliding_window_causal_mask_function``): query position i attends to key
position j when ``i - W < j <= i``, the last W positions including itself. With
``data.packing: document`` or ``best_fit`` the key must also lie in the query's document.

- :func:`problems`: the cross-field checks (called by :mod:`.validate`, each reported at the
  field's file:line): a window only on the llama decoder, shorter than the sequences it
  would cut, not on a TPU, not with an objective that attends bidirectionally over a prefix;
  and a distillation teacher trained with a window, which the teacher model does not build.
- The FLOPs estimate counts min(seq_len, W) keys per query (:func:`.estimates.flops_per_token`), and the
  memory estimate the explicit mask (``mask_bytes`` in passes/estimate.py).
- The kernel is chosen by the ``choose_attention`` pass; the mask is written out in model.py.j2.
"""

from __future__ import annotations

from pathlib import Path

from .objectives import PREFIX_OBJECTIVES, seq_lens

WHERE = ("model", "sliding_window")


def problems(r, base_dir: Path | None = None) -> list[tuple[tuple, str, str]]:
    """(path, message, hint) for each combination with model.sliding_window that is not built, or that has no effect.

    ``r`` holds the recipe's sections (a section that failed the schema is None); ``base_dir`` the recipe's
    folder, for a distillation teacher's directory.
    """
    out = _teacher_problems(r, base_dir) if base_dir is not None else []
    m = getattr(r, "model", None)
    w = getattr(m, "sliding_window", None)
    if w is None:
        return out
    if m.family != "llama":
        out.append((WHERE, (f"sliding-window attention is built for model.family llama only, not {m.family} "
                            "(an encoder attends in both directions)"), "remove model.sliding_window"))
    lens = seq_lens(r)
    if lens and w >= max(lens):
        what = f"train.seq_len {lens[0]}" if len(lens) == 1 else f"any sequence length of the run (the longest is {max(lens)})"
        out.append((WHERE, (f"sliding_window {w} is not shorter than {what}: every position already attends to all "
                            "earlier ones, so the window would have no effect"),
                    f"use a window below {max(lens)}, or remove model.sliding_window for full causal attention"))
    tg = getattr(r, "target", None)
    if tg is not None and tg.accelerator == "tpu":
        out.append((WHERE, ("sliding-window attention on a TPU is not built yet: the TPU program attends causally to every "
                            "earlier position"), "train it on cuda or cpu (target.accelerator), or remove model.sliding_window"))
    objective = getattr(r, "objective", None)
    kinds = [("the objective", objective.kind)] if objective is not None else []
    kinds += [(f"phase {ph.name!r}", ph.objective.kind) for ph in getattr(r, "phases", None) or []
              if getattr(ph, "objective", None) is not None]
    for who, kind in kinds:
        if kind in PREFIX_OBJECTIVES:
            out.append((WHERE, (f"sliding-window attention with objective {kind} ({who}) is not built yet: that objective "
                                "attends in both directions over each row's prefix"),
                        "remove model.sliding_window, or use causal_lm or fim"))
    return out


def _teacher_problems(r, base_dir: Path) -> list[tuple[tuple, str, str]]:
    """A distillation teacher that a malt run trained with a sliding window: the teacher model attends to every earlier position."""
    from .objectives import checkpoint_info

    out = []
    objective = getattr(r, "objective", None)
    places = [(("objective",), objective)] if objective is not None else []
    places += [(("phases", i, "objective"), ph.objective) for i, ph in enumerate(getattr(r, "phases", None) or [])
               if getattr(ph, "objective", None) is not None]
    for where, obj in places:
        if obj.kind != "distill":
            continue
        found, _ = checkpoint_info(base_dir / obj.teacher, r)  # an unusable teacher is reported by objectives.problems
        window = (found or {}).get("sliding_window")
        if window:
            out.append((where + ("teacher",), (f"the teacher {obj.teacher} was trained with model.sliding_window {window}; "
                                               "a distillation teacher with sliding-window attention is not built yet (the "
                                               "teacher model attends to every earlier position)"),
                        "distill from a teacher trained without a sliding window"))
    return out
