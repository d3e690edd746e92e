"""Source formats, broken records, filters, dedupe and tokenizer options of the data pipeline,
their recipe fields and checks, and the `malt prepare` / `malt data` commands."""

import gzip
import json
import random
import re

import numpy as np
import pytest
import yaml
import zstandard
from typer.testing import CliRunner

from malt.compiler.api import check
from malt.compiler.cli import app
from malt.compiler.diagnostics import RecipeError
from malt.runtime.data import DataError, prepare

EOS = "<|endoftext|>"
DOCS = ["first document, plain ascii", "second: héllo wörld ✓", "third\nwith\nlines", "fourth " * 20]


def spec_for(base, sources, kind="bytes", **tok):
    return {"base_dir": str(base), "seed": 1, "validation": 0.0,
            "tokenizer": {"kind": kind, "special_tokens": [EOS], **tok},
            "sources": [dict({"weight": 1.0, "text_field": "text"}, **s) for s in sources]}


def prep(base, sources, cache=None, **kw):
    lines = []
    ds = prepare(spec_for(base, sources, **kw), cache or base / "cache", log=lines.append, workers=1)
    return ds, "\n".join(lines)


def texts(ds, i=0):
    """The documents of source i, decoded (bytes tokenizer)."""
    toks = ds.tokens(i).numpy()
    offs = ds.document_offsets(i)
    return [bytes(toks[a:b - 1].tolist()).decode() for a, b in zip(offs[:-1], offs[1:])]


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def write_parquet(path, columns: dict, schema=None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=2)


# --------------------------------------------------------------------------- formats


def test_every_format_reads_the_same_documents(tmp_path):
    raw = jsonl({"text": d, "n": i} for i, d in enumerate(DOCS))
    (tmp_path / "a.jsonl").write_bytes(raw)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    write_parquet(tmp_path / "a.parquet", {"text": DOCS, "n": list(range(4))})
    (tmp_path / "t.txt").write_text(DOCS[1])
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(DOCS[1].encode()))
    (tmp_path / "t.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(DOCS[1].encode()))
    names = ["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet", "t.txt", "t.txt.gz", "t.txt.zst"]
    ds, _ = prep(tmp_path, [{"name": f"s{i}", "path": n} for i, n in enumerate(names)])
    for i in range(4):
        assert texts(ds, i) == DOCS, names[i]
    for i in range(4, 7):
        assert texts(ds, i) == [DOCS[1]], names[i]
    assert ds.sources[3]["documents"] == 4 and ds.sources[3]["skipped"] == 0


def test_globs_and_folders(tmp_path):
    for k in range(3):
        (tmp_path / "data" / "sub").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / f"p{k}.jsonl").write_bytes(jsonl([{"text": f"top {k}"}]))
        (tmp_path / "data" / "sub" / f"q{k}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor().compress(jsonl([{"text": f"deep {k}"}])))
    (tmp_path / "data" / "notes.md").write_text("not data")
    ds, _ = prep(tmp_path, [{"name": "top", "path": "data/*.jsonl"},
                            {"name": "deep", "path": "data/**/*.zst"},
                            {"name": "all", "path": "data"},
                            {"name": "dirs", "path": "dat?/s*"}])
    assert texts(ds, 0) == ["top 0", "top 1", "top 2"]
    assert texts(ds, 1) == ["deep 0", "deep 1", "deep 2"]
    assert texts(ds, 2) == ["top 0", "top 1", "top 2", "deep 0", "deep 1", "deep 2"]
    assert texts(ds, 3) == ["deep 0", "deep 1", "deep 2"]  # a glob that matches a folder walks it
    with pytest.raises(DataError, match="source 'none'.*yields no text: no files"):
        prep(tmp_path, [{"name": "none", "path": "data/*.parquet"}])


def test_broken_records_are_counted_by_reason(tmp_path):
    lines = [json.dumps({"text": "good one"}).encode(), b"{broken", json.dumps({"other": 1}).encode(),
             json.dumps({"text": 5}).encode(), b'{"text": "bad \xff byte"}', b'{"text": "lone \\ud800 escape"}',
             b'{"text": "pair \\ud83d\\ude00 ok"}', b"", b"[1, 2]", json.dumps({"text": "good two"}).encode()]
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines))
    (tmp_path / "bad.txt").write_bytes(b"latin-1 caf\xe9")
    (tmp_path / "good.txt").write_bytes(b"fine")
    ds, log = prep(tmp_path, [{"name": "c", "path": "c.jsonl"}, {"name": "t", "path": "*.txt"}])
    assert texts(ds, 0) == ["good one", "pair \U0001F600 ok", "good two"]
    assert ds.sources[0]["skipped_by"] == {"invalid_json": 1, "no_field": 2, "not_text": 1, "bad_encoding": 2}
    assert "c.jsonl:2: invalid JSON" in log and "skipped 6 broken record(s)" in log
    assert texts(ds, 1) == ["fine"] and ds.sources[1]["skipped_by"] == {"bad_encoding": 1}
    assert "bad.txt: invalid UTF-8 at byte 11" in log
    ds2, _ = prep(tmp_path, [{"name": "c", "path": "c.jsonl"}, {"name": "t", "path": "*.txt"}])
    assert ds2.sources[0]["skipped_by"] == ds.sources[0]["skipped_by"]  # from the manifests on a cache hit
    with pytest.raises(DataError, match=r"source 'b' .*bad\.txt\) yields no text: 1 records, skipped bad_encoding 1"):
        prep(tmp_path, [{"name": "b", "path": "bad.txt"}])


def test_corrupt_compressed_files_keep_what_was_read(tmp_path):
    rng = random.Random(0)
    raw = jsonl({"text": f"document {i} " + " ".join(str(rng.random()) for _ in range(20))} for i in range(3000))
    gz = gzip.compress(raw)
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    zs = zstandard.ZstdCompressor().compress(raw)
    (tmp_path / "cut.jsonl.zst").write_bytes(zs[: len(zs) // 2])
    (tmp_path / "junk.jsonl.zst").write_bytes(b"not zstd at all")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    ds, log = prep(tmp_path, [{"name": "g", "path": "cut.jsonl.gz"}, {"name": "z", "path": "cut.jsonl.zst"},
                              {"name": "j", "path": "*.jsonl.zst"}])
    for i in range(2):
        assert 0 < ds.sources[i]["documents"] < 3000 and ds.sources[i]["skipped_by"] == {"unreadable": 1}
    assert "cut.jsonl.gz: corrupt or truncated gzip stream" in log
    assert "cut.jsonl.zst: corrupt or truncated zstandard stream (the file ends inside a zstandard frame" in log
    assert ds.sources[2]["skipped_by"] == {"unreadable": 2}
    with pytest.raises(DataError, match=r"source 'p'.*junk\.parquet.*unreadable"):
        prep(tmp_path, [{"name": "p", "path": "junk.parquet"}])


def test_parquet_columns(tmp_path):
    import pyarrow as pa
    write_parquet(tmp_path / "b.parquet", {"body": [b"ok bytes", b"bad \xff", None], "q": [1.0, 2.0, 3.0]},
                  schema=pa.schema([("body", pa.binary()), ("q", pa.float64())]))
    write_parquet(tmp_path / "n.parquet", {"body": [1, 2]})
    ds, _ = prep(tmp_path, [{"name": "b", "path": "b.parquet", "text_field": "body"}])
    assert texts(ds) == ["ok bytes"] and ds.sources[0]["skipped_by"] == {"bad_encoding": 1, "no_field": 1}
    with pytest.raises(DataError, match="yields no text: 2 records, skipped not_text 2"):
        prep(tmp_path, [{"name": "n", "path": "n.parquet", "text_field": "body"}])
    with pytest.raises(DataError, match="no column 'text'"):
        prep(tmp_path, [{"name": "m", "path": "b.parquet"}])
    # pandas category / polars Categorical text (dictionary-encoded) and string_view columns are text too
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": pa.array(["one", "two", "one"]).dictionary_encode()}), tmp_path / "d.parquet")
    pq.write_table(pa.table({"text": pa.array(["three"], type=pa.string_view())}), tmp_path / "v.parquet")
    ds, _ = prep(tmp_path, [{"name": "d", "path": "d.parquet"}, {"name": "v", "path": "v.parquet"}])
    assert texts(ds, 0) == ["one", "two", "one"] and texts(ds, 1) == ["three"]


# --------------------------------------------------------------------------- filters


def test_filters_and_dedupe_with_counts(tmp_path):
    recs = [{"text": "short", "q": 0.9},                     # min_chars
            {"text": "x" * 200, "q": 0.9},                   # max_chars
            {"text": "a fine document", "q": 0.2},           # below min
            {"text": "another fine one", "q": 0.99},         # above max
            {"text": "no score at all"},                     # field_missing
            {"text": "text with a score", "q": "high"},      # field_missing (not a number)
            {"text": "kept  document\n", "q": 0.5},
            {"text": " kept document ", "q": 0.6},           # duplicate after whitespace normalisation
            {"text": "Kept document", "q": 0.7},             # case differs: kept
            {"text": "   ", "q": 0.7}]                       # empty
    (tmp_path / "f.jsonl").write_bytes(jsonl(recs))
    flt = {"min_chars": 8, "max_chars": 100, "field": "q", "min": 0.5, "max": 0.95}
    ds, log = prep(tmp_path, [{"name": "f", "path": "f.jsonl", "filter": flt, "dedupe": True}])
    assert texts(ds) == ["kept  document\n", "Kept document"]
    assert ds.sources[0]["filtered_by"] == {"min_chars": 1, "max_chars": 1, "field": 2, "field_missing": 2,
                                            "duplicate": 1, "empty": 1}
    assert ds.sources[0]["records"] == 10
    assert "filtered out 8 document(s)" in log and "duplicate 1" in log
    assert "filtered: field 2, field_missing 2" in ds.summary()
    # every document filtered: an error that says by what
    with pytest.raises(DataError, match=r"source 'f'.*yields no text: 10 records, filtered min_chars 9, empty 1.*and the filter"):
        prep(tmp_path, [{"name": "f", "path": "f.jsonl", "filter": {"min_chars": 1000}}])
    with pytest.raises(DataError, match="min_chars .* is larger than max_chars"):
        prep(tmp_path, [{"name": "f", "path": "f.jsonl", "filter": {"min_chars": 10, "max_chars": 5}}])
    (tmp_path / "p.txt").write_text("plain")
    with pytest.raises(DataError, match="filter.field needs records with fields"):
        prep(tmp_path, [{"name": "p", "path": "p.txt", "filter": {"field": "q", "min": 1}}])


# --------------------------------------------------------------------------- tokenizers


def test_add_special_tokens_extend_every_kind(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(jsonl({"text": f"word{i % 13} other{i % 7} <|im_start|>"} for i in range(300)))
    added = ["<|im_start|>", "<|im_end|>", "[S2S]"]
    src = [{"name": "c", "path": "c.jsonl"}]
    ds, log = prep(tmp_path, src, add_special_tokens=added)
    assert [ds.tokenizer.token_to_id(t) for t in added] == [257, 258, 259] and ds.vocab_size == 260
    assert "added 3 special token(s) at ids 257-259" in log
    assert 257 not in ds.tokens(0).numpy()  # never read from document text
    bpe, _ = prep(tmp_path, src, kind="bpe", vocab_size=300, add_special_tokens=added)
    n = bpe.vocab_size
    assert [bpe.tokenizer.token_to_id(t) for t in added] == [n - 3, n - 2, n - 1] and bpe.eos_id == 0
    assert bpe.tokenizer.decode([n - 3], skip_special_tokens=False) == "<|im_start|>"
    # file: a token the file already has keeps its id
    f, _ = prep(tmp_path, src, kind="file", path=ds.tokenizer_path, add_special_tokens=["<|im_end|>", "<|new|>"])
    assert f.tokenizer.token_to_id("<|im_end|>") == 258 and f.tokenizer.token_to_id("<|new|>") == 260
    with pytest.raises(DataError, match="repeats"):
        prep(tmp_path, src, add_special_tokens=["<|a|>", EOS])


def test_uint32_tokens_for_a_large_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "c.jsonl").write_bytes(jsonl([{"text": "w69999 w5 w65536"}, {"text": "w0 nope"}]))
    ds, _ = prep(tmp_path, [{"name": "c", "path": "c.jsonl"}], kind="file", path="big.json")
    assert ds.vocab_size == 70_002 and ds.eos_id == 70_001
    arr = ds.tokens(0).numpy()
    assert arr.dtype == np.uint32 and arr.tolist() == [69999, 5, 65536, 70001, 0, 70000, 70001]
    x, y = ds.batch("train", 0, 0, 2, 4)
    assert int(x.max()) <= 70_001 and "uint32 tokens)" in ds.summary()
    with pytest.raises(DataError, match="the tokenizer has 70,002 tokens but the model's vocabulary is 65,536"):
        spec = spec_for(tmp_path, [{"name": "c", "path": "c.jsonl"}], kind="file", path="big.json")
        prepare({**spec, "model_vocab": 65536}, tmp_path / "cache", log=lambda m: None)


def test_unigram_tokenizer(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(300)]
    (tmp_path / "c.jsonl").write_bytes(jsonl({"text": d} for d in docs))
    ds, log = prep(tmp_path, [{"name": "c", "path": "c.jsonl"}], kind="unigram", vocab_size=600)
    assert "training unigram tokenizer" in log and ds.eos_id == 0 and 400 < ds.vocab_size <= 600
    assert len(ds.tokens(0)) < 0.9 * sum(map(len, docs))  # pieces longer than one byte
    assert max(len(t) for t in ds.tokenizer.get_vocab()) >= 4
    for text in ("héllo wörld ✓ 日本", docs[0], "\x00\x7f tabs\tand\nnewlines"):
        assert ds.decode(ds.encode(text)) == text


# --------------------------------------------------------------------------- recipes and CLI


def recipe_with(tmp_path, data=None, tokenizer=None, **extra):
    r = {"name": "d", "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
         "tokenizer": tokenizer or {"kind": "bytes"},
         "data": data or {"sources": [{"name": "c", "path": "c.jsonl"}], "validation": "10%"},
         "optimizer": {"lr": 1e-3}, "train": {"seq_len": 16, "global_batch": 4, "steps": 100},
         "target": {"accelerator": "cpu"}, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def errors_of(path) -> list[str]:
    with pytest.raises(RecipeError) as e:
        check(path)
    return [d.format() for d in e.value.diagnostics]


def test_recipe_checks_for_sources_and_tokenizer(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(jsonl([{"text": "x"}]))
    (tmp_path / "t.txt").write_text("x")
    (tmp_path / "c.jsonl.bz2").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    srcs = [{"name": "g", "path": "nothing/*.jsonl"},
            {"name": "z", "path": "c.jsonl.bz2"},
            {"name": "f", "path": "t.txt", "filter": {"field": "quality", "min": 0.5}},
            {"name": "m", "path": "c.jsonl", "filter": {"min_chars": 500, "max_chars": 100, "min": 0.9}},
            {"name": "e", "path": "empty"},
            {"name": "k", "path": "c.jsonl", "filter": {"min_char": 5}}]
    out = errors_of(recipe_with(tmp_path, {"sources": srcs},
                                {"kind": "bytes", "add_special_tokens": ["<|a|>", "<|endoftext|>", "<|a|>"]}))
    text = "\n".join(out)
    assert "data.sources.0.path: the glob nothing/*.jsonl matches no files" in text
    assert "data.sources.1.path: unknown compression '.bz2' (a .jsonl file c.jsonl.bz2)" in text
    assert "data.sources.2.filter.field: t.txt is plain text: it has no field 'quality'" in text
    assert "data.sources.3.filter.min_chars: min_chars (500) is larger than max_chars (100)" in text
    assert "data.sources.3.filter.field: min/max give a threshold on a numeric field, but no field is named" in text
    assert "data.sources.4.path: the folder empty holds no files of a supported type" in text
    assert "data.sources.5.filter.min_char: unknown key 'min_char'" in text and "did you mean 'min_chars'?" in text
    assert "tokenizer.add_special_tokens.1: '<|endoftext|>' is already in special_tokens" in text
    assert "tokenizer.add_special_tokens.2: '<|a|>' is already listed" in text
    assert all(re.match(r".*recipe\.yaml:\d+:\d+: error: ", o) for o in out), out  # each points at its line
    # unigram is accepted and counted with the added tokens
    from malt.compiler.api import plan
    ok = recipe_with(tmp_path, tokenizer={"kind": "unigram", "vocab_size": 1000, "add_special_tokens": ["<|a|>"]})
    p, _ = plan(ok)
    assert p.vocab_size == 1001


def test_render_passes_filters_and_specials(tmp_path):
    from malt.compiler.api import compile_files
    (tmp_path / "c.jsonl").write_bytes(jsonl([{"text": "x"}]))
    path = recipe_with(tmp_path, {"sources": [{"name": "c", "path": "c.jsonl", "filter": {"min_chars": 10}, "dedupe": True},
                                              {"name": "d", "path": "*.jsonl"}]},
                       {"kind": "bytes", "add_special_tokens": ["<|a|>"]})
    _, files = compile_files(path, tmp_path / "build")
    train = files["train.py"]
    assert "'filter': {'min_chars': 10},\n            'dedupe': True," in train and "'add_special_tokens': ['<|a|>']" in train
    assert "'path': '../*.jsonl'" in train and "'model_vocab': 320" in train


def test_cli_prepare_and_data(tmp_path, monkeypatch):
    monkeypatch.setenv("MALT_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(1)
    (tmp_path / "c.jsonl").write_bytes(jsonl({"text": " ".join(rng.choice(["ab", "cd", "ef"]) for _ in range(100))}
                                             for _ in range(20)))
    (tmp_path / "d.jsonl").write_bytes(jsonl({"text": "y" * 1000} for _ in range(10)))
    path = recipe_with(tmp_path, {"sources": [{"name": "c", "path": "c.jsonl", "weight": 3},
                                              {"name": "d", "path": "d.jsonl", "weight": 1}], "validation": "10%"})
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", str(path)])
    assert res.exit_code == 0, res.output
    assert "tokenizing c" in res.output and any(line.split()[:2] == ["c", "20"] for line in res.output.splitlines())
    res = runner.invoke(app, ["data", str(path), "--set", "train.steps=200"])
    assert res.exit_code == 0, res.output
    assert "cache hit c" in res.output and "tokenizing" not in res.output
    assert "run: 200 steps, 12,800 training tokens" in res.output
    row = next(line for line in res.output.splitlines() if line.startswith("d "))
    cells = row.split()
    # d: 10 documents × 1001 tokens = 10,010; 90% for training = 9,009; drawn 12,800 / 4 = 3,200
    assert cells[:7] == ["d", "10", "0", "0", "9,009", "1,001", "25.0%"] and cells[7:] == ["3,200", "0.36"]
    res = runner.invoke(app, ["data", str(path), "--set", "train.steps=2000"])
    assert "note: the run repeats c" in res.output
    (tmp_path / "d.jsonl").write_bytes(b"{broken\n")
    res = runner.invoke(app, ["prepare", str(path)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert ".yaml:" in res.output and "error: data.sources.1: source 'd'" in res.output and "yields no text" in res.output
    res = runner.invoke(app, ["data", str(path), "--set", "data.sources.1.path=nope/*.jsonl"])
    assert res.exit_code == 2 and "matches no files" in res.output


def test_a_folder_with_symlink_loops_and_aliases_reads_each_file_once(tmp_path):
    """sub/loop -> .. (a loop) and alias -> sub (a second path to the same files): each file is read once, and the
    walk ends (it used to read a file once per level of the loop, and exponentially many times with two links)."""
    from malt.runtime.sources import Source

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "a.txt").write_text("hello\n")
    (tmp_path / "d" / "b.txt").write_text("world\n")
    (tmp_path / "d" / "sub" / "loop").symlink_to("..")
    (tmp_path / "d" / "sub" / "loop2").symlink_to("../sub")
    (tmp_path / "d" / "alias").symlink_to("sub")
    for path in ("d", "d/*", "d/*/*.txt"):
        files = Source("x", path, base_dir=tmp_path).files()
        assert sorted(open(f.full).read() for f in files) == (["hello\n", "world\n"] if path != "d/*/*.txt" else ["hello\n"]), path


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Files saved by Windows tools start with a UTF-8 BOM: the first .jsonl record is read (it was skipped as invalid
    JSON) and a .txt document does not start with U+FEFF."""
    from malt.runtime.sources import Source

    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first record"}\n{"text": "second record"}\n')
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfplain text\n")
    assert list(Source("a", "a.jsonl", base_dir=tmp_path).documents()) == ["first record", "second record"]
    assert list(Source("b", "b.txt", base_dir=tmp_path).documents()) == ["plain text\n"]


def test_a_source_too_short_for_a_later_phase_is_an_error_before_training(tmp_path, monkeypatch):
    """A source only the second phase draws holds fewer tokens than one sequence: malt data/prepare (and malt run,
    before the program starts) say so at the source's line, instead of the program stopping when that phase begins."""
    monkeypatch.setenv("MALT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "c.jsonl").write_bytes(jsonl({"text": "some text " * 20} for _ in range(30)))
    (tmp_path / "s.txt").write_text("short\n")
    path = recipe_with(tmp_path, {"sources": [{"name": "c", "path": "c.jsonl"}, {"name": "s", "path": "s.txt"}],
                                  "validation": 0},
                       phases=[{"name": "main", "share": "80%", "data": {"weights": {"c": 1.0}}},
                               {"name": "cool", "share": "20%", "data": {"weights": {"s": 1.0}}}])
    for command in ("prepare", "data"):
        res = CliRunner().invoke(app, [command, str(path)])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert "recipe.yaml:" in res.output and "error: data.sources.1: source 's' has 7 training tokens, fewer than seq_len+1 = 17" in res.output
    res = CliRunner().invoke(app, ["data", str(path), "--set", "phases.1.data.weights={c: 1.0, s: 0.0}"])
    assert res.exit_code == 0, res.output


def test_a_validation_split_too_short_for_the_evaluations_mixture_is_an_error_before_training(tmp_path, monkeypatch):
    """Every phase draws only 'c', but an evaluation reads the recipe's mixture ('c' and 's'): the short validation
    split of 's' is an error at its line before training (it ended the program at the first evaluation)."""
    monkeypatch.setenv("MALT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "c.jsonl").write_bytes(jsonl({"text": "some text " * 20} for _ in range(30)))
    (tmp_path / "s.jsonl").write_bytes(jsonl({"text": "other words"} for _ in range(20)))
    path = recipe_with(tmp_path, {"sources": [{"name": "c", "path": "c.jsonl"}, {"name": "s", "path": "s.jsonl"}],
                                  "validation": "2%"},
                       phases=[{"name": "main", "share": "80%", "data": {"weights": {"c": 1.0}}},
                               {"name": "cool", "share": "20%", "data": {"weights": {"c": 1.0}}}])
    res = CliRunner().invoke(app, ["prepare", str(path)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "recipe.yaml:" in res.output and "error: data.sources.1: source 's' has" in res.output
    assert "validation tokens, fewer than seq_len+1 = 17" in res.output


def test_validation_files_and_per_source_losses_need_evaluation(tmp_path):
    """data.validation: 0 turns evaluation off: a validation_path or eval_per_source would be silently unread."""
    (tmp_path / "c.jsonl").write_bytes(jsonl([{"text": "x"}]))
    (tmp_path / "v.jsonl").write_bytes(jsonl([{"text": "y"}]))
    path = recipe_with(tmp_path, {"sources": [{"name": "c", "path": "c.jsonl", "validation_path": "v.jsonl"}], "validation": 0})
    assert any("data.sources.0.validation_path: data.validation is 0, which turns evaluation off" in e for e in errors_of(path))
    path = recipe_with(tmp_path, {"sources": [{"name": "c", "path": "c.jsonl"}], "validation": "1%"},
                       train={"seq_len": 16, "global_batch": 4, "steps": 100, "eval_every": 0, "eval_per_source": True})
    assert any("train.eval_per_source: evaluation is off (train.eval_every is 0)" in e for e in errors_of(path))


def test_every_source_that_yields_no_text_is_reported_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MALT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "c.jsonl").write_bytes(jsonl({"text": "some text " * 20} for _ in range(30)))
    (tmp_path / "a.jsonl").write_bytes(b"{broken\n")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe not utf-8\n")
    path = recipe_with(tmp_path, {"sources": [{"name": "a", "path": "a.jsonl"}, {"name": "c", "path": "c.jsonl"},
                                              {"name": "b", "path": "b.txt"}]})
    res = CliRunner().invoke(app, ["prepare", str(path)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "error: data.sources.0: source 'a'" in res.output and "error: data.sources.2: source 'b'" in res.output
    assert "2 errors" in res.output


def test_tokenizer_training_splits_only_pathological_words():
    """A run of more than LONGEST_WORD non-space characters is split for BPE training (its cost grows with the square
    of a word's length); ordinary text reaches the trainer unchanged."""
    from malt.runtime.tokenizer import LONGEST_WORD, _split_long_runs

    text = "def f(x):\n    return x  # a normal line\n"
    assert _split_long_runs(text) == text
    long = "x" * (LONGEST_WORD * 2 + 5)
    pieces = _split_long_runs("a " + long + " b").split(" ")
    assert pieces[0] == "a" and pieces[-1] == "b" and [len(p) for p in pieces[1:-1]] == [LONGEST_WORD, LONGEST_WORD, 5]


def test_phase_only_sources_can_train_the_tokenizer_and_are_located(tmp_path, monkeypatch):
    """tokenizer.train_on may name a source that only a phase adds (the runtime trains on it already); a data
    problem of such a source is shown at its line inside the phase."""
    monkeypatch.setenv("MALT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "c.jsonl").write_bytes(jsonl({"text": "some text " * 20} for _ in range(30)))
    (tmp_path / "x.txt").write_text("short\n")
    path = recipe_with(tmp_path, {"sources": [{"name": "c", "path": "c.jsonl"}], "validation": 0},
                       tokenizer={"kind": "bpe", "vocab_size": 300, "train_on": ["c", "x"]},
                       phases=[{"name": "main", "share": "80%"},
                               {"name": "late", "share": "20%", "data": {"sources": [{"name": "x", "path": "x.txt"}],
                                                                         "weights": {"x": 1.0}}}])
    check(path)
    res = CliRunner().invoke(app, ["data", str(path)])
    assert res.exit_code == 2 and "error: phases.1.data.sources.0: source 'x' has" in res.output, res.output
