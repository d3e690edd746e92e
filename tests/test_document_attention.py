"""Document masks in the generated model (data.packing document / best_fit) and the choose_attention pass.

With document packing each document's logits in a packed row must equal those of running the
document alone through the same model: attention never crosses a document and rotary positions
restart at each one. Checked for the CPU program (SDPA with an explicit mask) and, forward only,
for the CUDA program's FlexAttention path (FlexAttention runs eagerly on the CPU without backward).
"""

from __future__ import annotations

import pytest
import torch
from malt.compiler.api import compile_to
from malt.compiler.diagnostics import RecipeError
from malt.compiler.loader import load
from malt.compiler.passes import choose_attention, choose_device
from malt.compiler.plan import Host, lower
from malt.compiler.validate import validate
from malt.runtime.packing import document_ids

EOS_ID = 256  # the bytes tokenizer's <|endoftext|>
H100 = Host(cuda=True, cuda_name="NVIDIA H100 80GB HBM3", cpu_cores=16, memory_bytes=128 * 2**30)

SHAPES = {
    "mha": {"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128}},
    "gqa_untied": {"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 96,
                             "tie_embeddings": False, "init_std": 0.05}},
}


def packed_row(lengths, seed=0):
    """One row of documents of the given lengths (each ending with EOS), its document ids, and the documents."""
    g = torch.Generator().manual_seed(seed)
    docs = [torch.cat([torch.randint(0, 256, (n - 1,), generator=g), torch.tensor([EOS_ID])]) for n in lengths]
    x = torch.cat(docs)[None]
    return x, torch.from_numpy(document_ids(x.numpy(), EOS_ID)), docs


def build(make_recipe, load_model_module, tmp_path, overrides, packing="document", host=None, sets=()):
    recipe = make_recipe({**overrides, "data": {"packing": packing}})
    plan = compile_to(recipe, tmp_path / "build", sets=list(sets), host=host or Host())
    module = load_model_module(tmp_path / "build")
    torch.manual_seed(0)
    model = module.Transformer().eval()
    return plan, module, model


# the CPU kernels of document masks: SDPA with the mask, and (bf16 on a CPU with bf16 matmuls) the generated
# causal_attention with it; the models run in fp32 here, where both must be exact
KERNELS = {"sdpa_mask": (Host(), []), "blocked_causal": (Host(cpu_bf16=True), ["target.precision=bf16"])}


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_documents_logits_equal_running_it_alone(make_recipe, load_model_module, tmp_path, shape, kernel):
    host, sets = KERNELS[kernel]
    plan, _, model = build(make_recipe, load_model_module, tmp_path, SHAPES[shape], host=host, sets=sets)
    assert plan.attention == kernel
    lengths = [7, 1, 12, 12]               # a one-token document (only its EOS) among them; 32 = seq_len
    x, ids, docs = packed_row(lengths)
    with torch.no_grad():
        packed = model(x, doc_ids=ids)[0]
        plain = model(x)[0]                # no doc_ids: one causal document per row
        at = 0
        for d in docs:
            alone = model(d[None])[0]
            torch.testing.assert_close(packed[at:at + len(d)], alone, rtol=1e-5, atol=1e-5)
            at += len(d)
    # the test can fail: without document masks the later documents see the earlier ones
    assert not torch.allclose(plain[7:], packed[7:], atol=1e-3)
    torch.testing.assert_close(plain[:7], packed[:7], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_padding_and_two_rows(make_recipe, load_model_module, tmp_path, kernel):
    """best_fit rows: documents, then padding with an id of its own; rows packed differently."""
    host, sets = KERNELS[kernel]
    plan, _, model = build(make_recipe, load_model_module, tmp_path, SHAPES["gqa_untied"], packing="best_fit", host=host,
                           sets=sets)
    assert plan.attention == kernel
    x0, ids0, docs0 = packed_row([10, 15], seed=1)
    x1, ids1, docs1 = packed_row([20, 3, 9], seed=2)
    pad = torch.full((1, 7), EOS_ID)
    x = torch.cat([torch.cat([x0, pad], 1), x1])
    ids = torch.cat([torch.cat([ids0, torch.full((1, 7), 2)], 1), ids1])
    with torch.no_grad():
        out = model(x, doc_ids=ids)
        for row, docs in ((0, docs0), (1, docs1)):
            at = 0
            for d in docs:
                torch.testing.assert_close(out[row, at:at + len(d)], model(d[None])[0], rtol=1e-5, atol=1e-5)
                at += len(d)


def test_document_mask_and_positions_element_by_element(make_recipe, load_model_module, tmp_path):
    _, module, _ = build(make_recipe, load_model_module, tmp_path, SHAPES["mha"])
    g = torch.Generator().manual_seed(3)
    ids = torch.sort(torch.randint(0, 5, (3, 24), generator=g), dim=1).values
    ids[2] = 0                                                  # a row of one document
    mask = module.document_mask(ids)
    assert mask.shape == (3, 1, 24, 24) and mask.dtype == torch.bool
    for b in range(3):
        for i in range(24):
            for j in range(24):
                assert bool(mask[b, 0, i, j]) == (j <= i and int(ids[b, i]) == int(ids[b, j])), (b, i, j)
    pos = module.document_positions(ids)
    for b in range(3):
        for i in range(24):
            start = min(j for j in range(24) if int(ids[b, j]) == int(ids[b, i]))
            assert int(pos[b, i]) == i - start


def test_flex_attention_program_matches_documents_alone(make_recipe, load_model_module, tmp_path):
    """The CUDA program's FlexAttention path, run eagerly on this CPU (forward only)."""
    import torch.nn.attention.flex_attention as flex  # torch >= 2.5 (pyproject) has it
    plan, module, model = build(make_recipe, load_model_module, tmp_path, SHAPES["gqa_untied"], host=H100,
                                sets=["target.accelerator=auto", "target.precision=fp32", "target.compile=off"])
    assert (plan.device, plan.attention) == ("cuda", "flex")
    src = (tmp_path / "build" / "model.py").read_text()
    assert "flex_attention(q, k, v, block_mask=mask, enable_gqa=True)" in src and "create_block_mask" in src
    module.flex_attention = flex.flex_attention        # the eager kernel: compiling FlexAttention on a CPU takes minutes
    x, ids, docs = packed_row([9, 14, 9], seed=4)
    with torch.no_grad():
        packed = model(x, doc_ids=ids)[0]
        at = 0
        for d in docs:
            torch.testing.assert_close(packed[at:at + len(d)], model(d[None])[0], rtol=1e-5, atol=1e-5)
            at += len(d)


def test_masked_program_trains_with_chunked_loss_and_gradients_match(make_recipe, load_model_module, tmp_path):
    """Eager training with doc_ids: the chunked loss and its gradients equal those of the unchunked path."""
    _, _, model = build(make_recipe, load_model_module, tmp_path, SHAPES["mha"])
    model.train()
    x, ids, _ = packed_row([10, 12, 10], seed=5)
    y = torch.roll(x, -1, 1)
    loss = model(x, y, doc_ids=ids)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(x, doc_ids=ids)
    ref = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_torch_compile_with_doc_ids_on_cpu(make_recipe, load_model_module, tmp_path):
    """target.compile on the CPU: the compiled model (mask built inside the graph) gives the eager loss and gradients."""
    _, _, model = build(make_recipe, load_model_module, tmp_path,
                        {"model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}}, packing="best_fit")
    model.train()
    x, ids, _ = packed_row([10, 12, 10], seed=6)
    y = torch.roll(x, -1, 1)
    y[0, -3:] = -100                                    # padding targets (best_fit) carry no loss
    eager = model(x, y, doc_ids=ids)
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = torch.compile(model)
    got = compiled(x, y, doc_ids=ids)
    got.backward()
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------- rendering


def test_concat_program_has_no_document_code(make_recipe, load_model_module, tmp_path):
    recipe = make_recipe(SHAPES["mha"])
    compile_to(recipe, tmp_path / "build", host=Host())
    model_src = (tmp_path / "build" / "model.py").read_text()
    train_src = (tmp_path / "build" / "train.py").read_text()
    for word in ("doc_ids", "document_mask", "flex", "document_positions"):
        assert word not in model_src and word not in train_src
    assert "is_causal=True" in model_src


def test_document_program_passes_doc_ids(make_recipe, tmp_path):
    compile_to(make_recipe({**SHAPES["mha"], "data": {"packing": "document"}}), tmp_path / "build", host=Host())
    train_src = (tmp_path / "build" / "train.py").read_text()
    assert "x, y, doc_ids = dataset.batch(" in train_src
    assert "x, y, doc_ids = data.to_device(DEVICE, x, y, doc_ids)" in train_src
    assert "forward(x, y, doc_ids=doc_ids)" in train_src
    assert "'packing': 'document'" in train_src
    model_src = (tmp_path / "build" / "model.py").read_text()
    assert "def forward(self, tokens, targets=None, *, doc_ids=None):" in model_src
    assert "flex" not in model_src


# --------------------------------------------------------------------------- the pass


def start(recipe, sets=(), host=None):
    loaded = load(recipe, list(sets))
    return lower(validate(loaded), loaded.file, 257, host or Host())


def decision(plan, name):
    return next(d for d in plan.decisions if d.name == name)


@pytest.mark.parametrize("packing, host, accelerator, want", [
    ("concat", Host(), "cpu", "sdpa_causal"),
    ("concat", H100, "auto", "sdpa_causal"),
    ("document", Host(), "cpu", "sdpa_mask"),
    ("best_fit", Host(), "cpu", "sdpa_mask"),
    ("document", H100, "auto", "flex"),
    ("best_fit", H100, "cuda", "flex"),
    ("document", H100, "cpu", "sdpa_mask"),   # a GPU host, but the recipe asks for the CPU
])
def test_choose_attention_decisions(make_recipe, packing, host, accelerator, want):
    recipe = make_recipe({"data": {"packing": packing}, "target": {"accelerator": accelerator}})
    p = choose_attention.run(choose_device.run(start(recipe, host=host)))
    d = decision(p, "attention")
    assert p.attention == d.value == want
    if want != "sdpa_causal":
        assert f"data.packing {packing}" in d.reason
    if want == "sdpa_mask":
        assert "FlexAttention has no backward" in d.reason
    if want == "flex":
        assert "block mask" in d.reason


def test_plan_json_records_attention(make_recipe, tmp_path):
    import json

    compile_to(make_recipe({"data": {"packing": "best_fit"}}), tmp_path / "build", host=Host())
    plan = json.loads((tmp_path / "build" / "plan.json").read_text())
    assert plan["execution"]["attention"] == "sdpa_mask"
    assert any(d["name"] == "attention" and "best_fit" in d["reason"] for d in plan["decisions"])


@pytest.mark.parametrize("objective, message", [
    ({"kind": "distill", "teacher": "teacher"}, "packing document with objective distill is not built yet"),
    ({"kind": "prefix_lm"}, "objective prefix_lm with data.packing document is not built yet"),
])
def test_packing_needs_causal_lm(make_recipe, objective, message):
    recipe = make_recipe({"data": {"packing": "document"}, "objective": objective})
    with pytest.raises(RecipeError, match=message):
        validate(load(recipe, []))


def test_validation_path_checked(make_recipe):
    recipe = make_recipe({"data": {"sources": [{"name": "text", "path": "data.txt", "validation_path": "nope.txt"}]}})
    with pytest.raises(RecipeError, match=r"data.sources.0.validation_path: data file not found: nope.txt"):
        validate(load(recipe, []))



def test_packing_on_tpu_is_not_built(make_recipe):
    recipe = make_recipe({"data": {"packing": "best_fit"}, "target": {"accelerator": "tpu"}})
    with pytest.raises(RecipeError) as info:
        validate(load(recipe, []))
    packing = [d for d in info.value.diagnostics if d.path == "data.packing"]
    assert len(packing) == 1 and "the TPU program is built for concat packing only, not 'best_fit'" in packing[0].message
