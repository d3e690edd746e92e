"""End to end: compile a tiny recipe, train it, export it, load it with transformers; the export and sample CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from malt.compiler.api import compile_to
from malt.compiler.plan import Host
from malt.runtime.export import export_hf, load_run_model
from malt.runtime.run import RunError
from malt.runtime.sample import generate

from .conftest import write_recipe
from .helpers import run_env, run_program

import transformers  # noqa: E402  (the test extra; a missing one must fail, not skip)

pytestmark = pytest.mark.slow

TEXT = "The quick brown fox.\nLine 7: a"  # under seq_len 32 tokens, even as bytes

VARIANTS = {
    # Llama, tied embeddings, bytes tokenizer
    "llama_tied": ({"model": {"tie_embeddings": True}}, "LlamaForCausalLM"),
    # Qwen2: q/k/v biases, untied head, grouped-query attention, a trained byte-level BPE tokenizer
    "qwen2_untied": ({"model": {"qkv_bias": True, "tie_embeddings": False, "n_kv_heads": 2},
                      "tokenizer": {"kind": "bpe", "vocab_size": 300}}, "Qwen2ForCausalLM"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(variant) -> (run directory, cache directory) of a 6-step run with checkpoints at 3 and 6, trained once."""
    done = {}

    def get(variant):
        if variant not in done:
            base = tmp_path_factory.mktemp(variant)
            recipe = write_recipe(base, VARIANTS[variant][0])
            run_dir, cache = base / "run", base / "cache"
            compile_to(recipe, run_dir, host=Host())
            run_program(run_dir, cache, "--quiet")
            done[variant] = run_dir, cache
        return done[variant]
    return get


@pytest.fixture(params=list(VARIANTS))
def trained(request, runs):
    """(run directory, cache directory, expected architecture) for each variant."""
    return (*runs(request.param), VARIANTS[request.param][1])


@pytest.fixture
def llama_run(runs):
    return runs("llama_tied")


def malt_cli(*args, cache=None, cwd=None) -> subprocess.CompletedProcess:
    env = run_env(cache) if cache is not None else None
    return subprocess.run([sys.executable, "-m", "malt.compiler.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_run_wrote_checkpoints(trained):
    run_dir, _, _ = trained
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert steps == ["step_00000003", "step_00000006"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (run_dir / "tokenizer.json").is_file()


def test_export_loads_in_transformers_with_same_logits(trained, tmp_path):
    run_dir, _, arch = trained
    out = tmp_path / "hf"
    assert export_hf(run_dir, out) == arch
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch]

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == arch
    assert hf.dtype == torch.float32

    model, malt_tok, plan = load_run_model(run_dir)
    assert hf.num_parameters() == plan["params"] == sum(p.numel() for p in model.parameters())

    # the same tokenizer: same ids, same text back, end-of-text token known
    ids = tok(TEXT)["input_ids"]
    assert ids == malt_tok.encode(TEXT).ids
    assert tok.decode(ids) == TEXT
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == malt_tok.token_to_id("<|endoftext|>") == hf.config.eos_token_id
    # text that spells the special token is text, as the data pipeline encodes it (encode_special_tokens)
    malt_tok.encode_special_tokens = True
    assert tok("a <|endoftext|> b")["input_ids"] == malt_tok.encode("a <|endoftext|> b", add_special_tokens=False).ids

    # the same weights: every tensor of the checkpoint is in the HF model (tied embeddings stored once)
    hf_params = dict(hf.named_parameters())
    malt_params = dict(model.named_parameters())
    assert len(hf_params) == len(malt_params)
    for name, p in malt_params.items():
        assert torch.equal(hf_params[name if name == "lm_head.weight" else "model." + name], p), name

    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), atol=1e-5, rtol=1e-5)

    # greedy decoding agrees too
    prompt = TEXT[:12]
    with torch.no_grad():
        hf_ids = hf.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=5, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.eos_token_id)
    assert tok.decode(hf_ids[0]) == generate(model, malt_tok, prompt, 5, temperature=0)


def test_export_refuses_the_run_directory_itself(trained):
    run_dir, _, _ = trained
    with pytest.raises(RunError, match="run directory"):
        export_hf(run_dir, run_dir, force=True)
    with pytest.raises(RunError, match="run directory"):
        export_hf(run_dir, run_dir.parent, force=True)
    assert (run_dir / "model.py").is_file()


def test_cli_export_twice_needs_force(llama_run, tmp_path):
    run_dir, cache = llama_run
    out = tmp_path / "hf"
    first = malt_cli("export", run_dir, "-o", out, cache=cache)
    assert first.returncode == 0, first.stderr
    assert "LlamaForCausalLM" in first.stdout and "note:" not in first.stdout  # causal_lm: nothing to note
    before = (out / "model.safetensors").read_bytes()

    second = malt_cli("export", run_dir, "-o", out, cache=cache)
    assert second.returncode != 0
    assert "Traceback" not in second.stdout + second.stderr
    assert "already exists" in second.stderr and "--force" in second.stderr

    forced = malt_cli("export", run_dir, "-o", out, "--force", cache=cache)
    assert forced.returncode == 0, forced.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left behind
    transformers.AutoConfig.from_pretrained(out)


@pytest.mark.parametrize("what", ["not_a_run", "missing"])
def test_cli_export_of_a_non_run_directory_is_a_clear_error(what, tmp_path):
    src = tmp_path / "src"
    if what == "not_a_run":
        src.mkdir()
        (src / "notes.txt").write_text("hello")
    proc = malt_cli("export", src, "-o", tmp_path / "out", cache=tmp_path / "cache")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ")
    assert ("not a malt run directory" if what == "not_a_run" else "not found") in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_sample_continues_the_prompt(llama_run):
    run_dir, cache = llama_run
    proc = malt_cli("sample", run_dir, "--prompt", "ab", "-n", "5", cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ab")
    assert len(proc.stdout.rstrip("\n")) > 2
    # no prompt: a new document, from the end-of-text token that precedes every document, which is not printed
    proc = malt_cli("sample", run_dir, "-n", "3", cache=cache)
    assert proc.returncode == 0, proc.stderr
    model, tokenizer, _ = load_run_model(run_dir)
    eos = tokenizer.token_to_id("<|endoftext|>")
    seen = []
    hook = model.register_forward_pre_hook(lambda _, args: seen.append(args[0][0, 0].item()))
    assert generate(model, tokenizer, "", 0, start_id=eos) == ""
    generate(model, tokenizer, "", 1, start_id=eos)
    hook.remove()
    assert seen == [eos]


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_export_refuses_to_replace_the_current_directory(tmp_path, monkeypatch, out):
    (tmp_path / "runs" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "work").mkdir()
    monkeypatch.chdir(tmp_path / "runs" / "work")
    with pytest.raises(RunError, match="is or contains the (current|run) directory"):
        export_hf(tmp_path / "runs" / "run", out, force=True)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run", "work"]   # nothing written, nothing left behind
    assert not list((tmp_path / "runs" / "work").iterdir())


def test_exported_context_length_is_the_longest_phases(make_recipe, host, tmp_path):
    """A run whose last phase trains on longer sequences (context extension) exports that length: config.json's
    max_position_embeddings and the tokenizer's model_max_length, not the first phase's seq_len."""
    from malt.runtime.export import hf_config, longest_seq_len

    recipe = make_recipe({"phases": [{"name": "short", "share": "50%"},
                                     {"name": "long", "share": "50%", "train": {"seq_len": 64}, "model": {"rope_theta": 40000}}]})
    p = compile_to(recipe, tmp_path / "run", host=host)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert p.recipe.train.seq_len == 32 and longest_seq_len(plan) == 64
    assert hf_config(plan, eos_id=256)[1]["max_position_embeddings"] == 64


def test_cli_export_of_a_prefix_objective_says_the_export_is_causal(llama_run, tmp_path):
    """A run trained with a bidirectional prefix (prefix_lm, span_corruption, ul2) exports the causal architecture:
    the command says what the exported model computes. (The run's plan.json is edited to say prefix_lm.)"""
    import shutil

    run_dir, cache = llama_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    plan = json.loads((copy / "plan.json").read_text())
    plan["objective"] = {"kind": "prefix_lm", "attention": "bidirectional over the prefix, causal after it"}
    (copy / "plan.json").write_text(json.dumps(plan))
    done = malt_cli("export", copy, "-o", tmp_path / "hf", cache=cache)
    assert done.returncode == 0, done.stderr
    assert "note: this run trained with prefix_lm (bidirectional over the prefix, causal after it); LlamaForCausalLM " \
           "attends causally everywhere" in done.stdout


def test_exported_tokenizer_adds_no_token_the_training_data_lacked():
    """A kind: file tokenizer whose post-processor prepends a BOS (Llama's) is exported without that step: the exported
    tokenizer encodes text as the data pipeline did (add_special_tokens=False), also when called with its defaults."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from malt.runtime.export import as_trained

    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "b": 3, "[UNK]": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    assert tok.encode("a b").ids == [0, 2, 3]
    exported = Tokenizer.from_str(json.dumps(as_trained(json.loads(tok.to_str()))))
    assert exported.encode("a b").ids == tok.encode("a b", add_special_tokens=False).ids == [2, 3]
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                              processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])])
    kept = as_trained(json.loads(tok.to_str()))["post_processor"]
    assert [p["type"] for p in kept["processors"]] == ["ByteLevel"]
    assert Tokenizer.from_str(json.dumps({**json.loads(tok.to_str()), "post_processor": kept})).encode("a b").ids == [2, 3]


# --- safety of the output directory, write errors, non-finite weights, signals, stale temporaries, durability ---


def _copy_run(run_dir, dest):
    """A copy of a trained run (without its lock) that a test may damage."""
    import shutil

    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def _tree(path):
    """{relative path: bytes} of every file under ``path`` (what a refused export must leave as it was)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("where", ["checkpoint", "checkpoints", "new_folder_in_run", "other_run", "in_other_run",
                                   "locked", "holds_runs"])
def test_export_force_never_replaces_a_run_or_its_files(llama_run, tmp_path, where):
    """--force replaces a previous export, never a run: not a folder inside the run exported (its checkpoints), not
    another run directory (plan.json, checkpoints/, a .lock a training holds), not a folder that holds runs."""
    from malt.runtime.run import hold_lock

    run_dir = _copy_run(llama_run[0], tmp_path / "run")
    other = tmp_path / "runs" / "other"
    (other / "checkpoints" / "step_00000001").mkdir(parents=True)
    (other / "plan.json").write_text("{}")
    (other / "recipe.lock.yaml").write_text("name: other\n")
    (other / "checkpoints" / "step_00000001" / "state.json").write_text("{}")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("a training runs here")
    out, expect = {
        "checkpoint": (run_dir / "checkpoints" / "step_00000006", "inside the run directory"),
        "checkpoints": (run_dir / "checkpoints", "inside the run directory"),
        "new_folder_in_run": (run_dir / "hf", "inside the run directory"),
        "other_run": (other, "is a malt run directory (it has plan.json, checkpoints)"),
        "in_other_run": (other / "checkpoints", f"inside the malt run directory {other}"),
        "locked": (busy, "in which a training (pid"),
        "holds_runs": (tmp_path / "runs", "holds malt run directories (other)"),
    }[where]
    lock = hold_lock(busy) if where == "locked" else None
    before = _tree(tmp_path)
    try:
        with pytest.raises(RunError) as e:
            export_hf(run_dir, out, force=True)
    finally:
        if lock is not None:
            lock.close()
    assert expect in e.value.message
    assert "hf/NAME" in e.value.hint and "never" in e.value.hint
    assert _tree(tmp_path) == {**before, **({"busy/.lock": (busy / ".lock").read_bytes()} if lock else {})}
    assert not (run_dir / "hf").exists()


def test_cli_export_into_the_run_is_refused_with_exit_2(llama_run, tmp_path):
    run_dir = _copy_run(llama_run[0], tmp_path / "run")
    before = _tree(run_dir)
    proc = malt_cli("export", run_dir, "-o", run_dir / "checkpoints", "--force", cache=llama_run[1])
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: {run_dir / 'checkpoints'} is inside the run directory {run_dir}")
    assert "hint: choose an output directory outside the run" in proc.stderr
    assert _tree(run_dir) == before


@pytest.mark.parametrize("failure", ["safetensors_full", "oserror_full", "read_only"])
def test_export_write_errors_name_out_with_a_hint(llama_run, tmp_path, monkeypatch, failure):
    """A full disk (safetensors' own error or an OSError) or a read-only folder: a message about OUT, not the
    temporary folder, with a hint; the temporary folder is removed."""
    import errno
    import pathlib

    import safetensors.torch
    from safetensors import SafetensorError

    run_dir, _ = llama_run
    out = tmp_path / "hf" / "tiny"
    if failure == "read_only":
        real_mkdir = pathlib.Path.mkdir

        def mkdir(self, *args, **kwargs):
            if ".tmp-" in self.name:
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *args, **kwargs)
        monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    else:
        def save_file(tensors, filename, metadata=None):
            with open(filename, "wb") as f:
                f.write(b"\0" * 1000)  # a partial file, as a full disk leaves
            if failure == "safetensors_full":
                raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                      'message: "No space left on device" })')
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(RunError) as e:
        export_hf(run_dir, out)
    message, hint = e.value.message, e.value.hint
    assert message.startswith(f"cannot write {out}: ") and ".tmp-" not in message + hint
    if failure == "read_only":
        assert "read-only file system" in message and "writable directory" in hint
    else:
        assert "no space left" in message and "the export needs about" in message and "free space" in hint
    assert not out.exists()
    assert not (tmp_path / "hf").exists() or not list((tmp_path / "hf").iterdir())  # no temporary folder left


def test_cli_export_through_a_file_is_a_clear_error(llama_run, tmp_path):
    run_dir, cache = llama_run
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "x2").write_text("a file")
    proc = malt_cli("export", run_dir, "-o", tmp_path / "hf" / "x2" / "sub", cache=cache)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and ".tmp-" not in proc.stderr
    assert f"cannot write {tmp_path / 'hf' / 'x2' / 'sub'}: {tmp_path / 'hf' / 'x2'} is a file" in proc.stderr
    assert "hint: choose another output directory" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["x2"]


def test_export_refuses_weights_that_are_not_finite(llama_run, tmp_path):
    """A checkpoint whose weights hold nan or inf (bit rot: malt never writes one) is refused: the message names the
    tensor and the checkpoint, the hint the run's older checkpoint; nothing is written."""
    from safetensors.torch import load_file, save_file

    run_dir = _copy_run(llama_run[0], tmp_path / "run")
    path = run_dir / "checkpoints" / "step_00000006" / "model.safetensors"
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if tensors[k].dim() == 2 and "embed" not in k)  # a layer's weight matrix
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(path))
    out = tmp_path / "hf"
    with pytest.raises(RunError) as e:
        export_hf(run_dir, out)
    assert f"checkpoint {run_dir / 'checkpoints' / 'step_00000006'} is damaged: 1 of the model's" in e.value.message
    assert f"weight tensors hold nan or inf ({name})" in e.value.message
    assert "export and sample then read step 3, the one before" in e.value.hint
    assert not out.exists() and _hidden(tmp_path) == []


SIGNAL_SCRIPT = """
import os, signal, sys, time
import safetensors.torch
real, sig, run_dir, out = safetensors.torch.save_file, getattr(signal, sys.argv[1]), sys.argv[2], sys.argv[3]
def save_file(*args, **kwargs):  # the export is half written when the signal comes
    real(*args, **kwargs)
    os.kill(os.getpid(), sig)
    time.sleep(30)
safetensors.torch.save_file = save_file
from malt.compiler.cli import main
sys.argv = ["malt", "export", run_dir, "-o", out]
main()
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_cli_export_stopped_by_a_signal_cleans_up(llama_run, tmp_path, sig):
    """SIGTERM or SIGHUP during an export: the temporary folder is removed, as for Ctrl-C; one line says so; the
    exit code is 128 + the signal."""
    import signal

    run_dir, cache = llama_run
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, sig, str(run_dir), str(out)], check=False,
                          capture_output=True, text=True, env=run_env(cache), timeout=120)
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"interrupted ({sig}): the export stopped and removed its temporary files; {out} is as it was" in proc.stderr
    assert not out.exists() and _hidden(tmp_path) == []


def test_a_signal_waits_while_the_export_is_put_in_place():
    """Within the renames that put an export in place a signal is noted, not raised (an interrupted swap would leave
    neither export); outside it raises ExportInterrupted; the previous handler is back afterwards."""
    import os
    import signal

    from malt.runtime.export import ExportInterrupted, _StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with _StopSignals() as signals:
        with signals.critical():
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # the handler runs between bytecodes: here it only notes the signal
        assert signals.pending == signal.SIGTERM
        with pytest.raises(ExportInterrupted) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))
        assert e.value.signum == signal.SIGTERM and isinstance(e.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGTERM) is before


def test_export_removes_temporaries_a_killed_export_left(llama_run, tmp_path):
    """An export killed (SIGKILL, a power loss) leaves .NAME.tmp-PID (and, replacing, .NAME.old-PID) beside OUT: the
    next export to OUT removes those of processes that no longer run, and keeps another live export's and other
    names'."""
    import os

    run_dir, _ = llama_run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = os.getppid()
    for name in (f".hf.tmp-{dead.pid}", f".hf.old-{dead.pid}", f".hf.tmp-{alive}", f".other.tmp-{dead.pid}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 100)
    export_hf(run_dir, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert _hidden(tmp_path) == sorted([f".hf.tmp-{alive}", f".other.tmp-{dead.pid}"])


def test_export_syncs_files_and_folders_around_the_rename(llama_run, tmp_path, monkeypatch):
    """Every file and the temporary folder reach the disk before the rename into place, the parent folder after it:
    a power loss never leaves a complete-looking directory of empty files."""
    import os

    from malt.runtime import checkpoint

    run_dir, _ = llama_run
    events = []
    real_rename, real_file, real_dir = os.rename, checkpoint._fsync_file, checkpoint._fsync_dir
    monkeypatch.setattr(checkpoint, "_fsync_file", lambda p: (events.append(("file", p.name)), real_file(p)))
    monkeypatch.setattr(checkpoint, "_fsync_dir", lambda p: (events.append(("dir", str(p))), real_dir(p)))
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b)))
    out = tmp_path / "hf"
    for force in (False, True):  # a new export, then one replacing it
        events.clear()
        export_hf(run_dir, out, force=force)
        put = events.index(("rename", str(out)))
        files = {n for kind, n in events[:put] if kind == "file"}
        assert files == {p.name for p in out.iterdir()} and "model.safetensors" in files
        assert any(kind == "dir" and ".hf.tmp-" in p for kind, p in events[:put])
        assert ("dir", str(tmp_path)) in events[put:]


@pytest.mark.parametrize("damage", ["no_lock", "no_model_py", "corrupt_plan"])
def test_export_of_a_run_with_a_missing_or_corrupt_file_says_which(llama_run, tmp_path, damage):
    """A run directory (it has checkpoints/) that lacks recipe.lock.yaml or model.py, or whose plan.json is corrupt,
    is a run with a damaged file, not 'not a malt run directory': the message names the file, the hint says that
    `malt compile RECIPE -o RUN` writes it again."""
    run_dir = _copy_run(llama_run[0], tmp_path / "run")
    name = {"no_lock": "recipe.lock.yaml", "no_model_py": "model.py", "corrupt_plan": "plan.json"}[damage]
    if damage == "corrupt_plan":
        (run_dir / name).write_text('{"model": ')
    else:
        (run_dir / name).unlink()
    with pytest.raises(RunError) as e:
        export_hf(run_dir, tmp_path / "hf")
    expected = f"{run_dir / name} is corrupt" if damage == "corrupt_plan" else f"{name} is missing from the run directory {run_dir}"
    assert e.value.message.startswith(expected) and "not a malt run directory" not in e.value.message
    assert f"`malt compile RECIPE -o {run_dir}`" in e.value.hint
    assert not (tmp_path / "hf").exists() and _hidden(tmp_path) == []
