"""Batch construction of the pre-training objectives (malt.runtime.objectives) against their papers' definitions."""

import math

import pytest
import torch
import torch.nn.functional as F
from malt.runtime.objectives import (
    IGNORE,
    UL2_DENOISERS,
    Denoiser,
    distill_kl,
    distillation_loss,
    fim,
    fim_window,
    mlm_batch,
    noise_mask,
    packed_prefix_lm_mask,
    prefix_lm_labels,
    prefix_lm_mask,
    random_prefix_len,
    row_generators,
    rtd_inputs,
    rtd_targets,
    sample_replacements,
    span_corruption,
    span_counts,
    t5_lengths,
    ul2_batch,
    ul2_raw_length,
    ul2_sentinels_needed,
)

VOCAB = 1000
EOS, PAD, MASK, CLS = 0, 1, 2, 3
SENTINEL_TOP = VOCAB - 1  # T5: <extra_id_k> = vocab_size - 1 - k


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ordinary_tokens(shape, seed=0, low=10, high=600):
    """Tokens that are never special, sentinel or mode tokens."""
    return torch.randint(low, high, shape, generator=gen(seed))


# ----------------------------------------------------------------------------- MLM

def test_mlm_rate_split_and_labels():
    tokens = ordinary_tokens((64, 512), seed=1)
    for rate in (0.15, 0.30):
        inputs, labels = mlm_batch(tokens, rate, MASK, VOCAB, special_ids=[EOS, PAD, CLS], generator=gen(2))
        sel = labels != IGNORE
        assert abs(sel.float().mean().item() - rate) < 0.01
        # labels hold the original token where selected; unselected inputs are untouched
        assert torch.equal(labels[sel], tokens[sel])
        assert torch.equal(inputs[~sel], tokens[~sel])
        n = sel.sum().item()
        masked = (inputs[sel] == MASK).sum().item() / n
        kept = (inputs[sel] == tokens[sel]).sum().item() / n
        randomised = ((inputs[sel] != MASK) & (inputs[sel] != tokens[sel])).sum().item() / n
        assert abs(masked - 0.8) < 0.015
        assert abs(randomised - 0.1) < 0.01   # a random draw equal to the original (p ~ 1/1000) counts as kept
        assert abs(kept - 0.1) < 0.01
        # random replacements are never special tokens
        assert not torch.isin(inputs[sel & (inputs != MASK)], torch.tensor([EOS, PAD, CLS, MASK])).any()


def test_mlm_never_selects_specials():
    tokens = ordinary_tokens((16, 256), seed=3)
    special = torch.rand(tokens.shape, generator=gen(4)) < 0.3
    tokens[special] = torch.tensor([EOS, PAD, CLS])[torch.randint(3, (int(special.sum()),), generator=gen(5))]
    inputs, labels = mlm_batch(tokens, 0.9, MASK, VOCAB, special_ids=[EOS, PAD, CLS], generator=gen(6))
    assert (labels[special] == IGNORE).all()
    assert torch.equal(inputs[special], tokens[special])
    assert (labels[~special] != IGNORE).float().mean() > 0.85


def test_mlm_deterministic_and_split_independent():
    tokens = ordinary_tokens((8, 64), seed=7)
    a = mlm_batch(tokens, 0.15, MASK, VOCAB, [EOS], generator=123)
    b = mlm_batch(tokens, 0.15, MASK, VOCAB, [EOS], generator=123)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # per-row generators: sequence i is the same whatever the micro-batch split
    whole = mlm_batch(tokens, 0.15, MASK, VOCAB, [EOS], generator=row_generators(1, 5, 0, 8))
    halves = [mlm_batch(tokens[s:s + 4], 0.15, MASK, VOCAB, [EOS], generator=row_generators(1, 5, s, 4))
              for s in (0, 4)]
    for k in range(2):
        assert torch.equal(whole[k], torch.cat([h[k] for h in halves]))
    other_step = mlm_batch(tokens, 0.15, MASK, VOCAB, [EOS], generator=row_generators(1, 6, 0, 8))
    assert not torch.equal(whole[1], other_step[1])


# ----------------------------------------------------------------------------- T5 noise mask

def spans_of(mask):
    """(start, end, is_noise) runs of a bool mask."""
    runs, start = [], 0
    m = mask.tolist()
    for i in range(1, len(m) + 1):
        if i == len(m) or m[i] != m[start]:
            runs.append((start, i, m[start]))
            start = i
    return runs


def test_noise_mask_t5_paper_numbers():
    # T5 (inputs_length 512 → 568 raw tokens, 114 targets); 512 tokens at 15%, μ 3: 77 noise tokens in 26 spans
    assert span_counts(512, 0.15, 3) == (77, 26)
    assert t5_lengths(512, 0.15, 3) == (568, 114)
    m = noise_mask(512, 0.15, 3, gen(0))
    runs = spans_of(m)
    assert m.sum() == 77
    assert sum(r[2] for r in runs) == 26
    assert [r[2] for r in runs] == [False, True] * 26  # interleaved, starting with non-noise, ending with noise


@pytest.mark.parametrize("length,density,mean", [(512, 0.15, 3), (100, 0.5, 8), (568, 0.15, 64), (37, 0.5, 3),
                                                 (10, 0.5, 64), (1, 0.15, 3), (2, 0.5, 3), (300, 0.9, 2)])
def test_noise_mask_exact_counts(length, density, mean):
    noise, spans = span_counts(length, density, mean)
    for seed in range(20):
        m = noise_mask(length, density, mean, gen(seed))
        assert m.shape == (length,) and m.dtype == torch.bool
        if length >= 2:
            runs = spans_of(m)
            assert m.sum() == noise
            assert [r[2] for r in runs] == [False, True] * spans
            assert all(e > s for s, e, _ in runs)  # every run non-empty


def test_noise_mask_span_lengths_distribution():
    # noise lengths are a uniformly random composition of N into S parts (T5's _random_segmentation): each span
    # has P(length = k) = C(N-k-1, S-2) / C(N-1, S-1); the mean span length is N/S on every draw
    N, S = span_counts(512, 0.15, 3)
    lengths = []
    for seed in range(400):
        runs = spans_of(noise_mask(512, 0.15, 3, gen(seed)))
        lens = [e - s for s, e, noise in runs if noise]
        assert sum(lens) / len(lens) == pytest.approx(N / S)
        lengths += lens
    for k in (1, 2, 3, 5):
        p = math.comb(N - k - 1, S - 2) / math.comb(N - 1, S - 1)
        assert sum(x == k for x in lengths) / len(lengths) == pytest.approx(p, abs=0.015)
    assert max(lengths) > 10  # not a fixed length


def test_noise_mask_zero_density():
    assert not noise_mask(50, 0.0, 3).any()


# ----------------------------------------------------------------------------- span corruption

def reconstruct(inputs, targets, sentinels, eos=EOS):
    """The original sequence from T5 inputs and targets (both ending with EOS)."""
    sset = set(sentinels)
    assert inputs[-1] == eos and targets[-1] == eos
    spans, cur = {}, None
    for t in targets[:-1].tolist():
        if t in sset:
            cur = t
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inputs[:-1].tolist():
        out += spans[t] if t in sset else [t]
    return out


def test_span_corruption_round_trip():
    sentinels = list(range(SENTINEL_TOP, SENTINEL_TOP - 300, -1))
    for seed, (n, density, mean) in enumerate([(568, 0.15, 3), (200, 0.5, 3), (512, 0.5, 64), (20, 0.15, 8),
                                               (3, 0.5, 3)] * 10):
        tokens = ordinary_tokens((n,), seed=seed)
        inputs, targets = span_corruption(tokens, density, mean, SENTINEL_TOP, EOS, gen(seed))
        assert reconstruct(inputs, targets, sentinels) == tokens.tolist()
        N, S = span_counts(n, density, mean)
        assert len(inputs) == n - N + S + 1 and len(targets) == N + S + 1


def test_span_corruption_round_trip_any_mask():
    sentinels = list(range(SENTINEL_TOP, SENTINEL_TOP - 100, -1))
    for seed in range(50):
        tokens = ordinary_tokens((40,), seed=seed)
        mask = torch.rand(40, generator=gen(100 + seed)) < 0.4  # may start with noise, end with non-noise
        inputs, targets = span_corruption(tokens, 0, 0, SENTINEL_TOP, EOS, mask=mask)
        assert reconstruct(inputs, targets, sentinels) == tokens.tolist()


def test_span_corruption_sentinel_layout():
    # the paper's Figure 2: "Thank you for inviting me to your party last week ."
    words = ["Thank", "you", "for", "inviting", "me", "to", "your", "party", "last", "week", "."]
    tokens = torch.arange(10, 10 + len(words))
    mask = torch.tensor([w in ("for", "inviting", "last") for w in words])
    X, Y, Z = SENTINEL_TOP, SENTINEL_TOP - 1, SENTINEL_TOP - 2  # counting down, as T5's <extra_id_0, 1, 2>
    inputs, targets = span_corruption(tokens, 0, 0, SENTINEL_TOP, EOS, mask=mask)
    # Thank you <X> me to your party <Y> week . </s>
    assert inputs.tolist() == [10, 11, X, 14, 15, 16, 17, Y, 19, 20, EOS]
    # <X> for inviting <Y> last <Z> </s>
    assert targets.tolist() == [X, 12, 13, Y, 18, Z, EOS]
    # a list of ids is used in order; no EOS when eos_id is None
    inputs, targets = span_corruption(tokens, 0, 0, [900, 901, 902], None, mask=mask)
    assert inputs.tolist() == [10, 11, 900, 14, 15, 16, 17, 901, 19, 20]
    assert targets.tolist() == [900, 12, 13, 901, 18, 902]
    # T5's own masks end with noise: targets end with the last span, then EOS
    inputs, targets = span_corruption(tokens, 0, 0, SENTINEL_TOP, EOS, mask=torch.tensor([0] * 9 + [1, 1]).bool())
    assert inputs.tolist() == [*range(10, 19), X, EOS]
    assert targets.tolist() == [X, 19, 20, EOS]
    with pytest.raises(ValueError, match="sentinel"):
        span_corruption(tokens, 0, 0, [900], EOS, mask=mask)


# ----------------------------------------------------------------------------- prefix LM

def test_prefix_lm_mask_element_by_element():
    T, P = 5, 2
    expected = torch.tensor([
        # key: 0  1  2  3  4
        [1, 1, 0, 0, 0],  # query 0 (prefix): the whole prefix
        [1, 1, 0, 0, 0],  # query 1 (prefix)
        [1, 1, 1, 0, 0],  # query 2: causal
        [1, 1, 1, 1, 0],  # query 3
        [1, 1, 1, 1, 1],  # query 4
    ], dtype=torch.bool)
    assert torch.equal(prefix_lm_mask(T, P), expected)
    assert torch.equal(prefix_lm_mask(T, 0), torch.ones(T, T).tril().bool())
    assert torch.equal(prefix_lm_mask(T, 1), torch.ones(T, T).tril().bool())
    assert torch.equal(prefix_lm_mask(T, T), torch.ones(T, T, dtype=torch.bool))
    batched = prefix_lm_mask(T, torch.tensor([2, 0, 4]))
    assert batched.shape == (3, 1, T, T) and batched.dtype == torch.bool
    for b, p in enumerate([2, 0, 4]):
        assert torch.equal(batched[b, 0], prefix_lm_mask(T, p))


def test_prefix_lm_mask_with_sdpa():
    torch.manual_seed(0)
    T, P, D = 6, 3, 8
    q, k, v = (torch.randn(1, 1, T, D) for _ in range(3))
    mask = prefix_lm_mask(T, torch.tensor([P]))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    v2 = v.clone()
    v2[..., P + 1, :] += 1.0  # change a target position: positions before it are unaffected
    out2 = F.scaled_dot_product_attention(q, k, v2, attn_mask=mask)
    assert torch.allclose(out[..., : P + 1, :], out2[..., : P + 1, :])
    assert not torch.allclose(out[..., P + 1:, :], out2[..., P + 1:, :])
    v3 = v.clone()
    v3[..., P - 1, :] += 1.0  # change the last prefix token: every position sees it (bidirectional prefix)
    out3 = F.scaled_dot_product_attention(q, k, v3, attn_mask=mask)
    assert not torch.isclose(out, out3).all(dim=-1).any()


def test_prefix_lm_labels_and_loss_mask():
    y = torch.arange(1, 7)  # targets of positions 0..5 (the tokens at 1..6)
    assert prefix_lm_labels(y, 3).tolist() == [IGNORE, IGNORE, 3, 4, 5, 6]  # loss on tokens 3.. (after the prefix 0..2)
    yb = torch.arange(1, 7).repeat(2, 1)
    assert prefix_lm_labels(yb, torch.tensor([1, 4])).tolist() == [[1, 2, 3, 4, 5, 6],
                                                                  [IGNORE, IGNORE, IGNORE, 4, 5, 6]]


def test_packed_prefix_lm_mask_element_by_element():
    # two examples in one row: A = positions 0..2 (prefix 0..1), B = 3..5 (prefix 3), then a pad at 6
    seg = torch.tensor([[0, 0, 0, 1, 1, 1, 2]])
    pre = torch.tensor([[1, 1, 0, 1, 0, 0, 0]]).bool()
    m = packed_prefix_lm_mask(seg, pre)[0, 0]
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for i in range(7):
        for j in range(7):
            same = seg[0, i] == seg[0, j]
            expected[i, j] = same and (j <= i or (pre[0, i] and pre[0, j]))
    assert torch.equal(m, expected)
    assert m[0].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert m[4].tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert m[6].tolist() == [0, 0, 0, 0, 0, 0, 1]  # padding sees only itself: no empty softmax row
    # one example per row: the same as prefix_lm_mask
    T = 5
    one = packed_prefix_lm_mask(torch.zeros(1, T, dtype=torch.long), (torch.arange(T) < 2)[None])
    assert torch.equal(one[0, 0], prefix_lm_mask(T, 2))


def test_random_prefix_len_uniform():
    p = random_prefix_len(7000, 8, gen(0))
    assert p.min() == 1 and p.max() == 7
    counts = torch.bincount(p, minlength=8)[1:].float() / len(p)
    assert torch.allclose(counts, torch.full((7,), 1 / 7), atol=0.02)


# ----------------------------------------------------------------------------- UL2

MODES = {"R": 1000, "X": 1001, "S": 1002}
UL2_SENTINELS = 1999  # counting down from the top of a 2000-token vocabulary


def check_ul2_rows(batch, tokens, seq_len, denoisers, modes=MODES):
    B = tokens.shape[0]
    assert batch.input_ids.shape == batch.labels.shape == batch.position_ids.shape == (B, seq_len)
    assert batch.attn_mask.shape == (B, 1, seq_len, seq_len) and batch.attn_mask.dtype == torch.bool
    assert torch.equal(batch.attn_mask, prefix_lm_mask(seq_len, batch.prefix_len))
    sentinels = list(range(UL2_SENTINELS, UL2_SENTINELS - 500, -1))
    for b in range(B):
        d = denoisers[int(batch.denoiser[b])]
        row, lab, P = batch.input_ids[b], batch.labels[b], int(batch.prefix_len[b])
        m = 1 if modes else 0
        if modes:
            assert row[0] == modes[d.kind]
        loss = (lab != IGNORE).nonzero().squeeze(1)
        # loss exactly on the targets: labels[t] = row[t + 1] for t = P-1 .. n-2, nothing else
        n = int(loss[-1]) + 2
        assert loss.tolist() == list(range(P - 1, n - 1))
        assert torch.equal(lab[P - 1: n - 1], row[P:n])
        assert (row[n:] == PAD).all()
        assert row[n - 1] == EOS
        L = ul2_raw_length(seq_len, d, bool(modes))
        inputs, targets = row[m:P], row[P:n]
        if d.kind == "S":
            assert torch.equal(torch.cat([inputs, targets[:-1]]), tokens[b, :L])
            assert 1 <= len(inputs) <= L - 1
        else:
            restored = reconstruct(torch.cat([inputs, inputs.new_tensor([EOS])]), targets, sentinels)
            assert restored == tokens[b, :L].tolist()
            N, S = span_counts(L, d.rate, d.mean_span)
            assert len(targets) == N + S + 1 and len(inputs) == L - N + S


def test_ul2_rows_against_definition():
    seq_len = 128
    tokens = ordinary_tokens((140, seq_len), seed=11)
    batch = ul2_batch(tokens, seq_len, MODES, UL2_SENTINELS, EOS, PAD, gen(12))
    check_ul2_rows(batch, tokens, seq_len, UL2_DENOISERS)
    assert set(batch.denoiser.tolist()) == set(range(7))
    assert torch.equal(batch.loss_mask, batch.labels != IGNORE)
    assert torch.equal(batch.position_ids[3], torch.arange(seq_len))


def test_ul2_without_mode_tokens_and_custom_mixture():
    seq_len = 64
    tokens = ordinary_tokens((40, seq_len), seed=13)
    denoisers = (Denoiser("R", 3, 0.15, weight=1), Denoiser("S", weight=1))
    batch = ul2_batch(tokens, seq_len, None, UL2_SENTINELS, EOS, PAD, gen(14), denoisers=denoisers)
    check_ul2_rows(batch, tokens, seq_len, denoisers, modes=None)


def test_ul2_mixing_rates():
    seq_len = 64
    tokens = ordinary_tokens((1400, seq_len), seed=15)
    batch = ul2_batch(tokens, seq_len, MODES, UL2_SENTINELS, EOS, PAD, gen(16))
    freq = torch.bincount(batch.denoiser, minlength=7).float() / len(batch.denoiser)
    assert torch.allclose(freq, torch.full((7,), 1 / 7), atol=0.03)
    weighted = tuple(Denoiser(d.kind, d.mean_span, d.rate, weight=w)
                     for d, w in zip(UL2_DENOISERS, (0.25, 0.25, 0, 0, 0, 0, 0.5)))
    batch = ul2_batch(tokens[:700], seq_len, MODES, UL2_SENTINELS, EOS, PAD, gen(17), denoisers=weighted)
    freq = torch.bincount(batch.denoiser, minlength=7).float() / 700
    assert torch.allclose(freq, torch.tensor([0.25, 0.25, 0, 0, 0, 0, 0.5]), atol=0.05)
    assert freq[2:6].sum() == 0


def test_ul2_lengths_and_sentinels():
    # every denoiser's row fits seq_len exactly or nearly (the largest raw length that fits)
    for seq_len in (64, 512, 2048):
        for d in UL2_DENOISERS:
            L = ul2_raw_length(seq_len, d)
            row = lambda n: 1 + n + 1 + (0 if d.kind == "S" else 2 * span_counts(n, d.rate, d.mean_span)[1])  # noqa
            assert row(L) <= seq_len < row(L + 1) or (d.kind == "S" and row(L) == seq_len)
    # μ 3 r 50% needs the most sentinels: 64 spans at seq_len 512 (382 raw tokens), 256 at 2048 (more than T5's 100)
    assert ul2_sentinels_needed(512) == 64
    assert ul2_sentinels_needed(2048) == 256
    tokens = ordinary_tokens((60, 512), seed=18)
    need = ul2_sentinels_needed(512)
    batch = ul2_batch(tokens, 512, MODES, list(range(1100, 1100 + need)), EOS, PAD, gen(19))
    assert batch.input_ids.max() < 1100 + need
    with pytest.raises(ValueError, match="sentinel"):
        ul2_batch(tokens, 512, MODES, list(range(1100, 1110)), EOS, PAD, gen(19),
                  denoisers=(Denoiser("X", 3, 0.5),))


def test_ul2_deterministic_per_row():
    tokens = ordinary_tokens((6, 96), seed=20)
    whole = ul2_batch(tokens, 96, MODES, UL2_SENTINELS, EOS, PAD, row_generators(3, 9, 0, 6))
    part = ul2_batch(tokens[2:5], 96, MODES, UL2_SENTINELS, EOS, PAD, row_generators(3, 9, 2, 3))
    assert torch.equal(whole.input_ids[2:5], part.input_ids)
    assert torch.equal(whole.labels[2:5], part.labels)


# ----------------------------------------------------------------------------- FIM

PRE, MID, SUF = 700, 701, 702


def unfim(out, order=None):
    """The document (prefix + middle + suffix) from a PSM or SPM sequence.

    PSM with an empty prefix is the same sequence as SPM with an empty prefix, so
    without ``order`` a sequence starting ``<PRE> <SUF>`` is read as SPM.
    """
    t = out.tolist()
    if order == "spm" or (order is None and t[:2] == [PRE, SUF]):
        assert t[:2] == [PRE, SUF]  # SPM: <PRE> <SUF> suffix <MID> prefix middle
        m = t.index(MID)
        return t[m + 1:] + t[2:m]
    assert t[0] == PRE              # PSM: <PRE> prefix <SUF> suffix <MID> middle
    s, m = t.index(SUF), t.index(MID)
    return t[1:s] + t[m + 1:] + t[s + 1:m]


@pytest.mark.parametrize("mode", ["psm", "spm", "both"])
def test_fim_round_trip_and_rate(mode):
    transformed, spm_like = 0, 0
    n_docs = 1500
    for seed in range(n_docs):
        doc = ordinary_tokens((int(torch.randint(1, 40, (), generator=gen(seed))),), seed=seed)
        out = fim(doc, 0.5, PRE, MID, SUF, mode, gen(10_000 + seed))
        if torch.equal(out, doc):
            continue
        transformed += 1
        assert len(out) == len(doc) + 3
        assert unfim(out, None if mode == "both" else mode) == doc.tolist()
        spm_like += out.tolist()[:2] == [PRE, SUF]
    assert abs(transformed / n_docs - 0.5) < 0.04
    if mode == "spm":
        assert spm_like == transformed
    elif mode == "psm":  # only an empty prefix starts <PRE> <SUF>
        assert spm_like < 0.2 * transformed
    else:                # half SPM, plus PSM with an empty prefix
        assert 0.45 < spm_like / transformed < 0.65
    assert fim(torch.arange(10, 20), 0.0, PRE, MID, SUF, mode, gen(0)).tolist() == list(range(10, 20))


def test_fim_split_points_uniform():
    # the prefix ends at the smaller of two uniform points in 0..n: mean n/3 (exactly n(2n+1)/(6(n+1)))
    n = 30
    doc = torch.arange(10, 10 + n)
    prefix = []
    for seed in range(3000):
        out = fim(doc, 1.0, PRE, MID, SUF, "psm", gen(seed)).tolist()
        prefix.append(out.index(SUF) - 1)
    assert sum(prefix) / len(prefix) == pytest.approx(n * (2 * n + 1) / (6 * (n + 1)), rel=0.05)
    assert min(prefix) == 0 and max(prefix) == n


def test_fim_window_keeps_documents_and_length():
    docs = [ordinary_tokens((k,), seed=k) for k in (12, 1, 30, 7, 25)]
    window = torch.cat([torch.cat([d, torch.tensor([EOS])]) for d in docs])[:-3]  # the last document cut
    out = fim_window(window, 1.0, PRE, MID, SUF, EOS, "both", gen(1))
    assert out.shape == window.shape
    pieces = torch.tensor_split(out, (out == EOS).nonzero().squeeze(1).tolist())
    pieces = [p[1:] if p[0] == EOS else p for p in pieces]  # drop the EOS each piece after the first starts with
    for piece, doc in zip(pieces[:3], docs[:3]):  # complete, untruncated documents come back whole
        assert unfim(piece) == doc.tolist()
    assert torch.equal(fim_window(window, 0.0, PRE, MID, SUF, EOS, "psm", gen(1)), window)
    batch = torch.stack([window, window.flip(0)])
    out2 = fim_window(batch, 0.5, PRE, MID, SUF, EOS, "psm", row_generators(0, 0, 0, 2))
    assert out2.shape == batch.shape


# ----------------------------------------------------------------------------- RTD

def test_rtd_targets_and_inputs():
    original = torch.tensor([[5, 6, 7, 8, 9, PAD]])
    sampled = torch.tensor([[5, 4, 7, 3, 1, PAD]])
    positions = torch.tensor([[1, 1, 0, 1, 0, 0]]).bool()
    # position 0: sampled == original → "original" as ELECTRA; 4: differs but was not masked
    assert rtd_targets(original, sampled, positions).tolist() == [[0, 1, 0, 1, 0, 0]]
    assert rtd_targets(original, sampled, positions, ignore=original == PAD).tolist() == [[0, 1, 0, 1, 0, IGNORE]]
    assert rtd_inputs(original, sampled, positions).tolist() == [[5, 4, 7, 3, 9, PAD]]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sample_replacements_follows_softmax(temperature):
    """Inverse-CDF sampling at uniform u draws from softmax(logits / T): 200k draws within 3 sigma of each probability."""
    n = 200_000
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]).repeat(n, 1).requires_grad_()
    s = sample_replacements(logits, torch.rand(n, generator=gen(0)), temperature)
    assert not s.requires_grad and s.dtype == torch.long and s.shape == (n,)
    p = torch.softmax(logits[0].detach().double() / temperature, -1)
    freq = torch.bincount(s, minlength=5).double() / n
    assert ((freq - p).abs() < 3 * (p * (1 - p) / n).sqrt()).all(), (freq, p)
    if temperature != 1.0:  # the temperature matters: the frequencies are far from the untempered softmax
        p1 = torch.softmax(logits[0].detach().double(), -1)
        assert ((freq - p1).abs() > 10 * (p1 * (1 - p1) / n).sqrt()).any()


def test_sample_replacements_is_the_inverse_cdf():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.0, 0.25]))          # token 2 has probability 0
    u = torch.tensor([0.0, 0.49, 0.51, 0.74, 0.76, 0.999, 1 - 2 ** -24])
    assert sample_replacements(logits.repeat(7, 1), u).tolist() == [0, 0, 1, 1, 3, 3, 3]
    # a deterministic function of (logits, u): the same u gives the same ids, in any batch and on any device
    logits = torch.randn(64, 300, generator=gen(1)) * 3
    u = torch.rand(64, generator=gen(2))
    whole = sample_replacements(logits, u)
    assert torch.equal(torch.cat([sample_replacements(logits[:10], u[:10]), sample_replacements(logits[10:], u[10:])]), whole)
    assert torch.equal(sample_replacements(logits.view(8, 8, 300), u.view(8, 8)), whole.view(8, 8))
    # never an id outside the vocabulary given, even for u at the top of [0, 1) and tokens of probability ~0
    peaked = torch.full((3, 10), -1e4)
    peaked[torch.arange(3), torch.tensor([4, 0, 9])] = 0
    for top in (0.0, 0.5, 1 - 2 ** -24):
        assert sample_replacements(peaked, torch.full((3,), top)).tolist() == [4, 0, 9]
    wide = torch.randn(1000, 50, generator=gen(3)) * 10
    ids = sample_replacements(wide, torch.rand(1000, generator=gen(4)).clamp(min=1 - 1e-6))
    assert ids.min() >= 0 and ids.max() < 50
    assert sample_replacements(torch.zeros(0, 7), torch.zeros(0)).shape == (0,)


# ----------------------------------------------------------------------------- distillation

def test_distill_kl():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert distill_kl(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    T = 2.0
    ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                   reduction="none").sum(-1).mean() * T * T
    assert distill_kl(s, t, T).item() == pytest.approx(ref.item(), rel=1e-5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]]).bool()
    per = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    assert distill_kl(s, t, 1.0, mask).item() == pytest.approx(per[mask].mean().item(), rel=1e-5)


def test_distillation_loss_mixes_kl_and_cross_entropy_and_compiles_to_the_same():
    """weight × T² KL over the tokenizer's tokens + (1 - weight) × CE over the padded vocabulary, targets of -100
    left out of both; torch.compile of it (what a compiled program runs) computes the same, gradients too."""
    torch.manual_seed(0)
    logits, teacher = torch.randn(2, 6, 13, requires_grad=True), torch.randn(2, 6, 13)
    targets = torch.randint(0, 10, (2, 6))
    targets[0, :2] = IGNORE
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    kl = distill_kl(logits[..., :10], teacher[..., :10], 2.0, mask=targets != IGNORE)
    loss = distillation_loss(logits, teacher, targets, 0.7, 2.0, 10)
    assert loss.item() == pytest.approx((0.7 * kl + 0.3 * ce).item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    compiled = torch.compile(distillation_loss)(logits, teacher, targets, 0.7, 2.0, 10)
    (compiled_grad,) = torch.autograd.grad(compiled, logits)
    assert compiled.item() == pytest.approx(loss.item(), rel=1e-5)
    assert torch.allclose(compiled_grad, grad, rtol=1e-4, atol=1e-6)


def test_no_empty_attention_rows():
    seq_len = 32
    tokens = ordinary_tokens((10, seq_len), seed=21)
    batch = ul2_batch(tokens, seq_len, MODES, UL2_SENTINELS, EOS, PAD, gen(22))
    assert batch.attn_mask.any(-1).all()
    assert math.isfinite(F.scaled_dot_product_attention(
        *(torch.randn(10, 2, seq_len, 4) for _ in range(3)), attn_mask=batch.attn_mask).sum().item())
