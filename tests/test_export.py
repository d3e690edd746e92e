"""End to end: compile a tiny recipe, train it, export it, load it with transformers; the export and sample CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from malt.compiler.api import compile_to
from malt.compiler.plan import Host
from malt.runtime.export import export_hf, load_run_model
from malt.runtime.run import RunError
from malt.runtime.sample import generate

from .conftest import write_recipe
from .helpers import run_env, run_program

import transformers  # noqa: E402  (the test extra; a missing one must fail, not skip)

pytestmark = pytest.mark.slow

TEXT = "The quick brown fox.\nLine 7: a"  # under seq_len 32 tokens, even as bytes

VARIANTS = {
    # Llama, tied embeddings, bytes tokenizer
    "llama_tied": ({"model": {"tie_embeddings": True}}, "LlamaForCausalLM"),
    # Qwen2: q/k/v biases, untied head, grouped-query attention, a trained byte-level BPE tokenizer
    "qwen2_untied": ({"model": {"qkv_bias": True, "tie_embeddings": False, "n_kv_heads": 2},
                      "tokenizer": {"kind": "bpe", "vocab_size": 300}}, "Qwen2ForCausalLM"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(variant) -> (run directory, cache directory) of a 6-step run with checkpoints at 3 and 6, trained once."""
    done = {}

    def get(variant):
        if variant not in done:
            base = tmp_path_factory.mktemp(variant)
            recipe = write_recipe(base, VARIANTS[variant][0])
            run_dir, cache = base / "run", base / "cache"
            compile_to(recipe, run_dir, host=Host())
            run_program(run_dir, cache, "--quiet")
            done[variant] = run_dir, cache
        return done[variant]
    return get


@pytest.fixture(params=list(VARIANTS))
def trained(request, runs):
    """(run directory, cache directory, expected architecture) for each variant."""
    return (*runs(request.param), VARIANTS[request.param][1])


@pytest.fixture
def llama_run(runs):
    return runs("llama_tied")


def malt_cli(*args, cache=None, cwd=None) -> subprocess.CompletedProcess:
    env = run_env(cache) if cache is not None else None
    return subprocess.run([sys.executable, "-m", "malt.compiler.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_run_wrote_checkpoints(trained):
    run_dir, _, _ = trained
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert steps == ["step_00000003", "step_00000006"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (run_dir / "tokenizer.json").is_file()


def test_export_loads_in_transformers_with_same_logits(trained, tmp_path):
    run_dir, _, arch = trained
    out = tmp_path / "hf"
    assert export_hf(run_dir, out) == arch
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [arch]

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == arch
    assert hf.dtype == torch.float32

    model, malt_tok, plan = load_run_model(run_dir)
    assert hf.num_parameters() == plan["params"] == sum(p.numel() for p in model.parameters())

    # the same tokenizer: same ids, same text back, end-of-text token known
    ids = tok(TEXT)["input_ids"]
    assert ids == malt_tok.encode(TEXT).ids
    assert tok.decode(ids) == TEXT
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == malt_tok.token_to_id("<|endoftext|>") == hf.config.eos_token_id
    # text that spells the special token is text, as the data pipeline encodes it (encode_special_tokens)
    malt_tok.encode_special_tokens = True
    assert tok("a <|endoftext|> b")["input_ids"] == malt_tok.encode("a <|endoftext|> b", add_special_tokens=False).ids

    # the same weights: every tensor of the checkpoint is in the HF model (tied embeddings stored once)
    hf_params = dict(hf.named_parameters())
    malt_params = dict(model.named_parameters())
    assert len(hf_params) == len(malt_params)
    for name, p in malt_params.items():
        assert torch.equal(hf_params[name if name == "lm_head.weight" else "model." + name], p), name

    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), atol=1e-5, rtol=1e-5)

    # greedy decoding agrees too
    prompt = TEXT[:12]
    with torch.no_grad():
        hf_ids = hf.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=5, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.eos_token_id)
    assert tok.decode(hf_ids[0]) == generate(model, malt_tok, prompt, 5, temperature=0)


def test_export_refuses_the_run_directory_itself(trained):
    run_dir, _, _ = trained
    with pytest.raises(RunError, match="run directory"):
        export_hf(run_dir, run_dir, force=True)
    with pytest.raises(RunError, match="run directory"):
        export_hf(run_dir, run_dir.parent, force=True)
    assert (run_dir / "model.py").is_file()


def test_cli_export_twice_needs_force(llama_run, tmp_path):
    run_dir, cache = llama_run
    out = tmp_path / "hf"
    first = malt_cli("export", run_dir, "-o", out, cache=cache)
    assert first.returncode == 0, first.stderr
    assert "LlamaForCausalLM" in first.stdout and "note:" not in first.stdout  # causal_lm: nothing to note
    before = (out / "model.safetensors").read_bytes()

    second = malt_cli("export", run_dir, "-o", out, cache=cache)
    assert second.returncode != 0
    assert "Traceback" not in second.stdout + second.stderr
    assert "already exists" in second.stderr and "--force" in second.stderr

    forced = malt_cli("export", run_dir, "-o", out, "--force", cache=cache)
    assert forced.returncode == 0, forced.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left behind
    transformers.AutoConfig.from_pretrained(out)


@pytest.mark.parametrize("what", ["not_a_run", "missing"])
def test_cli_export_of_a_non_run_directory_is_a_clear_error(what, tmp_path):
    src = tmp_path / "src"
    if what == "not_a_run":
        src.mkdir()
        (src / "notes.txt").write_text("hello")
    proc = malt_cli("export", src, "-o", tmp_path / "out", cache=tmp_path / "cache")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ")
    assert ("not a malt run directory" if what == "not_a_run" else "not found") in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_sample_continues_the_prompt(llama_run):
    run_dir, cache = llama_run
    proc = malt_cli("sample", run_dir, "--prompt", "ab", "-n", "5", cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ab")
    assert len(proc.stdout.rstrip("\n")) > 2
    # no prompt: a new document, from the end-of-text token that precedes every document, which is not printed
    proc = malt_cli("sample", run_dir, "-n", "3", cache=cache)
    assert proc.returncode == 0, proc.stderr
    model, tokenizer, _ = load_run_model(run_dir)
    eos = tokenizer.token_to_id("<|endoftext|>")
    seen = []
    hook = model.register_forward_pre_hook(lambda _, args: seen.append(args[0][0, 0].item()))
    assert generate(model, tokenizer, "", 0, start_id=eos) == ""
    generate(model, tokenizer, "", 1, start_id=eos)
    hook.remove()
    assert seen == [eos]


@pytest.mark.parametrize("out", [".", "..", "./"])
def test_export_refuses_to_replace_the_current_directory(tmp_path, monkeypatch, out):
    (tmp_path / "runs" / "run").mkdir(parents=True)
    (tmp_path / "runs" / "work").mkdir()
    monkeypatch.chdir(tmp_path / "runs" / "work")
    with pytest.raises(RunError, match="is or contains the (current|run) directory"):
        export_hf(tmp_path / "runs" / "run", out, force=True)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run", "work"]   # nothing written, nothing left behind
    assert not list((tmp_path / "runs" / "work").iterdir())


def test_exported_context_length_is_the_longest_phases(make_recipe, host, tmp_path):
    """A run whose last phase trains on longer sequences (context extension) exports that length: config.json's
    max_position_embeddings and the tokenizer's model_max_length, not the first phase's seq_len."""
    from malt.runtime.export import hf_config, longest_seq_len

    recipe = make_recipe({"phases": [{"name": "short", "share": "50%"},
                                     {"name": "long", "share": "50%", "train": {"seq_len": 64}, "model": {"rope_theta": 40000}}]})
    p = compile_to(recipe, tmp_path / "run", host=host)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert p.recipe.train.seq_len == 32 and longest_seq_len(plan) == 64
    assert hf_config(plan, eos_id=256)[1]["max_position_embeddings"] == 64


def test_cli_export_of_a_prefix_objective_says_the_export_is_causal(llama_run, tmp_path):
    """A run trained with a bidirectional prefix (prefix_lm, span_corruption, ul2) exports the causal architecture:
    the command says what the exported model computes. (The run's plan.json is edited to say prefix_lm.)"""
    import shutil

    run_dir, cache = llama_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    plan = json.loads((copy / "plan.json").read_text())
    plan["objective"] = {"kind": "prefix_lm", "attention": "bidirectional over the prefix, causal after it"}
    (copy / "plan.json").write_text(json.dumps(plan))
    done = malt_cli("export", copy, "-o", tmp_path / "hf", cache=cache)
    assert done.returncode == 0, done.stderr
    assert "note: this run trained with prefix_lm (bidirectional over the prefix, causal after it); LlamaForCausalLM " \
           "attends causally everywhere" in done.stdout


def test_exported_tokenizer_adds_no_token_the_training_data_lacked():
    """A kind: file tokenizer whose post-processor prepends a BOS (Llama's) is exported without that step: the exported
    tokenizer encodes text as the data pipeline did (add_special_tokens=False), also when called with its defaults."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from malt.runtime.export import as_trained

    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "b": 3, "[UNK]": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    assert tok.encode("a b").ids == [0, 2, 3]
    exported = Tokenizer.from_str(json.dumps(as_trained(json.loads(tok.to_str()))))
    assert exported.encode("a b").ids == tok.encode("a b", add_special_tokens=False).ids == [2, 3]
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                              processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])])
    kept = as_trained(json.loads(tok.to_str()))["post_processor"]
    assert [p["type"] for p in kept["processors"]] == ["ByteLevel"]
    assert Tokenizer.from_str(json.dumps({**json.loads(tok.to_str()), "post_processor": kept})).encode("a b").ids == [2, 3]
