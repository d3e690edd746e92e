"""Tokenizers for the data pipeline, built with the ``tokenizers`` library.

Kinds:

- ``bpe``: byte-level BPE trained on the recipe's sources (special tokens
  first, so the first special token, the document separator, is id 0).
- ``unigram``: a byte-level Unigram language model (SentencePiece's algorithm)
  trained the same way; the 256 byte symbols are always in its vocabulary, so
  any text encodes and decodes back exactly.
- ``bytes``: 256 byte tokens (id = byte value) plus the special tokens.
- ``file``: an existing ``tokenizer.json``.

``add_special_tokens`` (ChatML markers, UL2 mode tokens, control tokens) are
appended after the vocabulary of any kind, in the order given; a token the
file already has keeps its id. No special token is ever read from document
text: text that spells one is tokenized as ordinary text.

Every tokenizer is saved as ``tokenizer.json`` in the cache and reused when the
same tokenizer spec and the same training-text fingerprint are asked again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .sources import DataError, Source, _digest

__all__ = ["KINDS", "build_tokenizer", "byte_tokenizer", "load_tokenizer", "read_tokenizer_file", "tokenizer_hash",
           "bytes_to_unicode"]

KINDS = ("bpe", "unigram", "bytes", "file")
DEFAULT_SPECIALS = ["<|endoftext|>"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenization uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_level(tok):
    from tokenizers import decoders, pre_tokenizers
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def byte_tokenizer(specials: list[str]):
    """256 byte tokens (token id == byte value), then the special tokens."""
    from tokenizers import Tokenizer, models
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = _byte_level(Tokenizer(models.BPE(vocab=vocab, merges=[])))
    tok.add_special_tokens(list(specials))
    return tok


def _train(kind: str, texts: Iterable[str], vocab_size: int, specials: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "bpe":
        tok = _byte_level(Tokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                      initial_alphabet=alphabet, show_progress=False)
    else:
        # Unigram over the byte-level alphabet: every byte symbol is a required piece, so no
        # unknown token is needed. (On tiny repetitive corpora the trainer finds few pieces
        # beyond the alphabet; on real text it fills the vocabulary.)
        assert kind == "unigram"
        tok = _byte_level(Tokenizer(models.Unigram()))
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                          initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if kind == "unigram":
        vocab = tok.get_vocab()
        missing = [a for a in alphabet if a not in vocab]
        if missing:  # never seen; without them some text would not encode
            raise DataError(f"the unigram trainer dropped {len(missing)} byte symbols from the vocabulary; "
                            f"use tokenizer.kind: bpe")
    return tok


def load_tokenizer(path: str | os.PathLike, users: bool = False):
    """A tokenizers Tokenizer from its tokenizer.json; ``users``: the file is the recipe's tokenizer.path, not malt's cache."""
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses
        fix = ("point tokenizer.path at a valid tokenizer.json (one that tokenizers' Tokenizer.save() wrote)" if users else
               "it is malt's cached tokenizer: delete it and the next run rebuilds it")
        raise DataError(f"cannot read tokenizer file {path}: {e}; {fix}") from None


def _reason(e: Exception) -> str:
    """Why tokenizers could not read a file, in one short line ("expected value at line 1 column 1")."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


# the hint for a run directory's tokenizer.json that cannot be read (export, sample, resume)
RUN_DIR_FIX = ("copy it back from a backup of the run, or let `malt run RECIPE --resume` write it again from the data "
               "cache (the tokenizer `malt data RECIPE` names): it does so only when the cache's tokenizer gives the "
               "token ids the checkpoint trained with")


def read_tokenizer_file(path: str | os.PathLike, what: str = "the tokenizer file", fix: str | None = None):
    """A tokenizers Tokenizer from a tokenizer.json malt did not just build: a run directory's, a distillation teacher's,
    an init_from checkpoint's. A file tokenizers cannot read (not JSON, cut short, not a tokenizer, unreadable) is a
    RunError (printed without a traceback) naming ``what`` and the file, saying it is corrupt or unreadable and, as its
    hint, ``fix`` (default: copy it back from a backup)."""
    from tokenizers import Tokenizer

    from .run import RunError

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001  tokenizers raises plain Exception subclasses; OSError for an unreadable file
        raise RunError(f"{what} {path} is corrupt or unreadable ({_reason(e)})",
                       fix or "copy it back from a backup (or from where it was copied from)") from None


def differing_tokens(tok_file: str | os.PathLike, tokenizer, what: str = "the other model's tokenizer",
                     fix: str | None = None) -> list[str]:
    """Tokens of ``tokenizer`` that ``tok_file`` (another model's tokenizer.json) lacks or gives another id: empty when
    every token this run can produce means, by its id, what it meant to that model. ``what``, ``fix``: said when
    ``tok_file`` cannot be read (:func:`read_tokenizer_file`)."""
    theirs = read_tokenizer_file(tok_file, what, fix).get_vocab()
    return sorted(t for t, i in tokenizer.get_vocab().items() if theirs.get(t) != i)


def tokenizer_hash(path: str | os.PathLike) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _save(tok, path: Path):
    _atomic_write_bytes(path, tok.to_str(pretty=True).encode())


# BPE/unigram training time grows with the square of a word's length: a run of thousands of characters without
# a space (a minified file, base64, a line of one repeated character) is split into words of this many
# characters for training only (100k such characters took 7.8 s, split 0.02 s); ordinary text is untouched
LONGEST_WORD = 1000
_LONG_RUN = re.compile(r"\S{%d,}" % (LONGEST_WORD + 1))


def _split_long_runs(doc: str) -> str:
    return _LONG_RUN.sub(lambda m: " ".join(m.group(0)[i:i + LONGEST_WORD] for i in range(0, len(m.group(0)), LONGEST_WORD)), doc)


def _training_texts(sources: list[Source], max_chars: int) -> Iterator[str]:
    """Documents round-robin across ``sources`` until ``max_chars`` (the last one cut); runs of more than
    LONGEST_WORD non-space characters are split (training time, not the data)."""
    iters = [s.documents() for s in sources]
    left = max_chars
    while iters and left > 0:
        alive = []
        for it in iters:
            if left <= 0:
                break
            doc = next(it, None)
            if doc is None:
                continue
            alive.append(it)
            if len(doc) > left:
                doc = doc[:left]
            left -= len(doc)
            yield _split_long_runs(doc) if len(doc) > LONGEST_WORD else doc
        iters = alive


def cache_read_only_error(cache_dir, reason: str, lacking: str) -> DataError:
    """The error for a data cache this process cannot write (``reason``) that lacks what the run needs (``lacking``)."""
    return DataError(f"cannot use {cache_dir} as malt's data cache: {lacking}, and this user cannot write there ({reason}); "
                     "prepare the data where it can be written (`malt prepare RECIPE` by a user who can write it), or set "
                     "MALT_CACHE_DIR to a directory this user can write (tokenizers and token shards go there)")


def build_tokenizer(tspec: dict, sources: list[Source], cache_dir: Path, base_dir,
                    log: Callable[[str], None] = print, hit_log: Callable[[str], None] | None = None,
                    read_only: str | None = None):
    """Return (tokenizer, path of its saved tokenizer.json, content hash, specials). ``hit_log``: where a cache hit
    is said (default ``log``). ``read_only``: why the cache cannot be written (None: it can); the tokenizer must then
    be in it already. A cached tokenizer.json that cannot be read is built again (it is derived data)."""
    tspec = dict(tspec or {})
    kind = tspec.get("kind", "bpe")
    if kind not in KINDS:
        raise DataError(f"tokenizer.kind '{kind}' is not one of: {', '.join(KINDS)}")
    specials = tspec.get("special_tokens")
    specials = list(DEFAULT_SPECIALS if specials is None else specials)
    if not specials:
        raise DataError("tokenizer.special_tokens is empty; it needs at least one token "
                        "(the first one separates documents), e.g. ['<|endoftext|>']")
    if len(set(specials)) != len(specials):
        raise DataError(f"tokenizer.special_tokens has duplicates: {specials}")
    added = list(tspec.get("add_special_tokens") or [])
    clash = sorted({t for t in added if added.count(t) > 1 or t in specials})
    if clash:
        raise DataError(f"tokenizer.add_special_tokens repeats {clash} (of itself or of special_tokens)")

    key: dict = {"kind": kind, "specials": specials}
    if added:
        key["add_special_tokens"] = added
    train_sources: list[Source] = []
    src_path = None
    if kind in ("bpe", "unigram"):
        vocab_size = int(tspec.get("vocab_size") or 8192)
        if vocab_size < 256 + len(specials):
            raise DataError(f"tokenizer.vocab_size {vocab_size} is too small for a byte-level {kind} "
                            f"tokenizer; it needs at least 256 + {len(specials)} special tokens")
        names = list(tspec.get("train_on") or [s.name for s in sources])
        by_name = {s.name: s for s in sources}
        for n in names:
            if n not in by_name:
                raise DataError(f"tokenizer.train_on names unknown source '{n}'; "
                                f"sources are: {', '.join(by_name)}")
        train_sources = [by_name[n] for n in names]
        max_chars = int(tspec.get("max_chars") or 20_000_000)
        key.update(vocab_size=vocab_size, max_chars=max_chars, longest_word=LONGEST_WORD,  # how the training text is read
                   train_on=[[s.name, s.fingerprint()] for s in train_sources])
    elif kind == "file":
        if not tspec.get("path"):
            raise DataError("tokenizer.kind is 'file' but tokenizer.path is not set")
        src_path = Path(os.path.expanduser(str(tspec["path"])))
        if not src_path.is_absolute():
            src_path = Path(base_dir or ".") / src_path
        if not src_path.is_file():
            raise DataError(f"tokenizer file '{tspec['path']}' does not exist (looked for {src_path})")
        key.update(file_sha256=tokenizer_hash(src_path))

    tdir = Path(cache_dir) / "tokenizers" / f"{kind}-{_digest(key)[:16]}"
    path = tdir / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001  malt's own derived file, cut short or overwritten: built again
            reason = _reason(e)
            if read_only:
                raise cache_read_only_error(cache_dir, read_only,
                                            f"its tokenizer {path} is corrupt or unreadable ({reason})") from None
            log(f"data: the cached tokenizer {path} is corrupt or unreadable ({reason}); building it again")
        else:
            (hit_log or log)(f"data: tokenizer cache hit ({kind}, vocab {tok.get_vocab_size():,}): {path}")
            return tok, str(path), tokenizer_hash(path), specials
    if read_only:
        raise cache_read_only_error(cache_dir, read_only, f"it lacks this recipe's tokenizer ({path})")

    t0 = time.time()
    if kind == "bytes":
        tok = byte_tokenizer(specials)
        log(f"data: built bytes tokenizer (256 bytes + {len(specials)} special tokens)")
    elif kind == "file":
        tok = load_tokenizer(src_path, users=True)
        missing = [s for s in specials if tok.token_to_id(s) is None]
        if missing:
            log(f"data: adding special tokens {missing} to {src_path.name}")
            tok.add_special_tokens(missing)
    else:
        names = ", ".join(s.name for s in train_sources)
        log(f"data: training {kind} tokenizer (vocab {key['vocab_size']:,}) on {names}, "
            f"up to {key['max_chars']:,} characters ...")
        stats = {"chars": 0, "docs": 0}

        def counted(it):
            for d in it:
                stats["chars"] += len(d)
                stats["docs"] += 1
                yield d

        tok = _train(kind, counted(_training_texts(train_sources, key["max_chars"])),
                     key["vocab_size"], specials)
        if stats["docs"] == 0:
            raise DataError(f"no text to train the tokenizer on: the sources it trains on ({names}) yield no documents "
                            "(empty or binary files, or every document filtered out); check their paths, text_field and filter, "
                            "or name other sources in tokenizer.train_on")
        missing = [s for s in specials if tok.token_to_id(s) is None]
        if missing:
            tok.add_special_tokens(missing)
        log(f"data: trained tokenizer on {stats['docs']:,} documents, {stats['chars']:,} characters "
            f"in {time.time() - t0:.1f}s; vocab {tok.get_vocab_size():,}")
        if tok.get_vocab_size() < key["vocab_size"]:
            log(f"data: note: the training text only supported {tok.get_vocab_size():,} of the "
                f"{key['vocab_size']:,} requested tokens")
    extra = [t for t in added if tok.token_to_id(t) is None]
    if extra:
        n0 = tok.get_vocab_size()
        tok.add_special_tokens(extra)
        log(f"data: added {len(extra)} special token(s) at ids {n0:,}-{tok.get_vocab_size() - 1:,}: "
            + ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
    tdir.mkdir(parents=True, exist_ok=True)
    _save(tok, path)
    _atomic_write_bytes(tdir / "spec.json", json.dumps(key, indent=1, sort_keys=True).encode())
    return load_tokenizer(path), str(path), tokenizer_hash(path), specials
