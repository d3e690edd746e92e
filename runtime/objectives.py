"""Batch construction for pre-training objectives beyond next-token prediction.

Pure functions on int64 token tensors that a generated program calls between
``Dataset.batch`` and the model: they turn windows of packed tokens into the
inputs, labels and attention masks of each objective. Nothing here holds state;
every random choice comes from a ``torch.Generator`` (or an int seed) passed in,
so a batch is a pure function of its tokens and its generators.

=====================  =============================================  ===========================
objective              functions                                      paper
=====================  =============================================  ===========================
masked LM (BERT)       :func:`mlm_batch`                              Devlin et al. 2019; Portes et al. 2023 (MosaicBERT)
span corruption (T5)   :func:`noise_mask`, :func:`span_corruption`,   Raffel et al. 2020 (T5)
                       :func:`t5_lengths`
prefix LM              :func:`prefix_lm_mask`,                        Raffel et al. 2020; Tay et al. 2023 (UL2)
                       :func:`packed_prefix_lm_mask`,
                       :func:`prefix_lm_labels`, :func:`random_prefix_len`
UL2 mixture            :class:`Denoiser`, :data:`UL2_DENOISERS`,      Tay et al. 2023 (UL2)
                       :func:`ul2_batch`
fill-in-the-middle     :func:`fim`, :func:`fim_window`                Bavarian et al. 2022
replaced token det.    :func:`rtd_inputs`, :func:`rtd_targets`,       Clark et al. 2020 (ELECTRA)
                       :func:`sample_replacements`
distillation           :func:`distill_kl`                             Hinton et al. 2015
=====================  =============================================  ===========================

Conventions
-----------
- Token tensors are int64 on the CPU, as ``Dataset.batch`` returns them; move the
  results to the accelerator afterwards. (:func:`sample_replacements`,
  :func:`rtd_*` and :func:`distill_kl` also work on device tensors.)
- ``labels`` use -100 where no loss applies (``F.cross_entropy``'s ``ignore_index``).
  Two label layouts occur, and each function says which it returns:
  *aligned* (``labels[t]`` is the answer for token ``t`` itself: MLM, RTD) and
  *shifted* (``labels[t]`` is the token that position ``t`` predicts, i.e.
  ``input_ids[t + 1]``, like the ``y`` of ``Dataset.batch``: prefix LM, UL2).
- Attention masks are boolean, True = may attend, shaped (T, T) or (B, 1, T, T):
  what ``F.scaled_dot_product_attention(attn_mask=...)`` takes. Every row has
  at least one True (its diagonal), so no softmax row is all ``-inf``.
- ``generator`` is a ``torch.Generator``, an int seed (a fresh generator seeded
  with it), None (torch's global generator), or, for the batch functions, a
  list with one generator per row. A list keeps ``Dataset``'s promise that
  sequence ``i`` of a step is the same whatever the micro-batch split: build it
  with :func:`row_generators` ``(seed, step, start, count)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE",
    "UL2_DENOISERS",
    "UL2_MODE_TOKENS",
    "Denoiser",
    "UL2Batch",
    "distill_kl",
    "fim",
    "fim_batch",
    "fim_window",
    "mlm_batch",
    "noise_mask",
    "packed_prefix_lm_mask",
    "prefix_lm_labels",
    "prefix_lm_mask",
    "random_prefix_len",
    "row_generators",
    "rtd_inputs",
    "rtd_targets",
    "sample_replacements",
    "sentinel_table",
    "span_corruption",
    "special_ids",
    "span_counts",
    "t5_lengths",
    "ul2_batch",
    "ul2_raw_length",
    "ul2_sentinels_needed",
]

IGNORE = -100  # label of a position without loss (F.cross_entropy's default ignore_index)

# --------------------------------------------------------------------------
# random generators
# --------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def row_generators(seed: int, step: int, start: int, count: int, salt: int = 0) -> list[torch.Generator]:
    """One CPU generator per sequence ``start .. start+count-1`` of ``step``.

    Each is seeded by a hash of ``(seed, salt, step, index)`` only, so the random
    choices for a sequence do not depend on the micro-batch split, the number of
    ranks or a resume (the same promise as ``Dataset.batch``). ``salt`` separates
    the streams of two objectives (or of train and validation) drawn for one step.
    """
    h = 0
    for part in (seed, salt, step):
        h = _splitmix(h ^ (int(part) & _M64))
    out = []
    for i in range(start, start + count):
        g = torch.Generator(device="cpu")
        g.manual_seed(_splitmix(h ^ i) & ((1 << 63) - 1))
        out.append(g)
    return out


def _gen(generator) -> torch.Generator | None:
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator(device="cpu").manual_seed(generator)
    return generator


def _row_gens(generator, rows: int) -> list:
    """One generator per row: the list given, or the same (single) generator for every row."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != rows:
            raise ValueError(f"got {len(generator)} generators for {rows} rows")
        return [_gen(g) for g in generator]
    g = _gen(generator)
    return [g] * rows


def _as_2d(tokens: torch.Tensor) -> torch.Tensor:
    if tokens.dim() == 1:
        return tokens[None]
    if tokens.dim() != 2:
        raise ValueError(f"expected a (batch, seq) token tensor, got shape {tuple(tokens.shape)}")
    return tokens


# --------------------------------------------------------------------------
# masked language modelling (BERT, MosaicBERT)
# --------------------------------------------------------------------------

def mlm_batch(tokens: torch.Tensor, mask_rate: float, mask_id: int, vocab_size: int,
              special_ids: Iterable[int] = (), generator=None,
              split: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM inputs and aligned labels for a (B, T) (or (T,)) batch of tokens.

    BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
    Transformers for Language Understanding", §3.1, Task #1): select a fraction
    ``mask_rate`` of the tokens (BERT 15%, MosaicBERT, Portes et al. 2023, 30%);
    of the selected tokens replace 80% by ``[MASK]``, 10% by a random token and
    leave 10% unchanged (``split``); predict the original token at the selected
    positions only.

    Choices where the sources differ:

    - Selection is an independent Bernoulli(``mask_rate``) per token, as Hugging
      Face's ``DataCollatorForLanguageModeling`` does (and MosaicBERT, which uses
      it); BERT's original code picks exactly ``round(n × rate)`` positions.
    - ``special_ids`` (EOS/SEP, CLS, PAD, and ``mask_id`` itself, added here)
      are never selected, and a random replacement is drawn uniformly from the
      ids in ``[0, vocab_size)`` that are not special (Hugging Face draws from the
      whole vocabulary, specials included). ``vocab_size`` is the tokenizer's
      size, not the model's padded one.

    Returns ``(inputs, labels)``: labels hold the original token where selected
    and -100 elsewhere (aligned: no shift).
    """
    if not 0.0 <= mask_rate <= 1.0:
        raise ValueError(f"mask_rate must be in [0, 1], got {mask_rate}")
    if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(f"split must be three fractions (mask, random, keep) summing to 1, got {split}")
    squeeze = tokens.dim() == 1
    tokens = _as_2d(tokens)
    specials = sorted({int(s) for s in special_ids} | {int(mask_id)})
    special = torch.tensor(specials, dtype=tokens.dtype)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[(special >= 0) & (special < vocab_size)]] = False
    allowed = allowed.nonzero().squeeze(1)
    if len(allowed) == 0:
        raise ValueError("no non-special token to draw random replacements from")
    can_select = ~torch.isin(tokens, special)
    p_mask, p_random = split[0], split[0] + split[1]

    inputs = tokens.clone()
    labels = torch.full_like(tokens, IGNORE)
    for b, g in enumerate(_row_gens(generator, tokens.shape[0])):
        T = tokens.shape[1]
        selected = (torch.rand(T, generator=g) < mask_rate) & can_select[b]
        how = torch.rand(T, generator=g)
        rand_tok = allowed[torch.randint(len(allowed), (T,), generator=g)]
        row = inputs[b]
        row[selected & (how < p_mask)] = mask_id
        to_random = selected & (how >= p_mask) & (how < p_random)
        row[to_random] = rand_tok[to_random]
        labels[b, selected] = tokens[b, selected]
    if squeeze:
        return inputs[0], labels[0]
    return inputs, labels


# --------------------------------------------------------------------------
# T5 span corruption
# --------------------------------------------------------------------------

def span_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) that :func:`noise_mask` gives a sequence of ``length``.

    As T5: ``noise = round(length × density)`` clamped to ``[1, length - 1]``,
    ``spans = max(round(noise / mean_span), 1)``. Python's ``round`` rounds half
    to even like ``tf.round``. One clamp T5 lacks: ``spans ≤ min(noise, length - noise)``
    (T5 fails there, since every span needs a non-empty run of non-noise before it).
    """
    if density <= 0.0:
        return 0, 0
    length = max(length, 2)  # T5: "increase length to avoid degeneracy"
    noise = min(max(round(length * density), 1), length - 1)
    spans = max(round(noise / mean_span), 1)
    spans = min(spans, noise, length - noise)
    return noise, spans


def _random_segmentation(num_items: int, num_segments: int, g) -> torch.Tensor:
    """Lengths of a uniformly random split of ``num_items`` into ``num_segments`` non-empty runs.

    T5's ``_random_segmentation``: shuffle ``num_segments - 1`` "segment starts"
    among the ``num_items - 1`` gaps between items; every composition is equally likely.
    """
    cuts = torch.randperm(num_items - 1, generator=g)[: num_segments - 1] + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts.sort().values,
                        torch.tensor([num_items], dtype=torch.long)])
    return bounds.diff()


def noise_mask(length: int, density: float, mean_span: float, generator=None) -> torch.Tensor:
    """T5's ``random_spans_noise_mask``: a bool (length,) mask, True = noise (corrupted).

    Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
    Text-to-Text Transformer", §3.1.4 and ``t5.data.preprocessors.random_spans_noise_mask``:
    :func:`span_counts` gives the number of noise tokens and of noise spans; the
    noise tokens and the non-noise tokens are each split uniformly at random into
    that many non-empty runs, and the runs interleave starting with non-noise:
    ``nonnoise_0, noise_0, nonnoise_1, noise_1, ...``. So the mask always starts
    with non-noise and ends with noise. (T5's optional ``random_roll`` is not
    implemented: T5's span corruption does not use it.) For length 512, density
    0.15 and mean span 3: 77 noise tokens in 26 spans.
    """
    if density <= 0.0:
        return torch.zeros(length, dtype=torch.bool)
    if mean_span < 1:
        raise ValueError(f"mean_span must be >= 1, got {mean_span}")
    if not 0.0 < density < 1.0:
        raise ValueError(f"density must be in [0, 1), got {density}")
    g = _gen(generator)
    n = max(length, 2)
    noise, spans = span_counts(length, density, mean_span)
    noise_lengths = _random_segmentation(noise, spans, g)
    nonnoise_lengths = _random_segmentation(n - noise, spans, g)
    lengths = torch.stack([nonnoise_lengths, noise_lengths], dim=1).reshape(-1)
    # as T5: mark each run's start, count the runs so far; odd-numbered runs are noise
    span_start = torch.zeros(n, dtype=torch.long)
    span_start[lengths.cumsum(0)[:-1]] = 1
    return (span_start.cumsum(0) % 2 == 1)[:length]


def sentinel_table(sentinel_ids, count: int) -> torch.Tensor:
    """The first ``count`` sentinel ids: ``sentinel_ids`` if a sequence; if an int, counting DOWN from it.

    T5's sentinels count down from the top of the vocabulary: ``<extra_id_0>`` is
    ``vocab_size - 1``, ``<extra_id_1>`` is ``vocab_size - 2``, ... So an int
    ``first`` gives ``first, first - 1, first - 2, ...``; pass a list (e.g. the
    ids of added special tokens ``<extra_id_0>, <extra_id_1>, ...``) for any other order.
    """
    if isinstance(sentinel_ids, int):
        if sentinel_ids - count + 1 < 0:
            raise ValueError(f"{count} sentinels counting down from {sentinel_ids} go below 0")
        return torch.arange(sentinel_ids, sentinel_ids - count, -1, dtype=torch.long)
    table = torch.as_tensor(list(sentinel_ids) if not isinstance(sentinel_ids, torch.Tensor) else sentinel_ids,
                            dtype=torch.long)
    if len(table) < count:
        raise ValueError(f"this example needs {count} sentinel tokens but only {len(table)} are given; "
                         f"add more sentinel tokens (see ul2_sentinels_needed) or shorten the sequence")
    return table[:count]


def _spans_to_sentinels(tokens: torch.Tensor, mask: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """T5's ``noise_span_to_unique_sentinel``: each run of masked tokens becomes one sentinel (the k-th run: table[k])."""
    prev = F.pad(mask[:-1], (1, 0))
    first = mask & ~prev
    k = (first.cumsum(0) - 1).clamp(min=0)
    out = torch.where(first, table[k], tokens)
    return out[~(mask & prev)]


def span_corruption(tokens_1d: torch.Tensor, density: float, mean_span: float, sentinel_ids,
                    eos_id: int | None, generator=None, mask: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 span corruption of one sequence: ``(inputs, targets)``, 1-D.

    Raffel et al. 2020, §3.1.4 (Figure 2) and T5's ``span_corruption``
    preprocessor: with ``mask = noise_mask(len, density, mean_span)``,

    - ``inputs``  = the tokens with each noise span replaced by one sentinel,
    - ``targets`` = the sentinels, each followed by the span it replaced,

    e.g. ``Thank you <X> me to your party <Y> week`` / ``<X> for inviting <Y> last <Z>``.
    Both are exactly T5's ``noise_span_to_unique_sentinel`` and
    ``nonnoise_span_to_unique_sentinel`` with sentinel ``k`` = ``sentinel_table(sentinel_ids, ...)[k]``
    (an int counts down, as T5's ``<extra_id_k>`` = ``vocab_size - 1 - k``).
    A mask from :func:`noise_mask` ends with noise, so targets end with the last
    span's tokens; a mask passed in that ends with non-noise gives targets ending
    with one more sentinel (the ``<Z>`` of the paper's figure). Then ``eos_id``
    is appended to both, as T5's output features do (None: no EOS).

    ``tokens_1d`` is the raw segment (no EOS of its own); ``mask`` (optional)
    replaces the random mask, which is then not drawn.
    """
    tokens_1d = tokens_1d.reshape(-1)
    if len(tokens_1d) == 0:
        raise ValueError("span corruption of an empty sequence")
    if mask is None:
        mask = noise_mask(len(tokens_1d), density, mean_span, generator)
    mask = mask.to(torch.bool)
    if mask.shape != tokens_1d.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from tokens {tuple(tokens_1d.shape)}")
    n_spans = int((mask & ~F.pad(mask[:-1], (1, 0))).sum())
    trailing = len(mask) == 0 or not bool(mask[-1])  # targets end with one more sentinel
    table = sentinel_table(sentinel_ids, n_spans + int(trailing))
    inputs = _spans_to_sentinels(tokens_1d, mask, table)
    # targets: the non-noise runs become sentinels. A dummy non-noise token in front makes the
    # run before noise span k sentinel k even when the mask starts with noise (T5 needs no dummy:
    # its masks start with non-noise, and there the two are identical).
    padded = torch.cat([tokens_1d.new_zeros(1), tokens_1d])
    targets = _spans_to_sentinels(padded, ~F.pad(mask, (1, 0)), table)
    if eos_id is not None:
        eos = tokens_1d.new_tensor([eos_id])
        inputs, targets = torch.cat([inputs, eos]), torch.cat([targets, eos])
    return inputs, targets


def t5_lengths(inputs_length: int, density: float, mean_span: float) -> tuple[int, int]:
    """T5's ``random_spans_helper``: (raw tokens per example, targets length) for a fixed inputs length.

    The largest raw length whose corrupted inputs (non-noise tokens, one sentinel
    per span, one EOS) fit ``inputs_length``, and the length of its targets (noise
    tokens, one sentinel per span, one EOS). With density 0.5 and targets longer
    than inputs, one raw token less (T5's "minor hack"). (512, 0.15, 3) → (568, 114).
    """
    def lengths(n):
        noise = round(n * density)
        spans = round(noise / mean_span)
        return n - noise + spans + 1, noise + spans + 1

    n = inputs_length - 1
    while lengths(n + 1)[0] <= inputs_length:
        n += 1
    _, targets = lengths(n)
    if density == 0.5 and targets > inputs_length:
        n -= 1
        targets -= 1
    return n, targets


# --------------------------------------------------------------------------
# prefix LM
# --------------------------------------------------------------------------

def prefix_lm_mask(seq_len: int, prefix_len, device=None) -> torch.Tensor:
    """Prefix-LM attention mask, True = may attend.

    Raffel et al. 2020, §3.2.1 (Figure 3, right) and UL2's decoder-only
    formulation (Tay et al. 2023, §3.3): position ``i`` may attend to ``j`` when
    ``j <= i`` (causal) or when both lie in the prefix (``i, j < P``):
    bidirectional over the prefix, causal after it. Since ``j < P <= i``
    implies ``j <= i``, this is ``allowed[i, j] = (j <= i) | (j < P)``: a prefix
    row sees the whole prefix and nothing after it; a later row sees everything
    up to itself.

    ``prefix_len``: an int → a (T, T) mask; a (B,) tensor (one prefix per row) →
    (B, 1, T, T). P = 0 (or 1) is the plain causal mask.
    """
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    causal = j <= i
    if not isinstance(prefix_len, (torch.Tensor, list, tuple)):
        return causal | (j < int(prefix_len))
    P = torch.as_tensor(prefix_len, device=device).reshape(-1, 1, 1, 1)
    return causal[None, None] | (j[None, None] < P)


def packed_prefix_lm_mask(segment_ids: torch.Tensor, in_prefix: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) mask for rows packing several examples, each a prefix-LM example.

    ``segment_ids`` (B, T): which example each position belongs to (padding gets
    its own id); ``in_prefix`` (B, T) bool: the position is in its example's
    bidirectional prefix (a prefix is at its example's start). Position ``i`` may
    attend to ``j`` iff they are in the same example and ``j <= i``, or both are
    in the prefix. ``in_prefix`` all False gives document-causal masking.
    """
    T = segment_ids.shape[-1]
    i = torch.arange(T, device=segment_ids.device)[:, None]
    j = torch.arange(T, device=segment_ids.device)[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    both_prefix = in_prefix[:, :, None] & in_prefix[:, None, :]
    return (same & ((j <= i)[None] | both_prefix))[:, None]


def prefix_lm_labels(y: torch.Tensor, prefix_len) -> torch.Tensor:
    """Shifted labels of a prefix-LM example: ``y`` with -100 where the predicted token is in the prefix.

    ``y[t]`` is the token at position ``t + 1`` (``Dataset.batch``'s y). The
    loss covers exactly the tokens after the prefix: ``y[t]`` counts iff
    ``t + 1 >= P``, i.e. ``t >= P - 1``. The last prefix position predicts the
    first target token; it sees the whole prefix and nothing after it, so no
    target leaks. ``prefix_len`` is an int or a (B,) tensor.
    """
    t = torch.arange(y.shape[-1], device=y.device)
    if not isinstance(prefix_len, (torch.Tensor, list, tuple)):
        keep = t >= int(prefix_len) - 1
    else:
        keep = t[None] >= torch.as_tensor(prefix_len, device=y.device).reshape(-1, 1) - 1
    return torch.where(keep, y, torch.full_like(y, IGNORE))


def random_prefix_len(batch: int, length: int, generator=None) -> torch.Tensor:
    """(batch,) prefix lengths, each uniform in ``[1, length - 1]``.

    T5's ``random_prefix_noise_mask`` (used by its ``prefix_lm`` preprocessor
    and UL2's S-denoiser): "the length of the prefix is chosen uniformly between
    [1, length)", so every example keeps at least one input and one target token.
    ``generator`` may be a list (one per row).
    """
    if length < 2:
        raise ValueError(f"a prefix-LM example needs at least 2 tokens, got {length}")
    gens = _row_gens(generator, batch)
    return torch.stack([torch.randint(1, length, (), generator=g) for g in gens])


# --------------------------------------------------------------------------
# UL2: mixture of denoisers, decoder-only
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser: its paradigm (``R``, ``X`` or ``S``), mean span μ, corruption rate r, mixing weight.

    Tay et al. 2023, "UL2: Unifying Language Learning Paradigms", §3.1.2:
    R (regular) is T5 span corruption with short spans and low rates; X (extreme)
    has long spans or high rates (μ ≥ 12 or r ≥ 30%); S (sequential) is prefix LM
    with a random split (μ and r unused).
    """
    kind: str
    mean_span: float = 3.0
    rate: float = 0.15
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in ("R", "X", "S"):
            raise ValueError(f"denoiser kind must be 'R', 'X' or 'S', got {self.kind!r}")
        if self.kind != "S" and (self.mean_span < 1 or not 0.0 < self.rate < 1.0):
            raise ValueError(f"denoiser {self}: mean_span must be >= 1 and rate in (0, 1)")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise ValueError(f"denoiser {self}: weight must be finite and >= 0")


# The UL2 paper's seven denoisers (§3.1.2, "Mixture of Denoisers"). Mixed uniformly:
# the released ul2_objective samples the tasks uniformly when no rates are given.
UL2_DENOISERS: tuple[Denoiser, ...] = (
    Denoiser("R", 3, 0.15), Denoiser("R", 8, 0.15),
    Denoiser("X", 3, 0.50), Denoiser("X", 8, 0.50), Denoiser("X", 64, 0.15), Denoiser("X", 64, 0.50),
    Denoiser("S"),
)

# The paradigm (mode) tokens of the released UL2 checkpoints; the paper writes them [R], [X], [S].
UL2_MODE_TOKENS = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}


@dataclass
class UL2Batch:
    """A UL2 batch of static shape (B, T).

    - ``input_ids``: ``[mode] + corrupted inputs + targets + EOS``, then ``pad_id``.
    - ``labels``: shifted (``labels[t]`` is ``input_ids[t + 1]``) on the targets and
      their EOS, -100 elsewhere; ``loss_mask`` is ``labels != -100``.
    - ``prefix_len``: (B,) length of ``[mode] + inputs``; ``denoiser``: (B,) index into the denoiser list.
    - ``attn_mask``: (B, 1, T, T) bool prefix-LM mask over ``[mode] + inputs``; ``position_ids``: 0 .. T-1 on
      every row. Both are computed when asked for: the generated model builds its mask from ``prefix_len``, and
      building a (B, T, T) mask for every micro-batch doubled the host's time for the batch
      (20 ms → 41 ms at 64 × 1024 tokens on a 2-core CPU), time a GPU would wait for.
    """
    input_ids: torch.Tensor
    labels: torch.Tensor
    prefix_len: torch.Tensor
    denoiser: torch.Tensor

    @property
    def loss_mask(self) -> torch.Tensor:
        return self.labels != IGNORE

    @property
    def attn_mask(self) -> torch.Tensor:
        return prefix_lm_mask(self.input_ids.shape[1], self.prefix_len)

    @property
    def position_ids(self) -> torch.Tensor:
        B, T = self.input_ids.shape
        return torch.arange(T).expand(B, T)


@lru_cache(maxsize=256)
def ul2_raw_length(seq_len: int, denoiser: Denoiser, mode_token: bool = True) -> int:
    """Raw tokens one example of ``denoiser`` consumes so its decoder-only row fills at most ``seq_len``.

    Row length = mode token (1 or 0) + inputs + targets + EOS. For R/X with N
    noise tokens in S spans of a raw length L: inputs L - N + S, targets N + S,
    so the row is ``mode + L + 2S + 1``; the largest L that fits is taken (UL2
    does the same per denoiser with T5's ``random_spans_helper``). For S: inputs
    + targets = L, so ``L = seq_len - mode - 1``.
    """
    budget = seq_len - int(mode_token) - 1
    if denoiser.kind == "S":
        L = budget
    else:
        L = budget
        while L >= 2 and L + 2 * span_counts(L, denoiser.rate, denoiser.mean_span)[1] > budget:
            L -= 1
    if L < 2:
        raise ValueError(f"seq_len {seq_len} is too short for denoiser {denoiser}")
    return L


def ul2_sentinels_needed(seq_len: int, denoisers: Sequence[Denoiser] = UL2_DENOISERS,
                         mode_token: bool = True) -> int:
    """How many sentinel ids :func:`ul2_batch` may use at ``seq_len``: the most spans any denoiser makes.

    T5 reserves 100 (``<extra_id_0..99>``); at long sequence lengths the X
    denoisers need more (μ 3, r 50% at seq_len 2048: about 256).
    """
    need = 0
    for d in denoisers:
        if d.kind != "S":
            need = max(need, span_counts(ul2_raw_length(seq_len, d, mode_token), d.rate, d.mean_span)[1])
    return need


def ul2_batch(tokens: torch.Tensor, seq_len: int, mode_ids: Mapping[str, int] | None, sentinel_ids,
              eos_id: int, pad_id: int, generator=None,
              denoisers: Sequence[Denoiser] = UL2_DENOISERS) -> UL2Batch:
    """A UL2 mixture-of-denoisers batch for a decoder-only model.

    Tay et al. 2023, "UL2: Unifying Language Learning Paradigms" (§3.1, §3.3):
    for each example a denoiser is drawn with probability proportional to its
    ``weight``; R and X corrupt ``ul2_raw_length`` raw tokens with
    :func:`span_corruption` (its inputs without EOS, its targets with EOS), S
    splits them at :func:`random_prefix_len` into inputs and targets (+ EOS).
    The row is ``[mode] + inputs + targets``, a prefix LM over ``[mode] + inputs``
    with loss on the targets only, padded with ``pad_id`` to ``seq_len``.

    ``tokens``: (B, >= max raw length) windows, e.g. the ``x`` of
    ``Dataset.batch(..., seq_len)`` (each raw length is at most ``seq_len - 2``);
    each example uses its row's first tokens. ``mode_ids``: ``{"R": id, "X": id,
    "S": id}`` (the tokens of :data:`UL2_MODE_TOKENS`), or None for no mode token.
    ``sentinel_ids``: as :func:`sentinel_table` (an int counts down); at least
    :func:`ul2_sentinels_needed` of them.
    """
    tokens = _as_2d(tokens)
    B = tokens.shape[0]
    if not denoisers:
        raise ValueError("no denoisers")
    weights = torch.tensor([float(d.weight) for d in denoisers], dtype=torch.float64)
    if weights.sum() <= 0:
        raise ValueError("denoiser weights are all zero")
    with_mode = mode_ids is not None
    raw = [ul2_raw_length(seq_len, d, with_mode) for d in denoisers]
    if tokens.shape[1] < max(raw):
        raise ValueError(f"UL2 at seq_len {seq_len} needs windows of {max(raw)} tokens, got {tokens.shape[1]}")

    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    prefix_len = torch.zeros(B, dtype=torch.long)
    chosen = torch.zeros(B, dtype=torch.long)
    for b, g in enumerate(_row_gens(generator, B)):
        k = int(torch.multinomial(weights, 1, generator=g))
        d = denoisers[k]
        seg = tokens[b, : raw[k]]
        if d.kind == "S":
            P = int(random_prefix_len(1, len(seg), g))
            inputs, targets = seg[:P], torch.cat([seg[P:], seg.new_tensor([eos_id])])
        else:
            inputs, targets = span_corruption(seg, d.rate, d.mean_span, sentinel_ids, eos_id, g)
            inputs = inputs[:-1]  # T5 ends the encoder input with EOS; in one decoder row it would only separate
        head = [seg.new_tensor([mode_ids[d.kind]])] if with_mode else []
        row = torch.cat(head + [inputs, targets])
        n, P = len(row), len(row) - len(targets)
        assert n <= seq_len, (n, seq_len, d)
        input_ids[b, :n] = row
        labels[b, P - 1: n - 1] = row[P:]
        prefix_len[b] = P
        chosen[b] = k
    return UL2Batch(input_ids=input_ids, labels=labels, prefix_len=prefix_len, denoiser=chosen)


# --------------------------------------------------------------------------
# fill-in-the-middle
# --------------------------------------------------------------------------

def _fim_order(mode: str, g) -> str:
    if mode in ("psm", "spm"):
        return mode
    if mode == "both":
        return "spm" if float(torch.rand((), generator=g)) < 0.5 else "psm"
    raise ValueError(f"FIM mode must be 'psm', 'spm' or 'both', got {mode!r}")


def fim(tokens_1d: torch.Tensor, rate: float, prefix_id: int, middle_id: int, suffix_id: int,
        mode: str = "psm", generator=None) -> torch.Tensor:
    """Fill-in-the-middle transform of one document (without its EOS), 1-D.

    Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the
    Middle", §3: with probability ``rate`` (the "FIM rate"; the paper's default
    0.5, 0.9 for its final models) the document is cut at two points drawn
    uniformly and independently from ``0 .. n`` and sorted (so prefix, middle or
    suffix may be empty) into ``prefix, middle, suffix``, which are reordered:

    - ``psm``: ``<PRE> prefix <SUF> suffix <MID> middle``
    - ``spm``: ``<PRE> <SUF> suffix <MID> prefix middle`` (the paper's SPM
      "variant 2", Appendix D, which the paper and StarCoder/SantaCoder train on:
      prefix and middle stay contiguous)
    - ``both``: SPM or PSM with probability 1/2 each (the paper's joint training).

    Otherwise the document is returned unchanged. The caller keeps the EOS after
    it (the paper's ``<EOT>`` after the middle). A transformed document is 3
    tokens longer. Choice: the cuts fall between *tokens* (the data is already
    tokenized); the paper cuts characters before tokenizing, which also teaches
    the model to complete a middle that starts inside a token.
    """
    tokens_1d = tokens_1d.reshape(-1)
    g = _gen(generator)
    if float(torch.rand((), generator=g)) >= rate:
        return tokens_1d.clone()
    n = len(tokens_1d)
    a, b = sorted(int(x) for x in torch.randint(0, n + 1, (2,), generator=g))
    pre, mid, suf = tokens_1d[:a], tokens_1d[a:b], tokens_1d[b:]
    PRE, SUF, MID = (tokens_1d.new_tensor([i]) for i in (prefix_id, suffix_id, middle_id))
    if _fim_order(mode, g) == "psm":
        return torch.cat([PRE, pre, SUF, suf, MID, mid])
    return torch.cat([PRE, SUF, suf, MID, pre, mid])


def fim_window(window: torch.Tensor, rate: float, prefix_id: int, middle_id: int, suffix_id: int,
               eos_id: int, mode: str = "psm", generator=None) -> torch.Tensor:
    """:func:`fim` applied to every document of a packed window, keeping the window's length.

    ``window`` (L,) or (B, L): documents separated by ``eos_id`` (the first and
    last usually cut by the window's edges). Each non-empty run between EOS
    tokens is transformed independently with probability ``rate``; EOS tokens
    stay in place after their document. The result is cut back to L tokens (the
    3 extra tokens per transformed document push the end of the window out), as
    Megatron/StarCoder keep a sample's length. Apply it to ``x`` and ``y``'s last
    column together (the ``seq_len + 1`` window) and shift afterwards; the loss
    then covers every token, sentinels included, as in the paper.
    ``generator`` may be a list (one per row).
    """
    if window.dim() == 2:
        gens = _row_gens(generator, window.shape[0])
        return torch.stack([fim_window(w, rate, prefix_id, middle_id, suffix_id, eos_id, mode, g)
                            for w, g in zip(window, gens)])
    g = _gen(generator)
    L = len(window)
    ends = (window == eos_id).nonzero().squeeze(1).tolist()
    parts, start = [], 0
    for e in ends + [L]:
        if e > start:
            parts.append(fim(window[start:e], rate, prefix_id, middle_id, suffix_id, mode, g))
        if e < L:
            parts.append(window[e: e + 1])
        start = e + 1
    return torch.cat(parts)[:L]


def fim_batch(x: torch.Tensor, y: torch.Tensor, rates: Sequence[float], prefix_id: int, middle_id: int, suffix_id: int,
              eos_id: int, mode: str = "psm", generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fim_window` on a ``Dataset.batch`` pair: (x, y) of the transformed ``seq_len + 1`` windows.

    Row ``b`` is transformed with rate ``rates[b]`` (0 for a row drawn from a source
    without FIM); ``generator`` is usually one generator per row (:func:`row_generators`).
    """
    window = torch.cat([x, y[:, -1:]], dim=1)
    gens = _row_gens(generator, window.shape[0])
    window = torch.stack([fim_window(w, float(r), prefix_id, middle_id, suffix_id, eos_id, mode, g) if r > 0 else w
                          for w, r, g in zip(window, rates, gens)])
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def special_ids(tokenizer, names: Sequence[str]) -> list[int]:
    """The ids of special tokens (sentinels, mode tokens) in a ``tokenizers`` tokenizer; an error names any missing."""
    ids = [tokenizer.token_to_id(n) for n in names]
    missing = [n for n, i in zip(names, ids) if i is None]
    if missing:
        from .sources import DataError

        raise DataError(f"the tokenizer lacks the objective's special tokens {missing[:8]}; recompile the recipe "
                        "(malt adds them to tokenizer.add_special_tokens) or add them to the tokenizer file")
    return ids


# --------------------------------------------------------------------------
# replaced token detection (ELECTRA)
# --------------------------------------------------------------------------

def sample_replacements(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Token ids sampled from ``softmax(logits / temperature)`` over the last dimension, without gradient.

    ELECTRA (Clark et al. 2020, "ELECTRA: Pre-training Text Encoders as
    Discriminators Rather Than Generators", §2): the generator's MLM
    distribution at each masked position is sampled (not arg-maxed) to make the
    corrupted input; no gradient flows through the sample.

    Inverse-CDF sampling: ``uniforms`` (the logits' leading shape, values in
    [0, 1)) holds one uniform ``u`` per distribution, and the sample is the
    first id whose cumulative probability exceeds ``u`` times the total (the
    fp32 cumulative sum's last value, which rounding keeps near, not at, 1). With
    ``u`` uniform this is exact sampling from the categorical, and it is a
    deterministic function of the logits and ``u``: a generated program draws
    ``u`` per position from the row's own random stream (:func:`row_generators`),
    so a row's replacements do not depend on the micro-batch split or the number
    of devices. (ELECTRA's code uses Gumbel-max, which needs a whole vocabulary
    of noise per position.) The ids are in ``[0, logits.shape[-1])`` and never
    one of probability 0; ``uniforms`` may live on another device.
    """
    with torch.no_grad():
        cdf = torch.softmax(logits.float() / temperature, dim=-1).cumsum(dim=-1)   # (..., vocab), non-decreasing
        total = cdf[..., -1:].contiguous()
        u = uniforms.to(device=cdf.device, dtype=torch.float32).unsqueeze(-1) * total
        ids = torch.searchsorted(cdf, u, right=True)      # the first id with cdf > u
        last = torch.searchsorted(cdf, total)             # the last id of probability > 0 (for u × total rounded to total)
        return torch.minimum(ids, last).squeeze(-1)


def rtd_inputs(original: torch.Tensor, sampled: torch.Tensor, mlm_positions: torch.Tensor) -> torch.Tensor:
    """The discriminator's input: ``sampled`` at the MLM positions, ``original`` elsewhere (ELECTRA §2)."""
    return torch.where(mlm_positions.to(torch.bool), sampled, original)


def rtd_targets(original: torch.Tensor, sampled: torch.Tensor, mlm_positions: torch.Tensor,
                ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token replaced (1) / original (0) labels of the discriminator, aligned, int64.

    ELECTRA §2: a token is "replaced" iff it was corrupted *and* the sample
    differs from the original: "if the generator happens to generate the correct
    token, that token is considered 'real' instead of 'fake'". Every position
    counts in the loss (ELECTRA's discriminator loss is over all input tokens);
    ``ignore`` (bool, e.g. padding) marks positions set to -100. Use
    ``F.binary_cross_entropy_with_logits`` on the positions that are not -100.
    """
    replaced = mlm_positions.to(torch.bool) & (sampled != original)
    out = replaced.to(torch.long)
    if ignore is not None:
        out = out.masked_fill(ignore.to(torch.bool), IGNORE)
    return out


# --------------------------------------------------------------------------
# knowledge distillation
# --------------------------------------------------------------------------

def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, weight: float,
                      temperature: float, vocab: int) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``weight × T² × KL(teacher ‖ student, both softened by T)
    + (1 - weight) × next-token cross-entropy``; targets of -100 carry no loss, and the KL runs over the
    tokenizer's ``vocab`` tokens (not the vocabulary padding). Compiled, it is a few fused kernels over the logits
    instead of a whole fp32 copy of them per softmax."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    kl = distill_kl(logits[..., :vocab], teacher_logits[..., :vocab], temperature, mask=targets != -100)
    return weight * kl + (1 - weight) * ce


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``.

    Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", §2: the
    soft-target loss at temperature T, scaled by T² so its gradients keep their
    size as T changes. ``mask`` (bool, the logits' leading shape) selects the
    tokens that count (e.g. labels != -100). Mix it with the next-token loss as
    ``alpha * distill_kl(...) + (1 - alpha) * cross_entropy``; the teacher's
    logits should come from a ``torch.no_grad()`` forward pass.
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    if mask is not None:
        m = mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp(min=1) * temperature ** 2
    return kl.mean() * temperature ** 2
