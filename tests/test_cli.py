"""The `malt` command line: help, check, plan; user errors end in a message and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from malt.compiler.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"

RECIPE = """\
name: cli-test
model:
  d_model: 64
  n_layers: 2
  n_heads: 4
tokenizer:
  kind: bytes
data:
  sources:
    - {name: docs, path: docs.txt}
optimizer:
  lr: 3e-4
train:
  seq_len: 32
  global_batch: 8
  tokens: 20k
target: {accelerator: cpu}
"""

runner = CliRunner()


def malt(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    # anything but a clean exit is a user error the CLI handled, not an exception escaping it
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.txt").write_text("some text\n" * 50)

    def write(text: str = RECIPE, name: str = "recipe.yaml") -> str:
        (tmp_path / name).write_text(text)
        return name
    return write


def test_help():
    r = malt("--help")
    assert r.exit_code == 0
    for command in ("check", "plan", "compile", "run", "export", "sample"):
        assert command in r.stdout
    r = malt("check", "--help")
    assert r.exit_code == 0 and "--set" in r.stdout


def test_no_arguments_shows_usage():
    r = malt()
    assert r.exit_code != 0
    assert "Usage" in r.output


def test_check_tiny():
    r = malt("check", TINY)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().endswith("ok (tiny-llama)")
    assert r.stderr == ""


def test_check_ok_and_with_set(recipe):
    r = malt("check", recipe())
    assert (r.exit_code, r.stdout) == (0, "recipe.yaml: ok (cli-test)\n")
    r = malt("check", recipe(), "--set", "name=other", "--set", "optimizer.betas=[0.9, 0.99]", "--set", "data.sources.0.weight=0.5")
    assert (r.exit_code, r.stdout) == (0, "recipe.yaml: ok (other)\n")


def test_check_reports_every_problem_and_exits_2(recipe):
    path = recipe(RECIPE.replace("n_heads: 4", "n_heads: 6").replace("lr: 3e-4", "lr: -1").replace("d_model: 64", "d_modle: 64\n  d_model: 64")
                  .replace("docs.txt", "nothere.txt"))
    r = malt("check", path)
    assert r.exit_code == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert lines[-1] == "4 errors"
    heads = [line for line in lines[:-1] if not line.startswith("    hint: ")]
    assert [h.split(": error: ")[0] for h in heads] == ["recipe.yaml:3:3", "recipe.yaml:6:3", "recipe.yaml:11:20", "recipe.yaml:13:3"]
    assert "recipe.yaml:3:3: error: model.d_modle: unknown key 'd_modle'" in heads
    assert "    hint: did you mean 'd_model'?" in lines
    # every error line is followed by its hint line
    for i, line in enumerate(lines[:-1]):
        if ": error: " in line:
            assert lines[i + 1].startswith("    hint: ")


def test_check_one_error_says_1_error(recipe):
    r = malt("check", recipe(RECIPE.replace("lr: 3e-4", "lr: 0")))
    assert r.exit_code == 2 and r.stderr.splitlines()[-1] == "1 error"


def test_check_missing_recipe(recipe):
    r = malt("check", "nothere.yaml")
    assert r.exit_code == 2
    assert "nothere.yaml: error: recipe file not found: nothere.yaml" in r.stderr


def test_check_not_yaml(recipe):
    r = malt("check", recipe("name: [x\n"))
    assert r.exit_code == 2
    assert r.stderr.startswith("recipe.yaml:2:1: error: not valid YAML")


def test_check_directory_instead_of_file(recipe, tmp_path):
    r = malt("check", tmp_path)
    assert r.exit_code == 2 and "cannot read recipe" in r.stderr


@pytest.mark.parametrize("sets, message", [
    (["train.steps"], "command line (--set train.steps): error: --set expects path=value, got 'train.steps'"),
    (["data.sources.3.weight=1"], "data.sources is a list of 1 item(s); 3 is not one of its indices"),
    (["model.d_modl=3"], "command line (--set model.d_modl=3): error: model.d_modl: unknown key 'd_modl'"),
    (["target.nodes=0"], "command line (--set target.nodes=0): error: target.nodes: must be greater than 0, got 0"),
])
def test_bad_set(recipe, sets, message):
    args = []
    for s in sets:
        args += ["--set", s]
    for command in ("check", "plan"):
        r = malt(command, recipe(), *args)
        assert r.exit_code == 2
        assert message in r.stderr


@pytest.mark.parametrize("args", [
    ["check"],                                  # missing argument
    ["check", "--bogus", "recipes/tiny.yaml"],  # unknown flag
    ["plan", "x.yaml", "--json=maybe"],
    ["frobnicate"],                             # unknown command
    ["check", "x.yaml", "--set"],               # --set without a value
])
def test_bad_usage(args):
    r = malt(*args)
    assert r.exit_code == 2
    assert r.output.strip()


PLAN_KEYS = {"params", "flops_per_token", "tokens", "steps", "total_flops", "memory_per_device_bytes", "estimated_seconds"}


def test_plan_json_tiny():
    r = malt("plan", TINY, "--json")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert PLAN_KEYS <= set(p)
    assert set(p["memory_per_device_bytes"]) >= {"weights", "gradients", "optimizer", "activations", "total"}
    mem = p["memory_per_device_bytes"]
    assert mem["total"] >= mem["weights"] + mem["gradients"] + mem["optimizer"] + mem["activations"] - 1
    assert all(isinstance(p[k], (int, float)) and p[k] > 0 for k in PLAN_KEYS - {"memory_per_device_bytes"})
    assert p["total_flops"] == pytest.approx(p["flops_per_token"] * p["tokens"], rel=1e-6)
    assert p["tokens"] <= 1_000_000 and p["steps"] == p["tokens"] // (16 * 128)


def test_plan_json_small_recipe_and_set(recipe):
    r = malt("plan", recipe(), "--json", "--set", "train.tokens=40k")
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["steps"] == 40_000 // (8 * 32) and p["tokens"] == p["steps"] * 8 * 32
    # a bytes tokenizer: 256 bytes + <|endoftext|>, tied embeddings; params are at least the embedding
    assert p["params"] >= 257 * 64


def test_plan_text(recipe):
    r = malt("plan", recipe())
    assert r.exit_code == 0, r.output
    for word in ("params", "run", "memory", "time", "decisions"):
        assert word in r.stdout


def test_plan_reports_recipe_problems(recipe):
    r = malt("plan", recipe(RECIPE.replace("n_heads: 4", "n_heads: 6")), "--json")
    assert r.exit_code == 2
    assert r.stdout == ""
    assert "recipe.yaml:5:3: error: model.n_heads: n_heads (6) does not divide d_model (64)" in r.stderr


# ---- the installed console script, in a real process --------------------------------------------

def _malt_command() -> list[str]:
    script = Path(sys.executable).with_name("malt")
    return [str(script)] if script.exists() else [sys.executable, "-m", "malt.compiler.cli"]


def test_console_script_help_and_check():
    r = subprocess.run(_malt_command() + ["--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "check" in r.stdout
    r = subprocess.run(_malt_command() + ["check", "recipes/tiny.yaml"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (r.returncode, r.stdout, r.stderr) == (0, "recipes/tiny.yaml: ok (tiny-llama)\n", "")


def test_console_script_errors_without_traceback(recipe, tmp_path):
    path = recipe(RECIPE.replace("lr: 3e-4", "lr: 0"))
    r = subprocess.run(_malt_command() + ["check", path, "--set", "model.n_heads=6", "--set", "nonsense"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stdout + r.stderr
    assert "command line (--set nonsense): error: --set expects path=value" in r.stderr
    r = subprocess.run(_malt_command() + ["check", "missing.yaml"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert "recipe file not found: missing.yaml" in r.stderr


def test_compiling_again_keeps_a_copy_of_a_program_edited_by_hand(recipe, tmp_path):
    """malt's own files are replaced by the next compile; one edited since malt wrote it (its sha256 is not the one
    malt recorded in .malt-files.json) is first kept beside it as NAME.edited, and the command says so."""
    path = recipe()
    assert malt("compile", path, "-o", "out").exit_code == 0
    train = tmp_path / "out" / "train.py"
    original = train.read_text()
    assert malt("compile", path, "-o", "out").exit_code == 0  # unchanged: nothing kept
    assert not list((tmp_path / "out").glob("*.edited*"))
    train.write_text(original.replace("LOG_EVERY = ", "LOG_EVERY = 1  # mine\nOLD_LOG_EVERY = ", 1))
    edited = train.read_text()
    for n, name in enumerate(["train.py.edited", "train.py.edited-2"]):
        r = malt("compile", path, "-o", "out")
        assert r.exit_code == 0 and f"note: {name} in out/: malt's files as edited by hand" in r.output, r.output
        assert (tmp_path / "out" / name).read_text() == edited and train.read_text() == original
        train.write_text(edited)


def test_compile_never_replaces_files_malt_did_not_write(recipe, tmp_path):
    path = recipe()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.py").write_text("# my own training script\n")
    r = malt("compile", path, "-o", "mine")
    assert r.exit_code == 2 and "mine already holds train.py that malt did not write" in r.output
    assert (tmp_path / "mine" / "train.py").read_text() == "# my own training script\n"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["train.py"]    # nothing written beside it
    (tmp_path / "a-file").write_text("x")
    r = malt("compile", path, "-o", "a-file")
    assert r.exit_code != 0 and "a-file is a file, not a folder" in r.output
    assert malt("compile", path, "-o", "build").exit_code == 0
    assert malt("compile", path, "-o", "build", "--set", "optimizer.lr=1e-3").exit_code == 0  # malt's own files: replaced
    assert "LR = 0.001" in (tmp_path / "build" / "train.py").read_text()


def test_a_source_without_text_is_shown_at_its_line_in_the_recipe(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("MALT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "empty.txt").write_text("")
    path = recipe(RECIPE.replace("    - {name: docs, path: docs.txt}", "    - {name: docs, path: docs.txt}\n    - {name: none, path: empty.txt}"))
    for command in (["data", path], ["run", path, "--run-dir", "run"]):
        r = malt(*command)
        assert r.exit_code == 2, r.output
        assert "recipe.yaml:11:7: error: data.sources.1: source 'none'" in r.output and "yields no text" in r.output, r.output
        assert "hint: check the path" in r.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_run_directory_takes_only_its_own_recipe(recipe, tmp_path):
    """malt compile and malt run over a directory with checkpoints: the same recipe may be recompiled (for other
    hardware) and resumed; another recipe is refused by both, and malt run without --resume refuses any."""
    path = recipe()
    assert malt("compile", path, "-o", "run").exit_code == 0
    own = json.loads((tmp_path / "run" / "plan.json").read_text())["recipe_hash"]
    step = tmp_path / "run" / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    lock = (tmp_path / "run" / "recipe.lock.yaml").read_text()
    (step / "state.json").write_text(json.dumps({"format": 2, "step": 4, "recipe_hash": own, "optimizer": {}, "recipe": lock}))
    assert malt("compile", path, "-o", "run", "--set", "target.devices=2").exit_code == 0   # same recipe, other hardware
    r = malt("compile", path, "-o", "run", "--set", "optimizer.lr=1e-3")
    assert r.exit_code == 2 and "run holds a run of another recipe (checkpoint at step 4" in r.output, r.output
    r = malt("run", path, "--run-dir", "run", "--set", "optimizer.lr=1e-3", "--resume")
    assert r.exit_code == 2 and "the recipe changed since run was started" in r.output, r.output
    assert "changed: optimizer.lr: 0.0003 → 0.001" in r.output, r.output                     # what changed, old → new
    r = malt("run", path, "--run-dir", "run")
    assert r.exit_code == 2 and "run already holds a run (checkpoint at step 4)" in r.output, r.output
    assert "LR = 0.0003" in (tmp_path / "run" / "train.py").read_text()                       # nothing replaced it


def test_plan_says_what_the_evaluations_cost_and_how_to_spend_less():
    """The time line gives the evaluations' share of the run; past a tenth, how to lower it."""
    llama = ROOT / "recipes" / "llama-124m.yaml"
    usual = malt("plan", llama)
    line = next(x for x in usual.stdout.splitlines() if x.startswith("time"))
    assert "evaluations 26.5 s of it (0.5%)" in line and "eval_every" not in line
    assert "\neval       every 500 steps: 8 global batches = 512 validation sequences (524k tokens)\n" in usual.stdout
    often = malt("plan", llama, "--set", "train.eval_every=10")
    line = next(x for x in often.stdout.splitlines() if x.startswith("time"))
    assert "(21.1%): lower train.eval_batches or raise train.eval_every to spend less" in line
    off = malt("plan", llama, "--set", "train.eval_every=0")
    assert "evaluations" not in next(x for x in off.stdout.splitlines() if x.startswith("time"))
    assert "\neval " not in off.stdout


def test_malt_data_warns_when_an_evaluation_reads_more_than_the_validation_split(tmp_path, monkeypatch):
    """eval_batches counts global batches: past the validation split's size the same tokens are read again; `malt data`
    says so with the numbers (no warning at the recipe's own eval_batches 2: 512 tokens)."""
    import re

    from .helpers import write_tiny_recipe

    monkeypatch.setenv("MALT_CACHE_DIR", str(tmp_path / "cache"))
    recipe = write_tiny_recipe(tmp_path / "r")
    usual = malt("data", recipe)
    assert usual.exit_code == 0 and "warning: an evaluation reads" not in usual.stderr
    held = int(re.search(r"^total(?:\s+[\d,]+){4}\s+([\d,]+)", usual.stdout, re.M).group(1).replace(",", ""))
    batches = held // (8 * 32) + 1  # global_batch 8 × seq_len 32
    many = malt("data", recipe, "--set", f"train.eval_batches={batches}")
    assert many.exit_code == 0
    assert (f"warning: an evaluation reads {batches * 256:,} tokens (train.eval_batches {batches} global batches) but the "
            f"validation split holds {held:,}") in many.stderr


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_stop_signal_during_a_command_is_said_like_ctrl_c(signame, capsys):
    """SIGTERM or SIGHUP while malt prepares data in its own process (malt prepare, data, the start of malt run) ended
    it at once, leaving temporary files; they now unwind as Ctrl-C does (what is being written is removed)."""
    import os
    import signal
    import time

    import typer

    from malt.compiler.cli import _guard

    sig = getattr(signal, signame)
    before = signal.getsignal(sig)
    cleaned = []

    def work():
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)
        finally:
            cleaned.append(True)

    with pytest.raises(typer.Exit) as exit_:
        _guard(work)
    assert exit_.value.exit_code == 128 + sig and cleaned == [True]
    assert f"stopped by {signame}: what is already written (data cache, checkpoints) is complete" in capsys.readouterr().err
    assert signal.getsignal(sig) is before
