"""Export a run to a Hugging Face model directory, and load a run's model back.

The generated model's parameter names are Hugging Face's without the ``model.``
prefix, so export is a rename. A recipe with qkv_bias exports as
Qwen2ForCausalLM (bias on q, k, v only); otherwise as LlamaForCausalLM, or with
model.sliding_window as MistralForCausalLM (Qwen2ForCausalLM with its sliding
window on every layer when it also has qkv_bias).
Encoders (model.family bert) with BERT's architecture export as BertForMaskedLM
(objective mlm) or, the discriminator alone, ElectraForPreTraining (objective rtd);
MosaicBERT variants (ALiBi, GeGLU, pre-norm) are refused before anything is written.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .run import RunError, pid_alive


def _not_found(path: Path) -> RunError:
    """The error for a file of the run directory that is not there: a folder with checkpoints/ is a malt run whose
    compiled file is missing (``malt compile`` writes it again); any other folder is not a run at all."""
    run = path.parent
    if (run / "checkpoints").is_dir():
        return RunError(f"{path.name} is missing from the run directory {run} (it has checkpoints/: a malt run)",
                        f"`malt compile RECIPE -o {run}` with the recipe (and --set flags) the run trained from writes "
                        "it again and keeps the checkpoints")
    return RunError(f"{path} not found: {run} is not a malt run directory",
                    "pass the directory `malt run` trained in, such as runs/tiny-llama")


def _corrupt(path: Path, why) -> RunError:
    return RunError(f"{path} is corrupt: {why}",
                    f"`malt compile RECIPE -o {path.parent}` with the recipe (and --set flags) the run trained from "
                    f"writes {path.name} again and keeps the checkpoints")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise _not_found(path) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from None
    if not isinstance(data, dict):
        raise _corrupt(path, "expected a JSON object")
    return data


def load_run_model(run_dir):
    """(model, tokenizer, plan) from a run directory's model.py, latest checkpoint and tokenizer.json."""
    from .checkpoint import load_weights
    from .tokenizer import RUN_DIR_FIX, read_tokenizer_file

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run directory not found: {run_dir}", "runs live in runs/NAME after `malt run RECIPE`")
    plan = _read_json(run_dir / "plan.json")
    model_py = run_dir / "model.py"
    if not model_py.is_file():
        raise _not_found(model_py)
    name = f"malt_run_model_{abs(hash(str(run_dir.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, model_py)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    plan = trained_plan(run_dir, plan)
    m = plan["model"]
    if plan.get("phases"):  # the depth and rotary base of the phase the checkpoint ended in (growth, context extension)
        model = module.Transformer(n_layers=m["n_layers"])
        if hasattr(model, "set_rope"):
            model.set_rope(m["rope_theta"])
    else:
        model = module.Transformer()
    load_weights(run_dir, model)  # refuses weights that hold nan or inf
    model.eval()
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise RunError(f"{tok_path} not found: the run directory is incomplete", RUN_DIR_FIX)
    return model, read_tokenizer_file(tok_path, "the run's tokenizer", RUN_DIR_FIX), plan


def trained_plan(run_dir, plan: dict) -> dict:
    """plan.json as of the run's newest checkpoint: with phases, its model's n_layers and rope_theta are those
    of the phase that checkpoint's last step trained in (a run stopped before a growth is still small; a context
    extension phase trains with its own rotary base). A copy; plan.json's own values are the final phase's."""
    from .checkpoint import latest

    phases = plan.get("phases") or []
    found = latest(run_dir)
    if not phases or found is None:
        return plan
    last = max(0, found[0] - 1)
    phase = next((ph for ph in phases if ph["start_step"] <= last < ph["end_step"]), phases[-1])
    model = dict(plan["model"])
    for key in ("n_layers", "rope_theta"):
        if key in phase:
            model[key] = phase[key]
    return {**plan, "model": model}


def _model_section(plan: dict, lock: dict | None) -> dict:
    """The model's shape: plan.json's ``model`` section, with the fields it does not carry
    (norm_eps, rope_theta, init_std) taken from the resolved recipe (recipe.lock.yaml)."""
    m = dict(plan["model"])
    recipe_model = (lock or {}).get("model") or {}
    for key in ("norm_eps", "rope_theta", "init_std"):
        if key not in m:
            if key not in recipe_model:
                raise RunError(f"model.{key} is in neither plan.json nor recipe.lock.yaml",
                               "the run directory is incomplete or from another malt version; compile the recipe again")
            m[key] = recipe_model[key]
    return m


def read_lock(run_dir) -> dict:
    """The resolved recipe a run was compiled from (recipe.lock.yaml)."""
    import yaml

    path = Path(run_dir) / "recipe.lock.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise _not_found(path) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from None
    if not isinstance(data, dict):
        raise _corrupt(path, "expected a mapping")
    return data


# post-processors that add special tokens around encoded text (a BOS, [CLS]/[SEP]); ByteLevel only trims offsets
_ADDS_TOKENS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def as_trained(tokenizer: dict) -> dict:
    """tokenizer.json that encodes text as the run's data was encoded: without the post-processor steps that add
    special tokens. A `kind: file` tokenizer (a Llama's, say) may prepend a BOS by default, which the data pipeline
    never did (it encodes with add_special_tokens=False): transformers' tokenizer(text) would feed the model a
    first token it never saw there."""
    post = tokenizer.get("post_processor")
    if not post:
        return tokenizer
    if post.get("type") in _ADDS_TOKENS:
        return {**tokenizer, "post_processor": None}
    if post.get("type") == "Sequence":
        kept = [p for p in post.get("processors", []) if p.get("type") not in _ADDS_TOKENS]
        return {**tokenizer, "post_processor": {**post, "processors": kept} if kept else None}
    return tokenizer


def end_of_text(tokenizer, lock: dict) -> tuple[str | None, int | None]:
    """(token, id) of the run's end-of-text token: the tokenizer's first special token (tokenizer.special_tokens),
    which the data puts between documents; it also serves as BOS. (None, None) without one."""
    specials = (lock.get("tokenizer") or {}).get("special_tokens") or []
    token = specials[0] if specials else None
    token_id = tokenizer.token_to_id(token) if token is not None else None
    return (token, token_id) if token_id is not None else (None, None)


def longest_seq_len(plan: dict) -> int:
    """The longest sequence the run trained on (plan.json: train.seq_len and every phase's)."""
    return max([plan["batch"]["seq_len"]] + [ph["seq_len"] for ph in plan.get("phases") or []])


def hf_config(plan: dict, eos_id: int, lock: dict | None = None) -> tuple[str, dict]:
    """(architecture, config.json contents) of the Hugging Face model equivalent to the plan's.

    ``plan`` is plan.json (``Plan.to_json()``); ``lock`` the resolved recipe
    (recipe.lock.yaml), needed for the fields plan.json lacks.
    """
    m = _model_section(plan, lock)
    seq_len = longest_seq_len(plan)  # the model was trained (and its MAX_SEQ_LEN built) for the longest phase
    common = {
        "vocab_size": m["padded_vocab"],
        "hidden_size": m["d_model"],
        "intermediate_size": m["d_ff"],
        "num_hidden_layers": m["n_layers"],
        "num_attention_heads": m["n_heads"],
        "num_key_value_heads": m["n_kv_heads"],
        "head_dim": m["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": seq_len,
        "rms_norm_eps": m["norm_eps"],
        "rope_theta": m["rope_theta"],                                                  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": m["rope_theta"]},    # transformers 5.x
        "tie_word_embeddings": m["tie_embeddings"],
        "initializer_range": m["init_std"],
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    window = m.get("sliding_window")  # model.sliding_window: query i attends to keys i - window < j <= i, as Mistral's
    if m["qkv_bias"] and window is not None:  # Qwen2's sliding window on every layer (layers from max_window_layers on)
        return "Qwen2ForCausalLM", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common,
                                    "use_sliding_window": True, "sliding_window": window, "max_window_layers": 0,
                                    "layer_types": ["sliding_attention"] * m["n_layers"], "attention_dropout": 0.0}
    if m["qkv_bias"]:
        return "Qwen2ForCausalLM", {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common,
                                    "use_sliding_window": False, "sliding_window": None, "max_window_layers": m["n_layers"],
                                    "attention_dropout": 0.0}
    if window is not None:  # Mistral is Llama's architecture and parameter names plus the window
        return "MistralForCausalLM", {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **common,
                                      "sliding_window": window, "attention_dropout": 0.0}
    return "LlamaForCausalLM", {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                                "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1}


def encoder_refusal(plan: dict, lock: dict | None) -> str | None:
    """Why an encoder run has no Hugging Face architecture that loads it (None: plain BERT, BertForMaskedLM loads it)."""
    m = _model_section(plan, lock)
    odd = [f"model.{k} {m.get(k)}" for k, plain in (("position", "learned"), ("activation", "gelu"), ("norm_position", "post"))
           if m.get(k, plain) != plain]
    if odd:
        arch = "ElectraForPreTraining" if _is_rtd(lock) else "BertForMaskedLM"
        return (f"this encoder ({', '.join(odd)}: MosaicBERT options) has no Hugging Face architecture that loads it; "
                f"{arch} has learned positions, GELU and post-norm")
    return None


def _is_rtd(lock: dict | None) -> bool:
    return ((lock or {}).get("objective") or {}).get("kind") == "rtd"


def bert_config(plan: dict, lock: dict | None = None) -> dict:
    """config.json of the BertForMaskedLM equal to a plain-BERT run, or of the ElectraForPreTraining equal to an rtd
    run's discriminator (no dropout: malt trains without it)."""
    m = _model_section(plan, lock)
    rtd = _is_rtd(lock)  # ELECTRA: the discriminator alone, as ElectraForPreTraining (the generator is not exported)
    return {
        "architectures": ["ElectraForPreTraining" if rtd else "BertForMaskedLM"],
        "model_type": "electra" if rtd else "bert",
        **({"embedding_size": m["d_model"]} if rtd else {}),
        "vocab_size": m["padded_vocab"],
        "hidden_size": m["d_model"],
        "num_hidden_layers": m["n_layers"],
        "num_attention_heads": m["n_heads"],
        "intermediate_size": m["d_ff"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": longest_seq_len(plan),
        "type_vocab_size": 2,
        "initializer_range": m["init_std"],
        "layer_norm_eps": m["norm_eps"],
        "pad_token_id": None,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": m["tie_embeddings"],
        "torch_dtype": "float32",
    }


# files and folders that make a folder a malt run directory: `malt export --force` never replaces one
_RUN_MARKERS = ("plan.json", "checkpoints", ".lock")


def _run_markers(path: Path) -> list[str]:
    """Which of the files that mark a malt run directory ``path`` holds ([] for an ordinary folder)."""
    try:
        return [name for name in _RUN_MARKERS if (path / name).exists()]
    except OSError:
        return []


def _is_run(path: Path) -> bool:
    """Whether a folder above the output is a malt run directory: stricter than _run_markers (a project folder may
    hold a checkpoints/ folder of its own): its plan.json beside what `malt compile` or `malt run` writes with it."""
    from .run import lock_holder

    try:
        if (path / "plan.json").is_file() and any((path / n).exists() for n in ("checkpoints", "recipe.lock.yaml", "train.py")):
            return True
        return lock_holder(path) is not None
    except OSError:
        return False


def _check_out(run_dir: Path, out: Path, force: bool) -> None:
    """Refuse an output directory whose replacement would lose data, before anything is read or written: the run
    itself, a folder in it or above it, another run (or a folder in or holding one), the current directory, a path
    through a file. --force replaces a previous export only."""
    from .run import lock_holder

    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a directory", "choose another output directory")
    o = out.resolve()
    for above in o.parents:  # -o hf/x/sub where hf/x is a file
        if above.exists():
            if not above.is_dir():
                raise RunError(f"cannot write {out}: {above} is a file, not a directory",
                               "choose another output directory, such as hf/NAME")
            break
    r = run_dir.resolve()
    if o == r or o in r.parents:
        raise RunError(f"{out} is or contains the run directory {run_dir}; exporting there would replace the run",
                       "choose an output directory outside the run, such as hf/NAME")
    if r in o.parents:
        raise RunError(f"{out} is inside the run directory {run_dir}: an export there would "
                       + ("replace the run's own files" if out.exists() else "mix with the run's own files"),
                       "choose an output directory outside the run, such as hf/NAME (--force never replaces a run's files)")
    hint = "choose an output directory of its own, such as hf/NAME (--force replaces a previous export, never a run)"
    try:
        pid = lock_holder(o) if o.is_dir() else None
    except OSError:  # its .lock cannot be opened (a read-only folder): the markers below still tell a run
        pid = None
    if pid is not None:
        raise RunError(f"{out} is a malt run directory in which a training (pid {pid or '?'}) runs now", hint)
    markers = _run_markers(o) if o.is_dir() else []
    if markers:
        raise RunError(f"{out} is a malt run directory (it has {', '.join(markers)}): exporting there would replace the run",
                       hint)
    above = next((a for a in o.parents if _is_run(a)), None)
    if above is not None:
        raise RunError(f"{out} is inside the malt run directory {above}: an export there would "
                       + ("replace the run's own files" if out.exists() else "mix with the run's own files"), hint)
    here = Path.cwd().resolve()
    if o == here or o in here.parents:
        raise RunError(f"{out} is or contains the current directory; exporting replaces the whole output directory",
                       "export into a folder of its own, such as hf/NAME")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise RunError(f"{out} already exists and is not empty", "choose another directory, or pass --force to replace it")
        runs = [c.name for c in o.iterdir() if c.is_dir() and not c.is_symlink() and _run_markers(c)]
        if runs:
            raise RunError(f"{out} holds malt run directories ({', '.join(sorted(runs)[:3])}{', ...' if len(runs) > 3 else ''}): "
                           "--force would delete them with it", hint)


def _remove_stale(out: Path) -> None:
    """Remove the temporary folders ``.NAME.tmp-PID`` (and ``.NAME.old-PID``, the previous export being replaced)
    beside ``out`` left by an export that was killed (SIGKILL, a power loss) before it could remove them: those whose
    process no longer runs. Another export that runs now keeps its own."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    try:
        siblings = list(out.parent.iterdir()) if out.parent.is_dir() else []
    except OSError:
        return
    for path in siblings:
        m = pattern.fullmatch(path.name)
        if not m or not path.is_dir() or path.is_symlink():
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            print(f"note: removed {path}, left behind by an export (pid {pid}) that was killed", file=sys.stderr)


class ExportInterrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (or SIGINT) during an export: raised as Ctrl-C's KeyboardInterrupt is, so the export's
    temporary folder is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name


class _StopSignals:
    """For the duration of an export, SIGINT, SIGTERM and SIGHUP raise ExportInterrupted (a signal its process
    ignores, as under nohup, stays ignored); within ``critical()`` (the renames that put the export in place) one is
    noted and the export completes: an interrupted rename would leave neither the old export nor the new one."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __init__(self):
        self.old, self.deferring, self.pending = {}, False, None

    def _handler(self, signum, frame):
        if self.deferring:
            self.pending = signum
            return
        raise ExportInterrupted(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self.old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        return False

    @contextmanager
    def critical(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _write_error(out: Path, e: BaseException, nbytes: int | None) -> RunError:
    """A failed write of the export as a message about ``out`` (never the temporary folder's name) and a hint."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code is None and ("No space left" in text or "StorageFull" in text):  # safetensors' SafetensorError
        code = errno.ENOSPC
    where = out.parent
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        need = f" (the export needs about {_size(nbytes)})" if nbytes else ""
        return RunError(f"cannot write {out}: no space left on the device of {where}{need}; nothing was written",
                        "free space there, or export to a directory on another disk with -o")
    if code == errno.EROFS:
        return RunError(f"cannot write {out}: {where} is on a read-only file system; nothing was written",
                        "choose a writable directory with -o, such as hf/NAME")
    if code in (errno.EACCES, errno.EPERM):
        return RunError(f"cannot write {out}: permission denied in {where}; nothing was written",
                        "choose a directory you can write to with -o, such as hf/NAME")
    if code == errno.ENOTDIR:
        return RunError(f"cannot write {out}: a part of that path is a file, not a directory; nothing was written",
                        "choose another output directory, such as hf/NAME")
    why = getattr(e, "strerror", None) or text
    return RunError(f"cannot write {out}: {why}; nothing was written",
                    "choose a writable directory with enough free space with -o, such as hf/NAME")


def _check_run(run_dir: Path) -> None:
    """A run's files and a checkpoint are all there before anything is written; each error says what is missing."""
    from .checkpoint import latest

    if not run_dir.is_dir():
        raise RunError(f"run directory not found: {run_dir}", "runs live in runs/NAME after `malt run RECIPE`")
    _read_json(run_dir / "plan.json")
    read_lock(run_dir)
    if not (run_dir / "model.py").is_file():
        raise _not_found(run_dir / "model.py")
    if not (run_dir / "tokenizer.json").is_file():
        raise RunError(f"{run_dir / 'tokenizer.json'} not found", "the run directory is incomplete; re-run `malt run RECIPE --resume`")
    if latest(run_dir) is None:
        raise RunError(f"no checkpoint in {run_dir}", "train it first with `malt run RECIPE`")


def _mkdir_new(path: Path) -> list[Path]:
    """mkdir -p ``path``; returns the folders it made, deepest first (removed again if the export fails)."""
    made = [p for p in [path, *path.parents] if not p.exists()]
    path.mkdir(parents=True)
    return made


def export_hf(run_dir, out, force: bool = False) -> str:
    """Write the run's latest checkpoint to ``out`` as a Hugging Face model directory; returns the architecture.

    The files are written into a temporary folder beside ``out`` (``.NAME.tmp-PID``), synced to disk, and renamed
    into place; a failed or interrupted export (an error, Ctrl-C, SIGTERM, SIGHUP) removes it and leaves ``out``
    as it was. Weights that hold nan or inf are refused."""
    with _StopSignals() as signals:
        return _export(Path(run_dir), Path(out), force, signals)


def _export(run_dir: Path, out: Path, force: bool, signals: _StopSignals) -> str:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from .checkpoint import _fsync_dir, _fsync_file

    _check_out(run_dir, out, force)
    shown_out, out = out, out.resolve()  # absolute: "hf/" and "hf" name the same folder, and its temporary sibling is beside it
    encoder = (run_dir / "plan.json").is_file() and _read_json(run_dir / "plan.json").get("model", {}).get("family") == "bert"
    if encoder:  # refuse before writing anything: never a half-valid directory
        why = encoder_refusal(_read_json(run_dir / "plan.json"), read_lock(run_dir))
        if why:
            raise RunError(f"cannot export {run_dir}: {why}",
                           "export works for plain BERT recipes (model.position learned, activation gelu, norm_position post); "
                           "the run's checkpoints (safetensors) and model.py hold the weights")
    _check_run(run_dir)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    made: list[Path] = []
    try:
        made = _mkdir_new(tmp)  # first: a read-only or full disk says so before the model is loaded
    except OSError as e:
        raise _write_error(shown_out, e, None) from None
    nbytes = None
    try:
        model, tokenizer, plan = load_run_model(run_dir)
        lock = read_lock(run_dir)
        eos_token, eos_id = end_of_text(tokenizer, lock)
        state = {}
        if encoder and _is_rtd(lock):  # ElectraForPreTraining: `electra.` before the encoder's names; no generator
            config = bert_config(plan, lock)
            arch = config["architectures"][0]
            for key, tensor in model.state_dict().items():
                if not key.startswith("generator."):
                    state[key if key.startswith("discriminator_predictions.") else "electra." + key] = tensor.contiguous()
        elif encoder:  # BertForMaskedLM: `bert.` before the encoder's names, `cls.` (the MLM head) as it is
            config = bert_config(plan, lock)
            arch = config["architectures"][0]
            for key, tensor in model.state_dict().items():
                state[key if key.startswith("cls.") else "bert." + key] = tensor.contiguous()
            # the decoder's bias is the head's bias (transformers ties the two only when the embeddings are tied)
            state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
        else:
            arch, config = hf_config(plan, eos_id, lock)
            for key, tensor in model.state_dict().items():
                if key == "lm_head.weight":
                    if config["tie_word_embeddings"]:
                        continue
                    state[key] = tensor.contiguous()
                else:
                    state["model." + key] = tensor.contiguous()
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        trained_tokenizer = as_trained(json.loads((run_dir / "tokenizer.json").read_text()))
        specials_map = {"eos_token": eos_token, "bos_token": eos_token} if eos_token is not None else {}
        if encoder:  # the fill-mask pipeline needs the mask token; the end-of-text token separates (and pads) sequences
            specials_map = {"mask_token": ((lock.get("objective") or {}).get("mask_token") or "[MASK]"),
                            **({"sep_token": eos_token, "pad_token": eos_token} if eos_token is not None else {})}
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials_map, "unk_token": None,
                      "model_max_length": longest_seq_len(plan), "clean_up_tokenization_spaces": False,
                      # a decoder, as its data was encoded: text that spells a special token is that text, not the
                      # token (an encoder's fill-mask input spells [MASK] to mean the token)
                      **({} if encoder else {"split_special_tokens": True})}
        try:
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if not encoder:
                (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id}, indent=2) + "\n")
            (tmp / "tokenizer.json").write_text(json.dumps(trained_tokenizer, ensure_ascii=False, indent=2) + "\n")
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
            (tmp / "special_tokens_map.json").write_text(json.dumps(specials_map, indent=2) + "\n")
            for path in tmp.iterdir():  # on disk before the rename: a power loss never leaves complete-looking empty files
                _fsync_file(path)
            _fsync_dir(tmp)
        except (OSError, SafetensorError) as e:
            raise _write_error(shown_out, e, nbytes) from None
    except BaseException:  # an interrupted or failed export leaves nothing half-written behind
        with signals.critical():  # a second signal (a supervisor's repeated SIGTERM) does not stop the cleanup
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in made[1:]:  # the folders above it that this export made
                try:
                    folder.rmdir()
                except OSError:
                    break
        raise
    trash = out.parent / f".{out.name}.old-{os.getpid()}"
    with signals.critical():  # a signal now waits: the export is put in place whole, then the command ends
        try:
            if out.exists():
                os.rename(out, trash)
            os.rename(tmp, out)
            _fsync_dir(out.parent)
        except OSError as e:
            if trash.exists() and not out.exists():  # put the previous export back
                os.rename(trash, out)
            shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(shown_out, e, nbytes) from None
        shutil.rmtree(trash, ignore_errors=True)
    return arch
