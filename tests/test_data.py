"""Tests of the runtime data pipeline (malt.runtime.data / sources / tokenizer)."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from malt.runtime import sources as sources_mod
from malt.runtime.data import DataError, prepare
from malt.runtime.sources import _docs_of

EOS = "<|endoftext|>"


def make_spec(tmp_path, srcs, kind="bytes", validation=0.0, seed=1, **tok):
    return {
        "base_dir": str(tmp_path),
        "seed": seed,
        "validation": validation,
        "tokenizer": {"kind": kind, "special_tokens": [EOS], **tok},
        "sources": [
            {"name": n, "path": p, "weight": w, "text_field": "text"} for n, p, w in srcs
        ],
    }


def run(spec, cache):
    lines = []
    ds = prepare(spec, cache, log=lines.append)
    return ds, "\n".join(lines)


def tokens_of(ds, i):
    return ds.tokens(i).numpy()


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    write(tmp_path / "a.txt", "alpha document\nwith two lines\n")
    write(tmp_path / "b.jsonl", "\n".join(json.dumps({"text": t}) for t in ["bee one", "bee two", "bee three"]))
    write(tmp_path / "dir" / "x.txt", "x text")
    write(tmp_path / "dir" / "sub" / "y.jsonl", json.dumps({"text": "y1"}) + "\n" + json.dumps({"text": "y2"}))
    write(tmp_path / "dir" / "ignored.md", "not a source file")
    return tmp_path


# --------------------------------------------------------------------------- sources


def test_txt_jsonl_dir_sources(corpus, tmp_path):
    spec = make_spec(corpus, [("a", "a.txt", 1), ("b", "b.jsonl", 1), ("d", "dir", 1)])
    ds, log = run(spec, tmp_path / "cache")
    assert [s["documents"] for s in ds.sources] == [1, 3, 3]
    assert ds.vocab_size == 257 and ds.eos_id == 256
    d = tokens_of(ds, 2)
    assert d.dtype == np.uint16
    text = bytes(int(t) if t != 256 else 0 for t in d).split(b"\0")
    assert text == [b"y1", b"y2", b"x text", b""]  # sorted paths (sub/y.jsonl < x.txt); EOS after each
    assert "tokenizing d" in log


def test_bytes_fast_path_matches_tokenizer(tmp_path):
    doc = "héllo wörld ✓ " + EOS + " tail\n\n  spaces"
    write(tmp_path / "u.txt", doc)
    ds, _ = run(make_spec(tmp_path, [("u", "u.txt", 1)]), tmp_path / "cache")
    tok = ds.tokenizer
    tok.encode_special_tokens = True
    expected = tok.encode(doc, add_special_tokens=False).ids + [ds.eos_id]
    assert tokens_of(ds, 0).tolist() == expected
    assert ds.decode(expected[:-1]) == doc


def test_broken_jsonl_lines_are_counted(tmp_path):
    lines = [json.dumps({"text": "good one"}), "{broken", json.dumps({"other": 1}), "[1, 2]",
             json.dumps({"text": 5}), "", json.dumps({"text": "good two"})]
    write(tmp_path / "c.jsonl", "\n".join(lines))
    ds, log = run(make_spec(tmp_path, [("c", "c.jsonl", 1)]), tmp_path / "cache")
    assert ds.sources[0]["documents"] == 2
    assert ds.sources[0]["skipped"] == 4
    assert "skipped 4" in log and "c.jsonl:2: invalid JSON" in log
    ds2, _ = run(make_spec(tmp_path, [("c", "c.jsonl", 1)]), tmp_path / "cache")
    assert ds2.sources[0]["skipped"] == 4  # from the manifest on a cache hit


def test_empty_source_is_an_error(tmp_path):
    write(tmp_path / "ok.txt", "fine")
    write(tmp_path / "empty.jsonl", "{bad\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"source 'hollow'.*empty\.jsonl.*no text"):
        run(make_spec(tmp_path, [("ok", "ok.txt", 1), ("hollow", "empty.jsonl", 1)]), tmp_path / "c")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="source 'void'.*no text"):
        run(make_spec(tmp_path, [("void", "nothing", 1)]), tmp_path / "c")


def test_missing_path_and_bad_type(tmp_path):
    with pytest.raises(DataError, match=r"source 'gone'.*no/such\.txt"):
        run(make_spec(tmp_path, [("gone", "no/such.txt", 1)]), tmp_path / "c")
    write(tmp_path / "doc.pdf", "x")
    with pytest.raises(DataError, match="unsupported file type"):
        run(make_spec(tmp_path, [("p", "doc.pdf", 1)]), tmp_path / "c")
    with pytest.raises(DataError, match="unknown builtin"):
        run(make_spec(tmp_path, [("p", "builtin:nope", 1)]), tmp_path / "c")


def test_docs_extraction():
    import ast
    src = '''#!/usr/bin/env python
# -*- coding: utf-8 -*-
"""Module doc."""
# A comment block
# on two lines.
x = """
# not a comment: inside a string
"""
# ----------
class C:
    """Class doc."""
    def f(self):  # trailing, ignored
        """Method doc."""
'''
    out = _docs_of(ast.parse(src), src.splitlines())
    assert out == "Module doc.\n\nA comment block\non two lines.\n\nClass doc.\n\nMethod doc."


def test_builtin_sources_small(tmp_path, monkeypatch):
    real = sources_mod.stdlib_files
    monkeypatch.setattr(sources_mod, "stdlib_files", lambda root=None: real(root)[:12])
    spec = make_spec(tmp_path, [("docs", "builtin:python-docs", 1), ("code", "builtin:python-code", 1)])
    ds, _ = run(spec, tmp_path / "cache")
    assert 0 < ds.sources[0]["documents"] <= 12 and 0 < ds.sources[1]["documents"] <= 12
    code = bytes(t for t in tokens_of(ds, 1).tolist() if t < 256).decode()
    assert "import " in code or "def " in code
    assert ds.sources[0]["tokens"] < ds.sources[1]["tokens"]


# --------------------------------------------------------------------------- tokenizers


def test_bpe_trains_and_is_reused(tmp_path):
    words = " ".join(f"word{i % 37} thing{i % 11}" for i in range(400))
    write(tmp_path / "t.txt", words + " " + EOS + " literal")
    write(tmp_path / "u.txt", "other source " * 50)
    spec = make_spec(tmp_path, [("t", "t.txt", 1), ("u", "u.txt", 1)], kind="bpe", vocab_size=320,
                     train_on=["t"], max_chars=100_000)
    spec["tokenizer"]["special_tokens"] = [EOS, "<|pad|>"]
    ds, log = run(spec, tmp_path / "cache")
    assert "training bpe tokenizer" in log
    assert ds.eos_id == 0 and ds.tokenizer.token_to_id("<|pad|>") is not None
    assert 256 + 2 < ds.vocab_size <= 320
    arr = tokens_of(ds, 0)
    assert len(arr) < len(words) / 2  # merges happened
    assert int((arr == ds.eos_id).sum()) == 1  # the literal "<|endoftext|>" in text is not EOS
    mtime = os.stat(ds.tokenizer_path).st_mtime_ns
    ds2, log2 = run(spec, tmp_path / "cache")
    assert "training" not in log2 and "tokenizer cache hit" in log2
    assert os.stat(ds2.tokenizer_path).st_mtime_ns == mtime
    assert ds2.tokenizer_path == ds.tokenizer_path
    # changing the training text retrains
    write(tmp_path / "t.txt", words + " more")
    _, log3 = run(spec, tmp_path / "cache")
    assert "training bpe tokenizer" in log3
    with pytest.raises(DataError, match="unknown source 'zz'"):
        spec["tokenizer"]["train_on"] = ["zz"]
        run(spec, tmp_path / "cache")


def test_file_tokenizer_adds_missing_specials(tmp_path):
    write(tmp_path / "t.txt", "some text here")
    ds, _ = run(make_spec(tmp_path, [("t", "t.txt", 1)]), tmp_path / "c1")
    spec = make_spec(tmp_path, [("t", "t.txt", 1)], kind="file", path=ds.tokenizer_path)
    spec["tokenizer"]["special_tokens"] = ["<|eot|>", EOS]
    ds2, log = run(spec, tmp_path / "c2")
    assert ds2.vocab_size == 258 and ds2.eos_id == 257
    assert "adding special tokens" in log
    spec["tokenizer"]["path"] = "missing.json"
    with pytest.raises(DataError, match="missing.json"):
        run(spec, tmp_path / "c2")


# --------------------------------------------------------------------------- cache


def manifest_of(path):
    """The manifest of the shard whose tokens file is ``path``."""
    return json.loads(open(str(path).replace(".tokens.npy", ".json")).read())


def test_cache_hit_and_only_changed_source_retokenized(corpus, tmp_path):
    spec = make_spec(corpus, [("a", "a.txt", 1), ("b", "b.jsonl", 1)])
    run(spec, tmp_path / "cache")
    _, log = run(spec, tmp_path / "cache")
    assert "cache hit a" in log and "cache hit b" in log and "tokenizing" not in log
    write(corpus / "a.txt", "alpha changed, longer than before")
    ds, log = run(spec, tmp_path / "cache")
    assert "tokenizing a" in log and "cache hit b" in log and "tokenizing b" not in log
    assert ds.sources[0]["tokens"] == len("alpha changed, longer than before") + 1
    m = manifest_of(ds.sources[0]["shards"][0])
    assert m["n_documents"] == 1 and m["dtype"] == "uint16" and len(m["tokens_file"]["sha256"]) == 64
    assert m["tokenizer_sha256"] and m["files"][0][0] == "a.txt" and m["index_file"]["n"] == 2
    # a new tokenizer re-tokenizes everything
    spec["tokenizer"]["add_special_tokens"] = ["<|x|>"]
    _, log = run(spec, tmp_path / "cache")
    assert "tokenizing a" in log and "tokenizing b" in log


def test_shards_and_document_index(tmp_path, monkeypatch):
    """Files are cut into shards; a changed file re-tokenizes its shard only (with dedupe, the later ones too)."""
    import malt.runtime.data as data_mod
    monkeypatch.setattr(data_mod, "SHARD_INPUT_BYTES", 100)
    for k in range(4):
        write(tmp_path / "d" / f"{k}.jsonl", "\n".join(json.dumps({"text": f"file {k} doc {i} " + "x" * 60})
                                                    for i in range(3)) + "\n")
    spec = make_spec(tmp_path, [("d", "d", 1)])
    ds, _ = run(spec, tmp_path / "cache")
    assert len(ds.sources[0]["shards"]) == 4 and ds.sources[0]["documents"] == 12
    toks = ds.tokens(0).numpy()
    offs = ds.document_offsets("d")
    assert len(offs) == 13 and offs[0] == 0 and offs[-1] == len(toks)
    docs = [bytes(toks[a:b - 1].tolist()).decode() for a, b in zip(offs[:-1], offs[1:])]
    assert docs[4].startswith("file 1 doc 1 ") and all(toks[b - 1] == ds.eos_id for b in offs[1:])
    # windows across shard boundaries read the concatenation
    t = ds.tokens(0)
    for p in (0, 60, len(t) // 2, len(t) - 90):
        assert t.window(p, 90).tolist() == toks[p:p + 90].tolist()
    mtimes = {sh: os.stat(sh).st_mtime_ns for sh in ds.sources[0]["shards"]}
    write(tmp_path / "d" / "1.jsonl", json.dumps({"text": "file 1 changed " + "y" * 60}) + "\n")
    ds2, log = run(spec, tmp_path / "cache")
    assert "shard 2 of 4 on" in log and "(1 of 4 shards)" in log
    kept = [sh for sh in ds2.sources[0]["shards"] if sh in mtimes and os.stat(sh).st_mtime_ns == mtimes[sh]]
    assert len(kept) == 3 and ds2.sources[0]["documents"] == 10
    # with dedupe, a shard is deduplicated against the ones before it: a change re-does the later shards
    write(tmp_path / "d" / "3.jsonl", json.dumps({"text": "file 0 doc 0 " + "x" * 60}) + "\n" +
          json.dumps({"text": "new"}) + "\n")
    spec["sources"][0]["dedupe"] = True
    ds3, _ = run(spec, tmp_path / "cache")
    assert ds3.sources[0]["filtered_by"] == {"duplicate": 1} and ds3.sources[0]["documents"] == 8
    write(tmp_path / "d" / "2.jsonl", json.dumps({"text": "file 2 changed " + "y" * 60}) + "\n")
    ds4, log = run(spec, tmp_path / "cache")
    assert "(2 of 4 shards)" in log and ds4.sources[0]["filtered_by"] == {"duplicate": 1}


def test_truncated_or_corrupt_shard_is_tokenized_again(corpus, tmp_path):
    """The cache is malt's derived data: a shard that fails the checks of every start is said and tokenized again."""
    spec = make_spec(corpus, [("a", "a.txt", 1), ("b", "b.jsonl", 1)])
    ds, _ = run(spec, tmp_path / "cache")
    npy = ds.sources[1]["shards"][0]
    good = Path(npy).read_bytes()
    want = tokens_of(ds, 1)

    def again(match):
        ds, log = run(spec, tmp_path / "cache")
        assert re.search(match, log), log
        assert "tokenizing b" in log and "cache hit a" in log
        assert Path(npy).read_bytes() == good and (tokens_of(ds, 1) == want).all()

    size = os.path.getsize(npy)
    with open(npy, "r+b") as fh:
        fh.truncate(size - 3)
    again(f"{os.path.basename(npy)} is truncated or corrupt.*; tokenizing that shard again")
    with open(npy, "r+b") as fh:  # right size, wrong bytes at the end: the cheap checksum sees it
        fh.seek(-3, os.SEEK_END)
        fh.write(b"\xff\xff\xff")
    again(f"{os.path.basename(npy)} is corrupt: checksum mismatch")
    with open(npy, "r+b") as fh:  # a broken .npy header: said in malt's words, not numpy's (pickle advice)
        fh.write(b"X")
    ds, log = run(spec, tmp_path / "cache")
    assert f"{os.path.basename(npy)} is corrupt: its .npy header is unreadable; tokenizing that shard again" in log
    assert "pickle" not in log
    os.remove(npy)
    again(f"{os.path.basename(npy)} is missing")
    # a flipped byte in the middle of a large shard: only the full check (verify) sees it
    write(corpus / "big.txt", "0123456789" * 30_000)
    spec = make_spec(corpus, [("big", "big.txt", 1)])
    ds, _ = run(spec, tmp_path / "other")
    npy = ds.sources[0]["shards"][0]
    with open(npy, "r+b") as fh:
        fh.seek(300_000)
        fh.write(b"\xff")
    _, log = run(spec, tmp_path / "other")  # cheap checks pass
    assert "tokenizing" not in log
    spec["verify_cache"] = True
    _, log = run(spec, tmp_path / "other")
    assert "sha256 mismatch; tokenizing that shard again" in log
    _, log = run(spec, tmp_path / "other")
    assert "tokenizing" not in log
    # a corrupt document index
    spec["verify_cache"] = False
    idx = ds.sources[0]["index_files"][0]
    with open(idx, "r+b") as fh:
        fh.seek(-8, os.SEEK_END)
        fh.write(np.uint64(5).tobytes())
    _, log = run(spec, tmp_path / "other")
    assert os.path.basename(idx) + " is corrupt" in log and "tokenizing big" in log


def test_workers_give_identical_shards(tmp_path, monkeypatch):
    """Tokenizing with 2 worker processes gives the same bytes as in-process."""
    import malt.runtime.data as data_mod
    monkeypatch.setattr(data_mod, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(data_mod, "_BATCH_DOCS", 7)  # many batches, several in flight
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "héllo", "wörld", "✓", "def", "return", "x"]
    write(tmp_path / "c.jsonl", "\n".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) for _ in range(300)))
    spec = make_spec(tmp_path, [("c", "c.jsonl", 1)], kind="bpe", vocab_size=300)
    started = []
    real = data_mod._Encoder._start_pool
    monkeypatch.setattr(data_mod._Encoder, "_start_pool", lambda self: started.append(self.workers) or real(self))
    one = data_mod.prepare(spec, tmp_path / "c1", log=lambda m: None, workers=1)
    assert started == []
    two = data_mod.prepare(spec, tmp_path / "c2", log=lambda m: None, workers=2)
    assert started == [2]
    a, b = one.tokens(0).numpy(), two.tokens(0).numpy()
    assert len(a) > 1000 and np.array_equal(a, b)
    assert np.array_equal(one.document_offsets(0), two.document_offsets(0))
    m1, m2 = manifest_of(one.sources[0]["shards"][0]), manifest_of(two.sources[0]["shards"][0])
    assert m1["tokens_file"]["sha256"] == m2["tokens_file"]["sha256"]


def test_progress_lines_when_not_a_terminal(tmp_path, monkeypatch):
    import malt.runtime.data as data_mod
    write(tmp_path / "c.jsonl", "\n".join(json.dumps({"text": f"doc {i}"}) for i in range(50)))
    clock = iter(range(0, 10_000, 20))
    monkeypatch.setattr(data_mod.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(data_mod, "_BATCH_DOCS", 10)
    _, log = run(make_spec(tmp_path, [("c", "c.jsonl", 1)]), tmp_path / "cache")
    assert "data: tokenizing c: " in log and "documents" in log and "/s" in log


# --------------------------------------------------------------------------- batches


@pytest.fixture
def mixed(tmp_path):
    # source A: only 'a' bytes, then 'A' at the end (its validation tail); B: only 'b'
    write(tmp_path / "a.txt", "a" * 3599 + "A" * 400)  # 4000 tokens with EOS
    write(tmp_path / "b.txt", "b" * 3999)
    spec = make_spec(tmp_path, [("A", "a.txt", 0.9), ("B", "b.txt", 0.1)], validation=0.1, seed=7)
    ds, _ = run(spec, tmp_path / "cache")
    return ds


def test_batch_shapes_shift_and_determinism(mixed):
    x, y = mixed.batch("train", 3, 0, 8, 32)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, y2 = mixed.batch("train", 3, 0, 8, 32)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xa, ya = mixed.batch("train", 3, 0, 4, 32)
    xb, yb = mixed.batch("train", 3, 4, 4, 32)
    assert torch.equal(torch.cat([xa, xb]), x) and torch.equal(torch.cat([ya, yb]), y)
    src, pos = mixed.sample_plan("train", 4, 0, 64, 32)
    src2, pos2 = mixed.sample_plan("train", 3, 0, 64, 32)
    assert not np.array_equal(pos, pos2)
    # windows are what the plan says
    src, pos = mixed.sample_plan("train", 3, 0, 8, 32)
    for j in range(8):
        arr = mixed.tokens(int(src[j])).numpy()
        assert x[j].tolist() == arr[pos[j]: pos[j] + 32].tolist()


def test_val_windows_only_from_tail(mixed):
    assert mixed.sources[0]["train_tokens"] == 3600 and mixed.sources[0]["val_tokens"] == 400
    vx, vy = mixed.batch("val", 0, 0, 64, 48)
    a_rows = vx[(vx == ord("a")).any(1) | (vx == ord("A")).any(1)]
    assert len(a_rows) > 0
    assert not (a_rows == ord("a")).any()  # A's validation tail is only 'A' (and EOS)
    tx, _ = mixed.batch("train", 0, 0, 256, 48)
    assert not (tx == ord("A")).any()
    assert torch.equal(mixed.batch("val", 0, 0, 64, 48)[0], vx)
    assert not torch.equal(mixed.batch("val", 1, 0, 64, 48)[0], vx)


def test_weights_respected(mixed):
    x, _ = mixed.batch("train", 0, 0, 64, 16)
    xs = torch.cat([mixed.batch("train", s, 0, 50, 16)[0] for s in range(8)])
    frac_a = (xs[:, 0] == ord("a")).float().mean().item()
    assert 0.85 < frac_a < 0.95
    xb, _ = mixed.batch("train", 0, 0, 50, 16, weights={"B": 1.0})
    assert (xb == ord("b")).all()
    xw, _ = mixed.batch("train", 0, 0, 50, 16, weights=[9, 1])
    assert torch.equal(xw, mixed.batch("train", 0, 0, 50, 16)[0])  # normalised
    with pytest.raises(DataError, match="finite and >= 0"):
        mixed.batch("train", 0, 0, 4, 16, weights=[1, -1])
    assert "A" in mixed.summary() and "90.0%" in mixed.summary()


def test_too_short_sources(mixed, tmp_path):
    with pytest.raises(DataError, match=r"source 'A' has 3,600 training tokens, fewer than seq_len\+1"):
        mixed.batch("train", 0, 0, 1, 4000)
    with pytest.raises(DataError, match=r"source 'A' has 400 validation tokens.*raise data.validation"):
        mixed.batch("val", 0, 0, 1, 400)
    mixed.batch("val", 0, 0, 1, 399)  # exactly seq_len + 1 tokens is enough
    write(tmp_path / "s.txt", "short")
    spec = make_spec(tmp_path, [("s", "s.txt", 1)])
    ds, _ = run(spec, tmp_path / "c2")
    with pytest.raises(DataError, match="data.validation is 0"):
        ds.batch("val", 0, 0, 1, 2)
    spec["seq_len"] = 64
    with pytest.raises(DataError, match="source 's' has 6 training tokens"):
        run(spec, tmp_path / "c2")


def test_to_device_moves_tensors_and_passes_other_items():
    import torch

    from malt.runtime.data import to_device
    x, y = torch.arange(6).view(2, 3), torch.ones(2, 3)
    moved = to_device("cpu", x, y, None, 3)
    assert isinstance(moved, tuple) and len(moved) == 4 and moved[2:] == (None, 3)
    assert torch.equal(moved[0], x) and moved[1].device.type == "cpu" and moved[1].dtype == torch.float32


def test_a_validation_split_far_from_its_share_is_a_warning(tmp_path):
    """Few long documents: the inner boundary nearest to 10% holds out almost nothing; preparing says so. A source
    of many short documents gets no warning."""
    write(tmp_path / "books" / "a.txt", "big book text here. " * 2000)
    write(tmp_path / "books" / "b.txt", "tiny.")
    write(tmp_path / "many.jsonl", "".join('{"text": "document %d of many"}\n' % i for i in range(200)))
    _, out = run(make_spec(tmp_path, [("books", "books", 1.0), ("many", "many.jsonl", 1.0)], validation=0.1), tmp_path / "c")
    assert "data: books: warning: its validation split is 0.0% of its tokens, not the 10.0% data.validation asks" in out
    assert "many: warning" not in out
