"""The pre-training objective: batches, the training loss, and the validation set it is measured on.

The objective is the paper's single-mask MLM loss: one position of each sentence, drawn uniformly,
is replaced by [MASK] and predicted from the rest. Its minimum is known exactly (the language's
conditional entropy), so every evaluation reports the *gap* to it:

    gap = E_(x, t) KL( p(. | x_-t) || f_theta(x_-t) )  =  L(theta) - L*,

averaged over a fixed validation set of (sentence, position) pairs that is the same for every run
of a language. Using the exact conditional p instead of the sampled word removes the word's
sampling noise from the estimate: its standard error is over contexts only.

Options (fields of ``flatlib.training.config.PretrainConfig``): ``supervise_all`` trains on every position of
a sentence at once (its T single-mask copies: the same objective, T times the signal);
``mask_rate`` switches to BERT-style multi-mask training (then the training objective's optimum is
*not* the single-mask optimum and is not exactly computable; evaluation stays single-mask). Data are
fresh samples every step (the infinite-data regime of the paper) or a fixed corpus of
``train_sentences``. Every step's sentences and masks are a function of (seed, step), each from its
own random stream (``flatlib.seeds.derived_seed``).

Terms added to the MLM loss (the adversary of ``flatlib.training.adversary``) plug into the training loop as
``ObjectiveHook``s.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from flatlib.device import module_device
from flatlib.languages import PCFG, Corpus, Language, build_language
from flatlib.runner.runs import canonical_json
from flatlib.seeds import derived_seed  # re-exported: objective.derived_seed is how users knew it
from flatlib.training.config import PretrainConfig
from flatlib.training.model import Transformer, TransformerConfig


# ---------------------------------------------------------------------------- batches
def sample(language: Language, n: int, seed: int) -> Corpus:
    """``n`` sentences of ``language`` from ``seed`` (a PCFG's without their trees: not needed)."""
    if isinstance(language, PCFG):  # the trees are not needed (labels come from the words)
        return language.sample(n, seed=seed, trees=False)
    return language.sample(n, seed=seed)


def fixed_corpus(config: PretrainConfig, language: Language) -> Corpus | None:
    """The fixed training corpus of ``train_sentences`` sentences; None for fresh samples every step."""
    if config.train_sentences is None:
        return None
    if config.train_sentences < config.batch_size:
        raise ValueError("train_sentences: must be at least batch_size")
    return language.sample(config.train_sentences, seed=derived_seed("training corpus", config.seed))


def training_corpus(config: PretrainConfig, language: Language, step: int, fixed: Corpus | None) -> Corpus:
    """The global batch of ``step``: fresh sentences, or a slice of an epoch's shuffle of ``fixed``."""
    if fixed is None:  # fresh sentences every step, a function of (seed, step)
        return sample(language, config.batch_size, derived_seed("sentences", config.seed, step))
    per_epoch = len(fixed) // config.batch_size
    epoch, index = divmod(step, per_epoch)
    shuffle = torch.Generator().manual_seed(derived_seed("epoch", config.seed, epoch))
    order = torch.randperm(len(fixed), generator=shuffle)
    return fixed[order[index * config.batch_size : (index + 1) * config.batch_size]]


def mask_generator(config: PretrainConfig, step: int) -> torch.Generator:
    """The random stream of ``step``'s masked positions (independent of its sentences)."""
    return torch.Generator().manual_seed(derived_seed("masks", config.seed, step))


def model_tokens(corpus: Corpus, pad_id: int) -> Tensor:
    """Language word ids (padding -1) -> model token ids (padding = the model's PAD)."""
    return torch.where(corpus.mask, corpus.tokens, pad_id)


def single_mask_batch(corpus: Corpus, mask_id: int, pad_id: int, generator: torch.Generator,
                      supervise_all: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs [m, L], positions [m], targets [m]): one masked position per row, drawn uniformly
    within each sentence; with ``supervise_all`` every position of every sentence, one row each."""
    tokens = model_tokens(corpus, pad_id)
    if supervise_all:
        rows, positions = corpus.mask.nonzero(as_tuple=True)
    else:
        rows = torch.arange(len(corpus))
        u = torch.rand(len(corpus), generator=generator, dtype=torch.float64)
        positions = (u * corpus.lengths).long().clamp_(max=corpus.lengths - 1)
    inputs = tokens[rows].clone()
    targets = inputs[torch.arange(len(rows)), positions].clone()
    inputs[torch.arange(len(rows)), positions] = mask_id
    return inputs, positions, targets


def multi_mask_batch(corpus: Corpus, mask_id: int, pad_id: int, rate: float,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """BERT-style: each real position masked with probability ``rate`` (at least one per sentence).
    Returns (inputs [n, L], targets [n, L] with -100 where not masked)."""
    tokens = model_tokens(corpus, pad_id)
    masked = (torch.rand(tokens.shape, generator=generator) < rate) & corpus.mask
    forced = (torch.rand(len(corpus), generator=generator, dtype=torch.float64) * corpus.lengths).long()
    masked[torch.arange(len(corpus)), forced] |= ~masked.any(dim=1)
    return tokens.masked_fill(masked, mask_id), tokens.masked_fill(~masked, -100)


def mlm_loss(config: PretrainConfig, net: torch.nn.Module, mc: TransformerConfig, corpus: Corpus,
             generator: torch.Generator, device: torch.device, rank: int = 0, world: int = 1) -> Tensor:
    """The MLM loss of this rank's rows of the global batch ``corpus`` (masks from ``generator``),
    on ``device``: (sum over my rows) / (global rows) * world, so that DDP's average of the ranks'
    gradients is the gradient of the global batch's mean."""
    if config.mask_rate is None:
        inputs, positions, targets = single_mask_batch(corpus, mc.mask_id, mc.pad_id, generator,
                                                       config.supervise_all)
        n_global = len(inputs)
        inputs, positions, targets = (t[rank::world].to(device) for t in (inputs, positions, targets))
        logits = net(inputs, positions)
        return F.cross_entropy(logits, targets, reduction="sum") * (world / n_global)
    inputs, targets = multi_mask_batch(corpus, mc.mask_id, mc.pad_id, config.mask_rate, generator)
    n_global = int((targets != -100).sum())
    inputs, targets = inputs[rank::world].to(device), targets[rank::world].to(device)
    return F.cross_entropy(net(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100,
                           reduction="sum") * (world / n_global)


class ObjectiveHook(Protocol):
    """A term added to the MLM loss, plugged into ``flatlib.training.train.pretrain`` (minGPT's callbacks):
    the loop calls ``start`` once (after the model is initialised or restored), ``extra_term``
    every step before the backward pass (None: nothing to add this step), ``metrics_row`` at every
    evaluation (its columns join the metrics row), ``state`` at every checkpoint (tensors and JSON
    state saved with it) and ``restore`` when resuming from one; ``finite`` false stops the run as
    diverged. ``flatlib.training.adversary.Adversary`` is one."""

    @property
    def finite(self) -> bool: ...

    def start(self, model: Transformer, step: int) -> None: ...

    def extra_term(self, model: Transformer, step: int) -> Tensor | None: ...

    def metrics_row(self) -> dict[str, float]: ...

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]: ...

    def restore(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class ValidationSet:
    """Fixed (sentence, position) pairs of a language with the exact conditionals there."""

    inputs: Tensor  # [m, L] model tokens, the pair's position masked
    positions: Tensor  # [m]
    targets: Tensor  # [m] the true words
    true_probs: Tensor  # [m, V] float64: p(x_t = . | x_-t)


@lru_cache(maxsize=8)
def _validation_set(language_json: str, n_pairs: int, pad_id: int, mask_id: int) -> ValidationSet:
    language = build_language(json.loads(language_json))
    corpus = language.sample(n_pairs, seed=derived_seed("validation sentences"))
    generator = torch.Generator().manual_seed(derived_seed("validation positions"))
    inputs, positions, targets = single_mask_batch(corpus, mask_id, pad_id, generator)
    probs = language.mlm_conditionals(corpus)[torch.arange(n_pairs), positions]
    return ValidationSet(inputs, positions, targets, probs)


def validation_set(config: PretrainConfig, language: Language) -> ValidationSet:
    """The validation pairs of ``config.language`` (the same for every run of that language)."""
    tokens = TransformerConfig(vocab_size=language.vocab_size, max_len=language.max_len)  # the special ids
    return _validation_set(canonical_json(config.language), config.eval_pairs, tokens.pad_id, tokens.mask_id)


@torch.no_grad()
def evaluate(model: Transformer, val: ValidationSet, batch_size: int = 2048) -> dict[str, float]:
    """Single-mask loss on the validation pairs, the exact optimum there, and the gap (mean KL)."""
    was_training = model.training
    model.eval()
    device = module_device(model)
    log_q = []
    for start in range(0, len(val.inputs), batch_size):
        inputs = val.inputs[start : start + batch_size].to(device)
        logits = model(inputs, val.positions[start : start + batch_size].to(device))
        log_q.append(F.log_softmax(logits.double(), dim=-1).cpu())
    model.train(was_training)
    log_q = torch.cat(log_q)
    return gap_statistics(log_q, val.true_probs, val.targets)


def gap_statistics(log_q: Tensor, p: Tensor, targets: Tensor) -> dict[str, float]:
    """``evaluate``'s numbers from the model's log-probabilities ``log_q [n, V]`` on ``n`` contexts, the
    exact conditionals ``p [n, V]`` there and the sampled words ``targets [n]``: the mean loss and the
    optimum's on the sampled words, and the gap, mean KL(p || q), with its SE over contexts (and the same
    gap through the sampled words, paired)."""
    log_p = torch.log(p.clamp(min=1e-300))
    kl = (p * (log_p - log_q)).sum(dim=-1)  # per context: the expected excess loss
    rows = torch.arange(len(p))
    nll = -log_q[rows, targets]
    optimum = -log_p[rows, targets]
    n = len(p)
    return {
        "val_loss": float(nll.mean()),
        "val_optimum": float(optimum.mean()),
        "gap": float(kl.mean()),
        "gap_se": float(kl.std() / math.sqrt(n)),
        "gap_paired": float((nll - optimum).mean()),  # the same gap through the sampled words
        "gap_paired_se": float((nll - optimum).std() / math.sqrt(n)),
    }
