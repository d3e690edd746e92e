"""Readable units in recipes: ``2M`` tokens, ``2k`` steps, ``5%``, ``3e-4``.

Counts take a decimal suffix (k = 10^3, M = 10^6, B or G = 10^9, T = 10^12);
fractions take ``%``. Plain numbers pass through. Every parser raises
``ValueError`` with a message that says what form was expected.
"""

from __future__ import annotations

import math
import re

_SUFFIX = {"": 1, "k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "b": 10**9, "B": 10**9,
           "G": 10**9, "g": 10**9, "t": 10**12, "T": 10**12}
_COUNT = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)\s*%\s*$")


def parse_count(value) -> int:
    """``2M`` -> 2_000_000, ``1.5k`` -> 1500, ``4096`` -> 4096. Must be a whole number."""
    if isinstance(value, bool):
        raise ValueError("expected a count such as 4096, 2k or 2M, got a boolean")
    if isinstance(value, (int, float)) and value < 0:
        raise ValueError(f"expected a count of zero or more, got {value}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"expected a whole number, got {value}")
        return int(value)
    if isinstance(value, str):
        m = _COUNT.match(value)
        if m:
            number, suffix = m.groups()
            number = number.replace("_", "")
            scaled = float(number) * _SUFFIX[suffix]
            if "." not in number and "e" not in number.lower():
                scaled = int(number) * _SUFFIX[suffix]
            if not math.isfinite(scaled) or scaled != int(scaled):
                raise ValueError(f"{value!r} is not a whole number")
            return int(scaled)
    raise ValueError(f"expected a count such as 4096, 2k or 2M, got {value!r}")


def parse_fraction(value) -> float:
    """``5%`` -> 0.05; a plain number in [0, 1] is taken as a fraction."""
    if isinstance(value, bool):
        raise ValueError("expected a fraction such as 5% or 0.05, got a boolean")
    if isinstance(value, (int, float)):
        if not 0 <= value <= 1:
            raise ValueError(f"expected a fraction between 0 and 1 (or a percentage such as 5%), got {value}")
        return float(value)
    if isinstance(value, str):
        m = _PERCENT.match(value)
        if m:
            f = float(m.group(1)) / 100
            if f > 1:
                raise ValueError(f"{value!r} is more than 100%")
            return f
        try:
            return parse_fraction(float(value))
        except ValueError:
            pass
    raise ValueError(f"expected a fraction such as 5% or 0.05, got {value!r}")


def parse_float(value) -> float:
    """``3e-4`` (YAML reads it as a string) -> 0.0003."""
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, (int, float)):
        number = float(value) if abs(value) < 1e300 else math.inf
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number such as 3e-4, got {value!r}") from None
    else:
        raise ValueError(f"expected a number such as 3e-4, got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


_BYTES = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value) -> int:
    """``80GB`` -> 80 × 10^9, ``40GiB`` -> 40 × 2^30, ``1073741824B`` -> that many bytes. The unit is required."""
    if isinstance(value, bool):
        raise ValueError("expected a memory size such as 80GB or 40GiB, got a boolean")
    if isinstance(value, str):
        m = _BYTES.match(value)
        if m and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()])
    raise ValueError(f"expected a memory size such as 80GB or 40GiB, got {value!r}")


def human_count(n: float) -> str:
    """1_048_576 -> '1.05M' (for summaries)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}" if isinstance(n, float) and n != int(n) else str(int(n))


def human_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def human_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 86400 * 2:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def divisors(n: int, trials: int = 1_000_000) -> list[int]:
    """The divisors of n, ascending, from its prime factors (trial division, at most ``trials`` candidates: a
    recipe's absurd number never hangs a check; a factor beyond that is taken as prime, which only shortens the
    list of suggestions)."""
    factors: dict[int, int] = {}
    rest, p, tried = n, 2, 0
    while p * p <= rest and tried < trials:
        while rest % p == 0:
            factors[p] = factors.get(p, 0) + 1
            rest //= p
        p, tried = p + (1 if p == 2 else 2), tried + 1
    if rest > 1:
        factors[rest] = factors.get(rest, 0) + 1
    out = [1]
    for prime, power in factors.items():
        out = [d * prime ** k for d in out for k in range(power + 1)]
    return sorted(out)
