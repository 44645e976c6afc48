"""Downstream evaluation: linear probes on frozen features, full fine-tuning, and the paper's
"lookup table" features (the exact conditionals).

The probe protocol (fixed, so that numbers from different checkpoints are comparable):

1. features: the model's final-layer representations of the *unmasked* sentence, pooled as
   ``"concat"`` (all positions concatenated, the paper's choice; padding positions are zero),
   ``"mean"`` (mean over the sentence's words) or ``"position"`` (one position's vector: the
   sensitive choice for the HMM state tasks);
2. sentences without a label (-1) are dropped; the rest are split into train / validation / test
   with a seeded permutation (``n_splits`` resplits);
3. features are standardised with the training split's mean and standard deviation;
4. a multinomial logistic regression (L-BFGS, float64, full batch, ``max_iter`` iterations) is fitted
   for every L2 strength of ``l2_grid``; the strength with the best validation accuracy is chosen
   *per split*, and its test accuracy is the split's result;
5. the result is the mean test accuracy over splits with a 95% t-interval, plus the whole sweep (mean
   test accuracy for every L2 strength), reported alongside because the regularisation moves a
   probe by several points (docs/lessons.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from flatlib.device import module_device, preserved_rng
from flatlib.languages import HMM, Corpus, Language
from flatlib.model import Transformer
from flatlib.stats import mean_ci

DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)



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


@torch.no_grad()
def model_features(model: Transformer, corpus: Corpus, batch_size: int = 1024,
                   masked_position: int | None = None) -> Tensor:
    """``[n, L, d]`` final-layer representations of the unmasked sentences (0 at padding), computed on
    the model's device and returned on the CPU. With ``masked_position``, that position's word is
    replaced by the MASK token first: the input whose representation the pre-training loss
    supervises (the head reads it to predict the hidden word)."""
    was_training = model.training
    model.eval()
    out = []
    pad, device = model.config.pad_id, module_device(model)
    if masked_position is not None and not 0 <= masked_position < corpus.tokens.shape[1]:
        raise ValueError(f"masked_position: expected a position in [0, {corpus.tokens.shape[1]}), got {masked_position!r}")
    for chunk in corpus.batches(batch_size):
        tokens = torch.where(chunk.mask, chunk.tokens, pad)
        if masked_position is not None:
            tokens = tokens.clone()
            tokens[:, masked_position] = torch.where(chunk.mask[:, masked_position], model.config.mask_id, pad)
        out.append(model.features(tokens.to(device)).cpu() * chunk.mask[..., None])  # probes run on the CPU
    model.train(was_training)
    return torch.cat(out)


def pool(features: Tensor, corpus: Corpus, pooling: str = "concat", position: int | None = None) -> Tensor:
    """``[n, L, d]`` per-position features -> ``[n, D]`` probe inputs (see the module docstring)."""
    mask = corpus.mask[..., None].to(features.device, features.dtype)
    features = features * mask
    if pooling == "concat":
        return features.flatten(1)
    if pooling == "mean":
        return features.sum(1) / mask.sum(1)
    if pooling == "position":
        if position is None or not 0 <= position < features.shape[1]:
            raise ValueError(f"position: expected a position in [0, {features.shape[1]}), got {position!r}")
        return features[:, position]
    raise ValueError(f"pooling: expected 'concat', 'mean' or 'position', got {pooling!r}")


def probe_inputs(language: Language, corpus: Corpus, features: Tensor, task: str) -> Tensor:
    """The probe's input for ``task``: for an HMM state task, the representation at the task's
    position (the sensitive choice, docs/lessons.md); for a PCFG task, all positions concatenated (the
    paper's choice). Differentiable: the adversarial objective (``flatlib.adversary``) pools its
    downstream batch with it, exactly as the evaluation probe does."""
    return pool(features, corpus, *probe_pooling(language, task))


def probe_pooling(language: Language, task: str) -> tuple[str, int | None]:
    """``(pooling, position)`` of ``pool`` for ``task``: the task's position for an HMM state task,
    all positions concatenated otherwise (the probe's and fine-tuning's shared choice)."""
    if isinstance(language, HMM):
        return "position", int(task.split("@")[1])
    return "concat", None


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, l2: float, max_iter: int = 200) -> Tensor:
    """Multinomial logistic regression by L-BFGS: weights ``[D + 1, C]`` (last row: bias).
    Loss: mean cross-entropy + l2 * ||W||^2 (bias not penalised)."""
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    w = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def _accuracy(w: Tensor, x: Tensor, y: Tensor) -> float:
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    return float(((x @ w).argmax(dim=1) == y).double().mean())


@dataclass
class ProbeResult:
    accuracy: float  # mean test accuracy over splits at the per-split chosen L2
    ci95: float  # half-width of the 95% t-interval over splits
    split_accuracies: list[float]
    chosen_l2: list[float]
    sweep: pd.DataFrame = field(repr=False)  # per L2: mean test / validation accuracy over splits

    def __str__(self) -> str:
        return f"{self.accuracy:.4f} ± {self.ci95:.4f} (95% CI over {len(self.split_accuracies)} splits)"


def linear_probe(features: Tensor, labels: Tensor, n_classes: int, n_train: int, n_test: int,
                 n_val: int | None = None, l2_grid=DEFAULT_L2_GRID, n_splits: int = 3,
                 seed: int = 0, max_iter: int = 200, standardize: bool = True) -> ProbeResult:
    """The probe protocol of the module docstring on ``features`` [n, D] and ``labels`` [n]
    (-1 = no label). ``n_val`` defaults to ``n_test // 2``. ``standardize=False`` skips step 3:
    the probe then sees the features' scales (which a LayerNorm-gain rescaling of the model
    changes), as the theory's minimum-norm head does."""
    keep = labels >= 0
    x_all, y_all = features[keep].to(torch.float64), labels[keep]
    n_val = n_test // 2 if n_val is None else n_val
    if n_train < 2 or n_test < 1 or n_val < 1:
        raise ValueError(f"n_train, n_val, n_test: expected >= 2, 1, 1; got {n_train}, {n_val}, {n_test}")
    if n_train + n_val + n_test > len(y_all):
        raise ValueError(f"n_train + n_val + n_test = {n_train + n_val + n_test} > {len(y_all)} labelled examples")
    if not l2_grid or any(l2 < 0 for l2 in l2_grid):
        raise ValueError(f"l2_grid: expected non-negative strengths, got {l2_grid!r}")
    rows, split_acc, chosen = [], [], []
    for split in range(n_splits):
        order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed * 1000 + split))
        train, val = order[:n_train], order[n_train : n_train + n_val]
        test = order[n_train + n_val : n_train + n_val + n_test]
        if standardize:
            mean, std = x_all[train].mean(0), x_all[train].std(0).clamp(min=1e-8)
            x = (x_all - mean) / std
        else:
            x = x_all
        best = (-1.0, None, None)
        for l2 in l2_grid:
            w = fit_logistic(x[train], y_all[train], n_classes, l2, max_iter)
            val_acc, test_acc = _accuracy(w, x[val], y_all[val]), _accuracy(w, x[test], y_all[test])
            rows.append({"split": split, "l2": l2, "val_accuracy": val_acc, "test_accuracy": test_acc})
            if val_acc > best[0]:
                best = (val_acc, l2, test_acc)
        chosen.append(best[1])
        split_acc.append(best[2])
    sweep = pd.DataFrame(rows).groupby("l2")[["val_accuracy", "test_accuracy"]].mean()
    accuracy, ci = mean_ci(split_acc)
    return ProbeResult(accuracy, ci, split_acc, chosen, sweep)


def finetune(model: Transformer, corpus: Corpus, labels: Tensor, n_classes: int, n_train: int,
             n_test: int, epochs: int = 10, lr: float = 1e-4, batch_size: int = 64, seed: int = 0,
             pooling: str = "mean", position: int | None = None, init_head: str = "random",
             head_l2: float = 1e-3) -> float:
    """Full fine-tuning (the paper: AdamW, lr 1e-4, 10 epochs) of a copy of ``model`` with a new
    linear head on pooled final-layer features; returns the test accuracy.

    ``init_head="random"`` starts the head from PyTorch's default initialisation (the paper's
    setting, with 0.1M examples); ``"probe"`` first fits the linear probe on the training examples
    (standardised features, L2 ``head_l2``, folded back into the head's weights) and fine-tunes from
    there (LP-FT, Kumar et al. 2022): with a few hundred steps, a random head is still far from
    trained and fine-tuning then measures the optimiser, not the features."""
    if init_head not in ("random", "probe"):
        raise ValueError(f"init_head: expected 'random' or 'probe', got {init_head!r}")
    keep = (labels >= 0).nonzero().squeeze(1)
    if n_train + n_test > len(keep):
        raise ValueError(f"n_train + n_test = {n_train + n_test} > {len(keep)} labelled examples")
    generator = torch.Generator().manual_seed(seed)
    order = keep[torch.randperm(len(keep), generator=generator)]
    train, test = order[:n_train], order[n_train : n_train + n_test]
    net = copy.deepcopy(model).train()
    device = module_device(net)
    with preserved_rng():
        torch.manual_seed(seed)  # the head is initialised on the CPU: the same head on any device
        head = torch.nn.Linear(net.config.d_model * (net.config.max_len if pooling == "concat" else 1), n_classes)
    pad = net.config.pad_id
    if init_head == "probe":
        with torch.no_grad():
            chunk = corpus[train]
            x = pool(model_features(net, chunk, batch_size=len(chunk)), chunk, pooling, position).double()  # in one forward pass
            mean, std = x.mean(0), x.std(0).clamp(min=1e-8)
            w = fit_logistic((x - mean) / std, labels[train], n_classes, head_l2)
            head.weight.copy_((w[:-1] / std[:, None]).T)
            head.bias.copy_(w[-1] - (mean / std) @ w[:-1])
    head = head.to(device)
    labels = labels.to(device)
    params = list(net.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)

    def logits(index: Tensor) -> Tensor:
        chunk = corpus[index.cpu()]
        tokens = torch.where(chunk.mask, chunk.tokens, pad).to(device)
        return head(pool(net.features(tokens), chunk, pooling, position))

    for epoch in range(epochs):
        perm = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(perm), batch_size):
            index = perm[start : start + batch_size]
            loss = F.cross_entropy(logits(index), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        correct = sum(int((logits(test[s : s + 512]).argmax(1) == labels[test[s : s + 512]]).sum())
                      for s in range(0, len(test), 512))
    return correct / len(test)
