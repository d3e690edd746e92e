"""The objective section: its checks, the tokens it adds to the tokenizer, its derived numbers, its teacher.

Batch construction itself lives in :mod:`malt.runtime.objectives`; this module
decides, at compile time, what the generated program needs from it: the special
tokens (T5 sentinels, UL2 mode tokens, FIM sentinels) that are appended to the
tokenizer, the raw window length each UL2 denoiser consumes at the recipe's
sequence length, and the shape of a distillation teacher (for the estimates).
"""

from __future__ import annotations

from pathlib import Path

SENTINEL = "<extra_id_{}>"          # T5's sentinel names: <extra_id_0>, <extra_id_1>, ...
PREFIX_OBJECTIVES = ("prefix_lm", "span_corruption", "ul2")   # a bidirectional prefix: the model takes prefix_len


def seq_lens(recipe) -> list[int]:
    """Every sequence length the run trains at (the recipe's and its phases'), ascending."""
    if getattr(recipe, "train", None) is None:  # a partial recipe (its train section failed the schema)
        return []
    out = {recipe.train.seq_len}
    for ph in getattr(recipe, "phases", None) or []:
        if ph.train is not None and ph.train.seq_len:
            out.add(ph.train.seq_len)
    return sorted(out)


def objectives_of(recipe) -> list:
    """The recipe's objective followed by each phase's own (if any)."""
    own = getattr(recipe, "objective", None)
    return ([own] if own is not None else []) + [ph.objective for ph in (getattr(recipe, "phases", None) or [])
                                                  if getattr(ph, "objective", None) is not None]


def phase_objective(recipe, index: int):
    """The objective phase ``index`` trains with: its own, or the recipe's."""
    phases = getattr(recipe, "phases", None) or []
    own = getattr(phases[index], "objective", None) if index < len(phases) else None
    return own if own is not None else recipe.objective


def denoisers(obj) -> tuple:
    """The runtime's denoisers for a span_corruption or ul2 objective (span corruption: one R denoiser)."""
    from malt.runtime.objectives import (
        Denoiser,  # imports torch: only for the objectives that use it
    )

    if obj.kind == "span_corruption":
        return (Denoiser("R", obj.mean_span, obj.noise_density, 1.0),)
    return tuple(Denoiser(d.kind, d.mean_span, d.rate, d.weight) if d.kind != "S" else Denoiser("S", None, None, d.weight)
                 for d in obj.denoisers)


def mode_tokens(obj) -> dict | None:
    """{paradigm: token} of the denoisers a ul2 objective uses, or None (no mode token)."""
    if obj.kind != "ul2" or obj.mode_tokens is None:
        return None
    used = {d.kind for d in obj.denoisers}
    return {k: v for k, v in obj.mode_tokens.items() if k in used}


def sentinel_count(recipe, obj=None) -> int:
    """How many sentinel tokens span corruption / UL2 may use at the run's longest sequence length."""
    obj = obj or recipe.objective
    if obj.kind not in ("span_corruption", "ul2") or not seq_lens(recipe):
        return 0
    from malt.runtime.objectives import ul2_sentinels_needed

    try:
        return ul2_sentinels_needed(max(seq_lens(recipe)), denoisers(obj), mode_tokens(obj) is not None)
    except (ValueError, TypeError):  # missing or out-of-range denoiser settings, too short a sequence: problems() reports them
        return 0


def objective_tokens(recipe) -> list[str]:
    """Special tokens the objectives need, in the order they are appended to the tokenizer."""
    out: list[str] = []
    for obj in objectives_of(recipe):
        if obj.kind == "ul2" and mode_tokens(obj):
            out += list(mode_tokens(obj).values())
        if obj.kind in ("span_corruption", "ul2"):
            out += [SENTINEL.format(k) for k in range(sentinel_count(recipe, obj))]
        if obj.kind == "fim":
            out += [obj.prefix_token, obj.middle_token, obj.suffix_token]
        if obj.kind in ("mlm", "rtd"):  # encoders (OBJ-ENC): the [MASK] token
            out.append(obj.mask_token)
    return list(dict.fromkeys(out))


def added_tokens(recipe) -> list[str]:
    """tokenizer.add_special_tokens followed by the objective's and the control tokens that the recipe does not list itself."""
    t = recipe.tokenizer
    listed = list(t.add_special_tokens or [])
    have = set(listed) | set(t.special_tokens)
    from .conditioning import (
        control_tokens,  # data.sources[].control: the good and bad tokens
    )

    return listed + [tok for tok in dict.fromkeys(objective_tokens(recipe) + control_tokens(recipe)) if tok not in have]


# --------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------

def problems(recipe, base_dir: Path, where: tuple = ("objective",), obj=None) -> list[tuple]:
    """(path, message, hint) for each problem of an objective section (the recipe's, or ``obj`` at ``where``)."""
    obj = obj or recipe.objective
    out = []
    add = lambda path, msg, hint: out.append((where + path, msg, hint))
    if obj.kind == "span_corruption":
        if not 0 < obj.noise_density < 1:
            add(("noise_density",), f"must be between 0% and 100% (exclusive), got {obj.noise_density:g}", "T5 uses 15%")
        if obj.mean_span < 1:
            add(("mean_span",), f"must be at least 1 token, got {obj.mean_span:g}", "T5 uses 3")
    if obj.kind == "ul2":
        total = 0.0
        for i, d in enumerate(obj.denoisers):
            at = ("denoisers", i)
            if d.kind == "S":
                for key in ("mean_span", "rate"):
                    if getattr(d, key) is not None:
                        add(at + (key,), f"an S denoiser (prefix LM) has no {key}", f"remove {key}, or make it an R or X denoiser")
            else:
                for key, example in (("mean_span", "3"), ("rate", "15%")):
                    if getattr(d, key) is None:
                        add(at, f"an {d.kind} denoiser needs {key}", f"add `{key}: {example}`")
                if d.mean_span is not None and d.mean_span < 1:
                    add(at + ("mean_span",), f"must be at least 1 token, got {d.mean_span:g}", "UL2 uses 3, 8 or 64")
                if d.rate is not None and not 0 < d.rate < 1:
                    add(at + ("rate",), f"must be between 0% and 100% (exclusive), got {d.rate:g}", "UL2 uses 15% or 50%")
            if d.weight < 0:
                add(at + ("weight",), f"must not be negative, got {d.weight:g}", "use 0 to leave the denoiser out")
            total += max(d.weight, 0.0)
        if obj.denoisers and total <= 0:
            add(("denoisers",), "every denoiser has weight 0", "give at least one denoiser a positive weight")
        if obj.mode_tokens is not None:
            for k, v in obj.mode_tokens.items():
                if k not in ("R", "X", "S"):
                    add(("mode_tokens", k), f"{k!r} is not a denoiser paradigm", "mode tokens are keyed by R, X and S")
                elif not v:
                    add(("mode_tokens", k), "a mode token must not be empty", 'use "[NLU]", "[NLG]" or "[S2S]" (UL2\'s)')
            missing = sorted({d.kind for d in obj.denoisers} - set(obj.mode_tokens))
            if missing:
                add(("mode_tokens",), f"no mode token for the {', '.join(missing)} denoiser(s)",
                    "give every paradigm used a token, e.g. {R: '[NLU]', X: '[NLG]', S: '[S2S]'}, or `mode_tokens: null` for none")
            values = [v for v in obj.mode_tokens.values() if v]
            if len(set(values)) != len(values):
                add(("mode_tokens",), "two paradigms share a mode token", "give each paradigm its own token")
    if obj.kind in ("span_corruption", "ul2") and not out:
        from malt.runtime.objectives import ul2_raw_length

        with_mode = mode_tokens(obj) is not None
        for seq in seq_lens(recipe):
            for d in denoisers(obj):
                try:
                    ul2_raw_length(seq, d, with_mode)
                except ValueError:
                    shape = f" (mean span {d.mean_span:g}, rate {d.rate:g})" if d.mean_span is not None and d.rate is not None else ""
                    add((), f"seq_len {seq} is too short for the denoiser {d.kind}{shape}",
                        "raise train.seq_len (at least a few dozen tokens)")
    if obj.kind == "prefix_lm":
        for seq in seq_lens(recipe):
            if seq < 2:
                add((), f"seq_len {seq} is too short for prefix_lm: an example needs a prefix and at least one target",
                    "raise train.seq_len (at least a few dozen tokens)")
    if obj.kind == "fim":
        if not 0 <= obj.rate <= 1:
            add(("rate",), f"must be between 0% and 100%, got {obj.rate:g}", "the paper uses 50% (90% for its final models)")
        names = [s.name for s in recipe.data.sources] if recipe.data is not None else []
        for ph in getattr(recipe, "phases", None) or []:
            names += [s.name for s in (ph.data.sources if ph.data and ph.data.sources else []) if s.name not in names]
        for i, name in enumerate(obj.sources):
            if names and name not in names:
                from .diagnostics import did_you_mean

                guess = did_you_mean(name, names)
                add(("sources", i), f"no data source is named {name!r}", f"did you mean {guess!r}?" if guess else f"sources are: {', '.join(names)}")
        toks = [obj.prefix_token, obj.middle_token, obj.suffix_token]
        for key, tok in zip(("prefix_token", "middle_token", "suffix_token"), toks):
            if not tok:
                add((key,), "must not be empty", "the defaults are <fim_prefix>, <fim_middle>, <fim_suffix>")
        if len(set(toks)) != 3:
            add((), "prefix_token, middle_token and suffix_token must differ", "use <fim_prefix>, <fim_middle>, <fim_suffix>")
    data = getattr(recipe, "data", None)
    if obj.kind in ("prefix_lm", "span_corruption", "ul2", "fim", "distill") and data is not None and data.packing != "concat":
        add(("kind",), f"objective {obj.kind} with data.packing {data.packing} is not built yet: it builds its rows from "
            "concat-packed windows", "use data.packing: concat with this objective")
    if obj.kind in ("prefix_lm", "span_corruption", "ul2", "fim") and data is not None:
        from .conditioning import all_sources

        if any(getattr(s, "metadata", None) is not None or getattr(s, "control", None) is not None for s in all_sources(recipe)):
            add(("kind",), f"objective {obj.kind} with metadata or control tokens on the sources is not built yet",
                "use objective causal_lm with data.sources[].metadata / control, or remove them")
    if obj.kind in ("span_corruption", "ul2", "fim") and recipe.tokenizer is not None:
        eos = recipe.tokenizer.special_tokens[0] if recipe.tokenizer.special_tokens else None
        if eos is not None and eos in objective_tokens(recipe):
            add((), f"the objective's special tokens include the document separator {eos!r}", "choose other token names")
    if obj.kind == "distill":
        if not 0 <= obj.weight <= 1:
            add(("weight",), f"must be between 0% and 100%, got {obj.weight:g}", "a usual value is 50%")
        if obj.temperature <= 0:
            add(("temperature",), f"must be positive, got {obj.temperature:g}", "a usual value is 1 or 2")
        found, problem = checkpoint_info(base_dir / obj.teacher, recipe)
        if not problem:
            from .validate import tokenizer_vocab

            tok = tokenizer_vocab(recipe, base_dir)
            if tok is not None and found["shape"]["vocab"] < tok:
                add(("teacher",), f"the teacher's vocabulary ({found['shape']['vocab']:,}) is smaller than this run's tokenizer ({tok:,})",
                    "distillation needs the teacher's tokenizer: use it here (tokenizer: {kind: file, path: ...})")
        if problem:
            add(("teacher",), problem, "name a run directory of `malt run` (runs/NAME) or a Hugging Face Llama/Mistral/Qwen2 "
                "directory (config.json + safetensors), relative to the recipe")
    return out


# --------------------------------------------------------------------------
# the teacher
# --------------------------------------------------------------------------

def checkpoint_info(path: Path, recipe) -> tuple[dict | None, str | None]:
    """({kind, shape, norm_eps, rope_theta, ...}, None) for a checkpoint directory the recipe reads (a distillation
    teacher, init_from), else (None, what is wrong): checkpoints.describe at the recipe's longest sequence."""
    from .checkpoints import describe

    return describe(path, max(seq_lens(recipe), default=None))


def teacher_spec(recipe, base_dir: Path) -> dict | None:
    """The shape of the distillation teacher of the recipe (or of any phase), for lowering; None without one."""
    obj = next((o for o in objectives_of(recipe) if o.kind == "distill"), None)
    if obj is None:
        return None
    found, problem = checkpoint_info(base_dir / obj.teacher, recipe)
    if problem:
        return None
    return {"path": obj.teacher, "kind": found["kind"], **found["shape"],
            "norm_eps": found["norm_eps"], "rope_theta": found["rope_theta"]}


# --------------------------------------------------------------------------
# derived numbers for plan.json
# --------------------------------------------------------------------------

def describe_objective(recipe, obj=None, teacher: dict | None = None) -> dict:
    """The objective and its derived numbers, as plan.json records them."""
    obj = obj or recipe.objective
    out = obj.model_dump(mode="json")
    seq = max(seq_lens(recipe))
    if obj.kind == "prefix_lm":
        out["prefix_len"] = f"uniform in [1, {seq - 1}] per row (T5's random_prefix_noise_mask)"
        out["attention"] = "bidirectional over the prefix, causal after it"
        out["loss"] = "the tokens after the prefix"
    if obj.kind in ("span_corruption", "ul2"):
        from malt.runtime.objectives import span_counts, ul2_raw_length

        modes = mode_tokens(obj)
        ds = denoisers(obj)
        total = sum(d.weight for d in ds)
        rows = []
        for d in ds:
            raw = ul2_raw_length(seq, d, modes is not None)
            row = {"kind": d.kind, "share": round(d.weight / total, 6) if total else 0.0, "raw_length": raw}
            if d.kind != "S":
                noise, spans = span_counts(raw, d.rate, d.mean_span)
                row.update(mean_span=d.mean_span, rate=d.rate, noise_tokens=noise, spans=spans,
                           inputs_length=int(modes is not None) + raw - noise + spans, targets_length=noise + spans + 1)
            else:
                row.update(inputs_length=f"{int(modes is not None)} + P, P uniform in [1, {raw - 1}]", targets_length=f"{raw} - P + 1")
            if modes is not None:
                row["mode_token"] = modes[d.kind]
            rows.append(row)
        out["at_seq_len"] = seq
        out["derived"] = rows
        n = sentinel_count(recipe, obj)
        out["sentinels"] = {"count": n, "first": SENTINEL.format(0), "last": SENTINEL.format(n - 1)} if n else {"count": 0}
        out["attention"] = ("bidirectional over [mode] + inputs" if mode_tokens(obj) is not None else
                            "bidirectional over the inputs") + ", causal over the targets"
        out["loss"] = "the targets and their EOS"
    if obj.kind == "fim":
        out["loss"] = "every token, sentinels included (Bavarian et al. 2022)"
    if obj.kind == "distill" and teacher is not None:
        out["teacher_model"] = teacher
    return out


# --------------------------------------------------------------------------
# what the generated program needs (render context)
# --------------------------------------------------------------------------

_DOC = {
    "causal_lm": "causal language modelling",
    "prefix_lm": "prefix language modelling (bidirectional prefix, loss on the rest)",
    "span_corruption": "T5 span corruption, decoder-only (UL2's layout)",
    "ul2": "UL2's mixture of denoisers, decoder-only",
    "fim": "fill-in-the-middle and causal language modelling",
    "distill": "knowledge distillation from a teacher, mixed with causal language modelling",
}


def render_context(plan, base_dir: Path, out_dir: Path) -> dict:
    """Template values for the objective: flags, constants for train.py, the call sites' names."""
    from .render import Const, _blank, _source_path, const

    r = plan.recipe
    obj = r.objective
    kind = obj.kind
    phase_objs = [ph.objective for ph in r.phases if getattr(ph, "objective", None) is not None]
    distill = next((o for o in [obj, *phase_objs] if o.kind == "distill"), None)
    consts: list = []
    info = plan.objective or {}
    if kind in ("span_corruption", "ul2"):
        n = info.get("sentinels", {}).get("count", 0)
        seq = info.get("at_seq_len")
        if kind == "span_corruption":
            consts += [const("NOISE_DENSITY", obj.noise_density, "objective.noise_density, share of each example corrupted"),
                       const("MEAN_SPAN", obj.mean_span, "objective.mean_span, tokens per corrupted span on average")]
        else:
            consts.append(Const("# objective.denoisers: (paradigm, mean span, corruption rate, mixing weight), drawn per example"))
            consts.append(Const("DENOISERS = [\n" + "".join(
                f"    {lit_(d)},  # {share}\n" for d, share in zip(
                    [(d.kind, d.mean_span, d.rate, d.weight) for d in denoisers(obj)],
                    [f"{row['share']:.1%} of examples, {row['raw_length']} raw tokens at seq_len {seq}" for row in info["derived"]]))
                + "]"))
            modes = mode_tokens(obj)
            consts.append(const("MODE_TOKENS", modes, "objective.mode_tokens, the paradigm token that starts each row"
                                if modes else "objective.mode_tokens: null, no paradigm token"))
        consts.append(const("N_SENTINELS", n, f"<extra_id_0> ... <extra_id_{n - 1}>: the most spans an example makes at seq_len {seq}"))
    if kind == "fim":
        names = [s.name for s in plan.sources] or [s.name for s in r.data.sources]
        consts += [const("FIM_RATE", obj.rate, "objective.rate, share of documents transformed"),
                   const("FIM_ORDER", obj.order, {"psm": "objective.order: prefix, suffix, middle",
                                                  "spm": "objective.order: suffix, prefix, middle",
                                                  "both": "objective.order: PSM or SPM, half the time each"}[obj.order]),
                   const("FIM_SOURCES", list(obj.sources) or names, "objective.sources" if obj.sources else
                         "objective.sources empty: every source"),
                   const("FIM_TOKENS", [obj.prefix_token, obj.middle_token, obj.suffix_token],
                         "objective.prefix_token, middle_token, suffix_token")]
    if distill is not None:
        consts += [Const("# objective.teacher: the frozen teacher; path relative to this file"),
                   Const("TEACHER = " + lit_({"path": _source_path(distill.teacher, base_dir, out_dir),
                                              "kind": (plan.teacher or {}).get("kind", "malt")}))]
        if kind == "distill" and not plan.recipe.phases:  # phased programs read them from their phase (PHASES)
            consts += [const("DISTILL_WEIGHT", obj.weight, "objective.weight: weight × T² × KL + (1 - weight) × cross-entropy"),
                       const("TEMPERATURE", obj.temperature, "objective.temperature T")]
    if consts:
        consts = [_blank(), Const(f"# objective ({kind})"), *consts]
    batch = kind in ("prefix_lm", "span_corruption", "ul2", "fim")
    prefix = kind in PREFIX_OBJECTIVES
    return {
        "objective_kind": kind,
        "objective_doc": _DOC.get(kind, kind),
        "objective_constants": consts,
        "prefix_lm": prefix,
        "make_batch": batch,
        "distill": distill is not None,
        "uses_objectives": batch or distill is not None,
        "batch_fn": "make_batch" if batch else "dataset.batch",
        "batch_out": "x, y, prefix_len" if prefix else "x, y",
        "loss_note": "loss on the targets (y is -100 elsewhere)" if prefix else "next-token loss",
    }


def lit_(value) -> str:
    from .render import lit

    return lit(value)


# --------------------------------------------------------------------------
# the teacher's cost (estimate pass)
# --------------------------------------------------------------------------

def teacher_costs(plan) -> dict | None:
    """Distillation: the frozen teacher's parameters, forward FLOPs (per token and per phase) and memory; None without one.

    The teacher runs forward only: 2 × matmul params + 4 × n_layers × n_heads × head_dim × seq_len FLOPs per token
    (a third of PaLM's training count). Memory: its weights (teacher_weight_bytes), and the logits the
    distillation loss keeps whole (distill_logits_bytes, one micro-batch).
    Under fsdp / hsdp each device keeps its shard of the teacher's weights (the bf16 copies are per block, transient).
    """
    from .estimates import param_counts

    t = plan.teacher
    if t is None:
        return None
    head_dim = t["d_model"] // t["n_heads"]
    counts = param_counts(t["d_model"], t["n_layers"], t["n_heads"], t["n_kv_heads"], head_dim, t["d_ff"], t["vocab"],
                          t["tie_embeddings"], t["qkv_bias"])

    def per_token(seq: int) -> int:
        return 2 * counts["matmul_params"] + 4 * t["n_layers"] * t["n_heads"] * head_dim * seq

    distilling = [ph for ph in plan.phases if phase_objective(plan.recipe, ph.index).kind == "distill"]
    phase_flops = {ph.name: per_token(ph.seq_len) * ph.steps * ph.tokens_per_step for ph in distilling}
    weights = teacher_weight_bytes(plan)
    logits = max((distill_logits_bytes(plan, ph.micro_batch, ph.seq_len) for ph in distilling), default=0)
    return {"params": counts["params"], "flops_per_token": per_token(plan.recipe.train.seq_len), "phase_flops": phase_flops,
            "flops": sum(phase_flops.values()), "weights_bytes": weights, "logits_bytes": logits}


def teacher_weight_bytes(plan) -> int:
    """The frozen teacher's weights on one device (0 without a teacher): bf16 under pure_bf16; under bf16 autocast
    its matmul weights bf16 and the rest fp32 (teacher.matmuls_in: autocast would cast them every forward); fp32
    otherwise; sharded like the student under fsdp/hsdp (distributed.shard_frozen). Needs plan.precision and
    plan.parallelism decided."""
    t = plan.teacher
    if t is None:
        return 0
    from .estimates import param_counts

    counts = param_counts(t["d_model"], t["n_layers"], t["n_heads"], t["n_kv_heads"], t["d_model"] // t["n_heads"], t["d_ff"],
                          t["vocab"], t["tie_embeddings"], t["qkv_bias"])
    weights = counts["params"] * (2 if plan.master_weights == "bf16" else 4)
    if plan.precision == "bf16" and plan.master_weights != "bf16":
        linear = counts["params"] - counts["params_embedding"] - t["n_layers"] * 2 * t["d_model"] - t["d_model"]  # all but embedding, norms
        weights -= 2 * linear  # (an untied head is a matmul weight; a tied one is the embedding's)
    if plan.parallelism in ("fsdp", "hsdp"):
        weights //= (plan.world or 1) // (plan.recipe.target.nodes if plan.parallelism == "hsdp" else 1)
    return weights


# bytes per token and vocabulary entry a distillation step keeps (measured on tiny-distill with vocab 32,000, bf16
# autocast, tools of tests/test_memory_estimate.py): the teacher's logits (4: fp32 softmax kept for the KL's
# backward), the student's 13 (its logits in the compute dtype, the fp32 copy cross-entropy keeps, the two fp32
# log-softmax outputs and the gradient); was 4 + 8, which planned 0.79 of the measured peak
DISTILL_TEACHER_BYTES, DISTILL_STUDENT_BYTES = 4, 13


def distill_logits_bytes(plan, micro_batch: int, seq_len: int) -> int:
    """The logits a distillation micro-batch keeps whole: the teacher's, and the student's with what its two losses keep."""
    return micro_batch * seq_len * (plan.teacher["vocab"] * DISTILL_TEACHER_BYTES + plan.padded_vocab * DISTILL_STUDENT_BYTES)
