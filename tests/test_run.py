"""End-to-end runs of generated programs: train, kill with SIGKILL, resume, and what is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from malt.compiler.api import compile_to
from malt.compiler.plan import Host

from .helpers import run_env, run_program, write_tiny_recipe

pytestmark = pytest.mark.slow


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r}


def test_the_validation_set_does_not_depend_on_the_micro_batch(tmp_path):
    """train.eval_batches counts global batches, so the validation set is the same whatever the split: val losses of
    micro_batch 2 and 8 (of global_batch 8) agree (they were the first 2 × micro_batch sequences, 4 against 16)."""
    recipe = write_tiny_recipe(tmp_path / "r", steps=3, eval_every=1, checkpoint_every=0)
    cache = tmp_path / "cache"
    runs = {}
    for micro in (2, 8):
        runs[micro] = tmp_path / f"m{micro}"
        compile_to(recipe, runs[micro], sets=[f"train.micro_batch={micro}", "train.sample_tokens=0"], host=Host())
        run_program(runs[micro], cache, "--quiet")
    a, b = val_losses(runs[2]), val_losses(runs[8])
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    assert a[0] == pytest.approx(b[0], rel=1e-6)  # the same weights: only the order of the sums differs
    for step in (1, 2, 3):  # after updates from gradients accumulated in 4 micro-steps against 1
        assert a[step] == pytest.approx(b[step], rel=1e-5), step


def test_train_then_resume_after_sigkill_reproduces_losses_exactly(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r", steps=40, eval_every=10, checkpoint_every=5)
    cache = tmp_path / "cache"
    full, killed = tmp_path / "full", tmp_path / "killed"
    compile_to(recipe, full, host=Host())
    compile_to(recipe, killed, host=Host())

    proc = run_program(full, cache)
    ref = losses(full)
    assert sorted(ref) == list(range(1, 41))
    assert ref[40] < ref[1]
    assert "sample (8 tokens after" in proc.stdout

    # start the same run, SIGKILL it after its second checkpoint, then resume
    p = subprocess.Popen([sys.executable, str(killed / "train.py"), "--quiet"], env=run_env(cache))
    deadline = time.time() + 120
    pointer = killed / "checkpoints" / "latest"
    while time.time() < deadline:
        if pointer.exists() and pointer.read_text().strip() >= "step_00000010":
            break
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    stopped_at = int(pointer.read_text().strip().split("_")[1])
    assert 10 <= stopped_at < 40, "the run finished before it could be killed; make it longer"

    refused = run_program(killed, cache, check=False)  # without --resume the run directory is protected
    assert refused.returncode == 2 and "--resume" in refused.stderr and "Traceback" not in refused.stderr

    run_program(killed, cache, "--resume")
    assert losses(killed) == ref  # bit-for-bit the same losses at every step
    assert val_losses(killed) == val_losses(full)
    # elapsed_s goes on from the checkpoint's training time: it never falls back at the resume
    records = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in records if "elapsed_s" in r]
    assert len(elapsed) == 40 and elapsed == sorted(elapsed)
    state = json.loads((killed / "checkpoints" / "step_00000040" / "state.json").read_text())
    assert state["elapsed_s"] >= elapsed[-1] > 0
    # at most keep_checkpoints (2) complete checkpoints, and no temporary directories left behind
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_00000035", "step_00000040"]


def test_injection_in_recipe_text_is_inert(tmp_path):
    """Names and paths full of quotes, newlines and code compile to a program that behaves as with plain ones."""
    evil_dir = tmp_path / "r"
    recipe = write_tiny_recipe(evil_dir, steps=3, eval_every=0, checkpoint_every=0)
    evil_name = "x'\"\"\"\\n\nimport os; os.system('touch PWNED') # \\'"
    (evil_dir / "we'ird \"dir\\").mkdir()
    (evil_dir / "corpus.jsonl").rename(evil_dir / "we'ird \"dir\\" / "c\"o'r\\pus.jsonl")
    text = recipe.read_text()
    text = text.replace("name: t", "name: " + json.dumps(evil_name))
    text = text.replace("path: corpus.jsonl", "path: " + json.dumps("we'ird \"dir\\/c\"o'r\\pus.jsonl"))
    text = text.replace("sample_tokens: 8", "sample_tokens: 4, sample_prompt: " + json.dumps("'''\"\"\"\\n"))
    recipe.write_text(text)

    plain_dir = tmp_path / "p"
    plain = write_tiny_recipe(plain_dir, steps=3, eval_every=0, checkpoint_every=0)
    cache = tmp_path / "cache"
    compile_to(recipe, tmp_path / "evil_run", host=Host())
    compile_to(plain, tmp_path / "plain_run", host=Host())
    run_program(tmp_path / "evil_run", cache)
    run_program(tmp_path / "plain_run", cache)
    assert not list(tmp_path.rglob("PWNED"))
    assert not Path("PWNED").exists()
    assert losses(tmp_path / "evil_run") == losses(tmp_path / "plain_run")
    src = (tmp_path / "evil_run" / "train.py").read_text()
    assert f"NAME = {evil_name!r}" in src


def test_malt_run_cli_refuses_existing_run_and_changed_recipe(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r", steps=3, eval_every=0, checkpoint_every=0)
    run_dir = tmp_path / "run"
    env = run_env(tmp_path / "cache")
    malt = [sys.executable, "-m", "malt.compiler.cli"]
    first = subprocess.run(malt + ["run", str(recipe), "--run-dir", str(run_dir)], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(malt + ["run", str(recipe), "--run-dir", str(run_dir)], env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    changed = subprocess.run(malt + ["run", str(recipe), "--run-dir", str(run_dir), "--resume", "--set", "optimizer.lr=1e-3"],
                             env=env, capture_output=True, text=True)
    assert changed.returncode == 2 and "recipe changed" in changed.stderr and "Traceback" not in changed.stderr
    # the run's files are untouched by the refused commands
    assert "lr: 0.003" in (run_dir / "recipe.lock.yaml").read_text()
    # resuming a finished run is a no-op that succeeds
    done = subprocess.run(malt + ["run", str(recipe), "--run-dir", str(run_dir), "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # how the run is watched is not what it trains: a resume may evaluate and log differently
    watched = subprocess.run(malt + ["run", str(recipe), "--run-dir", str(run_dir), "--resume", "--set", "train.eval_every=1",
                                     "--set", "train.log_every=1"], env=env, capture_output=True, text=True)
    assert watched.returncode == 0, watched.stderr


def test_bf16_autocast_program_trains(tmp_path):
    """precision: bf16 renders autocast (fp32 master weights) and trains on this CPU."""
    recipe = write_tiny_recipe(tmp_path / "r", steps=6, eval_every=6, checkpoint_every=0)
    run = tmp_path / "run"
    compile_to(recipe, run, sets=["target.precision=bf16"], host=Host())
    assert "torch.autocast(DEVICE, dtype=torch.bfloat16)" in (run / "train.py").read_text()
    run_program(run, tmp_path / "cache", "--quiet")
    got = losses(run)
    assert sorted(got) == list(range(1, 7)) and all(v == v for v in got.values())
    assert got[6] < got[1]


def test_resume_refuses_a_tokenizer_trained_again_on_changed_data(tmp_path):
    """A bpe tokenizer is trained on the data: data appended after the run started gives another tokenizer, whose ids
    the checkpoint's embeddings never saw. --resume stops with a clear message and keeps the run's tokenizer.json."""
    from .helpers import run_program

    recipe = write_tiny_recipe(tmp_path / "r", steps=4, eval_every=0, checkpoint_every=2)
    recipe.write_text(recipe.read_text().replace("tokenizer: {kind: bytes}", "tokenizer: {kind: bpe, vocab_size: 300}"))
    run = tmp_path / "run"
    compile_to(recipe, run, host=Host())
    run_program(run, tmp_path / "cache", "--quiet")
    before = (run / "tokenizer.json").read_bytes()
    with open(tmp_path / "r" / "corpus.jsonl", "a") as f:
        f.write("".join('{"text": "zebra quokka xylophone jazz fizz buzz %d"}\n' % i for i in range(300)))
    out = run_program(run, tmp_path / "cache", "--resume", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "differs from the one its checkpoints trained with" in out.stderr and "restore the data files" in out.stderr
    assert (run / "tokenizer.json").read_bytes() == before


def test_a_compiled_cpu_run_repeats_and_resumes_exactly_on_two_threads(tmp_path):
    """target.compile on a CPU: inductor's embedding backward adds into the gradient from its threads in no fixed
    order unless deterministic algorithms are on (the program turns them on), so two runs differed from step 2 and a
    resume could not match (found by a review: loss 1.8e-4 apart on tiny). Two threads, as on CI's two cores."""
    recipe = write_tiny_recipe(tmp_path / "r", steps=6, eval_every=3, checkpoint_every=3)
    cache = tmp_path / "cache"
    env = {**run_env(cache), "OMP_NUM_THREADS": "2"}
    runs = [tmp_path / name for name in ("a", "b", "resumed")]
    for run in runs:
        compile_to(recipe, run, sets=["target.compile=on", "train.sample_tokens=0", "train.log_every=1"], host=Host())
    assert "torch.use_deterministic_algorithms(True, warn_only=True)" in (runs[0] / "train.py").read_text()

    def train(run, *args):
        proc = subprocess.run([sys.executable, str(run / "train.py"), "--quiet", *args], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    for run in runs:
        train(run)
    # the third: back to its step-3 checkpoint, then resumed
    ck = runs[2] / "checkpoints"
    for old in ck.glob("step_00000006"):
        import shutil

        shutil.rmtree(old)
    (ck / "latest").write_text("step_00000003\n")
    lines = (runs[2] / "metrics.jsonl").read_text().splitlines()
    (runs[2] / "metrics.jsonl").write_text("\n".join(line for line in lines if json.loads(line)["step"] <= 3) + "\n")
    train(runs[2], "--resume")
    a, b, resumed = (losses(r) for r in runs)
    assert sorted(a) == list(range(1, 7))
    assert a == b == resumed
    assert val_losses(runs[0]) == val_losses(runs[1]) == val_losses(runs[2])
