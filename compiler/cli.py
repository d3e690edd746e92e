"""The `malt` command line: check, plan, compile, prepare, data, run, export, sample.

Heavy modules (torch, the compiler's passes) are imported inside the commands
that need them, so `malt --help` and `malt check` answer quickly.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="malt: a declarative model-recipe compiler for language-model pre-training.\n\n"
                       "check → plan → compile → run → export. See docs/recipes.md for the recipe language.")

SET_HELP = "Override a recipe value: --set train.steps=100 (repeatable)."


def _version(value: bool):
    if value:
        from .plan import MALT_VERSION

        typer.echo(f"malt {MALT_VERSION}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print malt's version and exit.")):
    pass  # the commands below; the app's help text is in typer.Typer(help=...)


def _fail(message: str, hint: str | None = None, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"    hint: {hint}", err=True)
    raise typer.Exit(code)


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP while a command works in this process (preparing data): raised as Ctrl-C is, so what is
    being written is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_signals_interrupt():
    """SIGTERM and SIGHUP raise _Stopped (a signal ignored, as under nohup, stays ignored); returns the old handlers."""
    import signal

    def handler(signum, frame):
        raise _Stopped(signum)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)
            if signal.getsignal(sig) is not signal.SIG_IGN}


def _guard(fn):
    """Turn user errors into messages and exit codes (2 for recipe and data problems)."""
    import signal

    from .diagnostics import RecipeError, UserError

    old = _stop_signals_interrupt()
    try:
        return fn()
    except RecipeError as e:
        n = len(e.diagnostics)
        for d in e.diagnostics:
            typer.echo(d.format(), err=True)
        typer.echo(f"{n} error{'s' if n != 1 else ''}", err=True)
        raise typer.Exit(2)
    except UserError as e:
        _fail(e.message, e.hint, e.code)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP while this process works (preparing data): files are
        signum = getattr(e, "signum", signal.SIGINT)  # written whole or not at all
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        typer.echo(f"\n{what}: what is already written (data cache, checkpoints) is complete; run the command again to go on",
                   err=True)
        raise typer.Exit(128 + signum)
    except OSError as e:
        from malt.runtime.run import describe_os_error

        _fail(*describe_os_error(e), 2)
    except Exception as e:  # errors from the runtime (data, checkpoints) are user errors too
        from malt.runtime.data import DataError
        from malt.runtime.run import RunError

        if isinstance(e, (DataError, RunError)):
            _fail(getattr(e, "message", str(e)), getattr(e, "hint", None), 2)
        raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _said_kept(kept: list[str], directory: Path) -> None:
    if kept:
        typer.echo(f"note: {', '.join(kept)} in {directory}/: malt's files as edited by hand since it wrote them, kept "
                   "before the new ones replaced them (the recipe is where a change lasts)", err=True)


def changed_fields(old_lock: str | None, new_lock: str | None, limit: int = 6) -> list[str]:
    """'field: old → new' for the recipe fields (outside target) that differ between two recipe.lock.yaml texts."""
    import yaml

    def flat(node, prefix=""):
        if isinstance(node, (dict, list)) and node:
            out = {}
            for k, v in (node.items() if isinstance(node, dict) else enumerate(node)):
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: node}

    try:
        old, new = flat(yaml.safe_load(old_lock or "") or {}), flat(yaml.safe_load(new_lock or "") or {})
    except yaml.YAMLError:
        return []
    from .plan import hashed_field

    keys = [k for k in dict.fromkeys([*old, *new]) if hashed_field(k) and old.get(k) != new.get(k)]
    shown = [f"{k}: {old.get(k, '(unset)')!r} → {new.get(k, '(unset)')!r}" for k in keys[:limit]]
    return shown + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])


def check_run_dir(directory: Path, recipe_hash: str, resume: bool | None, lock: str | None = None) -> None:
    """Before writing a program into ``directory``: no training may run in it, and checkpoints there must be of
    this recipe (its hash; an unreadable state.json is left to train.py, which says how it is corrupt).
    ``resume``: `malt run`'s flag (without it a directory with a checkpoint is refused); None: `malt compile`,
    which may recompile a run of the same recipe (for other hardware)."""
    from malt.runtime.checkpoint import damaged, latest, state_of
    from malt.runtime.run import damaged_message, in_use, lock_holder

    from .diagnostics import UserError

    pid = lock_holder(directory)
    if pid is not None:
        raise in_use(directory, pid)
    bad = damaged(directory)
    if bad:
        raise UserError(*damaged_message(bad), code=2)
    found = latest(directory)
    if found is None:
        return
    if resume is False:
        raise UserError(f"{directory} already holds a run (checkpoint at step {found[0]:,})",
                        "pass --resume to continue it, or --run-dir to start a new run elsewhere", code=2)
    state = state_of(found[1]) or {}
    old = state.get("recipe_hash")
    if old is not None and old != recipe_hash:
        what = "the recipe changed since {d} was started" if resume else "{d} holds a run of another recipe"
        changes = changed_fields(state.get("recipe"), lock) if resume else []
        same = resume and state.get("recipe") and lock and not changes  # the recipe reads the same: malt's hash rule changed
        raise UserError(what.format(d=directory) + f" (checkpoint at step {found[0]:,}: hash {old[:12]}, this recipe's "
                        f"{recipe_hash[:12]}): its program would no longer match its checkpoints"
                        + ("; changed: " + "; ".join(changes) if changes else "")
                        + ("; no recipe field differs: the malt that started the run hashed recipes otherwise" if same else ""),
                        "resume with the malt version that started the run" if same else
                        "resume with the recipe as it was, or use another directory (--run-dir, -o)", code=2)


def slug(name: str) -> str:
    """A directory name for a recipe name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:80].strip("-.") or "recipe"


@app.command()
def check(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
          set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP)):
    """Validate a recipe and report every problem with its file:line:col (also: whether the run fits its devices' memory)."""
    from .api import plan as do_plan

    def go():
        p, loaded = do_plan(recipe, set_)
        typer.echo(f"{loaded.file}: ok ({p.recipe.name})")
    _guard(go)


def _init_kind(p) -> str:
    """What init_from names, for the plan: a malt run's latest checkpoint (and its step) or a Hugging Face model."""
    from .objectives import checkpoint_info

    path = Path(p.recipe_file).parent / p.recipe.init_from.path
    found, _ = checkpoint_info(path, p.recipe)
    if found is None or found["kind"] != "malt":
        return f"a Hugging Face {found['architecture']}" if found else "init_from"
    steps = sorted(int(d.name[5:]) for d in (path / "checkpoints").glob("step_*") if d.name[5:].isdigit())
    return f"malt run, its latest checkpoint: step {steps[-1]:,}" if steps else "malt run"


def _plan_text(p) -> str:
    from .passes.batch_split import BUDGET_SHARE
    from .units import human_bytes, human_count, human_seconds

    j = p.to_json()
    m, b, ex, est = j["model"], j["batch"], j["execution"], p.estimates
    mem = est["memory_per_device_bytes"]
    basis = est["basis"]
    shapes_vary = len({(ph.seq_len, ph.global_batch) for ph in p.phases}) > 1  # phases with their own batch shape
    first = p.phases[0]
    splits_vary = len({(ph.seq_len, ph.global_batch, ph.micro_batch, ph.grad_accum) for ph in p.phases}) > 1
    grows = any(ph.grow_factor for ph in p.phases)
    per_token = [ph["flops"] / ph["tokens"] for ph in j.get("phases") or [] if ph.get("flops") and ph.get("tokens")]
    flops_vary = "teacher_flops_per_token" not in est and len(per_token) > 1 and max(per_token) > 1.005 * min(per_token)
    lines = [
        f"{p.recipe.name}  ({p.recipe_file})",
        "",
        (f"model      llama: {m['n_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads ({m['n_kv_heads']} kv), "
         if m["family"] == "llama" else
         f"model      {m['family']} encoder ({m['position']} positions, {m['activation']}, {m['norm_position']}-norm"
         f"{', unpadded' if m['unpad'] else ''}): {m['n_layers']} layers, d_model {m['d_model']}, {m['n_heads']} heads, ")
        + f"head_dim {m['head_dim']}, d_ff {m['d_ff']}, vocab {m['vocab_size']:,} → {m['padded_vocab']:,}",
        f"params     {est['params']:,} ({human_count(est['params'])}; {human_count(est['params_non_embedding'])} non-embedding"
        + (f"; {human_count(est['params_generator'])} in the rtd generator" if "params_generator" in est else "")
        + ("; the grown model's, phases below" if grows else "") + ")",
        *([f"init       the weights of {j['init_from']['path']} ({_init_kind(p)}), "
           f"AdamW moments {'carried over' if j['init_from']['optimizer'] == 'carry' else 'fresh'}"] if "init_from" in j else []),
        (f"run        {j['steps']:,} steps × {b['tokens_per_step']:,} tokens = {j['tokens']:,} tokens ({human_count(j['tokens'])})"
         if not shapes_vary else f"run        {j['steps']:,} steps = {j['tokens']:,} tokens ({human_count(j['tokens'])}); the phases' batches differ (below)"),
        (f"batch      {b['global_batch']} sequences × seq_len {b['seq_len']}; micro_batch {b['micro_batch']} × {b['grad_accum']} accumulation"
         if not splits_vary else  # the first phase's own batch; the others are in the phases list
         f"batch      {first.global_batch} sequences × seq_len {first.seq_len}; micro_batch {first.micro_batch} × {first.grad_accum} accumulation")
        + (f" × {ex['devices']} devices" if ex['devices'] > 1 else "") + (f" (phase {first.name})" if splits_vary else ""),
        *([_eval_line(p, shapes_vary)] if est.get("eval_flops") else []),
        (f"compute    {human_count(est['total_flops'] / j['tokens'])}FLOPs/token on average (the phases' models or lengths differ) "
         f"× {human_count(j['tokens'])} tokens" if flops_vary else
         f"compute    {human_count(est['flops_per_token'])}FLOPs/token × {human_count(j['tokens'])} tokens")
        + (f" + the teacher's forward passes ({human_count(est['teacher_flops_per_token'])}FLOPs/token distilled)"
           if "teacher_flops_per_token" in est else "") + f" = {est['total_flops']:.3g} FLOPs"
        + (f" (+ {est['recompute_flops']:.3g} recomputed by activation checkpointing)" if est.get("recompute_flops") else "")
        + (f" (+ {est['unselected_head_flops']:.3g} of the compiled head's static share of positions beyond the selected)"
           if est.get("unselected_head_flops") else ""),
        f"memory     {human_bytes(mem['total'])} per device, of its {human_bytes(est['memory_budget_bytes'])} (plans use at most "
        f"{BUDGET_SHARE:.0%}): weights {human_bytes(mem['weights'])}, gradients {human_bytes(mem['gradients'])}, "
        f"optimizer {human_bytes(mem['optimizer'])}, "
        + (f"gathered {human_bytes(mem['gathered'])}, " if "gathered" in mem else "")
        + (f"teacher {human_bytes(mem['teacher_weights'])}, distillation logits {human_bytes(mem['distill_logits'])}, "
           if "teacher_weights" in mem else "")
        + f"activations {human_bytes(mem['activations'])}"
        + (f" (phase {est['activations_phase']}'s, the most of the phases)" if est.get("activations_phase") else ""),
        f"time       ≈ {human_seconds(est['estimated_seconds'])} on {basis['chip']} at {basis['mfu']:.0%} MFU of {basis['peak_flops'] / 1e12:g} TFLOP/s "
        f"({ex['precision']}; {basis['peak_source']})"
        + _evaluations(est),
        f"execution  {ex['device'] if ex['devices'] == 1 else str(ex['devices']) + ' × ' + ex['device'] + ' (' + ex['parallelism'] + ')'}, {'pure bf16' if ex.get('master_weights') == 'bf16' else ex['precision']}, compile {'on' if ex['compile'] else 'off'}, attention {ex['attention']}, "
        + ("oneDNN matmuls, " if ex.get("matmul") == "onednn" else "")
        + (f"GaLore AdamW (rank {p.galore['rank']}, projector every {p.galore['update_every']} steps)" if p.galore else
           f"{'fused' if ex['fused_adamw'] else 'foreach'} AdamW")
        + (f", activation checkpointing {ex['activation_checkpointing']}" if ex.get("activation_checkpointing", "none") != "none" else "")
        + (f", {ex['checkpoint_format']} checkpoints" if ex.get("checkpoint_format") == "sharded" else ""),
    ]
    if p.recipe.phases:
        lines += ["", "phases"]
        width = max(len(ph.name) for ph in p.phases)
        for ph in p.phases:
            sched = f"own {ph.schedule.decay} schedule, peak {ph.lr:g}" if ph.schedule else "the recipe's schedule"
            lines.append(f"  {ph.name:<{width}}  steps {ph.start:,}-{ph.end:,}  {human_count(ph.steps * ph.tokens_per_step)} tokens  "
                         f"seq_len {ph.seq_len} × batch {ph.global_batch}"
                         + (f" (micro_batch {ph.micro_batch} × {ph.grad_accum})" if splits_vary else "") + f"  {sched}"
                         + (f"  changes: {', '.join(ph.changes)}" if ph.changes else ""))
    lines += ["", "decisions"]
    width = max(len(d.name) for d in p.decisions)
    value_width = max([12] + [len(str(d.value)) for d in p.decisions if len(str(d.value)) <= 16])  # longer ones overflow
    for d in p.decisions:
        lines.append(f"  {d.name:<{width}}  {d.value!s:<{value_width}}  {d.reason}")
    return "\n".join(lines)


def _lr_text(p, width: int = 64, height: int = 12) -> str:
    """An ASCII plot of the learning rate over the run (each column the highest lr of its steps, so a short peak
    shows; phase starts marked under the axis), and its value at the milestones, named."""
    from .phases import lr_at

    n = p.steps
    edges = [round(i * n / width) for i in range(width + 1)]
    cols = []
    for a, b in zip(edges, edges[1:]):
        steps = range(a, max(b, a + 1))
        stride = max(1, len(steps) // 64)  # long runs: a sample of each column's steps, its ends included
        cols.append(max(lr_at(p, min(s, n - 1)) for s in [*steps[::stride], steps[-1]]))
    top = max(cols) or 1.0
    rows = []
    for level in range(height, 0, -1):
        cut = top * (level - 0.5) / height
        label = f"{top * level / height:9.2e} |" if level in (height, 1) or level == height // 2 else "          |"
        rows.append(label + "".join("█" if v >= cut else ("▁" if level == 1 and v > 0 else " ") for v in cols))
    rows.append("          +" + "-" * width)
    named = {}  # step -> what happens there
    if len(p.phases) > 1:
        ticks = [" "] * width
        for ph in p.phases[1:]:
            ticks[min(width - 1, ph.start * width // max(1, n))] = "^"
            named.setdefault(ph.start, f"phase {ph.name} starts")
        rows.append("           " + "".join(ticks).rstrip() + "  (^ phase starts)")
    last = f"{n - 1:,}"
    rows.append(f"           step 0{' ' * max(1, width - len(last) - 6)}{last}")
    if p.warmup_steps:
        named.setdefault(p.warmup_steps, "warmup ends (peak)")
    if p.schedule.decay_start:
        named.setdefault(p.schedule.decay_start, "final decay starts")
    if p.schedule.cooldown_end:
        named.setdefault(p.schedule.cooldown_end, "cooldown ends")
    for ph in p.phases:
        if len(p.phases) > 1:
            named.setdefault(max(ph.start, ph.end - 1), f"last step of phase {ph.name}")
    named.setdefault(0, "first step")
    named.setdefault(n - 1, "last step")
    rows += ["", "step        lr          "] + [f"{s:<10,}  {lr_at(p, s):.4e}  {named[s]}" for s in sorted(named) if 0 <= s < n]
    return "\n".join(rows)


@app.command()
def plan(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
         set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
         as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
         lr: bool = typer.Option(False, "--lr", help="Show the learning-rate curve (with --json: every step's value).")):
    """Resolve the recipe for its target and print the cost: parameters, FLOPs, memory, time."""
    from .api import plan as do_plan

    def go():
        p, _ = do_plan(recipe, set_)
        if lr:
            from .phases import lr_at

            typer.echo(json.dumps([lr_at(p, s) for s in range(p.steps)]) if as_json else _lr_text(p))
            return
        typer.echo(json.dumps(p.to_json(), indent=2) if as_json else _plan_text(p))
    _guard(go)


@app.command("compile")
def compile_(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
             out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output directory (default build/NAME)."),
             set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP)):
    """Render the training program: train.py, model.py, launch.sh, plan.json, recipe.lock.yaml."""
    from .api import check as do_check

    def go():
        target = out
        if target is None:
            r, _ = do_check(recipe, set_)
            target = Path("build") / slug(r.name)
        from .api import compile_files
        from .render import write

        p, files = compile_files(recipe, target, set_)
        check_run_dir(target, p.recipe_hash, resume=None, lock=files.get("recipe.lock.yaml"))
        kept = write(files, target)
        typer.echo(f"wrote {target}/: train.py model.py launch.sh {'slurm.sbatch ' if p.nodes > 1 else ''}plan.json recipe.lock.yaml")
        _said_kept(kept, target)
    _guard(go)


@app.command()
def run(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
        set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
        run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/NAME)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the run directory's latest checkpoint.")):
    """Compile the recipe into its run directory, prepare data and train."""
    import os
    import subprocess

    from .api import check as do_check
    from .api import compile_files
    from .diagnostics import UserError

    def go():
        r, loaded = do_check(recipe, set_, resuming=resume)
        directory = run_dir or Path("runs") / slug(r.name)
        from malt.runtime.checkpoint import latest

        # only a resume that has checkpoints to continue may do without the init_from source (it reads none)
        p, files = compile_files(recipe, directory, set_, resuming=resume and latest(directory) is not None)
        check_run_dir(directory, p.recipe_hash, resume=resume, lock=files.get("recipe.lock.yaml"))
        from .render import write

        _said_kept(write(files, directory), directory)
        where = p.device if p.world == 1 else f"{p.world} × {p.device}, {p.parallelism}"
        typer.echo(f"compiled {p.recipe_file} → {directory}/ ({p.estimates['params']:,} params, {p.steps:,} steps, {where}, {'pure_bf16' if p.master_weights == 'bf16' else p.precision})")
        if p.nodes > 1:  # one machine cannot start the other nodes' processes: say how to start them
            from .launch import instructions

            raise UserError(instructions(p, str(directory)), "or set target.nodes: 1 to run on this machine")
        if p.device == "tpu":  # say it before any data is prepared, not after
            import importlib.util

            if importlib.util.find_spec("torch_xla") is None:
                raise UserError("this recipe trains on a TPU (target.accelerator: tpu), and torch-xla is not installed here",
                                "install malt's tpu extra: pip install -e '.[tpu]' in malt's checkout (torch 2.9.0 with torch-xla 2.9.0), "
                                "or train on this machine: --set target.accelerator=cpu --set target.chip=auto", code=2)
        if p.device != "tpu":  # the TPU program prepares its data itself (torch-xla's environment)
            # data first, in this process: a problem with a source is shown at its line in the recipe, and is one
            # message, not one per process from torchrun; the program then finds the data in the cache
            from .render import data_spec

            prepare_located({**data_spec(p, loaded.base_dir, directory), "base_dir": str(directory)}, p.recipe, loaded, plan=p,
                            log=typer.echo)
        from .render import launch_command

        cmd = launch_command(p, str(directory / "train.py")) + (["--resume"] if resume else [])
        import signal

        env = {**os.environ, **({"MALT_DATA_PREPARED": "1"} if p.device != "tpu" else {})}  # logged above: not again
        # the program runs in its own process group, and malt passes Ctrl-C, `kill` and a closed terminal on to it once
        # (a terminal's Ctrl-C reaches only malt's group; a supervisor may signal only malt): it stops with malt
        own_group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}  # Python 3.10: no process_group
        child = subprocess.Popen(cmd, env=env, **own_group)
        forward = {sig: signal.signal(sig, lambda signum, frame: child.send_signal(signum))
                   for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                   if signal.getsignal(sig) is not signal.SIG_IGN}  # nohup's SIGHUP stays ignored (the child's too)
        try:
            code = child.wait()
        finally:
            for sig, handler in forward.items():
                signal.signal(sig, handler)
            if child.poll() is None:  # malt itself failed while waiting: never leave the program training alone
                child.terminate()
                child.wait()
        if code < 0:  # ended by a signal it could not answer (SIGKILL: the out-of-memory killer, a scheduler's kill)
            from malt.runtime.run import ended_by

            typer.echo(f"error: the training program was ended by {ended_by(-code)}; the checkpoints already written are "
                       "complete: continue with --resume", err=True)
            raise typer.Exit(128 - code)
        if code:
            raise typer.Exit(code)
    _guard(go)


@app.command()
def export(run_dir: Path = typer.Argument(..., help="A run directory (runs/NAME)."),
           out: Path = typer.Option(..., "-o", "--out", help="Directory for the Hugging Face model."),
           force: bool = typer.Option(False, "--force", help="Replace OUT if it already exists (a previous export; never a run).")):
    """Write the latest checkpoint as a Hugging Face model directory (config.json, model.safetensors, tokenizer)."""
    def go():
        import signal

        from malt.runtime.export import export_hf

        try:
            arch = export_hf(run_dir, out, force=force)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: the export's temporary folder is already removed
            signum = getattr(e, "signum", signal.SIGINT)
            typer.echo(("\n" if signum == signal.SIGINT else "")  # after the terminal's ^C
                       + f"interrupted ({getattr(e, 'name', 'Ctrl-C')}): the export stopped and removed its temporary "
                       f"files; {out} is as it was", err=True)
            raise typer.Exit(128 + signum)
        auto = {"BertForMaskedLM": "AutoModelForMaskedLM", "ElectraForPreTraining": "AutoModelForPreTraining"}.get(arch, "AutoModelForCausalLM")
        typer.echo(f"wrote {out}/ ({arch}): load it with transformers.{auto}.from_pretrained({str(out)!r})")
        objective = json.loads((run_dir / "plan.json").read_text()).get("objective") or {}
        if arch != "BertForMaskedLM" and "bidirectional" in str(objective.get("attention", "")):
            typer.echo(f"note: this run trained with {objective['kind']} ({objective['attention']}); {arch} attends "
                       "causally everywhere, as malt's model does without a prefix (generation from a prompt)")
    _guard(go)


@app.command()
def sample(run_dir: Path = typer.Argument(..., help="A run directory (runs/NAME)."),
           prompt: str = typer.Option("", "--prompt", "-p", help="Text to continue; empty: the start of a new document."),
           tokens: int = typer.Option(64, "--tokens", "-n", min=1, help="Tokens to generate."),
           temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="0 = greedy."),
           top_k: int = typer.Option(50, "--top-k", min=0),
           seed: int = typer.Option(0, "--seed")):
    """Print a continuation of PROMPT from the run's latest checkpoint."""
    def go():
        from malt.runtime.export import end_of_text, load_run_model, read_lock
        from malt.runtime.sample import generate

        model, tokenizer, plan = load_run_model(run_dir)
        if plan.get("model", {}).get("family") == "bert":
            from malt.runtime.run import RunError

            raise RunError(f"{run_dir} holds an encoder (model.family bert): it predicts masked tokens and does not continue text",
                           "export it (malt export) and use transformers' fill-mask pipeline")
        _, eos_id = end_of_text(tokenizer, read_lock(run_dir))
        typer.echo(generate(model, tokenizer, prompt, tokens, seed=seed, temperature=temperature, top_k=top_k, start_id=eos_id))
    _guard(go)


def located_data_error(e: Exception, recipe, loaded):
    """A data error about one of the recipe's sources (its message starts "source 'NAME'") as a diagnostic at that
    source's line in the recipe; None for any other error, which is then shown as it is."""
    from .diagnostics import Diagnostic, RecipeError

    where = {s.name: ("data", "sources", i) for i, s in enumerate(recipe.data.sources)}
    for k, ph in enumerate(recipe.phases):  # sources only a phase adds
        for j, s in enumerate(ph.data.sources if ph.data and ph.data.sources else []):
            where.setdefault(s.name, ("phases", k, "data", "sources", j))
    found = []
    for err in [e, *getattr(e, "others", [])]:  # prepare reports every source that yields no text
        text = getattr(err, "message", None) or str(err)
        m = re.match(r"source '([^']+)'", text)
        if m is None or m.group(1) not in where:
            return None
        path = where[m.group(1)]
        message, _, fix = text.rpartition("; ") if "; " in text else (text, "", "")
        hint = fix or "fix this source's path, text_field or filter"
        found.append(Diagnostic(".".join(map(str, path)), message, loaded.origin(path), hint=hint))
    return RecipeError(found)


# objectives whose rows are seq_len + 1 raw tokens of a source (span_corruption and ul2 draw shorter raw rows,
# encoders seq_len: the program checks those when it draws them)
LENGTH_CHECKED = ("causal_lm", "fim", "distill", "prefix_lm")


def _eval_line(p, shapes_vary: bool) -> str:
    """What an evaluation reads: train.eval_batches global batches, the same sequences on any devices and split."""
    from .units import human_count

    tr = p.recipe.train
    ph = p.phases[0]
    sequences = tr.eval_batches * ph.global_batch
    return (f"eval       every {tr.eval_every:,} steps: {tr.eval_batches} global batches = {sequences:,} validation sequences "
            f"({human_count(sequences * ph.seq_len)} tokens"
            + (f", phase {ph.name}'s" if shapes_vary else "") + ("; each source's too" if tr.eval_per_source else "") + ")")


def _evaluations(est: dict) -> str:
    """The time line's share of the evaluations (train.eval_batches global batches every train.eval_every steps), and
    how to spend less when they take more than a tenth of the run."""
    from .units import human_seconds

    seconds = est.get("eval_seconds")
    if not seconds:
        return ""
    share = seconds / est["estimated_seconds"]
    text = f"; evaluations {human_seconds(seconds) if seconds >= 0.05 else 'under 0.1 s'} of it ({share:.1%})"
    if share > 0.1:
        text += ": lower train.eval_batches or raise train.eval_every to spend less"
    return text


def check_lengths(ds, p) -> None:
    """Every source a phase (or its evaluation) draws from holds at least one sequence of that phase: the program
    would otherwise stop when it first draws the source, for a later phase after the earlier phases trained. An
    evaluation draws the recipe's mixture at the phase's sequence length, whatever the phase's own weights."""
    if p.recipe.model.family != "llama" or p.objective.get("kind", "causal_lm") not in LENGTH_CHECKED:
        return
    tr = p.recipe.train
    names = [s.name for s in p.sources]
    from .passes.estimate import evaluates

    evaluating = evaluates(p.recipe)
    for ph in p.phases:
        weights = dict(zip(names, ph.weights))
        ds.check(ph.seq_len, "train", weights)
        if evaluating:
            ds.check(ph.seq_len, "val")
            if tr.eval_per_source:
                for name in names:
                    ds.check(ph.seq_len, "val", {name: 1.0})
    if evaluating and p.phases:
        # an evaluation reads eval_batches global batches; a smaller validation split is read with overlapping windows
        reads = max(tr.eval_batches * ph.global_batch * ph.seq_len for ph in p.phases)
        held = {s["name"]: s["val_tokens"] for s in ds.sources}
        splits = [("the validation split", sum(held.values()))] + ([(f"source {n}'s validation split", held[n]) for n in names]
                                                                   if tr.eval_per_source else [])
        for what, tokens in splits:
            if 0 < tokens < reads:
                typer.echo(f"data: warning: an evaluation reads {reads:,} tokens (train.eval_batches {tr.eval_batches} global batches) "
                           f"but {what} holds {tokens:,}: each of its tokens is read about {reads / tokens:.1f} times; lower "
                           "train.eval_batches, or raise data.validation", err=True)


def prepare_located(spec: dict, recipe, loaded, plan=None, **kwargs):
    """runtime.data.prepare, with errors about a source pointed at its line in the recipe; with ``plan``, also
    that every source holds a sequence of each phase that draws it (check_lengths)."""
    from malt.runtime.data import prepare as do_prepare
    from malt.runtime.run import default_cache_dir
    from malt.runtime.sources import DataError

    try:
        ds = do_prepare(spec, default_cache_dir(), log=kwargs.pop("log", lambda m: typer.echo(m, err=True)), **kwargs)
        if plan is not None:
            check_lengths(ds, plan)
        return ds
    except DataError as e:
        located = located_data_error(e, recipe, loaded)
        if located is None:
            raise
        raise located from None


def _prepare(recipe: Path, set_, workers, verify):
    from .api import plan as do_plan
    from .render import data_spec

    p, loaded = do_plan(recipe, set_, check_fit=False)  # the data does not depend on whether the run fits its devices
    base = Path(loaded.base_dir)
    spec = {**data_spec(p, base, base), "base_dir": str(base)}
    return p, prepare_located(spec, p.recipe, loaded, plan=p, workers=workers, verify=verify)


WORKERS_HELP = "Tokenizer processes (default: $MALT_DATA_WORKERS or the CPU count, at most 16)."


@app.command()
def prepare(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
            set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
            workers: Optional[int] = typer.Option(None, "--workers", min=1, help=WORKERS_HELP),
            verify: bool = typer.Option(False, "--verify", help="Check the sha256 of every cached shard.")):
    """Build the tokenizer and tokenize the data into the cache ($MALT_CACHE_DIR), as `malt run` does first."""
    def go():
        _, ds = _prepare(recipe, set_, workers, verify)
        typer.echo(ds.summary())
    _guard(go)


def drawn_tokens(p, names: list[str]) -> list[float]:
    """Training tokens the run draws from each named source: each phase's tokens split by its weights."""
    phases = getattr(p, "phases", None) or ()
    src_names = [s.name for s in (getattr(p, "sources", None) or p.recipe.data.sources)]
    drawn = dict.fromkeys(names, 0.0)
    if phases:
        for ph in phases:
            total = sum(ph.weights)
            for n, w in zip(src_names, ph.weights):
                if total > 0 and n in drawn:
                    drawn[n] += ph.steps * ph.tokens_per_step * w / total
    else:
        weights = {s.name: s.weight for s in p.recipe.data.sources}
        total = sum(weights.values())
        for n in names:
            drawn[n] = p.tokens * weights.get(n, 0.0) / total
    return [drawn[n] for n in names]


@app.command()
def data(recipe: Path = typer.Argument(..., help="Recipe YAML file."),
         set_: Optional[List[str]] = typer.Option(None, "--set", help=SET_HELP),
         workers: Optional[int] = typer.Option(None, "--workers", min=1, help=WORKERS_HELP)):
    """Per source: documents, tokens, share of the mix, tokens the run draws and epochs (tokenizing first if needed)."""
    def go():
        p, ds = _prepare(recipe, set_, workers, False)
        drawn = drawn_tokens(p, ds.names)
        typer.echo(f"run: {p.steps:,} steps, {p.tokens:,} training tokens")
        typer.echo(ds.summary(drawn=drawn))
        if ds.packing != "concat":  # one line per sequence length and mixture the run uses
            names = [s.name for s in (p.sources or p.recipe.data.sources)]
            shapes = dict.fromkeys((ph.seq_len, tuple(ph.weights)) for ph in p.phases) if p.phases else \
                {(p.recipe.train.seq_len, None): None}
            for seq_len, weights in shapes:
                typer.echo(ds.packing_summary(seq_len, dict(zip(names, weights)) if weights else None))
        over = [f"{n} ({d / s['train_tokens']:.1f})" for n, d, s in zip(ds.names, drawn, ds.sources)
                if s["train_tokens"] and d / s["train_tokens"] > 4]
        if over:
            typer.echo(f"note: the run repeats {', '.join(over)} more than 4 times; "
                       f"repeated data helps less each epoch (Muennighoff et al., 2023)")
    _guard(go)


def main():
    app()


if __name__ == "__main__":
    main()
