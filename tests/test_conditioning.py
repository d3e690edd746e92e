"""Conditioning on record fields: metadata prefixes (MeCo) and control tokens (conditional training).

The cache holds the conditioned documents and each document's metadata token count; batches give
-100 targets exactly where the metadata (and the control tokens without loss) are; a phase with
metadata off reads the same documents without prefixes; the recipe checks point at the field.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from malt.compiler.api import compile_to
from malt.compiler.api import plan as make_plan
from malt.compiler.diagnostics import RecipeError
from malt.compiler.plan import Host
from malt.runtime.conditioning import Conditioner, domain_of, encode_conditioned, split_sentences, template_fields
from malt.runtime.data import DataError, prepare

GOOD, BAD = "<|good|>", "<|bad|>"


def write_records(path, n=120, url_every=1, missing_every=10, seed=0):
    """jsonl records with text, a url (missing on every missing_every-th) and a score in [0, 1)."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    with open(path, "w") as fh:
        for i in range(n):
            text = f"Doc {i}. " + " ".join(rng.choice(words, rng.integers(10, 50))) + ". The end!"
            rec = {"text": text, "score": float(rng.random()), "site": f"s{i % 4}"}
            if i % missing_every:
                rec["url"] = f"https://user@Site{i % 3}.Example.org:8080/p/{i}?q=1"
            fh.write(json.dumps(rec) + "\n")
    return path


def spec_for(tmp_path, source: dict, **extra) -> dict:
    return {"seed": 3, "validation": 0.1, "base_dir": str(tmp_path),
            "tokenizer": {"kind": "bytes", "add_special_tokens": [GOOD, BAD]},
            "sources": [{"name": "web", "path": "web.jsonl", **source}], **extra}


# ---- pieces --------------------------------------------------------------------------------------

def test_domain_is_the_host_without_scheme_credentials_port_or_path():
    assert domain_of("https://user:pw@En.Wikipedia.org:443/wiki/X?y#z") == "en.wikipedia.org"
    assert domain_of("example.com/a/b") == "example.com"
    assert domain_of("//cdn.example.net/x") == "cdn.example.net"
    assert [domain_of(v) for v in ("", "   ", None, 3, "http://[::1", "https:///path")] == [None] * 6


def test_template_fields_are_plain_names():
    assert template_fields("URL: {domain}\n\n{title} {{literal}}") == ["domain", "title"]
    for bad in ("{0}", "{a.b}", "{a!r}", "{a:>3}", "{}", "{a[0]}"):
        with pytest.raises(ValueError):
            template_fields(bad)


def test_sentences_join_back_to_the_text():
    text = 'One. Two?  "Three!" Four... five\nsix'
    parts = split_sentences(text)
    assert "".join(parts) == text and parts == ["One. ", "Two?  ", '"Three!" ', "Four... ", "five\nsix"]


def test_conditioner_thresholds_scores_and_counts():
    ids = {GOOD: 900, BAD: 901}
    c = Conditioner({"template": "[{site}] "}, {"field": "q", "threshold": 0.5, "better": "lower"}, token_id=ids.get)
    assert c.apply("a", {"site": "x", "q": 0.2}) == ("[x] ", [(900, "a")])   # lower is better
    assert c.apply("b", {"site": 7, "q": 0.5}) == ("[7] ", [(900, "b")])     # equal counts as good; numbers are text
    assert c.apply("c", {"q": 0.9}) == (None, [(901, "c")])                  # no site: kept without a prefix
    assert c.apply("d", {"site": "y", "q": "high"}) == ("[y] ", [(None, "d")])  # not a number: no token
    assert c.stats == {"with_metadata": 3, "without_metadata": 1, "missing_site": 1, "good": 2, "bad": 1, "no_score": 1}
    drop = Conditioner({"template": "{domain}: ", "missing": "drop"}, None)
    assert drop.apply("x", {"url": "not a url at all://"}) is None and drop.stats["missing_url"] == 1

    per = Conditioner(None, {"field": "q", "threshold": 0.5, "unit": "sentence"}, token_id=ids.get)
    assert per.apply("A b. C d! E", {"q": [0.9, 0.1, 0.5]})[1] == [(900, "A b. "), (901, "C d! "), (900, "E")]
    assert per.apply("A b. C d!", {"q": [0.9]})[1] == [(None, "A b. C d!")]  # a score list of the wrong length
    assert per.stats["score_mismatch"] == 1 and per.stats["no_score"] == 2

    share = Conditioner(None, {"field": "q", "threshold": 0.5, "unprefixed": 0.3}, token_id=ids.get)
    for i in range(2000):
        share.apply(f"document {i}", {"q": 0.7})
    assert 0.26 < share.stats["unprefixed"] / 2000 < 0.34 and share.stats["good"] + share.stats["unprefixed"] == 2000


def test_encode_conditioned_keeps_text_tokens_and_counts_prefix_tokens():
    def enc(texts):
        return [list(t.encode()) for t in texts]
    toks, lens, pre = encode_conditioned(enc, [("P: ", [(None, "ab")]), (None, [(7, "c"), (8, "d")])], 0, np.int64)
    assert toks.tolist() == [*b"P: ", *b"ab", 0, 7, *b"c", 8, *b"d", 0]
    assert lens.tolist() == [6, 5] and pre.tolist() == [3, 0]


# ---- the cache and the batches ---------------------------------------------------------------------

def test_metadata_prefixes_are_cached_and_carry_no_loss(tmp_path):
    write_records(tmp_path / "web.jsonl")
    spec = spec_for(tmp_path, {"metadata": {"template": "URL: {domain}\n\n"}}, metadata_off=True)
    logs = []
    ds = prepare(spec, tmp_path / "cache", log=logs.append, workers=1)
    info = ds.sources[0]
    assert info["conditioning"] == {"with_metadata": 108, "without_metadata": 12, "missing_url": 12}
    shard = next((tmp_path / "cache" / "tokens" / "web").glob("*.prefix.npy"))
    prefix = np.load(shard)
    assert len(prefix) == 120 and prefix[0] == 0 and prefix[1] == len("URL: site1.example.org\n\n")  # record 0 has no url

    # targets: exactly the metadata tokens are -100 (with and without a window starting inside a prefix)
    offsets = ds.document_offsets(0)
    tokens = ds.tokens(0).numpy()
    for d in (1, 2, 5):
        start = int(offsets[d])
        assert ds.decode(tokens[start:start + int(prefix[d])]) == f"URL: site{d % 3}.example.org\n\n"
        mask = ds.no_loss("train", 0, start - 3, 40)
        assert mask.tolist() == [False] * 3 + [True] * int(prefix[d]) + [False] * (37 - int(prefix[d]))
    masked = 0
    for step in range(4):
        x, y = ds.batch("train", step, 0, 4, 96)
        _, pos = ds.sample_plan("train", step, 0, 4, 96)
        for j in range(4):
            m = ds.no_loss("train", 0, int(pos[j]), 97)
            assert (y[j].numpy() == -100).tolist() == m[1:].tolist()
            masked += int(m[1:].sum())
            kept = y[j].numpy()[~m[1:]]
            assert (kept == tokens[int(pos[j]) + 1:int(pos[j]) + 97][~m[1:]]).all()
    assert masked > 0

    # the same documents without prefixes: no metadata text, nothing masked, the same documents held out
    off = ds._without_metadata
    assert off is not None and len(off.tokens(0)) == len(ds.tokens(0)) - int(prefix.sum())
    assert "URL:" not in off.decode(off.tokens(0).numpy())
    for step in range(3):
        x, y = ds.batch("train", step, 0, 4, 96, metadata=False)
        assert not (y == -100).any() and "URL:" not in ds.decode(x.flatten().tolist())
    val_docs = len(offsets) - 1 - int(np.searchsorted(offsets, info["train_tokens"]))
    off_offsets = off.document_offsets(0)
    assert len(off_offsets) - 1 - int(np.searchsorted(off_offsets, off.sources[0]["train_tokens"])) == val_docs
    val_text = ds.decode(ds.tokens(0).numpy()[info["train_tokens"]:])
    assert re.sub(r"URL: [^\n]*\n\n", "", val_text) == off.decode(off.tokens(0).numpy()[off.sources[0]["train_tokens"]:])
    x, y = ds.batch("val", 0, 0, 2, 96)
    assert (y.numpy() == -100).tolist() == [ds.no_loss("val", 0, int(p), 97)[1:].tolist() for p in ds.sample_plan("val", 0, 0, 2, 96)[1]]

    # reused from the cache; the template is part of the key
    logs.clear()
    prepare(spec, tmp_path / "cache", log=logs.append, workers=1)
    assert not any("tokenizing" in m for m in logs)
    other = prepare(spec_for(tmp_path, {"metadata": "site {site}: "}), tmp_path / "cache", log=logs.append, workers=1)
    assert any("tokenizing web" in m for m in logs) and other.sources[0]["conditioning"]["with_metadata"] == 120
    summary = ds.summary()
    assert "metadata: 108 of 120 documents (90.0%) with a prefix; 12 kept without a prefix (no 'url' 12)" in summary
    assert "metadata tokens" in summary


def test_missing_metadata_can_drop_the_document(tmp_path):
    write_records(tmp_path / "web.jsonl")
    ds = prepare(spec_for(tmp_path, {"metadata": {"template": "URL: {domain}\n\n", "missing": "drop"}, "dedupe": True}),
                 tmp_path / "cache", log=lambda m: None, workers=1)
    assert ds.sources[0]["documents"] == 108 and ds.sources[0]["filtered_by"] == {"metadata_missing": 12}
    assert len(np.load(next((tmp_path / "cache" / "tokens" / "web").glob("*.hashes.npy")))) == 108  # dedupe's hashes align
    assert "12 dropped" in ds.summary()


def test_a_metadata_off_phase_reads_the_same_documents_when_missing_ones_are_dropped(tmp_path):
    """MeCo's cooldown: the same documents without their prefixes. With `missing: drop` the documents without a url are
    dropped there too (they were kept before, and the two variants' token counts could not agree), and the tokenizer
    is the one already built, not trained a second time."""
    write_records(tmp_path / "web.jsonl")
    logs = []
    ds = prepare(spec_for(tmp_path, {"metadata": {"template": "URL: {domain}\n\n", "missing": "drop"}}, metadata_off=True),
                 tmp_path / "cache", log=logs.append, workers=1)
    off = ds._without_metadata
    assert ds.sources[0]["documents"] == off.sources[0]["documents"] == 108
    prefix = sum(int(np.load(p).sum()) for p in (tmp_path / "cache" / "tokens" / "web").glob("*.prefix.npy") if np.load(p).any())
    assert len(off.tokens(0)) == len(ds.tokens(0)) - prefix and "URL:" not in off.decode(off.tokens(0).numpy())
    assert off.tokenizer.get_vocab() == ds.tokenizer.get_vocab()
    assert sum("training" in m and "tokenizer" in m for m in logs) <= 1


@pytest.mark.parametrize("loss", [False, True])
def test_control_tokens_by_threshold_are_special_and_inputs_only(tmp_path, loss):
    write_records(tmp_path / "web.jsonl")
    ctl = {"field": "score", "threshold": 0.5, "unprefixed": 0.2, "loss": loss}
    ds = prepare(spec_for(tmp_path, {"control": ctl}), tmp_path / "cache", log=lambda m: None, workers=1)
    good, bad = ds.tokenizer.token_to_id(GOOD), ds.tokenizer.token_to_id(BAD)
    c = ds.sources[0]["conditioning"]
    assert c["good"] + c["bad"] + c["unprefixed"] == 120 and c["unprefixed"] > 0
    tokens, offsets = ds.tokens(0).numpy(), ds.document_offsets(0)
    records = [json.loads(line) for line in (tmp_path / "web.jsonl").read_text().splitlines()]
    for d, rec in enumerate(records[:40]):
        first = int(tokens[offsets[d]])
        if first in (good, bad):
            assert first == (good if rec["score"] >= 0.5 else bad)
    assert (tokens == good).sum() == c["good"] and (tokens == bad).sum() == c["bad"]
    hits = 0
    for step in range(6):
        x, y = ds.batch("train", step, 0, 4, 96)
        is_ctl = (y == good) | (y == bad)
        x_ctl = ((x == good) | (x == bad)).sum().item()
        hits += x_ctl
        if loss:
            assert not (y == -100).any()
        else:
            assert not is_ctl.any()
            assert (y == -100).sum().item() >= x_ctl - 4   # the targets that predicted them (a row's first token has none)
    assert hits > 0
    assert ("not in the loss" in ds.summary()) != loss


def test_control_tokens_per_sentence(tmp_path):
    recs = [{"text": "Good one. Bad one. Good again.", "s": [0.9, 0.1, 0.8]},
            {"text": "No list here. Two.", "s": 0.2}, {"text": "Wrong. Length.", "s": [0.5]}] * 20
    (tmp_path / "web.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = prepare(spec_for(tmp_path, {"control": {"field": "s", "threshold": 0.5, "unit": "sentence"}}),
                 tmp_path / "cache", log=lambda m: None, workers=1)
    offs = ds.document_offsets(0)
    doc0 = ds.decode(ds.tokens(0).numpy()[offs[0]:offs[1]])
    doc1 = ds.decode(ds.tokens(0).numpy()[offs[1]:offs[2]])
    doc2 = ds.decode(ds.tokens(0).numpy()[offs[2]:offs[3]])
    assert doc0 == f"{GOOD}Good one. {BAD}Bad one. {GOOD}Good again.<|endoftext|>"
    assert doc1 == f"{BAD}No list here. {BAD}Two.<|endoftext|>"
    assert doc2 == "Wrong. Length.<|endoftext|>"
    c = ds.sources[0]["conditioning"]
    assert (c["good"], c["bad"], c["score_mismatch"], c["no_score"]) == (40, 60, 20, 40)
    assert "control (sentences)" in ds.summary()


def test_conditioned_shards_are_the_same_bytes_with_workers_and_from_parquet(tmp_path, monkeypatch):
    """Worker processes tokenize conditioned documents exactly as this process does; a parquet source with
    the same records gives the same tokens and metadata counts as the jsonl one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import malt.runtime.data as data_mod

    write_records(tmp_path / "web.jsonl", n=200)
    recs = [json.loads(line) for line in (tmp_path / "web.jsonl").read_text().splitlines()]
    pq.write_table(pa.table({k: [r.get(k) for r in recs] for k in ("text", "score", "site", "url")}), tmp_path / "web.parquet")
    source = {"metadata": "URL: {domain} ({site})\n", "control": {"field": "score", "threshold": 0.3, "unprefixed": 0.1}}
    spec = spec_for(tmp_path, source)
    spec["tokenizer"] = {"kind": "bpe", "vocab_size": 300, "add_special_tokens": [GOOD, BAD]}
    monkeypatch.setattr(data_mod, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(data_mod, "_BATCH_DOCS", 7)
    one = prepare(spec, tmp_path / "c1", log=lambda m: None, workers=1)
    two = prepare(spec, tmp_path / "c2", log=lambda m: None, workers=2)
    assert np.array_equal(one.tokens(0).numpy(), two.tokens(0).numpy())
    pre = [np.load(next((tmp_path / c / "tokens" / "web").glob("*.prefix.npy"))) for c in ("c1", "c2")]
    assert np.array_equal(*pre) and (pre[0] > 0).sum() == 180
    spec["sources"][0]["path"] = "web.parquet"
    par = prepare(spec, tmp_path / "c1", log=lambda m: None, workers=1)
    assert np.array_equal(one.tokens(0).numpy(), par.tokens(0).numpy())
    assert par.sources[0]["conditioning"] == one.sources[0]["conditioning"]


def test_metadata_targets_with_best_fit_packing(tmp_path):
    write_records(tmp_path / "web.jsonl")
    ds = prepare(spec_for(tmp_path, {"metadata": "URL: {domain}\n\n"}, packing="best_fit"), tmp_path / "cache",
                 log=lambda m: None, workers=1)
    masked_meta = 0
    for step in range(3):
        x, y, doc_ids = ds.batch("train", step, 0, 4, 96)
        for row_x, row_y, ids in zip(x.numpy(), y.numpy(), doc_ids.numpy()):
            # the next token of a masked target that is not padding is a metadata token: decode the runs
            text = ds.decode(row_x)
            masked_meta += text.count("URL: ")
            n_ignored = int((row_y == -100).sum())
            prefix_tokens = sum(len(f"URL: site{k}.example.org\n\n") * text.count(f"URL: site{k}.example.org") for k in range(3))
            assert n_ignored >= prefix_tokens - 1   # the row's first token has no target
            eos = ds.eos_id
            masked_next = [int(row_x[t + 1]) for t in range(len(row_y) - 1) if row_y[t] == -100 and row_x[t + 1] != eos]
            assert set(bytes(masked_next).decode()) <= set("URL: site.example.org0123\n")  # only metadata, besides padding
    assert masked_meta > 0


def test_conditioning_on_plain_text_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    with pytest.raises(DataError, match="plain text without fields"):
        prepare({"tokenizer": {"kind": "bytes"}, "base_dir": str(tmp_path),
                 "sources": [{"name": "a", "path": "a.txt", "metadata": "URL: {domain}"}]}, tmp_path / "c", log=lambda m: None)


# ---- recipes --------------------------------------------------------------------------------------

META = {"data": {"sources": [{"name": "web", "path": "web.jsonl", "metadata": "URL: {domain}\n\n"}], "validation": "10%"}}


def test_recipe_conditioning_reaches_the_program(make_recipe, tmp_path):
    write_records(tmp_path / "web.jsonl")
    over = {"data": {"sources": [{"name": "web", "path": "web.jsonl", "metadata": "URL: {domain}\n\n",
                                  "control": {"field": "score", "threshold": 0.5, "good": "<|q+|>", "bad": "<|q-|>"}}]},
            "tokenizer": {"kind": "bytes", "add_special_tokens": ["<|q-|>"]},
            "train": {"steps": 10}, "phases": [{"name": "a", "share": "80%"}, {"name": "b", "share": "20%", "data": {"metadata": None}}]}
    p = compile_to(make_recipe(over), tmp_path / "run", host=Host())
    assert [ph.metadata for ph in p.phases] == [True, False] and "data.metadata off" in p.phases[1].changes
    assert p.tokenizer_vocab == 256 + 1 + 2          # the control tokens count once each
    train = (tmp_path / "run" / "train.py").read_text()
    assert "'add_special_tokens': ['<|q-|>', '<|q+|>']" in train and "'metadata_off': True" in train
    assert 'metadata=phase["metadata"]' in train and "'metadata': False" in train


@pytest.mark.parametrize("over, message", [
    ({"data": {"sources": [{"name": "t", "path": "data.txt", "metadata": "URL: {domain}"}]}},
     "data.sources.0.metadata: metadata reads record fields, but data.txt is plain text without fields"),
    ({"data": {"sources": [{"name": "b", "path": "builtin:python-docs", "control": {"field": "q", "threshold": 1}}]}},
     "data.sources.0.control: control reads record fields"),
    ({"data": {"sources": [{"name": "w", "path": "web.jsonl", "metadata": "URL: {domain.x}"}]}},
     "data.sources.0.metadata.template: template field {domain.x} is not a field name"),
    ({"data": {"sources": [{"name": "w", "path": "web.jsonl", "metadata": "URL: nothing"}]}}, "the template names no field"),
    ({"data": {"sources": [{"name": "w", "path": "web.jsonl", "metadata": {"template": "{domain}", "missing": "skip"}}]}},
     "data.sources.0.metadata.missing: got 'skip', expected one of 'keep' or 'drop'"),
    ({"data": {"sources": [{"name": "w", "path": "web.jsonl", "control": {"field": "q", "threshold": 1, "good": "<|endoftext|>"}}]}},
     "'<|endoftext|>' is one of tokenizer.special_tokens"),
    ({"data": {"sources": [{"name": "w", "path": "web.jsonl", "control": {"field": "q", "threshold": 1, "good": "<|x|>", "bad": "<|x|>"}}]}},
     "the good and bad tokens are the same"),
    ({"data": {"sources": [{"name": "w", "path": "web.jsonl", "control": {"field": "q"}}]}}, "data.sources.0.control.threshold"),
    ({"data": {"sources": [{"name": "w", "path": "web.jsonl"}]}, "train": {"steps": 10},
      "phases": [{"name": "a", "share": "50%"}, {"name": "b", "share": "50%", "data": {"metadata": "off"}}]},
     "phases.1.data.metadata: no data source has metadata to turn off"),
])
def test_conditioning_problems_point_into_the_recipe(make_recipe, tmp_path, over, message):
    write_records(tmp_path / "web.jsonl")
    with pytest.raises(RecipeError) as err:
        make_plan(make_recipe(over), host=Host())
    text = str(err.value)
    assert message in text and "recipe.yaml:" in text and "hint:" in text


def test_malt_data_reports_metadata_coverage_and_the_control_split(make_recipe, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from malt.compiler.cli import app

    write_records(tmp_path / "web.jsonl")
    monkeypatch.setenv("MALT_CACHE_DIR", str(tmp_path / "cache"))
    recipe = make_recipe({"data": {"sources": [{"name": "web", "path": "web.jsonl", "metadata": "URL: {domain}\n\n",
                                                "control": {"field": "score", "threshold": 0.5, "unit": "sentence"}}]},
                          "train": {"steps": 4}})
    result = CliRunner().invoke(app, ["data", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "metadata: 108 of 120 documents (90.0%) with a prefix; 12 kept without a prefix (no 'url' 12)" in result.output
    assert "control (sentences): <|good|> " in result.output and "; not in the loss" in result.output
