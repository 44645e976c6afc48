"""flatlib: a reproducible companion to "Same Pre-training Loss, Better Downstream" (Liu et al., 2023)."""

__version__ = "0.1.0"
