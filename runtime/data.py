"""Data pipeline: sources -> tokenizer -> cached token shards -> stateless batches.

``prepare(spec, cache_dir)`` builds (or reuses) the tokenizer and the token
shards of every source, and returns a :class:`Dataset`. Batches are a pure
function of ``(seed, split, step, i)``: sequence ``i`` of step ``step`` is the
same whatever the micro-batch split, the number of ranks or a resume, so no
data-loader state is ever saved.

Cache layout (``cache_dir``)::

    tokenizers/<kind>-<hash>/tokenizer.json     the tokenizer (+ spec.json)
    tokens/<source>/<key>.tokens.npy            documents, each followed by EOS (uint16, or uint32
                                                when the vocabulary has more than 65,536 entries)
    tokens/<source>/<key>.index.npy             uint64 document offsets: document i is
                                                tokens[index[i]:index[i+1]] (its EOS included)
    tokens/<source>/<key>.hashes.npy            dedupe only: the kept documents' 64-bit hashes
    tokens/<source>/<key>.json                  the shard's manifest: files, tokenizer sha256,
                                                counts, skipped and filtered records, checksums

A source's files (sorted by path) are cut into shards of about
``SHARD_INPUT_BYTES`` of input (see :func:`plan_shards`); a shard's key hashes its files' paths, sizes
and modification times, the tokenizer, the source's ``text_field``, filters
and ``dedupe`` (and, with ``dedupe``, the key of the shard before it, whose
kept documents it is deduplicated against). So a changed file re-tokenizes its
shard only (and, with ``dedupe``, the shards after it); a new tokenizer
re-tokenizes everything. The manifest is written last: a shard without one
was never finished. Opening a shard checks its size, header, document index
and a checksum of its first and last 64 KiB; ``verify`` checks the sha256 of
everything.

Documents are read and filtered in this process and tokenized in batches by a
pool of worker processes (``workers``); the output is the same for any number
of workers.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import sources as _sources
from .sources import DataError, Source, _digest, make_source
from .tokenizer import build_tokenizer

__all__ = ["prepare", "Dataset", "DataError", "Tokens", "default_workers"]

FORMAT = 2
SHARD_INPUT_BYTES = 256 << 20   # input bytes per shard (a larger file is one shard)
POOL_MIN_BYTES = 16 << 20       # below this much input to tokenize, no worker processes are started
_BATCH_CHARS = 1_000_000        # characters per tokenizer batch
_BATCH_DOCS = 2048
_EDGE = 1 << 16                 # bytes at each end of a payload covered by the cheap checksum
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


class _NpyWriter:
    """Append 1-D chunks to a .npy file of unknown final length, hashing the payload as it goes."""

    def __init__(self, path: Path, dtype):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.header_bytes = len(_npy_header(self.dtype, 0))
        assert self.header_bytes == len(_npy_header(self.dtype, 1 << 62))  # fixed-size header
        self.fh = open(path, "wb")
        self.fh.write(b"\0" * self.header_bytes)
        self.n = 0
        self.sha = hashlib.sha256()

    def write(self, arr: np.ndarray):
        b = np.ascontiguousarray(arr, dtype=self.dtype).tobytes()
        self.fh.write(b)
        self.sha.update(b)
        self.n += len(b) // self.dtype.itemsize

    def finish(self) -> dict:
        self.fh.seek(0)
        self.fh.write(_npy_header(self.dtype, self.n))
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        payload = self.n * self.dtype.itemsize
        return {"n": self.n, "dtype": self.dtype.name, "bytes": self.header_bytes + payload,
                "header_bytes": self.header_bytes, "sha256": self.sha.hexdigest(),
                "edge_sha256": _edge_sha(self.path, self.header_bytes, payload)}

    def abort(self):
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def _edge_sha(path: Path, header: int, payload: int) -> str:
    """sha256 of the first and last 64 KiB of a file's payload (a cheap check run on every open)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(header)
        h.update(fh.read(min(_EDGE, payload)))
        if payload > _EDGE:
            fh.seek(header + max(_EDGE, payload - _EDGE))
            h.update(fh.read())
    return h.hexdigest()


def _payload_sha(path: Path, header: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(header)
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


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _counts(c: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])) if v)


# --------------------------------------------------------------------------
# tokenizing: batches of documents, in this process or in worker processes
# --------------------------------------------------------------------------

def _encode(tok, docs: list[str], eos_id: int, dtype, fast_bytes: bool):
    """(tokens of the documents, each followed by EOS; token count of each document)."""
    if fast_bytes:  # byte tokenizer: id == byte value, identical to tok.encode
        parts, lens = [], np.empty(len(docs), dtype=np.int64)
        eos = np.array([eos_id], dtype=dtype)
        for i, d in enumerate(docs):
            b = np.frombuffer(d.encode("utf-8"), dtype=np.uint8)
            parts.append(b.astype(dtype))
            parts.append(eos)
            lens[i] = len(b) + 1
        return (np.concatenate(parts) if parts else np.zeros(0, dtype)), lens
    ids: list[int] = []
    lens = np.empty(len(docs), dtype=np.int64)
    for i, enc in enumerate(tok.encode_batch(docs, add_special_tokens=False)):
        e = enc.ids
        ids.extend(e)
        ids.append(eos_id)
        lens[i] = len(e) + 1
    return np.array(ids, dtype=dtype), lens


_WORKER: dict = {}


def _worker_init(tok_json: str, eos_id: int, dtype: str, fast_bytes: bool):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tok_json)
    tok.encode_special_tokens = True
    _WORKER.update(tok=tok, eos_id=eos_id, dtype=np.dtype(dtype), fast_bytes=fast_bytes)


def _worker_encode(docs: list[str]):
    w = _WORKER
    return _encode(w["tok"], docs, w["eos_id"], w["dtype"], w["fast_bytes"])


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _Encoder:
    """Tokenizes batches in order, in this process or in a pool started on first use."""

    def __init__(self, tok, eos_id: int, dtype, fast_bytes: bool, workers: int):
        self.tok, self.eos_id, self.dtype, self.fast_bytes = tok, eos_id, dtype, fast_bytes
        self.workers = workers
        self.pool = None

    def submit(self, docs: list[str]):
        if self.workers <= 1:
            return _Done(_encode(self.tok, docs, self.eos_id, self.dtype, self.fast_bytes))
        if self.pool is None:
            self.pool = self._start_pool()
        return self.pool.apply_async(_worker_encode, (docs,))

    def _start_pool(self):
        import multiprocessing as mp
        import types

        # spawn: safe whatever the parent holds (CUDA, threads, tokenizers' thread pool). A spawned
        # child normally re-runs the parent's main script first (train.py: torch and the model; a
        # script without an `if __name__ == "__main__"` guard: prepare() again, waiting forever on
        # the cache lock). The workers need only this module, so they are started while __main__
        # is an empty module.
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            return mp.get_context("spawn").Pool(
                self.workers, initializer=_worker_init,
                initargs=(self.tok.to_str(), self.eos_id, np.dtype(self.dtype).name, self.fast_bytes))
        finally:
            if main is not None:
                sys.modules["__main__"] = main

    @property
    def in_flight(self) -> int:
        return 2 * self.workers if self.pool is not None else 1

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


class _Progress:
    """A rich progress bar on a terminal; otherwise a log line every 15 seconds."""

    def __init__(self, total_bytes: int, log, bar: bool | None):
        self.total = max(total_bytes, 1)
        self.log = log
        self.done = 0
        self.docs = 0
        self.t0 = self.t_last = time.perf_counter()
        self.bar = None
        if bar is None:
            bar = sys.stderr.isatty()
        if bar:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)
            self.bar = Progress(TextColumn("[bold]tokenizing {task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TextColumn("{task.fields[docs]} docs"), TimeRemainingColumn(),
                                console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=self.total, docs="0")
        self.name = ""

    def update(self, name: str, done: int, docs: int):
        self.name, self.done, self.docs = name, done, docs
        if self.bar is not None:
            self.bar.update(self.task, description=name, completed=done, docs=f"{docs:,}")
            return
        now = time.perf_counter()
        if now - self.t_last >= 15:
            self.t_last = now
            rate = done / max(now - self.t0, 1e-9)
            self.log(f"data: tokenizing {name}: {done / self.total:.0%} of {_human_bytes(self.total)}, "
                     f"{docs:,} documents, {_human_bytes(rate)}/s")

    def close(self):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# --------------------------------------------------------------------------
# shards
# --------------------------------------------------------------------------

def plan_shards(source: Source) -> list[list]:
    """The source's files, in path order, cut into shards of about SHARD_INPUT_BYTES of input.

    The cuts depend on each file alone, so a changed, added or removed file moves no other
    shard's boundaries: a file of at least half a shard is a shard by itself; among runs of
    smaller files a shard ends after each file whose path hashes to 0 modulo M, a power of two
    near the number of such files that fill a shard.
    """
    files = source.files()
    if source.builtin:
        return [files] if files else []
    big = SHARD_INPUT_BYTES // 2
    small = [f.size for f in files if f.size < big]
    per = max(1.0, SHARD_INPUT_BYTES / max(1.0, sum(small) / max(1, len(small))))
    m = 1 << max(0, round(np.log2(per)))
    groups, cur = [], []
    for f in files:
        if f.size >= big:
            if cur:
                groups.append(cur)
            groups.append([f])
            cur = []
            continue
        cur.append(f)
        h = int.from_bytes(hashlib.blake2b(f.rel.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
        if h % m == 0:
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return groups


class _Shard:
    def __init__(self, directory: Path, key: str, files: list):
        self.key = key
        self.files = files
        stem = key[:24]
        self.tokens = directory / f"{stem}.tokens.npy"
        self.index = directory / f"{stem}.index.npy"
        self.hashes = directory / f"{stem}.hashes.npy"
        self.manifest_path = directory / f"{stem}.json"
        self.manifest: dict | None = None

    def load_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            m = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(m, dict) or m.get("key") != self.key or m.get("format") != FORMAT:
            return None
        self.manifest = m
        return m

    def input_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _shard_keys(source: Source, base: dict) -> list[_Shard]:
    directory = Path(base["dir"]) / _safe(source.name)
    out, prev = [], None
    for files in plan_shards(source):
        info = {"format": FORMAT, "tokenizer": base["tokenizer_sha256"], "eos": base["eos_id"],
                "dtype": base["dtype"], "source": source.config(),
                "files": ([source.fingerprint()] if source.builtin
                          else [(f.full, f.size, f.mtime_ns) for f in files]),
                "prev": prev if source.dedupe else None}
        key = _digest(info)
        out.append(_Shard(directory, key, files))
        prev = key
    return out


def _tokenize_shard(source: Source, shard: _Shard, seen: set | None, enc: _Encoder, base: dict,
                    progress: _Progress, progress_base: int) -> dict:
    shard.tokens.parent.mkdir(parents=True, exist_ok=True)
    tag = f".{os.getpid()}.tmp"
    tmp = {k: p.with_name(p.name + tag) for k, p in
           (("tokens", shard.tokens), ("index", shard.index), ("hashes", shard.hashes))}
    wt = _NpyWriter(tmp["tokens"], base["dtype"])
    wi = _NpyWriter(tmp["index"], np.uint64)
    wh = _NpyWriter(tmp["hashes"], np.uint64) if source.dedupe else None
    writers = [w for w in (wt, wi, wh) if w is not None]
    source.reset_stats()
    offset = 0
    n_docs = n_chars = 0
    pending: collections.deque = collections.deque()
    hashes: list[int] = [] if source.dedupe else None

    def drain(limit: int):
        nonlocal offset
        while len(pending) > limit:
            arr, lens = pending.popleft().get()
            wt.write(arr)
            wi.write(offset + np.cumsum(lens))
            offset += int(lens.sum())
            progress.update(source.name, progress_base + source.progress_bytes(), progress.docs + len(lens))

    try:
        wi.write(np.zeros(1, dtype=np.uint64))
        batch: list[str] = []
        chars = 0
        for doc in source.documents(shard.files, seen, hashes):
            batch.append(doc)
            chars += len(doc)
            if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
                n_docs += len(batch)
                n_chars += chars
                pending.append(enc.submit(batch))
                if wh is not None:
                    wh.write(np.array(hashes, dtype=np.uint64))
                    hashes.clear()
                batch, chars = [], 0
                drain(enc.in_flight)
        if batch:
            n_docs += len(batch)
            n_chars += chars
            pending.append(enc.submit(batch))
        if wh is not None and hashes:
            wh.write(np.array(hashes, dtype=np.uint64))
        drain(0)
        infos = {k: w.finish() for k, w in zip(("tokens", "index", "hashes"), writers)}
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for k in infos:
        os.replace(tmp[k], getattr(shard, k))
    _fsync_dir(shard.tokens.parent)
    assert infos["tokens"]["n"] == offset and infos["index"]["n"] == n_docs + 1
    manifest = {
        "format": FORMAT, "key": shard.key, "source": source.name, "path": source.describe(),
        "files": [[f.rel, f.size, f.mtime_ns] for f in shard.files],
        "tokenizer_sha256": base["tokenizer_sha256"], "eos_id": base["eos_id"], "dtype": base["dtype"],
        "config": source.config(),
        "n_tokens": offset, "n_documents": n_docs, "n_chars": n_chars, "n_records": source.records,
        "skipped": dict(source.skipped), "filtered": dict(source.filtered), "notes": list(source.notes),
        **{f"{k}_file": {"name": getattr(shard, k).name, **v} for k, v in infos.items()},
    }
    _atomic_write_json(shard.manifest_path, manifest)
    shard.manifest = manifest
    return manifest


def _open_npy(path: Path, info: dict, verify: bool, fix: str, expect_dtype) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"token cache file {path} is missing but its manifest exists; {fix}")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise DataError(f"token cache file {path} is truncated or corrupt: {size:,} bytes, "
                        f"expected {info['bytes']:,}; {fix}")
    payload = size - info["header_bytes"]
    try:
        arr = np.load(path, mmap_mode="r") if info["n"] else np.load(path)
    except Exception as e:
        raise DataError(f"token cache file {path} is corrupt ({e}); {fix}") from None
    if arr.dtype != np.dtype(expect_dtype) or arr.shape != (info["n"],):
        raise DataError(f"token cache file {path} is corrupt: its header says {arr.dtype}{arr.shape}, "
                        f"the manifest {np.dtype(expect_dtype)}({info['n']},); {fix}")
    if _edge_sha(path, info["header_bytes"], payload) != info["edge_sha256"]:
        raise DataError(f"token cache file {path} is corrupt: checksum mismatch; {fix}")
    if verify and _payload_sha(path, info["header_bytes"]) != info["sha256"]:
        raise DataError(f"token cache file {path} is corrupt: sha256 mismatch; {fix}")
    return arr


def _open_shard(shard: _Shard, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    m = shard.manifest
    fix = f"delete its manifest {shard.manifest_path} and that shard is tokenized again on the next start"
    toks = _open_npy(shard.tokens, m["tokens_file"], verify, fix, m["dtype"])
    index = _open_npy(shard.index, m["index_file"], verify, fix, np.uint64)
    if len(index) != m["n_documents"] + 1 or int(index[0]) != 0 or int(index[-1]) != len(toks):
        raise DataError(f"token cache file {shard.index} is corrupt: its offsets do not cover "
                        f"{shard.tokens}; {fix}")
    if verify and len(index) > 1 and not bool((np.diff(index.astype(np.int64)) > 0).all()):
        raise DataError(f"token cache file {shard.index} is corrupt: offsets are not increasing; {fix}")
    return toks, index


class Tokens:
    """A read-only view of a source's tokens, stored in several memory-mapped shards."""

    def __init__(self, arrays: list[np.ndarray], start: int = 0, stop: int | None = None):
        self.arrays = [a for a in arrays if len(a)]
        self.bounds = np.concatenate([[0], np.cumsum([len(a) for a in self.arrays], dtype=np.int64)])
        total = int(self.bounds[-1])
        self.start = start
        self.stop = total if stop is None else stop
        assert 0 <= self.start <= self.stop <= total

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def dtype(self):
        return self.arrays[0].dtype if self.arrays else np.dtype(np.uint16)

    def slice(self, a: int, b: int) -> "Tokens":
        a, b = max(0, a), min(len(self), b)
        t = Tokens.__new__(Tokens)
        t.arrays, t.bounds = self.arrays, self.bounds
        t.start, t.stop = self.start + a, self.start + max(a, b)
        return t

    def window(self, p: int, n: int) -> np.ndarray:
        """Tokens p .. p+n-1 of this view, as a new array."""
        if p < 0 or p + n > len(self):
            raise IndexError(f"window {p}:{p + n} outside 0:{len(self)}")
        g = self.start + p
        i = int(np.searchsorted(self.bounds, g, side="right")) - 1
        lo = g - int(self.bounds[i])
        a = self.arrays[i] if self.arrays else np.zeros(0, self.dtype)
        if lo + n <= len(a):
            return np.array(a[lo: lo + n])
        out, need = [], n
        while need > 0:
            a = self.arrays[i]
            piece = a[lo: lo + need]
            out.append(piece)
            need -= len(piece)
            i, lo = i + 1, 0
        return np.concatenate(out)

    def numpy(self) -> np.ndarray:
        return self.window(0, len(self))


def default_workers() -> int:
    env = os.environ.get("MALT_DATA_WORKERS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise DataError(f"MALT_DATA_WORKERS must be a whole number, got {env!r}") from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 16))


# --------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------

def prepare(spec: dict, cache_dir: str | os.PathLike, log: Callable[[str], None] = print,
            workers: int | None = None, verify: bool | None = None, progress: bool | None = None) -> "Dataset":
    """Build or reuse the tokenizer and token shards described by ``spec``.

    ``workers``: tokenizer processes (default ``$MALT_DATA_WORKERS`` or the CPU count,
    at most 16; none are started for less than POOL_MIN_BYTES of input).
    ``verify``: check the sha256 of every shard (default ``spec["verify_cache"]`` or
    ``$MALT_VERIFY_CACHE``). ``progress``: a progress bar (default: when stderr is a terminal).
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
    if verify is None:
        verify = bool(spec.get("verify_cache")) or \
            os.environ.get("MALT_VERIFY_CACHE", "").lower() in ("1", "true", "yes")
    workers = default_workers() if workers is None else max(1, int(workers))

    cache = Path(cache_dir).expanduser().resolve()
    (cache / "tokens").mkdir(parents=True, exist_ok=True)
    enc = None
    bar = None
    tok = None
    try:
        with _locked(cache, log):
            tok, tok_path, tok_hash, specials = build_tokenizer(
                spec.get("tokenizer") or {}, srcs, cache, base_dir, log)
            eos_id = tok.token_to_id(specials[0])
            vocab = tok.get_vocab_size()
            model_vocab = spec.get("model_vocab")
            if model_vocab and vocab > int(model_vocab):
                raise DataError(f"the tokenizer has {vocab:,} tokens but the model's vocabulary is {int(model_vocab):,}; "
                                f"raise model.vocab_size (or remove it) and compile again")
            dtype = np.dtype(np.uint16 if vocab <= 65536 else np.uint32)
            fast_bytes = (spec.get("tokenizer") or {}).get("kind") == "bytes"
            base = {"dir": str(cache / "tokens"), "tokenizer_sha256": tok_hash, "eos_id": eos_id,
                    "dtype": dtype.name}
            plans = [(s, _shard_keys(s, base)) for s in srcs]
            todo_bytes = sum(sh.input_bytes() for _, shards in plans for sh in shards if sh.load_manifest() is None)
            n_workers = workers if todo_bytes >= POOL_MIN_BYTES else 1
            tok.encode_special_tokens = True  # text that spells "<|endoftext|>" stays text
            enc = _Encoder(tok, eos_id, dtype, fast_bytes, n_workers)
            if todo_bytes:
                bar = _Progress(todo_bytes, log, progress)
            done_bytes = 0
            token_views, infos = [], []
            for s, shards in plans:
                seen: set | None = set() if s.dedupe else None
                pending_hashes: list[_Shard] = []  # cached shards whose hashes a later shard may need
                built = 0
                t0 = time.time()
                for sh in shards:
                    if sh.manifest is not None:
                        if s.dedupe:
                            pending_hashes.append(sh)
                        continue
                    if s.dedupe:
                        for old in pending_hashes:
                            fix = f"delete its manifest {old.manifest_path} and that shard is tokenized again on the next start"
                            seen.update(_open_npy(old.hashes, old.manifest["hashes_file"], False, fix,
                                                  np.uint64).tolist())
                        pending_hashes = []
                    if built == 0:
                        log(f"data: tokenizing {s.name} ({s.describe()}) ..." + (
                            f" (shard {shards.index(sh) + 1} of {len(shards)} on)" if len(shards) > 1 and
                            any(x.manifest is not None for x in shards) else ""))
                    _tokenize_shard(s, sh, seen, enc, base, bar, done_bytes)
                    done_bytes += sh.input_bytes()
                    built += 1
                arrays = []
                totals = collections.Counter()
                skipped, filtered, notes = collections.Counter(), collections.Counter(), []
                for sh in shards:
                    m = sh.manifest
                    toks, _ = _open_shard(sh, verify)
                    arrays.append(toks)
                    totals.update(tokens=m["n_tokens"], documents=m["n_documents"], chars=m["n_chars"],
                                  records=m["n_records"])
                    skipped.update(m["skipped"])
                    filtered.update(m["filtered"])
                    notes += m["notes"][: max(0, 5 - len(notes))]
                if totals["documents"] == 0:
                    why = []
                    if skipped:
                        why.append(f"skipped {_counts(skipped)}")
                    if filtered:
                        why.append(f"filtered {_counts(filtered)}")
                    raise DataError(
                        f"source '{s.name}' ({s.describe()}) yields no text"
                        + (f": {totals['records']:,} records, " + "; ".join(why) if why
                           else (": no files" if not s.files() else ""))
                        + (f" (e.g. {notes[0]})" if notes else "")
                        + "; check the path"
                        + (f", text_field '{s.text_field}'" if not s.builtin else "")
                        + (" and the filter" if s.filter or s.dedupe else ""))
                if built:
                    log(f"data: tokenized {s.name}: {totals['documents']:,} documents, {totals['chars']:,} characters"
                        f" -> {totals['tokens']:,} tokens in {time.time() - t0:.1f}s"
                        + (f" ({built} of {len(shards)} shards)" if len(shards) > 1 else ""))
                else:
                    log(f"data: cache hit {s.name}: {totals['tokens']:,} tokens")
                if skipped:
                    log(f"data: {s.name}: skipped {sum(skipped.values()):,} broken record(s) ({_counts(skipped)}), e.g. "
                        + "; ".join(notes[:3]))
                if filtered:
                    log(f"data: {s.name}: filtered out {sum(filtered.values()):,} document(s): {_counts(filtered)}")
                view = Tokens(arrays)
                n = len(view)
                n_val = int(n * validation)
                token_views.append(view)
                infos.append({"name": s.name, "path": s.describe(), "weight": s.weight,
                              "tokens": n, "train_tokens": n - n_val, "val_tokens": n_val,
                              "documents": totals["documents"], "chars": totals["chars"], "records": totals["records"],
                              "skipped": sum(skipped.values()), "skipped_by": dict(skipped),
                              "filtered": sum(filtered.values()), "filtered_by": dict(filtered), "notes": notes,
                              "shards": [str(sh.tokens) for sh in shards],
                              "index_files": [str(sh.index) for sh in shards]})
    finally:
        if bar is not None:
            bar.close()
        if enc is not None:
            enc.close()
        if tok is not None:
            tok.encode_special_tokens = False  # Dataset.encode (prompts) reads special tokens again
        _sources._BUILTIN_MEMO.clear()
    ds = Dataset(tok, tok_path, eos_id, int(spec.get("seed", 0)), validation, infos, token_views)
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
    """The tokens of every source (memory-mapped shards) plus stateless batch sampling."""

    SPLITS = {"train": 0, "val": 1}

    def __init__(self, tokenizer, tokenizer_path: str, eos_id: int, seed: int, validation: float,
                 sources: list[dict], arrays: list["Tokens"]):
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer_path
        self.eos_id = eos_id
        self.vocab_size = tokenizer.get_vocab_size()
        self.seed = seed
        self.validation = validation
        self.sources = sources
        self.names = [s["name"] for s in sources]
        self._tokens = list(arrays)
        self._parts = {
            "train": [a.slice(0, s["train_tokens"]) for a, s in zip(arrays, sources)],
            "val": [a.slice(s["train_tokens"], len(a)) for a, s in zip(arrays, sources)],
        }
        self._weights = _check_weights([s["weight"] for s in sources], self.names)
        self._checked: set = set()

    # -- helpers -----------------------------------------------------------
    def tokens(self, source) -> "Tokens":
        """All tokens of a source (by index or name): documents, each followed by EOS."""
        i = self.names.index(source) if isinstance(source, str) else int(source)
        return self._tokens[i]

    def document_offsets(self, source) -> np.ndarray:
        """Start of every document of a source in :meth:`tokens`, plus its end (n_documents + 1 values)."""
        i = self.names.index(source) if isinstance(source, str) else int(source)
        out, base = [np.zeros(1, dtype=np.int64)], 0
        for path in self.sources[i]["index_files"]:
            idx = np.load(path, mmap_mode="r").astype(np.int64)
            out.append(idx[1:] + base)
            base += int(idx[-1])
        return np.concatenate(out)

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
            buf[j] = parts[src[j]].window(p, seq_len + 1)
        x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
        y = torch.from_numpy(np.ascontiguousarray(buf[:, 1:]))
        return x, y

    def epochs(self, run_tokens: int, weights=None) -> list[float]:
        """How many times a run drawing ``run_tokens`` training tokens goes through each source's training tokens."""
        w = self._weight_vector(weights)
        w = w / w.sum()
        return [float(run_tokens * wi / s["train_tokens"]) if s["train_tokens"] else float("inf")
                for s, wi in zip(self.sources, w)]

    def summary(self, run_tokens: int | None = None, drawn: list[float] | None = None) -> str:
        """A table of the sources: documents, tokens, share of the mix and, given the run's
        length in tokens (or the tokens it draws from each source), epochs."""
        w = self._weights / self._weights.sum()
        if drawn is None and run_tokens is not None:
            drawn = [run_tokens * wi for wi in w]
        head = ["source", "documents", "skipped", "filtered", "train tokens", "val tokens", "share"]
        if drawn is not None:
            head += ["drawn", "epochs"]
        rows = [head]
        for k, (s, wi) in enumerate(zip(self.sources, w)):
            row = [s["name"], f"{s['documents']:,}", f"{s['skipped']:,}", f"{s.get('filtered', 0):,}",
                   f"{s['train_tokens']:,}", f"{s['val_tokens']:,}", f"{wi:.1%}"]
            if drawn is not None:
                ep = drawn[k] / s["train_tokens"] if s["train_tokens"] else float("inf")
                row += [f"{int(drawn[k]):,}", f"{ep:.2f}"]
            rows.append(row)
        tot = ["total", f"{sum(s['documents'] for s in self.sources):,}",
               f"{sum(s['skipped'] for s in self.sources):,}",
               f"{sum(s.get('filtered', 0) for s in self.sources):,}",
               f"{sum(s['train_tokens'] for s in self.sources):,}",
               f"{sum(s['val_tokens'] for s in self.sources):,}", "100%"]
        if drawn is not None:
            tot += [f"{int(sum(drawn)):,}", ""]
        rows.append(tot)
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"tokenizer: {self.tokenizer_path} (vocab {self.vocab_size:,}, eos id {self.eos_id}, "
                 f"{self._tokens[0].dtype.name if self._tokens else 'uint16'} tokens)"]
        for k, r in enumerate(rows):
            lines.append("  ".join(c.ljust(wd) if i == 0 else c.rjust(wd)
                                   for i, (c, wd) in enumerate(zip(r, widths))).rstrip())
            if k == 0 or k == len(rows) - 2:
                lines.append("  ".join("-" * wd for wd in widths))
        for s in self.sources:
            lines.append(f"  {s['name']}: {s['path']}")
            if s.get("skipped_by"):
                lines.append(f"    skipped: {_counts(s['skipped_by'])}" + (f"; e.g. {s['notes'][0]}" if s.get("notes") else ""))
            if s.get("filtered_by"):
                lines.append(f"    filtered: {_counts(s['filtered_by'])}")
        return "\n".join(lines)

    def __repr__(self):
        return f"<Dataset {len(self.sources)} sources, vocab {self.vocab_size}>"
