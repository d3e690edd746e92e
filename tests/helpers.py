"""Small recipes and corpora for tests, written into a temporary directory."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

WORDS = ("the model reads tokens and learns to predict the next one from the ones before it while "
         "a recipe says what to train and malt compiles it into a program that a reviewer can read").split()


def write_corpus(path: Path, n_docs: int = 200, seed: int = 0) -> Path:
    """A .jsonl corpus of short synthetic documents (deterministic)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_docs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 80))]
        lines.append('{"text": "doc %d: %s."}' % (i, " ".join(words)))
    path.write_text("\n".join(lines) + "\n")
    return path


TINY = """\
name: {name}
seed: 7
model: {{d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 128, tie_embeddings: true}}
tokenizer: {{kind: bytes}}
data:
  sources:
    - {{name: corpus, path: corpus.jsonl, weight: 1.0}}
  validation: 5%
optimizer: {{lr: 3e-3, weight_decay: 0.1, grad_clip: 1.0}}
schedule: {{warmup: 2, decay: cosine}}
train: {{seq_len: 32, global_batch: 8, micro_batch: 4, steps: {steps}, log_every: 1, eval_every: {eval_every}, checkpoint_every: {checkpoint_every}, eval_batches: 2, sample_tokens: 8}}
target: {{accelerator: cpu, precision: fp32, compile: off}}
"""


def write_tiny_recipe(directory: Path, name: str = "t", steps: int = 8, eval_every: int = 4, checkpoint_every: int = 4,
                      corpus_docs: int = 200) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_corpus(directory / "corpus.jsonl", corpus_docs)
    path = directory / "recipe.yaml"
    path.write_text(TINY.format(name=name, steps=steps, eval_every=eval_every, checkpoint_every=checkpoint_every))
    return path


def run_env(cache: Path) -> dict:
    env = os.environ.copy()
    env["MALT_CACHE_DIR"] = str(cache)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_program(run_dir: Path, cache: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(run_dir / "train.py"), *args], env=run_env(cache),
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def hold_writes(monkeypatch, module, name: str):
    """A fixture's body: ``module.name`` (a checkpoint writer's file or DCP save) blocked until the test sets the
    yielded event, a background checkpoint caught in flight; at the end the write is let go and waited for."""
    import threading

    from malt.runtime import checkpoint

    gate, real = threading.Event(), getattr(module, name)

    def slow(*args, **kwargs):
        assert gate.wait(30), "the test never released the write"
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, slow)
    yield gate
    gate.set()
    checkpoint.wait(raise_error=False)
