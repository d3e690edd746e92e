"""target.precision pure_bf16: bf16 weights, gradients and AdamW moments, no fp32 master copy."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from malt.compiler.api import check, compile_to, plan
from malt.compiler.diagnostics import RecipeError
from malt.compiler.plan import Host

from .helpers import run_program, write_tiny_recipe


def _metrics(run_dir, key):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r}


def test_pure_bf16_plan_counts_half_the_state(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r")
    mixed, _ = plan(recipe, ["target.precision=bf16"], host=Host())
    pure, _ = plan(recipe, ["target.precision=pure_bf16"], host=Host())
    n = pure.estimates["params"]
    assert pure.precision == "bf16" and pure.master_weights == "bf16" and mixed.master_weights == "fp32"
    m, p = mixed.estimates["memory_per_device_bytes"], pure.estimates["memory_per_device_bytes"]
    assert (p["weights"], p["gradients"], p["optimizer"]) == (2 * n, 2 * n, 4 * n)
    assert (m["weights"], m["gradients"], m["optimizer"]) == (6 * n, 4 * n, 8 * n)   # fp32 master + autocast copy
    assert p["activations"] == m["activations"]                                      # both compute in bf16
    assert pure.to_json()["execution"]["master_weights"] == "bf16"
    assert any(d.name == "precision" and d.value == "pure_bf16" for d in pure.decisions)


@pytest.mark.parametrize("sets, path", [
    (["target.accelerator=tpu"], "target.precision"),
    (["model.family=bert"], "target.precision"),
])
def test_pure_bf16_rejected_where_not_built(tmp_path, sets, path):
    recipe = write_tiny_recipe(tmp_path / "r")
    with pytest.raises(RecipeError) as info:
        check(recipe, ["target.precision=pure_bf16", *sets])
    msgs = [d for d in info.value.diagnostics if d.path == path]
    assert msgs and "pure_bf16" in msgs[0].message and msgs[0].hint


@pytest.mark.slow
def test_pure_bf16_trains_saves_bf16_and_resumes_exactly(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r", steps=8, eval_every=4, checkpoint_every=4)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    for d in (full, resumed):
        compile_to(recipe, d, sets=["target.precision=pure_bf16"], host=Host())
    text = (full / "train.py").read_text()
    assert "model = model.to(torch.bfloat16)" in text and "torch.autocast" not in text
    run_program(full, tmp_path / "cache", "--quiet")
    loss = _metrics(full, "loss")
    assert sorted(loss) == list(range(1, 9)) and loss[8] < loss[1]
    with safe_open(str(full / "checkpoints" / "step_00000008" / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    with safe_open(str(full / "checkpoints" / "step_00000008" / "optimizer.safetensors"), "pt") as f:
        moments = [f.get_tensor(k) for k in f.keys() if k.endswith(("exp_avg", "exp_avg_sq"))]
        assert moments and {str(t.dtype) for t in moments} == {"torch.bfloat16"}
    # stop after step 4 (the checkpoint the full run also wrote), then resume
    import shutil
    shutil.copytree(full / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000004\n")
    run_program(resumed, tmp_path / "cache", "--quiet", "--resume")
    assert {s: v for s, v in _metrics(resumed, "loss").items() if s > 4} == {s: v for s, v in loss.items() if s > 4}
    assert _metrics(resumed, "val_loss")[8] == _metrics(full, "val_loss")[8]


@pytest.mark.slow
def test_pure_bf16_under_fsdp_follows_one_process(tmp_path):
    """FSDP2 shards the bf16 weights as they are (no mixed-precision policy): 2 gloo processes follow 1."""
    from .test_distributed import torchrun

    recipe = write_tiny_recipe(tmp_path / "r", steps=6, eval_every=0, checkpoint_every=0)
    one, two = tmp_path / "one", tmp_path / "two"
    compile_to(recipe, one, sets=["target.precision=pure_bf16"], host=Host())
    compile_to(recipe, two, sets=["target.precision=pure_bf16", "target.devices=2", "target.parallelism=fsdp"], host=Host())
    run_program(one, tmp_path / "cache", "--quiet")
    torchrun(two, tmp_path / "cache")
    ref, got = _metrics(one, "loss"), _metrics(two, "loss")
    assert sorted(got) == sorted(ref) == list(range(1, 7)) and got[6] < got[1]
    for step in ref:   # bf16 sums in another order: agreement to bf16's resolution, not bitwise
        assert got[step] == pytest.approx(ref[step], rel=2e-2), step
