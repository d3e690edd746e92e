"""Checkpoints and run files damaged or touched by hand: every case is a clear error or is handled, and nothing a
user keeps in the run directory is deleted or written over."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from malt.runtime import checkpoint
from malt.runtime.run import Run, RunError, _main_with_messages, start_run

from .test_checkpoint_sharded import make_run, trained


def saved(tmp_path, steps=(2, 4), keep=2, fmt="full"):
    run = make_run(tmp_path)
    model, opt = trained()
    for step in steps:
        checkpoint.save(run, step, model, opt, keep=keep, fmt=fmt)
    return run, model, opt


def test_folders_of_other_names_in_checkpoints_are_neither_read_nor_pruned(tmp_path):
    """A user's backup (checkpoints/step_00000002_backup) was pruned as a checkpoint, and its name crashed latest()."""
    import shutil

    run, model, opt = saved(tmp_path, steps=(2,))
    ck = tmp_path / "checkpoints"
    shutil.copytree(ck / "step_00000002", ck / "step_00000002_backup")
    shutil.copytree(ck / "step_00000002", ck / "step_00000002-good")
    (ck / "latest").unlink()
    assert checkpoint.latest(tmp_path) == (2, ck / "step_00000002")
    for step in (4, 6, 8):
        checkpoint.save(run, step, model, opt, keep=1)
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000002-good", "step_00000002_backup", "step_00000008"]


def test_a_latest_pointer_that_is_not_text_falls_back_to_the_newest_checkpoint(tmp_path):
    saved(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00garbage")
    assert checkpoint.latest(tmp_path)[0] == 4


def test_a_checkpoint_folder_without_state_json_stops_the_run_before_it_is_written_over(tmp_path):
    """A partial copy of a run, or state.json deleted: latest() skips the folder, so the run started over (or resumed
    from an older step) and wrote over the trained weights. It is refused, by train.py and by malt run and compile."""
    from malt.compiler.cli import check_run_dir
    from malt.compiler.diagnostics import UserError

    saved(tmp_path)
    (tmp_path / "checkpoints" / "step_00000004" / "state.json").unlink()
    for argv in (["--resume"], []):
        with pytest.raises(RunError) as info:
            start_run(tmp_path, "t", "hash", argv=argv)
        assert "step_00000004 has no state.json" in info.value.message and "written over" not in info.value.message
        assert "move the folder out of checkpoints/" in info.value.hint
    with pytest.raises(UserError, match="step_00000004 has no state.json"):
        check_run_dir(tmp_path, "hash", resume=True)
    assert (tmp_path / "checkpoints" / "step_00000004" / "model.safetensors").is_file()


@pytest.mark.parametrize("left", ["old", "tmp", "both"])
def test_a_kill_between_the_two_renames_of_a_rewritten_checkpoint_keeps_a_copy(tmp_path, left):
    """Saving a step that exists (a resumed run repeating its last save) moves the old folder aside, then renames the
    new one in: a kill in between left two complete copies, and the next start removed both."""
    run, _, _ = saved(tmp_path)
    ck = tmp_path / "checkpoints"
    if left in ("old", "both"):
        os.rename(ck / "step_00000004", ck / ".old-step_00000004-4242")
    if left in ("tmp", "both"):
        src = ck / (".old-step_00000004-4242" if left == "both" else "step_00000004")
        import shutil

        shutil.copytree(src, ck / ".tmp-step_00000004-4242")
        if left == "tmp":
            shutil.rmtree(src)
    (ck / ".tmp-step_00000006-4242").mkdir()  # an unfinished one (no state.json) is still removed
    checkpoint.remove_unfinished(run)
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000002", "step_00000004"]
    assert checkpoint.latest(tmp_path)[0] == 4


def test_a_checkpoint_holding_nan_is_said_to_be_damaged(tmp_path):
    """Bit rot or a bad copy: malt never writes nan or inf weights, so reading them back names the damage and the
    checkpoint before it (it said 'training diverged' one step later, and called that checkpoint finite)."""
    run, _, _ = saved(tmp_path)
    path = tmp_path / "checkpoints" / "step_00000004" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["layers.1.weight"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    fresh, fresh_opt = trained(seed=1, steps=1)
    with pytest.raises(RunError) as info:
        checkpoint.restore(run, fresh, fresh_opt)
    assert "step_00000004 is damaged: 1 of the model's 6 weight tensors hold nan or inf (layers.1.weight)" in info.value.message
    assert "resume, export and sample then read step 2, the one before" in info.value.hint


def test_a_state_json_of_the_wrong_shape_is_corrupt_not_a_traceback(tmp_path):
    run, _, _ = saved(tmp_path)
    state_path = tmp_path / "checkpoints" / "step_00000004" / "state.json"
    for optimizer in (None, {"param_groups": "x"}, {"param_groups": [], "plain_state": 3}):
        state = json.loads(state_path.read_text())
        state["optimizer"] = optimizer
        state_path.write_text(json.dumps(state))
        fresh, fresh_opt = trained(seed=1, steps=1)
        with pytest.raises(RunError, match="state.json is corrupt: its optimizer entry is not what malt writes"):
            checkpoint.restore(run, fresh, fresh_opt)


def test_init_from_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    saved(tmp_path / "src")
    path = tmp_path / "src" / "checkpoints" / "step_00000004" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    fresh, _ = trained(seed=1, steps=0)
    with pytest.raises(RunError) as info:
        checkpoint.init_from(tmp_path / "src", "malt", fresh, log=lambda m: None)
    assert "init_from: " in info.value.message and "cannot be read" in info.value.message
    assert "that checkpoint is damaged" in info.value.hint


def test_a_full_disk_inside_dcp_is_the_full_disk_message(tmp_path, monkeypatch):
    """torch.save reports ENOSPC inside DCP as a RuntimeError ('unexpected pos'): it printed pages of tracebacks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    run = make_run(tmp_path)
    model, opt = trained()

    def full(state, checkpoint_id, **kw):
        raise CheckpointException("save", {0: (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), None)})

    monkeypatch.setattr(dcp, "save", full)
    with pytest.raises(RunError, match="cannot write the checkpoint of step 2 .*unexpected pos") as info:
        checkpoint.save(run, 2, model, opt, fmt="sharded")
    assert "free disk space" in info.value.hint


def test_a_sharded_checkpoint_without_metadata_prints_no_traceback(tmp_path, capfd, monkeypatch):
    """DCP's loader logs each failure with its traceback through the root logger before it raises."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a program: logging's last resort writes to stderr
    run, _, _ = saved(tmp_path, fmt="sharded")
    (tmp_path / "checkpoints" / "step_00000004" / "dcp" / ".metadata").unlink()
    fresh, fresh_opt = trained(seed=1, steps=0)
    with pytest.raises(RunError, match="is corrupt or incomplete"):
        checkpoint.restore(run, fresh, fresh_opt)
    assert "Traceback" not in capfd.readouterr().err


def test_a_damaged_metrics_file_does_not_stop_a_resume(tmp_path):
    run = Run(tmp_path, "t", "hash", resume=True, quiet=True)
    good = {"step": 1, "loss": 2.0}
    run.metrics_path.write_bytes(json.dumps(good).encode() + b"\n\xff\xfe broken\n3\n[1, 2]\n" + b'{"step": "x"}\n')
    run.begin(1, 10, 8)
    run._metrics.close()
    assert run.metrics_path.read_text().splitlines() == [json.dumps(good)]


def test_a_resumed_run_whose_tokenizer_is_not_the_checkpoints_is_refused(tmp_path):
    """The checkpoint records the token → id map's hash: a tokenizer trained again on changed data is refused on
    --resume also when the run's tokenizer.json is gone (it used to be the only reference, and its loss was silent)."""
    from tokenizers import Tokenizer, models

    def tokenizer(words, path):
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
        tok.save(str(path))
        return path

    first = tokenizer(["<unk>", "a", "b"], tmp_path / "first.json")
    (tmp_path / "run").mkdir()
    run = Run(tmp_path / "run", "t", "hash", resume=False, quiet=True)
    run.adopt_tokenizer(first)
    model, opt = trained()
    checkpoint.save(run, 2, model, opt)
    (tmp_path / "run" / "tokenizer.json").unlink()
    again = start_run(tmp_path / "run", "t", "hash", argv=["--resume"])
    again.adopt_tokenizer(first)  # the same tokens: fine
    other = tokenizer(["<unk>", "b", "a"], tmp_path / "other.json")
    (tmp_path / "run" / "tokenizer.json").unlink()
    with pytest.raises(RunError, match="tokenizer_sha256") as info:
        again.adopt_tokenizer(other)
    assert "restore the data files as they were" in info.value.hint


def test_an_os_error_is_a_message_with_a_hint(capsys):
    def main():
        raise OSError(28, "No space left on device", "/data/run/.train.py.tmp-1")

    with pytest.raises(SystemExit) as exit_:
        _main_with_messages(main)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error: No space left on device: /data/run/.train.py.tmp-1" in err and "hint: free disk space there" in err
    assert "Traceback" not in err


def test_a_damaged_tokenizer_json_in_the_run_is_rewritten_when_the_checkpoint_vouches_for_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    path = tmp_path / "tok.json"
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(path))
    (tmp_path / "run").mkdir()
    run = Run(tmp_path / "run", "t", "hash", resume=False, quiet=True)
    run.adopt_tokenizer(path)
    model, opt = trained()
    checkpoint.save(run, 2, model, opt)
    (tmp_path / "run" / "tokenizer.json").write_text("garbage")
    again = start_run(tmp_path / "run", "t", "hash", argv=["--resume", "--quiet"])
    again.adopt_tokenizer(path)  # the checkpoint's tokenizer_sha256 matches the cache's: the file is written again
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == path.read_bytes()
    # without that record (a checkpoint of an older malt), the damaged file is an error that says so
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "state.json").read_text())
    del state["tokenizer_sha256"]
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "state.json").write_text(json.dumps(state))
    (tmp_path / "run" / "tokenizer.json").write_text("garbage")
    again._lock.close()  # this process trains no more in it
    again = start_run(tmp_path / "run", "t", "hash", argv=["--resume", "--quiet"])
    with pytest.raises(RunError, match="this run's tokenizer .*tokenizer.json is corrupt or unreadable"):
        again.adopt_tokenizer(path)


def test_a_damaged_teacher_file_is_named_as_the_teachers(tmp_path):
    """The teacher is read with init_from's readers, whose messages said 'init_from:' for a recipe without one."""
    from transformers import LlamaConfig

    from malt.runtime.teacher import load_teacher

    LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2).save_pretrained(tmp_path / "teacher")
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RunError) as info:
        load_teacher(tmp_path / "teacher", "hf", "cpu", log=lambda m: None)
    assert info.value.message.startswith("distill: teacher: ") and "cannot be read" in info.value.message
    assert "init_from" not in info.value.message


def test_a_kill_while_an_old_checkpoint_is_pruned_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """Pruning deleted the folder in place: a kill after its state.json went left a step folder without one, which a
    resume then refused as damaged. It is renamed out of the checkpoints' names first; the next start removes it."""
    import shutil

    run, model, opt = saved(tmp_path, steps=(2, 4))
    real = shutil.rmtree

    def killed_mid_delete(path, *a, **k):
        (Path(path) / "state.json").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(run, 6, model, opt, keep=2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    assert checkpoint.damaged(tmp_path) == [] and checkpoint.latest(tmp_path)[0] == 6
    again = start_run(tmp_path, "t", "hash", argv=["--resume", "--quiet"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000004", "step_00000006"]
    again._lock.close()
