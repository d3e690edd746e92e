"""A damaged data cache or tokenizer file is a clear message or is rebuilt, never a traceback: corrupt tokenizer.json
files (run directory, teacher, init_from, the cache's own), manifests without their fields, temporary files of a
killed prepare, and a cache this user cannot write."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import malt.runtime.data as data_mod
import pytest
from malt.runtime.data import DataError, prepare
from malt.runtime.run import RunError
from malt.runtime.tokenizer import byte_tokenizer, differing_tokens, read_tokenizer_file

EOF_TOKEN = "<|endoftext|>"


def spec_of(tmp_path, kind="bytes", dedupe=False, **extra):
    (tmp_path / "a.txt").write_text("alpha document\nwith two lines\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["bee one", "bee two", "bee one"]))
    tok = {"kind": kind, "special_tokens": [EOF_TOKEN], **({"vocab_size": 300} if kind == "bpe" else {})}
    return {"base_dir": str(tmp_path), "seed": 1, "validation": 0.0, "tokenizer": tok,
            "sources": [{"name": "a", "path": "a.txt", "weight": 1},
                        {"name": "b", "path": "b.jsonl", "weight": 1, "text_field": "text", "dedupe": dedupe}], **extra}


def run(spec, cache):
    lines = []
    ds = prepare(spec, cache, log=lines.append, workers=1)
    return ds, "\n".join(lines)


# --------------------------------------------------------------------------- tokenizer files


@pytest.mark.parametrize("content", [b"garbage\n", b'{"version": "1.0", "model": ', b""])
def test_a_corrupt_tokenizer_file_is_a_run_error_naming_it(tmp_path, content):
    bad = tmp_path / "tokenizer.json"
    bad.write_bytes(content)
    with pytest.raises(RunError) as e:
        read_tokenizer_file(bad, "this run's tokenizer", "copy it back")
    assert str(bad) in e.value.message and "corrupt or unreadable" in e.value.message
    assert e.value.message.startswith("this run's tokenizer") and e.value.hint == "copy it back"
    with pytest.raises(RunError, match="corrupt or unreadable") as e:  # the id comparison of resume, init_from, distill
        differing_tokens(bad, byte_tokenizer([EOF_TOKEN]))
    assert e.value.hint  # says how to get it back
    with pytest.raises(RunError, match="unreadable"):
        read_tokenizer_file(tmp_path / "missing.json", "x")
    good = tmp_path / "good.json"
    byte_tokenizer([EOF_TOKEN]).save(str(good))
    assert read_tokenizer_file(good, "x").get_vocab_size() == 257
    assert differing_tokens(good, byte_tokenizer([EOF_TOKEN])) == []


def test_a_corrupt_teacher_tokenizer_is_a_distill_error(tmp_path):
    from malt.runtime.teacher import check_tokenizer

    (tmp_path / "tokenizer.json").write_text("garbage\n")
    with pytest.raises(RunError, match=r"^distill: the teacher's tokenizer .*tokenizer.json is corrupt or unreadable") as e:
        check_tokenizer(tmp_path, byte_tokenizer([EOF_TOKEN]), log=lambda m: None)
    assert "backup" in e.value.hint


def test_a_corrupt_cached_tokenizer_is_built_again(tmp_path):
    spec = spec_of(tmp_path, kind="bpe")
    ds, _ = run(spec, tmp_path / "cache")
    path = Path(ds.tokenizer_path)
    good = path.read_bytes()
    path.write_text("garbage\n")
    ds, log = run(spec, tmp_path / "cache")
    assert f"the cached tokenizer {path} is corrupt or unreadable" in log and "training bpe tokenizer" in log
    assert path.read_bytes() == good  # the same text trains the same tokenizer: the shards are still hits
    assert "cache hit a" in log and "cache hit b" in log


# --------------------------------------------------------------------------- manifests


def _edit_manifest(ds, i, edit):
    path = Path(ds.sources[i]["shards"][0].replace(".tokens.npy", ".json"))
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("tokens_file"),
    lambda m: m.pop("n_documents"),
    lambda m: m.update(n_tokens="12"),
    lambda m: m["index_file"].pop("bytes"),
    lambda m: m.update(dtype="float"),
    lambda m: m.update(skipped=None),
    lambda m: m.pop("hashes_file"),  # the source dedupes: its shards need their hashes
], ids=["tokens_file", "n_documents", "n_tokens-type", "index_file.bytes", "dtype", "skipped", "hashes_file"])
def test_a_manifest_without_its_fields_is_rebuilt(tmp_path, edit):
    spec = spec_of(tmp_path, dedupe=True)
    ds, _ = run(spec, tmp_path / "cache")
    want = ds.tokens(1).numpy()
    _edit_manifest(ds, 1, edit)
    ds, log = run(spec, tmp_path / "cache")  # was: KeyError / TypeError traceback
    assert "tokenizing b" in log and "cache hit a" in log
    assert (ds.tokens(1).numpy() == want).all()
    _, log = run(spec, tmp_path / "cache")
    assert "cache hit b" in log


# --------------------------------------------------------------------------- temporary files of a killed prepare


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporary_files_of_a_killed_prepare_are_removed(tmp_path):
    spec = spec_of(tmp_path, dedupe=True)
    ds, _ = run(spec, tmp_path / "cache")
    shard = Path(ds.sources[1]["shards"][0])
    tdir = Path(ds.tokenizer_path).parent
    stem = shard.name[: -len(".tokens.npy")]
    dead = _dead_pid()
    live = subprocess.Popen(["sleep", "60"])
    try:
        old = time.time() - 3600
        left = [shard.parent / f"{stem}.{k}.npy.{dead}.tmp" for k in ("tokens", "index", "hashes", "prefix")] + \
            [shard.parent / f".{stem}.json.{dead}.tmp", tdir / f".tokenizer.json.{dead}.tmp", tdir / f".spec.json.{dead}.tmp"]
        kept = [shard.parent / f"{stem}.tokens.npy.{live.pid}.tmp",   # its process is alive
                shard.parent / f"{stem}.index.npy.{dead}.tmp.keep",   # not malt's name
                shard.parent / f"notes.{dead}.tmp",                   # not malt's name
                tmp_path / "cache" / "tokens" / f"{stem}.tokens.npy.{dead}.tmp"]  # not in a source's folder
        for f in left + kept:
            f.write_bytes(b"\0" * 1000)
            os.utime(f, (old, old))
        fresh = shard.parent / f"{stem}.hashes.npy.{_dead_pid()}.tmp"  # just written: maybe a writer on another machine
        fresh.write_bytes(b"\0" * 10)
        kept.append(fresh)
        _, log = run(spec, tmp_path / "cache")
        assert f"removed {len(left)} temporary file(s) (7.0 KB) left by a prepare that was stopped" in log
        assert not any(f.exists() for f in left)
        assert all(f.exists() for f in kept)
        assert "tokenizing" not in log  # the cache itself is untouched
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------- a cache this user cannot write


def _tree(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_a_complete_read_only_cache_is_read(tmp_path, monkeypatch):
    spec = spec_of(tmp_path, dedupe=True)
    cache = tmp_path / "cache"
    want, _ = run(spec, cache)
    before = _tree(cache)
    # what a read-only mount or another user's cache gives (the tests may run as root, who can write anything)
    monkeypatch.setattr(data_mod, "_cannot_write", lambda c: "Read-only file system")
    ds, log = run(spec, cache)
    assert "cache hit a" in log and "cache hit b" in log
    assert (ds.tokens(1).numpy() == want.tokens(1).numpy()).all()
    assert _tree(cache) == before  # nothing written, not even the lock file's times
    # without its lock file (a cache copied without hidden files) it is still read
    (cache / ".lock").unlink()
    before = _tree(cache)
    run(spec, cache)
    assert _tree(cache) == before


def test_a_read_only_cache_that_lacks_something_says_what(tmp_path, monkeypatch):
    spec = spec_of(tmp_path)
    cache = tmp_path / "cache"
    ds, _ = run(spec, cache)
    monkeypatch.setattr(data_mod, "_cannot_write", lambda c: "Read-only file system")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "changed"}))  # its shard would be tokenized again
    with pytest.raises(DataError, match=r"cannot use .* as malt's data cache: it lacks tokens of source 'b'.*"
                                        r"this user cannot write there \(Read-only file system\).*malt prepare") as e:
        run(spec, cache)
    assert "MALT_CACHE_DIR" in str(e.value)
    spec["tokenizer"]["add_special_tokens"] = ["<|x|>"]  # another tokenizer
    with pytest.raises(DataError, match=r"it lacks this recipe's tokenizer"):
        run(spec, cache)
    del spec["tokenizer"]["add_special_tokens"]
    with open(ds.sources[0]["shards"][0], "r+b") as fh:  # a corrupt shard is not rebuilt where nothing can be written
        fh.write(b"X")
    with pytest.raises(DataError, match=r"cannot use .* as malt's data cache: token cache file .*\.tokens\.npy is corrupt: "
                                        r"its .npy header is unreadable, and this user cannot write there"):
        run(spec, cache)
    monkeypatch.setattr(data_mod, "_cannot_write", lambda c: "Permission denied")
    with pytest.raises(DataError, match=r"cannot use .*nowhere as malt's data cache: Permission denied"):
        run(spec, tmp_path / "nowhere")  # no cache at all
