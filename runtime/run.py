"""The run directory, command-line flags, logging, metrics and progress of a generated program.

A run directory holds the program (train.py, model.py, plan.json,
recipe.lock.yaml), ``metrics.jsonl`` (one JSON object per logged step or
evaluation), ``tokenizer.json`` and ``checkpoints/``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path


def _strict(record: dict) -> dict:
    """The record as strict JSON: a nan or inf value (what stops a diverged run) is written as null, and the
    record's ``not_finite`` names it and says which ("nan", "inf" or "-inf"). json.dumps would write NaN and
    Infinity, which Python reads but JSON parsers of other languages (JavaScript's, Go's) refuse for the whole file."""
    bad = {k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    return {**{k: None if k in bad else v for k, v in record.items()}, "not_finite": bad} if bad else record


class RunError(Exception):
    """A problem the user can fix (bad flag, existing run, corrupt checkpoint); printed without a traceback."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


DIVERGED = 4  # the exit code of a run stopped because its loss, gradient norm or weights are no longer finite


class Diverged(RunError):
    """Training diverged: a logged loss or gradient norm, or the weights about to be checkpointed, are nan or inf.
    Every process of the run raises it at the same step (the values checked are the same on all of them)."""

    exit_code = DIVERGED
    said_by_the_first = True  # every process raises it: the first process's message speaks for all


def _not_finite(values: dict) -> str:
    """'the loss is nan' for each of ``values`` (name: value; None: not measured) that is nan or inf; '' when all
    are finite."""
    return " and ".join(f"the {name} is {v}" for name, v in values.items() if v is not None and not math.isfinite(v))


def default_cache_dir() -> Path:
    env = os.environ.get("MALT_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "malt"


def _fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Run:
    def __init__(self, directory: Path, name: str, recipe_hash: str, resume: bool, quiet: bool = False, rank: int = 0, world: int = 1):
        self.dir = directory
        self.name = name
        self.recipe_hash = recipe_hash
        self.resume = resume
        self.quiet = quiet
        self.cache_dir = default_cache_dir()
        self.checkpoints = directory / "checkpoints"
        self.metrics_path = directory / "metrics.jsonl"
        self._metrics = None
        self._progress = None
        self._start_step = 0
        self._max_steps = 0
        self._tokens_per_step = 0
        self._t0 = self._t_last = time.perf_counter()
        self._step_last = 0
        self.last_eval = None
        self.is_main = rank == 0      # with several processes, only the first logs and writes
        self.world_size = world
        self.resume_step = 0  # the step of the checkpoint a resumed run continues
        self.resume_path = None  # its folder
        self.tokenizer_sha256 = None  # adopt_tokenizer: the token → id map's hash, kept in each checkpoint's state.json
        self.elapsed_before = 0.0  # training seconds of the processes before this one (a resumed run: its checkpoint's)

    def acquire(self) -> None:
        """Hold the run directory's lock (``.lock``, flock) for the life of this process: a second training in the
        same directory would overwrite this one's checkpoints and metrics, so it is refused while this one runs."""
        self._lock = hold_lock(self.dir)

    # -- output -------------------------------------------------------------
    def log(self, message: str) -> None:
        if not self.is_main:
            return
        if self._progress is not None:
            self._progress.console.print(message, markup=False, highlight=False)
        elif not self.quiet:
            print(message, flush=True)

    def _write(self, record: dict) -> None:
        if self._metrics is None:
            return
        self._metrics.write(json.dumps(_strict(record)) + "\n")
        self._metrics.flush()

    def check_device(self, device: str, precision: str) -> None:
        """Fail early, with the fix, when the program was compiled for hardware this machine lacks.

        On a CPU it also makes glibc keep freed memory (runtime.host.tune_allocator: no page faults on
        every large activation), before the model and the data take any.
        """
        import torch

        if device == "cpu":
            from .host import tune_allocator

            tune_allocator()

        if device == "cuda" and not torch.cuda.is_available():
            raise RunError("this program was compiled for cuda, but no CUDA device is visible here",
                           "compile for this machine: --set target.accelerator=cpu (or auto)")
        here = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))  # torchrun: this node's processes (several nodes)
        if device == "cuda" and torch.cuda.device_count() < here:
            raise RunError(f"{here} processes on this machine but {torch.cuda.device_count()} CUDA devices",
                           f"set target.devices to at most {torch.cuda.device_count()}")
        if device == "cuda" and precision in ("bf16", "pure_bf16") and not torch.cuda.is_bf16_supported():
            raise RunError(f"{torch.cuda.get_device_name(0)} does not support bf16", "use --set target.precision=fp32")

    def adopt_tokenizer(self, path) -> None:
        """Copy the tokenizer into the run directory, so sampling and export need nothing else. On --resume it must
        be the tokenizer the checkpoint trained with: a bpe/unigram tokenizer is trained again when its train_on data
        changed, and the checkpoint's embeddings would carry on under other token ids."""
        import hashlib
        import shutil

        from tokenizers import Tokenizer

        target = self.dir / "tokenizer.json"
        built = Tokenizer.from_file(str(path))
        vocab = sorted(built.get_vocab(with_added_tokens=True).items())
        self.tokenizer_sha256 = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
        changed = ("the tokenizer built for this run now differs from the one its checkpoints trained with ({}): {}; the "
                   "tokenizer's training data (tokenizer.train_on) changed since the run started")
        hint = "restore the data files as they were to resume, or train a new run (without --resume)"
        kept = None  # the hash the checkpoint resumed from recorded (checkpoints of older malt versions have none)
        if self.resume and self.resume_path is not None:
            from .checkpoint import state_of

            kept = (state_of(self.resume_path) or {}).get("tokenizer_sha256")
        if self.resume and target.is_file():
            from .tokenizer import RUN_DIR_FIX, differing_tokens

            try:
                differ = differing_tokens(target, built, "this run's tokenizer", RUN_DIR_FIX)
            except RunError:
                if not kept:
                    raise  # nothing else says which token ids the checkpoint trained with
                self.log(f"{target} is damaged: the checkpoint's tokenizer_sha256 says whether the tokenizer is the same")
                differ = []
            if differ:
                raise RunError(changed.format(target, f"{len(differ):,} token(s) have another id, e.g. {differ[:5]}"), hint)
        if kept and kept != self.tokenizer_sha256:  # also when the run's tokenizer.json was lost
            raise RunError(changed.format(self.resume_path / "state.json", "its token ids are not the ones the "
                                          "checkpoint recorded (tokenizer_sha256)"), hint)
        if not self.is_main:
            return
        tmp = self.dir / f".tokenizer.json.tmp-{os.getpid()}"
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def begin(self, start_step: int, max_steps: int, tokens_per_step: int, tokens_done: int | None = None) -> None:
        """Open metrics.jsonl (dropping records past ``start_step`` on resume) and start the clock.

        ``tokens_done``: tokens trained before ``start_step`` (default start_step × tokens_per_step;
        phased runs pass it, since their tokens per step change).
        """
        self._start_step, self._max_steps, self._tokens_per_step = start_step, max_steps, tokens_per_step
        _STOP.deferring = True  # from here a stop signal lets the step finish and be saved (stop_requested, stop)
        self._tokens_last = self._tokens_start = start_step * tokens_per_step if tokens_done is None else tokens_done
        if not self.is_main:
            return
        kept = []
        if start_step > 0 and self.metrics_path.exists():
            for line in self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if not isinstance(rec, dict) or not isinstance(rec.get("step", 0), (int, float)):
                    continue  # not a record malt writes
                if rec.get("step", 0) <= start_step:  # what the checkpoint's run had logged by then
                    kept.append(line)
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.metrics_path)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")
        self._t0 = self._t_last = time.perf_counter()
        self._step_last = start_step
        if start_step:
            self.log(f"resumed {self.name} at step {start_step:,} of {max_steps:,}" + (": already complete" if start_step >= max_steps else ""))
        if sys.stderr.isatty() and not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.name, total=max_steps, completed=start_step, status="")

    def log_step(self, step: int, loss: float, lr: float, grad_norm=None, tokens: int | None = None, **extra) -> None:
        """Record a step; ``tokens`` is the run's tokens so far (default step × tokens_per_step);
        ``extra``: more fields of the metrics record (the TPU program's count of compiled XLA graphs).

        A loss or gradient norm that is nan or inf is recorded, then stops the run (``Diverged``): every process
        gets the same values (the loss is averaged over them, the gradient norm is global)."""
        if hasattr(grad_norm, "full_tensor"):  # a sharded (FSDP) norm: every process takes part
            grad_norm = grad_norm.full_tensor()
        gn = float(grad_norm) if grad_norm is not None else None
        if self.is_main:
            self._record_step(step, loss, lr, gn, tokens, extra)
        bad = _not_finite({"loss": loss, "gradient norm": gn})
        if bad:
            raise self.diverged(step, bad)

    def _record_step(self, step: int, loss: float, lr: float, gn: float | None, tokens: int | None, extra: dict) -> None:
        now = time.perf_counter()
        tokens = step * self._tokens_per_step if tokens is None else tokens
        tok_s = (tokens - self._tokens_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._step_last, self._tokens_last = now, step, tokens
        elapsed = now - self._t0
        done = step - self._start_step
        eta = elapsed / done * (self._max_steps - step) if done else float("inf")
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": gn, "tokens": tokens,
                  "tokens_per_s": round(tok_s, 1), "elapsed_s": round(self.elapsed_before + elapsed, 3), **extra}
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():  # the peak of this process's GPU memory so far
            record["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        self._write(record)
        status = f"loss {loss:.4f} | lr {lr:.2e} | {tok_s / 1000:,.1f}k tok/s"
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=status)
        elif not self.quiet:
            print(f"step {step:>6,}/{self._max_steps:,} | {status} | ETA {_fmt_duration(eta)}", flush=True)

    def elapsed(self) -> float:
        """Training seconds of the run so far: this process's since begin() and those of the ones it resumed."""
        return self.elapsed_before + time.perf_counter() - self._t0

    def log_eval(self, step: int, val_loss: float, **per_source: float) -> None:
        """An evaluation: the mixture's validation loss, and (train.eval_per_source) ``val_loss/NAME`` of each source.
        A loss that is nan or inf is recorded, then stops the run, as in ``log_step``."""
        if self.is_main:
            self.last_eval = val_loss
            self._write({"step": step, "val_loss": val_loss, **per_source})
            sources = "".join(f" | {k.split('/', 1)[1]} {v:.4f}" for k, v in per_source.items())
            self.log(f"step {step:>6,}/{self._max_steps:,} | val loss {val_loss:.4f}{sources}")
        bad = _not_finite({"validation loss": val_loss, **{f"validation loss of {k.split('/', 1)[1]}": v for k, v in per_source.items()}})
        if bad:
            raise self.diverged(step, bad)

    def stop_requested(self, agree: bool = True) -> bool:
        """Whether Ctrl-C, SIGTERM or SIGHUP arrived during training: the program then saves its step and calls
        ``stop``. The processes of a run stop at the same step: they agree (one all-reduce) at the steps where
        ``agree`` is true, those whose loss they already wait for, and a signal that reached any of them counts."""
        if self.world_size > 1:
            if not agree:
                return False
            from .distributed import largest

            agreed = largest(_STOP.signum or 0)  # a signal noted during the all-reduce is kept for the next logged step
            if agreed:
                _STOP.signum = agreed
            return bool(agreed)
        return _STOP.signum is not None

    def stop(self, step: int) -> None:
        """End the run after ``stop_requested``, its step ``step`` saved: exit 128 + the signal, with the message."""
        _wait_for_checkpoint()  # saved means in place: a checkpoint written in the background lands first
        barrier()
        _STOP.deferring = False
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        raise Terminated(_STOP.signum, saved=step, complete=step >= self._max_steps)

    def diverged(self, step: int, what: str) -> Diverged:
        """The error that stops a run whose training diverged by ``step``; ``what`` says which value is not finite.
        No checkpoint is written from then on, so the newest one is from before and the message names it."""
        from .checkpoint import latest

        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        _land_pending_checkpoint()  # one from before, being written in the background: finite, so kept and named
        barrier()
        last = latest(self.dir)
        kept = (f"the newest checkpoint, step {last[0]:,}, is from before and is kept (its weights and optimizer state are "
                 "finite; metrics.jsonl shows where the loss rose)" if last
                else "no checkpoint had been written yet")
        hint = "lower optimizer.lr or lengthen schedule.warmup (and set optimizer.grad_clip if the recipe has none), then train again"
        if last:
            hint += (f" (in another run directory; a llama-family model on cpu or cuda can start from step {last[0]:,}'s weights "
                     f"with init_from: {{path: {self.dir}, optimizer: carry}})")
        return Diverged(f"training diverged at step {step:,}: {what}; {kept}", hint)

    def end(self) -> None:
        _wait_for_checkpoint()  # the last checkpoint, if written in the background, is in place before the run ends
        _STOP.deferring = False
        if not self.is_main:
            return
        if _STOP.signum is not None:  # noted while the last step was saved: there is nothing left to stop
            import signal

            self.log(f"{signal.Signals(_STOP.signum).name} arrived as the last step was saved: the run is complete")
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._metrics is not None:
            self._metrics.close()
        elapsed = time.perf_counter() - self._t0
        tokens = self._tokens_last - self._tokens_start
        if self._start_step >= self._max_steps:  # --resume of a finished run
            self.log(f"done: the run was already complete at step {self._max_steps:,}; nothing was trained")
            return
        self.log(f"done: {self._max_steps:,} steps, {tokens / max(elapsed, 1e-9) / 1000:,.1f}k tok/s over {_fmt_duration(elapsed)}"
                 + (f", final val loss {self.last_eval:.4f}" if self.last_eval is not None else ""))


LOCK = ".lock"


def _try_flock(fh) -> str:
    """Lock an open file without waiting: "locked", "busy" (another process holds it) or "unsupported" (a
    filesystem without flock, such as some NFS or Lustre mounts, or not POSIX)."""
    import errno

    try:
        import fcntl
    except ImportError:
        return "unsupported"
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return "busy" if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else "unsupported"
    return "locked"


def in_use(directory: Path, pid) -> RunError:
    """The error for a run directory in which another training runs."""
    return RunError(f"{directory} is in use: another training (pid {pid or '?'}) runs in it",
                    "wait for it to finish or stop it; or train (or compile) in another directory")


def _pid_in(fh) -> int:
    fh.seek(0)
    text = fh.read().strip()
    return int(text) if text.isdigit() else 0


def ended_by(signum: int) -> str:
    """A signal a process could not answer, named for a message: SIGKILL is most often the out-of-memory killer."""
    import signal

    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    return name + (" (the kernel's out-of-memory killer sends it when the machine runs out of memory)"
                   if signum == signal.SIGKILL else "")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's counts; a number no process can have does not)."""
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    return True


def lock_holder(directory: Path) -> int | None:
    """The pid (0 if unknown) of the process that trains in ``directory`` now (holds its lock), or None."""
    path = Path(directory) / LOCK
    if not path.is_file():
        return None
    with open(path, "a+") as fh:  # closing it drops a lock this probe took
        return _pid_in(fh) if _try_flock(fh) == "busy" else None


def hold_lock(directory: Path):
    """Take the run directory's lock for the life of this process (the open file is returned and must be kept)."""
    directory.mkdir(parents=True, exist_ok=True)
    fh = open(directory / LOCK, "a+")
    got = _try_flock(fh)
    if got == "busy":
        pid = _pid_in(fh)
        fh.close()
        raise in_use(directory, pid)
    if got == "unsupported":
        print(f"warning: {directory} cannot be locked here: nothing stops a second training in it", file=sys.stderr)
        return fh
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


USAGE = "usage: python train.py [--resume] [--quiet]"


def damaged_message(bad: list) -> tuple[str, str]:
    """The error for checkpoint folders without state.json (checkpoint.damaged), and its hint."""
    names = ", ".join(str(p) for p in bad[:3]) + (", ..." if len(bad) > 3 else "")
    return (f"{names} {'has' if len(bad) == 1 else 'have'} no state.json, which every checkpoint malt writes holds: "
            f"{'it is' if len(bad) == 1 else 'they are'} damaged or partly copied, and training would skip or write over "
            f"{'it' if len(bad) == 1 else 'them'}",
            "put the missing state.json back (copy the whole checkpoint folder again), or move the folder out of "
            "checkpoints/ to keep it, then run again")


def start_run(directory: Path, name: str, recipe_hash: str, argv=None, rank: int = 0, world: int = 1) -> Run:
    """Parse the program's flags and check the run directory before any work is done."""
    args = list(sys.argv[1:] if argv is None else argv)
    unknown = [a for a in args if a not in ("--resume", "--quiet", "-h", "--help")]
    if "-h" in args or "--help" in args:
        print(USAGE)
        print("  --resume  continue from the latest checkpoint in this directory\n  --quiet   print only errors")
        raise SystemExit(0)
    if unknown:
        raise RunError(f"unknown flag {unknown[0]!r}", USAGE)
    from . import checkpoint

    resume = "--resume" in args
    bad = checkpoint.damaged(directory)
    if bad:
        raise RunError(*damaged_message(bad))
    latest = checkpoint.latest(directory)
    if latest is not None and not resume:
        raise RunError(f"{directory} already holds a checkpoint (step {latest[0]:,}); starting over would overwrite it",
                       "pass --resume to continue that run, or remove the directory (or compile to another one) to start over")
    run = Run(directory, name, recipe_hash, resume=resume and latest is not None, quiet="--quiet" in args, rank=rank, world=world)
    if run.is_main:
        run.acquire()
        checkpoint.remove_unfinished(run)  # this process is now the directory's only writer: earlier writes that died are dead
    run.resume_step, run.resume_path = (latest[0], latest[1]) if run.resume else (0, None)
    if run.resume:  # metrics.jsonl's elapsed_s goes on from the checkpoint's (restore reports a corrupt one)
        try:
            run.elapsed_before = float(checkpoint.read_state(latest[1]).get("elapsed_s", 0.0))
        except (RunError, TypeError, ValueError):
            pass
    if resume and latest is None:
        run.log(f"no checkpoint in {directory}: starting from step 0")
    return run


class Terminated(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP (a scheduler's preemption, a closed terminal, `kill`): the program stops.
    ``saved``: the step it saved before stopping (a signal during training), else None (stopped at once)."""

    def __init__(self, signum: int, saved: int | None = None, complete: bool = False):
        super().__init__(signum)
        self.signum = signum
        self.saved = saved
        self.complete = complete  # the step saved was the run's last


class _Stop:
    deferring = False  # training: a first signal is noted, and the program saves its step, then stops
    signum = None      # the signal noted
    at = 0.0           # when (time.monotonic)


REPEAT_WINDOW = 1.0  # seconds: a stop signal again within this is the same stop delivered twice (see _terminate)


_STOP = _Stop()


def _terminate(signum, frame):
    """The handler of Ctrl-C, SIGTERM and SIGHUP. During training the first one is noted and the step goes on, to
    be saved (nothing trained is lost); a second one, or one at any other time, stops the program at once (a
    checkpoint being written is then removed: the ones written before stay complete)."""
    if _STOP.deferring:
        now = time.monotonic()
        if _STOP.signum is None:
            _STOP.signum, _STOP.at = signum, now
            if not int(os.environ.get("RANK", "0")):
                import signal

                name = signal.Signals(signum).name
                until = ("training on to the next logged step (where the processes agree)" if int(os.environ.get("WORLD_SIZE", "1")) > 1
                         else "finishing this step")
                sys.stderr.write(f"\n{name}: {until} and saving it before stopping ({name} again, a second or more later, "
                                 "stops at once)\n")
                sys.stderr.flush()
            return
        if now - _STOP.at < REPEAT_WINDOW:
            # the same stop, delivered twice: Slurm signals every process of a job step and torchrun passes its own
            # signal on; a terminal's Ctrl-C reaches torchrun and its processes, and torchrun passes it on too
            return
    raise Terminated(signum)


def entry(main) -> None:
    """Run a program's main() and turn user errors, Ctrl-C, SIGTERM and SIGHUP into a message and an exit code."""
    _on_stop_signals(_terminate)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        _main_with_messages(main)
        return
    try:
        _main_with_messages(main)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
    except BaseException:  # a bug or an unexpected error: its traceback, then the same exit as any other
        import traceback

        traceback.print_exc()
        code = 1
    _leave(code)


_IGNORED_AT_START: set | None = None  # stop signals this process was started with ignored


def _on_stop_signals(handler) -> None:
    """``handler`` for SIGTERM, SIGHUP (where the platform has it) and SIGINT, except a signal this process was
    started with ignored: `nohup` ignores SIGHUP (a closed terminal must not stop the run), a shell's background
    jobs SIGINT."""
    import signal

    global _IGNORED_AT_START
    stops = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None), signal.SIGINT) if s is not None]
    if _IGNORED_AT_START is None:
        _IGNORED_AT_START = {s for s in stops if signal.getsignal(s) is signal.SIG_IGN}
    for sig in stops:
        if sig not in _IGNORED_AT_START:
            signal.signal(sig, handler)


def _leave(code: int) -> None:
    """End one process of a run of several without the interpreter's shutdown.

    With torch 2.13, FSDP2 keeps the gloo process group alive past destroy_process_group (DTensor's sharding
    cache holds its mesh), and a gloo worker thread that drops the last reference to a collective's tensor
    while the interpreter shuts down aborts the process ("terminate called without an active exception",
    SIGABRT: pytorch/pytorch#190489), about one run in thirty on this CPU. Everything the run writes is
    closed by then (metrics at run.end(), checkpoints before their rename), so flush what is buffered and exit.
    """
    import logging
    import signal

    _on_stop_signals(signal.SIG_DFL)  # a late SIGTERM from torchrun: no Terminated in here
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    logging.shutdown()
    os._exit(code)


def barrier() -> None:
    """The processes of a multi-process run wait here for each other (every one of them must reach it); alone, a no-op.
    Run.stop and Run.diverged use it after the first process landed a checkpoint written in the background: a
    process that ended before would have the launcher stop the first one mid-write."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _wait_for_checkpoint() -> None:
    """Block until a checkpoint being written in the background is in place; raise its error (a full disk)."""
    checkpoint = sys.modules.get(f"{__package__}.checkpoint")  # not imported: nothing was ever saved
    if checkpoint is not None:
        checkpoint.wait()


def _land_pending_checkpoint() -> None:
    """When an error or a stop ends the program: let a checkpoint being written in the background land. It passed its
    checks, and losing it would lose the steps since the one before. A signal during the wait ends the process at
    once (the unfinished folder is removed at the next start). A failed write is said first, then the error at hand."""
    import signal

    checkpoint = sys.modules.get(f"{__package__}.checkpoint")
    if checkpoint is None:
        return
    step = checkpoint.writing()
    if step is not None:
        _on_stop_signals(signal.SIG_DFL)
        if int(os.environ.get("RANK", "0")) == 0:
            sys.stderr.write(f"waiting for the checkpoint of step {step:,} to be written (a signal abandons it)\n")
            sys.stderr.flush()
    try:
        checkpoint.wait()
    except RunError as e:
        sys.stderr.write(f"error: {e.message}\n" + (f"    hint: {e.hint}\n" if e.hint else ""))
    except Exception as e:  # noqa: BLE001  (the error at hand follows; this one is said, not raised over it)
        sys.stderr.write(f"error: a checkpoint written in the background failed: {type(e).__name__}: {e}\n")


def describe_os_error(e: OSError) -> tuple[str, str]:
    """(message, hint) for an operating-system error a user can act on: a full disk, a read-only or forbidden place."""
    import errno

    where = f": {e.filename}" if getattr(e, "filename", None) else ""
    what = (e.strerror or str(e)) + where
    room = ("free disk space there (or point MALT_CACHE_DIR, --run-dir or -o at a disk with room), then run the command "
            "again: what is already written (data cache, checkpoints) is complete")
    hints = {errno.ENOSPC: room, errno.EDQUOT: room,
             errno.EFBIG: "the file system (or `ulimit -f`) refuses a file this large: use another disk, or lift the limit",
             errno.EROFS: "that file system is read-only: choose a writable directory (--run-dir, -o, MALT_CACHE_DIR)",
             errno.EACCES: "you may not write or read there: choose a directory you own, or fix its permissions",
             errno.EPERM: "you may not write or read there: choose a directory you own, or fix its permissions",
             errno.ENOTDIR: "a file stands where a folder is needed: move it, or choose another path"}
    return what, hints.get(e.errno, "check that path and its disk, then run the command again")


def _main_with_messages(main) -> None:
    from .data import DataError

    rank = int(os.environ.get("RANK", "0"))  # torchrun's processes: the first speaks for all, the others say who they are
    try:
        try:
            main()
        except BaseException:
            _land_pending_checkpoint()  # before the message, which may say what is saved
            raise
    except (RunError, DataError) as e:
        if rank and getattr(e, "said_by_the_first", False):
            raise SystemExit(e.exit_code) from None
        who = f"[process {rank}] " if rank else ""
        hint = getattr(e, "hint", None)
        # one write: the processes' messages do not interleave between an error and its hint
        sys.stderr.write(f"{who}error: {getattr(e, 'message', str(e))}\n" + (f"    hint: {hint}\n" if hint else ""))
        sys.stderr.flush()
        raise SystemExit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt as e:
        import signal

        signum = getattr(e, "signum", signal.SIGINT)
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        saved = getattr(e, "saved", None)
        if not rank:  # every process gets the signal: one message
            print(f"\n{what} at step {saved:,}, the last: saved; the run is complete" if getattr(e, "complete", False) else
                  f"\n{what} at step {saved:,}: saved; continue with --resume" if saved is not None else
                  f"\n{what}: checkpoints already written are complete; continue with --resume", file=sys.stderr)
        raise SystemExit(128 + signum)
    except OSError as e:
        who = f"[process {rank}] " if rank else ""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _PEER_LOST.search(str(e)):  # a socket to a process that ended
            sys.stderr.write(f"{who}stopped: another process of the run ended; its message says why\n")
            sys.stderr.flush()
            raise SystemExit(PEER_LOST) from None
        message, hint = describe_os_error(e)
        sys.stderr.write(f"{who}error: {message}\n    hint: {hint}\n")
        sys.stderr.flush()
        raise SystemExit(2) from None
    except RuntimeError as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _PEER_LOST.search(str(e)):
            # another process of the run ended (its own message says why): this one's collective lost its peer
            who = f"[process {rank}] " if rank else ""
            sys.stderr.write(f"{who}stopped: another process of the run ended; its message says why\n")
            sys.stderr.flush()
            raise SystemExit(PEER_LOST) from None
        raise


# what a collective raises when another process of the run is gone (gloo, NCCL)
_PEER_LOST = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|NCCL communicator was aborted",
                        re.IGNORECASE)
PEER_LOST = 3  # the exit code of a process that stopped because another one ended (malt.runtime.launch skips it)
