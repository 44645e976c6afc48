"""Numbers as the notebook-06 reports print them."""

from __future__ import annotations


def tiny(x: float, floor: float = 1e-12) -> str:
    """``x`` to 2 significant digits, or ``"< 1e-12"`` when it is zero up to rounding (``|x| < floor``)."""
    return f"< {floor:.0e}" if abs(x) < floor else f"{x:.2g}"


def held_text(held: str) -> str:
    """``"yes"`` / ``"partly"`` / anything else as ``HELD`` / ``PARTLY HELD`` / ``NOT HELD``."""
    return "HELD" if held == "yes" else "PARTLY HELD" if held == "partly" else "NOT HELD"
