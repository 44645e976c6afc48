"""The adversarial pre-training objective (``PretrainConfig.adversarial``): the paper's third way to
reach the same loss, "a different training algorithm", which transfers *worse*.

Each step minimizes

    L_mlm(batch) - weight * L_down,   L_down = mean_i min(CE_i, cap),   cap = ADVERSARIAL_CAP * log(C),

where CE_i is the cross-entropy, against the task's label, of a *fixed* linear head applied to the
model's features of sentence i of a fresh downstream batch (``batch_sentences`` unmasked sentences a
step, pooled exactly as the evaluation probe pools them: ``flatlib.measurement.downstream.probe_inputs``;
sentences without a label are dropped). Its gradient flows into the transformer, never into the
head. The head (standardization + multinomial logistic regression with L2 ``ADVERSARIAL_L2``,
float64, ``ADVERSARIAL_MAX_ITER`` full-batch L-BFGS iterations from zero: deterministic) is refitted
at the start and every ``refit_every`` steps, on eval-mode features of a fixed held-out split of
``head_sentences`` sentences of its own random stream (independent of the training sentences, the
masks and the probe corpus of ``flatlib.measurement.measure``). L_down is unbounded above: with a fixed head
the transformer can raise it without limit by pushing the features far along the head's directions
(the head then predicts a wrong class confidently: the information is flipped, not erased), which
also wrecks the MLM loss. Each sentence's term is therefore clipped at ``cap``, the cross-entropy of
a uniform guess (``ADVERSARIAL_CAP = 1``): a sentence whose label the head rates below chance stops
pulling. Measured on a 4-state HMM (tests/test_adversarial.py; 400 AdamW steps, weight 0.1): without
the clip, a head refitted every 50 steps is driven to a cross-entropy of ~45 nats and the gap from
0.010 to 0.077; with it, 5 nats and 0.012. Refit often (every few steps): between refits the cheapest
way to raise L_down is to fool the stale head, and only a fresh head makes the adversary erase the
information (refit every 5 steps: probe accuracy 0.79 -> 0.51; every 50: -> 0.77). The metrics
record the current head's unclipped cross-entropy (``adv_loss``) and accuracy (``adv_accuracy``) on
the downstream batches since the last evaluation, and the accuracy of the latest refit on its own
split (``adv_refit_accuracy``); ``train_loss`` stays the MLM term alone. Not combinable with
``mask_rate``; single process only (no DDP). A continuation (``init_from``) loads the parent's model
and fits a fresh head. A checkpoint holds the head, the step it was fitted at and the running sums,
so a resumed run is bit-identical.

``Adversary`` is the term as an ``flatlib.training.objective.ObjectiveHook`` of the training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flatlib.device import module_device
from flatlib.languages import Corpus, Language
from flatlib.measurement.downstream import fit_logistic, model_features, probe_inputs
from flatlib.seeds import derived_seed

# the settings' checks run when a PretrainConfig is built (flatlib.training.config); re-exported here
from flatlib.training.config import (  # noqa: F401
    ADVERSARIAL_KEYS,
    ADVERSARIAL_MIN_HEAD_SENTENCES,
    PretrainConfig,
    check_adversarial,
)
from flatlib.training.model import Transformer
from flatlib.training.objective import model_tokens, sample

ADVERSARIAL_L2 = 1e-3  # the head's L2 strength (on standardized features; the probe's grid centre)
ADVERSARIAL_CAP = 1.0  # a sentence's cross-entropy is clipped at CAP * log(n_classes) (chance level)
ADVERSARIAL_MAX_ITER = 50  # L-BFGS iterations of a refit, from zero (~1e-4 nats from convergence)


@dataclass(frozen=True)
class AdversarialHead:
    """A linear head on pooled features: standardize with the fit split's ``mean`` and ``std``
    ([D], float64), then ``x @ weight[:-1] + weight[-1]`` (``weight`` [D + 1, C], float64, last row
    the bias; the layout of ``flatlib.measurement.downstream.fit_logistic``). Plain tensors: no gradient
    reaches them; the gradient through ``logits`` reaches the features."""

    mean: Tensor
    std: Tensor
    weight: Tensor

    def logits(self, x: Tensor) -> Tensor:
        x = (x.to(device=self.mean.device, dtype=torch.float64) - self.mean) / self.std
        return x @ self.weight[:-1] + self.weight[-1]

    def tensors(self) -> dict[str, Tensor]:
        return {"adversarial.mean": self.mean, "adversarial.std": self.std,
                "adversarial.weight": self.weight}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "AdversarialHead":
        return cls(tensors["adversarial.mean"], tensors["adversarial.std"], tensors["adversarial.weight"])


def fit_adversarial_head(model: Transformer, language: Language, corpus: Corpus, labels: Tensor,
                         task: str) -> tuple[AdversarialHead, float]:
    """The adversary's head on ``corpus`` (the held-out split): eval-mode features of the unmasked
    sentences without gradients, pooled as the probe pools them, unlabelled sentences dropped,
    standardized; multinomial logistic regression with L2 ``ADVERSARIAL_L2`` by full-batch L-BFGS
    from zero in float64 (deterministic). Returns the head and its accuracy on the split."""
    x = probe_inputs(language, corpus, model_features(model, corpus), task).to(torch.float64)
    keep = labels >= 0
    x, y = x[keep], labels[keep]
    if len(y) < 2:
        raise ValueError(f"adversarial.head_sentences: only {len(y)} held-out sentences have a label "
                         f"for {task!r}")
    mean, std = x.mean(0), x.std(0).clamp(min=1e-8)
    weight = fit_logistic((x - mean) / std, y, language.n_classes(task), ADVERSARIAL_L2,
                          ADVERSARIAL_MAX_ITER)
    head = AdversarialHead(mean, std, weight)
    with torch.no_grad():
        accuracy = float((head.logits(x).argmax(1) == y).double().mean())
    return head, accuracy


def adversarial_head_corpus(config: PretrainConfig, language: Language) -> Corpus:
    """The held-out split the adversary's head is fitted on (its own stream: independent of the
    training sentences, the masks, the downstream batches and the probe corpus)."""
    return sample(language, config.adversarial["head_sentences"],
                  derived_seed("adversarial head sentences", config.seed))


def _adversarial_corpus(config: PretrainConfig, language: Language, step: int) -> Corpus:
    """The downstream batch of ``step``: fresh sentences, a function of (seed, step)."""
    return sample(language, config.adversarial["batch_sentences"],
                  derived_seed("adversarial sentences", config.seed, step))


class Adversary:
    """The adversarial term of one run (an ``ObjectiveHook``): the head, the step it was fitted at,
    and the sums of the head's cross-entropy and accuracy on the downstream batches since the last
    evaluation."""

    def __init__(self, config: PretrainConfig, language: Language) -> None:
        settings = config.adversarial
        self.config, self.language, self.task = config, language, settings["task"]
        self.weight, self.refit_every = float(settings["weight"]), settings["refit_every"]
        self.cap = ADVERSARIAL_CAP * math.log(language.n_classes(self.task))
        self.corpus = adversarial_head_corpus(config, language)
        self.labels = language.task_labels(self.corpus, self.task)
        self.head: AdversarialHead | None = None
        self.fitted_at: int | None = None
        self.refit_accuracy = math.nan
        self.loss_sum = self.accuracy_sum = 0.0
        self.n_steps = 0

    def refit_if_due(self, model: Transformer, step: int) -> None:
        """Fit the head at the start (no head yet) and at every multiple of ``refit_every`` (once)."""
        if self.head is None or (step % self.refit_every == 0 and self.fitted_at != step):
            self.head, self.refit_accuracy = fit_adversarial_head(model, self.language, self.corpus,
                                                                  self.labels, self.task)
            self.fitted_at = step

    def start(self, model: Transformer, step: int) -> None:
        """A fresh run's (or a continuation's) first head; a resumed run's refit if one is due."""
        self.refit_if_due(model, step)

    def extra_term(self, model: Transformer, step: int) -> Tensor | None:
        """-weight * L_down on the downstream batch of ``step`` with the head refitted if due
        (differentiable in the model; None when no sentence of the batch has a label), recording
        the unclipped cross-entropy."""
        self.refit_if_due(model, step)
        corpus = _adversarial_corpus(self.config, self.language, step)
        labels = self.language.task_labels(corpus, self.task)
        keep = labels >= 0
        if not bool(keep.any()):
            return None
        tokens = model_tokens(corpus, model.config.pad_id).to(module_device(model))
        features = model.features(tokens).cpu() * corpus.mask[..., None]  # the head lives on the CPU
        logits = self.head.logits(probe_inputs(self.language, corpus, features, self.task)[keep])
        ce = F.cross_entropy(logits, labels[keep], reduction="none")
        self.loss_sum += float(ce.detach().mean())
        self.accuracy_sum += float((logits.detach().argmax(1) == labels[keep]).double().mean())
        self.n_steps += 1
        return -self.weight * ce.clamp(max=self.cap).mean().to(torch.float32)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss_sum)

    def metrics_row(self) -> dict[str, float]:
        """The metrics columns since the last evaluation (then reset)."""
        n = self.n_steps
        row = {"adv_loss": self.loss_sum / n if n else math.nan,
               "adv_accuracy": self.accuracy_sum / n if n else math.nan,
               "adv_refit_accuracy": self.refit_accuracy}
        self.loss_sum = self.accuracy_sum = 0.0
        self.n_steps = 0
        return row

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The head's tensors and the JSON state a checkpoint holds."""
        return self.head.tensors(), {
            "adv_fitted_at": self.fitted_at, "adv_refit_accuracy": self.refit_accuracy,
            "adv_loss_sum": self.loss_sum, "adv_accuracy_sum": self.accuracy_sum, "adv_steps": self.n_steps}

    def restore(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        self.head = AdversarialHead.from_tensors(tensors)
        self.fitted_at, self.refit_accuracy = state["adv_fitted_at"], state["adv_refit_accuracy"]
        self.loss_sum, self.accuracy_sum = state["adv_loss_sum"], state["adv_accuracy_sum"]
        self.n_steps = state["adv_steps"]
