"""Data pipeline: sources -> tokenizer -> cached token arrays -> stateless batches.

``prepare(spec, cache_dir)`` builds (or reuses) the tokenizer and one flat
token array per source, and returns a :class:`Dataset`. Batches are a pure
function of ``(seed, split, step, i)``: sequence ``i`` of step ``step`` is the
same whatever the micro-batch split, the number of ranks or a resume, so no
data-loader state is ever saved.

Cache layout (``cache_dir``)::

    tokenizers/<kind>-<hash>/tokenizer.json   the tokenizer (+ spec.json)
    tokens/<source>-<hash>.npy                documents joined by EOS, uint16/uint32
    tokens/<source>-<hash>.json               manifest (fingerprint, counts, sha256)

The token key is the hash of (tokenizer file sha256, EOS id, source
fingerprint), so a changed source re-tokenizes only that source.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import sources as _sources
from .sources import DataError, Source, _digest, make_source
from .tokenizer import build_tokenizer

__all__ = ["prepare", "Dataset", "DataError"]

FORMAT = 1
_CHUNK_CHARS = 4_000_000  # characters per encode_batch call
_CHUNK_DOCS = 4096
_MASK = (1 << 64) - 1


# --------------------------------------------------------------------------
# file helpers
# --------------------------------------------------------------------------

def _fsync_dir(d: Path):
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_json(path: Path, obj):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        b, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (n,)})
    return b.getvalue()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(cache_dir: Path, log):
    """Serialise concurrent prepare() calls (e.g. several ranks) on one cache."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic writes still keep the cache consistent
        yield
        return
    with open(cache_dir / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log(f"data: waiting for another process preparing {cache_dir} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60] or "source"


# --------------------------------------------------------------------------
# tokenizing one source
# --------------------------------------------------------------------------

def _encode_chunks(source: Source, tok, eos_id: int, dtype, fast_bytes: bool):
    """Yield (token array, documents in it) chunks, each document followed by EOS."""
    docs: list[str] = []
    chars = 0

    def flush():
        if fast_bytes:  # byte tokenizer: id == byte value, identical to tok.encode
            parts = []
            for d in docs:
                parts.append(np.frombuffer(d.encode("utf-8"), dtype=np.uint8).astype(dtype))
                parts.append(np.array([eos_id], dtype=dtype))
            return np.concatenate(parts)
        ids: list[int] = []
        for enc in tok.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos_id)
        return np.array(ids, dtype=dtype)

    for d in source.documents():
        docs.append(d)
        chars += len(d)
        if chars >= _CHUNK_CHARS or len(docs) >= _CHUNK_DOCS:
            yield flush(), len(docs), chars
            docs, chars = [], 0
    if docs:
        yield flush(), len(docs), chars


def _tokenize_source(source: Source, tok, eos_id, dtype, npy: Path, manifest_path: Path,
                     base: dict, fast_bytes: bool, log) -> dict:
    log(f"data: tokenizing {source.name} ({source.describe()}) ...")
    t0 = time.time()
    hdr_len = len(_npy_header(dtype, 0))
    assert hdr_len == len(_npy_header(dtype, 1 << 62))
    tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp")
    n_tokens = n_docs = n_chars = 0
    prev = tok.encode_special_tokens
    tok.encode_special_tokens = True  # text that spells "<|endoftext|>" stays text
    try:
        with open(tmp, "wb") as fh:
            fh.write(b"\0" * hdr_len)
            for arr, nd, nc in _encode_chunks(source, tok, eos_id, dtype, fast_bytes):
                fh.write(arr.tobytes())
                n_tokens += len(arr)
                n_docs += nd
                n_chars += nc
            if n_docs == 0:
                raise DataError(
                    f"source '{source.name}' ({source.describe()}) yields no text"
                    + (f" ({source.skipped:,} records skipped, e.g. {source.skip_notes[0]})"
                       if source.skipped else "")
                    + "; check the path"
                    + (f" and text_field '{source.text_field}'" if not source.builtin else ""))
            fh.seek(0)
            hdr = _npy_header(dtype, n_tokens)
            assert len(hdr) == hdr_len
            fh.write(hdr)
            fh.flush()
            os.fsync(fh.fileno())
        sha = _sha256_file(tmp)
        os.replace(tmp, npy)
    finally:
        tok.encode_special_tokens = prev
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(npy.parent)
    if source.skipped:
        log(f"data: {source.name}: skipped {source.skipped:,} broken record(s), e.g. "
            + "; ".join(source.skip_notes[:3]))
    manifest = dict(base, n_tokens=n_tokens, n_documents=n_docs, n_chars=n_chars,
                    skipped=source.skipped, skip_notes=source.skip_notes,
                    file=npy.name, file_bytes=hdr_len + n_tokens * np.dtype(dtype).itemsize,
                    header_bytes=hdr_len, sha256=sha)
    _atomic_write_json(manifest_path, manifest)
    dt = time.time() - t0
    log(f"data: tokenized {source.name}: {n_docs:,} documents, {n_chars:,} characters -> "
        f"{n_tokens:,} tokens in {dt:.1f}s")
    return manifest


def _open_cached(npy: Path, manifest: dict, verify: bool) -> np.ndarray:
    fix = f"delete {npy} and {npy.with_suffix('.json')} to rebuild it"
    if not npy.is_file():
        raise DataError(f"token cache file {npy} is missing but its manifest exists; {fix}")
    size = npy.stat().st_size
    if size != manifest["file_bytes"]:
        raise DataError(f"token cache file {npy} is truncated or corrupt: {size:,} bytes, "
                        f"expected {manifest['file_bytes']:,}; {fix}")
    try:
        arr = np.load(npy, mmap_mode="r")
    except Exception as e:
        raise DataError(f"token cache file {npy} is corrupt ({e}); {fix}") from None
    if arr.dtype != np.dtype(manifest["dtype"]) or arr.shape != (manifest["n_tokens"],):
        raise DataError(f"token cache file {npy} is corrupt: header says {arr.dtype}{arr.shape}, "
                        f"manifest says {manifest['dtype']}({manifest['n_tokens']},); {fix}")
    if verify and _sha256_file(npy) != manifest["sha256"]:
        raise DataError(f"token cache file {npy} is corrupt: sha256 mismatch; {fix}")
    return arr


# --------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------

def prepare(spec: dict, cache_dir: str | os.PathLike, log: Callable[[str], None] = print) -> "Dataset":
    """Build or reuse the tokenizer and token caches described by ``spec``.

    Raises :class:`DataError` for every user-facing problem.
    """
    spec = dict(spec)
    base_dir = spec.get("base_dir") or "."
    entries = spec.get("sources") or []
    if not entries:
        raise DataError("data.sources is empty; add at least one source")
    validation = float(spec.get("validation", 0.0) or 0.0)
    if not 0.0 <= validation < 1.0:
        raise DataError(f"data.validation must be in [0, 1), got {validation}")
    srcs = [make_source(e, base_dir) for e in entries]
    names = [s.name for s in srcs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"duplicate source name(s): {', '.join(dup)}")
    weights = [s.weight for s in srcs]
    _check_weights(weights, names)
    verify = bool(spec.get("verify_cache")) or \
        os.environ.get("MALT_VERIFY_CACHE", "").lower() in ("1", "true", "yes")

    cache = Path(cache_dir).expanduser().resolve()
    (cache / "tokens").mkdir(parents=True, exist_ok=True)
    try:
        with _locked(cache, log):
            tok, tok_path, tok_hash, specials = build_tokenizer(
                spec.get("tokenizer") or {}, srcs, cache, base_dir, log)
            eos_id = tok.token_to_id(specials[0])
            vocab = tok.get_vocab_size()
            dtype = np.dtype(np.uint16 if vocab <= 65536 else np.uint32)
            fast_bytes = (spec.get("tokenizer") or {}).get("kind") == "bytes"
            arrays, infos = [], []
            for s in srcs:
                fp = s.fingerprint()
                key = _digest({"tokenizer": tok_hash, "eos": eos_id, "source": fp, "format": FORMAT})
                stem = f"{_safe(s.name)}-{key[:16]}"
                npy = cache / "tokens" / f"{stem}.npy"
                mpath = cache / "tokens" / f"{stem}.json"
                manifest = None
                if mpath.is_file():
                    try:
                        manifest = json.loads(mpath.read_text())
                        if manifest.get("key") != key:
                            manifest = None
                    except (OSError, ValueError):
                        manifest = None
                if manifest is None:
                    base = {"format": FORMAT, "key": key, "source": s.name, "path": s.describe(),
                            "fingerprint": fp, "tokenizer_sha256": tok_hash, "eos_id": eos_id,
                            "dtype": dtype.name}
                    manifest = _tokenize_source(s, tok, eos_id, dtype, npy, mpath, base,
                                                fast_bytes, log)
                else:
                    log(f"data: cache hit {s.name}: {manifest['n_tokens']:,} tokens")
                arr = _open_cached(npy, manifest, verify)
                n = len(arr)
                n_val = int(n * validation)
                arrays.append(arr)
                infos.append({"name": s.name, "path": s.describe(), "weight": s.weight,
                              "tokens": n, "train_tokens": n - n_val, "val_tokens": n_val,
                              "documents": manifest["n_documents"], "skipped": manifest["skipped"],
                              "file": str(npy)})
    finally:
        _sources._BUILTIN_MEMO.clear()
    ds = Dataset(tok, tok_path, eos_id, int(spec.get("seed", 0)), validation, infos, arrays)
    if spec.get("seq_len"):
        ds.check(int(spec["seq_len"]), "train")
        if validation > 0:
            ds.check(int(spec["seq_len"]), "val")
    return ds


def _check_weights(weights, names) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(names),):
        raise DataError(f"expected {len(names)} mixture weights (one per source: "
                        f"{', '.join(names)}), got {len(w)}")
    bad = [f"{n}={x}" for n, x in zip(names, w) if not np.isfinite(x) or x < 0]
    if bad:
        raise DataError(f"mixture weights must be finite and >= 0: {', '.join(bad)}")
    if w.sum() <= 0:
        raise DataError("mixture weights are all zero; give at least one source a positive weight")
    return w


# --------------------------------------------------------------------------
# stateless sampling
# --------------------------------------------------------------------------

_U = np.uint64


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U(27))) * _U(0x94D049BB133111EB)
    return z ^ (z >> _U(31))


def _streams(seed: int, split: int, step: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two independent uint64 random words per sequence index: a pure function of the inputs."""
    h = np.full(idx.shape, 0x9E3779B97F4A7C15, dtype=np.uint64)
    for part in (seed, split, step):
        h = _mix(h ^ _U(part & _MASK)) + _U(0x9E3779B97F4A7C15)
    h = _mix(h ^ idx.astype(np.uint64))
    return _mix(h ^ _U(0xD1B54A32D192ED03)), _mix(h ^ _U(0x8CB92BA72F3D8DD7))


class Dataset:
    """Token arrays of every source plus stateless batch sampling."""

    SPLITS = {"train": 0, "val": 1}

    def __init__(self, tokenizer, tokenizer_path: str, eos_id: int, seed: int, validation: float,
                 sources: list[dict], arrays: list[np.ndarray]):
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer_path
        self.eos_id = eos_id
        self.vocab_size = tokenizer.get_vocab_size()
        self.seed = seed
        self.validation = validation
        self.sources = sources
        self.names = [s["name"] for s in sources]
        self._parts = {
            "train": [a[: s["train_tokens"]] for a, s in zip(arrays, sources)],
            "val": [a[s["train_tokens"]:] for a, s in zip(arrays, sources)],
        }
        self._weights = _check_weights([s["weight"] for s in sources], self.names)
        self._checked: set = set()

    # -- helpers -----------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _weight_vector(self, weights) -> np.ndarray:
        if weights is None:
            return self._weights
        if isinstance(weights, dict):
            unknown = set(weights) - set(self.names)
            if unknown:
                raise DataError(f"mixture weights name unknown source(s) {sorted(unknown)}; "
                                f"sources are: {', '.join(self.names)}")
            weights = [weights.get(n, 0.0) for n in self.names]
        return _check_weights(weights, self.names)

    def check(self, seq_len: int, split: str = "train", weights=None):
        """Raise DataError if a source that can be sampled is shorter than seq_len + 1."""
        w = self._weight_vector(weights)
        key = (split, seq_len, tuple(w > 0))
        if key in self._checked:
            return
        if split not in self.SPLITS:
            raise DataError(f"unknown split '{split}' (expected 'train' or 'val')")
        for name, part, wi in zip(self.names, self._parts[split], w):
            if wi <= 0 or len(part) >= seq_len + 1:
                continue
            if split == "train":
                raise DataError(
                    f"source '{name}' has {len(part):,} training tokens, fewer than "
                    f"seq_len+1 = {seq_len + 1:,}; add data to it or lower train.seq_len")
            if self.validation <= 0:
                raise DataError("validation batches were asked for but data.validation is 0; "
                                "set data.validation (e.g. 1%) or turn evaluation off")
            raise DataError(
                f"source '{name}' has {len(part):,} validation tokens, fewer than "
                f"seq_len+1 = {seq_len + 1:,}; raise data.validation (now {self.validation:g}) "
                f"or add data to it")
        self._checked.add(key)

    def sample_plan(self, split: str, step: int, start: int, count: int, seq_len: int,
                    weights=None) -> tuple[np.ndarray, np.ndarray]:
        """(source index, window start) of sequences start..start+count-1 of ``step``.

        Sequence ``i`` depends only on (seed, split, step, i, weights, source sizes).
        """
        self.check(seq_len, split, weights)
        w = self._weight_vector(weights)
        parts = self._parts[split]
        idx = np.arange(start, start + count, dtype=np.int64)
        r_src, r_pos = _streams(self.seed, self.SPLITS[split], step, idx)
        u = (r_src >> _U(11)).astype(np.float64) * (1.0 / (1 << 53))
        cum = np.cumsum(w)
        cum = cum / cum[-1]
        src = np.searchsorted(cum, u, side="right")
        src = np.minimum(src, int(np.flatnonzero(w > 0)[-1]))
        spans = np.array([max(len(p) - seq_len, 1) for p in parts], dtype=np.uint64)
        pos = (r_pos % spans[src]).astype(np.int64)
        return src, pos

    def batch(self, split: str, step: int, start: int, count: int, seq_len: int, weights=None):
        """(x, y) int64 tensors of shape (count, seq_len); y is x shifted left by one token.

        ``weights`` (optional): per-source mixture weights for this step (a list in source
        order or a dict name -> weight); defaults to the weights of the spec.
        """
        import torch
        src, pos = self.sample_plan(split, step, start, count, seq_len, weights)
        parts = self._parts[split]
        buf = np.empty((count, seq_len + 1), dtype=np.int64)
        for j in range(count):
            p = int(pos[j])
            buf[j] = parts[src[j]][p: p + seq_len + 1]
        x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
        return x, y

    def summary(self) -> str:
        w = self._weights / self._weights.sum()
        rows = [("source", "path", "weight", "documents", "skipped", "train tokens", "val tokens")]
        for s, wi in zip(self.sources, w):
            rows.append((s["name"], s["path"], f"{wi:.1%}", f"{s['documents']:,}", f"{s['skipped']:,}",
                         f"{s['train_tokens']:,}", f"{s['val_tokens']:,}"))
        tot = ("total", "", "100%", f"{sum(s['documents'] for s in self.sources):,}",
               f"{sum(s['skipped'] for s in self.sources):,}",
               f"{sum(s['train_tokens'] for s in self.sources):,}",
               f"{sum(s['val_tokens'] for s in self.sources):,}")
        rows.append(tot)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        left = {0, 1}
        lines = [f"tokenizer: {self.tokenizer_path} (vocab {self.vocab_size:,}, eos id {self.eos_id})"]
        for k, r in enumerate(rows):
            lines.append("  ".join(c.ljust(wd) if i in left else c.rjust(wd)
                                   for i, (c, wd) in enumerate(zip(r, widths))).rstrip())
            if k == 0 or k == len(rows) - 2:
                lines.append("  ".join("-" * wd for wd in widths))
        return "\n".join(lines)

    def __repr__(self):
        return f"<Dataset {len(self.sources)} sources, vocab {self.vocab_size}>"
