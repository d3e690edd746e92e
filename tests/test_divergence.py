"""A run whose training diverges (a loss, gradient norm or weight that is nan or inf) stops with a message and exit
code 4, and never writes a checkpoint from weights that are not finite: the newest checkpoint stays the last good one,
where before the run trained on to its end, rotated its good checkpoints out for broken ones and crashed in the final
sample."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from malt.compiler.api import compile_to
from malt.compiler.plan import Host
from malt.runtime import checkpoint
from malt.runtime.run import DIVERGED, Diverged, Run

from .helpers import run_env, run_program, write_tiny_recipe

WILD = """\
phases:
  - {name: calm, share: 50%}
  - {name: wild, share: 50%, optimizer: {lr: 1.0e+30}, schedule: {warmup: 0, decay: constant}}
"""


def diverging_recipe(directory: Path) -> Path:
    """Twelve steps with checkpoints every 3: six good ones, then a learning rate of 1e30 wrecks the weights."""
    recipe = write_tiny_recipe(directory, steps=12, eval_every=0, checkpoint_every=3)
    recipe.write_text(recipe.read_text() + WILD)
    return recipe


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[-1]) for p in (run_dir / "checkpoints").glob("step_*"))


def _diverged_at(stderr: str) -> int:
    found = re.search(r"error: training diverged at step (\d+): ", stderr)
    assert found, stderr
    return int(found.group(1))


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    compile_to(diverging_recipe(tmp_path / "r"), run_dir, host=Host())
    proc = run_program(run_dir, cache, check=False)
    assert proc.returncode == DIVERGED, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    step = _diverged_at(proc.stderr)
    assert 7 <= step <= 9  # the first wild update lands at step 7; its effect shows at the next log or checkpoint
    assert "the newest checkpoint, step 6, is from before and is kept" in proc.stderr
    assert f"init_from: {{path: {run_dir}, optimizer: carry}}" in proc.stderr
    assert checkpoint_steps(run_dir) == [3, 6]
    assert checkpoint.latest(run_dir)[0] == 6
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]  # the step that showed it is recorded, with its value named in not_finite (strict JSON: null)
    assert last["step"] == step and last["not_finite"]
    assert all(last[k] is None and v in ("nan", "inf", "-inf") for k, v in last["not_finite"].items())
    assert set(last["not_finite"]) <= {"loss", "grad_norm"}
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records[:-1])
    assert "sample (" not in proc.stdout  # the end of the program (final sample) is not reached


def test_no_checkpoint_is_written_from_weights_that_are_not_finite(tmp_path):
    run = Run(tmp_path / "run", "t", "hash", resume=False, quiet=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    checkpoint.save(run, 1, model, optimizer)
    with torch.no_grad():
        model[1].bias[0] = float("inf")
        model[0].weight[2, 3] = float("nan")
    with pytest.raises(Diverged) as info:
        checkpoint.save(run, 2, model, optimizer)
    assert info.value.exit_code == DIVERGED
    assert info.value.message == ("training diverged at step 2: 2 of the model's 4 weight tensors hold nan or inf "
                                  "(0.weight, 1.bias), so this step's checkpoint was not written; the newest "
                                  "checkpoint, step 1, is from before and is kept (its weights and optimizer state are finite; "
                                  "metrics.jsonl shows where the loss rose)")
    assert checkpoint_steps(run.dir) == [1] and checkpoint.latest(run.dir)[0] == 1
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["latest", "step_00000001"]


def test_no_checkpoint_is_written_from_optimizer_state_that_is_not_finite(tmp_path):
    """Without gradient clipping a gradient of 1e21 squares to inf in exp_avg_sq: the update of that tensor is
    0 from then on, the weights stay finite, and the tensor silently never trains again. The save stops there."""
    run = Run(tmp_path / "run", "t", "hash", resume=False, quiet=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    checkpoint.save(run, 1, model, optimizer)
    model.zero_grad()
    (model(torch.ones(1, 4)).sum() * 1e22).backward()
    optimizer.step()
    weight = model[0].weight
    assert torch.isfinite(weight).all() and not torch.isfinite(optimizer.state[weight]["exp_avg_sq"]).all()
    with pytest.raises(Diverged) as info:
        checkpoint.save(run, 2, model, optimizer)
    assert info.value.message.startswith("training diverged at step 2: ")
    assert "of the optimizer's 8 state tensors hold nan or inf (0.weight::exp_avg_sq" in info.value.message
    assert "weight tensors" not in info.value.message  # the weights themselves are finite
    assert checkpoint_steps(run.dir) == [1]


def test_a_validation_loss_that_is_not_finite_stops_the_run(tmp_path):
    (tmp_path / "run").mkdir()
    run = Run(tmp_path / "run", "t", "hash", resume=False, quiet=True)
    run.begin(0, 10, 8)
    run.log_eval(5, val_loss=2.0, **{"val_loss/web_text": 2.5})
    with pytest.raises(Diverged, match=r"at step 10: the validation loss of web_text is inf; no checkpoint had been "):
        run.log_eval(10, val_loss=3.0, **{"val_loss/web_text": float("inf")})
    with pytest.raises(Diverged, match=r"at step 10: the loss is nan and the gradient norm is inf;"):
        run.log_step(10, loss=float("nan"), lr=1e-3, grad_norm=torch.tensor(float("inf")))
    run.log_step(10, loss=2.0, lr=1e-3, grad_norm=None)  # no gradient clipping: no norm to check
    lines = (run.dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # what stopped the run is on record, as strict JSON (no NaN or Infinity literals)
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}")) for line in lines]
    assert records[1]["val_loss/web_text"] is None and records[1]["not_finite"] == {"val_loss/web_text": "inf"}
    assert records[2]["loss"] is None and records[2]["grad_norm"] is None
    assert records[2]["not_finite"] == {"loss": "nan", "grad_norm": "inf"}
    assert "not_finite" not in records[0] and "not_finite" not in records[3]


@pytest.mark.slow
def test_every_process_of_a_sharded_run_stops_together(tmp_path):
    """FSDP2 on two processes: the weights are DTensor shards, checked on each process and summed over both; both
    stop at the same step, through the launcher, with one message and the run's exit code."""
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    compile_to(diverging_recipe(tmp_path / "r"), run_dir,
               sets=["target.devices=2", "target.parallelism=fsdp", "train.log_every=4"], host=Host())
    cmd = [sys.executable, "-m", "malt.runtime.launch", "--standalone", "--nproc_per_node", "2",
           str(run_dir / "train.py"), "--quiet"]  # as launch.sh and `malt run` start it
    proc = subprocess.run(cmd, env=run_env(cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == DIVERGED, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("training diverged") == 1, proc.stderr  # the first process speaks for both
    assert "[process 1]" not in proc.stderr
    assert "launch: process 0 of the run ended with exit code 4" in proc.stderr
    # log_every 4: the checkpoint at step 9, between the logs at 8 and 12, is the first check after step 7's update
    # unless the loss at step 8 already shows it
    assert _diverged_at(proc.stderr) in (8, 9)
    assert checkpoint_steps(run_dir) == [3, 6]


def test_the_finiteness_check_keeps_a_place_for_empty_shards(tmp_path):
    """FSDP2 on many processes leaves some of them an empty shard of a small tensor: it holds nothing to check,
    but keeps its place among the flags, so every process all-reduces as many; the names stay right around it."""
    run = Run(tmp_path / "run", "t", "hash", resume=False, quiet=True)
    bad = torch.ones(3)
    bad[1] = float("nan")
    named = [("a", torch.ones(2)), ("empty", torch.empty(0)), ("b", bad), ("c", torch.full((2,), float("-inf")))]
    with pytest.raises(Diverged, match=r"2 of the model's 4 weight tensors hold nan or inf \(b, c\)"):
        checkpoint.stop_if_not_finite(run, 5, named)
    checkpoint.stop_if_not_finite(run, 5, [("empty", torch.empty(0)), ("a", torch.ones(2))])  # all finite: no error


SLOW_WRITES = '''\
import os, time
import safetensors.torch as st
_save = st.save_file
def _slow(tensors, filename, *args, **kwargs):
    if os.path.basename(filename) == "model.safetensors" and ".tmp-step_00000006" in filename:
        time.sleep(3)  # the last finite checkpoint is still being written when the run diverges
    return _save(tensors, filename, *args, **kwargs)
st.save_file = _slow
'''


def test_a_ddp_run_that_diverges_lands_the_checkpoint_being_written_first(tmp_path):
    """Two DDP processes, checkpoints written in the background: the run diverges while step 6's checkpoint is being
    written. The second process waits for the first (a barrier in Run.diverged) instead of ending at once, which had
    the launcher stop the first one mid-write: the checkpoint was lost and nobody said why (found by a review)."""
    run_dir, cache, inject = tmp_path / "run", tmp_path / "cache", tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SLOW_WRITES)
    plan = compile_to(diverging_recipe(tmp_path / "r"), run_dir,
                      sets=["target.devices=2", "target.parallelism=ddp", "train.log_every=1"], host=Host())
    assert plan.checkpoint_writes == "background"
    cmd = [sys.executable, "-m", "malt.runtime.launch", "--standalone", "--nproc_per_node", "2",
           str(run_dir / "train.py"), "--quiet"]
    env = {**run_env(cache), "PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == DIVERGED, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("training diverged") == 1, proc.stderr
    assert "waiting for the checkpoint of step 6 to be written" in proc.stderr
    assert "the newest checkpoint, step 6, is from before and is kept" in proc.stderr
    assert checkpoint_steps(run_dir) == [3, 6] and checkpoint.latest(run_dir)[0] == 6
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
