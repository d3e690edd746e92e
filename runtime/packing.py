"""Packing documents into training sequences: document ids and best-fit bins.

``data.packing`` (docs/recipes.md):

- ``concat``: documents joined with EOS and cut into windows; attention is plainly causal.
- ``document``: the same windows, plus per-position document ids (:func:`document_ids`): the
  model never attends across a document boundary and its positions restart per document.
- ``best_fit``: documents are bin-packed into sequences of ``seq_len + 1`` tokens by best-fit
  decreasing (:func:`pack_best_fit`; Prepacking, Zhao et al. 2024; "Fewer Truncations Improve
  Language Modeling", Ding et al. 2024); a document longer than that is first cut into pieces
  of ``seq_len + 1`` tokens. The rest of a sequence is padding, with targets -100 and a
  document id of its own.

Everything here is a pure function of its inputs (the seed among them), so a resumed run packs
exactly as the uninterrupted one did.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = ["PACKINGS", "BestFit", "best_fit_decreasing", "document_ids", "pack_best_fit", "pieces"]

PACKINGS = ("concat", "document", "best_fit")
IGNORE = -100  # target of a position that carries no loss (F.cross_entropy's ignore_index)


def document_ids(x: np.ndarray, eos_id: int) -> np.ndarray:
    """Document id of every position of (rows, T) tokens: 0 for the first document of a row, +1 after each EOS.

    A document's EOS belongs to it (the cache's document index counts it as the document's last
    token), so the id changes on the position after an EOS.
    """
    eos = (x == eos_id).astype(np.int64)
    return np.cumsum(eos, axis=1) - eos


def pieces(offsets: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every piece: each document [offsets[i], offsets[i+1]) cut into pieces of at most
    ``capacity`` tokens (all full but its last). Documents of zero length give no piece."""
    offsets = np.asarray(offsets, dtype=np.int64)
    starts, lengths = offsets[:-1], np.diff(offsets)
    keep = lengths > 0
    starts, lengths = starts[keep], lengths[keep]
    n = (lengths + capacity - 1) // capacity                      # pieces per document
    doc = np.repeat(np.arange(len(lengths)), n)
    k = np.arange(len(doc)) - np.repeat(np.cumsum(n) - n, n)       # piece number within its document
    piece_start = starts[doc] + k * capacity
    piece_len = np.minimum(capacity, lengths[doc] - k * capacity)
    return piece_start, piece_len


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing bin packing of items in the given order, which must be non-increasing in length.

    Each item goes to the open bin with the least room that still fits it (ties: the oldest
    bin); if none fits, a new bin opens. Returns (the bin of each item, the
    room left in each bin). Items of equal length are placed a run at a time, with exactly the
    result of placing them one by one: a bin with room r takes r // L items of length L before
    any bin with more room is tried, so the work grows with distinct lengths, not with items.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() <= 0 or lengths.max() > capacity):
        raise ValueError(f"item lengths must be in 1..{capacity}")
    if len(lengths) > 1 and (np.diff(lengths) > 0).any():
        raise ValueError("items must come in non-increasing length")
    bin_of = np.empty(len(lengths), dtype=np.int64)
    if not len(lengths):
        return bin_of, np.zeros(0, dtype=np.int64)
    room: list[int] = []                     # room left per bin
    buckets: dict[int, np.ndarray] = {}      # room -> bins with that room, oldest first
    keys: list[int] = []                     # sorted rooms that have bins
    bounds = np.flatnonzero(np.diff(lengths)) + 1
    for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(lengths)]])):
        L, k, at = int(lengths[lo]), int(hi - lo), int(lo)
        moves: list[tuple[int, np.ndarray]] = []  # (new room, bins), applied after this run of items
        i = bisect.bisect_left(keys, L)
        emptied = []
        while k and i < len(keys):
            r = keys[i]
            bins = buckets[r]
            q = r // L                           # items of length L one bin with room r takes
            use = min(len(bins), -(-k // q))
            got = np.full(use, q, dtype=np.int64)
            got[-1] = k - q * (use - 1) if k < q * use else q
            bin_of[at: at + int(got.sum())] = np.repeat(bins[:use], got)
            at += int(got.sum())
            k -= int(got.sum())
            for g in np.unique(got):
                moves.append((r - int(g) * L, bins[:use][got == g]))
            if use == len(bins):
                emptied.append(r)
            else:
                buckets[r] = bins[use:]
            i += 1
        if k:                                    # open new bins, each taking capacity // L items
            q = capacity // L
            use = -(-k // q)
            new = np.arange(len(room), len(room) + use, dtype=np.int64)
            room.extend([capacity] * use)
            got = np.full(use, q, dtype=np.int64)
            got[-1] = k - q * (use - 1)
            bin_of[at: at + k] = np.repeat(new, got)
            for g in np.unique(got):
                moves.append((capacity - int(g) * L, new[got == g]))
        for r in emptied:
            del buckets[r]
            keys.remove(r)
        for r, bins in moves:
            for b in bins.tolist():
                room[b] = r
            if r <= 0:
                continue
            if r in buckets:
                buckets[r] = np.sort(np.concatenate([buckets[r], bins]))
            else:
                buckets[r] = bins
                bisect.insort(keys, r)
    return bin_of, np.asarray(room, dtype=np.int64)


@dataclass(frozen=True)
class BestFit:
    """One split of one source packed into bins of ``capacity`` tokens.

    Bin ``b`` holds pieces ``first[b]:first[b+1]`` of (``start``, ``length``), in placement order;
    ``start`` is a token offset into the split's tokens.
    """

    capacity: int
    start: np.ndarray
    length: np.ndarray
    first: np.ndarray
    tokens: int

    @property
    def bins(self) -> int:
        return len(self.first) - 1

    @property
    def padding(self) -> int:
        return self.bins * self.capacity - self.tokens

    @property
    def padding_fraction(self) -> float:
        return self.padding / max(1, self.bins * self.capacity)


def _salt(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def pack_best_fit(offsets: np.ndarray, seq_len: int, seed: int, split: int, name: str) -> BestFit:
    """Pack documents (boundaries ``offsets``, n_documents + 1 token offsets) into bins of seq_len + 1 tokens.

    Pieces are shuffled by (seed, split, name) and then stably sorted longest first, so pieces of
    equal length are placed in a seeded order; the bins are numbered in the order they opened.
    """
    capacity = seq_len + 1
    start, length = pieces(offsets, capacity)
    rng = np.random.Generator(np.random.PCG64([seed & (2**63 - 1), split, _salt(name)]))
    order = rng.permutation(len(length))
    order = order[np.argsort(-length[order], kind="stable")]
    start, length = start[order], length[order]
    bin_of, room = best_fit_decreasing(length, capacity)
    by_bin = np.argsort(bin_of, kind="stable")
    n_bins = len(room)
    first = np.searchsorted(bin_of[by_bin], np.arange(n_bins + 1))
    return BestFit(capacity, start[by_bin], length[by_bin].astype(np.int64), first.astype(np.int64), int(length.sum()))
