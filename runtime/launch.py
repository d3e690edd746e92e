"""torchrun for the generated programs: `python -m malt.runtime.launch [torchrun arguments] train.py [--resume]`.

The same as `python -m torch.distributed.run`, but the way a run ends reads like a one-process run: when a process
fails, its own message (`error: ...`, `stopped by SIGTERM: ...`) is above, and this launcher exits with that process's
code (2 for a user error, 128 + the signal for a signal) instead of torchrun's Python traceback and exit code 1; a
SIGTERM or SIGHUP to the launcher itself (which torchrun passes on to its processes) ends it with 128 + the signal.
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if "OMP_NUM_THREADS" not in os.environ and str(args.nproc_per_node).isdigit():
        # torchrun would set 1 thread per process (with a warning): the machine's cores shared out over its processes
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // int(args.nproc_per_node)))
    try:
        run(args)
    except ChildFailedError as e:
        from .run import ended_by

        rank, code = cause(e.failures)
        if code == 128 + signal.SIGKILL:  # no word of its own: the out-of-memory killer, or a scheduler's kill
            print(f"launch: process {rank} of the run was ended by {ended_by(signal.SIGKILL)}; the checkpoints already "
                  "written are complete: continue with --resume", file=sys.stderr)
        else:
            print(f"launch: process {rank} of the run ended with exit code {code}"
                  + (f" ({ended_by(code - 128)})" if code > 128 else "") + "; its messages are above", file=sys.stderr)
        return code or 1
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


def code_of(failure) -> int:
    return 128 - failure.exitcode if failure.exitcode < 0 else failure.exitcode  # killed by a signal: -signum


def cause(failures: dict) -> tuple[int, int]:
    """(rank, exit code) of the process whose end made the run fail. torchrun stops the others with SIGTERM once one
    fails, and a process whose collective lost its peer exits PEER_LOST: neither is a cause while another failure is
    one (the earliest of those); else a signal's stop before a lost peer (the process stopped from outside)."""
    from .run import PEER_LOST

    consequences = (128 + signal.SIGTERM, PEER_LOST)
    causes = ({r: f for r, f in failures.items() if code_of(f) not in consequences}
              or {r: f for r, f in failures.items() if code_of(f) != PEER_LOST} or failures)
    rank, failure = min(causes.items(), key=lambda item: (item[1].timestamp, item[0]))
    return rank, code_of(failure)


if __name__ == "__main__":
    raise SystemExit(main())
