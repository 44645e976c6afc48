"""The parameter checks that configs, profiles and estimators share: a bad value is a ValueError
that names the parameter (``"pretraining.seeds: expected an integer >= 2, got 1"``)."""

from __future__ import annotations

import math
from typing import Any


def check_int(name: str, value: Any, low: int = 1) -> None:
    """``value`` must be an ``int`` (not a ``bool``) and ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf) -> None:
    """``value`` must be a real number (``int`` or ``float``, not a ``bool``) in the open interval
    ``(low, high)``; by default a positive finite number (NaN and infinity are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        expected = "a positive number" if (low, high) == (0, math.inf) else f"a number in ({low}, {high})"
        raise ValueError(f"{name}: expected {expected}, got {value!r}")


SEED_LIMIT = 2**63  # torch.Generator.manual_seed overflows at 2**64; leave room for seed + offset


def check_seed(name: str, value: Any) -> None:
    """A random seed: an ``int`` in [0, 2**63). ``None`` is refused: it would draw a new language
    (or model) on every call under one run key."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name}: expected an integer seed in [0, 2**63), got {value!r}")
