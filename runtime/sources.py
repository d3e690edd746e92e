"""Text sources for the data pipeline: builtin corpora and local files.

A source turns a path from the recipe into a stream of documents (strings)
and a cheap fingerprint that changes whenever its content may have changed
(paths, sizes and modification times; never the content itself, so checking a
cached source costs a few ``stat`` calls).

Supported paths:

- ``builtin:python-docs``: docstrings (modules, classes, functions) and comment
  blocks of the running interpreter's standard library, one document per file.
- ``builtin:python-code``: the source code of those files, one document per file.
- ``*.txt``: one document per file.
- ``*.jsonl``: one document per line, taken from ``text_field``; broken lines and
  records without the field are counted and skipped.
- a directory: every ``.txt`` and ``.jsonl`` file below it, sorted by path.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import sys
import sysconfig
import tokenize
import warnings
from pathlib import Path
from typing import Iterator

__all__ = ["DataError", "Source", "make_source", "BUILTINS"]


class DataError(Exception):
    """A user-facing data problem (bad path, empty source, corrupt cache...).

    The message is complete and says how to fix the problem; callers print it
    without a traceback.
    """


BUILTINS = ("python-docs", "python-code")
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "__pycache__"}


def _digest(obj) -> str:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


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

class Source:
    """One named source of documents.

    ``skipped`` (and ``skip_notes``) are filled while ``documents()`` runs.
    """

    def __init__(self, name: str, path: str, weight: float = 1.0, text_field: str = "text",
                 base_dir: str | os.PathLike | None = None):
        self.name = name
        self.spec_path = path
        self.weight = weight
        self.text_field = text_field
        self.skipped = 0
        self.skip_notes: list[str] = []
        self.builtin: str | None = None
        if path.startswith("builtin:"):
            b = path[len("builtin:"):]
            if b not in BUILTINS:
                raise DataError(
                    f"source '{name}': unknown builtin corpus '{path}'; "
                    f"available: {', '.join('builtin:' + x for x in BUILTINS)}")
            self.builtin = b
            self.path = None
        else:
            p = Path(os.path.expanduser(path))
            if not p.is_absolute():
                p = Path(base_dir or ".") / p
            self.path = p.resolve()
            if not self.path.exists():
                raise DataError(
                    f"source '{name}': path '{path}' does not exist (looked for {self.path}); "
                    f"fix the path in data.sources (relative paths resolve against the recipe's folder)")
            if self.path.is_file() and not self._kind_of(self.path):
                raise DataError(
                    f"source '{name}': unsupported file type '{self.path.name}'; "
                    f"expected a .txt file (one document), a .jsonl file (one document per line) or a folder")
        self._listing = None

    def __repr__(self):
        return f"Source({self.name!r}, {self.spec_path!r})"

    def describe(self) -> str:
        return self.spec_path if self.builtin else str(self.path)

    @staticmethod
    def _kind_of(p: Path) -> str | None:
        name = p.name.lower()
        if name.endswith(TEXT_SUFFIXES):
            return "txt"
        if name.endswith(JSONL_SUFFIXES):
            return "jsonl"
        return None

    def files(self) -> list[tuple[str, int, int]]:
        """(path relative to the source root, size, mtime_ns), sorted; cached per object."""
        if self._listing is not None:
            return self._listing
        if self.builtin:
            self._listing = stdlib_files()
        elif self.path.is_file():
            st = self.path.stat()
            self._listing = [("", st.st_size, st.st_mtime_ns)]
        else:
            out = []
            for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in filenames:
                    full = Path(dirpath) / fn
                    if fn.startswith(".") or not self._kind_of(full):
                        continue
                    try:
                        st = full.stat()
                    except OSError:
                        continue
                    out.append((full.relative_to(self.path).as_posix(), st.st_size, st.st_mtime_ns))
            out.sort()
            self._listing = out
        return self._listing

    def fingerprint(self) -> str:
        """Changes whenever the documents may have changed (cheap: stat only)."""
        if self.builtin:
            info = {"builtin": self.builtin, "python": sys.version, "stdlib": stdlib_dir(),
                    "files": self.files()}
        else:
            info = {"path": str(self.path), "text_field": self.text_field, "files": self.files()}
        return _digest(info)

    def documents(self) -> Iterator[str]:
        """Yield the non-empty documents in a deterministic order."""
        self.skipped = 0
        self.skip_notes = []
        if self.builtin:
            root = stdlib_dir()
            col = 1 if self.builtin == "python-code" else 2
            for row in _stdlib_corpus(root, self.files()):
                if row[col].strip():
                    yield row[col]
            return
        for rel, _, _ in self.files():
            full = self.path / rel if rel else self.path
            kind = self._kind_of(full)
            if kind == "txt":
                yield from self._read_txt(full)
            elif kind == "jsonl":
                yield from self._read_jsonl(full, rel or full.name)

    def _read_txt(self, full: Path) -> Iterator[str]:
        try:
            with open(full, "rb") as fh:
                raw = fh.read()
        except OSError as e:
            self._skip(f"{full}: unreadable ({e.strerror or e})")
            return
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            yield text

    def _read_jsonl(self, full: Path, label: str) -> Iterator[str]:
        try:
            fh = open(full, "rb")
        except OSError as e:
            self._skip(f"{full}: unreadable ({e.strerror or e})")
            return
        field = self.text_field
        with fh:
            for no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    self._skip(f"{label}:{no}: invalid JSON")
                    continue
                if not isinstance(rec, dict) or field not in rec:
                    self._skip(f"{label}:{no}: no '{field}' field")
                    continue
                text = rec[field]
                if not isinstance(text, str):
                    self._skip(f"{label}:{no}: '{field}' is {type(text).__name__}, not a string")
                    continue
                if text.strip():
                    yield text

    def _skip(self, note: str):
        self.skipped += 1
        if len(self.skip_notes) < 5:
            self.skip_notes.append(note)


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
    )
