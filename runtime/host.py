"""Process-wide settings of the machine a generated program runs on."""

from __future__ import annotations

import sys


def tune_allocator() -> bool:
    """glibc malloc: keep freed memory instead of returning it to the OS (no mmap per large tensor, no trim).

    With glibc's defaults every large CPU activation is a fresh mmap that the kernel zero-fills page by
    page and unmaps at free (about 70k minor page faults, 0.13 s of system time per 0.55 s step of a
    5M-parameter model on 2 cores); keeping freed memory is what jemalloc or tcmalloc would do without a
    preload: 1.04-1.10× the tokens/s on CPU (bench/ablate.py, group allocator). The price is that memory
    freed by the run is kept by the process rather than handed back. Linux/glibc only; elsewhere a no-op.
    Returns whether the settings took.
    """
    import ctypes
    import ctypes.util

    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    # glibc before 2.35 caps the mmap threshold at 32 MiB (64-bit): take that where 1 GiB is refused
    mmap = mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return bool(mmap and mallopt(M_TRIM_THRESHOLD, 1 << 30) and mallopt(M_TOP_PAD, 64 << 20))
