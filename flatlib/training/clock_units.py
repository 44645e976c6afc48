"""The theory's clock in numbers: ``tau = eta^2 * k / B`` after ``k`` SGD steps at learning rate
``eta`` and ``B`` supervised tokens a step, and the steps that run a given ``tau``. Plain arithmetic,
below ``flatlib.profiles`` (which checks that a profile's doses map to distinct step counts) and
``flatlib.training.clock`` (which builds the runs, explains the clock, and re-exports both functions).
"""

from __future__ import annotations

import math


def sgd_clock(lr: float, steps: int, batch_tokens: int) -> float:
    """``tau = lr^2 * steps / batch_tokens``."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a positive number, got {lr!r}")
    if steps < 0 or batch_tokens < 1:
        raise ValueError(f"steps, batch_tokens: expected steps >= 0 and batch_tokens >= 1, "
                         f"got {steps}, {batch_tokens}")
    return lr * lr * steps / batch_tokens


def steps_for_clock(tau: float, lr: float, batch_tokens: int) -> int:
    """The number of steps (rounded to the nearest) that runs ``tau`` units of the clock."""
    if not (tau >= 0 and math.isfinite(tau)):
        raise ValueError(f"tau: expected a number >= 0, got {tau!r}")
    sgd_clock(lr, 0, batch_tokens)  # checks lr and batch_tokens
    return round(tau * batch_tokens / (lr * lr))
