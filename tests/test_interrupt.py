"""A training that is stopped (Ctrl-C, SIGTERM from a scheduler or `kill`, SIGHUP) says so, leaves only complete
checkpoints, and resumes; one run directory has one training at a time; `malt run` takes its program down with it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from malt.compiler.api import compile_to
from malt.compiler.plan import Host
from malt.runtime.run import RunError, hold_lock, lock_holder

from .helpers import run_env, run_program, write_tiny_recipe


def test_the_run_directory_lock_admits_one_training(tmp_path):
    held = hold_lock(tmp_path / "run")
    assert lock_holder(tmp_path / "run") == os.getpid()
    with pytest.raises(RunError, match="is in use: another training"):
        hold_lock(tmp_path / "run")
    held.close()                                               # the process ends: the lock goes with it
    assert lock_holder(tmp_path / "run") is None
    hold_lock(tmp_path / "run").close()


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text().splitlines() if '"loss"' in line) if path.exists() else 0


def _start(run_dir: Path, cache: Path, *args: str) -> subprocess.Popen:
    # SIGINT as from a terminal: a suite started in the background (`pytest &`) has it ignored, which the program
    # then respects (as under nohup)
    return subprocess.Popen([sys.executable, str(run_dir / "train.py"), *args], env=run_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(cond, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_training_says_so_and_resumes(tmp_path, sig):
    recipe = write_tiny_recipe(tmp_path / "r", steps=20_000, eval_every=0, checkpoint_every=5)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    compile_to(recipe, run_dir, host=Host())
    proc = _start(run_dir, cache)
    _wait_for(lambda: _steps_logged(run_dir) >= 12 or proc.poll() is not None)

    second = run_program(run_dir, cache, "--resume", check=False)     # meanwhile: the directory is taken
    assert second.returncode == 2 and f"is in use: another training (pid {proc.pid})" in second.stderr

    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    name = "interrupted" if sig == signal.SIGINT else "stopped by SIGTERM"
    assert proc.returncode == 128 + sig, err
    assert (f"{sig.name}: finishing this step and saving it before stopping ({sig.name} again, a second or more later, "
            "stops at once)") in err
    saved = re.search(rf"{name} at step (\d+): saved; continue with --resume", err)
    assert saved and "Traceback" not in err, err
    left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert all(n.startswith("step_") or n == "latest" for n in left), left    # nothing half-written
    step = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert step == int(saved.group(1)) == _steps_logged(run_dir) >= 12         # the step it was in: nothing trained is lost
    assert lock_holder(run_dir) is None

    resumed = _start(run_dir, cache, "--resume", "--quiet")
    _wait_for(lambda: _steps_logged(run_dir) >= step + 3 or resumed.poll() is not None)
    resumed.send_signal(signal.SIGTERM)
    resumed.communicate(timeout=120)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # resumed after `step`, no gap, no repeat


@pytest.mark.slow
@pytest.mark.parametrize("devices, sig", [(1, signal.SIGTERM), (2, signal.SIGTERM), (1, signal.SIGINT)])
def test_malt_run_stops_its_program_when_it_is_stopped(tmp_path, devices, sig):
    """Also with torchrun's processes (malt.runtime.launch): one message, the signal's exit code, no traceback.
    SIGINT sent to malt alone (a supervisor, `kill -INT`) reaches the program too: it used to be swallowed."""
    recipe = write_tiny_recipe(tmp_path / "r", steps=20_000, eval_every=0, checkpoint_every=5)
    script = Path(sys.executable).with_name("malt")
    malt = [str(script)] if script.exists() else [sys.executable, "-m", "malt.compiler.cli"]
    run_dir = tmp_path / "run"
    # two processes log (and so agree on a stop) every 4 steps
    sets = ["--set", "target.devices=2", "--set", "target.parallelism=ddp", "--set", "train.log_every=4"] if devices == 2 else []
    proc = subprocess.Popen(malt + ["run", str(recipe), "--run-dir", str(run_dir), *sets], env=run_env(tmp_path / "cache"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    _wait_for(lambda: _steps_logged(run_dir) >= 3 or proc.poll() is not None)
    again = subprocess.run(malt + ["run", str(recipe), "--run-dir", str(run_dir), "--resume", *sets], env=run_env(tmp_path / "cache"),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "is in use: another training" in again.stderr
    proc.send_signal(sig)                                      # only malt's own process, as `kill PID` does
    out, err = proc.communicate(timeout=120)
    said = "interrupted" if sig == signal.SIGINT else "stopped by SIGTERM"
    assert proc.returncode == 128 + sig and err.count(said) == 1 and "Traceback" not in err, err
    assert lock_holder(run_dir) is None                        # its train.py is gone too
    n = _steps_logged(run_dir)
    time.sleep(1.0)
    assert _steps_logged(run_dir) == n
    step = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert f"{said} at step {step}: saved" in err               # the step it stopped at is saved ...
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step  # ... and was the last logged
    assert step % (4 if devices == 2 else 1) == 0


@pytest.mark.slow
def test_malt_run_says_when_its_program_was_killed(tmp_path):
    """SIGKILL (the out-of-memory killer, a scheduler) ends the program with no word of its own: malt says what ended
    it and exits 128 + 9, as a shell would (it exited 247, Popen's -9, in silence)."""
    recipe = write_tiny_recipe(tmp_path / "r", steps=20_000, eval_every=0, checkpoint_every=5)
    script = Path(sys.executable).with_name("malt")
    malt = [str(script)] if script.exists() else [sys.executable, "-m", "malt.compiler.cli"]
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(malt + ["run", str(recipe), "--run-dir", str(run_dir)], env=run_env(tmp_path / "cache"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _steps_logged(run_dir) >= 2 or proc.poll() is not None)
    holder = lock_holder(run_dir)
    assert holder, "the program did not start (or its pid is unknown)"
    os.kill(holder, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGKILL and "Traceback" not in err, err
    assert "error: the training program was ended by SIGKILL (the kernel's out-of-memory killer" in err
    assert "continue with --resume" in err


def test_a_second_signal_stops_at_once(monkeypatch, tmp_path):
    """During training the first signal lets the step finish and be saved; a second one stops at once."""
    from malt.runtime import run as run_module

    monkeypatch.setattr(run_module, "_STOP", run_module._Stop())
    (tmp_path / "run").mkdir()
    run = run_module.Run(tmp_path / "run", "t", "h", resume=False, quiet=True)
    with pytest.raises(run_module.Terminated):                  # before training: at once
        run_module._terminate(signal.SIGTERM, None)
    run.begin(0, 10, 8)
    assert not run.stop_requested()
    run_module._terminate(signal.SIGTERM, None)                 # noted: the step goes on
    assert run.stop_requested()
    run_module._terminate(signal.SIGTERM, None)                 # the same stop delivered twice (torchrun, Slurm): noted once
    run_module._STOP.at -= run_module.REPEAT_WINDOW             # a second stop, later
    with pytest.raises(run_module.Terminated) as again:
        run_module._terminate(signal.SIGINT, None)
    assert again.value.signum == signal.SIGINT and again.value.saved is None
    with pytest.raises(run_module.Terminated) as stopped:
        run.stop(3)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.saved == 3 and not stopped.value.complete
    with pytest.raises(run_module.Terminated) as last:
        run.stop(10)
    assert last.value.complete  # the step saved was the last: the message says the run is complete


def test_a_signal_during_the_processes_agreement_is_kept(monkeypatch, tmp_path):
    """Several processes agree on a stop with an all-reduce at logged steps; a signal that lands after this process
    gave its 0 is not lost: it is noted, and the next logged step stops (it used to be overwritten by the result)."""
    from malt.runtime import distributed
    from malt.runtime import run as run_module

    monkeypatch.setattr(run_module, "_STOP", run_module._Stop())
    (tmp_path / "run").mkdir()
    run = run_module.Run(tmp_path / "run", "t", "h", resume=False, quiet=True, world=2)
    run.begin(0, 10, 8)

    def largest(value):  # the others had no signal either; this one's arrives as the all-reduce returns
        run_module._terminate(signal.SIGTERM, None)
        return value

    monkeypatch.setattr(distributed, "largest", largest)
    assert not run.stop_requested(agree=False)
    assert not run.stop_requested(agree=True)   # this step's agreement was 0 ...
    monkeypatch.setattr(distributed, "largest", lambda value: value)
    assert run.stop_requested(agree=True)       # ... and the next logged step stops


def test_a_checkpoint_that_cannot_be_written_is_removed_and_explained(tmp_path):
    from malt.runtime.checkpoint import _unfinished

    tmp = tmp_path / "checkpoints" / ".tmp-step_00000020-1"
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"half")
    with pytest.raises(RunError, match="cannot write the checkpoint of step 20 .*No space left on device") as info:
        with _unfinished(tmp, 20):
            raise OSError(28, "No space left on device")
    assert "free disk space" in info.value.hint and not tmp.exists()
    tmp.mkdir()
    with pytest.raises(KeyboardInterrupt), _unfinished(tmp, 20):  # interrupted: removed, and the interrupt goes on
        raise KeyboardInterrupt
    assert not tmp.exists()


def test_a_new_training_removes_what_killed_ones_left_half_written(tmp_path):
    from malt.runtime.run import start_run

    ck = tmp_path / "run" / "checkpoints"
    for name in (".tmp-step_00000030-11123", ".old-step_00000010-5", ".tmp-step_00000030-sharded"):
        (ck / name).mkdir(parents=True)
    run = start_run(tmp_path / "run", "t", "hash", argv=[])
    assert not list(ck.iterdir()) and lock_holder(tmp_path / "run") == os.getpid()
    run._lock.close()


@pytest.mark.parametrize("text, says", [("1", "lacks all"), ('{"format": 2, "step": 3, "recipe_hash": "h"}', "lacks optimizer"),
                                         ("{not json", "is corrupt")])
def test_a_corrupt_state_json_is_a_clear_error(tmp_path, text, says):
    from malt.runtime.checkpoint import is_sharded, read_state

    (tmp_path / "state.json").write_text(text)
    with pytest.raises(RunError, match=says):
        read_state(tmp_path)
    assert is_sharded(tmp_path) is False


@pytest.mark.slow
def test_an_error_in_torchruns_processes_ends_with_its_message_and_code(tmp_path):
    """launch.sh (malt.runtime.launch): a user error in every process is its message (once per process, the others
    say which they are) and exit code 2, not torchrun's traceback and exit code 1."""
    recipe = write_tiny_recipe(tmp_path / "r", steps=4, eval_every=0, checkpoint_every=4)
    run_dir = tmp_path / "run"
    compile_to(recipe, run_dir, sets=["target.devices=2", "target.parallelism=ddp"], host=Host())
    env = {**run_env(tmp_path / "cache"), "PYTHON": sys.executable}
    first = subprocess.run([str(run_dir / "launch.sh"), "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir / "checkpoints" / "step_00000004" / "state.json").write_text("{")
    again = subprocess.run([str(run_dir / "launch.sh"), "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert "error: checkpoint" in again.stderr and "[process 1] error: checkpoint" in again.stderr
    assert re.search(r"launch: process [01] of the run ended with exit code 2;", again.stderr)  # either may fail first


def test_a_process_whose_peer_ended_says_so_and_is_not_named_the_cause(monkeypatch, capsys):
    """When one process of a multi-process run ends, the others' collectives fail ('Connection closed by peer'):
    they say so in one line and exit PEER_LOST, and the launcher names the process that ended first for a reason
    of its own (it named the victim: process 0, exit 134)."""
    from types import SimpleNamespace

    from malt.runtime.launch import cause
    from malt.runtime.run import PEER_LOST, entry

    from malt.runtime import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    def leave(code):  # a process of several ends with os._exit (test_a_process_of_several_exits_with_its_code)
        raise SystemExit(code)
    monkeypatch.setattr(run, "_leave", leave)

    def main():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    with pytest.raises(SystemExit) as info:
        entry(main)
    assert info.value.code == PEER_LOST and "stopped: another process of the run ended" in capsys.readouterr().err

    def failure(code, t):
        return SimpleNamespace(exitcode=code, timestamp=t)
    # process 1 was killed from outside (SIGTERM, silent); process 0 lost its peer a second later
    assert cause({0: failure(PEER_LOST, 11), 1: failure(-signal.SIGTERM, 10)}) == (1, 143)
    # process 1 failed (a disk error, exit 2); torchrun then stopped process 0 with SIGTERM
    assert cause({0: failure(-signal.SIGTERM, 10), 1: failure(2, 10)}) == (1, 2)
    # every process stopped by a signal (SIGTERM to the launcher): the first
    assert cause({0: failure(-signal.SIGTERM, 10), 1: failure(-signal.SIGTERM, 10)}) == (0, 143)


@pytest.mark.parametrize("ending, code, err", [("return", 0, ""), ("raise RunError('no room', 'free some')", 2, "[process 1] error: no room"),
                                               ("raise SystemExit(5)", 5, ""), ("raise SystemExit('bye')", 1, "bye"),
                                               ("raise ValueError('a bug')", 1, "ValueError: a bug")])
def test_a_process_of_several_exits_with_its_code(tmp_path, ending, code, err):
    """A process of a multi-process run skips the interpreter's shutdown (gloo's worker threads can abort it under
    torch 2.13: pytorch/pytorch#190489): its exit code and everything it printed, buffered or not, still come out."""
    script = tmp_path / "prog.py"
    script.write_text(
        "import sys\n"
        "from malt.runtime.run import RunError, entry\n"
        "def main():\n"
        "    sys.stdout.write('trained')  # no newline, no flush: still in the buffer at the end\n"
        f"    {ending}\n"
        "entry(main)\n")
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1"}
    env.pop("PYTHONUNBUFFERED", None)  # a buffered stdout, as under torchrun
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "trained"
    assert err in proc.stderr and ("Traceback" in proc.stderr) == (code == 1 and "bug" in err)


def test_the_launcher_names_a_process_killed_by_sigkill(monkeypatch, capsys, tmp_path):
    """A process of a multi-process run killed by the out-of-memory killer says nothing itself: the launcher names
    the signal (it said 'exit code 137; its messages are above', and there were none)."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from malt.runtime import launch

    def killed(args):
        raise ChildFailedError("train.py", {0: ProcessFailure(0, 4242, -signal.SIGKILL, str(tmp_path / "none.json"))})

    monkeypatch.setattr(torchrun, "run", killed)
    assert launch.main(["--nproc_per_node", "2", "train.py"]) == 128 + signal.SIGKILL
    err = capsys.readouterr().err
    assert "launch: process 0 of the run was ended by SIGKILL (the kernel's out-of-memory killer" in err


def test_a_run_started_under_nohup_keeps_ignoring_sighup(tmp_path):
    """nohup ignores SIGHUP so that a closed terminal does not stop the run: the program's stop handlers and malt
    run's forwarding left it ignored only for SIGINT; SIGHUP then stopped the run."""
    code = ("import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
            "from malt.runtime.run import _on_stop_signals\n"
            "_on_stop_signals(lambda *a: None); _on_stop_signals(signal.SIG_DFL)\n"
            "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr
