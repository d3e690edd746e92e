"""init_from: continual pre-training from a malt run or a Hugging Face directory."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from malt.compiler.api import check, compile_to
from malt.compiler.diagnostics import RecipeError
from malt.compiler.plan import Host
from malt.runtime.checkpoint import init_from
from malt.runtime.export import export_hf

from .helpers import run_program, write_tiny_recipe
from .test_run import val_losses

pytestmark = pytest.mark.slow


def with_init(recipe, init: str):
    recipe.write_text(recipe.read_text() + init)
    return recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run and its Hugging Face export."""
    tmp = tmp_path_factory.mktemp("base")
    recipe = write_tiny_recipe(tmp / "r", steps=6, eval_every=6, checkpoint_every=6)
    run = tmp / "run"
    compile_to(recipe, run, host=Host())
    run_program(run, tmp / "cache", "--quiet")
    export_hf(run, tmp / "hf")
    return tmp, run


@pytest.mark.parametrize("source, carry", [("hf", False), ("run", False), ("run", True)])
def test_continual_run_starts_at_the_source_models_loss(trained, tmp_path, source, carry):
    tmp, run = trained
    init = f"init_from: {{path: {tmp / source}, optimizer: {'carry' if carry else 'fresh'}}}\n"
    recipe = with_init(write_tiny_recipe(tmp_path / "r", steps=3, eval_every=3, checkpoint_every=3), init)
    child = tmp_path / "child"
    compile_to(recipe, child, host=Host())
    out = run_program(child, tmp / "cache")
    assert "init_from: " in out.stdout and ("with its optimizer state" in out.stdout) == carry
    # the same weights on the same validation batches: the new run's first evaluation is the source's last
    assert val_losses(child)[0] == val_losses(run)[6]
    assert val_losses(child)[3] < val_losses(child)[0] + 0.5


def test_shape_mismatch_is_reported_field_by_field(trained, tmp_path):
    tmp, _ = trained
    recipe = with_init(write_tiny_recipe(tmp_path / "r"), f"init_from: {tmp / 'hf'}\n")
    recipe.write_text(recipe.read_text().replace("d_model: 64", "d_model: 128").replace("n_kv_heads: 2", "n_kv_heads: 4"))
    with pytest.raises(RecipeError) as err:
        check(recipe)
    text = str(err.value)
    assert "model.d_model: d_model is 128 here but 64 in" in text
    assert "model.n_kv_heads: n_kv_heads is 4 here but 2 in" in text
    assert "recipe.yaml:3:" in text  # the model line of the recipe


def test_carrying_optimizer_state_needs_a_malt_run(trained, tmp_path):
    tmp, _ = trained
    recipe = with_init(write_tiny_recipe(tmp_path / "r"), f"init_from: {{path: {tmp / 'hf'}, optimizer: carry}}\n")
    with pytest.raises(RecipeError, match="only be carried over from a malt run directory"):
        check(recipe)
    recipe = with_init(write_tiny_recipe(tmp_path / "q"), f"init_from: {tmp_path / 'nothing'}\n")
    with pytest.raises(RecipeError, match="init_from.path: no directory"):
        check(recipe)


def assert_starts_as(run_dir, hf_dir, hf):
    """The generated model of run_dir, started from hf_dir by init_from, computes transformers' logits (to 1e-5)."""
    from .conftest import import_model_module

    model = import_model_module(run_dir).Transformer().eval()
    init_from(hf_dir, "hf", model, log=lambda *_: None)
    tokens = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_hugging_face_layouts_load_with_identical_logits(tmp_path, arch):
    """A directory written by transformers' own save_pretrained (not malt's export) loads into malt's model."""
    import transformers

    qkv = arch == "qwen2"
    cls, cfg = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig),
                "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config)}[arch]
    config = cfg(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_theta=10000.0, **({"sliding_window": None} if arch == "mistral" else {}))
    torch.manual_seed(0)
    hf = cls(config).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)

    sets = ["model.tie_embeddings=false", f"model.qkv_bias={'true' if qkv else 'false'}"]
    recipe = with_init(write_tiny_recipe(tmp_path / "r"), f"init_from: {tmp_path / 'hf'}\n")
    compile_to(recipe, tmp_path / "run", sets=sets, host=Host())
    assert_starts_as(tmp_path / "run", tmp_path / "hf", hf)


def test_tokens_the_recipe_adds_are_named_when_they_grow_the_vocabulary(trained, tmp_path):
    """FIM, UL2's sentinels or control tokens append to the tokenizer: from a checkpoint without them the vocabulary
    grows, which is not built yet; the error says so instead of only suggesting the checkpoint's tokenizer."""
    tmp, _ = trained
    recipe = with_init(write_tiny_recipe(tmp_path / "r"), f"init_from: {tmp / 'run'}\n")
    tokens = ", ".join(f"'<|t{i}|>'" for i in range(70))           # 257 + 70 tokens: padded to 384, the checkpoint has 320
    recipe.write_text(recipe.read_text().replace("tokenizer: {kind: bytes}", f"tokenizer: {{kind: bytes, add_special_tokens: [{tokens}]}}"))
    with pytest.raises(RecipeError) as err:
        check(recipe)
    text = str(err.value)
    assert "vocab is 384 here but 320 in" in text and "this recipe adds 70 special token(s) to the tokenizer (<|t0|>, <|t1|>, <|t2|>, ...)" in text
    assert "start from a checkpoint trained with the same objective" in text
    # an objective that adds tokens (UL2's sentinels and mode tokens): the error is shown at the objective's line
    text = recipe.read_text().replace(f", add_special_tokens: [{tokens}]", "").replace("seq_len: 32", "seq_len: 512")
    recipe.write_text(text + "objective: {kind: ul2}\n")
    with pytest.raises(RecipeError) as err:
        check(recipe)
    found = [d for d in err.value.diagnostics if "special token(s)" in d.message]
    assert len(found) == 1 and found[0].path == "objective.kind", [d.format() for d in err.value.diagnostics]


def test_a_checkpoints_rotary_base_and_norm_eps_must_be_the_recipes(tmp_path):
    """The weights do not carry rope_theta, norm_eps, the activation or rope scaling: a Qwen2 checkpoint (rope_theta 1e6,
    rms_norm_eps 1e-6) under the recipe's defaults (10000, 1e-5) is an error that names both values; written in the recipe,
    the logits equal transformers'. Another activation or scaled rotary embeddings are refused."""
    import transformers

    config = transformers.Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    sets = ["model.tie_embeddings=false", "model.qkv_bias=true"]
    recipe = with_init(write_tiny_recipe(tmp_path / "r"), f"init_from: {tmp_path / 'hf'}\n")
    with pytest.raises(RecipeError) as err:
        check(recipe, sets)
    text = str(err.value)
    assert "model.norm_eps: norm_eps is 1e-05 here (the default) but 1e-06 in" in text and "set model.norm_eps: 1e-06" in text
    assert "model.rope_theta: rope_theta is 10000.0 here (the default) but 1000000.0 in" in text
    assert "set model.rope_theta: 1000000.0" in text

    sets += ["model.rope_theta=1000000", "model.norm_eps=1e-6"]
    compile_to(recipe, tmp_path / "run", sets=sets, host=Host())
    assert_starts_as(tmp_path / "run", tmp_path / "hf", hf)

    for change, expected in [({"hidden_act": "gelu"}, "uses hidden_act 'gelu'; malt's model is SwiGLU"),
                             ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, "scales its rotary embeddings")]:
        config_file = tmp_path / "hf" / "config.json"
        saved = config_file.read_text()
        config_file.write_text(json.dumps({**json.loads(saved), **change}))
        with pytest.raises(RecipeError) as err:
            check(recipe, sets)
        assert expected in str(err.value) and "start from another checkpoint" in str(err.value)
        config_file.write_text(saved)


def test_a_tokenizer_file_without_the_end_of_text_token_is_named(tmp_path):
    """docs: a Hugging Face model's tokenizer.json as tokenizer: {kind: file}. When the file lacks
    tokenizer.special_tokens' default <|endoftext|>, malt appends it and the vocabulary outgrows the checkpoint's:
    the error says so and how to fix it; with the file's own end-of-text token the recipe checks."""
    import transformers
    from tokenizers import Tokenizer, models

    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 320)}}
    Tokenizer(models.WordLevel(vocab, unk_token="w2")).save(str(tmp_path / "tokenizer.json"))
    config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf", safe_serialization=True)
    recipe = with_init(write_tiny_recipe(tmp_path / "r"), f"init_from: {tmp_path / 'hf'}\n")
    sets = ["model.tie_embeddings=false", "model.pad_vocab_multiple=1", "tokenizer.kind=file",
            f"tokenizer.path={tmp_path / 'tokenizer.json'}"]
    with pytest.raises(RecipeError) as err:
        check(recipe, sets)
    text = str(err.value)
    assert "vocab is 321 here but 320 in" in text and "the tokenizer file has no <|endoftext|>, so malt appends it" in text
    assert "set tokenizer.special_tokens to the checkpoint's end-of-text token" in text
    check(recipe, [*sets, "tokenizer.special_tokens=['</s>']"])


def test_init_from_problems_come_with_the_rest(trained, tmp_path):
    """A recipe with other problems still reports the checkpoint's mismatches in the same round."""
    tmp, _ = trained
    recipe = with_init(write_tiny_recipe(tmp_path / "r"), f"init_from: {tmp / 'hf'}\n")
    recipe.write_text(recipe.read_text().replace("d_model: 64", "d_model: 128"))
    with pytest.raises(RecipeError) as err:
        check(recipe, ["train.global_batch=7"])
    text = str(err.value)
    assert "model.d_model: d_model is 128 here but 64 in" in text and "global_batch (7)" in text


def test_a_run_with_another_tokenizer_of_the_same_size_is_refused(trained, tmp_path):
    """Same vocabulary size, other tokens (here the end-of-text token is another string): the shapes fit, but each
    embedding row would start as another token's. The program stops before training and names the tokenizer to use."""
    tmp, _ = trained
    recipe = with_init(write_tiny_recipe(tmp_path / "r", steps=3, eval_every=3, checkpoint_every=3), f"init_from: {tmp / 'run'}\n")
    recipe.write_text(recipe.read_text().replace("tokenizer: {kind: bytes}", "tokenizer: {kind: bytes, special_tokens: ['<|eot|>']}"))
    check(recipe)  # the sizes agree: only the tokens themselves tell
    child = tmp_path / "child"
    compile_to(recipe, child, host=Host())
    out = run_program(child, tmp / "cache", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "init_from: the checkpoint's tokenizer" in out.stderr and "differs from this run's: 1 token(s)" in out.stderr
    assert "<|eot|>" in out.stderr and f"tokenizer: {{kind: file, path: {(tmp / 'run').resolve() / 'tokenizer.json'}}}" in out.stderr
    assert not (child / "checkpoints").exists() or not any((child / "checkpoints").iterdir())


def test_the_plan_says_where_the_weights_come_from(trained, tmp_path):
    from typer.testing import CliRunner

    from malt.compiler.cli import app

    tmp, _ = trained
    recipe = with_init(write_tiny_recipe(tmp_path / "r"), f"init_from: {{path: {tmp / 'run'}, optimizer: carry}}\n")
    out = CliRunner().invoke(app, ["plan", str(recipe)])
    assert out.exit_code == 0, out.output
    assert f"init       the weights of {tmp / 'run'} (malt run, its latest checkpoint: step 6), AdamW moments carried over" in out.output
    out = CliRunner().invoke(app, ["plan", str(recipe), "--json"])
    assert json.loads(out.output)["init_from"] == {"path": str(tmp / "run"), "optimizer": "carry"}
    hf = with_init(write_tiny_recipe(tmp_path / "h"), f"init_from: {tmp / 'hf'}\n")
    out = CliRunner().invoke(app, ["plan", str(hf)])
    assert "(a Hugging Face LlamaForCausalLM), AdamW moments fresh" in out.output


def test_a_run_resumes_after_its_init_from_source_is_gone(trained, tmp_path):
    """init_from applies to a first start only: once the run has its own checkpoints, `malt run --resume` works
    without the source (it used to stop at `malt check`'s "no directory"); a first start without it is still an error."""
    import shutil
    import subprocess

    from .helpers import run_env

    tmp, run = trained
    source = tmp_path / "base"
    shutil.copytree(run, source, ignore=shutil.ignore_patterns(".lock"))
    recipe = with_init(write_tiny_recipe(tmp_path / "r", steps=4, eval_every=2, checkpoint_every=2), f"init_from: {source}\n")
    malt = [sys.executable, "-m", "malt.compiler.cli", "run", str(recipe), "--run-dir", str(tmp_path / "child")]
    first = subprocess.run(malt, env=run_env(tmp / "cache"), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    shutil.rmtree(source)
    again = subprocess.run(malt + ["--resume"], env=run_env(tmp / "cache"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "at step 4 of 4: already complete" in again.stdout, again.stdout + again.stderr
    assert "done: the run was already complete at step 4; nothing was trained" in again.stdout
    assert "INIT_FROM = {'path': " in (tmp_path / "child" / "train.py").read_text() and "'kind': 'malt'" in (
        tmp_path / "child" / "train.py").read_text()
    with pytest.raises(RecipeError, match="init_from.path: no directory"):
        check(recipe)
