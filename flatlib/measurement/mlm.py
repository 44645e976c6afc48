"""The MLM case of ``flatlib.measurement.flatness``: the adapters between flatlib's single-mask objective
(``flatlib.training.objective``: one masked position per row, predicted from the rest) and the flatness
estimators, which take a ``loss_fn(model, batch)`` / ``logits_fn(model, batch)`` and a list of batches.

``mlm_batches`` cuts a ``ValidationSet`` (or its tensors) into batches ``(inputs, positions, targets)``;
``mlm_loss_fn`` is the single-mask loss of such a batch (against the sampled words, or the exact
conditionals for the expected loss) and ``mlm_logits_fn`` the logits it is the cross-entropy of. Each
carries the description of its scale conventions that the estimates print. ``flatlib.measurement.flatness``
re-exports the three."""

from __future__ import annotations

from typing import Any, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from flatlib.checks import check_int


def mlm_logits_fn(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """``[m, V]``: a flatlib Transformer's logits at the masked position of each row of
    ``batch = (inputs [m, L], positions [m], ...)`` (the model's predictive distribution there)."""
    inputs, positions = batch[0], batch[1]
    logits = model(inputs)  # [m, L, V]
    index = positions.reshape(-1, 1, 1).expand(-1, 1, logits.shape[-1])
    return logits.gather(1, index).squeeze(1)  # gather, not fancy indexing: fine under vmap


def mlm_loss_fn(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
    """The single-mask MLM loss of ``batch = (inputs [m, L], positions [m], targets)``, mean over
    the m masked tokens, in nats: cross-entropy of ``mlm_logits_fn`` against ``targets`` = the words
    ``[m]`` (int), or probabilities ``[m, V]`` (float: the expected loss under them, e.g. the exact
    conditionals; cast to the model's dtype)."""
    logits = mlm_logits_fn(model, batch)
    targets = batch[2]
    if targets.is_floating_point():
        targets = targets.to(logits.dtype)
    return F.cross_entropy(logits, targets)


def _mlm_loss_description(batch: Sequence[Tensor]) -> str:
    if batch[2].is_floating_point():
        return ("the expected single-mask MLM loss (cross-entropy against the exact conditionals, "
                "mean over masked tokens, nats)")
    return "the single-mask MLM loss (mean over masked tokens, nats)"


# the scale conventions printed with every estimate (see _describe)
mlm_loss_fn.describe = _mlm_loss_description  # type: ignore[attr-defined]
mlm_logits_fn.description = (  # type: ignore[attr-defined]
    "the single-mask MLM loss (predictive distribution at the masked position, mean over masked "
    "tokens, nats)")


def mlm_batches(val: Any, batch_size: int, soft_targets: bool = False) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Consecutive batches ``(inputs [b, L], positions [b], targets)`` of a flatlib ``ValidationSet``
    (or a tuple ``(inputs, positions, targets[, true_probs])``), at most ``batch_size`` rows each.
    ``targets`` are the sampled words ``[b]``, or with ``soft_targets`` the exact conditionals
    ``[b, V]`` (float64), for the expected loss. Use the same batches for ``hessian_trace``
    (``mlm_loss_fn``), ``fisher_trace`` and ``invariant_trace`` (``mlm_logits_fn``)."""
    check_int("batch_size", batch_size, 1)
    if isinstance(val, (tuple, list)):
        inputs, positions, targets = val[0], val[1], val[2]
        probs = val[3] if len(val) > 3 else None
    else:
        inputs, positions, targets = val.inputs, val.positions, val.targets
        probs = getattr(val, "true_probs", None)
    if soft_targets:
        if probs is None:
            raise ValueError("soft_targets: the validation set has no true_probs")
        targets = probs
    return [(inputs[i : i + batch_size], positions[i : i + batch_size], targets[i : i + batch_size])
            for i in range(0, len(inputs), batch_size)]


__all__ = ["mlm_batches", "mlm_logits_fn", "mlm_loss_fn"]
