"""The Plan: a recipe with every value resolved for a target, plus the decisions behind it.

``lower(recipe, ...)`` builds the first Plan; then the passes in
:mod:`malt.compiler.passes` each take a Plan and return a new one. A pass never
mutates its input. ``Plan.to_json()`` is what ``malt plan --json`` prints and what
``plan.json`` holds next to a generated program.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .schema import Recipe

MALT_VERSION = "0.1.0"


@dataclass(frozen=True)
class Host:
    """What the compiling machine offers. Detected by the CLI; fixed in tests and golden files."""

    cuda: bool = False
    cuda_name: str = ""
    cuda_memory: int = 0             # bytes of the first CUDA device (0: unknown)
    cpu_cores: int = 2
    memory_bytes: int = 24 * 2**30
    cpu_bf16: bool = False           # the CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16 in /proc/cpuinfo)
    cpu_vendor: str = ""             # /proc/cpuinfo's vendor_id: GenuineIntel, AuthenticAMD, ... ("" elsewhere)
    cpu_avx512: bool = False         # the CPU has AVX-512 (avx512f)
    cpu_family: int = 0              # /proc/cpuinfo's cpu family (AMD: 25 Zen 3/4, 26 Zen 5); 0 unknown
    cxx_compiler: bool = False       # a C++ compiler on PATH: torch.compile's CPU backend needs one

    @staticmethod
    def detect() -> "Host":
        cuda, name, cuda_memory = False, "", 0
        # cheap detection first: importing torch costs about a second
        if os.environ.get("MALT_HOST_CUDA") in ("0", "1"):
            cuda = os.environ["MALT_HOST_CUDA"] == "1"
        elif os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version"):
            import torch

            cuda = torch.cuda.is_available()
            name = torch.cuda.get_device_name(0) if cuda else ""
            cuda_memory = torch.cuda.get_device_properties(0).total_memory if cuda else 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            memory = 8 * 2**30
        flags, vendor, family = set(), "", 0
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("vendor_id") and not vendor:
                        vendor = line.split(":", 1)[1].strip()
                    elif line.startswith("cpu family") and not family:
                        value = line.split(":", 1)[1].strip()
                        family = int(value) if value.isdigit() else 0
                    elif line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        import shutil

        cxx = any(shutil.which(c) for c in (os.environ.get("CXX") or "c++", "g++", "clang++"))
        return Host(cuda=cuda, cuda_name=name, cuda_memory=cuda_memory, cpu_cores=cores, memory_bytes=memory,
                    cpu_bf16=bool(flags & {"avx512_bf16", "amx_bf16"}), cpu_vendor=vendor, cpu_avx512="avx512f" in flags,
                    cpu_family=family, cxx_compiler=cxx)


@dataclass(frozen=True)
class Decision:
    name: str
    value: object
    reason: str


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    recipe_file: str                 # as the user named it (relative to the working directory)
    recipe_hash: str                 # sha256 of the resolved recipe
    host: Host
    tokenizer_vocab: int             # entries in the tokenizer
    # model shape, resolved
    n_kv_heads: int = 0
    head_dim: int = 0
    n_layers: int = 0                # the final model's depth (model.n_layers, times any growth)
    d_ff: int = 0
    vocab_size: int = 0              # model vocabulary before padding
    padded_vocab: int = 0
    # run length
    tokens_per_step: int = 0
    steps: int = 0
    tokens: int = 0
    warmup_steps: int = 0
    decay_start: int = 0             # step at which the decay part of the schedule begins
    # execution
    micro_batch: int = 0
    grad_accum: int = 0
    device: str = ""
    parallelism: str = "single"      # single | ddp | fsdp | hsdp
    world: int = 1                   # processes (devices), over all nodes
    nodes: int = 1                   # machines (target.nodes); world / nodes processes on each
    activation_checkpointing: str = "none"  # none | selective | full
    checkpoint_format: str = "full"  # full: safetensors of whole tensors; sharded: torch.distributed.checkpoint
    checkpoint_writes: str = "foreground"  # background: a full checkpoint is written by a thread while training goes on
    chip: str = ""
    precision: str = ""              # the compute dtype: fp32 | bf16
    master_weights: str = "fp32"     # dtype of the weights, gradients and AdamW moments: fp32 | bf16 (target.precision pure_bf16)
    compile: bool = False
    attention: str = ""
    matmul: str = "torch"            # fp32 products on a CPU: torch (its BLAS, MKL) | onednn (choose_matmul)
    masked_targets: bool = False     # some targets are -100 (no loss): the loss counts the others (choose_loss)
    fused_adamw: bool = False
    galore: object = None            # optimizer.kind galore: {"rank", "update_every", "scale"} resolved (choose_optimizer)
    schedule: object = None          # the recipe's schedule resolved over the whole run (phases.Schedule)
    phases: tuple = ()               # phases.PhaseRange, one per phase (one named main without phases:)
    sources: tuple = ()              # every data source any phase uses (SourceSpec), base sources first
    objective: dict = field(default_factory=dict)   # the objective and its derived numbers (resolve_objective pass)
    teacher: dict | None = None      # distillation: the teacher's shape, read from its directory when lowering
    estimates: dict = field(default_factory=dict)
    decisions: tuple = ()
    passes: tuple = ()

    def decide(self, name: str, value, reason: str, **changes) -> "Plan":
        """Record a decision and apply ``changes`` (a pass's usual return)."""
        kept = tuple(d for d in self.decisions if d.name != name)
        return replace(self, decisions=kept + (Decision(name, value, reason),), **changes)

    def to_json(self) -> dict:
        r = self.recipe
        est = self.estimates
        return {
            "malt_version": MALT_VERSION,
            "recipe": self.recipe_file,
            "recipe_hash": self.recipe_hash,
            "name": r.name,
            "params": est.get("params"),
            "params_non_embedding": est.get("params_non_embedding"),
            **({"params_generator": est["params_generator"]} if "params_generator" in est else {}),  # rtd: ELECTRA's generator, in params
            "flops_per_token": est.get("flops_per_token"),
            "tokens": self.tokens,
            "steps": self.steps,
            "total_flops": est.get("total_flops"),
            **({"teacher_params": est["teacher_params"], "teacher_flops_per_token": est["teacher_flops_per_token"]}
               if "teacher_params" in est else {}),  # distillation: total_flops includes the teacher's forward passes
            "memory_per_device_bytes": est.get("memory_per_device_bytes"),
            "memory_budget_bytes": est.get("memory_budget_bytes"),  # one device's memory (a plan uses at most 80% of it)
            **({"recompute_flops": est["recompute_flops"]} if est.get("recompute_flops") else {}),  # activation checkpointing
            **({"masked_attention_flops": est["masked_attention_flops"]}  # a sliding window as a dense mask: keys computed, then masked
               if est.get("masked_attention_flops") else {}),
            **({"unselected_head_flops": est["unselected_head_flops"]}  # a compiled masked-LM head decodes every position
               if est.get("unselected_head_flops") else {}),
            **({"eval_flops": est["eval_flops"], "eval_seconds": est["eval_seconds"]}
               if est.get("eval_flops") else {}),  # the evaluations' forwards, in estimated_seconds
            "estimated_seconds": est.get("estimated_seconds"),
            "estimate_basis": est.get("basis"),
            "model": {
                "family": r.model.family, "d_model": r.model.d_model, "n_layers": self.n_layers or r.model.n_layers,
                "n_heads": r.model.n_heads, "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim,
                "d_ff": self.d_ff, "vocab_size": self.vocab_size, "padded_vocab": self.padded_vocab,
                "tie_embeddings": r.model.tie_embeddings, "qkv_bias": r.model.qkv_bias,
                "norm_eps": r.model.norm_eps, "rope_theta": r.model.rope_theta, "init_std": r.model.init_std,
                "pad_vocab_multiple": r.model.pad_vocab_multiple,
                "activation": r.model.activation, "norm": r.model.norm, "norm_position": r.model.norm_position,
                "position": r.model.position, "unpad": r.model.unpad,
                **({"sliding_window": r.model.sliding_window} if r.model.sliding_window is not None else {}),  # set: export writes Mistral
            },
            "batch": {
                "seq_len": r.train.seq_len, "global_batch": r.train.global_batch, "micro_batch": self.micro_batch,
                "grad_accum": self.grad_accum, "tokens_per_step": self.tokens_per_step,
            },
            "schedule": {"warmup_steps": self.warmup_steps, "decay": r.schedule.decay, "decay_start": self.decay_start},
            "execution": {
                "device": self.device, "devices": self.world, "parallelism": self.parallelism,
                "chip": self.chip, "precision": self.precision, "master_weights": self.master_weights, "compile": self.compile,
                "attention": self.attention, "matmul": self.matmul, "fused_adamw": self.fused_adamw,
                "nodes": self.nodes, "activation_checkpointing": self.activation_checkpointing,
                "checkpoint_format": self.checkpoint_format,
                "checkpoint_writes": self.checkpoint_writes,
            },
            "objective": self.objective,
            **({"init_from": {"path": r.init_from.path, "optimizer": r.init_from.optimizer}}  # relative to the recipe
               if r.init_from is not None else {}),
            "phases": [self._phase_json(ph) for ph in self.phases] if self.recipe.phases else [],
            "decisions": [{"name": d.name, "value": d.value, "reason": d.reason} for d in self.decisions],
            "passes": list(self.passes),
        }


    def _phase_json(self, ph) -> dict:
        sch = ph.schedule
        return {
            "name": ph.name, "start_step": ph.start, "end_step": ph.end, "steps": ph.steps,
            "tokens": ph.steps * ph.tokens_per_step, "seq_len": ph.seq_len, "global_batch": ph.global_batch,
            "micro_batch": ph.micro_batch, "grad_accum": ph.grad_accum,
            "weights": {s.name: w for s, w in zip(self.sources, ph.weights)},
            "rope_theta": ph.rope_theta, "lr": ph.lr, "weight_decay": ph.weight_decay,
            "n_layers": ph.n_layers, "params": self.estimates.get("phase_params", {}).get(ph.name),
            "schedule": ({"decay": sch.decay, "warmup_steps": sch.warmup, "lr": sch.lr, "min_lr": sch.min_lr}
                         if sch else "the recipe's schedule"),
            "changes": list(ph.changes),
            "flops": self.estimates.get("phase_flops", {}).get(ph.name),
        }


def resolved_recipe(recipe: Recipe, base_dir: Path | None = None, out_dir: Path | None = None) -> dict:
    """The recipe as plain data with every default written out (recipe.lock.yaml), less the fields that its
    choices leave unread (decay_share under a cosine decay, max_chars of a tokenizer that is not trained, ...),
    which a recipe may not set: so the lock is itself a valid recipe. With ``base_dir`` (the recipe's folder) and
    ``out_dir`` (the lock's), its relative file paths are rewritten to name the same files from ``out_dir``."""
    from .loader import _rebase_paths
    from .schema import SCHEDULE_FIELD_USERS

    data = recipe.model_dump(mode="json")
    sch = data["schedule"]
    readers = {sch["decay"]} | {(ph.get("schedule") or {}).get("decay") or sch["decay"]
                                for ph in data.get("phases") or [] if ph.get("schedule")}
    for name, users in SCHEDULE_FIELD_USERS.items():
        if not readers & set(users):
            sch.pop(name, None)
    if data["optimizer"]["kind"] != "galore":
        for key in ("rank", "update_every", "scale"):
            data["optimizer"].pop(key, None)
    if data["tokenizer"]["kind"] not in ("bpe", "unigram"):  # a tokenizer that is not trained (a parent's settings for one)
        for key in ("max_chars", "train_on"):
            data["tokenizer"].pop(key, None)
    if data["tokenizer"]["kind"] in ("file", "bytes"):  # the file's, or 256 + the special tokens
        data["tokenizer"].pop("vocab_size", None)
    if data["model"].get("position", "rope") != "rope":
        data["model"].pop("rope_theta", None)
    if data["model"]["family"] == "bert":  # an encoder does not sample at the end of its run
        data["train"].pop("sample_tokens", None)
        data["train"].pop("sample_prompt", None)
    elif data["train"].get("sample_tokens") == 0:  # no sample: no prompt
        data["train"].pop("sample_prompt", None)
    if data.get("init_from") is not None:  # the checkpoint gives every weight its starting value
        data["model"].pop("init_std", None)
    if base_dir is not None and out_dir is not None:
        _rebase_paths(data, Path(base_dir).resolve(), Path(out_dir).resolve())
    return data


# Bump when the value of an existing default changes (what a recipe that leaves it out trains): runs started
# before then must not resume under the new meaning. New fields whose defaults keep the old behaviour need no bump.
DEFAULTS_VERSION = 1
# train fields that change neither the batches nor the updates (evaluation, logging, checkpoints, the final sample)
MONITORING = ("checkpoint_format", "checkpoint_writes", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_batches", "eval_per_source",
              "log_every", "sample_tokens", "sample_prompt")
# train fields the recipe hash leaves out: MONITORING, and how a device's share of the batch is split into
# micro-batches (the batches are the same for any split, and another number of devices may need another)
HASH_FREE_TRAIN = (*MONITORING, "micro_batch")


def hashed_field(dotted: str) -> bool:
    """Whether recipe_hash covers the recipe field at ``dotted`` (such as train.steps or phases.1.train.micro_batch):
    not target, not HASH_FREE_TRAIN (top-level or a phase's)."""
    parts = dotted.split(".")
    train = parts[1:] if parts[0] == "train" else parts[3:] if parts[0] == "phases" and parts[2:3] == ["train"] else None
    return parts[0] != "target" and not (train and train[0] in HASH_FREE_TRAIN)


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of what the recipe says differently from malt's defaults, without its target and the train fields
    that only watch or split the run (HASH_FREE_TRAIN: evaluation, logging, checkpoints, sample, micro_batch, also in
    phases): the same training on any hardware has the same hash, so a run can resume on another machine, number
    of devices or precision; and a malt that adds fields (defaulting to the old behaviour) keeps the hashes of
    existing runs, so they resume after an upgrade. ``DEFAULTS_VERSION`` stands for the defaults. (Leaving
    micro_batch out, 2026-11-26, changed the hash of recipes that write it: such runs resume with the malt that
    started them.)"""
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    data.pop("target", None)
    for key in HASH_FREE_TRAIN:  # how the run is watched, saved and split, not what it trains: a resume may change them
        data.get("train", {}).pop(key, None)
        for ph in data.get("phases") or []:
            (ph.get("train") or {}).pop(key, None)
    for ph in data.get("phases") or []:
        if ph.get("train") == {}:  # a phase that only set such fields trains as if it set none
            ph.pop("train")
    blob = json.dumps({"defaults": DEFAULTS_VERSION, "recipe": data}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def lower(recipe: Recipe, recipe_file: str, tokenizer_vocab: int, host: Host, teacher: dict | None = None) -> Plan:
    """The starting Plan: the recipe and its provenance (and a distillation teacher's shape), nothing decided yet."""
    return Plan(recipe=recipe, recipe_file=recipe_file, recipe_hash=recipe_hash(recipe), host=host,
                tokenizer_vocab=tokenizer_vocab, teacher=teacher)


def run_passes(plan: Plan) -> Plan:
    from .passes import PIPELINE

    for name, fn in PIPELINE:
        plan = fn(plan)
        plan = replace(plan, passes=plan.passes + (name,))
    return plan
