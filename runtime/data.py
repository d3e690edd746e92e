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
    tokens/<source>/<key>.prefix.npy            metadata only: uint32 metadata tokens at the start of each
                                                document (malt.runtime.conditioning)
    tokens/<source>/<key>.json                  the shard's manifest: files, tokenizer sha256,
                                                counts, skipped and filtered records, checksums

A source's files (sorted by path) are cut into shards of about
``SHARD_INPUT_BYTES`` of input (see :func:`plan_shards`); a shard's key hashes its files' paths, sizes
and modification times, the tokenizer, the source's ``text_field``, filters
and ``dedupe``, its ``metadata`` and ``control`` (and, with ``dedupe``, the key of the shard before it, whose
kept documents it is deduplicated against). So a changed file re-tokenizes its
shard only (and, with ``dedupe``, the shards after it); a new tokenizer
re-tokenizes everything. The manifest is written last: a shard without one
was never finished. Opening a shard checks its size, header, document index
and a checksum of its first and last 64 KiB; ``verify`` checks the sha256 of
everything. A shard that fails these checks, or whose manifest lacks a field, is
tokenized again (a cache this process cannot write is only read: it must hold
everything intact). Temporary files (``*.<pid>.tmp``) of a prepare that was
killed are removed by the next one.

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

from . import packing as _packing
from . import sources as _sources
from .sources import DataError, Source, _digest, make_source
from .run import pid_alive
from .tokenizer import build_tokenizer, cache_read_only_error

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
def _locked(cache_dir: Path, log, read_only: str | None = None):
    """Serialise concurrent prepare() calls (e.g. several ranks) on one cache; yields whether this process holds the
    lock (False where the file system has no flock). A cache this user cannot write (``read_only``) is only read: it
    takes a shared lock on the cache's .lock, when there is one, so a prepare that writes (another user's) is waited for."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic writes still keep the cache consistent
        yield False
        return
    import errno

    try:
        fh = open(cache_dir / ".lock", "r" if read_only else "a+")  # noqa: SIM115  closed by the `with fh` below
    except OSError:
        if not read_only:
            raise
        yield False  # no .lock, and none can be made here: no prepare ever wrote this cache with a lock
        return
    kind = fcntl.LOCK_SH if read_only else fcntl.LOCK_EX
    with fh:
        try:
            fcntl.flock(fh, kind | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock here (some NFS, Lustre):
                yield False                                                    # atomic writes keep the cache consistent
                return
            if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # several ranks of one run wait for each other: no news
                log(f"data: waiting for another process preparing {cache_dir} ...")
            fcntl.flock(fh, kind)
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cannot_write(cache: Path) -> str | None:
    """Why this process cannot write the data cache ``cache`` (made when missing); None when it can."""
    try:
        (cache / "tokens").mkdir(parents=True, exist_ok=True)
        probe = cache / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e.strerror or str(e)
    return None


# the temporary files prepare() writes before renaming them into place, named with the writing process's id
_TEMP_NAMES = (re.compile(r"[0-9a-f]{24}\.(?:tokens|index|hashes|prefix)\.npy\.(\d+)\.tmp"),  # tokens/<source>/
               re.compile(r"\.[0-9a-f]{24}\.json\.(\d+)\.tmp"),                               # tokens/<source>/ manifests
               re.compile(r"\.(?:tokenizer|spec)\.json\.(\d+)\.tmp"))                          # tokenizers/<name>/
STALE_TEMP_SECONDS = 60  # a writer adds to its file every few seconds; an older one of a process not alive here is left over


def _remove_stale_temp(cache: Path, log) -> None:
    """Remove what a prepare() stopped by SIGKILL or SIGTERM left: malt's temporary files (``*.<pid>.tmp``) whose
    process is not alive on this machine and which were last written more than STALE_TEMP_SECONDS ago (a writer on
    another machine sharing the cache, whose process id means nothing here, writes to its files all the time).
    Called with the cache's lock held: no prepare of this machine is writing."""
    now = time.time()
    removed, freed = 0, 0
    folders = []
    for top in (cache / "tokens", cache / "tokenizers"):  # a source's shards, a tokenizer
        with contextlib.suppress(OSError):
            folders += [d for d in top.iterdir() if d.is_dir()]
    for folder in folders:
        with contextlib.suppress(OSError):
            for f in folder.iterdir():
                m = next((m for p in _TEMP_NAMES if (m := p.fullmatch(f.name))), None)
                if m is None or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
                    continue
                try:
                    st = f.stat()
                    if now - st.st_mtime < STALE_TEMP_SECONDS:
                        continue
                    f.unlink()
                except OSError:
                    continue
                removed, freed = removed + 1, freed + st.st_size
    if removed:
        log(f"data: removed {removed} temporary file(s) ({_human_bytes(freed)}) left by a prepare that was stopped")


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

def _encode(tok, docs: list, eos_id: int, dtype, fast_bytes: bool):
    """(tokens of the documents, each followed by EOS; token count of each document).

    Conditioned documents (``(prefix, segments)`` pairs, see malt.runtime.conditioning) also
    give the metadata token count of each document, as a third value.
    """
    if docs and not isinstance(docs[0], str):
        from .conditioning import encode_conditioned

        if fast_bytes:
            def texts(ts):
                return [list(t.encode("utf-8")) for t in ts]
        else:
            def texts(ts):
                return [e.ids for e in tok.encode_batch(ts, add_special_tokens=False)] if ts else []
        return encode_conditioned(texts, docs, eos_id, dtype)
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


# what a shard's manifest must hold, with the types (a manifest without them, or with others, was not written by
# this version of malt whole: the shard is tokenized again, as when the manifest is missing or not JSON)
_MANIFEST_FIELDS = {"dtype": str, "n_tokens": int, "n_documents": int, "n_chars": int, "n_records": int,
                    "skipped": dict, "filtered": dict, "notes": list, "tokens_file": dict, "index_file": dict}
_FILE_FIELDS = {"n": int, "bytes": int, "header_bytes": int, "sha256": str, "edge_sha256": str}


def _manifest_complete(m: dict, files: tuple[str, ...]) -> bool:
    """Whether a manifest has every field the shard is read with: ``files``, the ``*_file`` entries its source needs."""
    if not all(isinstance(m.get(k), t) for k, t in _MANIFEST_FIELDS.items()) or m["dtype"] not in ("uint16", "uint32"):
        return False
    if not isinstance(m.get("conditioning", {}), dict) or not all(isinstance(n, str) for n in m["notes"]) or \
            not all(isinstance(v, int) for c in (m["skipped"], m["filtered"], m.get("conditioning", {})) for v in c.values()):
        return False
    return all(isinstance(m.get(f), dict) and all(isinstance(m[f].get(k), t) for k, t in _FILE_FIELDS.items())
               for f in ("tokens_file", "index_file", *files) if f in m or f in files)


class _Shard:
    def __init__(self, directory: Path, key: str, files: list, needs: tuple[str, ...] = ()):
        self.key = key
        self.files = files
        self.needs = needs  # the manifest entries of the shard's extra files: hashes_file (dedupe), prefix_file (metadata)
        self.opened: tuple | None = None  # (tokens, index, prefix) of a cached shard, checked before anything is tokenized
        stem = key[:24]
        self.tokens = directory / f"{stem}.tokens.npy"
        self.index = directory / f"{stem}.index.npy"
        self.hashes = directory / f"{stem}.hashes.npy"
        self.prefix = directory / f"{stem}.prefix.npy"     # metadata conditioning: metadata tokens per document
        self.manifest_path = directory / f"{stem}.json"
        self.manifest: dict | None = None

    def load_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            m = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(m, dict) or m.get("key") != self.key or m.get("format") != FORMAT or \
                not _manifest_complete(m, self.needs):
            return None
        self.manifest = m
        return m

    def input_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _shard_keys(source: Source, base: dict, prev: str | None = None) -> list[_Shard]:
    """The source's shards; with dedupe each key chains the previous shard's (``prev``: the one before the first)."""
    directory = Path(base["dir"]) / _safe(source.name)
    out = []
    for files in plan_shards(source):
        info = {"format": FORMAT, "tokenizer": base["tokenizer_sha256"], "eos": base["eos_id"],
                "dtype": base["dtype"], "source": source.config(),
                "files": ([source.fingerprint()] if source.builtin
                          else [(f.full, f.size, f.mtime_ns) for f in files]),
                "prev": prev if source.dedupe else None}
        key = _digest(info)
        out.append(_Shard(directory, key, files, ("hashes_file",) * bool(source.dedupe) + ("prefix_file",) * bool(source.metadata)))
        prev = key
    return out


def _tokenize_shard(source: Source, shard: _Shard, seen: set | None, enc: _Encoder, base: dict,
                    progress: _Progress, progress_base: int) -> dict:
    shard.tokens.parent.mkdir(parents=True, exist_ok=True)
    tag = f".{os.getpid()}.tmp"
    tmp = {k: p.with_name(p.name + tag) for k, p in
           (("tokens", shard.tokens), ("index", shard.index), ("hashes", shard.hashes), ("prefix", shard.prefix))}
    wt = _NpyWriter(tmp["tokens"], base["dtype"])
    wi = _NpyWriter(tmp["index"], np.uint64)
    wh = _NpyWriter(tmp["hashes"], np.uint64) if source.dedupe else None
    wp = _NpyWriter(tmp["prefix"], np.uint32) if source.metadata else None
    writers = {k: w for k, w in (("tokens", wt), ("index", wi), ("hashes", wh), ("prefix", wp)) if w is not None}
    cond = None
    if source.metadata or source.control:  # metadata prefixes and control tokens (malt.runtime.conditioning)
        from .conditioning import Conditioner
        cond = Conditioner(source.metadata, source.control, token_id=base["token_id"])
    source.reset_stats()
    offset = 0
    n_docs = n_chars = 0
    pending: collections.deque = collections.deque()
    hashes: list[int] = [] if source.dedupe else None

    def drain(limit: int):
        nonlocal offset
        while len(pending) > limit:
            arr, lens, *prefix = pending.popleft().get()
            if wp is not None:
                wp.write(prefix[0])
            wt.write(arr)
            wi.write(offset + np.cumsum(lens))
            offset += int(lens.sum())
            progress.update(source.name, progress_base + source.progress_bytes(), progress.docs + len(lens))

    try:
        wi.write(np.zeros(1, dtype=np.uint64))
        batch: list = []
        chars = 0
        for doc in source.documents(shard.files, seen, hashes, with_fields=cond is not None):
            if cond is not None:
                text, fields = doc
                doc = cond.apply(text, fields)
                if doc is None:  # metadata missing: drop
                    source.filtered["metadata_missing"] += 1
                    if hashes:
                        hashes.pop()
                    continue
                chars += len(text)
            else:
                chars += len(doc)
            batch.append(doc)
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
        infos = {k: w.finish() for k, w in writers.items()}
    except BaseException:
        for w in writers.values():
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
        **({"conditioning": dict(cond.stats)} if cond is not None else {}),
        **{f"{k}_file": {"name": getattr(shard, k).name, **v} for k, v in infos.items()},
    }
    _atomic_write_json(shard.manifest_path, manifest)
    shard.manifest = manifest
    return manifest


def _open_npy(path: Path, info: dict, verify: bool, fix: str, expect_dtype) -> np.ndarray:
    """A cache file, checked against its manifest entry ``info``; a DataError naming it (and ``fix``) when it is not
    what the manifest says."""
    fix = f"; {fix}" if fix else ""
    if not path.is_file():
        raise DataError(f"token cache file {path} is missing but its manifest exists{fix}")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise DataError(f"token cache file {path} is truncated or corrupt: {size:,} bytes, "
                        f"expected {info['bytes']:,}{fix}")
    payload = size - info["header_bytes"]
    try:
        arr = np.load(path, mmap_mode="r") if info["n"] else np.load(path)
    except (OSError, ValueError, EOFError) as e:  # numpy's words for a bad header (pickle advice) do not fit malt's own file
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "its .npy header is unreadable"
        raise DataError(f"token cache file {path} is corrupt: {reason}{fix}") from None
    if arr.dtype != np.dtype(expect_dtype) or arr.shape != (info["n"],):
        raise DataError(f"token cache file {path} is corrupt: its header says {arr.dtype}{arr.shape}, "
                        f"the manifest {np.dtype(expect_dtype)}({info['n']},){fix}")
    if _edge_sha(path, info["header_bytes"], payload) != info["edge_sha256"]:
        raise DataError(f"token cache file {path} is corrupt: checksum mismatch{fix}")
    if verify and _payload_sha(path, info["header_bytes"]) != info["sha256"]:
        raise DataError(f"token cache file {path} is corrupt: sha256 mismatch{fix}")
    return arr


_REBUILD = "delete its manifest {} and that shard is tokenized again on the next start"


def _open_shard(shard: _Shard, verify: bool, fix: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    m = shard.manifest
    fix = _REBUILD.format(shard.manifest_path) if fix is None else fix
    toks = _open_npy(shard.tokens, m["tokens_file"], verify, fix, m["dtype"])
    index = _open_npy(shard.index, m["index_file"], verify, fix, np.uint64)
    sep = f"; {fix}" if fix else ""
    if len(index) != m["n_documents"] + 1 or int(index[0]) != 0 or int(index[-1]) != len(toks):
        raise DataError(f"token cache file {shard.index} is corrupt: its offsets do not cover "
                        f"{shard.tokens}{sep}")
    if verify and len(index) > 1 and not bool((np.diff(index.astype(np.int64)) > 0).all()):
        raise DataError(f"token cache file {shard.index} is corrupt: offsets are not increasing{sep}")
    return toks, index


def _open_prefix(shard: _Shard, verify: bool, fix: str | None = None) -> np.ndarray | None:
    """The metadata token count of every document of a shard (metadata conditioning), or None."""
    m = shard.manifest
    if "prefix_file" not in m:
        return None
    fix = _REBUILD.format(shard.manifest_path) if fix is None else fix
    pre = _open_npy(shard.prefix, m["prefix_file"], verify, fix, np.uint32)
    if len(pre) != m["n_documents"]:
        raise DataError(f"token cache file {shard.prefix} is corrupt: {len(pre):,} documents, "
                        f"the manifest says {m['n_documents']:,}" + (f"; {fix}" if fix else ""))
    return pre


def _check_cached(shard: _Shard, verify: bool) -> str | None:
    """Open a cached shard's files with the checks of every start (``verify``: the sha256 of every byte too) and keep
    them on the shard; what is wrong with them (None: nothing)."""
    try:
        shard.opened = (*_open_shard(shard, verify, ""), _open_prefix(shard, verify, ""))
        if "hashes_file" in shard.needs:
            _open_npy(shard.hashes, shard.manifest["hashes_file"], verify, "", np.uint64)
    except DataError as e:
        shard.opened = None
        return str(e)
    return None


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


def _concat_offsets(indexes) -> np.ndarray:
    """Document offsets of shards read one after another (each index starts at 0): n_documents + 1 values."""
    out, base = [np.zeros(1, dtype=np.int64)], 0
    for idx in indexes:
        idx = np.asarray(idx).astype(np.int64)
        out.append(idx[1:] + base)
        base += int(idx[-1])
    return np.concatenate(out)


def _validation_tokens(offsets: np.ndarray, validation: float) -> int:
    """Tokens of the validation split: from the document boundary nearest to the last ``validation`` share
    of the tokens to the end, so that no document is in both splits. A source of one document is cut
    inside it (the only way to hold anything out)."""
    n = int(offsets[-1])
    want = int(n * validation)
    if want <= 0:
        return 0
    inner = offsets[1:-1]
    if not len(inner):
        return want
    cut = int(inner[np.argmin(np.abs(inner - (n - want)))])
    return n - cut


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
    Raises :class:`DataError` for every user-facing problem. ``$MALT_DATA_PREPARED=1`` (set by `malt run`, which
    prepared the data just before starting the program): the cache hits are not logged a second time.
    """
    # what a cache hit says about the tokenizer and each source: said already when `malt run` prepared the data
    known = (lambda message: None) if os.environ.get("MALT_DATA_PREPARED") == "1" else log
    spec = dict(spec)
    base_dir = spec.get("base_dir") or "."
    entries = spec.get("sources") or []
    if not entries:
        raise DataError("data.sources is empty; add at least one source")
    validation = float(spec.get("validation", 0.0) or 0.0)
    if not 0.0 <= validation < 1.0:
        raise DataError(f"data.validation must be in [0, 1), got {validation}")
    srcs = [make_source({k: v for k, v in e.items() if k != "validation_path"} if isinstance(e, dict) else e, base_dir)
            for e in entries]
    packing = str(spec.get("packing") or "concat")
    if packing not in _packing.PACKINGS:
        raise DataError(f"data.packing must be one of {', '.join(_packing.PACKINGS)}, got {packing!r}")
    # a source's own validation file (validation_path): tokenized as a source of its own, its validation split
    val_srcs = {s.name: make_source({**{k: v for k, v in e.items() if k != "validation_path"},
                                     "name": f"{s.name} (validation)", "path": e["validation_path"]}, base_dir)
                for s, e in zip(srcs, entries) if isinstance(e, dict) and e.get("validation_path")}
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
    read_only = _cannot_write(cache)  # why this user cannot write the cache: it is then only read, and must hold everything
    if read_only and not (cache / "tokens").is_dir():
        raise DataError(f"cannot use {cache} as malt's data cache: {read_only}; set MALT_CACHE_DIR to a "
                        "directory this user can write (tokenizers and token shards go there)")
    enc = None
    bar = None
    tok = None
    try:
        with _locked(cache, log, read_only) as held:
            if held and not read_only:
                _remove_stale_temp(cache, log)
            tok, tok_path, tok_hash, specials = build_tokenizer(
                spec.get("tokenizer") or {}, srcs, cache, base_dir, log, hit_log=known, read_only=read_only)
            eos_id = tok.token_to_id(specials[0])
            vocab = tok.get_vocab_size()
            model_vocab = spec.get("model_vocab")
            if model_vocab and vocab > int(model_vocab):
                raise DataError(f"the tokenizer has {vocab:,} tokens but the model's vocabulary is {int(model_vocab):,}; "
                                f"raise model.vocab_size (or remove it) and compile again")
            dtype = np.dtype(np.uint16 if vocab <= 65536 else np.uint32)
            fast_bytes = (spec.get("tokenizer") or {}).get("kind") == "bytes"
            base = {"dir": str(cache / "tokens"), "tokenizer_sha256": tok_hash, "eos_id": eos_id,
                    "dtype": dtype.name, "token_id": tok.token_to_id}
            plans = [(s, _shard_keys(s, base)) for s in srcs]
            built_of = {s.name: shards for s, shards in plans}
            # a validation file with dedupe drops the documents its source's training files already hold
            plans += [(v, _shard_keys(v, base, built_of[name][-1].key if v.dedupe and built_of[name] else None))
                      for name, v in val_srcs.items()]
            todo_bytes = 0
            for s, shards in plans:
                for sh in shards:
                    if sh.load_manifest() is not None:
                        problem = _check_cached(sh, verify)  # a cached shard that fails the checks is built again
                        if problem is None:
                            continue
                        if read_only:
                            raise cache_read_only_error(cache, read_only, problem)
                        log(f"data: {problem}; tokenizing that shard again")
                        sh.manifest = None
                    elif read_only:
                        raise cache_read_only_error(cache, read_only, f"it lacks tokens of source '{s.name}' (no complete "
                                                    f"manifest {sh.manifest_path}: the source's files changed since the cache "
                                                    "was prepared, or it was never prepared for this recipe)")
                    todo_bytes += sh.input_bytes()
            n_workers = workers if todo_bytes >= POOL_MIN_BYTES else 1
            tok.encode_special_tokens = True  # text that spells "<|endoftext|>" stays text
            enc = _Encoder(tok, eos_id, dtype, fast_bytes, n_workers)
            if todo_bytes:
                bar = _Progress(todo_bytes, log, progress)
            done_bytes = 0
            token_views, infos = [], []
            prefix_masks: dict = {}  # source name -> PrefixMask (metadata conditioning)
            val_views: dict = {}  # source name -> (tokens, index files) of its validation file
            empty: list[DataError] = []  # sources that yield no text
            for s, shards in plans:
                seen: set | None = set() if s.dedupe else None
                pending_hashes: list[_Shard] = []  # cached shards whose hashes a later shard may need
                parent = next((name for name, v in val_srcs.items() if v is s), None)
                if parent is not None and s.dedupe:
                    pending_hashes = list(built_of[parent])
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
                arrays, indexes = [], []
                prefixes, conditioning = [], collections.Counter()  # metadata token counts, conditioning stats
                totals = collections.Counter()
                skipped, filtered, notes = collections.Counter(), collections.Counter(), []
                for sh in shards:
                    m = sh.manifest
                    toks, index, prefix = sh.opened or (*_open_shard(sh, verify), _open_prefix(sh, verify))
                    arrays.append(toks)
                    indexes.append(index)
                    prefixes.append(prefix)
                    conditioning.update(m.get("conditioning", {}))
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
                    empty.append(DataError(
                        f"source '{s.name}' ({s.describe()}) yields no text"
                        + (f": {totals['records']:,} records, " + "; ".join(why) if why
                           else (": no files" if not s.files() else ""))
                        + (f" (e.g. {notes[0]})" if notes else "")
                        + "; check the path"
                        + (f", text_field '{s.text_field}'" if not s.builtin and any(  # records with fields only
                            not f.rel.endswith((".txt", ".txt.gz", ".txt.zst")) for f in s.files()) else "")
                        + (" and the filter" if s.filter or s.dedupe else "")))
                    continue  # the other sources are still read: every empty one is reported at once
                if built:
                    log(f"data: tokenized {s.name}: {totals['documents']:,} documents, {totals['chars']:,} characters"
                        f" -> {totals['tokens']:,} tokens in {time.time() - t0:.1f}s"
                        + (f" ({built} of {len(shards)} shards)" if len(shards) > 1 else ""))
                else:
                    known(f"data: cache hit {s.name}: {totals['tokens']:,} tokens")
                if skipped:
                    (log if built else known)(f"data: {s.name}: skipped {sum(skipped.values()):,} broken record(s) ({_counts(skipped)}), e.g. "
                        + "; ".join(notes[:3]))
                if filtered:
                    (log if built else known)(f"data: {s.name}: filtered out {sum(filtered.values()):,} document(s): {_counts(filtered)}")
                view = Tokens(arrays)
                n = len(view)
                if s.metadata:
                    from .conditioning import PrefixMask
                    prefix_masks[s.name] = PrefixMask(indexes, prefixes)
                if parent is not None:
                    val_views[parent] = (view, [str(sh.index) for sh in shards])
                    continue
                # the validation split: the source's last documents, cut at the document boundary nearest to the
                # share (a source of one document is cut inside it); a validation file replaces it
                n_val = 0 if s.name in val_srcs else _validation_tokens(_concat_offsets(indexes), validation)
                if s.name in (spec.get("val_documents") or {}) and s.name not in val_srcs:
                    # the variant without metadata: the same documents as the variant with it are held out
                    n_val = n - int(_concat_offsets(indexes)[spec["val_documents"][s.name]])
                if n and validation and s.name not in val_srcs and not 0.5 * validation <= n_val / n <= 2 * validation:
                    (log if built else known)(
                        f"data: {s.name}: warning: its validation split is {n_val / n:.1%} of its tokens, not the "
                        f"{validation:.1%} data.validation asks: the split ends at a document boundary, and its documents "
                        "are few or long; give it a validation_path, or split its documents")
                token_views.append(view)
                infos.append({"name": s.name, "path": s.describe(), "weight": s.weight,
                              "tokens": n, "train_tokens": n - n_val, "val_tokens": n_val,
                              "documents": totals["documents"], "chars": totals["chars"], "records": totals["records"],
                              "skipped": sum(skipped.values()), "skipped_by": dict(skipped),
                              "filtered": sum(filtered.values()), "filtered_by": dict(filtered), "notes": notes,
                              "shards": [str(sh.tokens) for sh in shards],
                              "index_files": [str(sh.index) for sh in shards],
                              **({"conditioning": dict(conditioning), "metadata": s.metadata, "control": s.control}
                                 if s.metadata or s.control else {})})
            if empty:
                empty[0].others = empty[1:]  # the CLI shows each at its source's line (cli.located_data_error)
                raise empty[0]
    finally:
        if bar is not None:
            bar.close()
        if enc is not None:
            enc.close()
        if tok is not None:
            tok.encode_special_tokens = False  # Dataset.encode (prompts) reads special tokens again
        _sources._BUILTIN_MEMO.clear()
    for info in infos:
        if info["name"] in val_views:
            view, files = val_views[info["name"]]
            info.update(val_tokens=len(view), val_index_files=files, val_path=val_srcs[info["name"]].describe())
    ds = Dataset(tok, tok_path, eos_id, int(spec.get("seed", 0)), validation, infos, token_views, packing=packing,
                 val_arrays=[val_views[i["name"]][0] if i["name"] in val_views else None for i in infos], log=log)
    _attach_conditioning(ds, spec, prefix_masks, lambda sp: prepare(
        sp, cache_dir, lambda m: log(m.replace("data: ", "data (without metadata): ", 1)), workers, verify, progress))
    if spec.get("seq_len"):
        ds.check(int(spec["seq_len"]), "train")
        if validation > 0:
            ds.check(int(spec["seq_len"]), "val")
    return ds


def _attach_conditioning(ds: Dataset, spec: dict, prefix_masks: dict, prepare_again) -> None:
    """Give a dataset what its batches need for conditioned sources (malt.runtime.conditioning): where
    the metadata tokens are, which control tokens carry no loss and, when a phase turns metadata off
    (``spec["metadata_off"]``), the same sources tokenized without metadata (their own cache entries)."""
    ds._no_loss_ids = {}
    ds._prefix_masks = {}
    for i, info in enumerate(ds.sources):
        ctl = info.get("control")
        if ctl and not ctl.get("loss", False):  # control tokens are inputs only: targets that predict them are -100
            ds._no_loss_ids[i] = np.array([ds.tokenizer.token_to_id(ctl.get("good", "<|good|>")),
                                           ds.tokenizer.token_to_id(ctl.get("bad", "<|bad|>"))], dtype=np.int64)
        mask = prefix_masks.get(info["name"])
        if mask is not None:
            val = ((prefix_masks.get(f"{info['name']} (validation)"), 0) if info.get("val_index_files")
                   else (mask, info["train_tokens"]))
            ds._prefix_masks[i] = {"train": (mask, 0), "val": val}
    if not spec.get("metadata_off") or not ds._prefix_masks:
        return
    keep = {}  # hold out the same documents in both variants
    for i in ds._prefix_masks:
        info = ds.sources[i]
        offsets = ds.document_offsets(i)
        k = int(np.searchsorted(offsets, info["train_tokens"]))
        if k < len(offsets) and int(offsets[k]) == info["train_tokens"] and not info.get("val_index_files"):
            keep[info["name"]] = k
    # the same documents without their prefixes: with `missing: drop` the documents without metadata are still dropped
    # (the prefix is only not written); the tokenizer is the one just built, read back as a file (not trained again)
    plain = [{**e, "metadata": {**e["metadata"], "write_prefix": False}} if (e.get("metadata") or {}).get("missing") == "drop"
             else {k: v for k, v in e.items() if k != "metadata"} for e in spec["sources"]]
    tokenizer = {**(spec.get("tokenizer") or {}), "kind": "file", "path": str(Path(ds.tokenizer_path).resolve())}
    for key in ("vocab_size", "max_chars", "train_on"):
        tokenizer.pop(key, None)
    off = prepare_again({**spec, "sources": plain, "tokenizer": tokenizer, "metadata_off": False, "val_documents": keep})
    for i, (m, _) in ((i, v["train"]) for i, v in ds._prefix_masks.items()):
        want = len(ds.tokens(i)) - m.total
        if len(off.tokens(i)) != want:
            raise DataError(f"source '{ds.names[i]}': its tokens without metadata ({len(off.tokens(i)):,}) are not its tokens "
                            f"with metadata less the metadata tokens ({want:,}); delete the cache folder "
                            f"{Path(ds.sources[i]['shards'][0]).parent} and prepare again")
    ds._without_metadata = off


def to_device(device, *batch) -> tuple:
    """The tensors of a micro-batch on ``device`` (other items unchanged), copied without waiting for it.

    For CUDA each tensor goes through page-locked host memory first (torch caches the pinned blocks, so
    that is a host memcpy). A copy from pinned memory is queued on the GPU and returns at once; from
    ordinary (pageable) memory the driver stages it and may wait for the GPU's queued work. So the host
    goes on to build the next micro-batch while the GPU computes this one: the loader's time overlaps the
    step instead of adding to it, as a prefetching loader would, without a thread. On a CPU it is a no-op.
    """
    import torch
    cuda = torch.device(device).type == "cuda"
    return tuple((t.pin_memory() if cuda else t).to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t
                 for t in batch)


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
_IGNORE = -100   # a target without loss (F.cross_entropy's ignore_index)


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
                 sources: list[dict], arrays: list["Tokens"], packing: str = "concat",
                 val_arrays: list | None = None, log: Callable[[str], None] | None = None):
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer_path
        self.eos_id = eos_id
        self.vocab_size = tokenizer.get_vocab_size()
        self.seed = seed
        self.validation = validation
        self.sources = sources
        self.names = [s["name"] for s in sources]
        self._tokens = list(arrays)
        val_arrays = val_arrays or [None] * len(arrays)
        self._parts = {
            "train": [a.slice(0, s["train_tokens"]) for a, s in zip(arrays, sources)],
            "val": [a.slice(s["train_tokens"], len(a)) if v is None else v for a, v, s in zip(arrays, val_arrays, sources)],
        }
        self.packing = packing
        self._log = log or (lambda message: None)
        self._packed: dict = {}  # (split, source index, seq_len) -> packing.BestFit
        self._weights = _check_weights([s["weight"] for s in sources], self.names)
        self._checked: set = set()
        # conditioning (set by prepare, see _attach_conditioning): source index -> control token ids without loss,
        # source index -> {split: (PrefixMask, offset of the split in the stream)}, the variant without metadata
        self._no_loss_ids: dict = {}
        self._prefix_masks: dict = {}
        self._without_metadata: Dataset | None = None

    # -- helpers -----------------------------------------------------------
    def tokens(self, source) -> "Tokens":
        """All tokens of a source (by index or name): documents, each followed by EOS."""
        i = self.names.index(source) if isinstance(source, str) else int(source)
        return self._tokens[i]

    def document_offsets(self, source) -> np.ndarray:
        """Start of every document of a source in :meth:`tokens`, plus its end (n_documents + 1 values)."""
        i = self.names.index(source) if isinstance(source, str) else int(source)
        return _concat_offsets(np.load(path, mmap_mode="r") for path in self.sources[i]["index_files"])

    def split_offsets(self, split: str, source) -> np.ndarray:
        """Document boundaries within one split of a source: offsets into that split's tokens, from 0 to its length
        (a document cut by the end of the split ends there)."""
        i = self.names.index(source) if isinstance(source, str) else int(source)
        s = self.sources[i]
        if split == "val" and s.get("val_index_files"):
            return _concat_offsets(np.load(path, mmap_mode="r") for path in s["val_index_files"])
        offs, cut = self.document_offsets(i), s["train_tokens"]
        if split == "train":
            return np.concatenate([[0], offs[(offs > 0) & (offs < cut)], [cut]]).astype(np.int64)
        end = len(self._tokens[i])
        return np.concatenate([[0], offs[(offs > cut) & (offs < end)] - cut, [end - cut]]).astype(np.int64)

    def best_fit(self, split: str, source, seq_len: int) -> _packing.BestFit:
        """The source's split packed into sequences of seq_len + 1 tokens (built once, then kept)."""
        i = self.names.index(source) if isinstance(source, str) else int(source)
        key = (split, i, seq_len)
        if key not in self._packed:
            t0 = time.perf_counter()
            pk = _packing.pack_best_fit(self.split_offsets(split, i), seq_len, self.seed, self.SPLITS[split], self.names[i])
            self._packed[key] = pk
            self._log(f"data: best_fit packing of {self.names[i]} ({split}) at seq_len {seq_len:,}: {pk.bins:,} sequences "
                      f"of {pk.capacity:,} tokens, padding {pk.padding_fraction:.2%} ({time.perf_counter() - t0:.1f}s)")
        return self._packed[key]

    def packing_summary(self, seq_len: int, weights=None) -> str:
        """One line on the packing at ``seq_len``: for best_fit, the padding of the training mixture and of each source."""
        if self.packing == "document":
            return (f"packing: document at seq_len {seq_len:,}: windows as concat; attention stays inside each document "
                    "and positions restart at each one")
        if self.packing != "best_fit":
            return f"packing: concat at seq_len {seq_len:,}: windows of the documents joined with EOS"
        w = self._weight_vector(weights)
        each = ", ".join(f"{n} {self.best_fit('train', i, seq_len).padding_fraction:.1%}"
                         for i, (n, wi) in enumerate(zip(self.names, w)) if wi > 0)
        return (f"packing: best_fit at seq_len {seq_len:,}: padding {self.padding_fraction('train', seq_len, weights):.1%} "
                f"of the token slots of training sequences ({each})")

    def padding_fraction(self, split: str, seq_len: int, weights=None) -> float:
        """The share of token slots that are padding in the sequences a step draws (best_fit packing; 0 otherwise):
        each source's padding fraction weighted by its share of the mixture."""
        if self.packing != "best_fit":
            return 0.0
        w = self._weight_vector(weights)
        w = w / w.sum()
        return float(sum(wi * self.best_fit(split, i, seq_len).padding_fraction for i, wi in enumerate(w) if wi > 0))

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
        need = 2 if self.packing == "best_fit" else seq_len + 1  # best_fit pads a short sequence
        for name, part, wi, s in zip(self.names, self._parts[split], w, self.sources):
            if wi <= 0 or len(part) >= need:
                continue
            what = "training" if split == "train" else "validation"
            fewer = ("too few for one sequence" if self.packing == "best_fit"
                     else f"fewer than seq_len+1 = {seq_len + 1:,}")
            if split == "train":
                raise DataError(f"source '{name}' has {len(part):,} training tokens, {fewer}; add data to it"
                                + (" or lower train.seq_len" if self.packing != "best_fit" else ""))
            if s.get("val_index_files"):
                raise DataError(f"source '{name}' has {len(part):,} {what} tokens in its validation_path "
                                f"{s.get('val_path')}, {fewer}; add data to it")
            if self.validation <= 0:
                raise DataError("validation batches were asked for but data.validation is 0; "
                                "set data.validation (e.g. 1%) or turn evaluation off")
            raise DataError(
                f"source '{name}' has {len(part):,} validation tokens, {fewer}; raise data.validation "
                f"(now {self.validation:g}), give the source a validation_path, or add data to it")
        self._checked.add(key)

    def sample_plan(self, split: str, step: int, start: int, count: int, seq_len: int,
                    weights=None) -> tuple[np.ndarray, np.ndarray]:
        """(source index, window start) of sequences start..start+count-1 of ``step``; with best_fit
        packing, (source index, sequence of the source's packing) instead.

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
        if self.packing == "best_fit":  # a sequence is a bin of the source's packing
            spans = np.array([self.best_fit(split, k, seq_len).bins if wk > 0 else 1 for k, wk in enumerate(w)], dtype=np.uint64)
        else:                           # a sequence is a window of seq_len + 1 tokens
            spans = np.array([max(len(p) - seq_len, 1) for p in parts], dtype=np.uint64)
        pos = (r_pos % spans[src]).astype(np.int64)
        return src, pos

    def batch(self, split: str, step: int, start: int, count: int, seq_len: int, weights=None, metadata: bool = True):
        """Sequences start..start+count-1 of ``step``: int64 tensors of shape (count, seq_len).

        ``concat``: (x, y), y is x shifted left by one token. ``document``: (x, y, doc_ids), the same
        windows plus each position's document id (0, 1, ... in a row; a document's EOS is its own).
        ``best_fit``: (x, y, doc_ids) of packed bins; the padding after the last document has
        x = EOS, y = -100 and a document id of its own.
        ``weights`` (optional): per-source mixture weights for this step (a list in source
        order or a dict name -> weight); defaults to the weights of the spec.
        Conditioned sources: targets that are metadata tokens (or control tokens without loss) are -100;
        ``metadata=False`` reads the sources without their metadata prefixes (a phase with metadata off).
        """
        import torch
        if not metadata and self._prefix_masks:
            if self._without_metadata is None:
                raise DataError('batches without metadata need the sources prepared without it too (spec["metadata_off"])')
            return self._without_metadata.batch(split, step, start, count, seq_len, weights)
        conditioned = bool(self._no_loss_ids or self._prefix_masks)
        src, pos = self.sample_plan(split, step, start, count, seq_len, weights)
        parts = self._parts[split]
        buf = np.empty((count, seq_len + 1), dtype=np.int64)
        if self.packing == "best_fit":
            ids = np.empty((count, seq_len + 1), dtype=np.int64)
            filled = np.empty(count, dtype=np.int64)
            for j in range(count):
                buf[j], ids[j], filled[j] = self._bin(parts[src[j]], self.best_fit(split, int(src[j]), seq_len), int(pos[j]))
            y = buf[:, 1:].copy()
            y[np.arange(seq_len)[None, :] >= filled[:, None] - 1] = _packing.IGNORE  # the next token is padding
            if conditioned:
                y = self._condition_targets(y, src, [self._bin_no_loss(split, int(src[j]), int(pos[j]), seq_len)
                                                     for j in range(count)])
            return (torch.from_numpy(np.ascontiguousarray(buf[:, :-1])), torch.from_numpy(y),
                    torch.from_numpy(np.ascontiguousarray(ids[:, :-1])))
        for j in range(count):
            p = int(pos[j])
            buf[j] = parts[src[j]].window(p, seq_len + 1)
        x = torch.from_numpy(np.ascontiguousarray(buf[:, :-1]))
        y = np.ascontiguousarray(buf[:, 1:])
        if conditioned:
            y = self._condition_targets(y, src, [self.no_loss(split, int(src[j]), int(pos[j]), seq_len + 1)
                                                 for j in range(count)])
        y = torch.from_numpy(y)
        if self.packing == "document":
            return x, y, torch.from_numpy(_packing.document_ids(buf[:, :-1], self.eos_id))
        return x, y

    def _bin(self, part: Tokens, pk: _packing.BestFit, b: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(tokens, document ids, tokens filled) of bin ``b``: its pieces one after another, then padding."""
        row = np.full(pk.capacity, self.eos_id, dtype=np.int64)
        lo, hi = int(pk.first[b]), int(pk.first[b + 1])
        ids = np.full(pk.capacity, hi - lo, dtype=np.int64)   # padding: the id after the last piece's
        at = 0
        for k in range(lo, hi):
            n = int(pk.length[k])
            row[at:at + n] = part.window(int(pk.start[k]), n)
            ids[at:at + n] = k - lo
            at += n
        return row, ids, at

    def no_loss(self, split: str, source: int, p: int, n: int) -> np.ndarray | None:
        """True where tokens p .. p+n-1 of a source's split are metadata tokens (their targets are -100);
        None when the source has no metadata."""
        m = self._prefix_masks.get(int(source))
        if m is None:
            return None
        mask, base = m[split]
        return mask.mask(base + p, n)

    def _bin_no_loss(self, split: str, i: int, b: int, seq_len: int) -> np.ndarray | None:
        """no_loss of best_fit bin ``b``'s tokens (its pieces one after another, as _bin lays them out)."""
        if i not in self._prefix_masks:
            return None
        pk = self.best_fit(split, i, seq_len)
        out = np.zeros(pk.capacity, dtype=bool)
        at = 0
        for k in range(int(pk.first[b]), int(pk.first[b + 1])):
            n = int(pk.length[k])
            out[at:at + n] = self.no_loss(split, i, int(pk.start[k]), n)
            at += n
        return out

    def _condition_targets(self, y: np.ndarray, src, rows) -> np.ndarray:
        """Targets y (count, seq_len) with -100 where they are metadata tokens or control tokens without loss.
        ``rows[j]``: the no_loss mask of row j's seq_len + 1 tokens, or None."""
        for j in range(len(y)):
            if rows[j] is not None:
                y[j][rows[j][1:]] = _IGNORE
            ids = self._no_loss_ids.get(int(src[j]))
            if ids is not None:
                y[j][np.isin(y[j], ids)] = _IGNORE
        return y

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
        if drawn is not None and sum(drawn) > 0:  # the share of the run's tokens (phases may mix differently)
            w = np.asarray(drawn, dtype=np.float64) / sum(drawn)
        # documents: those kept (read minus skipped and filtered)
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
            if s.get("val_path"):
                lines.append(f"    validation: {s['val_path']}")
            if s.get("skipped_by"):
                lines.append(f"    skipped: {_counts(s['skipped_by'])}" + (f"; e.g. {s['notes'][0]}" if s.get("notes") else ""))
            if s.get("filtered_by"):
                lines.append(f"    filtered: {_counts(s['filtered_by'])}")
            if s.get("conditioning") is not None:  # metadata coverage and the control-token split
                from .conditioning import describe
                i = self.names.index(s["name"])
                meta = self._prefix_masks.get(i, {}).get("train", (None,))[0]
                lines += describe(s, meta.total if meta is not None else None)
        return "\n".join(lines)

    def __repr__(self):
        return f"<Dataset {len(self.sources)} sources, vocab {self.vocab_size}>"
