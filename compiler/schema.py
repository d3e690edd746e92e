"""The recipe schema: pydantic v2 models, strict about unknown keys.

Every field here is documented in docs/recipes.md. Values in readable units
(``2M``, ``5%``, ``3e-4``) are parsed by the types from :mod:`.units`. Fields for
capabilities that are not built yet are rejected before this schema runs, with a
message naming what is missing (see ``NOT_BUILT`` in :mod:`.validate`).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, Strict, field_validator, model_validator

from .units import parse_bytes, parse_count, parse_float, parse_fraction


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
Bytes = Annotated[int, BeforeValidator(lambda v: parse_bytes(v))]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# model fields whose default depends on model.family (fields not listed default as written below)
FAMILY_DEFAULTS = {
    "bert": {"activation": "gelu", "norm": "layernorm", "norm_eps": 1e-12, "position": "learned", "norm_position": "post",
             "qkv_bias": True},
}


def _family_defaults(v):
    """Fill the defaults of the family's architecture (BERT: GELU, LayerNorm, learned positions, post-norm) before validation."""
    if isinstance(v, dict) and isinstance(v.get("family"), str) and v["family"] in FAMILY_DEFAULTS:
        return {**FAMILY_DEFAULTS[v["family"]], **v}
    return v


class ModelSpec(Section):
    family: Literal["llama", "bert"] = "llama"               # llama: decoder-only; bert: bidirectional encoder (objective mlm or rtd)
    d_model: Int = Field(gt=0)
    n_layers: Int = Field(gt=0)
    n_heads: Int = Field(gt=0)
    n_kv_heads: Optional[Int] = Field(default=None, gt=0)   # None: equal to n_heads (no GQA)
    d_ff: Optional[Int] = Field(default=None, gt=0)         # None: llama 8/3 * d_model rounded up to 256; bert 4 * d_model
    activation: Literal["swiglu", "gelu", "geglu"] = "swiglu"  # llama: swiglu; bert: gelu (BERT) or geglu (MosaicBERT)
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"          # llama: rmsnorm; bert: layernorm
    norm_eps: Float = 1e-5                                   # bert default 1e-12 (BERT's)
    norm_position: Literal["pre", "post"] = "pre"            # llama: pre; bert: post (BERT, MosaicBERT) or pre
    position: Literal["rope", "learned", "alibi"] = "rope"   # llama: rope; bert: learned (BERT) or alibi (MosaicBERT)
    unpad: bool = False                                      # bert: drop padding positions before the dense layers (MosaicBERT)
    rope_theta: Float = 10000.0
    sliding_window: Optional[Int] = Field(default=None, gt=0)  # llama: attend to the last W positions, itself included (Mistral); None: all earlier
    qkv_bias: bool = False                                   # bert: true (biases on every linear layer, as BERT)
    tie_embeddings: bool = True
    init_std: Float = 0.02
    vocab_size: Optional[Int] = Field(default=None, gt=0)   # None: the tokenizer's vocabulary
    pad_vocab_multiple: Int = Field(default=64, gt=0)

    _defaults_of_family = model_validator(mode="before")(_family_defaults)


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


def _template(v):
    """``metadata: "URL: {domain}\n\n"`` is short for ``metadata: {template: "URL: {domain}\n\n"}``."""
    return {"template": v} if isinstance(v, str) else v


class MetadataSpec(Section):
    """Metadata conditioning (MeCo, Gao et al. 2025): a prefix filled from the record, without loss."""

    template: str = Field(min_length=1)                      # such as "URL: {domain}\n\n"; {domain}: host of url_field; {FIELD}: a record field
    url_field: str = Field(default="url", min_length=1)      # the record field {domain} is read from
    missing: Literal["keep", "drop"] = "keep"                # a record without the fields: kept without a prefix, or dropped


class ControlSpec(Section):
    """Control tokens (conditional training, Korbak et al. 2023): a good or bad token by a score threshold."""

    field: str = Field(min_length=1)                         # numeric record field (a list of numbers, one per sentence, with unit: sentence)
    threshold: Float                                         # good when the score is on the better side of it (equal counts as good)
    better: Literal["higher", "lower"] = "higher"            # which scores are good
    good: str = Field(default="<|good|>", min_length=1)      # special tokens, added to the tokenizer
    bad: str = Field(default="<|bad|>", min_length=1)
    unprefixed: Fraction = 0.0                               # share of units left without a token
    unit: Literal["document", "sentence"] = "document"       # a token before each document, or before each sentence
    loss: bool = False                                       # false: the tokens are inputs only (their targets are -100)


class SourceSpec(Section):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)                          # builtin:NAME, a file, a folder or a glob
    weight: Float = 1.0
    text_field: str = "text"                                 # jsonl key or parquet column holding the text
    filter: Optional[FilterSpec] = None
    dedupe: bool = False                                     # drop exact duplicates (after whitespace normalisation)
    validation_path: Optional[str] = None                    # the source's validation split from these files instead of its tail
    metadata: Annotated[Optional[MetadataSpec], BeforeValidator(_template)] = None  # MeCo prefix (see MetadataSpec)
    control: Optional[ControlSpec] = None                    # control tokens (see ControlSpec)


class DataSpec(Section):
    sources: list[SourceSpec] = Field(min_length=1)
    validation: Fraction = 0.01
    packing: Literal["concat", "document", "best_fit"] = "concat"  # see docs/recipes.md, Packing


class CausalLM(Section):
    """Next-token prediction over every position."""

    kind: Literal["causal_lm"] = "causal_lm"


class PrefixLM(Section):
    """Prefix LM (T5 §3.2.1, UL2's S-denoiser on its own): each row is split at a random point, uniform in
    [1, seq_len - 1]; attention is bidirectional over the prefix, and the loss covers the rest only."""

    kind: Literal["prefix_lm"]


class SpanCorruption(Section):
    """T5 span corruption on the decoder-only model, as UL2 lays it out: inputs with sentinels, then targets."""

    kind: Literal["span_corruption"]
    noise_density: Fraction = 0.15                           # share of each example's tokens that are corrupted
    mean_span: Float = 3.0                                   # mean length of a corrupted span (tokens)


def _ul2_default_denoisers():
    # Tay et al. 2023 (UL2), §3.1.2: R μ 3 and 8 at 15%; X μ 3 and 8 at 50%, μ 64 at 15% and 50%; S (prefix LM)
    return [DenoiserSpec(kind="R", mean_span=3, rate=0.15), DenoiserSpec(kind="R", mean_span=8, rate=0.15),
            DenoiserSpec(kind="X", mean_span=3, rate=0.5), DenoiserSpec(kind="X", mean_span=8, rate=0.5),
            DenoiserSpec(kind="X", mean_span=64, rate=0.15), DenoiserSpec(kind="X", mean_span=64, rate=0.5),
            DenoiserSpec(kind="S")]


class DenoiserSpec(Section):
    kind: Literal["R", "X", "S"]                             # R regular, X extreme span corruption; S sequential (prefix LM)
    mean_span: Optional[Float] = None                        # R, X: mean span length (tokens)
    rate: Optional[Fraction] = None                          # R, X: corruption rate
    weight: Float = 1.0                                      # mixing weight (examples are drawn in proportion)


class UL2(Section):
    """UL2's mixture of denoisers (Tay et al. 2023) on the decoder-only model."""

    kind: Literal["ul2"]
    denoisers: list[DenoiserSpec] = Field(default_factory=_ul2_default_denoisers, min_length=1)
    mode_tokens: Optional[dict[str, str]] = Field(default_factory=lambda: {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"})  # null: none


class FIM(Section):
    """Fill-in-the-middle (Bavarian et al. 2022): next-token prediction on documents reordered around sentinels."""

    kind: Literal["fim"]
    rate: Fraction = 0.5                                     # share of documents transformed
    order: Literal["psm", "spm", "both"] = "psm"             # prefix-suffix-middle, suffix-prefix-middle, or each half the time
    sources: list[str] = Field(default_factory=list)         # the sources whose documents are transformed; empty = all
    prefix_token: str = "<fim_prefix>"
    middle_token: str = "<fim_middle>"
    suffix_token: str = "<fim_suffix>"


class Distill(Section):
    """Knowledge distillation (Hinton et al. 2015): KL to a teacher's softened distribution, mixed with next-token loss."""

    kind: Literal["distill"]
    teacher: str = Field(min_length=1)                       # a malt run directory or a Hugging Face Llama/Mistral/Qwen2 directory
    weight: Fraction = 0.5                                   # loss = weight × T² × KL + (1 - weight) × cross-entropy
    temperature: Float = 1.0                                 # T: both distributions are softmax(logits / T)


class MLM(Section):
    """Masked language modelling (BERT; MosaicBERT masks 30%): encoders only (model.family: bert)."""

    kind: Literal["mlm"]
    mask_rate: Fraction = 0.15                               # share of tokens selected for prediction (BERT 15%, MosaicBERT 30%)
    split: tuple[Fraction, Fraction, Fraction] = (0.8, 0.1, 0.1)  # selected tokens: [MASK], random token, unchanged (BERT's 80/10/10)
    mask_token: str = "[MASK]"                               # added to the tokenizer when it lacks it


class RTD(Section):
    """Replaced token detection (ELECTRA, Clark et al. 2020): an MLM generator a fraction of the width corrupts the
    input; the discriminator (the model section) predicts per token whether it was replaced. Encoders only."""

    kind: Literal["rtd"]
    mask_rate: Fraction = 0.15                               # share of tokens the generator predicts and replaces
    split: tuple[Fraction, Fraction, Fraction] = (0.85, 0.0, 0.15)  # masked positions: [MASK], random, unchanged (ELECTRA's code)
    generator_width: Fraction = 0.25                         # generator width (heads, d_model, d_ff) as a share of the discriminator's
    discriminator_weight: Float = 50.0                       # loss = generator MLM + weight × discriminator BCE (ELECTRA's λ)
    mask_token: str = "[MASK]"                               # added to the tokenizer when it lacks it


OBJECTIVE_KINDS = ("causal_lm", "prefix_lm", "span_corruption", "ul2", "fim", "distill", "mlm", "rtd")


def _objective_kind_default(v):
    # `objective: {}` or a section without kind: next-token prediction, as when the section is absent
    if isinstance(v, dict) and "kind" not in v:
        return {**v, "kind": "causal_lm"}
    return v


ObjectiveSpec = Annotated[Union[CausalLM, PrefixLM, SpanCorruption, UL2, FIM, Distill, MLM, RTD],
                          Field(discriminator="kind"), BeforeValidator(_objective_kind_default)]


class OptimizerSpec(Section):
    kind: Literal["adamw", "galore"] = "adamw"               # galore: AdamW on low-rank projected gradients (Zhao et al. 2024)
    lr: Float
    betas: tuple[Float, Float] = (0.9, 0.95)
    eps: Float = 1e-8
    weight_decay: Float = 0.1
    grad_clip: Optional[Float] = 1.0                         # max global grad norm; null or 0 disables
    rank: Optional[Int] = None                               # galore: rank of the projection (default d_model / 4)
    update_every: Optional[Int] = None                       # galore: steps between projector updates, the paper's T (default 200)
    scale: Optional[Float] = None                            # galore: α, scale of the projected-back update (default 0.25)


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


def _phase_metadata(v):
    # YAML 1.1 reads on/off as booleans; null (as in `data: {metadata: null}`) is off too
    return "off" if v is None or v is False else "on" if v is True else v


class PhaseData(Section):
    weights: Optional[dict[str, Float]] = None               # the phase's mixture by source name; unnamed sources get 0
    sources: Optional[list[SourceSpec]] = None               # replaces the source list for this phase
    metadata: Annotated[Literal["on", "off"], BeforeValidator(_phase_metadata)] = "on"  # off: the sources without their metadata


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
    objective: Optional[ObjectiveSpec] = None                # the phase's own objective (causal_lm and distill switch)


class TrainSpec(Section):
    seq_len: Int = Field(gt=0)
    global_batch: Int = Field(gt=0)                          # sequences per optimizer step
    micro_batch: AutoOrPositiveInt = "auto"
    tokens: Optional[Count] = None
    steps: Optional[Count] = None
    eval_every: Count = 100                                  # steps; 0 disables
    eval_batches: Int = Field(default=8, gt=0)               # global batches per evaluation (the same set on any devices)
    eval_per_source: bool = False                            # also each source's own validation loss (eval_batches each)
    checkpoint_every: Count = 200                            # steps; 0 = only the final checkpoint
    keep_checkpoints: Int = Field(default=2, gt=0)
    log_every: Count = 10
    sample_tokens: Count = 64                                # tokens in the sample printed at the end; 0 disables
    sample_prompt: str = "def "
    checkpoint_format: Literal["auto", "full", "sharded"] = "auto"  # auto: sharded (torch.distributed.checkpoint) with FSDP
    checkpoint_writes: Literal["auto", "background", "foreground"] = "auto"  # background: a thread writes while training goes on


class TargetSpec(Section):
    accelerator: Literal["auto", "cpu", "cuda", "tpu"] = "auto"  # tpu: torch-xla (malt's tpu extra), never chosen by auto
    devices: Int = Field(default=1, gt=0)                    # processes, one per device (torchrun); on cpu, gloo processes
    parallelism: Literal["auto", "single", "ddp", "fsdp", "hsdp"] = "auto"  # hsdp: FSDP2 within a node, replicas across nodes
    precision: Literal["auto", "fp32", "bf16", "pure_bf16"] = "auto"  # bf16: autocast, fp32 master weights; pure_bf16: bf16 weights and state
    compile: OnOffAuto = "auto"
    chip: Literal["auto", "cpu", "a100-40gb", "a100-80gb", "h100", "h200", "tpu-v4", "tpu-v5e", "tpu-v5p"] = "auto"  # for the estimates
    mfu: AutoOrFraction = "auto"         # model FLOPs utilisation assumed by the time estimate
    nodes: Int = Field(default=1, gt=0)                      # machines; devices is per node (torchrun --nnodes, Slurm --nodes)
    memory_per_device: Optional[Bytes] = None                # None: the chip's (table of known accelerators, or this host's RAM)
    activation_checkpointing: Literal["auto", "none", "selective", "full"] = "auto"  # auto: only when needed to fit


def _init_from(v):
    return {"path": v} if isinstance(v, str) else v


class InitFrom(Section):
    path: str = Field(min_length=1)                          # a malt run directory or a Hugging Face model directory
    optimizer: Literal["fresh", "carry"] = "fresh"           # carry: the run's AdamW moments too (malt run directories only)


class Recipe(Section):
    name: str = Field(min_length=1)
    seed: Int = Field(default=1337, ge=0, lt=2**63)  # torch.manual_seed takes any int64; numpy's generators need >= 0
    model: ModelSpec
    tokenizer: TokenizerSpec
    data: DataSpec
    objective: ObjectiveSpec = CausalLM()
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
