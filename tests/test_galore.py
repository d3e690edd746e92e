"""optimizer.kind galore: AdamW on low-rank projected gradients (Zhao et al. 2024), from recipe to resumed run."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from malt.compiler.api import check, compile_to, plan
from malt.compiler.diagnostics import RecipeError
from malt.compiler.plan import Host
from malt.runtime.galore import GaLoreAdamW

from .helpers import run_program, write_tiny_recipe
from .test_run import losses, val_losses


def test_without_a_rank_it_is_torch_adamw():
    torch.manual_seed(0)
    ours = [torch.randn(6, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a = GaLoreAdamW([{"params": ours, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    b = torch.optim.AdamW([{"params": theirs, "weight_decay": 0.1}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(5):
        g = [torch.randn_like(p) for p in ours]
        for p, q, gi in zip(ours, theirs, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, atol=1e-7, rtol=1e-6)


def _reference(w, grads, rank, every, scale, lr, betas, eps, wd):
    """The paper's Algorithm 1 with AdamW's decoupled weight decay, in float64 numpy, independent of the optimizer
    (an SVD where the optimizer takes the Gram matrix's eigenvectors; the same sign convention)."""
    w = w.astype(np.float64).copy()
    m_, v_, proj = None, None, None
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64)
        right = g.shape[0] >= g.shape[1]
        if (t - 1) % every == 0:  # the top singular vectors (numpy's SVD), each with its largest entry positive
            u, _, vh = np.linalg.svd(g, full_matrices=False)
            proj = vh[:rank].T if right else u[:, :rank]
            proj = proj * np.sign(proj[np.abs(proj).argmax(axis=0), np.arange(proj.shape[1])])
        r = g @ proj if right else proj.T @ g
        if m_ is None:
            m_, v_ = np.zeros_like(r), np.zeros_like(r)
        m_ = betas[0] * m_ + (1 - betas[0]) * r
        v_ = betas[1] * v_ + (1 - betas[1]) * r * r
        n = (m_ / (1 - betas[0] ** t)) / (np.sqrt(v_ / (1 - betas[1] ** t)) + eps)
        back = (n @ proj.T if right else proj @ n) * scale
        w = w * (1 - lr * wd) - lr * back
    return w


@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])   # tall: project on the right; wide: on the left
def test_low_rank_step_follows_the_papers_algorithm(shape):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(shape)
    # gradients with a dominant rank-2 part, so the top singular vectors are well separated (SVD signs aside)
    base = rng.standard_normal((shape[0], 2)) @ rng.standard_normal((2, shape[1])) * 3
    grads = [base + 0.1 * rng.standard_normal(shape) for _ in range(7)]
    p = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    opt = GaLoreAdamW([{"params": [p], "rank": 3, "update_every": 3, "scale": 0.25, "weight_decay": 0.1}],
                      lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    want = _reference(w0, grads, 3, 3, 0.25, 1e-2, (0.9, 0.95), 1e-8, 0.1)
    np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-9, atol=1e-12)
    st = opt.state[p]
    r_shape = (shape[0], 3) if shape[0] >= shape[1] else (3, shape[1])
    assert tuple(st["exp_avg"].shape) == r_shape and tuple(st["exp_avg_sq"].shape) == r_shape


def test_recipe_checks_and_plan(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r")
    with pytest.raises(RecipeError) as info:
        check(recipe, ["optimizer.rank=8"])
    assert any(d.path == "optimizer.rank" and "only by optimizer.kind galore" in d.message for d in info.value.diagnostics)
    with pytest.raises(RecipeError) as info:
        check(recipe, ["optimizer.kind=galore", "target.devices=2", "target.parallelism=fsdp"])
    assert any(d.path == "optimizer.kind" and "fsdp" in d.message for d in info.value.diagnostics)
    p, _ = plan(recipe, ["optimizer.kind=galore", "target.devices=2", "target.parallelism=auto"], host=Host())
    assert p.parallelism == "ddp" and p.galore == {"rank": 16, "update_every": 200, "scale": 0.25}   # d_model 64 / 4


@pytest.mark.slow
def test_galore_trains_its_state_is_what_the_plan_counts_and_it_resumes_exactly(tmp_path):
    recipe = write_tiny_recipe(tmp_path / "r", steps=8, eval_every=4, checkpoint_every=4)
    sets = ["optimizer.kind=galore", "optimizer.rank=8", "optimizer.update_every=3", "optimizer.weight_decay=0.1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    p = compile_to(recipe, full, sets=sets, host=Host())
    compile_to(recipe, resumed, sets=sets, host=Host())
    run_program(full, tmp_path / "cache", "--quiet")
    ref = losses(full)
    assert sorted(ref) == list(range(1, 9)) and ref[8] < ref[1]
    # the optimizer state in the checkpoint is the plan's estimate (fp32: 4 bytes an element)
    from safetensors import safe_open

    with safe_open(str(full / "checkpoints" / "step_00000008" / "optimizer.safetensors"), "pt") as f:
        elements = sum(f.get_tensor(k).numel() for k in f.keys() if not k.endswith("::step"))
        projectors = [k for k in f.keys() if k.endswith("::projector")]
    assert elements * 4 == p.estimates["memory_per_device_bytes"]["optimizer"]
    assert len(projectors) == 2 * 7   # 2 layers × q, k, v, o, gate, up, down
    # resume after step 4: the projector of step 3 and the moments continue; a new one is drawn at step 6
    shutil.copytree(full / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000004\n")
    run_program(resumed, tmp_path / "cache", "--quiet", "--resume")
    assert losses(resumed) == {s: v for s, v in ref.items() if s > 4}
    assert val_losses(resumed)[8] == val_losses(full)[8]


@pytest.mark.slow
def test_galore_on_two_ddp_processes_follows_one(tmp_path):
    """DDP averages whole gradients before the step, so every process projects the same gradient as one process."""
    from .test_distributed import torchrun

    recipe = write_tiny_recipe(tmp_path / "r", steps=6, eval_every=0, checkpoint_every=0)
    sets = ["optimizer.kind=galore", "optimizer.rank=8", "optimizer.update_every=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    compile_to(recipe, one, sets=sets, host=Host())
    p = compile_to(recipe, two, sets=sets + ["target.devices=2"], host=Host())
    assert p.parallelism == "ddp"
    run_program(one, tmp_path / "cache", "--quiet")
    torchrun(two, tmp_path / "cache")
    ref, got = losses(one), losses(two)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), step


@pytest.mark.parametrize("shape", [(512, 192), (192, 512)])
def test_fp32_projector_spans_the_top_singular_subspace(shape):
    """The projector comes from the Gram matrix's eigenvectors: in fp32, on a gradient whose spectrum decays over
    two decades, it spans the SVD's top-rank subspace and has the fixed signs."""
    g = torch.Generator().manual_seed(0)
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=g, dtype=torch.float64))[0]
    grad = ((u * torch.logspace(0, -2, k, dtype=torch.float64)) @ v.t()).float()
    proj = GaLoreAdamW([torch.zeros(1)], lr=1e-3)._projector(grad, 32)
    want = (v if shape[0] >= shape[1] else u)[:, :32]
    assert proj.shape == want.shape and proj.dtype == torch.float32
    gap = (proj.double() @ proj.double().t() - want @ want.t()).abs().max().item()
    assert gap < 1e-4, gap
    assert (proj.gather(0, proj.abs().argmax(dim=0, keepdim=True)) > 0).all()
