"""Validate a loaded recipe: not-yet-built features, the schema, then cross-field checks.

All problems are collected and raised together as one :class:`RecipeError`,
each pointing at the file, line and column of the value at fault.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

from pydantic import BaseModel, ValidationError

from . import encoder, sliding_window
from .diagnostics import Diagnostic, RecipeError, did_you_mean
from .loader import Loaded
from .conditioning import problems as conditioning_problems
from .objectives import added_tokens, problems as objective_problems
from .phases import final_lr_problems, resolve as resolve_phases, schedule_field_problems, schedule_overlap_problems, tidy
from .schema import SCHEDULE_FIELD_USERS, ModelSpec, Recipe, steps_of
from .tpu import problems as tpu_problems
from .units import divisors

BUILTIN_SOURCES = {
    "builtin:python-docs": "docstrings and comments of this Python's standard library",
    "builtin:python-code": "source code of this Python's standard library",
}
SUPPORTED_SUFFIXES = (".txt", ".txt.gz", ".txt.zst", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")  # see malt.runtime.sources

# Keys and values that name capabilities malt does not have yet. They are rejected
# with a message that says so, rather than reported as typos or silently ignored.
NOT_BUILT_KEYS: dict[tuple, str] = {}
NOT_BUILT_VALUES = {
    ("model", "family"): ({"t5", "gpt2"}, "families built so far: llama (decoder-only) and bert (encoder)"),
    ("model", "activation"): ({"relu2", "relu"}, "activations built so far: swiglu (llama), gelu and geglu (bert)"),
    ("target", "accelerator"): ({"xla"}, "XLA is built for TPUs only: use accelerator: tpu (torch-xla); accelerators built so far: cpu, cuda, tpu, auto"),
    ("optimizer", "kind"): ({"adam", "sgd", "lion", "muon", "adafactor"}, "optimizers built so far: adamw and galore"),
}


# model families other tools name that malt writes as family llama: (what makes that family, the fields that say so)
WRITTEN_AS_LLAMA = {
    "mistral": ("Mistral's architecture is the llama family with sliding-window attention",
                "family: llama with model.sliding_window: 4096 (Mistral 7B v0.1; later Mistral models attend to every position)"),
    "qwen2": ("Qwen2's architecture is the llama family with biases on the q, k and v projections",
              "family: llama with model.qkv_bias: true and model.rope_theta: 1000000 (as Qwen2)"),
    "llama2": ("Llama 2 is the llama family", "family: llama"),
    "llama3": ("Llama 3 is the llama family", "family: llama with model.rope_theta: 500000 (as Llama 3)"),
}
WRITTEN_AS_LLAMA.update({"qwen": WRITTEN_AS_LLAMA["qwen2"], "qwen2.5": WRITTEN_AS_LLAMA["qwen2"],
                         "llama-2": WRITTEN_AS_LLAMA["llama2"], "llama-3": WRITTEN_AS_LLAMA["llama3"],
                         "llama3.1": WRITTEN_AS_LLAMA["llama3"]})


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def _not_built(loaded: Loaded) -> list[Diagnostic]:
    out = []
    tree = loaded.tree
    for path, message in NOT_BUILT_KEYS.items():
        node = tree
        for p in path[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            out.append(Diagnostic(_dotted(path), message, loaded.origin(path),
                                  hint=f"remove `{path[-1]}:` from the recipe; see docs/recipes.md for what is supported"))
    for path, (values, message) in NOT_BUILT_VALUES.items():
        node = tree
        for p in path[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(path[-1]), str) and node[path[-1]] in values:
            out.append(Diagnostic(_dotted(path), f"{node[path[-1]]!r} is not built yet: {message}", loaded.origin(path),
                                  hint="see docs/recipes.md for the values malt supports today"))
    family = tree.get("model", {}).get("family") if isinstance(tree.get("model"), dict) else None
    if isinstance(family, str) and family.lower() in WRITTEN_AS_LLAMA:
        what, fields = WRITTEN_AS_LLAMA[family.lower()]
        out.append(Diagnostic("model.family", f"{family!r} is not a family of its own here: {what}", loaded.origin(("model", "family")),
                              hint=f"write {fields}; init_from can start from its Hugging Face weights"))
    phases = tree.get("phases")
    for i, ph in enumerate(phases if isinstance(phases, list) else []):
        if not isinstance(ph, dict):
            continue
        model = ph.get("model")
        for key in (model if isinstance(model, dict) else {}):
            if key != "rope_theta" and key in ModelSpec.model_fields:
                path = ("phases", i, "model", key)
                hint = ("grow the depth with `growth: {method: stack, factor: 2}` in the phase" if key == "n_layers"
                        else "a phase may change model.rope_theta, or grow the depth with growth:")
                out.append(Diagnostic(_dotted(path), f"a phase that changes model.{key} is not built yet", loaded.origin(path), hint=hint))
    return out


def _drop_not_built_phase_keys(tree: dict) -> None:
    """Remove what _not_built reported inside phases, so the schema does not also call it unknown."""
    for ph in tree.get("phases") if isinstance(tree.get("phases"), list) else []:
        if isinstance(ph, dict) and isinstance(ph.get("model"), dict):
            for key in [k for k in ph["model"] if k != "rope_theta" and k in ModelSpec.model_fields]:
                del ph["model"][key]


def _model_at(loc, start: type[BaseModel] = Recipe) -> type[BaseModel] | None:
    """The schema model reached by following ``loc`` from ``start`` (skipping list indices)."""
    model: type[BaseModel] | None = start
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        nxt = None
        for c in candidates:
            for inner in [c, *getattr(c, "__args__", ())]:
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    nxt = inner
        model = nxt
    return model


def _untagged(loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """``loc`` without the tag pydantic inserts after a discriminated section (``objective.ul2.rate`` is
    ``objective.rate`` in the recipe), and the section's model chosen by that tag."""
    from typing import get_args

    from . import schema

    for i in range(1, len(loc)):
        if loc[i - 1] == "objective" and loc[i] in schema.OBJECTIVE_KINDS:
            models = {m.model_fields["kind"].annotation.__args__[0]: m for m in get_args(get_args(schema.ObjectiveSpec)[0])}
            return loc[:i] + loc[i + 1:], models.get(loc[i])
    return loc, None


def _value_hint(msg: str) -> str:
    """A hint for a value the unit parsers (or a validator) rejected, from what the message says was expected
    (the words before ", got": the rejected value itself, such as '70%' or 'auto', says nothing about that)."""
    msg = msg.split(", got ")[0]
    if "memory size" in msg:
        return "write a size with its unit: 80GB, 40GiB or 512MiB"
    if "auto" in msg:
        return "write auto or a positive whole number such as 8"
    if "fraction" in msg or "%" in msg:
        return "write a share as a percentage such as 5% or as a number between 0 and 1 such as 0.05"
    if "count" in msg or "whole number" in msg:
        return "write a whole number, optionally with k, M, B or T: 500, 2k, 2M, 1.5B"
    if "number" in msg:
        return "write a number such as 0.1 or 3e-4"
    return "see docs/recipes.md for the values this setting takes"


def _schema_problems(loaded: Loaded, err: ValidationError) -> list[Diagnostic]:
    out = []
    for e in err.errors():
        loc, tagged = _untagged(tuple(e["loc"]))
        kind = e["type"]
        msg = e["msg"]
        ctx = e.get("ctx", {})
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if kind == "union_tag_invalid":  # objective.kind names no objective
            expected = ctx.get("expected_tags", "")
            loc = loc + ("kind",)
            guess = did_you_mean(str(ctx.get("tag")), re.findall(r"'([^']*)'", expected))
            out.append(Diagnostic(_dotted(loc), f"got {ctx.get('tag')!r}, expected one of {expected}", loaded.origin(loc),
                                  hint=f"did you mean {guess!r}?" if guess else f"use one of {expected}"))
            continue
        hint = "see docs/recipes.md for this setting"
        if kind == "extra_forbidden":
            if tagged is not None:  # inside an objective section: follow the path from the model its kind chose
                at = max(i for i, p in enumerate(loc[:-1]) if p == "objective")
                parent = _model_at(loc[at + 1:-1], start=tagged)
            else:
                parent = _model_at(loc[:-1])
            fields = list(parent.model_fields) if parent else []
            later = [k[-1] for k in NOT_BUILT_KEYS if k[:-1] == tuple(p for p in loc[:-1] if not isinstance(p, int))]
            guess = did_you_mean(str(loc[-1]), fields + later)
            msg = f"unknown key {loc[-1]!r}"
            hint = f"valid keys here: {', '.join(fields)}"
            if guess:
                hint = f"did you mean {guess!r}?" + (" (it is not built yet)" if guess in later else "")
        elif kind == "missing" and loc and isinstance(loc[-1], int):
            # a tuple such as betas with too few items
            loc = loc[:-1]
            msg = f"too few items: item {e['loc'][-1]} is missing"
            hint = "give every item, for example betas: [0.9, 0.95]"
        elif kind == "missing":
            msg = "required field is missing"
            where = f"the `{_dotted(loc[:-1])}` section" if loc[:-1] else "the recipe"
            hint = f"add `{loc[-1]}:` to {where}; see docs/recipes.md"
        elif kind == "literal_error":
            expected = ctx.get("expected", "")
            msg = f"got {e['input']!r}, expected one of {expected}"
            guess = did_you_mean(None if e["input"] is None else str(e["input"]), re.findall(r"'([^']*)'", expected))
            hint = f"did you mean {guess!r}?" if guess else f"use one of {expected}"
        elif kind in ("int_type", "int_parsing", "int_from_float"):
            msg = f"expected a whole number, got {e['input']!r}"
            hint = "write a whole number without quotes, such as 256"
        elif kind in ("bool_type", "bool_parsing"):
            msg = f"expected true or false, got {e['input']!r}"
            hint = "write true or false"
        elif kind in ("string_type",):
            msg = f"expected text, got {e['input']!r}"
            hint = "write text; put it in quotes if YAML reads it as something else"
        elif kind == "string_too_short":
            msg = "must not be empty"
            hint = "write a non-empty name"
        elif kind in ("model_type", "dict_type", "model_attributes_type") and e["input"] is None:
            msg = "the section is empty"
            hint = "give it its fields as indented `key: value` lines, or remove it (or write {}) to use its defaults"
        elif kind in ("model_type", "dict_type", "model_attributes_type"):
            msg = f"expected a section (a mapping of keys), got {e['input']!r}"
            hint = "write the section as indented `key: value` lines, or as {key: value, ...}"
        elif kind in ("list_type", "tuple_type"):
            msg = f"expected a list, got {e['input']!r}"
            hint = "write a list in brackets, such as [0.9, 0.95], or as indented `- item` lines"
        elif kind in ("too_short", "too_long"):
            n = ctx.get("actual_length")
            msg = (f"needs at least {ctx.get('min_length')} item(s), got {n}" if kind == "too_short"
                   else f"takes at most {ctx.get('max_length')} items, got {n}")
            hint = ("list at least one source, such as `- {name: docs, path: docs.txt}`" if loc == ("data", "sources")
                    else "see docs/recipes.md for what this list holds")
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            bound = msg.split("should be ", 1)[-1]
            msg = f"must be {bound}, got {e['input']!r}"
            hint = f"use a value {bound}"
        elif kind == "value_error":
            hint = _value_hint(msg)
        out.append(Diagnostic(_dotted(loc), msg, loaded.origin(loc), hint=hint))
    return out


def tokenizer_file_vocab(path: Path) -> int:
    """Vocabulary size of a tokenizers ``tokenizer.json`` without importing tokenizers."""
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data.get("model", {}).get("vocab", {})
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
    ids.update(t["id"] for t in data.get("added_tokens", []))
    return max(ids) + 1 if ids else 0


def tokenizer_file_tokens(path: Path) -> set[str]:
    """Every token string of a tokenizers ``tokenizer.json`` (vocabulary and added tokens)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    vocab = data.get("model", {}).get("vocab", {})
    out = set(vocab) if isinstance(vocab, dict) else {v[0] for v in vocab if isinstance(v, list) and v}
    out.update(t["content"] for t in data.get("added_tokens", []))
    return out


def tokenizer_file_problem(path: Path) -> str | None:
    """Why tokenizers cannot load a tokenizer.json (None: it can). Imports tokenizers, so only for kind: file."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001  tokenizers raises plain Exception subclasses
        return str(e).splitlines()[0][:200]
    return None if tok.get_vocab_size() > 0 else "its vocabulary is empty"


def tokenizer_vocab(recipe: Recipe, base_dir: Path) -> int | None:
    """Entries of the tokenizer the runtime builds (for bpe and unigram: at most this many)."""
    tok = getattr(recipe, "tokenizer", None)
    if tok is None:  # the section failed the schema: reported there
        return None
    added = len(added_tokens(recipe))  # add_special_tokens and the objective's tokens (sentinels, mode tokens)
    if tok.kind == "bytes":
        return 256 + len(tok.special_tokens) + added
    if tok.kind in ("bpe", "unigram"):
        return tok.vocab_size + added if tok.vocab_size is not None else None
    if tok.path and (base_dir / tok.path).is_file():
        try:
            n = tokenizer_file_vocab(base_dir / tok.path)
            have = tokenizer_file_tokens(base_dir / tok.path)
        except (ValueError, KeyError, TypeError, OSError, AttributeError):
            return None
        return n + len([t for t in dict.fromkeys([*tok.special_tokens, *added_tokens(recipe)]) if t not in have])
    return None


def source_problems(s, base: Path) -> list[tuple[tuple, str, str]]:
    """Problems of one data source (path, filter) as (path below the source, message, hint)."""
    from malt.runtime.sources import check_filter, classify, is_glob, path_problem

    out = []
    flt = s.filter.model_dump() if s.filter is not None else {}
    for key, msg in check_filter({k: v for k, v in flt.items() if v is not None}):
        out.append((("filter", key), msg, "see the filter fields in docs/recipes.md"))
    for key in ("min_chars", "max_chars"):
        if flt.get(key) is not None and flt[key] < 0:
            out.append((("filter", key), f"must not be negative, got {flt[key]}", "use a number of characters such as 200"))
    wants_fields = flt.get("field") is not None
    ignored_text_field = (("text_field",), f"{s.path} is plain text: text_field {s.text_field!r} would be ignored",
                          "remove text_field; it names the key of .jsonl records or the column of .parquet files")
    if s.path.startswith("builtin:"):
        if s.path not in BUILTIN_SOURCES:
            guess = did_you_mean(s.path, BUILTIN_SOURCES)
            out.append((("path",), f"unknown built-in source {s.path!r}",
                        f"did you mean {guess!r}?" if guess else f"built-in sources: {', '.join(BUILTIN_SOURCES)}"))
        elif wants_fields:
            out.append((("filter", "field"), f"{s.path} is plain text without fields", "remove filter.field"))
        if s.text_field != "text":
            out.append(ignored_text_field)
        return out
    p = base / s.path
    supported = "files of a supported type (.txt, .jsonl, each also .gz or .zst, .parquet)"
    if is_glob(s.path):
        import glob

        matches = glob.iglob(str(p), recursive=True)
        first = next(matches, None)
        if first is None:
            out.append((("path",), f"the glob {s.path} matches no files (looked for {p})",
                        "check the pattern; paths are relative to the recipe file"))
            return out
        problem = None
        for m in [first, *matches]:
            if os.path.isdir(m) and _first_supported(m) is not None or classify(os.path.basename(m)):
                problem = None
                break
            problem = problem or path_problem(os.path.basename(m))
        else:
            out.append((("path",), f"the glob {s.path} matches no {supported}" + (f": {problem}" if problem else ""),
                        "narrow the pattern to the data files, such as data/*.jsonl.zst"))
        name = os.path.basename(s.path)
    elif not p.exists():
        out.append((("path",), f"data file not found: {s.path} (looked in {p})",
                    "paths are relative to the recipe file; check the name or create the file"))
        return out
    elif p.is_dir():
        if _first_supported(p) is None:
            out.append((("path",), f"the folder {s.path} holds no {supported}", "point the source at the folder that holds the data"))
        return out
    else:
        problem = path_problem(p.name)
        if problem:
            out.append((("path",), problem, "convert the data to .txt (one document per file), .jsonl (one document per line) or .parquet"))
            return out
        name = p.name
    kind = classify(name)
    if wants_fields and kind and kind[0] == "txt":
        out.append((("filter", "field"), f"{s.path} is plain text: it has no field {flt['field']!r}",
                    "a field filter needs .jsonl or .parquet records"))
    if s.text_field != "text" and kind and kind[0] == "txt":
        out.append(ignored_text_field)
    return out


def _first_supported(folder) -> str | None:
    from malt.runtime.sources import classify

    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if not fn.startswith(".") and classify(fn):
                return os.path.join(dirpath, fn)
    return None


def unread_parent_setting(loaded: Loaded, path: tuple, switch: tuple) -> bool:
    """Whether the setting at ``path`` comes from a parent recipe (extends:) while ``switch`` (the choice that decides
    whether it is read, such as schedule.decay or tokenizer.kind) comes from the child or --set: a field the child's
    choice does not read is then the parent's business, not an error."""
    set_in, switch_in = loaded.origins.get(path), loaded.origins.get(switch)
    return (set_in is not None and switch_in is not None and set_in.file != switch_in.file and not set_in.command_line
            and set_in.file != loaded.file)  # written in the recipe itself, a value its own choice leaves unread is an error


def _cross_checks(r: Recipe | SimpleNamespace, loaded: Loaded) -> list[Diagnostic]:
    """Cross-field rules. ``r`` may be a partial recipe whose invalid sections are None
    (see :func:`_valid_sections`); checks that need such a section are skipped."""
    out: list[Diagnostic] = []

    def add(path, message, hint):
        out.append(Diagnostic(_dotted(path), message, loaded.origin(path), hint=hint))

    m = r.model
    if m is not None:
        if m.d_model % m.n_heads:
            # head dimensions of 16 to 256 are what kernels are tuned for: offer the nearest such head counts
            fits = [m.d_model // hd for hd in range(16, 257, 2) if m.d_model % hd == 0]
            heads = sorted(sorted(fits, key=lambda h: abs(h - m.n_heads))[:4])
            add(("model", "n_heads"), f"n_heads ({m.n_heads}) does not divide d_model ({m.d_model})",
                f"choose n_heads from {heads} or change d_model to a multiple of {m.n_heads}" if heads
                else f"change d_model to a multiple of 2 × n_heads = {2 * m.n_heads}")
        else:
            head_dim = m.d_model // m.n_heads
            if head_dim % 2 and m.position == "rope":
                add(("model", "n_heads"), f"head dimension d_model/n_heads = {head_dim} is odd; rotary embeddings need an even head dimension",
                    "choose n_heads so that d_model / n_heads is even")
        kv = m.n_kv_heads or m.n_heads
        if m.n_heads % kv:
            add(("model", "n_kv_heads"), f"n_kv_heads ({kv}) does not divide n_heads ({m.n_heads})",
                f"choose n_kv_heads from {divisors(m.n_heads)[:12]}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            if getattr(m, name) <= 0:
                add(("model", name), f"must be positive, got {getattr(m, name)}", f"remove model.{name} to use the default")
    for path, message, hint in encoder.problems(r, loaded.origins):  # encoders (model.family bert) and mlm/rtd
        add(path, message, hint)
    for path, message, hint in sliding_window.problems(r, loaded.base_dir):  # model.sliding_window (and windowed teachers)
        add(path, message, hint)

    # tokenizer
    t = r.tokenizer

    def parents(field: str) -> bool:  # a parent's tokenizer setting that the child's tokenizer.kind leaves unread
        return unread_parent_setting(loaded, ("tokenizer", field), ("tokenizer", "kind"))

    base = loaded.base_dir
    if t is not None:
        if t.kind in ("bpe", "unigram"):
            if t.vocab_size is None:
                add(("tokenizer",), f"a {t.kind} tokenizer needs vocab_size", "add `vocab_size: 8192` (or another size) to the tokenizer section")
            elif t.vocab_size < 256 + len(t.special_tokens):
                add(("tokenizer", "vocab_size"), f"a byte-level {t.kind} vocabulary needs at least 256 + {len(t.special_tokens)} special tokens, got {t.vocab_size}",
                    f"set tokenizer.vocab_size to at least {256 + len(t.special_tokens)}")
        if t.kind == "bytes" and t.vocab_size is not None and t.vocab_size != 256 + len(t.special_tokens) and not parents("vocab_size"):
            add(("tokenizer", "vocab_size"), f"a bytes tokenizer has exactly 256 + {len(t.special_tokens)} special tokens = {256 + len(t.special_tokens)} entries, got {t.vocab_size}",
                "remove tokenizer.vocab_size (it is implied for kind: bytes)")
        if t.kind == "file":
            if not t.path:
                add(("tokenizer",), "a file tokenizer needs path", "add `path: tokenizer.json` (relative to the recipe)")
            elif (base / t.path).is_dir():
                add(("tokenizer", "path"), f"{t.path} is a folder; the tokenizer is a file", "point at the folder's tokenizer.json")
            elif not (base / t.path).is_file():
                add(("tokenizer", "path"), f"tokenizer file not found: {t.path} (looked in {base / t.path})",
                    "paths are relative to the recipe file")
            elif tokenizer_vocab(r, base) is None:
                add(("tokenizer", "path"), f"{t.path} is not a readable tokenizers tokenizer.json", "export one with tokenizers' Tokenizer.save()")
            else:
                problem = tokenizer_file_problem(base / t.path)
                if problem:
                    add(("tokenizer", "path"), f"{t.path} is not a tokenizer that tokenizers can load: {problem}",
                        "export one with tokenizers' Tokenizer.save()")
            if t.vocab_size is not None and not parents("vocab_size"):
                add(("tokenizer", "vocab_size"), "vocab_size is read from the tokenizer file and cannot be set", "remove tokenizer.vocab_size")
        elif t.path is not None and not parents("path"):
            add(("tokenizer", "path"), f"path is only used by kind: file (this tokenizer is kind: {t.kind})", "remove tokenizer.path or set kind: file")
        if not t.special_tokens:
            add(("tokenizer", "special_tokens"), "at least one special token is needed: the first separates documents (end of text)",
                "use special_tokens: ['<|endoftext|>']")
        if len(set(t.special_tokens)) != len(t.special_tokens):
            add(("tokenizer", "special_tokens"), "special tokens repeat", "list each special token once")
        for i, tok_text in enumerate(t.add_special_tokens):
            if tok_text in t.special_tokens or tok_text in t.add_special_tokens[:i]:
                add(("tokenizer", "add_special_tokens", i), f"{tok_text!r} is already " + ("in special_tokens" if tok_text in t.special_tokens else "listed"),
                    "list each special token once")
            elif not tok_text:
                add(("tokenizer", "add_special_tokens", i), "a special token must not be empty", "remove the empty entry")
        if r.data is not None:
            names = [s.name for s in r.data.sources] + [s.name for ph in (getattr(r, "phases", None) or [])  # phase-only too
                                                        for s in (ph.data.sources if ph.data and ph.data.sources else [])]
            for i, name in enumerate(t.train_on):
                if name not in names:
                    guess = did_you_mean(name, names)
                    add(("tokenizer", "train_on", i), f"no data source is named {name!r}",
                        f"did you mean {guess!r}?" if guess else f"sources are: {', '.join(names)}")
        if t.train_on and t.kind not in ("bpe", "unigram") and not parents("train_on"):
            add(("tokenizer", "train_on"), f"train_on is only used by kind: bpe and unigram (this tokenizer is kind: {t.kind})", "remove tokenizer.train_on")
        if t.kind not in ("bpe", "unigram") and loaded.origins.get(("tokenizer", "max_chars")) is not None and not parents("max_chars"):
            add(("tokenizer", "max_chars"), f"max_chars is only used when training a tokenizer (kind: bpe or unigram; this one is kind: {t.kind})",
                "remove tokenizer.max_chars")
        if t.max_chars <= 0:
            add(("tokenizer", "max_chars"), "must be positive", "remove tokenizer.max_chars to use the default (20M)")

        tok_vocab = tokenizer_vocab(r, base)
        if m is not None and m.vocab_size is not None and tok_vocab is not None and tok_vocab > m.vocab_size:
            add(("model", "vocab_size"), f"the tokenizer has {tok_vocab} tokens but the model's vocabulary is {m.vocab_size}",
                f"raise model.vocab_size to at least {tok_vocab}, or remove it to use the tokenizer's size")

    name = getattr(r, "name", None)
    if isinstance(name, str) and ("/" in name or name.startswith(".")):
        add(("name",), f"the run's name {name!r} names a folder (runs/NAME), so it may not contain '/' or start with '.'",
            "use letters, digits, '.', '_' and '-', such as my-run-v1")

    # fields that another choice leaves unread
    tr = getattr(r, "train", None)
    if (tr is not None and ("train", "sample_prompt") in loaded.origins and tr.sample_tokens == 0
            and not unread_parent_setting(loaded, ("train", "sample_prompt"), ("train", "sample_tokens"))
            and getattr(m, "family", "llama") == "llama"):
        add(("train", "sample_prompt"), "train.sample_tokens is 0, so no sample is generated and the prompt is unread",
            "remove sample_prompt, or set sample_tokens (such as 64)")
    if (getattr(r, "init_from", None) is not None and ("model", "init_std") in loaded.origins
            and not unread_parent_setting(loaded, ("model", "init_std"), ("init_from",))):
        add(("model", "init_std"), "init_from gives every weight its starting value, so model.init_std is unread",
            "remove model.init_std")

    # data
    if r.data is not None:
        for path, message, hint in conditioning_problems(r, base):  # metadata and control tokens
            add(path, message, hint)
        seen = set()
        for i, s in enumerate(r.data.sources):
            if s.name in seen:
                add(("data", "sources", i, "name"), f"another source is already named {s.name!r}", "give each source a unique name")
            seen.add(s.name)
            if s.weight <= 0:
                add(("data", "sources", i, "weight"), f"weight must be positive, got {s.weight}", "remove the source or give it a positive weight")
            for sub, message, hint in source_problems(s, base):
                add(("data", "sources", i, *sub), message, hint)
            if s.validation_path is not None and os.path.normpath(s.validation_path) == os.path.normpath(s.path):
                add(("data", "sources", i, "validation_path"), "validation_path is the source's own path: every validation "
                    "document would also be trained on", "name held-out files, or remove validation_path to hold out data.validation of the source")
            if s.text_field == "":
                add(("data", "sources", i, "text_field"), "text_field is empty", "name the key that holds the text, such as text")
            if s.validation_path is not None:  # checked as a path of its own
                for sub, message, hint in source_problems(s.model_copy(update={"path": s.validation_path, "validation_path": None}), base):
                    if sub == ("path",):  # its filter problems are the source's, reported above
                        add(("data", "sources", i, "validation_path"), message, hint)
                if r.data.validation <= 0:  # data.validation 0 turns evaluation off, validation files included
                    add(("data", "sources", i, "validation_path"), "data.validation is 0, which turns evaluation off: this "
                        "validation_path would never be read", "remove data.validation: 0 (the share is ignored for sources "
                        "with a validation_path), or remove validation_path")
        tr = getattr(r, "train", None)
        if tr is not None and tr.eval_per_source and (r.data.validation <= 0 or tr.eval_every <= 0):
            add(("train", "eval_per_source"), "evaluation is off (" + ("data.validation is 0" if r.data.validation <= 0 else
                "train.eval_every is 0") + "), so there are no per-source validation losses", "remove eval_per_source, or turn "
                "evaluation on")
        if r.data.packing != "concat":  # document masks (choose_attention) are built for the causal decoder
            kinds = [getattr(getattr(r, "objective", None), "kind", "causal_lm"),
                     *(ph.objective.kind for ph in getattr(r, "phases", None) or [] if getattr(ph, "objective", None) is not None)]
            # objectives that build their rows from concat windows report this themselves (objectives.problems)
            other = next((k for k in kinds if k not in ("causal_lm", "prefix_lm", "span_corruption", "ul2", "fim", "mlm", "rtd")), None)
            if other is not None or (m is not None and m.family not in ("llama", "bert")):  # bert: mlm, rtd (encoder.py.j2)
                what = f"objective {other}" if other is not None else f"model.family {m.family}"
                add(("data", "packing"), f"packing {r.data.packing} with {what} is not built yet: document masks are built for "
                    "the llama family with objective causal_lm", "use packing: concat with this objective and model")
            # on a TPU, compiler/tpu.py reports it (the torch-xla program packs with concat only)
        if r.data.validation >= 0.5:
            add(("data", "validation"), f"{r.data.validation:.0%} of the data held out for validation leaves too little to train on", "use a few percent, such as 1%")

    # optimizer
    o = r.optimizer
    if o is not None:
        if o.lr <= 0:
            add(("optimizer", "lr"), f"learning rate must be positive, got {o.lr}", "a typical AdamW peak learning rate is 3e-4 to 3e-3")
        for j, b in enumerate(o.betas):
            if not 0 <= b < 1:
                add(("optimizer", "betas", j), f"Adam betas must be in [0, 1), got {b}", "the usual values are [0.9, 0.95]")
        if o.eps <= 0:
            add(("optimizer", "eps"), f"must be positive, got {o.eps}", "the usual value is 1e-8")
        if o.weight_decay < 0:
            add(("optimizer", "weight_decay"), f"must not be negative, got {o.weight_decay}", "use 0 for no weight decay; a usual value is 0.1")
        if o.grad_clip is not None and o.grad_clip < 0:
            add(("optimizer", "grad_clip"), f"must not be negative, got {o.grad_clip}", "use null or 0 to disable clipping")
        if o.kind != "galore":
            for key in ("rank", "update_every", "scale"):
                if getattr(o, key) is not None:
                    add(("optimizer", key), f"{key} is a GaLore setting, used only by optimizer.kind galore", f"remove optimizer.{key}, or set kind: galore")
        else:
            for key, hint in (("rank", "remove it for d_model / 4, the paper's choice"), ("update_every", "the paper uses 200")):
                if getattr(o, key) is not None and getattr(o, key) <= 0:
                    add(("optimizer", key), f"must be positive, got {getattr(o, key)}", hint)
            if o.scale is not None and o.scale <= 0:
                add(("optimizer", "scale"), f"must be positive, got {o.scale}", "the paper uses 0.25")
            tg, fam = getattr(r, "target", None), getattr(getattr(r, "model", None), "family", "llama")
            if fam != "llama":
                add(("optimizer", "kind"), f"galore is built for the llama family only, not {fam!r}", "use kind: adamw")
            if tg is not None and tg.parallelism in ("fsdp", "hsdp"):
                add(("optimizer", "kind"), f"galore with {tg.parallelism} is not built yet: the projector needs each weight's whole "
                    "gradient, which FSDP shards", "use parallelism: ddp (or single)")
            if tg is not None and tg.accelerator == "tpu":
                add(("optimizer", "kind"), "galore on a TPU is not built yet", "use kind: adamw on tpu")

    # train
    tr = r.train
    if tr is not None:
        explicit_phases = bool(getattr(r, "phases", None)) and all(ph.share is None for ph in r.phases)
        if (tr.tokens is None) == (tr.steps is None) and not (explicit_phases and tr.tokens is None):
            # at a --set that made it so, when one did (--set train.tokens=null on a recipe without steps)
            where = next((("train", k) for k in ("steps", "tokens")
                          if getattr(loaded.origins.get(("train", k)), "command_line", None)), ("train",))
            add(where, "set exactly one of train.tokens and train.steps" + (" (both are set)" if tr.tokens is not None else ""),
                "for example `tokens: 2M` or `steps: 500`")
        if tr.micro_batch != "auto" and tr.global_batch % tr.micro_batch:
            add(("train", "micro_batch"), f"global_batch ({tr.global_batch}) is not divisible by micro_batch ({tr.micro_batch})",
                f"choose micro_batch from {divisors(tr.global_batch)[:12]} or use auto")
        tokens_per_step = tr.global_batch * tr.seq_len
        steps = tr.steps if tr.steps is not None else (tr.tokens // tokens_per_step if tr.tokens is not None else None)
        if tr.tokens is not None and tr.steps is None and steps == 0:
            add(("train", "tokens"), f"{tr.tokens} tokens is less than one step of global_batch {tr.global_batch} × seq_len {tr.seq_len} = {tokens_per_step} tokens",
                f"set train.tokens to at least {tokens_per_step}")
        if tr.steps is not None and tr.steps <= 0:
            add(("train", "steps"), "must be positive", "for example `steps: 500`")
        if steps and r.schedule is not None:
            warm = steps_of(r.schedule.warmup, steps)
            if warm >= steps:
                add(("schedule", "warmup"), f"warmup ({warm} steps) is not shorter than the run ({steps} steps)", "use a share such as 5%")
            else:
                for path, message, hint in schedule_overlap_problems(r.schedule, steps, ("schedule",)):
                    add(path, message, hint)
        for name in ("eval_every", "checkpoint_every", "log_every", "sample_tokens"):
            if getattr(tr, name) < 0:
                add(("train", name), "must not be negative", "use 0 to disable it" if name != "log_every" else "use 1 to log every step")
        if tr.log_every == 0:
            add(("train", "log_every"), "must be at least 1", "use 1 to log every step")
    if r.schedule is not None:
        sch = r.schedule
        if sch.decay == "wsd" and not 0 < sch.decay_share < 1:
            add(("schedule", "decay_share"), "the decay share of a wsd schedule must be between 0% and 100%", "a usual value is 20%")
        if sch.decay == "infinite":
            if sch.cooldown_share + sch.decay_share >= 1:
                add(("schedule", "cooldown_share"), f"cooldown_share {sch.cooldown_share:.0%} and decay_share {sch.decay_share:.0%} leave no constant plateau",
                    "make their sum well below 100%, e.g. 10% and 20%")
            final = final_lr_problems(sch, ("schedule",))
            for path, message, hint in final:
                add(path, message, hint)
            if not final and sch.constant_ratio <= sch.min_lr_ratio:
                add(("schedule", "constant_ratio"), f"the plateau ({sch.constant_ratio:.0%} of lr) must lie above the final lr ({sch.min_lr_ratio:.0%} of lr)",
                    "raise constant_ratio or lower min_lr_ratio")
        # a field of the recipe's schedule is also read by phases whose own schedule inherits it
        inheriting = [ph.schedule for ph in (getattr(r, "phases", None) or []) if ph.schedule is not None]
        for path, message, hint in schedule_field_problems(sch, sch.decay, ("schedule",)):
            field = path[-1]
            readers = {ps.decay or sch.decay for ps in inheriting if getattr(ps, field) is None}
            from_parent = unread_parent_setting(loaded, path, ("schedule", "decay"))
            if not readers & set(SCHEDULE_FIELD_USERS[field]) and not from_parent:  # a parent's setting that the child's decay does not read is fine
                add(path, message, hint)

    tg = r.target
    if tg is not None and tg.mfu != "auto" and not 0 < tg.mfu <= 1:
        add(("target", "mfu"), f"the assumed model FLOPs utilisation must be above 0% and at most 100%, got {tg.mfu:.0%}",
            "use auto, or a typical 30%-50% on GPUs")
    if tg is not None and tr is not None:
        n = tg.devices * tg.nodes  # processes over all nodes
        if n > 1 and tr.global_batch % n:
            add(("train", "global_batch"), f"global_batch ({tr.global_batch}) does not split evenly over {n} devices"
                + (f" ({tg.nodes} nodes × {tg.devices})" if tg.nodes > 1 else ""),
                f"use a multiple of {n}, such as {tr.global_batch + n - tr.global_batch % n}")
        elif n > 1 and tr.micro_batch != "auto" and (tr.global_batch // n) % tr.micro_batch:
            add(("train", "micro_batch"), f"each of the {n} devices gets {tr.global_batch // n} sequences per step, not divisible by micro_batch ({tr.micro_batch})",
                f"choose micro_batch from {divisors(tr.global_batch // n)[:12]} or use auto")
        if n == 1 and tg.parallelism == "ddp":
            add(("target", "parallelism"), "ddp needs more than one device", "set target.devices, or parallelism: single (or auto)")
        if n > 1 and tg.parallelism == "single":
            add(("target", "parallelism"), f"parallelism single runs one process, but target.devices is {n}"
                if tg.nodes == 1 else f"parallelism single runs one process, but the target has {n} devices", "use auto or fsdp" if tg.accelerator == "tpu" else "use auto, ddp or fsdp")
        if tg.parallelism == "hsdp" and (tg.nodes < 2 or tg.devices < 2):
            add(("target", "parallelism"), f"hsdp shards within a node and replicates across nodes: it needs several nodes of several "
                f"devices, not {tg.nodes} node(s) × {tg.devices} device(s)", "use fsdp (or auto)")
        phases = getattr(r, "phases", None) or []
        if n > 1 and any(ph.growth is not None for ph in phases):
            add(("target", "devices"), "growth by stacking on several devices is not built yet", "grow on one device (target.devices: 1)")
        if n > 1:
            for i, ph in enumerate(phases):
                gb = ph.train.global_batch if ph.train and ph.train.global_batch else None
                if gb and gb % n:
                    add(("phases", i, "train", "global_batch"), f"global_batch ({gb}) of phase {ph.name!r} does not split evenly over {n} devices",
                        f"use a multiple of {n}")
    if tg is not None:
        if tg.accelerator == "auto" and tg.chip.startswith("tpu"):
            add(("target", "chip"), f"chip {tg.chip!r} is a TPU, but accelerator auto never means tpu",
                "set target.accelerator: tpu, or target.chip: auto")
        if tg.accelerator == "cpu" and tg.chip not in ("auto", "cpu"):
            add(("target", "chip"), f"chip {tg.chip!r} is an accelerator but accelerator is cpu", "set target.chip: cpu (or auto), or accelerator: cuda")
        elif tg.accelerator == "cuda" and tg.chip.startswith("tpu"):
            add(("target", "chip"), f"chip {tg.chip!r} is a TPU but accelerator is cuda", "set target.chip to your GPU (or auto)")
        if tg.accelerator == "cuda" and tg.chip == "cpu":
            add(("target", "chip"), "chip cpu with accelerator cuda", "set target.chip to your GPU (or auto)")
        m = getattr(r, "model", None)
        if tg.activation_checkpointing in ("selective", "full") and m is not None and m.family != "llama":
            add(("target", "activation_checkpointing"), f"activation checkpointing is not built for model.family {m.family} yet",
                "use activation_checkpointing: none (or auto)")
        if tg.precision == "pure_bf16":
            if m is not None and m.family != "llama":
                add(("target", "precision"), f"pure_bf16 is built for the llama family only, not {m.family!r}",
                    "use precision: bf16 (autocast with fp32 master weights)")
        if tg.accelerator == "tpu":  # what the torch-xla program covers (compiler/tpu.py)
            for path, message, hint in tpu_problems(r):
                add(path, message, hint)
    if getattr(r, "objective", None) is not None and r.train is not None:
        for path, message, hint in objective_problems(r, base):
            add(path, message, hint)
    return out


def _valid_sections(tree: dict, err: ValidationError) -> SimpleNamespace:
    """The recipe's sections that pass the schema once unknown keys are dropped; the others are None.

    Cross-field checks run on these when the schema fails, so that one `malt check`
    reports every problem instead of one stage's problems at a time.
    """
    for e in err.errors():
        if e["type"] == "extra_forbidden":
            node = tree
            for p in _untagged(tuple(e["loc"]))[0][:-1]:
                node = node[p] if isinstance(node, (dict, list)) else None
            if isinstance(node, dict):
                node.pop(e["loc"][-1], None)
    from pydantic import TypeAdapter

    from .schema import ObjectiveSpec

    sections = {}
    for name, f in Recipe.model_fields.items():
        spec = f.annotation
        if name == "objective":  # a union chosen by kind: validated through a TypeAdapter
            spec = TypeAdapter(ObjectiveSpec)
        elif not (isinstance(spec, type) and issubclass(spec, BaseModel)):
            continue
        if name not in tree:
            sections[name] = None if f.is_required() else f.get_default()
            continue
        try:
            sections[name] = spec.validate_python(tree[name]) if name == "objective" else spec.model_validate(tree[name])
        except ValidationError:
            sections[name] = None
    return SimpleNamespace(**sections)


def _in_order(problems: list[Diagnostic], loaded: Loaded) -> list[Diagnostic]:
    """Problems in reading order: the recipe file by line, then its extends parents, then --set overrides as given."""
    sets = list(dict.fromkeys(o.command_line for o in loaded.origins.values() if o.command_line is not None))

    def key(d: Diagnostic):
        o = d.origin or loaded.origin(())
        given = sets.index(o.command_line) if o.command_line in sets else -1
        return (o.command_line is not None, given, o.file != loaded.file, o.file, o.line, o.col)
    return sorted(problems, key=key)


def validate(loaded: Loaded) -> Recipe:
    problems = _not_built(loaded)
    # keys reported as not built are removed before the schema sees them, so they are not also reported as unknown
    tree = json.loads(json.dumps(loaded.tree, default=str))
    for path in NOT_BUILT_KEYS:
        node = tree
        for p in path[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    _drop_not_built_phase_keys(tree)
    if problems:
        bad = {tuple(d.path.split(".")) for d in problems}
        for path in bad:
            node = tree
            for p in path[:-1]:
                node = node.get(p) if isinstance(node, dict) else None
            if isinstance(node, dict) and path[-1] in node and path in {k for k in NOT_BUILT_VALUES}:
                node.pop(path[-1])
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as err:
        problems += _schema_problems(loaded, err)
        problems += _cross_checks(_valid_sections(tree, err), loaded)
        raise RecipeError(_in_order(problems, loaded))
    problems += _cross_checks(recipe, loaded)
    if not problems:
        problems += _phase_checks(recipe, loaded)
    elif recipe.phases:  # with other problems: the phases' own ones in the same round (not what an implicit phase restates)
        try:
            found = _phase_checks(recipe, loaded)
        except Exception:  # noqa: BLE001  (they assume the rest is consistent; shown once the other problems are fixed)
            found = []
        seen = {(d.path, d.message) for d in problems}
        problems += [d for d in found if d.path.startswith("phases") and (d.path, d.message) not in seen]
    gone = loaded.resuming and recipe.init_from is not None and not (loaded.base_dir / recipe.init_from.path).exists()
    if recipe.init_from is not None and not gone:  # the checkpoint against the model: its own problems, with the rest
        # (malt run --resume continues the run's own checkpoints: a first start's init_from may be gone by then)
        problems += [d for d in _init_from_checks(recipe, loaded) if (d.path, d.message) not in {(p.path, p.message) for p in problems}]
    if problems:
        raise RecipeError(_in_order(problems, loaded))
    return recipe


def _phase_checks(r: Recipe, loaded: Loaded) -> list[Diagnostic]:
    """Problems in the phases: coverage of the run, mixtures, batch shapes, schedules, phase-only sources."""
    out = [Diagnostic(_dotted(path), message, loaded.origin(path), hint=hint) for path, message, hint in resolve_phases(r).problems]
    switchable = ("causal_lm", "distill")  # objectives a phase may switch between: the same batches, another loss
    teachers = {o.teacher for o in [r.objective, *(ph.objective for ph in r.phases if ph.objective is not None)] if o.kind == "distill"}
    for i, ph in enumerate(r.phases):
        if ph.objective is None:
            continue
        where = ("phases", i, "objective")
        if ph.objective.kind not in switchable or r.objective.kind not in switchable:
            out.append(Diagnostic(_dotted(where + ("kind",)), f"a phase that switches the objective from {r.objective.kind} to "
                                  f"{ph.objective.kind} is not built yet: phases switch between causal_lm and distill only",
                                  loaded.origin(where + ("kind",)), hint="set the objective for the whole run in the objective section"))
            continue
        if ph.objective.kind == "distill" and len(teachers) > 1:
            out.append(Diagnostic(_dotted(where + ("teacher",)), "phases distill from different teachers, which is not built yet",
                                  loaded.origin(where + ("teacher",)), hint="use one teacher for every distillation phase"))
        for path, message, hint in objective_problems(r, loaded.base_dir, where, ph.objective):
            out.append(Diagnostic(_dotted(path), message, loaded.origin(path), hint=hint))
    for i, ph in enumerate(r.phases):
        for j, s in enumerate(ph.data.sources if ph.data and ph.data.sources else []):
            if not s.path.startswith("builtin:") and not (loaded.base_dir / s.path).exists():
                path = ("phases", i, "data", "sources", j, "path")
                out.append(Diagnostic(_dotted(path), f"data file not found: {s.path} (looked in {loaded.base_dir / s.path})",
                                      loaded.origin(path), hint="paths are relative to the recipe file"))
    return out


def _init_from_checks(r: Recipe, loaded: Loaded) -> list[Diagnostic]:
    """init_from must name a checkpoint whose shapes are this model's, field by field."""
    from .objectives import checkpoint_info

    out = []
    where = ("init_from", "path")
    directory = loaded.base_dir / r.init_from.path
    found, problem = checkpoint_info(directory, r)
    if problem:
        return [Diagnostic("init_from.path", problem, loaded.origin(where), hint=_init_from_hint(problem))]
    if r.init_from.optimizer == "carry" and found["kind"] != "malt":
        out.append(Diagnostic("init_from.optimizer", "optimizer state can only be carried over from a malt run directory",
                              loaded.origin(("init_from", "optimizer")), hint="use optimizer: fresh for a Hugging Face model"))
    m = r.model
    tok = tokenizer_vocab(r, loaded.base_dir)
    vocab = m.vocab_size or tok
    padded = -(-vocab // m.pad_vocab_multiple) * m.pad_vocab_multiple if vocab else None
    mine = {
        "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads or m.n_heads,
        "d_ff": m.d_ff if m.d_ff is not None else _llama_d_ff(m.d_model), "vocab": padded,
        "tie_embeddings": m.tie_embeddings, "qkv_bias": m.qkv_bias,
    }
    for key, theirs in found["shape"].items():
        if mine.get(key) is not None and theirs is not None and mine[key] != theirs:
            field = {"vocab": "vocab_size"}.get(key, key)
            path = ("model", field) if field in ModelSpec.model_fields else ("model",)
            hint = (f"set model.{field}: {theirs}" if key != "vocab" else
                    f"the checkpoint's vocabulary is {theirs}: use its tokenizer (tokenizer: {{kind: file, path: ...}}) and "
                    f"model.vocab_size / pad_vocab_multiple that give {theirs}")
            message = f"{key} is {mine[key]} here but {theirs} in {r.init_from.path}"
            extra = added_tokens(r)
            missing = _file_tokenizer_lacks(r, loaded.base_dir) if key == "vocab" and mine[key] > theirs else []
            if missing and not [t for t in missing if t in extra]:  # tokenizer.special_tokens the file does not have
                message += (f": the tokenizer file has no {', '.join(missing)}, so malt appends it (tokenizer.special_tokens "
                            f"{'defaults to' if 'special_tokens' not in r.tokenizer.model_fields_set else 'is'} "
                            f"{list(r.tokenizer.special_tokens)})")
                hint = ("set tokenizer.special_tokens to the checkpoint's end-of-text token, which the file has "
                        "(for example ['</s>'] for Llama 2, ['<|endoftext|>'] for Qwen2)")
            elif key == "vocab" and extra and mine[key] > theirs:  # the objective's (or control) tokens grow the vocabulary
                shown = ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
                message += (f": this recipe adds {len(extra)} special token(s) to the tokenizer ({shown}), and starting from "
                            "a checkpoint whose embeddings lack them (new embedding rows) is not built yet")
                hint = "start from a checkpoint trained with the same objective (same tokens), or use an objective that adds none"
                # shown where the tokens come from when the objective adds them (FIM's, UL2's sentinels), else the model
                from .objectives import objective_tokens

                if set(objective_tokens(r)) & set(extra):
                    path = next((q for q in (("objective", "kind"), ("objective",)) if q in loaded.origins), path)
            out.append(Diagnostic(_dotted(path), message, loaded.origin(path if path in loaded.origins else ("model",)), hint=hint))
    out += _init_from_numerics(r, loaded, found)
    return out


def _init_from_hint(problem: str) -> str:
    """How to get past what checkpoints.describe found wrong with an init_from (or teacher) directory."""
    if "without a checkpoint yet" in problem:
        return "train that run first (malt run), or name another run directory"
    if "no .safetensors" in problem:
        return "save the model as safetensors (transformers: save_pretrained(DIR, safe_serialization=True))"
    if "not valid JSON" in problem or "not a readable malt plan" in problem or "unreadable rms_norm_eps" in problem:
        return "that file is damaged: export or copy the model again"
    if any(w in problem for w in ("hidden_act", "rotary", "head_dim", "bias", "sliding-window", "init_from reads")):
        return "start from another checkpoint: malt's model cannot compute what this one does"
    return "name a run directory of `malt run` (runs/NAME) or a Hugging Face model directory (config.json + safetensors)"


def _file_tokenizer_lacks(r: Recipe, base_dir: Path) -> list[str]:
    """tokenizer.special_tokens that a kind: file tokenizer does not have (malt appends them to its vocabulary)."""
    tok = r.tokenizer
    if tok.kind != "file" or not tok.path or not (base_dir / tok.path).is_file():
        return []
    try:
        have = tokenizer_file_tokens(base_dir / tok.path)
    except (ValueError, KeyError, TypeError, OSError, AttributeError):
        return []
    return [t for t in tok.special_tokens if t not in have]


def _init_from_numerics(r: Recipe, loaded: Loaded, found: dict) -> list[Diagnostic]:
    """model.norm_eps and model.rope_theta against the checkpoint's. The weights alone do not carry them: a model
    that reads a checkpoint with another rotary base computes other logits (a Qwen2's 1e6 against the default
    10000 changes most predictions). A value the recipe writes is a choice (a new rotary base is how context is
    extended), so only a default that differs from the checkpoint's is an error."""
    m = r.model
    first = r.phases[0].model if r.phases and r.phases[0].model is not None else None
    rope_theta = first.rope_theta if first is not None and first.rope_theta is not None else m.rope_theta
    fields = [("norm_eps", m.norm_eps, ("model", "norm_eps"))]
    if m.position == "rope":
        fields.append(("rope_theta", rope_theta, ("model", "rope_theta")))
    out = []
    for name, mine, path in fields:
        theirs = found.get(name)
        if theirs is None or math.isclose(float(mine), float(theirs), rel_tol=1e-9):
            continue
        written = path in loaded.origins or (name == "rope_theta" and first is not None and first.rope_theta is not None)
        if written:
            continue
        out.append(Diagnostic(_dotted(path), f"{name} is {tidy(mine)} here (the default) but {tidy(theirs)} in {r.init_from.path}: "
                              "the model would not compute what the checkpoint computes",
                              loaded.origin(("model",)),
                              hint=f"set model.{name}: {tidy(theirs)}" + (" (or another value on purpose, to extend the context)"
                                                                          if name == "rope_theta" else "")))
    return out


def _llama_d_ff(d_model: int) -> int:
    from .passes.resolve_shape import llama_d_ff

    return llama_d_ff(d_model)
