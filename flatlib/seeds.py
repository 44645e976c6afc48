"""Seeding: ``derived_seed``, one 63-bit seed per random stream, hashed from the stream's name and
its coordinates (e.g. ``("masks", seed, step)``). It imports nothing of flatlib, so that every layer
(the objective, the adversary, the measurements, the notebooks' analyses) can use it."""

from __future__ import annotations

import hashlib


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of parts, e.g. ("masks", seed, step).

    Every random stream gets its own seed: a mask position drawn from the same stream as the
    sentence it masks would be correlated with the sentence (the first uniforms of a stream pick
    both the first hidden state and the position), and a model learns to exploit that.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


__all__ = ["derived_seed"]
