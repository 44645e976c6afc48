"""The parameter check that configs, profiles and estimators share: a bad value is a ValueError
that names the parameter (``"pretraining.seeds: expected an integer >= 2, got 1"``)."""

from __future__ import annotations

from typing import Any


def check_int(name: str, value: Any, low: int = 1) -> None:
    """``value`` must be an ``int`` (not a ``bool``) and ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
