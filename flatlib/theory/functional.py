"""A model as a function of one flat parameter vector, and the losses of notebook 06.

``FlatModel`` orders the trainable parameters as ``flatlib.measurement.flatness`` does (``named_parameters``
order); ``expected_loss`` is ``L(theta) = sum_c w_c CE(p_c, q_c)`` on a ``ContextSet``;
``per_example_gradients`` gives ``g = grad [-log q_theta(y | c)]`` for a batch of examples ``(c, y)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from flatlib.measurement.flatness import trainable_parameters
from flatlib.theory.contexts import ContextSet


class FlatModel:
    """``model`` as a function of one vector ``theta in R^P``: its trainable parameters in
    ``named_parameters`` order (the order of ``flatlib.measurement.flatness``), flattened and concatenated.
    ``logits(theta, inputs)`` calls the model with ``theta`` swapped in (``functional_call``; works
    under ``vmap``, so ``theta`` may carry chain dimensions through ``vmap``)."""

    def __init__(self, model: nn.Module) -> None:
        params = trainable_parameters(model)
        if not params:
            raise ValueError("model: has no trainable parameter")
        self.model = model
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        self.n_params = sum(self.sizes)

    def vector(self) -> Tensor:
        """The model's current ``theta`` (a detached copy)."""
        return torch.cat([p.detach().reshape(-1) for p in trainable_parameters(self.model).values()]).clone()

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        if theta.shape != (self.n_params,):
            raise ValueError(f"theta: expected shape ({self.n_params},), got {tuple(theta.shape)}")
        parts = theta.split(self.sizes)
        return {name: t.view(shape) for name, t, shape in zip(self.names, parts, self.shapes)}

    def load_(self, theta: Tensor) -> nn.Module:
        """Write ``theta`` into the model's parameters (in place); returns the model."""
        with torch.no_grad():
            for p, value in zip(trainable_parameters(self.model).values(), self.unflatten(theta).values()):
                p.copy_(value)
        return self.model

    def logits(self, theta: Tensor, inputs: Tensor) -> Tensor:
        return functional_call(self.model, self.unflatten(theta), (inputs,))


# ---------------------------------------------------------------------------- losses
def expected_loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """``sum_i weights_i CE(targets_i, softmax(model(inputs)_i))``, for ``batch = ContextSet.batch()``:
    the expected loss L (a ``flatlib.measurement.flatness`` loss_fn; use the whole ContextSet as one
    batch)."""
    inputs, targets, weights = batch
    return (weights * -(targets * torch.log_softmax(model(inputs), -1)).sum(-1)).sum()


expected_loss_fn.description = (  # type: ignore[attr-defined]
    "the expected single-mask loss sum_c w_c CE(p_c, q_c) over the exact contexts (nats)")


def expected_loss(flat: FlatModel, theta: Tensor, contexts: ContextSet) -> Tensor:
    """``L(theta)``, a scalar (differentiable in ``theta``)."""
    logq = torch.log_softmax(flat.logits(theta, contexts.inputs), -1)
    return (contexts.weights * -(contexts.targets * logq).sum(-1)).sum()


def _example_loss(flat: FlatModel, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``-log q_theta(y | x)`` for one example (``x`` one context's input, ``y`` a word)."""
    logq = torch.log_softmax(flat.logits(theta, x.unsqueeze(0))[0], -1)
    onehot = (torch.arange(logq.shape[-1], device=logq.device) == y).to(logq.dtype)  # no indexing by y: vmap
    return -(logq * onehot).sum()


def _minibatch_loss(flat: FlatModel, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(flat.logits(theta, x), y)


def per_example_gradients(flat: FlatModel, theta: Tensor, inputs: Tensor, words: Tensor,
                          chunk_size: int | None = 1024) -> Tensor:
    """``[m, P]``: ``grad_theta [-log q_theta(words_i | inputs_i)]`` for each example (``vmap`` of
    ``grad``; the model must treat the rows of a batch independently)."""
    fn = vmap(grad(lambda t, x, y: _example_loss(flat, t, x, y)), in_dims=(None, 0, 0), chunk_size=chunk_size)
    return fn(theta, inputs, words)

