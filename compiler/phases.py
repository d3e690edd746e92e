"""Phases: the run as an ordered list of step ranges, each with its own settings.

A recipe without ``phases:`` is one phase named ``main``. ``resolve`` turns the
recipe into :class:`PhaseRange` objects (step ranges, batch shape, mixture
weights over the union of all sources, optimizer settings, schedule) and
collects the problems it finds; ``malt check`` reports those, the passes use
the ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .conditioning import phase_metadata
from .units import divisors
from .schema import SCHEDULE_FIELD_USERS, PhaseSpec, Recipe, ScheduleSpec, SourceSpec, steps_of


@dataclass(frozen=True)
class Schedule:
    """A schedule resolved to step counts over a range of ``total`` steps (local step t = 0 .. total-1)."""

    decay: str
    lr: float
    min_lr: float
    total: int
    warmup: int
    decay_start: int = 0      # wsd, infinite: first step of the final decay
    cooldown_end: int = 0     # infinite: end of the cooldown to the plateau
    plateau_lr: float = 0.0   # infinite

    def at(self, t: int) -> float:
        """The closed form, as the generated program writes it (tests compare the two)."""
        import math

        if t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        d = self.decay
        if d == "cosine":
            p = (t - self.warmup) / max(1, self.total - self.warmup)
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
        if d == "linear":
            p = (t - self.warmup) / max(1, self.total - self.warmup)
            return self.lr - (self.lr - self.min_lr) * p
        if d == "constant":
            return self.lr
        if d == "wsd":
            if t < self.decay_start:
                return self.lr
            p = (t - self.decay_start) / max(1, self.total - self.decay_start)
            return self.lr - (self.lr - self.min_lr) * p
        if d == "inverse_sqrt":
            return self.lr * math.sqrt(max(1, self.warmup) / max(t + 1, self.warmup, 1))
        # infinite
        if t < self.cooldown_end:
            p = (t - self.warmup) / max(1, self.cooldown_end - self.warmup)
            return self.plateau_lr + (self.lr - self.plateau_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
        if t < self.decay_start:
            return self.plateau_lr
        p = (t - self.decay_start) / max(1, self.total - self.decay_start)
        return self.plateau_lr * (self.min_lr / self.plateau_lr) ** p  # exponential, as Ibrahim et al. 2024


def tidy(x: float) -> float:
    """A derived float without binary noise: 3e-3 × 0.1 is 0.0003, not 0.00030000000000000003."""
    return float(f"{x:.12g}")


def resolve_schedule(spec: ScheduleSpec, lr: float, total: int) -> Schedule:
    warmup = steps_of(spec.warmup, total)
    min_lr = tidy(lr * spec.min_lr_ratio)
    decay_start = warmup
    cooldown_end = 0
    plateau = 0.0
    if spec.decay in ("wsd", "infinite"):
        decay_start = total - round(spec.decay_share * total)
    if spec.decay == "infinite":
        cooldown_end = warmup + round(spec.cooldown_share * total)
        plateau = tidy(lr * spec.constant_ratio)
    return Schedule(spec.decay, lr, min_lr, total, warmup, decay_start, cooldown_end, plateau)


def final_lr_problems(spec: ScheduleSpec, where: tuple) -> list:
    """The infinite schedule anneals exponentially to its final lr, so that lr must be above 0."""
    if spec.decay == "infinite" and spec.min_lr_ratio <= 0:
        return [(where + ("min_lr_ratio",), "the infinite schedule anneals exponentially to the final lr, which must be above 0",
                 "use a small share such as 1%")]
    return []


def schedule_overlap_problems(spec: ScheduleSpec, total: int, where: tuple) -> list:
    """wsd and infinite: the warmup (and infinite's cooldown) must end before the final decay starts, or the
    learning rate jumps where one stage cuts the other short."""
    if spec.decay not in ("wsd", "infinite") or not 0 < spec.decay_share < 1:
        return []  # an out-of-range decay_share is a problem of its own
    if spec.decay == "infinite" and spec.cooldown_share + spec.decay_share >= 1:
        return []  # reported as leaving no plateau
    s = resolve_schedule(spec, 1.0, total)
    end, what = (s.cooldown_end, "warmup and cooldown end") if spec.decay == "infinite" else (s.warmup, "warmup ends")
    if end <= s.decay_start:
        return []
    field = "cooldown_share" if spec.decay == "infinite" and s.warmup <= s.decay_start else "warmup"
    message = (f"the {what} at step {end}, after the {spec.decay} decay starts at step {s.decay_start} "
               f"({spec.decay_share:.0%} of {total} steps): the learning rate would jump")
    return [(where + (field,), message,
             "shorten the warmup" + (" or cooldown_share" if spec.decay == "infinite" else "") + " or lower decay_share")]


@dataclass(frozen=True)
class PhaseRange:
    index: int
    name: str
    start: int
    end: int
    seq_len: int
    global_batch: int
    micro_batch: object            # "auto" or an int, as the recipe says
    weights: tuple                 # over the union of sources, in their order
    rope_theta: float
    lr: float
    betas: tuple
    eps: float
    weight_decay: float
    grad_clip: float | None
    own_schedule: ScheduleSpec | None   # None: the recipe's schedule over the whole run
    changes: tuple = ()
    n_layers: int = 0              # the model's depth in this phase (growth multiplies it)
    grow_factor: int = 0           # > 0: the phase starts by stacking the layers this many times
    grad_accum: int = 0            # set by the batch_split pass, with micro_batch
    schedule: Schedule | None = None   # own_schedule resolved over the phase's steps (run_length pass)
    metadata: bool = True          # data.metadata: the sources with their metadata prefixes (off: without)

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


@dataclass
class Resolved:
    phases: list[PhaseRange] = field(default_factory=list)
    sources: list[SourceSpec] = field(default_factory=list)   # union, base sources first
    problems: list[tuple] = field(default_factory=list)       # (path tuple, message, hint)


def _merged_schedule(base: ScheduleSpec, own) -> ScheduleSpec:
    update = {k: getattr(own, k) for k in own.model_fields_set if getattr(own, k) is not None}
    return base.model_copy(update=update)


def schedule_field_problems(spec, decay: str, path: tuple) -> list[tuple]:
    out = []
    for name, users in SCHEDULE_FIELD_USERS.items():
        if name in spec.model_fields_set and getattr(spec, name) is not None and decay not in users:
            out.append((path + (name,), f"{name} is not used by decay {decay!r} (it is read by {', '.join(users)})",
                        f"remove {name}, or choose a decay that uses it"))
    return out


def resolve(r: Recipe) -> Resolved:
    out = Resolved()
    tr, opt = r.train, r.optimizer
    out.sources = list(r.data.sources)
    specs: list[PhaseSpec] = list(r.phases) or [PhaseSpec(name="main", share=1.0)]
    problems = out.problems

    # the union of sources, checking that a name means one source everywhere
    for i, ph in enumerate(specs):
        for j, s in enumerate((ph.data.sources if ph.data and ph.data.sources else [])):
            known = next((k for k in out.sources if k.name == s.name), None)
            if known is None:
                out.sources.append(s)
            elif (known.path, known.text_field, known.metadata, known.control) != (s.path, s.text_field, s.metadata, s.control):
                problems.append((("phases", i, "data", "sources", j), f"source {s.name!r} names another path, text_field, metadata or control than before",
                                 "give a different source a different name"))
    names = [s.name for s in out.sources]

    seen = set()
    amounts = []
    for i, ph in enumerate(specs):
        where = ("phases", i)
        if ph.name in seen:
            problems.append((where + ("name",), f"another phase is already named {ph.name!r}", "give each phase a unique name"))
        seen.add(ph.name)
        given = [k for k in ("share", "tokens", "steps") if getattr(ph, k) is not None]
        if len(given) != 1:
            problems.append((where, f"phase {ph.name!r} needs exactly one of share, tokens or steps" + (f" (has {', '.join(given)})" if given else ""),
                             "for example `share: 90%`"))
            amounts.append(None)
        else:
            amounts.append((given[0], getattr(ph, given[0])))
        if ph.optimizer and ph.optimizer.lr is not None and ph.schedule is None:
            problems.append((where + ("optimizer", "lr"), "a phase that changes the learning rate needs its own schedule",
                             "add `schedule: {warmup: 1%, decay: cosine}` to the phase (re-warming), or remove optimizer.lr"))
    # the checks below go on past these problems (one `malt check` shows them all); a phase without a valid length
    # (amounts None) is left out of the checks of lengths and coverage

    # step ranges
    start = 0
    steps_list = []
    for ph, amount in zip(specs, amounts):
        seq = (ph.train.seq_len if ph.train and ph.train.seq_len else None) or tr.seq_len
        gb = (ph.train.global_batch if ph.train and ph.train.global_batch else None) or tr.global_batch
        tps = seq * gb
        kind, value = amount or (None, None)
        if amount is None:
            n = None
        elif kind == "steps":
            n = value
        elif kind == "tokens":
            n = value // tps
        elif tr.tokens is not None:
            n = int(value * tr.tokens) // tps
        elif tr.steps is not None:
            n = round(value * tr.steps)
        else:
            n = 0
        steps_list.append((n, seq, gb, tps))
    i_bad = [i for i, (n, *_rest) in enumerate(steps_list) if n is not None and n <= 0]
    for i in i_bad:
        problems.append((("phases", i), f"phase {specs[i].name!r} is shorter than one step",
                         "give it a larger share, or more tokens or steps"))
    if r.phases and None not in amounts:
        if tr.tokens is None and tr.steps is None and any(k == "share" for k, _ in amounts):
            problems.append((("phases",), "phases with a share need train.tokens or train.steps to take it of",
                             "set train.tokens, or give each phase tokens or steps"))
        shares = [v for k, v in amounts if k == "share"]
        if shares and len(shares) == len(amounts) and abs(sum(shares) - 1) > 1e-6:
            problems.append((("phases",), f"the phases' shares add up to {sum(shares) * 100:g}%, not 100%",
                             "phases must cover the run: adjust the shares"))
        elif tr.tokens is not None and not (shares and len(shares) == len(amounts)):
            covered = sum(n * tps for n, _s, _g, tps in steps_list)
            slack = sum(tps for *_x, tps in steps_list)
            if abs(covered - tr.tokens) > slack:
                problems.append((("phases",), f"the phases cover {covered:,} tokens but train.tokens is {tr.tokens:,}",
                                 "make the phases add up to the run, or remove train.tokens and let them define it"))
        elif tr.steps is not None and not (shares and len(shares) == len(amounts)):
            covered = sum(n for n, *_x in steps_list)
            if abs(covered - tr.steps) > len(steps_list):
                problems.append((("phases",), f"the phases cover {covered:,} steps but train.steps is {tr.steps:,}",
                                 "make the phases add up to the run, or remove train.steps and let them define it"))

    base_weights = {s.name: s.weight for s in r.data.sources}
    n_layers = r.model.n_layers
    for i, (ph, (n, seq, gb, tps)) in enumerate(zip(specs, steps_list)):
        where = ("phases", i)
        changes = []
        grow = 0
        if ph.growth is not None:
            if i == 0:
                problems.append((where + ("growth",), "the first phase has no smaller model to grow from",
                                 "train the small model in a phase before the one that grows it"))
            grow = ph.growth.factor
            changes.append(f"growth (stack × {grow}: n_layers {n_layers} → {n_layers * grow})")
            n_layers *= grow
        weights = dict.fromkeys(names, 0.0)
        weights.update(base_weights)
        if ph.data and ph.data.sources:
            weights = dict.fromkeys(names, 0.0)
            weights.update({s.name: s.weight for s in ph.data.sources})
            changes.append("data.sources")
        if ph.data and ph.data.weights is not None:
            for name, w in ph.data.weights.items():
                if name not in names:
                    from .diagnostics import did_you_mean

                    guess = did_you_mean(name, names)
                    problems.append((where + ("data", "weights", name), f"no data source is named {name!r}",
                                     f"did you mean {guess!r}?" if guess else f"sources are: {', '.join(names)}"))
                elif w < 0:
                    problems.append((where + ("data", "weights", name), f"weight must not be negative, got {w}", "use 0 to leave the source out"))
            weights = {k: float(ph.data.weights.get(k, 0.0)) for k in names}
            changes.append("data.weights")
        if sum(weights.values()) <= 0:
            problems.append((where + ("data",), f"phase {ph.name!r} gives every source weight 0", "give at least one source a positive weight"))
        mb = (ph.train.micro_batch if ph.train and ph.train.micro_batch is not None else None) or tr.micro_batch
        if mb != "auto" and gb % mb:
            problems.append((where + ("train", "micro_batch") if ph.train and ph.train.micro_batch else where + ("train",),
                             f"global_batch ({gb}) of phase {ph.name!r} is not divisible by micro_batch ({mb})",
                             f"choose micro_batch from {divisors(gb)[:12]} or use auto"))
        if getattr(ph, "objective", None) is not None:
            changes.append(f"objective ({ph.objective.kind})")
        metadata = phase_metadata(ph)  # data.metadata off: the sources without their metadata prefixes
        if not metadata:
            changes.append("data.metadata off")
        if ph.train:
            changes += [f"train.{k}" for k in ("seq_len", "global_batch", "micro_batch") if getattr(ph.train, k) is not None]
        rope = (ph.model.rope_theta if ph.model and ph.model.rope_theta is not None else None) or r.model.rope_theta
        if ph.model and ph.model.rope_theta is not None:
            changes.append("model.rope_theta")
            if rope <= 0:
                problems.append((where + ("model", "rope_theta"), f"must be positive, got {rope}", "a usual value is 10000 or 500000"))
        po = ph.optimizer
        pick = (lambda k: getattr(po, k) if po is not None and getattr(po, k) is not None else getattr(opt, k))
        if po:
            changes += [f"optimizer.{k}" for k in ("lr", "betas", "eps", "weight_decay", "grad_clip") if getattr(po, k) is not None]
        own = None
        if ph.schedule is not None:
            own = _merged_schedule(r.schedule, ph.schedule)
            changes.append("schedule")
            problems += schedule_field_problems(ph.schedule, own.decay, where + ("schedule",))
            problems += final_lr_problems(own, where + ("schedule",))
            if n:  # (a phase without a valid length, or shorter than a step, is reported as such; its warmup waits for it)
                warm = steps_of(own.warmup, n)
                if warm >= n:
                    problems.append((where + ("schedule", "warmup"), f"warmup ({warm} steps) is not shorter than the phase ({n} steps)",
                                     "use a share such as 5%"))
                else:
                    problems += schedule_overlap_problems(own, n, where + ("schedule",))
        n = n or 0  # with problems above, the ranges are only a sketch (a plan is made only without problems)
        out.phases.append(PhaseRange(i, ph.name, start, start + n, seq, gb, mb, tuple(weights[k] for k in names), rope,
                                     pick("lr"), tuple(pick("betas")), pick("eps"), pick("weight_decay"), pick("grad_clip"),
                                     own, tuple(changes), n_layers, grow, metadata=metadata))
        start += n
    return out


def lr_at(plan, step: int) -> float:
    """The learning rate of the plan at optimizer step ``step``, as the generated lr_at computes it."""
    for ph in plan.phases:
        if step < ph.end:
            return ph.schedule.at(step - ph.start) if ph.schedule is not None else plan.schedule.at(step)
    raise ValueError(f"step {step} is past the run's {plan.steps} steps")
