"""The generated model's training loss, `model(tokens, targets)`: chunked, with gradients computed in
the forward pass (ChunkedCrossEntropy in model.py). It must equal F.cross_entropy on the whole
logits, in value and in every parameter's gradient, including under gradient accumulation's
scaling; without gradients (evaluation) it takes the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from malt.compiler.api import compile_to


@pytest.mark.parametrize("overrides", [
    # tied embeddings, bytes vocabulary 257 padded to 320; 4 × 32 = 128 positions = chunks of 100 and 28
    {"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "tie_embeddings": True}},
    # untied head, grouped-query attention
    {"model": {"d_model": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "d_ff": 96, "tie_embeddings": False}},
])
def test_chunked_loss_equals_full_cross_entropy(make_recipe, load_model_module, host, tmp_path, overrides):
    compile_to(make_recipe(overrides), tmp_path / "build", host=host)
    module = load_model_module(tmp_path / "build")
    module.LOSS_CHUNK = 100                      # several chunks, the last one partial
    torch.manual_seed(0)
    a, b = module.Transformer(), module.Transformer()
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 257, (4, 32), generator=g)
    y = torch.randint(0, 257, (4, 32), generator=g)

    logits = a(x)
    full = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
    (full * 0.5).backward()                      # as with GRAD_ACCUM 2
    chunked = b(x, y)
    (chunked * 0.5).backward()
    assert chunked.dtype == torch.float32 and chunked.shape == ()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-7, msg=name)

    with torch.no_grad():                        # evaluation: the plain path, same value
        torch.testing.assert_close(b(x, y), full.detach(), rtol=1e-5, atol=1e-6)

    with torch.autocast("cpu", dtype=torch.bfloat16):   # bf16 autocast: close to the unchunked bf16 loss
        ref_logits = a(x).float()
        ref = F.cross_entropy(ref_logits.view(-1, ref_logits.size(-1)), y.view(-1))
        got = b(x, y)
    assert abs(got.item() - ref.item()) < 2e-2


def _masked_recipe(make_recipe, tmp_path, overrides=None):
    """A recipe whose model gets the masked loss: its source has metadata prefixes (targets -100 there)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "data.jsonl").write_text("".join(f'{{"url": "https://example.com/{i}", "text": "document {i}"}}\n'
                                                 for i in range(50)))
    return make_recipe({"data": {"sources": [{"name": "web", "path": "data.jsonl", "metadata": "URL: {domain}\n\n"}]},
                        **(overrides or {})}, directory=tmp_path)


@pytest.mark.parametrize("untied", [False, True])
def test_chunked_loss_with_ignored_targets_equals_cross_entropy_ignore_index(make_recipe, load_model_module, host, tmp_path,
                                                                            untied):
    """Targets of -100 carry no loss: value and gradients equal F.cross_entropy(ignore_index=-100), the mean over
    the counted positions, in the chunked (training), the plain (no gradients) and the all-ignored cases."""
    over = {"model": {"d_model": 64, "n_layers": 1, "n_heads": 4, "d_ff": 96, "tie_embeddings": not untied}}
    compile_to(_masked_recipe(make_recipe, tmp_path, over), tmp_path / "build", host=host)
    module = load_model_module(tmp_path / "build")
    assert module.IGNORE == -100 and "ignore_index=IGNORE" in (tmp_path / "build" / "model.py").read_text()
    module.LOSS_CHUNK = 100
    torch.manual_seed(0)
    a, b = module.Transformer(), module.Transformer()
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 257, (4, 32), generator=g)
    y = torch.randint(0, 257, (4, 32), generator=g)
    y[torch.rand(4, 32, generator=g) < 0.4] = -100            # 40% of the positions without loss
    y[1] = -100                                                # a whole row, and whole chunks, without loss

    logits = a(x)
    full = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-100)
    (full * 0.5).backward()
    chunked = b(x, y)
    (chunked * 0.5).backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-7, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(b(x, y), full.detach(), rtol=1e-5, atol=1e-6)

    # a micro-batch without any counted position: loss 0 and no gradient (not NaN)
    b.zero_grad()
    none = b(x, torch.full_like(y, -100))
    none.backward()
    assert none.item() == 0.0 and all(p.grad is None or not p.grad.any() for p in b.parameters())
    with torch.no_grad():
        assert b(x, torch.full_like(y, -100)).item() == 0.0


def test_masked_loss_is_rendered_only_where_targets_can_be_ignored(make_recipe, host, tmp_path):
    from malt.compiler.api import plan as make_plan

    plain = compile_to(make_recipe(), tmp_path / "plain", host=host)
    text = (tmp_path / "plain" / "model.py").read_text()
    assert not plain.masked_targets and "IGNORE" not in text and "ignore_index" not in text
    assert next(d for d in plain.decisions if d.name == "loss").value == "every position"
    p, _ = make_plan(_masked_recipe(make_recipe, tmp_path / "m"), host=host)
    assert p.masked_targets and "metadata tokens" in next(d for d in p.decisions if d.name == "loss").reason


def test_bf16_weights_sum_the_head_gradient_in_fp32(make_recipe, load_model_module, host, tmp_path):
    """pure_bf16: the head's gradient is a sum over many chunks. Summed in bf16 its error grows with the number
    of chunks; summed in fp32 (cast to bf16 once) it stays at one bf16 rounding of the exact sum."""
    compile_to(make_recipe({"model": {"d_model": 64, "n_layers": 1, "n_heads": 4, "d_ff": 128}}), tmp_path / "b", host=host)
    module = load_model_module(tmp_path / "b")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(16384, 64, generator=g)
    weight = torch.randn(320, 64, generator=g) * 0.05
    targets = torch.randint(0, 320, (16384,), generator=g)
    hb, wb = h.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    module.ChunkedCrossEntropy.apply(hb, wb, targets, 128).backward()     # 128 chunks
    h64, w64 = hb.detach().double().requires_grad_(), wb.detach().double().requires_grad_()
    F.cross_entropy(h64 @ w64.t(), targets).backward()                    # the exact gradient of the same bf16 values
    assert wb.grad.dtype == torch.bfloat16
    error = ((wb.grad.double() - w64.grad).norm() / w64.grad.norm()).item()
    assert error < 6e-3, error   # one bf16 rounding of the chunks' products and of the result; summed in bf16: 1.3e-2


def test_a_compiled_program_renders_the_plain_loss_only(make_recipe, load_model_module, host, tmp_path):
    """target.compile on: torch.compile fuses the loss with the model, so model.py has no chunked loss to read.
    Its loss (run eagerly here) equals the chunked loss of the same recipe compiled off: value and gradients,
    with targets of -100 (metadata)."""
    over = {"model": {"d_model": 64, "n_layers": 1, "n_heads": 4, "d_ff": 96}}
    recipe = _masked_recipe(make_recipe, tmp_path, over)
    compile_to(recipe, tmp_path / "on", sets=["target.compile=on"], host=host)
    compile_to(recipe, tmp_path / "off", sets=["target.compile=off"], host=host)
    text = (tmp_path / "on" / "model.py").read_text()
    assert "ChunkedCrossEntropy" not in text and "LOSS_CHUNK" not in text and "\n\n\n\n" not in text
    on, off = load_model_module(tmp_path / "on"), load_model_module(tmp_path / "off")
    off.LOSS_CHUNK = 50
    torch.manual_seed(0)
    a, b = on.Transformer(), off.Transformer()
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 257, (4, 32), generator=g)
    y = torch.randint(0, 257, (4, 32), generator=g)
    y[torch.rand(4, 32, generator=g) < 0.3] = -100
    la, lb = a(x, y), b(x, y)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-7, msg=name)
