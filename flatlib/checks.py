"""The parameter checks that configs, profiles and estimators share: a bad value is a ValueError
that names the parameter (``"pretraining.seeds: expected an integer >= 2, got 1"``).

Types are exact: a ``bool`` is neither an ``int`` nor a real number (``lr=True`` would train at 1.0),
and only a ``bool`` is a flag (``supervise_all="no"`` is truthy). Real numbers are finite: NaN
passes no comparison and infinity no training step."""

from __future__ import annotations

import math
from typing import Any


def is_real(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``, finite."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_int(name: str, value: Any, low: int = 1) -> None:
    """``value`` must be an ``int`` (not a ``bool``) and ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, *,
                 low_closed: bool = False, high_closed: bool = False) -> None:
    """``value`` must be a finite real number (``int`` or ``float``, not a ``bool``) in the interval
    from ``low`` to ``high``, open at each end unless ``low_closed`` / ``high_closed``; by default a
    positive finite number (NaN and infinity are refused)."""
    if not (is_real(value) and (value >= low if low_closed else value > low)
            and (value <= high if high_closed else value < high)):
        if (low, high, low_closed) == (0, math.inf, False):
            expected = "a positive number"
        elif (low, high, low_closed) == (0, math.inf, True):
            expected = "a finite number >= 0"
        else:
            expected = f"a number in {'[' if low_closed else '('}{low}, {high}{']' if high_closed else ')'}"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


def check_numbers(name: str, values: Any, low: float = 0.0, high: float = math.inf, *,
                  low_closed: bool = False, high_closed: bool = False) -> None:
    """A non-empty list or tuple of numbers, each checked by ``check_number`` as ``name[i]``."""
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name}: expected a non-empty tuple of numbers, got {values!r}")
    for i, value in enumerate(values):
        check_number(f"{name}[{i}]", value, low, high, low_closed=low_closed, high_closed=high_closed)


def check_bool(name: str, value: Any) -> None:
    """``value`` must be ``True`` or ``False`` (not a string, a number or None)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def check_names(name: str, values: Any) -> None:
    """A non-empty list or tuple of distinct non-empty strings (a bare string is refused: it would be
    read as its characters)."""
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name}: expected a non-empty tuple of names, got {values!r}")
    for value in values:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}: expected non-empty strings, got {value!r} in {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}: expected distinct names, got {values!r}")


# Every seed handed to a generator, and every seed derived from one by arithmetic, lies in [0, 2**63):
# torch.Generator.manual_seed takes up to 2**64 - 1, numpy's default_rng any integer, so this leaves room
# and is one rule for all. Seeds derived by hashing (flatlib.seeds.derived_seed) have 63 bits.
SEED_LIMIT = 2**63
# flatlib.measurement.downstream.linear_probe seeds its k-th split with ``seed * PROBE_SEED_SCALE + k``
PROBE_SEED_SCALE = 1000


def check_seed(name: str, value: Any, scale: int = 1, offset: int = 0) -> None:
    """A random seed: an ``int`` in [0, 2**63) such that every seed derived from it by arithmetic,
    ``scale * value + k`` for ``0 <= k <= offset``, is one too (``value <= (2**63 - 1 - offset) //
    scale``). ``None`` is refused: it would draw a new language (or model) on every call under one
    run key."""
    largest = (SEED_LIMIT - 1 - offset) // scale
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= largest:
        if (scale, offset) == (1, 0):
            raise ValueError(f"{name}: expected an integer seed in [0, 2**63), got {value!r}")
        derived = f"{scale} * seed + {offset}" if scale != 1 else f"seed + {offset}"
        raise ValueError(f"{name}: expected an integer seed in [0, {largest}] (seeds up to {derived} are "
                         f"derived from it and must stay below 2**63), got {value!r}")
