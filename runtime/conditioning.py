"""Conditioning text on record fields: metadata prefixes (MeCo) and control tokens.

Two ways a source's documents can carry conditioning tokens, both applied when the
source is tokenized (so they are part of the token cache and its key):

- **metadata** (MeCo, Gao et al. 2025, "Metadata Conditioning Accelerates Language
  Model Pre-training"): a template such as ``"URL: {domain}\\n\\n"`` is filled from
  the record and prepended to the document. ``{domain}`` is the host of the URL in
  the record's ``url_field`` (no scheme, credentials, port or path: ``en.wikipedia.org``);
  any other ``{name}`` is the record field ``name`` (text or a number). Metadata
  tokens carry no loss: the targets that predict them are -100. The number of
  metadata tokens of every document is stored beside the shard (``.prefix.npy``),
  so the batches know which positions they are. A record without the fields is
  kept without a prefix (``missing: keep``, counted) or dropped (``missing: drop``).
- **control tokens** (conditional training, Korbak et al. 2023, "Pretraining Language
  Models with Human Preferences"): each document (``unit: document``) or each
  sentence (``unit: sentence``) is prefixed with a good or a bad special token by a
  threshold on a numeric score field; a share ``unprefixed`` of the units gets no
  token (chosen by a hash of the unit's text, so the same for every run). The
  tokens are special tokens added to the tokenizer, never read from text. By
  default they are inputs only: the targets that predict them are -100
  (``loss: true`` predicts them too). Units whose score is missing get no token
  (counted).

A conditioned document is a pair ``(prefix, segments)``: the metadata text (or None)
and a list of ``(control token id or None, text)``; :func:`encode_conditioned`
turns a batch of them into tokens.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from collections import Counter
from urllib.parse import urlsplit

import numpy as np

__all__ = ["CONTROL_KEYS", "DERIVED", "METADATA_KEYS", "Conditioner", "PrefixMask", "control_problems", "describe", "domain_of",
           "encode_conditioned", "metadata_problems", "split_sentences", "template_fields"]

METADATA_KEYS = ("template", "url_field", "missing")
CONTROL_KEYS = ("field", "threshold", "better", "good", "bad", "unprefixed", "unit", "loss")
DERIVED = ("domain",)   # template names computed from a field rather than read from the record
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")


def domain_of(url) -> str | None:
    """The host of a URL, lowercased, without scheme, credentials, port or path (None if there is none)."""
    if not isinstance(url, str) or not url.strip():
        return None
    u = url.strip()
    if "://" not in u and not u.startswith("//"):
        u = "//" + u            # "example.com/a" has no scheme: read it as a host and a path
    try:
        host = urlsplit(u).hostname
    except ValueError:          # such as an invalid IPv6 literal
        return None
    return host or None


def template_fields(template: str) -> list[str]:
    """The ``{name}`` fields of a template, in order; ValueError for anything but plain names."""
    names = []
    for _, name, spec, conv in string.Formatter().parse(template):
        if name is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name or ""):
            raise ValueError(f"template field {{{name}}} is not a field name (write {{domain}} or {{FIELD}}; "
                             f"a literal brace is written {{{{ or }}}})")
        if spec or conv:
            raise ValueError(f"template field {{{name}}} has a format specification; write plain {{{name}}}")
        names.append(name)
    return names


def metadata_problems(meta: dict) -> list[tuple[str, str]]:
    """Problems of a metadata mapping as (key, message): empty when it is usable."""
    out = []
    for k in meta:
        if k not in METADATA_KEYS and k != "write_prefix":  # write_prefix: set by the runtime for metadata-off phases
            out.append((k, f"unknown key {k!r}; metadata takes {', '.join(METADATA_KEYS)}"))
    tpl = meta.get("template")
    if not isinstance(tpl, str) or not tpl.strip():
        out.append(("template", "metadata needs a non-empty template, such as \"URL: {domain}\\n\\n\""))
        return out
    try:
        names = template_fields(tpl)
    except ValueError as e:
        return out + [("template", str(e))]
    if not names:
        out.append(("template", "the template names no field, so every document would get the same prefix; use {domain} or {FIELD}"))
    if meta.get("missing", "keep") not in ("keep", "drop"):
        out.append(("missing", f"missing must be keep or drop, got {meta.get('missing')!r}"))
    return out


def control_problems(ctl: dict) -> list[tuple[str, str]]:
    """Problems of a control-token mapping as (key, message): empty when it is usable."""
    out = []
    for k in ctl:
        if k not in CONTROL_KEYS:
            out.append((k, f"unknown key {k!r}; control takes {', '.join(CONTROL_KEYS)}"))
    if not ctl.get("field"):
        out.append(("field", "control needs the numeric score field to threshold"))
    th = ctl.get("threshold")
    if isinstance(th, bool) or not isinstance(th, (int, float)) or not math.isfinite(th):
        out.append(("threshold", f"control needs a numeric threshold, got {th!r}"))
    good, bad = ctl.get("good", "<|good|>"), ctl.get("bad", "<|bad|>")
    if not good or not bad or good == bad:
        out.append(("bad", "the good and bad tokens must be two different non-empty strings"))
    if ctl.get("better", "higher") not in ("higher", "lower"):
        out.append(("better", f"better must be higher or lower, got {ctl.get('better')!r}"))
    if ctl.get("unit", "document") not in ("document", "sentence"):
        out.append(("unit", f"unit must be document or sentence, got {ctl.get('unit')!r}"))
    un = ctl.get("unprefixed", 0.0)
    if isinstance(un, bool) or not isinstance(un, (int, float)) or not 0 <= un < 1:
        out.append(("unprefixed", f"unprefixed must be a share in [0, 1), got {un!r}"))
    return out


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: cut after ., ! or ? (and closing quotes or brackets) followed by whitespace,
    which stays with the sentence before it; joined back they give the text exactly."""
    out, prev = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[prev:m.end()])
        prev = m.end()
    if prev < len(text):
        out.append(text[prev:])
    return out


def _unit_hash(text: str, k: int) -> float:
    """A number in [0, 1) from a unit's text and its index in the document (for the unprefixed share)."""
    h = hashlib.blake2b(f"{k}\0{text}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


def _number(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


class Conditioner:
    """Turns (text, record fields) into a conditioned document and counts what it did.

    ``stats``: documents ``with_metadata`` / ``without_metadata`` (and ``missing_<field>``
    for the first field a record lacks), control units ``good`` / ``bad`` /
    ``unprefixed`` / ``no_score`` (and ``score_mismatch``: a sentence-score list of the
    wrong length).
    """

    def __init__(self, metadata: dict | None, control: dict | None, token_id=None):
        self.metadata = dict(metadata) if metadata else None
        self.control = dict(control) if control else None
        self.fields: list[str] = []              # record fields to read
        self.names: list[str] = []
        if self.metadata:
            self.template = self.metadata["template"]
            self.names = template_fields(self.template)
            self.url_field = self.metadata.get("url_field") or "url"
            self.drop_missing = self.metadata.get("missing", "keep") == "drop"
            # False: the documents a metadata-off phase reads (the same ones: drop still drops), without their prefixes
            self.write_prefix = self.metadata.get("write_prefix", True)
            for n in self.names:
                self.fields.append(self.url_field if n in DERIVED else n)
        if self.control:
            c = self.control
            self.fields.append(c["field"])
            self.threshold = float(c["threshold"])
            self.higher = c.get("better", "higher") == "higher"
            self.unprefixed = float(c.get("unprefixed", 0.0) or 0.0)
            self.by_sentence = c.get("unit", "document") == "sentence"
            self.good_id = token_id(c.get("good", "<|good|>")) if token_id else None
            self.bad_id = token_id(c.get("bad", "<|bad|>")) if token_id else None
        self.fields = list(dict.fromkeys(self.fields))
        self.stats: Counter = Counter()

    def prefix(self, fields: dict) -> str | None:
        """The filled template, or None when the record lacks a field (counted)."""
        values = {}
        for n in self.names:
            raw = fields.get(self.url_field if n in DERIVED else n)
            v = domain_of(raw) if n == "domain" else (raw if isinstance(raw, str) else
                                                      str(raw) if _number(raw) is not None else None)
            if v is None or not v.strip():
                self.stats[f"missing_{self.url_field if n in DERIVED else n}"] += 1
                return None
            values[n] = v
        return self.template.format(**values)

    def _token(self, score, unit_text: str, k: int):
        s = _number(score)
        if s is None:
            self.stats["no_score"] += 1
            return None
        if self.unprefixed and _unit_hash(unit_text, k) < self.unprefixed:
            self.stats["unprefixed"] += 1
            return None
        good = s >= self.threshold if self.higher else s <= self.threshold
        self.stats["good" if good else "bad"] += 1
        return self.good_id if good else self.bad_id

    def apply(self, text: str, fields: dict | None):
        """(prefix or None, [(control id or None, text), ...]), or None to drop the document."""
        fields = fields or {}
        prefix = None
        if self.metadata:
            prefix = self.prefix(fields)
            if prefix is None:
                self.stats["without_metadata"] += 1
                if self.drop_missing:
                    return None
            else:
                self.stats["with_metadata"] += 1
                prefix = prefix if self.write_prefix else None
        if not self.control:
            return prefix, [(None, text)]
        score = fields.get(self.control["field"])
        if not self.by_sentence:
            return prefix, [(self._token(score, text, 0), text)]
        sentences = split_sentences(text)
        if isinstance(score, (list, tuple)):
            if len(score) != len(sentences):
                self.stats["score_mismatch"] += 1
                self.stats["no_score"] += len(sentences)
                return prefix, [(None, text)]
            return prefix, [(self._token(sc, s, k), s) for k, (sc, s) in enumerate(zip(score, sentences))]
        # one score for the whole record: every sentence gets the document's token
        return prefix, [(self._token(score, s, k), s) for k, s in enumerate(sentences)]


def encode_conditioned(encode_texts, docs: list, eos_id: int, dtype):
    """(tokens, token count of each document, metadata tokens of each document) of conditioned documents.

    ``encode_texts(list of str) -> list of id lists``. Each document is its prefix's tokens,
    then each segment's control token (if any) and text tokens, then EOS. The prefix and
    every segment are tokenized separately, so a document's text tokens are the same with
    and without its prefix.
    """
    texts, where = [], []
    for i, (prefix, segments) in enumerate(docs):
        if prefix:
            where.append((i, -1))
            texts.append(prefix)
        for j, (_, seg) in enumerate(segments):
            where.append((i, j))
            texts.append(seg)
    encoded = encode_texts(texts)
    pieces = [[] for _ in docs]
    prefix_lens = np.zeros(len(docs), dtype=np.uint32)
    for (i, j), ids in zip(where, encoded):
        if j < 0:
            prefix_lens[i] = len(ids)
        else:
            ctl = docs[i][1][j][0]
            if ctl is not None:
                pieces[i].append([ctl])
        pieces[i].append(ids)
    lens = np.empty(len(docs), dtype=np.int64)
    out = []
    for i, parts in enumerate(pieces):
        n = sum(len(p) for p in parts) + 1
        lens[i] = n
        out.extend(x for p in parts for x in p)
        out.append(eos_id)
    return np.array(out, dtype=dtype), lens, prefix_lens


class PrefixMask:
    """Which positions of a source's token stream are metadata tokens, from its shards'
    document offsets and per-document metadata token counts (memory-mapped)."""

    def __init__(self, indexes: list[np.ndarray], prefixes: list[np.ndarray]):
        self.indexes = [i for i, p in zip(indexes, prefixes) if len(i) > 1]
        self.prefixes = [p for i, p in zip(indexes, prefixes) if len(i) > 1]
        sizes = [int(i[-1]) for i in self.indexes]
        self.bounds = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._total = None

    @property
    def total(self) -> int:
        """Metadata tokens in the whole stream (read on first use: 4 bytes per document)."""
        if self._total is None:
            self._total = sum(int(np.asarray(p, dtype=np.int64).sum()) for p in self.prefixes)
        return self._total

    def mask(self, g: int, n: int) -> np.ndarray:
        """Boolean (n,): True where token g .. g+n-1 of the stream is a metadata token."""
        out = np.zeros(n, dtype=bool)
        g0, end = g, g + n
        s = max(0, int(np.searchsorted(self.bounds, g, side="right")) - 1)
        while g < end and s < len(self.indexes):
            base = int(self.bounds[s])
            lo, hi = g - base, min(end, int(self.bounds[s + 1])) - base
            idx, pre = self.indexes[s], self.prefixes[s]
            # the documents that start before hi, from the one holding lo
            d0 = max(0, int(np.searchsorted(idx, lo, side="right")) - 1)
            d1 = min(int(np.searchsorted(idx, hi, side="left")), len(pre))
            if d1 > d0:
                starts = np.asarray(idx[d0:d1], dtype=np.int64)
                ends = starts + np.asarray(pre[d0:d1], dtype=np.int64)
                a, b = np.clip(starts, lo, hi) - lo, np.clip(ends, lo, hi) - lo
                diff = np.zeros(hi - lo + 1, dtype=np.int64)
                np.add.at(diff, a, 1)
                np.add.at(diff, b, -1)
                out[base + lo - g0: base + hi - g0] = np.cumsum(diff[:-1]) > 0
            g = base + hi
            s += 1
        return out


def describe(info: dict, metadata_tokens: int | None = None) -> list[str]:
    """Report lines of a source's conditioning (``malt data``, ``malt prepare``): metadata coverage and
    the control-token split, from the counts in its shards' manifests."""
    c = info.get("conditioning") or {}
    out = []
    if info.get("metadata"):
        w, wo = c.get("with_metadata", 0), c.get("without_metadata", 0)
        total = max(w + wo, 1)
        missing = {k[len("missing_"):]: v for k, v in c.items() if k.startswith("missing_") and v}
        line = f"    metadata: {w:,} of {w + wo:,} documents ({w / total:.1%}) with a prefix"
        if wo:
            how = "dropped" if info["metadata"].get("missing") == "drop" else "kept without a prefix"
            line += f"; {wo:,} {how} (no " + ", ".join(f"{k!r} {v:,}" for k, v in sorted(missing.items())) + ")"
        if metadata_tokens is not None:
            line += f"; {metadata_tokens:,} metadata tokens ({metadata_tokens / max(info['tokens'], 1):.1%} of the tokens, no loss)"
        out.append(line)
    ctl = info.get("control")
    if ctl:
        g, b, u, n = (c.get(k, 0) for k in ("good", "bad", "unprefixed", "no_score"))
        total = max(g + b + u + n, 1)
        unit = "sentences" if ctl.get("unit") == "sentence" else "documents"
        line = (f"    control ({unit}): {ctl.get('good', '<|good|>')} {g:,} ({g / total:.1%}), {ctl.get('bad', '<|bad|>')} {b:,} "
                f"({b / total:.1%}), unprefixed {u:,} ({u / total:.1%})")
        if n:
            line += f", no score {n:,}" + (f" ({c['score_mismatch']:,} documents with a score list of the wrong length)"
                                          if c.get("score_mismatch") else "")
        out.append(line + ("; in the loss" if ctl.get("loss") else "; not in the loss"))
    return out
