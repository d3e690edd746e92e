"""The recipe schema: pydantic v2 models, strict about unknown keys.

Every field here is documented in docs/recipes.md. Values in readable units
(``2M``, ``5%``, ``3e-4``) are parsed by the types from :mod:`.units`. Fields for
capabilities that are not built yet are rejected before this schema runs, with a
message naming what is missing (see ``NOT_BUILT`` in :mod:`.validate`).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, Strict, field_validator

from .units import parse_count, parse_float, parse_fraction


def _count(v):
    return parse_count(v)


def _fraction(v):
    return parse_fraction(v)


def _float(v):
    return parse_float(v)


def _steps_or_percent(v):
    """``5%`` (of the run's steps) stays the text ``'5%'``; ``200`` or ``2k`` becomes the step count 200."""
    if isinstance(v, str) and v.strip().endswith("%"):
        return f"{parse_fraction(v) * 100:g}%"
    if isinstance(v, float) and 0 < v < 1:
        return f"{v * 100:g}%"
    return parse_count(v)


def steps_of(value, total_steps: int) -> int:
    """Resolve a StepsOrPercent value against the run's length."""
    if isinstance(value, str):
        return round(parse_fraction(value) * total_steps)
    return value


def _auto_or_positive_int(v):
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"expected auto or a positive whole number, got {v!r}")
    return v


def _auto_or_fraction(v):
    return v if v == "auto" else parse_fraction(v)


def _onoff(v):
    # YAML 1.1 reads on/off/yes/no as booleans
    if v is True:
        return "on"
    if v is False:
        return "off"
    return v


Int = Annotated[int, Strict()]  # a whole number as written: not true/false, not 64.0, not "64"
Count = Annotated[int, BeforeValidator(_count)]
Fraction = Annotated[float, BeforeValidator(_fraction)]
Float = Annotated[float, BeforeValidator(_float)]
StepsOrPercent = Annotated[Union[int, str], PlainValidator(_steps_or_percent)]
AutoOrPositiveInt = Annotated[Union[str, int], PlainValidator(_auto_or_positive_int)]
AutoOrFraction = Annotated[Union[str, float], PlainValidator(_auto_or_fraction)]
OnOffAuto = Annotated[Literal["on", "off", "auto"], BeforeValidator(_onoff)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Section):
    family: Literal["llama"] = "llama"
    d_model: Int = Field(gt=0)
    n_layers: Int = Field(gt=0)
    n_heads: Int = Field(gt=0)
    n_kv_heads: Optional[Int] = Field(default=None, gt=0)   # None: equal to n_heads (no GQA)
    d_ff: Optional[Int] = Field(default=None, gt=0)         # None: Llama's rule, 8/3 * d_model rounded up to 256
    activation: Literal["swiglu"] = "swiglu"
    norm: Literal["rmsnorm"] = "rmsnorm"
    norm_eps: Float = 1e-5
    position: Literal["rope"] = "rope"
    rope_theta: Float = 10000.0
    qkv_bias: bool = False
    tie_embeddings: bool = True
    init_std: Float = 0.02
    vocab_size: Optional[Int] = Field(default=None, gt=0)   # None: the tokenizer's vocabulary
    pad_vocab_multiple: Int = Field(default=64, gt=0)


class TokenizerSpec(Section):
    kind: Literal["bpe", "unigram", "bytes", "file"] = "bpe"
    vocab_size: Optional[Int] = Field(default=None, gt=0)   # bpe, unigram: required; bytes: 256 + special tokens; file: read from the file
    train_on: list[str] = Field(default_factory=list)       # bpe, unigram: source names; empty = all sources
    max_chars: Count = 20_000_000                            # bpe, unigram: characters of training text
    path: Optional[str] = None                               # file: a tokenizer.json
    special_tokens: list[str] = Field(default_factory=lambda: ["<|endoftext|>"])
    add_special_tokens: list[str] = Field(default_factory=list)  # appended after the vocabulary of any kind (ChatML, UL2 modes, control tokens)


class FilterSpec(Section):
    min_chars: Optional[Count] = None                        # drop documents shorter than this (characters)
    max_chars: Optional[Count] = None                        # drop documents longer than this (characters)
    field: Optional[str] = None                              # a numeric record field (jsonl key, parquet column), e.g. a quality score
    min: Optional[Float] = None                              # keep documents whose field is at least min
    max: Optional[Float] = None                              # ... and at most max


class SourceSpec(Section):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)                          # builtin:NAME, a file, a folder or a glob
    weight: Float = 1.0
    text_field: str = "text"                                 # jsonl key or parquet column holding the text
    filter: Optional[FilterSpec] = None
    dedupe: bool = False                                     # drop exact duplicates (after whitespace normalisation)


class DataSpec(Section):
    sources: list[SourceSpec] = Field(min_length=1)
    validation: Fraction = 0.01
    packing: Literal["concat"] = "concat"


class ObjectiveSpec(Section):
    kind: Literal["causal_lm"] = "causal_lm"


class OptimizerSpec(Section):
    kind: Literal["adamw"] = "adamw"
    lr: Float
    betas: tuple[Float, Float] = (0.9, 0.95)
    eps: Float = 1e-8
    weight_decay: Float = 0.1
    grad_clip: Optional[Float] = 1.0                         # max global grad norm; null or 0 disables


DECAYS = ("cosine", "linear", "constant", "wsd", "inverse_sqrt", "infinite")
# which decays read which optional schedule field (a field set for a decay that ignores it is an error)
SCHEDULE_FIELD_USERS = {
    "min_lr_ratio": ("cosine", "linear", "wsd", "infinite"),
    "decay_share": ("wsd", "infinite"),
    "cooldown_share": ("infinite",),
    "constant_ratio": ("infinite",),
}


class ScheduleSpec(Section):
    warmup: StepsOrPercent = "5%"                            # steps (200, 2k) or a share of the run (5%)
    decay: Literal[DECAYS] = "cosine"
    min_lr_ratio: Fraction = 0.1                             # final lr = lr * min_lr_ratio
    decay_share: Fraction = 0.2                              # wsd, infinite: the final share of the run spent decaying
    cooldown_share: Fraction = 0.1                           # infinite: share of the run cooling down from lr to the plateau
    constant_ratio: Fraction = 0.25                          # infinite: the plateau's lr as a share of lr


class PhaseSchedule(Section):
    """A phase's own schedule (re-warming): unset fields are the recipe's schedule's."""

    warmup: Optional[StepsOrPercent] = None
    decay: Optional[Literal[DECAYS]] = None
    min_lr_ratio: Optional[Fraction] = None
    decay_share: Optional[Fraction] = None
    cooldown_share: Optional[Fraction] = None
    constant_ratio: Optional[Fraction] = None


class PhaseData(Section):
    weights: Optional[dict[str, Float]] = None               # the phase's mixture by source name; unnamed sources get 0
    sources: Optional[list[SourceSpec]] = None               # replaces the source list for this phase


class PhaseTrain(Section):
    seq_len: Optional[Int] = Field(default=None, gt=0)
    global_batch: Optional[Int] = Field(default=None, gt=0)
    micro_batch: Optional[AutoOrPositiveInt] = None


class PhaseModel(Section):
    rope_theta: Optional[Float] = None                       # context extension: a new rotary base


class PhaseOptimizer(Section):
    lr: Optional[Float] = None
    betas: Optional[tuple[Float, Float]] = None
    eps: Optional[Float] = None
    weight_decay: Optional[Float] = None
    grad_clip: Optional[Float] = None


class Growth(Section):
    method: Literal["stack"] = "stack"                       # G_stack: tile the layer stack (Du et al., 2024)
    factor: Int = Field(gt=1)                                # n_layers × factor


class PhaseSpec(Section):
    name: str = Field(min_length=1)
    share: Optional[Fraction] = None                         # of train.tokens (or train.steps)
    tokens: Optional[Count] = None
    steps: Optional[Count] = None
    data: Optional[PhaseData] = None
    train: Optional[PhaseTrain] = None
    model: Optional[PhaseModel] = None
    optimizer: Optional[PhaseOptimizer] = None
    schedule: Optional[PhaseSchedule] = None                 # present: the phase runs its own schedule
    growth: Optional[Growth] = None                          # grow the model at the phase's first step (fresh optimizer)


class TrainSpec(Section):
    seq_len: Int = Field(gt=0)
    global_batch: Int = Field(gt=0)                          # sequences per optimizer step
    micro_batch: AutoOrPositiveInt = "auto"
    tokens: Optional[Count] = None
    steps: Optional[Count] = None
    eval_every: Count = 100                                  # steps; 0 disables
    eval_batches: Int = Field(default=8, gt=0)               # micro-batches per evaluation
    checkpoint_every: Count = 200                            # steps; 0 = only the final checkpoint
    keep_checkpoints: Int = Field(default=2, gt=0)
    log_every: Count = 10
    sample_tokens: Count = 64                                # tokens in the sample printed at the end; 0 disables
    sample_prompt: str = "def "


class TargetSpec(Section):
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    devices: Int = Field(default=1, gt=0)                    # processes, one per device (torchrun); on cpu, gloo processes
    parallelism: Literal["auto", "single", "ddp", "fsdp"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: OnOffAuto = "auto"
    chip: Literal["auto", "cpu", "a100-40gb", "a100-80gb", "h100", "h200"] = "auto"  # for the time estimate
    mfu: AutoOrFraction = "auto"         # model FLOPs utilisation assumed by the time estimate


def _init_from(v):
    return {"path": v} if isinstance(v, str) else v


class InitFrom(Section):
    path: str = Field(min_length=1)                          # a malt run directory or a Hugging Face model directory
    optimizer: Literal["fresh", "carry"] = "fresh"           # carry: the run's AdamW moments too (malt run directories only)


class Recipe(Section):
    name: str = Field(min_length=1)
    seed: Int = 1337
    model: ModelSpec
    tokenizer: TokenizerSpec
    data: DataSpec
    objective: ObjectiveSpec = ObjectiveSpec()
    optimizer: OptimizerSpec
    schedule: ScheduleSpec = ScheduleSpec()
    train: TrainSpec
    target: TargetSpec = TargetSpec()
    phases: list[PhaseSpec] = Field(default_factory=list)
    init_from: Annotated[Optional[InitFrom], BeforeValidator(_init_from)] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name must not be blank")
        return v
