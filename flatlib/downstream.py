"""Downstream evaluation. For now: the paper's "lookup table" model, whose features are the exact
conditionals themselves (probes and fine-tuning arrive with the pre-training issue)."""

from __future__ import annotations

import torch
from torch import Tensor

from flatlib.languages import Corpus, Language


def lookup_table_features(language: Language, corpus: Corpus, kind: str = "mlm") -> Tensor:
    """The Bayes-optimal pre-trained model as a feature map: ``[n, L, V]`` float64, the exact
    conditional distribution of the word at every position given the rest (``kind="mlm"``:
    p(x_t | x_-t)) or given the prefix (``kind="causal"``: p(x_t | x_<t)). Padding positions are 0.

    The paper probes these (concatenated over positions) as the "lookup table" baseline: a model
    that *is* the optimum of the pre-training loss, and still transfers worse than a trained
    transformer."""
    if kind == "mlm":
        features = language.mlm_conditionals(corpus)
    elif kind == "causal":
        features = language.causal_conditionals(corpus)
    else:
        raise ValueError(f"kind: expected 'mlm' or 'causal', got {kind!r}")
    return features * corpus.mask[..., None].to(features.dtype)
