"""Decoder-only objectives in recipes: prefix_lm, span_corruption, ul2, fim, distill.

Validation messages, the plan's derived numbers, the prefix-LM attention mask and loss of the
generated model (element by element), the batches the generated programs build (against their
definitions, on fixed seeds), the distillation teacher against transformers, and a few training
steps of each reference recipe in recipes/ with a falling loss.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from malt.compiler.api import check, compile_to, plan
from malt.compiler.diagnostics import RecipeError
from malt.compiler.plan import Host
from malt.runtime import objectives as O

from .helpers import run_program, write_corpus, write_tiny_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"


def tiny(tmp_path: Path, extra: str = "", steps: int = 8) -> Path:
    """The helpers' tiny recipe (bytes tokenizer, seq_len 32) with extra top-level YAML appended."""
    recipe = write_tiny_recipe(tmp_path, steps=steps)
    recipe.write_text(recipe.read_text().replace("seq_len: 32", "seq_len: 64") + extra)
    return recipe


def problems(recipe: Path, sets=None) -> str:
    with pytest.raises(RecipeError) as err:
        check(recipe, sets)
    return str(err.value)


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("sets, expected", [
    (["objective.kind=ulx"], "objective.kind: got 'ulx', expected one of"),
    (["objective.kind=fim", "objective.rat=0.5"], "objective.rat: unknown key 'rat'\n    hint: did you mean 'rate'?"),
    (["objective.kind=span_corruption", "objective.mean_span=0.5"], "objective.mean_span: must be at least 1 token"),
    (["objective.kind=span_corruption", "objective.noise_density=0"], "objective.noise_density: must be between 0% and 100%"),
    (["objective.kind=ul2", "objective.denoisers=[{kind: R, rate: 0.2}]"], "objective.denoisers.0: an R denoiser needs mean_span"),
    (["objective.kind=ul2", "objective.denoisers=[{kind: S, rate: 0.2}]"], "objective.denoisers.0.rate: an S denoiser (prefix LM) has no rate"),
    (["objective.kind=ul2", "objective.denoisers=[{kind: S, weight: 0}]"], "objective.denoisers: every denoiser has weight 0"),
    (["objective.kind=ul2", "objective.mode_tokens={R: '[NLU]'}"], "objective.mode_tokens: no mode token for the S, X denoiser(s)"),
    (["objective.kind=fim", "objective.sources=[corpos]"], "objective.sources.0: no data source is named 'corpos'\n    hint: did you mean 'corpus'?"),
    (["objective.kind=fim", "objective.middle_token=<fim_prefix>"], "prefix_token, middle_token and suffix_token must differ"),
    (["objective.kind=distill", "objective.teacher=nowhere"], "objective.teacher: no directory"),
    (["objective.kind=distill"], "objective.teacher: required field is missing"),
    (["objective.kind=ul2", "train.seq_len=4"], "seq_len 4 is too short for the denoiser"),
])
def test_objective_problems_are_reported_with_their_path(tmp_path, sets, expected):
    text = problems(tiny(tmp_path), sets)
    assert expected in text, text
    assert "Traceback" not in text


def test_problems_inside_denoisers_point_at_their_line(tmp_path):
    recipe = tiny(tmp_path, "objective:\n  kind: ul2\n  denoisers:\n    - {kind: R, mean_span: 3, rate: 15%}\n"
                            "    - {kind: S, rat: 2}\n    - {kind: X, mean_span: 8}\n")
    lines = recipe.read_text().splitlines()
    text = problems(recipe)
    s_line = next(i for i, line in enumerate(lines, 1) if "rat: 2" in line)
    assert f"recipe.yaml:{s_line}:17: error: objective.denoisers.1.rat: unknown key 'rat'\n    hint: did you mean 'rate'?" in text
    assert f"recipe.yaml:{s_line + 1}:7: error: objective.denoisers.2: an X denoiser needs rate" in text


def test_phase_objective_switch_other_than_distill_is_refused(tmp_path):
    recipe = tiny(tmp_path, "phases:\n  - {name: a, share: 50%}\n  - {name: b, share: 50%, objective: {kind: prefix_lm}}\n")
    text = problems(recipe)
    assert "phases.1.objective.kind: a phase that switches the objective from causal_lm to prefix_lm is not built yet" in text
    assert "recipe.yaml:" in text  # points into the recipe


def test_prefix_objectives_need_concat_packing(tmp_path):
    text = problems(tiny(tmp_path, "objective: {kind: ul2}\n"), ["data.packing=document"])
    assert "objective ul2 with data.packing document is not built yet" in text


def test_objective_tokens_are_added_to_the_tokenizer(tmp_path):
    base, _ = plan(tiny(tmp_path / "a"), host=Host())
    ul2, _ = plan(tiny(tmp_path / "b", "objective: {kind: ul2}\n"), host=Host())
    fim_, _ = plan(tiny(tmp_path / "c", "objective: {kind: fim}\n"), host=Host())
    n = ul2.objective["sentinels"]["count"]
    assert n == O.ul2_sentinels_needed(64, O.UL2_DENOISERS, True) > 0
    assert ul2.tokenizer_vocab == base.tokenizer_vocab + 3 + n          # [NLU] [NLG] [S2S] + sentinels
    assert fim_.tokenizer_vocab == base.tokenizer_vocab + 3              # <fim_prefix> <fim_middle> <fim_suffix>
    # a token the recipe lists itself is not added twice
    listed = tiny(tmp_path / "d", "objective: {kind: fim}\n")
    listed.write_text(listed.read_text().replace("tokenizer: {kind: bytes}", "tokenizer: {kind: bytes, add_special_tokens: ['<fim_middle>']}"))
    assert plan(listed, host=Host())[0].tokenizer_vocab == fim_.tokenizer_vocab


def test_plan_records_the_ul2_mixture_and_its_derived_lengths(tmp_path):
    p, _ = plan(tiny(tmp_path, "objective: {kind: ul2}\n"), host=Host())
    obj = p.to_json()["objective"]
    assert obj["kind"] == "ul2" and obj["at_seq_len"] == 64
    # the defaults are the UL2 paper's seven denoisers, mixed uniformly
    got = [(d["kind"], d.get("mean_span"), d.get("rate")) for d in obj["derived"]]
    assert got == [(d.kind, d.mean_span, d.rate) if d.kind != "S" else ("S", None, None) for d in O.UL2_DENOISERS]
    assert sum(d["share"] for d in obj["derived"]) == pytest.approx(1.0)
    for d in obj["derived"]:
        den = O.Denoiser(d["kind"], d.get("mean_span") or 3.0, d.get("rate") or 0.15)
        assert d["raw_length"] == O.ul2_raw_length(64, den, True)
        if d["kind"] != "S":  # [mode] + inputs + targets (with EOS) fills at most seq_len
            assert d["inputs_length"] + d["targets_length"] <= 64
            assert (d["noise_tokens"], d["spans"]) == O.span_counts(d["raw_length"], d["rate"], d["mean_span"])
    assert any(dec["name"] == "objective" and "UL2" in dec["reason"] for dec in p.to_json()["decisions"])
    assert p.attention == "sdpa_mask"


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
@pytest.mark.parametrize("kind, attention", [("causal_lm", "sdpa_causal"), ("fim", "sdpa_causal"), ("prefix_lm", "sdpa_mask"),
                                             ("span_corruption", "sdpa_mask"), ("ul2", "sdpa_mask")])
def test_choose_attention_masks_a_bidirectional_prefix(tmp_path, cuda, kind, attention):
    """A prefix objective: an explicit (batch, 1, T, T) mask off cuda; on cuda a FlexAttention block mask."""
    p, _ = plan(tiny(tmp_path, f"objective: {{kind: {kind}}}\n").parent / "recipe.yaml", ["target.accelerator=auto"],
                host=Host(cuda=cuda, cuda_name="NVIDIA H100 80GB HBM3" if cuda else ""))
    assert p.attention == ("flex" if cuda and attention == "sdpa_mask" else attention)
    assert (p.device == "cuda") == cuda
    if attention == "sdpa_mask":
        reason = next(d.reason for d in p.decisions if d.name == "attention")
        assert kind in reason and ("FlexAttention with a block mask" in reason) == cuda


@pytest.mark.parametrize("kind", ["prefix_lm", "ul2"])
def test_the_cuda_programs_prefix_block_mask_equals_the_dense_mask(tmp_path, kind):
    """The CUDA program's prefix_lm_mask (a FlexAttention block mask) and its model run eagerly on this CPU, forward
    only (FlexAttention has no CPU backward), against the CPU program (dense mask) with the same weights."""
    import torch.nn.attention.flex_attention as flex

    recipe = tiny(tmp_path / "r", f"objective: {{kind: {kind}}}\n")
    host = Host(cuda=True, cuda_name="NVIDIA H100 80GB HBM3")
    compile_to(recipe, tmp_path / "cuda", ["target.accelerator=cuda", "target.compile=off"], host=host)
    compile_to(recipe, tmp_path / "cpu", host=Host())
    src = (tmp_path / "cuda" / "model.py").read_text()
    assert "return (kv <= q) | (kv < prefix_len[b])" in src and "flex_attention(q, k, v, block_mask=mask" in src
    gpu = load_model_module(tmp_path / "cuda", f"cuda_{kind}")
    cpu = load_model_module(tmp_path / "cpu", f"cpu_{kind}")
    gpu.flex_attention = flex.flex_attention  # the eager kernel: compiling FlexAttention on a CPU takes minutes
    torch.manual_seed(0)
    cpu_net = cpu.Transformer().eval()
    gpu_net = gpu.Transformer().eval()
    gpu_net.load_state_dict(cpu_net.state_dict())
    T = 64
    P = torch.tensor([0, 1, 17, 40, 63, 64])  # none, one, inside the first 128-block, the whole row
    assert isinstance(gpu.prefix_lm_mask(P, T), flex.BlockMask)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (len(P), T), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(gpu_net(x, prefix_len=P), cpu_net(x, prefix_len=P), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gpu_net(x), cpu_net(x), rtol=1e-5, atol=1e-5)  # no prefix (sampling): causal
    # the rule element by element: FlexAttention's own dense rendering of the mask function equals the dense mask
    rule = flex.create_mask(lambda b, h, q, kv: (kv <= q) | (kv < P[b]), len(P), None, T, T, device="cpu")
    assert torch.equal(rule, cpu.prefix_lm_mask(P, T))
    # longer rows (several 128-blocks): the blocks computed are those on or below the diagonal or inside the prefix,
    # and attention through the block mask equals SDPA with the dense mask, partial blocks included
    T, P = 384, torch.tensor([0, 100, 129, 300])
    block = gpu.prefix_lm_mask(P, T)
    computed = block.to_dense()[:, 0].bool()  # (batch, 3, 3): query block × key block
    for b, p in enumerate(P.tolist()):
        want = torch.tensor([[kb <= qb or kb * 128 < p for kb in range(3)] for qb in range(3)])
        assert torch.equal(computed[b], want), (p, computed[b])
    q, k, v = torch.randn(3, len(P), 2, T, 16, generator=g).unbind(0)
    torch.testing.assert_close(flex.flex_attention(q, k, v, block_mask=block),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=cpu.prefix_lm_mask(P, T)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# the generated model: prefix-LM mask and loss
# ---------------------------------------------------------------------------

def load_model_module(run_dir: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, run_dir / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def prefix_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prefix")
    recipe = tiny(tmp / "r", "objective: {kind: prefix_lm}\n")
    compile_to(recipe, tmp / "run", host=Host())
    mod = load_model_module(tmp / "run", "prefix_model")
    torch.manual_seed(0)
    return mod, mod.Transformer().eval()


def test_prefix_lm_mask_element_by_element(prefix_model):
    mod, _ = prefix_model
    T = 9
    P = torch.tensor([1, 4, 8, 0])
    mask = mod.prefix_lm_mask(P, T)
    assert mask.shape == (4, 1, T, T) and mask.dtype == torch.bool
    for b, p in enumerate(P.tolist()):
        for i in range(T):
            for j in range(T):
                may = j <= i or (i < p and j < p)  # causal, or both in the bidirectional prefix
                assert bool(mask[b, 0, i, j]) == may, (b, i, j)
    assert torch.equal(mask, O.prefix_lm_mask(T, P))  # the runtime's mask (written separately) agrees


def test_prefix_attention_sees_the_whole_prefix_and_nothing_after_it(prefix_model):
    _, model = prefix_model
    T, P = 16, 6
    x = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(1))
    base = model(x, prefix_len=torch.tensor([P]))
    # a token later in the prefix changes the outputs of every prefix position (bidirectional)
    x2 = x.clone()
    x2[0, P - 1] = (x2[0, P - 1] + 1) % 256
    changed = (model(x2, prefix_len=torch.tensor([P])) - base).abs().amax(-1)[0]
    assert (changed[:P] > 1e-6).all()
    # a token after the prefix changes nothing before it (causal there)
    x3 = x.clone()
    x3[0, P + 3] = (x3[0, P + 3] + 1) % 256
    changed = (model(x3, prefix_len=torch.tensor([P])) - base).abs().amax(-1)[0]
    assert (changed[:P + 3] == 0).all() and (changed[P + 3:] > 1e-6).all()
    # without prefix_len the model is causal: its first positions do not see position P - 1
    causal = model(x2) - model(x)
    assert (causal[0, :P - 1].abs().amax(-1) == 0).all()
    # prefix_len 0 (or 1) is the causal mask
    assert torch.allclose(model(x, prefix_len=torch.tensor([1])), model(x), atol=1e-6)


def test_prefix_loss_counts_only_the_positions_after_the_prefix(prefix_model):
    _, model = prefix_model
    model.train()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (3, 24), generator=g)
    y = torch.randint(0, 256, (3, 24), generator=g)
    P = torch.tensor([1, 10, 23])
    labels = O.prefix_lm_labels(y, P)
    # labels: -100 exactly where the predicted token lies in the prefix (t < P - 1)
    for b, p in enumerate(P.tolist()):
        assert (labels[b, : p - 1] == -100).all() and torch.equal(labels[b, p - 1:], y[b, p - 1:])
    loss = model(x, labels, prefix_len=P)  # the chunked training loss
    with torch.no_grad():
        logits = model(x, prefix_len=P).float()
    counted = labels != -100
    want = F.cross_entropy(logits[counted], labels[counted])
    assert torch.allclose(loss, want, atol=1e-5)
    # the labels under the prefix do not matter
    other = torch.where(counted, labels, torch.full_like(labels, -100))
    assert torch.allclose(model(x, other, prefix_len=P), loss)
    model.eval()


# ---------------------------------------------------------------------------
# batches the generated programs build, against their definitions
# ---------------------------------------------------------------------------

def test_prefix_lm_rows_are_uniform_and_independent_of_the_micro_batch_split():
    seq = 32
    whole = O.random_prefix_len(16, seq, O.row_generators(7, 3, 0, 16))
    split = torch.cat([O.random_prefix_len(4, seq, O.row_generators(7, 3, s, 4)) for s in range(0, 16, 4)])
    assert torch.equal(whole, split)
    many = O.random_prefix_len(4000, seq, O.row_generators(7, 0, 0, 4000))
    assert many.min() >= 1 and many.max() <= seq - 1
    counts = torch.bincount(many, minlength=seq)[1:]
    assert counts.float().std() / counts.float().mean() < 0.2  # uniform over [1, seq - 1]
    val = O.random_prefix_len(16, seq, O.row_generators(7, 3, 0, 16, salt=1))
    assert not torch.equal(whole, val)  # validation draws its own stream


def _uncorrupt(inputs: list[int], targets: list[int], sentinels: list[int]) -> list[int]:
    """T5's inverse: each sentinel in the inputs is replaced by the tokens after it in the targets."""
    spans, cur = {}, None
    for t in targets:
        if t in sentinels:
            cur = t
            spans[cur] = []
        elif cur is not None:
            spans[cur].append(t)
    out = []
    for t in inputs:
        out += spans[t] if t in sentinels else [t]
    return out


@pytest.mark.parametrize("kind", ["span_corruption", "ul2"])
def test_span_corruption_rows_follow_the_definition(kind):
    seq, eos = 64, 0
    denoisers = [O.Denoiser("R", 3.0, 0.15)] if kind == "span_corruption" else list(O.UL2_DENOISERS)
    modes = {"R": 1001, "X": 1002, "S": 1003} if kind == "ul2" else None
    n = O.ul2_sentinels_needed(seq, denoisers, modes is not None)
    sentinels = list(range(2000, 2000 + n))
    tokens = torch.randint(10, 1000, (32, seq), generator=torch.Generator().manual_seed(3))
    b = O.ul2_batch(tokens, seq, modes, sentinels, eos, eos, O.row_generators(5, 0, 0, 32), denoisers)
    noise_share = []
    for r in range(32):
        d = denoisers[int(b.denoiser[r])]
        row, P = b.input_ids[r].tolist(), int(b.prefix_len[r])
        counted = (b.labels[r] != -100).nonzero().squeeze(1)
        # the loss covers exactly the targets (and their EOS), each position predicting the next token
        assert counted.tolist() == list(range(P - 1, P - 1 + len(counted)))
        assert torch.equal(b.labels[r, counted], b.input_ids[r, counted + 1])
        end = P + len(counted)
        assert row[end - 1] == eos
        head = 1 if modes else 0
        if modes:
            assert row[0] == modes[d.kind]
        inputs, targets = row[head:P], row[P:end - 1]
        raw = O.ul2_raw_length(seq, d, modes is not None)
        if d.kind == "S":  # prefix LM: the raw window, split at P
            assert inputs + targets == tokens[r, :raw].tolist()
            continue
        assert targets[0] == sentinels[0]  # targets start with the first sentinel
        assert _uncorrupt(inputs, targets, sentinels) == tokens[r, :raw].tolist()
        noise = sum(1 for t in targets if t not in sentinels)
        assert (noise, sum(1 for t in inputs if t in sentinels)) == O.span_counts(raw, d.rate, d.mean_span)
        noise_share.append(noise / raw)
    # attention mask of the batch: the prefix-LM mask over [mode] + inputs
    assert torch.equal(b.attn_mask, O.prefix_lm_mask(seq, b.prefix_len))
    if kind == "span_corruption":
        assert abs(sum(noise_share) / len(noise_share) - 0.15) < 0.02


def test_ul2_draws_denoisers_in_proportion_to_their_weights():
    denoisers = [O.Denoiser("R", 3.0, 0.15, 3.0), O.Denoiser("X", 8.0, 0.5, 1.0), O.Denoiser("S", weight=0.0)]
    tokens = torch.randint(10, 1000, (2000, 64), generator=torch.Generator().manual_seed(4))
    b = O.ul2_batch(tokens, 64, {"R": 1, "X": 2, "S": 3}, list(range(2000, 2100)), 0, 0, O.row_generators(1, 0, 0, 2000), denoisers)
    share = torch.bincount(b.denoiser, minlength=3).float() / 2000
    assert abs(share[0] - 0.75) < 0.04 and abs(share[1] - 0.25) < 0.04 and share[2] == 0


def test_fim_batch_transforms_only_the_chosen_rows():
    PRE, MID, SUF, EOS = 900, 901, 902, 0
    g = torch.Generator().manual_seed(6)
    window = torch.randint(10, 800, (4, 41), generator=g)
    window[:, [12, 30]] = EOS  # three documents per row
    x, y = window[:, :-1], window[:, 1:]
    fx, fy = O.fim_batch(x, y, [1.0, 0.0, 1.0, 0.0], PRE, MID, SUF, EOS, "psm", O.row_generators(1, 0, 0, 4))
    assert fx.shape == x.shape and torch.equal(fx[:, 1:], fy[:, :-1])  # still a shifted pair
    assert torch.equal(fx[1], x[1]) and torch.equal(fy[3], y[3])       # rate 0: unchanged
    for r in (0, 2):
        w = torch.cat([fx[r], fy[r, -1:]]).tolist()
        # PSM: every transformed document reads <PRE> prefix <SUF> suffix <MID> middle, EOS after it
        assert w[0] == PRE and w.count(PRE) >= 2  # (the window's end may cut the last document's sentinels off)
        first = w[: w.index(EOS)]
        pre, suf, mid = first[1:first.index(SUF)], first[first.index(SUF) + 1:first.index(MID)], first[first.index(MID) + 1:]
        assert pre + mid + suf == window[r, :12].tolist()
    # the same rows whatever the split
    a = O.fim_batch(x[2:], y[2:], [1.0, 0.0], PRE, MID, SUF, EOS, "psm", O.row_generators(1, 0, 2, 2))
    assert torch.equal(a[0], fx[2:])


def test_special_ids_names_missing_tokens():
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))
    tok.add_special_tokens(["<fim_prefix>"])
    assert O.special_ids(tok, ["<fim_prefix>"]) == [1]
    with pytest.raises(Exception, match=r"lacks the objective's special tokens \['<fim_middle>'\]"):
        O.special_ids(tok, ["<fim_prefix>", "<fim_middle>"])


# ---------------------------------------------------------------------------
# distillation: the teacher
# ---------------------------------------------------------------------------

def hf_llama(path: Path, vocab: int = 320, qwen: bool = False):
    import transformers
    torch.manual_seed(0)
    if qwen:
        cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500.0)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500.0)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: make every parameter matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("qwen", [False, True], ids=["llama", "qwen2"])
def test_teacher_logits_equal_transformers(tmp_path, qwen):
    from malt.runtime.teacher import load_teacher

    ref = hf_llama(tmp_path / "hf", qwen=qwen)
    teacher = load_teacher(tmp_path / "hf", "hf", "cpu", log=lambda m: None)
    x = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x).logits
        got = teacher(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("qwen", [False, True], ids=["tied", "untied-with-biases"])
def test_a_teacher_with_bf16_matmul_weights_gives_the_same_logits_under_autocast(tmp_path, qwen):
    """teacher.matmuls_in: under bf16 autocast the stored bf16 copies of the matmul weights give the logits that
    casting them in every forward gives, bit for bit, in fewer bytes; the plan counts those bytes."""
    from malt.compiler.objectives import teacher_weight_bytes
    from malt.runtime.teacher import load_teacher, matmuls_in

    hf_llama(tmp_path / "teacher", qwen=qwen)
    fp32 = load_teacher(tmp_path / "teacher", "hf", "cpu", log=lambda m: None)
    half = matmuls_in(load_teacher(tmp_path / "teacher", "hf", "cpu", log=lambda m: None), torch.bfloat16)
    x = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = fp32(x), half(x)
    assert got.dtype == want.dtype and torch.equal(got, want)
    dtypes = {n: p.dtype for n, p in half.named_parameters()}
    assert dtypes["layers.0.self_attn.q_proj.weight"] == dtypes["layers.1.mlp.down_proj.weight"] == torch.bfloat16
    assert dtypes["embed_tokens.weight"] == dtypes["norm.weight"] == dtypes["layers.0.input_layernorm.weight"] == torch.float32
    if qwen:  # an untied head is a matmul weight; the q/k/v biases go with their weights
        assert dtypes["lm_head.weight"] == dtypes["layers.0.self_attn.q_proj.bias"] == torch.bfloat16
    else:     # a tied head is the embedding, which the lookup reads in fp32
        assert half.lm_head.weight is half.embed_tokens.weight and half.lm_head.weight.dtype == torch.float32
    held = sum(p.numel() * p.element_size() for p in half.parameters())
    assert held < sum(p.numel() * p.element_size() for p in fp32.parameters())
    recipe = tiny(tmp_path / "r", "objective: {kind: distill, teacher: ../teacher, weight: 0.3, temperature: 2}\n")
    p, _ = plan(recipe, ["target.precision=bf16"], host=Host())
    assert p.precision == "bf16" and teacher_weight_bytes(p) == held
    fp, _ = plan(recipe, ["target.precision=fp32"], host=Host())
    assert teacher_weight_bytes(fp) == sum(p.numel() * 4 for p in fp32.parameters())
    # under FSDP2 too (frozen parameters may mix dtypes in a block: it gathers them as bytes), before sharding;
    # a 2-process gloo run of tiny-distill in bf16 gave the same losses bit for bit with and without it
    compile_to(recipe, tmp_path / "fsdp", ["target.precision=bf16", "target.devices=2", "target.parallelism=fsdp"], host=Host())
    src = (tmp_path / "fsdp" / "train.py").read_text()
    assert 0 < src.index("teacher = matmuls_in(teacher, torch.bfloat16)") < src.index("distributed.shard_frozen(teacher")
    compile_to(recipe, tmp_path / "fp32", ["target.precision=fp32"], host=Host())
    assert "matmuls_in" not in (tmp_path / "fp32" / "train.py").read_text()


def test_distill_loss_mixes_kl_and_cross_entropy():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    T = 2.0
    kl = O.distill_kl(s, t, T)
    p_t = F.softmax(t / T, -1)
    want = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert torch.allclose(kl, want, atol=1e-6)


def test_distill_plan_counts_the_teacher(tmp_path):
    hf_llama(tmp_path / "teacher")
    recipe = tiny(tmp_path / "r", "objective: {kind: distill, teacher: ../teacher, weight: 0.3, temperature: 2}\n")
    p, _ = plan(recipe, host=Host())
    base, _ = plan(tiny(tmp_path / "b"), host=Host())
    t = p.to_json()
    assert t["objective"]["teacher_model"]["kind"] == "hf" and t["teacher_params"] > 0
    # total FLOPs: the student's training plus the teacher's forward pass (2 N + 4 L H d T per token) on every token
    teacher_fwd = 2 * p.estimates["teacher_params"] + 4 * 2 * 4 * 8 * 64  # tied: matmul params = params - norms
    assert t["total_flops"] - base.to_json()["total_flops"] == pytest.approx(teacher_fwd * p.tokens, rel=0.01)
    mem = t["memory_per_device_bytes"]
    assert mem["teacher_weights"] > 0 and mem["distill_logits"] > 0
    assert mem["total"] > base.to_json()["memory_per_device_bytes"]["total"]


def test_the_micro_batch_planner_makes_room_for_the_teacher(tmp_path):
    """micro_batch auto: the teacher's weights and the logits distillation keeps whole count against the budget."""
    from malt.compiler.objectives import distill_logits_bytes, teacher_costs
    from malt.compiler.passes.batch_split import BUDGET_SHARE
    from malt.compiler.passes.estimate import activations, states

    hf_llama(tmp_path / "teacher")
    recipe = tiny(tmp_path / "r", "objective: {kind: distill, teacher: ../teacher, weight: 0.3, temperature: 2}\n")
    sets = ["train.global_batch=64", "train.micro_batch=auto", "target.accelerator=cpu"]
    free, _ = plan(recipe, [*sets, "target.memory_per_device=1GB"], host=Host())
    assert free.micro_batch == 64

    def need(p, mb):  # what one device holds with micro-batches of mb sequences
        return (sum(states(p).values()) + teacher_costs(p)["weights_bytes"] + activations(p, mb, 64)
                + distill_logits_bytes(p, mb, 64))
    # a budget just short of 32 sequences at once with the teacher, which 32 would fit without it
    budget = need(free, 32) - 1
    assert budget >= need(free, 32) - teacher_costs(free)["weights_bytes"] - distill_logits_bytes(free, 32, 64)
    tight, _ = plan(recipe, [*sets, f"target.memory_per_device={int(budget / BUDGET_SHARE) + 1}B"], host=Host())
    assert (tight.micro_batch, tight.grad_accum) == (16, 4)


@pytest.mark.slow
def test_fsdp_shards_the_teacher_and_trains_as_one_process(tmp_path):
    """Under FSDP2 the frozen teacher is sharded like the student (distributed.shard_frozen); two processes
    train with the same losses as one, and the plan counts half the teacher's weights per device."""
    from .test_distributed import torchrun
    from .test_run import losses

    hf_llama(tmp_path / "teacher")
    recipe = tiny(tmp_path / "r", "objective: {kind: distill, teacher: ../teacher, weight: 0.5, temperature: 2}\n", steps=4)
    one = tmp_path / "one"
    two = tmp_path / "two"
    p1 = compile_to(recipe, one, sets=["train.micro_batch=4"], host=Host())
    p2 = compile_to(recipe, two, sets=["train.micro_batch=2", "target.devices=2", "target.parallelism=fsdp"], host=Host())
    assert "distributed.shard_frozen(teacher" in (two / "train.py").read_text()
    assert "shard_frozen" not in (one / "train.py").read_text()
    w1 = p1.estimates["memory_per_device_bytes"]["teacher_weights"]
    assert p2.estimates["memory_per_device_bytes"]["teacher_weights"] == w1 // 2
    run_program(one, tmp_path / "cache", "--quiet")
    torchrun(two, tmp_path / "cache")
    ref, got = losses(one), losses(two)
    assert sorted(ref) == sorted(got) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-5, abs=2e-5), step


@pytest.mark.slow
def test_distill_under_pure_bf16_runs_the_teacher_in_bf16(tmp_path):
    """target.precision pure_bf16 with a teacher: the teacher is cast to bf16 (2 bytes a weight in the plan), the run
    trains with finite losses and saves bf16 weights."""
    from safetensors import safe_open

    from .test_run import losses

    hf_llama(tmp_path / "teacher")
    recipe = tiny(tmp_path / "r", "objective: {kind: distill, teacher: ../teacher, weight: 0.5, temperature: 2}\n", steps=6)
    run = tmp_path / "run"
    p = compile_to(recipe, run, sets=["target.precision=pure_bf16"], host=Host())
    assert "teacher = teacher.to(torch.bfloat16)" in (run / "train.py").read_text()
    assert p.estimates["memory_per_device_bytes"]["teacher_weights"] == 2 * p.estimates["teacher_params"]
    out = run_program(run, tmp_path / "cache")
    assert "distill: teacher" in out.stdout
    got = losses(run)
    assert sorted(got) == list(range(1, 7)) and all(v == v and v < 1e4 for v in got.values())
    with safe_open(str(run / "checkpoints" / "step_00000006" / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}


def test_distill_teacher_with_a_smaller_vocabulary_is_refused(tmp_path):
    hf_llama(tmp_path / "teacher", vocab=128)
    text = problems(tiny(tmp_path / "r", "objective: {kind: distill, teacher: ../teacher}\n"))
    assert "the teacher's vocabulary (128) is smaller than this run's tokenizer (257)" in text


# ---------------------------------------------------------------------------
# the reference recipes train
# ---------------------------------------------------------------------------

FAST = """\
extends: {recipe}
name: {name}
data:
  sources:
    - {{name: prose, path: prose.jsonl, weight: 0.7}}
    - {{name: code, path: code.jsonl, weight: 0.3}}
  validation: 5%
model: {{d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 4, d_ff: 128}}
train: {{tokens: null, steps: {steps}, global_batch: 8, micro_batch: 4, log_every: 1, eval_every: {steps}, eval_batches: 1, checkpoint_every: 0, sample_tokens: 8}}
target: {{accelerator: cpu, precision: fp32, compile: off}}
"""


def fast_variant(tmp: Path, recipe: Path, steps: int, extra: str = "") -> Path:
    """The reference recipe with a small model and corpus and a few steps (its objective, tokenizer and phases kept)."""
    tmp.mkdir(parents=True, exist_ok=True)
    write_corpus(tmp / "prose.jsonl", 200, seed=1)
    write_corpus(tmp / "code.jsonl", 200, seed=2)
    path = tmp / "fast.yaml"
    path.write_text(FAST.format(recipe=recipe, name=recipe.stem, steps=steps) + extra)
    return path


def step_losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-prefix-lm", "tiny-span-corruption", "tiny-ul2", "tiny-fim", "tiny-distill"])
def test_reference_recipe_trains_with_a_falling_loss(tmp_path, name):
    teacher = RECIPES / "teachers" / "tiny-teacher"  # paths resolve against the child recipe: name the parent's files
    extra = ("tokenizer: {vocab_size: 512, max_chars: 200k}\n" if name != "tiny-distill" else
             f"tokenizer: {{path: {teacher / 'tokenizer.json'}}}\nobjective: {{teacher: {teacher}}}\n")
    recipe = fast_variant(tmp_path / "r", RECIPES / f"{name}.yaml", steps=12, extra=extra)
    run = tmp_path / "run"
    compile_to(recipe, run, host=Host())
    out = run_program(run, tmp_path / "cache")
    losses = step_losses(run)
    assert len(losses) == 12 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    if name == "tiny-distill":
        assert "distill: teacher" in out.stdout and "phase plain" in out.stdout
    if name in ("tiny-ul2", "tiny-span-corruption", "tiny-fim"):
        assert "added" in out.stdout and "special token(s)" in out.stdout


@pytest.mark.slow
def test_distill_from_a_malt_run_pulls_the_student_toward_the_teacher(tmp_path):
    """A teacher made here (a tiny malt run); with weight 1 the student's loss is the KL alone, which falls."""
    teacher = tmp_path / "teacher"
    t_recipe = write_tiny_recipe(tmp_path / "t", steps=6, eval_every=6, checkpoint_every=6)
    compile_to(t_recipe, teacher, host=Host())
    run_program(teacher, tmp_path / "cache", "--quiet")
    student = tiny(tmp_path / "s", f"objective: {{kind: distill, teacher: {teacher}, weight: 1.0, temperature: 1}}\n", steps=8)
    student.write_text(student.read_text().replace("d_model: 64, n_layers: 2", "d_model: 32, n_layers: 1").replace(
        "seq_len: 64", "seq_len: 32"))
    run = tmp_path / "run"
    compile_to(student, run, host=Host())
    out = run_program(run, tmp_path / "cache")
    assert "distill: teacher" in out.stdout and "from " + str(teacher) in out.stdout
    losses = step_losses(run)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_distill_refuses_a_teacher_with_another_tokenizer(tmp_path):
    hf = tmp_path / "teacher"
    hf_llama(hf)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"x": 0, "y": 1}, unk_token="x")).save(str(hf / "tokenizer.json"))
    recipe = tiny(tmp_path / "r", f"objective: {{kind: distill, teacher: {hf}}}\n", steps=3)
    run = tmp_path / "run"
    compile_to(recipe, run, host=Host())
    proc = run_program(run, tmp_path / "cache", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "the teacher's tokenizer" in proc.stdout + proc.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.slow
def test_a_resumed_ul2_run_repeats_the_uninterrupted_one(tmp_path):
    """UL2 rows are a pure function of (seed, split, step, sequence): resuming from a checkpoint repeats every loss."""
    import shutil

    recipe = fast_variant(tmp_path / "r", RECIPES / "tiny-ul2.yaml", steps=6, extra="tokenizer: {vocab_size: 512, max_chars: 200k}\n")
    recipe.write_text(recipe.read_text().replace("checkpoint_every: 0", "checkpoint_every: 3"))
    full = tmp_path / "full"
    compile_to(recipe, full, host=Host())
    run_program(full, tmp_path / "cache")
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    ck = resumed / "checkpoints"
    shutil.rmtree(ck / "step_00000006")
    (ck / "latest").write_text("step_00000003")
    out = run_program(resumed, tmp_path / "cache", "--resume")
    trained = [int(line.split()[1].split("/")[0]) for line in out.stdout.splitlines() if line.startswith("step") and "| loss" in line]
    assert trained == [4, 5, 6]  # it went on from the checkpoint of step 3
    assert step_losses(resumed) == step_losses(full) and len(step_losses(full)) == 6
