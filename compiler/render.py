"""Render a Plan into a program: train.py, model.py, launch.sh, plan.json, recipe.lock.yaml.

Templates only substitute and loop; every number and choice is made here or in
the passes. Every value reaches generated code through the ``lit`` filter (the
``repr`` of plain data, checked to be plain data), and recipe text that appears
in a comment goes through ``comment``, which escapes anything that could end the
comment. The output depends only on the Plan: no timestamps, hostnames or
absolute paths.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
import yaml

from .objectives import added_tokens, objectives_of, phase_objective as ph_objective, render_context as objective_context
from .conditioning import masked_target_reasons, metadata_off, source_entry
from .phases import tidy
from .estimates import LOSS_CHUNK
from . import render_xla
from .plan import MALT_VERSION, Plan, resolved_recipe
from .render_encoder import context as encoder_context
from .units import human_count

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
COMMENT_COLUMN = 40


def lit(value) -> str:
    """A Python literal for plain data; anything else is a bug in a pass."""
    def check(v):
        if v is None or isinstance(v, (bool, int, str)):
            return
        if isinstance(v, float):
            if v != v or v in (float("inf"), float("-inf")):
                raise TypeError(f"non-finite float {v!r} cannot be a literal")
            return
        if isinstance(v, (list, tuple)):
            for x in v:
                check(x)
            return
        if isinstance(v, dict):
            for k, x in v.items():
                check(k)
                check(x)
            return
        raise TypeError(f"{type(v).__name__} is not plain data: {v!r}")

    check(value)
    return repr(value)


def comment(text) -> str:
    """Text safe inside a # comment: one line; control, format and line-separator characters escaped."""
    import unicodedata

    out = []
    for ch in str(text):
        if unicodedata.category(ch)[0] in "CZ" and ch != " ":
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


@dataclass
class Const:
    line: str
    blank: bool = False


def const(name: str, value, note: str) -> Const:
    code = f"{name} = {lit(value)}"
    pad = max(2, COMMENT_COLUMN - len(code))  # PEP 8: at least two spaces before an inline comment
    return Const(f"{code}{' ' * pad}# {comment(note)}" if note else code)


def _blank() -> Const:
    return Const("", blank=True)


def _num(n: int) -> str:
    return f"{n:,}"


def _source_path(path: str, base_dir: Path, out_dir: Path) -> str:
    if path.startswith("builtin:") or os.path.isabs(path):
        return path
    return os.path.relpath((base_dir / path).resolve(), out_dir.resolve())


def data_spec(plan: Plan, base_dir: Path, out_dir: Path) -> dict:
    """What malt.runtime.data.prepare needs; relative paths are relative to the program's directory."""
    r = plan.recipe
    t = r.tokenizer
    base_weights = {s.name: s.weight for s in r.data.sources}  # sources that only phases use weigh 0 elsewhere
    return {
        "seed": r.seed,
        "validation": r.data.validation,
        **({"packing": r.data.packing} if r.data.packing != "concat" else {}),  # concat is the runtime's default
        "tokenizer": {
            "kind": t.kind,
            "vocab_size": t.vocab_size,
            "train_on": list(t.train_on),
            "max_chars": t.max_chars,
            "path": _source_path(t.path, base_dir, out_dir) if t.path else None,
            "special_tokens": list(t.special_tokens),
            **({"add_special_tokens": added_tokens(r)} if added_tokens(r) else {}),  # with the objective's ([MASK], sentinels, ...)
        },
        "model_vocab": plan.padded_vocab,  # the runtime refuses a tokenizer larger than the model's vocabulary
        **({"metadata_off": True} if metadata_off(plan) else {}),  # a phase reads the sources without their metadata
        "sources": [
            {"name": s.name, "path": _source_path(s.path, base_dir, out_dir), "weight": base_weights.get(s.name, 0.0),
             "text_field": s.text_field, **_source_options(s), **source_entry(s),
             **({"validation_path": _source_path(s.validation_path, base_dir, out_dir)} if s.validation_path else {})}
            for s in (plan.sources or r.data.sources)
        ],
    }


def _source_options(s) -> dict:
    """A source's filter and dedupe, when set (the runtime's defaults are none and false)."""
    out = {}
    if s.filter is not None:
        flt = {k: v for k, v in s.filter.model_dump().items() if v is not None}
        if flt:
            out["filter"] = flt
    if s.dedupe:
        out["dedupe"] = True
    return out


def init_from_spec(plan: Plan, base_dir: Path, out_dir: Path) -> dict:
    from .objectives import checkpoint_info

    init = plan.recipe.init_from
    found, _ = checkpoint_info(base_dir / init.path, plan.recipe)
    kind = found["kind"] if found else _previous_init_kind(out_dir)  # gone on --resume: the kind compiled before
    return {"path": _source_path(init.path, base_dir, out_dir), "kind": kind, "optimizer": init.optimizer}


def _previous_init_kind(out_dir: Path) -> str:
    """INIT_FROM's kind in the train.py malt wrote into ``out_dir`` before (a resumed run whose init_from is gone;
    the program does not read it when it resumes)."""
    import ast

    try:
        for line in (out_dir / "train.py").read_text().splitlines():
            if line.startswith("INIT_FROM = "):
                return ast.literal_eval(line[len("INIT_FROM = "):])["kind"]
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):
        pass
    return "malt"


def _decision(plan: Plan, name: str) -> str:
    return next((d.reason for d in plan.decisions if d.name == name), "")


def context(plan: Plan, base_dir: Path, out_dir: Path) -> dict:
    r = plan.recipe
    m, tr, o, sch = r.model, r.train, r.optimizer, r.schedule
    est = plan.estimates
    warm_note = (f"schedule.warmup {sch.warmup} of {_num(plan.steps)} steps, rounded" if isinstance(sch.warmup, str)
                 else "schedule.warmup (steps)")
    min_lr = tidy(o.lr * sch.min_lr_ratio)
    phased = bool(r.phases)
    distributed = (plan.world > 1 or plan.parallelism == "fsdp") and not render_xla.is_xla(plan)  # TPU: one SPMD process
    max_seq = max([ph.seq_len for ph in plan.phases] or [tr.seq_len])
    model_constants = [
        const("VOCAB_SIZE", plan.padded_vocab, f"tokenizer's {_num(plan.vocab_size)} tokens padded to a multiple of {m.pad_vocab_multiple}"
              if plan.padded_vocab != plan.vocab_size else "model.vocab_size (the tokenizer's)"),
        const("D_MODEL", m.d_model, "model.d_model"),
        const("N_LAYERS", plan.n_layers or m.n_layers, "model.n_layers" if (plan.n_layers or m.n_layers) == m.n_layers else
              f"model.n_layers {m.n_layers}, grown by stacking: the final model (earlier phases build fewer)"),
        const("N_HEADS", m.n_heads, "model.n_heads"),
        const("N_KV_HEADS", plan.n_kv_heads, "model.n_kv_heads" + (" (grouped-query attention)" if plan.n_kv_heads != m.n_heads else "")),
        const("HEAD_DIM", plan.head_dim, f"d_model {m.d_model} / n_heads {m.n_heads}"),
        const("D_FF", plan.d_ff, "model.d_ff" if m.d_ff is not None else f"8/3 × d_model {m.d_model}, rounded up to 256 (Llama)"),
        const("NORM_EPS", m.norm_eps, "model.norm_eps"),
        const("ROPE_THETA", m.rope_theta, "model.rope_theta"),
        const("INIT_STD", m.init_std, "model.init_std"),
        const("MAX_SEQ_LEN", max_seq, "train.seq_len (rotary tables are built for this length)" if not phased
              else "the longest phase's seq_len (rotary tables are built for this length)"),
        *_window_constants(plan),
    ]
    constants = [
        const("NAME", r.name, "name"),
        const("RECIPE_HASH", plan.recipe_hash, "sha256 of what the recipe sets apart from defaults, target and monitoring; --resume checks it"),
        const("SEED", r.seed, "seed"),
        _blank(),
    ]
    if not phased:  # with phases, the batch shape is a column of PHASES
        constants += [
            const("SEQ_LEN", tr.seq_len, "train.seq_len"),
            const("GLOBAL_BATCH", tr.global_batch, "train.global_batch, sequences per optimizer step"),
            const("MICRO_BATCH", plan.micro_batch, f"train.micro_batch {_decision(plan, 'micro_batch')}" if tr.micro_batch == "auto" else "train.micro_batch"),
            *([const("DEVICE_BATCH", tr.global_batch // plan.world, f"global_batch {tr.global_batch} / {plan.world} devices: sequences per device per step")]
              if distributed else []),
            const("GRAD_ACCUM", plan.grad_accum, render_xla.grad_accum_note(plan) or
                  (f"global_batch {tr.global_batch} / micro_batch {plan.micro_batch}" if not distributed
                   else f"DEVICE_BATCH {tr.global_batch // plan.world} / micro_batch {plan.micro_batch}")),
            const("TOKENS_PER_STEP", plan.tokens_per_step, f"global_batch {tr.global_batch} × seq_len {tr.seq_len} = {_num(plan.tokens_per_step)}"),
        ]
    constants += [
        const("MAX_STEPS", plan.steps, _decision(plan, "steps")),
        _blank(),
        const("LR", o.lr, "optimizer.lr, the peak learning rate"),
        *([const("MIN_LR", min_lr, f"optimizer.lr × schedule.min_lr_ratio {sch.min_lr_ratio:g}")]
          if sch.decay not in ("constant", "inverse_sqrt") else []),
        const("WARMUP_STEPS", plan.warmup_steps, warm_note),
    ]
    S = plan.schedule
    if sch.decay in ("wsd", "infinite"):
        constants.append(const("DECAY_START", S.decay_start, f"MAX_STEPS {plan.steps} - schedule.decay_share {sch.decay_share * 100:g}%"))
    if sch.decay == "infinite":
        constants.append(const("COOLDOWN_END", S.cooldown_end, f"WARMUP_STEPS + schedule.cooldown_share {sch.cooldown_share * 100:g}% of {plan.steps} steps"))
        constants.append(const("PLATEAU_LR", S.plateau_lr, f"optimizer.lr × schedule.constant_ratio {sch.constant_ratio:g}"))
    constants += [
        const("BETAS", tuple(o.betas), "optimizer.betas"),
        const("EPS", o.eps, "optimizer.eps"),
        const("WEIGHT_DECAY", o.weight_decay, "optimizer.weight_decay"),
    ]
    if o.grad_clip and not phased:  # phased programs clip with their phase's grad_clip (PHASES)
        constants.append(const("GRAD_CLIP", o.grad_clip, "optimizer.grad_clip, max global gradient norm"))
    if plan.galore:
        g = plan.galore
        constants += [
            const("GALORE_RANK", g["rank"], f"optimizer.rank {g['rank']}" if o.rank else f"d_model {plan.recipe.model.d_model} / 4 (optimizer.rank unset)"),
            const("GALORE_UPDATE_EVERY", g["update_every"], "optimizer.update_every: steps between projector updates (the gradient's top singular vectors, via eigh of its Gram matrix)"),
            const("GALORE_SCALE", g["scale"], "optimizer.scale: α, the projected-back update's scale"),
        ]
    constants += [
        _blank(),
        const("LOG_EVERY", tr.log_every, "train.log_every (steps)"),
        const("EVAL_EVERY", tr.eval_every, "train.eval_every (steps; 0 = never)"),
        const("EVAL_BATCHES", tr.eval_batches, f"train.eval_batches: global batches per evaluation ({tr.eval_batches} × {tr.global_batch} = "
              f"{tr.eval_batches * tr.global_batch:,} validation sequences)"
              if not phased else "train.eval_batches: global batches per evaluation (of the current phase's size)"),
        const("CHECKPOINT_EVERY", tr.checkpoint_every, "train.checkpoint_every (steps; the last step is always saved)"),
        const("KEEP_CHECKPOINTS", tr.keep_checkpoints, "train.keep_checkpoints, newest kept"),
        *([const("SAMPLE_TOKENS", tr.sample_tokens, "train.sample_tokens, printed at the end"),
           const("SAMPLE_PROMPT", tr.sample_prompt, "train.sample_prompt")] if m.family != "bert" else []),  # encoders do not generate
        _blank(),
        *([const("DEVICE", plan.device, _decision(plan, "device")),
           const("PRECISION", "pure_bf16" if plan.master_weights == "bf16" else plan.precision, _decision(plan, "precision"))]
          if not render_xla.is_xla(plan) else []),
        *render_xla.constants(plan, const, _decision, lambda text: Const("# " + comment(text))),
        *([const("WORLD", plan.world, "target.devices: processes, one per device" if plan.nodes == 1 else
                 f"target.nodes {plan.nodes} × target.devices {r.target.devices}: processes, one per device")] if distributed else []),
        *([const("NODES", plan.nodes, "target.nodes: HSDP replicates across nodes, shards within each")] if plan.parallelism == "hsdp" else []),
        *([const("PARALLELISM", plan.parallelism, _decision(plan, "parallelism"))] if distributed else []),
        *([const("CHECKPOINT_FORMAT", "sharded", _decision(plan, "checkpoint_format"))] if plan.checkpoint_format == "sharded" else []),
        *([const("CHECKPOINT_IN_BACKGROUND", True, _decision(plan, "checkpoint_writes"))] if plan.checkpoint_writes == "background" else []),
        _blank(),
        *([Const("# init_from: the weights this run starts from (continual pre-training); path relative to this file"),
           Const("INIT_FROM = " + lit(init_from_spec(plan, base_dir, out_dir))), _blank()] if r.init_from else []),
        Const("# data and tokenizer (data, tokenizer sections); paths are relative to this file"),
        Const("DATA = " + _pretty_literal(data_spec(plan, base_dir, out_dir), notes=DATA_NOTES)),
    ]
    objective = objective_context(plan, base_dir, out_dir)  # the objective's constants, flags and call sites
    objective.update(encoder_context(plan))  # encoders (model.family bert, objectives mlm and rtd): their model and batches
    constants += objective.pop("objective_constants")
    if r.data.packing != "concat":  # dataset.batch returns each position's document id too
        objective["batch_out"] += ", doc_ids"
    # the batch's tensors the model takes beside (x, y): prefix lengths (prefix objectives) or rtd's uniforms and counts,
    # and each position's document (document / best_fit packing)
    rtd_args = objective.pop("rtd_arg", "")
    objective["batch_args"] = ((", prefix_len=prefix_len" if objective["prefix_lm"] else rtd_args)
                               + (", doc_ids=doc_ids" if r.data.packing != "concat" else ""))
    schedules, lr_dispatch = _schedules(plan)
    phase_comments, phase_rows = _phase_table(plan) if phased else ([], [])
    e = ({"micro_batch": 'phase["micro_batch"]', "seq_len": 'phase["seq_len"]', "grad_accum": 'phase["grad_accum"]',
          "global_batch": 'phase["global_batch"]', "weights": ', weights=phase["weights"]',
          "device_start": 'dist.rank * phase["device_batch"]'} if phased else
         {"micro_batch": "MICRO_BATCH", "seq_len": "SEQ_LEN", "grad_accum": "GRAD_ACCUM", "global_batch": "GLOBAL_BATCH", "weights": "",
          "device_start": "dist.rank * DEVICE_BATCH"})
    # masked targets (-100): micro-batches weighted by their targets with a loss, so the step's loss is the mean over them
    # (ELECTRA's rtd mixes a masked-LM loss with a loss over every token: its model divides each sum by the step's count)
    token_weighted = plan.masked_targets and plan.recipe.objective.kind != "rtd"
    if token_weighted or plan.recipe.objective.kind == "rtd":
        e["loss"] = "distributed.mean(loss_sum)" if distributed else "loss_sum.item()"
    else:
        e["loss"] = (f"distributed.mean(loss_sum / {e['grad_accum']})" if distributed else f"(loss_sum / {e['grad_accum']}).item()")
    e["metadata"] = ', metadata=phase["metadata"]' if metadata_off(plan) else ""  # data.metadata off in a phase
    return {
        "version": MALT_VERSION,
        "recipe_file": plan.recipe_file,
        "recipe_hash": plan.recipe_hash,
        "passes_lines": _wrap(list(plan.passes), 90),
        "n_layers": plan.n_layers or m.n_layers,
        "growth": any(ph.grow_factor for ph in plan.phases),
        "params_human": human_count(est["params"]),
        "constants": constants,
        "model_constants": model_constants,
        "qkv_bias": m.qkv_bias,
        "tie_embeddings": m.tie_embeddings,
        "gqa": plan.n_kv_heads != m.n_heads,
        "schedules": schedules,
        "uses_math": any(s["decay"] in ("cosine", "inverse_sqrt", "infinite") for s in schedules),
        "lr_dispatch": lr_dispatch,
        "phased": phased,
        "phase_comments": phase_comments,
        "phase_rows": phase_rows,
        "init_from": r.init_from is not None,
        "distributed": distributed,
        "dev": "device" if distributed else "DEVICE",
        # data.to_device: on CUDA through pinned memory, so the copies are asynchronous and the loader overlaps the step
        "move_note": ("  # via pinned memory: the GPU computes while the host builds the next micro-batch"
                      if plan.device == "cuda" else ""),
        "parallelism_note": {"ddp": "DDP: a replica per device, gradients all-reduced",
                             "fsdp": "FSDP2: weights, gradients and AdamW state sharded per block",
                             "hsdp": "HSDP: FSDP2 on a (nodes, devices) mesh, sharded within a node, replicated across nodes",
                             }.get(plan.parallelism, ""),
        "rope_changes": any(ph.rope_theta != m.rope_theta for ph in plan.phases),
        "e": e,
        "compile": plan.compile,
        "cpu": plan.device == "cpu",
        "precision": plan.precision,
        "pure_bf16": plan.master_weights == "bf16",
        "grad_clip": bool(o.grad_clip),
        "adamw_impl": "fused" if plan.fused_adamw else "foreach",
        "galore": plan.galore is not None,
        "checkpointing": plan.activation_checkpointing,
        "parallelism": plan.parallelism,
        "sharded_checkpoints": plan.checkpoint_format == "sharded",
        "background_checkpoints": plan.checkpoint_writes == "background",
        "attention": plan.attention,
        "onednn": plan.matmul == "onednn",         # choose_matmul: fp32 products through oneDNN (class Linear)
        "linear": "Linear" if plan.matmul == "onednn" else "nn.Linear",
        "window": m.sliding_window is not None,    # model.sliding_window: one mask function, window & causal (& documents)
        "doc_masks": r.data.packing != "concat",   # document ids ride with every batch (choose_attention)
        "packing": r.data.packing,
        "loss_chunk": LOSS_CHUNK,
        "token_weighted": token_weighted,
        "eval_per_source": plan.recipe.train.eval_per_source,
        "masked_loss": plan.masked_targets,                  # choose_loss: targets of -100 carry no loss
        "masked_loss_why": ", ".join(masked_target_reasons(plan)),
        "all_positions_why": f"{r.data.packing} packing, no metadata or control tokens without loss: no target is -100",
        **objective,
        **render_xla.context(plan),
    }


def _window_constants(plan: Plan) -> list[Const]:
    """SLIDING_WINDOW (model.sliding_window) and, for FlexAttention, the lengths its block masks are built for."""
    w = plan.recipe.model.sliding_window
    if w is None:
        return []
    out = [const("SLIDING_WINDOW", w, f"model.sliding_window: each position attends to itself and the {w - 1} before it")]
    if plan.attention == "flex":
        lens = tuple(sorted({plan.recipe.train.seq_len, *(ph.seq_len for ph in plan.phases)}))
        out.append(const("FLEX_SEQ_LENS", lens, "train.seq_len" + (" and the phases'" if len(lens) > 1 else "")
                         + ": FlexAttention block masks at these lengths (one compiled kernel each); others take the dense mask"))
    return out


_DECAY_DOC = {
    "cosine": "then cosine decay from {lr} to {min_lr} at {total}",
    "linear": "then linear decay from {lr} to {min_lr} at {total}",
    "wsd": "then constant {lr} until {decay_start}, then linear decay to {min_lr} at {total} (warmup-stable-decay)",
    "constant": "then constant {lr}",
    "inverse_sqrt": "then {lr} × sqrt(warmup / (step + 1)) (inverse square root)",
    "infinite": ("then cosine cooldown to {plateau} until {cooldown_end}, constant {plateau} until {decay_start}, "
                 "then exponential annealing to {min_lr} at {total} (infinite schedule)"),
}


# what each schedule constant of a phase's own schedule is, for its comment
_PHASE_SCHEDULE_NOTES = {
    "lr": "peak learning rate: phases[{i}].optimizer.lr, else optimizer.lr",
    "min_lr": "lr × schedule.min_lr_ratio (phases[{i}].schedule, else the recipe's)",
    "warmup": "phases[{i}].schedule.warmup (else the recipe's), in steps of the phase",
    "total": "the phase's steps",
    "decay_start": "step of the phase where the final decay starts: steps × (1 - decay_share)",
    "cooldown_end": "step of the phase where the cooldown ends: warmup + steps × cooldown_share",
    "plateau": "lr × schedule.constant_ratio",
}
# the schedule values each decay reads (a phase's own schedule gets constants for these only)
_DECAY_READS = {"cosine": ("lr", "min_lr", "total"), "linear": ("lr", "min_lr", "total"), "constant": ("lr",),
                "wsd": ("lr", "min_lr", "total", "decay_start"), "inverse_sqrt": ("lr",),
                "infinite": ("lr", "min_lr", "total", "decay_start", "cooldown_end", "plateau")}


def _phase_ident(plan: Plan, ph) -> str:
    """The phase's name as part of Python names (PHASE_COOLDOWN_LR, lr_phase_cooldown), or its number (1-based)
    when the name does not make a unique identifier."""
    def ident(name: str) -> str:
        return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").upper()

    mine = ident(ph.name)
    if mine and mine.isascii() and not mine[0].isdigit() and [ident(p.name) for p in plan.phases].count(mine) == 1:
        return mine
    return str(ph.index + 1)


def _schedule_ctx(fn: str, head: str, S, names: dict | None, t: str, phase: int | None = None, ident: str | None = None) -> dict:
    """Template values for one schedule function: the recipe's schedule reads the constants block (``names``);
    a phase's own (``phase``: its index, ``ident``: its name in Python names) gets named constants of its own,
    written just above its function."""
    consts = []
    if names is None:
        values = {"lr": S.lr, "min_lr": S.min_lr, "warmup": S.warmup, "total": S.total, "decay_start": S.decay_start,
                  "cooldown_end": S.cooldown_end, "plateau": S.plateau_lr}
        reads = set(_DECAY_READS[S.decay]) | ({"warmup"} if S.warmup else set())
        names = {k: (f"PHASE_{ident}_{k.upper()}" if k in reads else lit(v)) for k, v in values.items()}
        consts = [const(names[k], values[k], _PHASE_SCHEDULE_NOTES[k].format(i=phase)) for k in values if k in reads]
    warm = f"Linear warmup over {names['warmup']} steps, " if S.warmup else ""
    doc = _DECAY_DOC[S.decay].format(**names)
    doc = warm + doc if S.warmup else doc.replace("then ", "", 1)
    doc = doc[0].upper() + doc[1:]  # not str.capitalize(): it would lower the constants' names
    since_warmup = f"({t} - {names['warmup']})" if S.warmup else t                    # steps since the warmup ended
    def after_warmup(end: str) -> str:
        return f"{end} - {names['warmup']}" if S.warmup else end
    return {"fn": fn, "t": t, "decay": S.decay, "doc_head": head, "doc": doc, "warmup_nonzero": S.warmup > 0, "consts": consts,
            "since_warmup": since_warmup, "decay_span": after_warmup(names["total"]), "cool_span": after_warmup(names["cooldown_end"]),
            "timescale": f"max(1, {names['warmup']})" if S.warmup or names["warmup"] != "0" else "1", **names}


def _schedules(plan: Plan) -> tuple[list, list]:
    """The schedule functions of train.py and, with phases, how lr_at dispatches to them."""
    recipe_names = {"lr": "LR", "min_lr": "MIN_LR", "warmup": "WARMUP_STEPS", "total": "MAX_STEPS", "decay_start": "DECAY_START",
                    "cooldown_end": "COOLDOWN_END", "plateau": "PLATEAU_LR"}
    if all(ph.schedule is None for ph in plan.phases):  # one schedule over the whole run
        return [_schedule_ctx("lr_at", "Learning rate for optimizer step `step` (0-based).", plan.schedule, recipe_names, "step")], []
    schedules, dispatch = [], []
    if any(ph.schedule is None for ph in plan.phases):
        schedules.append(_schedule_ctx("lr_recipe", "The recipe's schedule, over all MAX_STEPS steps of the run.", plan.schedule,
                                       recipe_names, "step"))
    for ph in plan.phases:
        if ph.schedule is None:
            dispatch.append({"end": ph.end, "name": f"{ph.name}: the recipe's schedule", "call": "lr_recipe(step)"})
        else:
            ident = _phase_ident(plan, ph)
            fn = f"lr_phase_{ident.lower()}"
            who = ph.name if re.fullmatch(r"[\w.-]+", ph.name) else str(ph.index + 1)  # safe inside a docstring
            schedules.append(_schedule_ctx(fn, f"Phase {who}'s own schedule (phases[{ph.index}]); t counts steps "
                                           f"from the phase's start ({ph.start:,}).", ph.schedule, None, "t", phase=ph.index, ident=ident))
            dispatch.append({"end": ph.end, "name": f"{ph.name}: its own schedule", "call": f"{fn}(step - {ph.start})"})
    return schedules, dispatch


def _phase_table(plan: Plan) -> tuple[list[str], list[str]]:
    names = [s.name for s in plan.sources]
    distill_phases = any(o.kind == "distill" for o in objectives_of(plan.recipe))
    comments, rows = [], []
    tokens_before = 0
    width = max(len(ph.name) for ph in plan.phases)
    for ph in plan.phases:
        tokens = ph.steps * ph.tokens_per_step
        changes = ", ".join(ph.changes) if ph.changes else "the recipe as written"
        comments.append(f"{ph.name:<{width}}  steps {ph.start:,}-{ph.end:,} ({ph.steps:,} steps, {tokens:,} tokens): {changes}")
        row = {
            "name": ph.name, "start": ph.start, "end": ph.end,
            "n_layers": ph.n_layers, "seq_len": ph.seq_len, "global_batch": ph.global_batch, "micro_batch": ph.micro_batch,
            "grad_accum": ph.grad_accum,
            "tokens_per_step": ph.tokens_per_step, "tokens_before": tokens_before,
            **({"device_batch": ph.global_batch // plan.world} if plan.world > 1 or plan.parallelism == "fsdp" else {}),
            "weights": dict(zip(names, ph.weights)), "rope_theta": ph.rope_theta,
            "betas": tuple(ph.betas), "eps": ph.eps, "weight_decay": ph.weight_decay, "grad_clip": ph.grad_clip or 0.0,
            **({"metadata": ph.metadata} if metadata_off(plan) else {}),  # data.metadata: the sources with their metadata prefixes
        }
        if distill_phases:  # the phase's objective: distillation (weight, temperature) or plain next-token loss (None)
            obj = ph_objective(plan.recipe, ph.index)
            row["distill"] = {"weight": obj.weight, "temperature": obj.temperature} if obj.kind == "distill" else None
        rows.append(_pretty_literal(row, 1))
        tokens_before += tokens
    return comments, rows


# comments on DATA's keys whose meaning the value alone does not say (by their path in DATA)
DATA_NOTES = {
    ("tokenizer", "train_on"): "the sources the tokenizer trains on; []: every source",
    ("model_vocab",): "model.vocab_size after padding: a tokenizer with more entries is an error",
    ("metadata_off",): "a phase turns data.metadata off: the sources are also prepared without their prefixes",
}


def _pretty_literal(value, indent: int = 0, notes: dict | None = None, path: tuple = ()) -> str:
    """A multi-line Python literal for nested dicts and lists (each leaf through lit); ``notes`` ({path of a key:
    text}) become comments after the lines of those keys, where the value fits on that line."""
    pad = "    " * (indent + 1)
    end = "    " * indent
    if isinstance(value, (dict, list)) and len(lit(value)) + len(pad) <= 100 and not (
            notes and isinstance(value, dict) and any(path + (k,) in notes for k in value)):
        return lit(value)
    if isinstance(value, dict) and value:
        items = []
        for k, v in value.items():
            line = f"{pad}{lit(k)}: {_pretty_literal(v, indent + 1, notes, path + (k,))},"
            note = (notes or {}).get(path + (k,))
            items.append(f"{line}  # {comment(note)}" if note and "\n" not in line else line)
        return "{\n" + "\n".join(items) + f"\n{end}}}"
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        items = [f"{pad}{_pretty_literal(v, indent + 1)}," for v in value]
        return "[\n" + "\n".join(items) + f"\n{end}]"
    if isinstance(value, list) and value:  # a long flat list: its items filled into lines of about 100 characters
        lines = _wrap([lit(v) for v in value], 100 - len(pad))
        return "[\n" + "\n".join(pad + line for line in lines) + f",\n{end}]"
    return lit(value)


def _wrap(words: list[str], width: int) -> list[str]:
    """Comma-separated words in lines of at most ``width`` characters."""
    lines, line = [], ""
    for w in words:
        piece = f"{line}, {w}" if line else w
        if len(piece) > width and line:
            lines.append(line + ",")
            line = w
        else:
            line = piece
    return lines + [line] if line else lines


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["lit"] = lit
    env.filters["comment"] = comment
    return env


LAUNCH_SH = """#!/usr/bin/env bash
# launch.sh: generated by malt {version}. One process on one device.
# Usage: ./launch.sh [--resume]
set -euo pipefail
exec "${{PYTHON:-python3}}" "$(dirname "$0")/train.py" "$@"
"""

LAUNCH_TORCHRUN_SH = """#!/usr/bin/env bash
# launch.sh: generated by malt {version}. {world} processes on one node, one per {device} device ({parallelism}).
# Usage: ./launch.sh [--resume]
# malt.runtime.launch is torchrun (torch.distributed.run) that ends with the failing process's own exit code
set -euo pipefail
exec "${{PYTHON:-python3}}" -m malt.runtime.launch --standalone --nproc_per_node {world} "$(dirname "$0")/train.py" "$@"
"""


def launch_script(plan: Plan) -> str:
    if render_xla.is_xla(plan):
        return render_xla.launch_sh(plan)
    if plan.nodes > 1:
        from .launch import multinode_launch_sh

        return multinode_launch_sh(plan)
    if plan.world > 1 or plan.parallelism == "fsdp":
        return LAUNCH_TORCHRUN_SH.format(version=MALT_VERSION, world=plan.world, device=plan.device, parallelism=plan.parallelism)
    return LAUNCH_SH.format(version=MALT_VERSION)


def launch_command(plan: Plan, train_py: str) -> list[str]:
    """The command `malt run` starts: the program itself, or torchrun with one process per device (one node only)."""
    import sys

    if plan.nodes > 1:
        raise ValueError("a target of several nodes is launched on each node (launch.sh, slurm.sbatch), not from here")

    if (plan.world > 1 or plan.parallelism == "fsdp") and not render_xla.is_xla(plan):
        return [sys.executable, "-m", "malt.runtime.launch", "--standalone", "--nproc_per_node", str(plan.world), train_py]
    return [sys.executable, train_py]


def render(plan: Plan, base_dir: Path, out_dir: Path) -> dict[str, str]:
    """File name -> content, for everything `malt compile` writes."""
    env = _env()
    ctx = context(plan, base_dir, out_dir)
    files = {
        "train.py": env.get_template("train.py.j2").render(ctx),
        "model.py": env.get_template("encoder.py.j2" if ctx["encoder"] else "model.py.j2").render(ctx),
        "launch.sh": launch_script(plan),
        "plan.json": json.dumps(plan.to_json(), indent=2) + "\n",
        "recipe.lock.yaml": f"# recipe.lock.yaml: {comment(plan.recipe_file)} with every default written out, paths relative to this "
                            f"folder (malt {MALT_VERSION})\n"
                            + yaml.safe_dump(resolved_recipe(plan.recipe, base_dir, out_dir), sort_keys=False, allow_unicode=False, width=100),
    }
    if plan.nodes > 1:
        from .launch import slurm_sbatch

        files["slurm.sbatch"] = slurm_sbatch(plan)
    return files


def _written_by_malt(path: Path) -> bool:
    """Whether an existing file is one malt wrote (so compiling again may replace it)."""
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:600]
    except OSError:
        return False
    if path.name == "plan.json":
        return '"malt_version"' in head
    return "generated by malt" in head or head.startswith(f"# {path.name}: ")


WRITTEN = ".malt-files.json"  # in a program's folder: the sha256 of each file as malt last wrote it


def write(files: dict[str, str], out_dir: Path) -> list[str]:
    """Write each file atomically (temporary file, then rename). A file of the same name that malt did not
    write (a hand-written train.py in the output folder) is never replaced: that is an error, before any write.
    A file malt wrote and someone edited since (its sha256 is not the one malt recorded) is kept beside it as
    NAME.edited (NAME.edited-2, ...) before the new one replaces it; returns the names of the kept copies."""
    import hashlib
    import json
    import shutil

    from .diagnostics import UserError

    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder", "choose another output folder (-o / --run-dir)")
    foreign = [name for name in files if (out_dir / name).exists() and not _written_by_malt(out_dir / name)]
    if foreign:
        raise UserError(f"{out_dir} already holds {', '.join(foreign)} that malt did not write; compiling there would replace "
                        f"{'them' if len(foreign) > 1 else 'it'}", "choose another output folder (-o / --run-dir), or move those files", code=2)
    out_dir.mkdir(parents=True, exist_ok=True)

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    try:
        recorded = json.loads((out_dir / WRITTEN).read_text())
        recorded = recorded if isinstance(recorded, dict) else {}
    except (OSError, ValueError):
        recorded = {}
    kept = []
    for name, text in files.items():
        target = out_dir / name
        if name in recorded and target.is_file():
            now = target.read_bytes()
            if sha(now) != recorded[name] and now != text.encode("utf-8"):  # edited by hand since malt wrote it
                n, copy = 1, out_dir / f"{name}.edited"
                while copy.exists():
                    n += 1
                    copy = out_dir / f"{name}.edited-{n}"
                shutil.copy2(target, copy)
                kept.append(copy.name)
    for name, text in [*files.items(), (WRITTEN, json.dumps({n: sha(t.encode("utf-8")) for n, t in files.items()},
                                                              indent=1, sort_keys=True) + "\n")]:
        target = out_dir / name
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        try:
            tmp.write_text(text, encoding="utf-8")
            if name.endswith(".sh"):
                tmp.chmod(0o755)
            os.replace(tmp, target)
        except BaseException:  # a full disk, Ctrl-C: no temporary file is left behind
            tmp.unlink(missing_ok=True)
            raise
    return kept
