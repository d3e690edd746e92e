"""Text sources for the data pipeline: builtin corpora and local files.

A source turns a path from the recipe into a stream of documents (strings),
read lazily, one record at a time, so a source may be far larger than memory.
Its *fingerprint* changes whenever its content may have changed (paths, sizes
and modification times; never the content itself, so checking a cached source
costs a few ``stat`` calls).

Paths (relative ones resolve against the recipe's folder):

- ``builtin:python-docs``: docstrings (modules, classes, functions) and comment
  blocks of the running interpreter's standard library, one document per file.
- ``builtin:python-code``: the source code of those files, one document per file.
- ``*.txt`` (also ``.txt.gz``, ``.txt.zst``): one document per file.
- ``*.jsonl`` (also ``.jsonl.gz``, ``.jsonl.zst``): one JSON object per line, its
  text in ``text_field``.
- ``*.parquet``: one document per row, its text in the column ``text_field``.
- a directory: every file of those types below it (recursively), sorted by path.
- a glob such as ``data/*.jsonl.zst`` or ``shards/**/*.parquet``: the matching
  files (directories it matches are walked), sorted by path.

Records that cannot be read (invalid JSON, bad UTF-8, a missing or non-text
field, an unreadable or corrupt file) are counted by reason in
:attr:`Source.skipped` and skipped. Per-source filters (``min_chars``,
``max_chars``, a threshold on a numeric ``field``) and exact-duplicate removal
(``dedupe``) drop documents, counted by filter in :attr:`Source.filtered`.
"""

from __future__ import annotations

import ast
import glob as _glob
import hashlib
import io
import json
import math
import os
import re
import sys
import sysconfig
import tokenize
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["DataError", "Source", "make_source", "BUILTINS", "classify", "path_problem",
           "SUPPORTED", "COMPRESSIONS", "FILTER_KEYS", "check_filter", "doc_hash"]


class DataError(Exception):
    """A user-facing data problem (bad path, empty source, corrupt cache...).

    The message is complete and says how to fix the problem; callers print it
    without a traceback.
    """


BUILTINS = ("python-docs", "python-code")
KINDS = ("txt", "jsonl", "parquet")
COMPRESSIONS = {"": "none", ".gz": "gzip", ".zst": "zstandard"}
SUPPORTED = (".txt", ".txt.gz", ".txt.zst", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
# compressions people use that are not read (yet): named in the error instead of "unsupported type"
_OTHER_COMPRESSIONS = (".bz2", ".xz", ".lzma", ".lz4", ".zip", ".7z", ".tar", ".tgz", ".br", ".zstd", ".snappy", ".z")
FILTER_KEYS = ("min_chars", "max_chars", "field", "min", "max")
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _digest(obj) -> str:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


def classify(name: str) -> tuple[str, str] | None:
    """(kind, compression suffix) of a file name, or None if it is not a supported source file."""
    low = name.lower()
    for kind in ("txt", "jsonl"):
        for comp in COMPRESSIONS:
            if low.endswith(f".{kind}{comp}"):
                return kind, comp
    if low.endswith(".parquet"):
        return "parquet", ""
    return None


def path_problem(name: str) -> str | None:
    """Why a file named ``name`` cannot be a source, or None if it can."""
    if classify(name):
        return None
    low = name.lower()
    stem, dot, ext = low.rpartition(".")
    if dot and f".{ext}" in _OTHER_COMPRESSIONS:
        inner = stem.rpartition(".")[2]
        what = f"a .{inner} file " if inner in KINDS else ""
        return (f"unknown compression '.{ext}' ({what}{name}); supported compressions: .gz and .zst "
                f"(for .txt and .jsonl; parquet compresses internally)")
    if low.endswith((".parquet.gz", ".parquet.zst")):
        return f"{name}: parquet files are compressed internally; use the .parquet file itself"
    return f"unsupported file type {name!r}; supported: {', '.join(SUPPORTED)} and folders or globs of them"


def is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def check_filter(flt: dict | None) -> list[tuple[str, str]]:
    """Problems of a filter mapping as (key, message): empty when it is usable."""
    if not flt:
        return []
    out = []
    for k in flt:
        if k not in FILTER_KEYS:
            out.append((k, f"unknown filter {k!r}; filters are {', '.join(FILTER_KEYS)}"))
    lo, hi = flt.get("min_chars"), flt.get("max_chars")
    if lo is not None and hi is not None and lo > hi:
        out.append(("min_chars", f"min_chars ({lo}) is larger than max_chars ({hi}): every document would be dropped"))
    if flt.get("field") is None and (flt.get("min") is not None or flt.get("max") is not None):
        out.append(("field", "min/max give a threshold on a numeric field, but no field is named"))
    if flt.get("field") is not None and flt.get("min") is None and flt.get("max") is None:
        out.append(("field", f"field {flt['field']!r} is named but neither min nor max is set"))
    if flt.get("min") is not None and flt.get("max") is not None and flt["min"] > flt["max"]:
        out.append(("min", f"min ({flt['min']}) is larger than max ({flt['max']}): every document would be dropped"))
    return out


def doc_hash(text: str) -> int:
    """64-bit hash of a document after whitespace normalisation (what ``dedupe`` compares)."""
    norm = " ".join(text.split())
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


# --------------------------------------------------------------------------
# builtin: the standard library of the running interpreter
# --------------------------------------------------------------------------

def stdlib_dir() -> str:
    return os.path.realpath(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | None = None) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime_ns) of the stdlib .py files, sorted."""
    root = root or stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        for fn in filenames:
            if not fn.endswith(".py"):
                continue
            full = os.path.join(dirpath, fn)
            try:
                st = os.stat(full)
            except OSError:
                continue
            out.append((os.path.relpath(full, root).replace(os.sep, "/"), st.st_size, st.st_mtime_ns))
    out.sort()
    return out


def _docs_of(tree: ast.AST, lines: list[str]) -> str:
    """Docstrings and full-line comment blocks of one module, in source order."""
    items: list[tuple[int, str]] = []
    in_string: set[int] = set()  # lines that lie inside a multi-line string literal
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                items.append((node.body[0].lineno, doc.strip()))
        elif isinstance(node, (ast.Constant, ast.JoinedStr)):
            end = getattr(node, "end_lineno", None)
            if end is not None and end > node.lineno:
                in_string.update(range(node.lineno + 1, end + 1))
    block: list[str] = []
    block_start = 0
    prev = -2
    for no, line in enumerate(lines, 1):
        s = line.strip()
        if not s.startswith("#") or no in in_string or s.startswith("#!") or "-*- coding" in s:
            continue
        text = s.lstrip("#")
        text = text[1:] if text.startswith(" ") else text
        if not any(c.isalnum() for c in text):  # separators like "# -----"
            text = ""
        if no != prev + 1 and block:
            items.append((block_start, "\n".join(block).strip()))
            block = []
        if not block:
            block_start = no
        block.append(text.rstrip())
        prev = no
    if block:
        items.append((block_start, "\n".join(block).strip()))
    items.sort(key=lambda t: t[0])
    return "\n\n".join(t for _, t in items if t)


_BUILTIN_MEMO: dict[tuple, list[tuple[str, str, str]]] = {}


def _stdlib_corpus(root: str, listing: list[tuple[str, int, int]]) -> list[tuple[str, str, str]]:
    """[(relpath, code, docs)] for every readable, parsable stdlib file (memoised)."""
    key = (root, tuple(listing))
    if key in _BUILTIN_MEMO:
        return _BUILTIN_MEMO[key]
    out = []
    for rel, _, _ in listing:
        try:
            with open(os.path.join(root, rel), "rb") as fh:
                raw = fh.read()
            enc, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
            code = raw.decode(enc)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(code, filename=rel)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError, LookupError):
            continue
        out.append((rel, code, _docs_of(tree, code.splitlines())))
    _BUILTIN_MEMO.clear()  # keep at most one corpus in memory
    _BUILTIN_MEMO[key] = out
    return out


# --------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class FileEntry:
    rel: str        # shown in messages and part of the fingerprint
    full: str       # absolute path ("" for the builtin corpora)
    size: int
    mtime_ns: int


_MISSING = object()


class Source:
    """One named source of documents.

    ``skipped`` and ``filtered`` (Counters by reason) and ``notes`` (the first
    few examples) are filled while :meth:`documents` runs; ``bytes_read`` tells
    how far it has got through the input files (for progress).
    """

    def __init__(self, name: str, path: str, weight: float = 1.0, text_field: str = "text",
                 base_dir: str | os.PathLike | None = None, filter: dict | None = None,
                 dedupe: bool = False, metadata: dict | None = None, control: dict | None = None):
        self.name = name
        self.spec_path = path
        self.weight = weight
        self.text_field = text_field
        self.filter = {k: v for k, v in (filter or {}).items() if v is not None}
        self.dedupe = bool(dedupe)
        problems = check_filter(self.filter)
        if problems:
            raise DataError(f"source '{name}': filter.{problems[0][0]}: {problems[0][1]}")
        # conditioning (see malt.runtime.conditioning): metadata prefixes and control tokens
        from .conditioning import Conditioner, control_problems, metadata_problems
        metadata = {"template": metadata} if isinstance(metadata, str) else metadata  # the template alone
        for what, spec in (("metadata", metadata), ("control", control)):
            if spec is not None and not isinstance(spec, dict):
                raise DataError(f"source '{name}': {what} must be a mapping, got {spec!r}")
        self.metadata = {k: v for k, v in (metadata or {}).items() if v is not None} or None
        self.control = {k: v for k, v in (control or {}).items() if v is not None} or None
        for what, spec, check in (("metadata", self.metadata, metadata_problems), ("control", self.control, control_problems)):
            bad = check(spec) if spec else []
            if bad:
                raise DataError(f"source '{name}': {what}.{bad[0][0]}: {bad[0][1]}")
        self.record_fields: list[str] = Conditioner(self.metadata, self.control).fields  # what conditioning reads
        self.builtin: str | None = None
        self.glob: str | None = None
        self.path: Path | None = None
        self.reset_stats()
        if path.startswith("builtin:"):
            b = path[len("builtin:"):]
            if b not in BUILTINS:
                raise DataError(
                    f"source '{name}': unknown builtin corpus '{path}'; "
                    f"available: {', '.join('builtin:' + x for x in BUILTINS)}")
            self.builtin = b
        elif is_glob(path):
            pattern = os.path.expanduser(path)
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.abspath(base_dir or "."), pattern)
            self.glob = os.path.normpath(pattern)
        else:
            p = Path(os.path.expanduser(path))
            if not p.is_absolute():
                p = Path(base_dir or ".") / p
            self.path = p.resolve()
            if not self.path.exists():
                raise DataError(
                    f"source '{name}': path '{path}' does not exist (looked for {self.path}); "
                    f"fix the path in data.sources (relative paths resolve against the recipe's folder)")
            if self.path.is_file():
                problem = path_problem(self.path.name)
                if problem:
                    raise DataError(f"source '{name}': {problem}")
        if self.filter.get("field") is not None and self.path is not None and self.path.is_file() \
                and classify(self.path.name)[0] == "txt":
            raise DataError(f"source '{name}': filter.field needs records with fields (.jsonl or .parquet); "
                            f"{self.path.name} is plain text")
        if (self.metadata or self.control) and (self.builtin or self.path is not None and self.path.is_file()
                                                and classify(self.path.name)[0] == "txt"):
            what = "metadata" if self.metadata else "control"
            raise DataError(f"source '{name}': {what} reads record fields, but {path} is plain text without fields; "
                            f"use .jsonl or .parquet records")
        self._listing: list[FileEntry] | None = None

    def __repr__(self):
        return f"Source({self.name!r}, {self.spec_path!r})"

    def describe(self) -> str:
        if self.builtin:
            return self.spec_path
        return self.glob if self.glob else str(self.path)

    def reset_stats(self):
        self.skipped: Counter = Counter()
        self.filtered: Counter = Counter()
        self.notes: list[str] = []
        self.records = 0            # records seen (kept, skipped or filtered)
        self.bytes_read = 0         # of the input files, for progress

    @property
    def skip_notes(self) -> list[str]:  # older name
        return self.notes

    # -- files -------------------------------------------------------------
    def files(self) -> list[FileEntry]:
        """The input files, sorted by path; cached per object."""
        if self._listing is not None:
            return self._listing
        if self.builtin:
            self._listing = [FileEntry(rel, "", size, mt) for rel, size, mt in stdlib_files()]
        elif self.glob:
            root = _glob_root(self.glob)
            found: dict[str, os.stat_result] = {}
            seen: set[tuple[int, int]] = set()  # (device, inode): a file two matches reach is read once
            for m in sorted(_glob.glob(self.glob, recursive=True)):
                if os.path.isdir(m):
                    for full, st in _walk(Path(m), seen):
                        found[full] = st
                elif classify(os.path.basename(m)) and not os.path.basename(m).startswith("."):
                    try:
                        st = os.stat(m)
                    except OSError:
                        continue
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        found[os.path.abspath(m)] = st
            self._listing = sorted(FileEntry(os.path.relpath(f, root).replace(os.sep, "/"), f, st.st_size, st.st_mtime_ns)
                                   for f, st in found.items())
        elif self.path.is_file():
            st = self.path.stat()
            self._listing = [FileEntry(self.path.name, str(self.path), st.st_size, st.st_mtime_ns)]
        else:
            self._listing = sorted(
                FileEntry(Path(full).relative_to(self.path).as_posix(), full, st.st_size, st.st_mtime_ns)
                for full, st in _walk(self.path))
        return self._listing

    def config(self) -> dict:
        """What, besides the files, decides the documents (part of every cache key)."""
        out = {"text_field": self.text_field, "filter": dict(sorted(self.filter.items())), "dedupe": self.dedupe}
        if self.metadata:  # only when set: the keys of unconditioned shards stay as they were
            out["metadata"] = dict(sorted(self.metadata.items()))
        if self.control:  # (whether the control tokens are in the loss changes no token)
            out["control"] = dict(sorted((k, v) for k, v in self.control.items() if k != "loss"))
        return out

    def fingerprint(self) -> str:
        """Changes whenever the documents may have changed (cheap: stat only)."""
        if self.builtin:
            info = {"builtin": self.builtin, "python": sys.version, "stdlib": stdlib_dir(),
                    "files": [(f.rel, f.size, f.mtime_ns) for f in self.files()]}
        else:
            info = {"path": self.describe(), "files": [(f.rel, f.size, f.mtime_ns) for f in self.files()]}
        info.update(self.config())
        return _digest(info)

    # -- documents -----------------------------------------------------------
    def documents(self, files: list[FileEntry] | None = None, seen: set | None = None,
                  hashes: list | None = None, with_fields: bool = False) -> Iterator[str]:
        """Yield the documents that pass the filters, in a deterministic order.

        ``files``: a subset of :meth:`files` (default: all). ``seen``: hashes of the
        documents kept so far (``dedupe``); updated in place. ``hashes``: if given
        (with ``dedupe``), the hash of each yielded document is appended to it.
        ``with_fields``: yield ``(text, fields)`` instead, ``fields`` holding the record's
        values of :attr:`record_fields` that it has.
        """
        if self.dedupe and seen is None:
            seen = set()
        lo = self.filter.get("min_chars")
        hi = self.filter.get("max_chars")
        field = self.filter.get("field")
        fmin, fmax = self.filter.get("min"), self.filter.get("max")
        for text, score, fields in self._records(self.files() if files is None else files):
            self.records += 1
            if not text.strip():
                self.filtered["empty"] += 1
                continue
            n = len(text)
            if lo is not None and n < lo:
                self.filtered["min_chars"] += 1
                continue
            if hi is not None and n > hi:
                self.filtered["max_chars"] += 1
                continue
            if field is not None:
                if score is _MISSING or isinstance(score, bool) or not isinstance(score, (int, float)) \
                        or not math.isfinite(score):
                    self.filtered["field_missing"] += 1
                    continue
                if (fmin is not None and score < fmin) or (fmax is not None and score > fmax):
                    self.filtered["field"] += 1
                    continue
            if self.dedupe:
                h = doc_hash(text)
                if h in seen:
                    self.filtered["duplicate"] += 1
                    continue
                seen.add(h)
                if hashes is not None:
                    hashes.append(h)
            yield (text, fields) if with_fields else text

    def _records(self, files: list[FileEntry]) -> Iterator[tuple[str, object, dict | None]]:
        """(text, value of the filter field or _MISSING, the record's values of record_fields) of every readable record."""
        if self.builtin:
            root = stdlib_dir()
            col = 1 if self.builtin == "python-code" else 2
            wanted = {f.rel for f in files}
            for row in _stdlib_corpus(root, [(f.rel, f.size, f.mtime_ns) for f in self.files()]):
                if row[0] in wanted:
                    self.bytes_read += len(row[1])
                    yield row[col], _MISSING, None
            return
        for f in files:
            start = self._raw_base = self.bytes_read
            kind, comp = classify(f.full) or (None, None)
            try:
                if kind == "parquet":
                    yield from self._read_parquet(f)
                else:
                    with open(f.full, "rb") as raw:
                        self._raw = raw
                        fh = _decompressed(raw, comp)
                        if kind == "txt":
                            yield from self._read_txt(fh, f)
                        else:
                            yield from self._read_jsonl(fh, f)
            except OSError as e:
                self._skip("unreadable", f"{f.rel}: unreadable ({e.strerror or e})")
            except (EOFError, zlib.error) as e:
                self._skip("unreadable", f"{f.rel}: corrupt or truncated {COMPRESSIONS.get(comp, 'compressed')} stream ({e}); "
                                         f"the documents before the damage were kept")
            except Exception as e:  # zstandard.ZstdError, pyarrow.ArrowException
                if type(e).__module__.split(".")[0] not in ("zstandard", "pyarrow", "_zstd"):
                    raise
                self._skip("unreadable", f"{f.rel}: corrupt or unreadable file ({type(e).__name__}: {e}); "
                                         f"the documents before the damage were kept")
            finally:
                self._raw = None
            self.bytes_read = start + f.size

    _raw = None
    _raw_base = 0

    def progress_bytes(self) -> int:
        """Bytes of the input files consumed so far (approximate within a compressed file)."""
        raw = self._raw
        if raw is not None:
            try:
                return self._raw_base + raw.tell()
            except (OSError, ValueError):
                pass
        return self.bytes_read

    def _read_txt(self, fh, f: FileEntry) -> Iterator[tuple[str, object]]:
        raw = fh.read()
        try:
            text = raw.decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is not text
        except UnicodeDecodeError as e:
            self._skip("bad_encoding", f"{f.rel}: invalid UTF-8 at byte {e.start}")
            return
        yield text, _MISSING, None

    def _read_jsonl(self, fh, f: FileEntry) -> Iterator[tuple[str, object]]:
        field = self.text_field
        score_field = self.filter.get("field")
        for no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                s = line.decode("utf-8-sig" if no == 1 else "utf-8")  # a byte-order mark before the first record
            except UnicodeDecodeError as e:
                self._skip("bad_encoding", f"{f.rel}:{no}: invalid UTF-8 at byte {e.start}")
                continue
            try:
                rec = json.loads(s)
            except ValueError:
                self._skip("invalid_json", f"{f.rel}:{no}: invalid JSON")
                continue
            if not isinstance(rec, dict) or field not in rec:
                self._skip("no_field", f"{f.rel}:{no}: no '{field}' field")
                continue
            text = rec[field]
            if not isinstance(text, str):
                self._skip("not_text", f"{f.rel}:{no}: '{field}' is {type(text).__name__}, not a string")
                continue
            if _SURROGATE_ESCAPE.search(line):  # "\ud800" escapes can make strings that are not UTF-8
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    self._skip("bad_encoding", f"{f.rel}:{no}: '{field}' holds an unpaired surrogate escape")
                    continue
            yield (text, (rec.get(score_field, _MISSING) if score_field else _MISSING),
                   {k: rec[k] for k in self.record_fields if k in rec} if self.record_fields else None)

    def _read_parquet(self, f: FileEntry) -> Iterator[tuple[str, object]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        field = self.text_field
        score_field = self.filter.get("field")
        pf = pq.ParquetFile(f.full)
        names = pf.schema_arrow.names
        total = pf.metadata.num_rows
        if field not in names:
            if total:
                self._skip("no_field", f"{f.rel}: no column '{field}' (columns: {', '.join(names[:8])})", total)
            return
        ftype = pf.schema_arrow.field(field).type
        if pa.types.is_dictionary(ftype):  # pandas category / polars Categorical columns: their values are the text
            ftype = ftype.value_type
        is_str = (pa.types.is_string(ftype) or pa.types.is_large_string(ftype)
                  or getattr(pa.types, "is_string_view", lambda _: False)(ftype))
        is_bin = (pa.types.is_binary(ftype) or pa.types.is_large_binary(ftype)
                  or getattr(pa.types, "is_binary_view", lambda _: False)(ftype))
        if not (is_str or is_bin):
            if total:
                self._skip("not_text", f"{f.rel}: column '{field}' is {ftype}, not text", total)
            return
        score_col = score_field if score_field and score_field in names and score_field != field else None
        cols = [field] + ([score_col] if score_col else [])
        extra = [k for k in self.record_fields if k in names and k not in cols]  # conditioning fields
        cols += extra
        done = 0
        row = 0
        for batch in pf.iter_batches(batch_size=4096, columns=cols):
            texts = batch.column(0).to_pylist()
            scores = batch.column(1).to_pylist() if score_col else None
            named = {c: batch.column(c).to_pylist() for c in dict.fromkeys(self.record_fields) if c in names}
            for i, t in enumerate(texts):
                row += 1
                if t is None:
                    self._skip("no_field", f"{f.rel}: row {row}: '{field}' is null")
                    continue
                if is_bin:
                    try:
                        t = t.decode("utf-8")
                    except UnicodeDecodeError as e:
                        self._skip("bad_encoding", f"{f.rel}: row {row}: invalid UTF-8 at byte {e.start}")
                        continue
                s = _MISSING if scores is None or scores[i] is None else scores[i]
                yield t, s, ({k: v[i] for k, v in named.items() if v[i] is not None} if self.record_fields else None)
            done += batch.num_rows
            self.bytes_read = self._raw_base + (f.size * done // max(total, 1))

    def _skip(self, reason: str, note: str, n: int = 1):
        self.skipped[reason] += n
        self.records += n
        if len(self.notes) < 5:
            self.notes.append(note)


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard (paths are shown relative to it)."""
    parts = Path(pattern).parts
    fixed = []
    for p in parts:
        if is_glob(p):
            break
        fixed.append(p)
    root = os.path.join(*fixed) if fixed else "."
    return root if os.path.isdir(root) else os.path.dirname(root)


def _walk(root: Path, seen_files: set | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """(absolute path, stat) of every supported, non-hidden file below ``root``, each file once.

    Symbolic links to folders are followed, but a folder is entered once (by device and inode), so a link back up
    the tree (``sub/loop -> ..``) neither loops nor repeats files; a file that two links reach is read once, under
    the first path in sorted order. ``seen_files`` carries that across several roots."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files = set() if seen_files is None else seen_files
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith(".") or not classify(fn):
                continue
            full = os.path.join(dirpath, fn)
            try:
                fst = os.stat(full)
            except OSError:
                continue
            if (fst.st_dev, fst.st_ino) in seen_files:
                continue
            seen_files.add((fst.st_dev, fst.st_ino))
            yield os.path.abspath(full), fst


def _decompressed(raw, comp: str):
    """A binary, line-iterable stream of the decompressed bytes of ``raw``."""
    if comp == ".gz":
        import gzip
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if comp == ".zst":
        return io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 20)
    return raw


class _ZstdReader(io.RawIOBase):
    """Decompresses a zstandard file of one or more frames; a file cut inside a frame is an
    EOFError (zstandard's own stream reader just stops there, silently)."""

    def __init__(self, raw):
        import zstandard
        self._zstd = zstandard
        self._raw = raw
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._fed = False       # data given to the current frame's decompressor
        self._buf = b""

    def readable(self):
        return True

    _pos = 0

    def readinto(self, b):
        while self._pos >= len(self._buf):
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._fed and not self._obj.eof:
                    raise EOFError("the file ends inside a zstandard frame (truncated?)")
                return 0
            out = []
            while chunk:
                self._fed = True
                out.append(self._obj.decompress(chunk))
                chunk = b""
                if self._obj.eof:  # next frame
                    chunk = self._obj.unused_data
                    self._obj = self._zstd.ZstdDecompressor().decompressobj()
                    self._fed = False
            self._buf, self._pos = b"".join(out), 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        return n


def make_source(entry: dict, base_dir) -> Source:
    """Build a Source from one ``spec["sources"]`` entry."""
    if not isinstance(entry, dict) or "name" not in entry or "path" not in entry:
        raise DataError(f"data source {entry!r} needs at least 'name' and 'path'")
    return Source(
        name=str(entry["name"]),
        path=str(entry["path"]),
        weight=float(entry.get("weight", 1.0)),
        text_field=str(entry.get("text_field") or "text"),
        base_dir=base_dir,
        filter=entry.get("filter"),
        dedupe=bool(entry.get("dedupe", False)),
        metadata=entry.get("metadata"),
        control=entry.get("control"),
    )
