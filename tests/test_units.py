"""Readable units: `2M` tokens, `5%`, `2k` steps, `3e-4`; and clear errors for anything else."""

from __future__ import annotations

import pytest
import yaml

from malt.compiler.api import check
from malt.compiler.diagnostics import RecipeError
from malt.compiler.schema import steps_of
from malt.compiler.units import human_bytes, human_count, human_seconds, parse_count, parse_float, parse_fraction


@pytest.mark.parametrize("text, value", [
    ("2M", 2_000_000), ("2k", 2_000), ("2K", 2_000), ("57B", 57_000_000_000), ("1G", 10**9), ("1T", 10**12),
    ("1.5k", 1_500), ("0.5M", 500_000), ("4096", 4096), (4096, 4096), ("1_000", 1_000), ("1e6", 1_000_000),
    ("2 M", 2_000_000), (" 3k ", 3_000), (0, 0), (64.0, 64),
])
def test_parse_count(text, value):
    assert parse_count(text) == value
    assert isinstance(parse_count(text), int)


@pytest.mark.parametrize("text, message", [
    ("2X", "expected a count such as 4096, 2k or 2M, got '2X'"),
    ("two", "expected a count such as 4096, 2k or 2M, got 'two'"),
    ("", "expected a count"),
    ("-3", "expected a count"),
    (-3, "expected a count of zero or more, got -3"),
    ("1.5", "'1.5' is not a whole number"),
    ("1.0001k", "is not a whole number"),
    (2.5, "expected a whole number, got 2.5"),
    (True, "got a boolean"),
    (None, "got None"),
    ([1], "got [1]"),
    (float("inf"), "expected a whole number, got inf"),   # used to raise OverflowError
    (float("nan"), "expected a whole number"),
    ("1e400", "is not a whole number"),                  # overflows to inf
])
def test_parse_count_errors(text, message):
    with pytest.raises(ValueError) as info:
        parse_count(text)
    assert message in str(info.value)


@pytest.mark.parametrize("text, value", [
    ("5%", 0.05), ("100%", 1.0), ("0%", 0.0), ("12.5%", 0.125), (" 1 % ", 0.01), (0.05, 0.05), (0, 0.0), (1, 1.0), ("0.25", 0.25),
    ("1e-10%", 1e-12),  # how a tiny warmup fraction prints back ("{:g}%"); found by tests/test_recipe_mutations.py
])
def test_parse_fraction(text, value):
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text, message", [
    ("150%", "'150%' is more than 100%"),
    (1.5, "expected a fraction between 0 and 1 (or a percentage such as 5%), got 1.5"),
    (-0.1, "expected a fraction between 0 and 1"),
    ("-5%", "expected a fraction such as 5% or 0.05, got '-5%'"),
    ("five percent", "expected a fraction such as 5% or 0.05"),
    (True, "got a boolean"),
    (float("nan"), "expected a fraction"),
])
def test_parse_fraction_errors(text, message):
    with pytest.raises(ValueError) as info:
        parse_fraction(text)
    assert message in str(info.value)


def test_yaml_reads_3e_4_as_text_and_parse_float_reads_it():
    # YAML 1.1 needs a dot for a float, so 3e-4 arrives as the string '3e-4'
    assert yaml.safe_load("lr: 3e-4") == {"lr": "3e-4"}
    assert parse_float("3e-4") == pytest.approx(3e-4)
    assert parse_float(" 1E-3 ") == pytest.approx(1e-3)
    assert parse_float(3) == 3.0 and isinstance(parse_float(3), float)
    assert parse_float(0.1) == 0.1


@pytest.mark.parametrize("text, message", [
    ("3e-4x", "expected a number such as 3e-4, got '3e-4x'"),
    ("fast", "expected a number such as 3e-4, got 'fast'"),
    (None, "expected a number such as 3e-4, got None"),
    (True, "expected a number, got a boolean"),
    ("nan", "expected a finite number, got 'nan'"),
    (".inf", "expected a number"),
    (float("inf"), "expected a finite number"),
    (10**400, "expected a finite number"),
])
def test_parse_float_errors(text, message):
    with pytest.raises(ValueError) as info:
        parse_float(text)
    assert message in str(info.value)


def test_steps_of_resolves_shares_and_counts():
    assert steps_of("5%", 1000) == 50
    assert steps_of(200, 1000) == 200


def test_human_formats():
    assert human_count(1_048_576) == "1.05M"
    assert human_count(57e9) == "57B"
    assert human_count(512) == "512"
    assert human_bytes(3 * 2**30) == "3.00 GiB"
    assert human_bytes(100) == "100 B"
    assert human_seconds(30) == "30.0 s"
    assert human_seconds(7200) == "2.0 h"
    assert human_seconds(86400 * 3) == "3.0 days"


# ---- units inside a recipe -------------------------------------------------------------

RECIPE = """\
name: units
model: {d_model: 64, n_layers: 2, n_heads: 4}
tokenizer: {kind: bpe, vocab_size: 300, max_chars: 2M}
data:
  sources:
    - {name: docs, path: docs.txt}
  validation: 5%
optimizer:
  lr: 3e-4
  eps: 1e-8
schedule: {warmup: 5%}
train:
  seq_len: 32
  global_batch: 8
  steps: 2k
  eval_every: 1k
"""


@pytest.fixture
def write(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs.txt").write_text("some text to train on\n")

    def write(text: str) -> str:
        (tmp_path / "recipe.yaml").write_text(text)
        return "recipe.yaml"
    return write


def test_units_in_a_recipe(write):
    r, _ = check(write(RECIPE))
    assert r.train.steps == 2_000 and r.train.eval_every == 1_000
    assert r.tokenizer.max_chars == 2_000_000
    assert r.optimizer.lr == pytest.approx(3e-4) and r.optimizer.eps == pytest.approx(1e-8)
    assert r.data.validation == pytest.approx(0.05)
    assert r.schedule.warmup == "5%"
    assert steps_of(r.schedule.warmup, r.train.steps) == 100


def test_tokens_2M_in_a_recipe(write):
    r, _ = check(write(RECIPE.replace("  steps: 2k\n", "  tokens: 2M\n")))
    assert r.train.tokens == 2_000_000 and r.train.steps is None


def test_warmup_in_steps(write):
    r, _ = check(write(RECIPE.replace("warmup: 5%", "warmup: 2k").replace("steps: 2k", "steps: 10k")))
    assert r.schedule.warmup == 2_000


def _errors(path, sets=None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        check(path, sets)
    return [d.format() for d in info.value.diagnostics]


@pytest.mark.parametrize("old, new, expected", [
    ("  steps: 2k", "  steps: 2X",
     "recipe.yaml:15:3: error: train.steps: expected a count such as 4096, 2k or 2M, got '2X'\n"
     "    hint: write a whole number, optionally with k, M, B or T: 500, 2k, 2M, 1.5B"),
    ("  steps: 2k", "  steps: 1.5",
     "recipe.yaml:15:3: error: train.steps: expected a whole number, got 1.5\n"
     "    hint: write a whole number, optionally with k, M, B or T: 500, 2k, 2M, 1.5B"),
    ("  steps: 2k", "  steps: -10",
     "recipe.yaml:15:3: error: train.steps: expected a count of zero or more, got -10\n"),
    ("  validation: 5%", "  validation: 150%",
     "recipe.yaml:7:3: error: data.validation: '150%' is more than 100%\n"
     "    hint: write a share as a percentage such as 5% or as a number between 0 and 1 such as 0.05"),
    ("  validation: 5%", "  validation: lots",
     "recipe.yaml:7:3: error: data.validation: expected a fraction such as 5% or 0.05, got 'lots'\n"),
    ("  lr: 3e-4", "  lr: 3e-4x",
     "recipe.yaml:9:3: error: optimizer.lr: expected a number such as 3e-4, got '3e-4x'\n"
     "    hint: write a number such as 0.1 or 3e-4"),
    ("  lr: 3e-4", "  lr: .nan",
     "recipe.yaml:9:3: error: optimizer.lr: expected a finite number, got nan\n"),
    ("schedule: {warmup: 5%}", "schedule: {warmup: 120%}",
     "recipe.yaml:11:12: error: schedule.warmup: '120%' is more than 100%\n"),
    ("  global_batch: 8", "  global_batch: 8k",
     "recipe.yaml:14:3: error: train.global_batch: expected a whole number, got '8k'\n"
     "    hint: write a whole number without quotes, such as 256"),
    ("  global_batch: 8", "  global_batch: true",
     "recipe.yaml:14:3: error: train.global_batch: expected a whole number, got True\n"),
])
def test_bad_units_have_clear_errors(write, old, new, expected):
    assert old in RECIPE
    errors = _errors(write(RECIPE.replace(old, new)))
    assert len(errors) == 1, errors
    assert errors[0].startswith(expected), errors[0]
    assert "\n    hint: " in errors[0]


def test_huge_token_count_is_an_error_not_a_crash(write):
    errors = _errors(write(RECIPE), ["train.steps=.inf"])
    assert errors == ["command line (--set train.steps=.inf): error: train.steps: expected a whole number, got inf\n"
                      "    hint: write a whole number, optionally with k, M, B or T: 500, 2k, 2M, 1.5B"]


def test_divisors_of_any_size_come_at_once():
    """Hints list divisors of recipe numbers: an absurd value (a prime near 1e9, 2^70) must not hang a check."""
    from malt.compiler.units import divisors

    assert divisors(1) == [1] and divisors(12) == [1, 2, 3, 4, 6, 12] and divisors(97) == [1, 97]
    assert divisors(2 ** 70) == [2 ** k for k in range(71)] and divisors(1_000_000_007) == [1, 1_000_000_007]
    assert divisors(720720)[:6] == [1, 2, 3, 4, 5, 6] and len(divisors(720720)) == 240
