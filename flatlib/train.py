"""Pre-training to the exact optimum, and beyond: ``pretrain(PretrainConfig) -> Run``.

The objective is the paper's single-mask MLM loss: one position of each sentence, drawn uniformly,
is replaced by [MASK] and predicted from the rest. Its minimum is known exactly (the language's
conditional entropy), so every evaluation reports the *gap* to it:

    gap = E_(x, t) KL( p(. | x_-t) || f_theta(x_-t) )  =  L(theta) - L*,

averaged over a fixed validation set of (sentence, position) pairs that is the same for every run
of a language. Using the exact conditional p instead of the sampled word removes the word's
sampling noise from the estimate: its standard error is over contexts only.

Options: ``supervise_all`` trains on every position of a sentence at once (its T single-mask
copies: the same objective, T times the signal); ``mask_rate`` switches to BERT-style multi-mask
training (then the training objective's optimum is *not* the single-mask optimum and is not exactly
computable; evaluation stays single-mask). Data are fresh samples every step (the infinite-data
regime of the paper) or a fixed corpus of ``train_sentences``.

Option ``adversarial`` (the paper's third way to reach the same loss: "a different training
algorithm", which transfers *worse*): each step minimizes

    L_mlm(batch) - weight * L_down,   L_down = mean_i min(CE_i, cap),   cap = ADVERSARIAL_CAP * log(C),

where CE_i is the cross-entropy, against the task's label, of a *fixed* linear head applied to the
model's features of sentence i of a fresh downstream batch (``batch_sentences`` unmasked sentences a
step, pooled exactly as the evaluation probe pools them: ``flatlib.downstream.probe_inputs``;
sentences without a label are dropped). Its gradient flows into the transformer, never into the
head. The head (standardization + multinomial logistic regression with L2 ``ADVERSARIAL_L2``,
float64, ``ADVERSARIAL_MAX_ITER`` full-batch L-BFGS iterations from zero: deterministic) is refitted
at the start and every ``refit_every`` steps, on eval-mode features of a fixed held-out split of
``head_sentences`` sentences of its own random stream (independent of the training sentences, the
masks and the probe corpus of ``flatlib.measure``). L_down is unbounded above: with a fixed head
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
and fits a fresh head.

Every run lives in the run store (``flatlib.runs``): a finished run is returned at once; a partial
one resumes from its last checkpoint and produces bit-identical results (each step's data and masks
are a function of (seed, step), and model and optimizer state are checkpointed; so are the
adversary's head, the step it was fitted at and its running sums). Bit-identical on one device:
a run trains on ``flatlib.device.default_device()`` (or ``device=``): the model, the batches and the
optimizer state live there; data are drawn and checkpoints saved on the CPU, so a run can resume on
another device (then to float error, not bit for bit).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from flatlib.checks import check_int, check_seed
from flatlib.device import describe as describe_device
from flatlib.device import module_device, preserved_rng, resolve_device
from flatlib.downstream import fit_logistic, model_features, probe_inputs
from flatlib.languages import HMM, PCFG, Corpus, Language, TeacherLM
from flatlib.model import Transformer, TransformerConfig
from flatlib.runs import Checkpoint, CorruptRunError, Run, RunStore, canonical_json, config_hash

ADVERSARIAL_KEYS = ("weight", "task", "refit_every", "head_sentences", "batch_sentences")
ADVERSARIAL_MIN_HEAD_SENTENCES = 100  # fewer held-out sentences make the head mostly noise
ADVERSARIAL_L2 = 1e-3  # the head's L2 strength (on standardized features; the probe's grid centre)
ADVERSARIAL_CAP = 1.0  # a sentence's cross-entropy is clipped at CAP * log(n_classes) (chance level)
ADVERSARIAL_MAX_ITER = 50  # L-BFGS iterations of a refit, from zero (~1e-4 nats from convergence)


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of parts, e.g. ("masks", seed, step).

    Every random stream gets its own seed: a mask position drawn from the same stream as the
    sentence it masks would be correlated with the sentence (the first uniforms of a stream pick
    both the first hidden state and the position), and a model learns to exploit that.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _rules_digest(spec: dict[str, Any]) -> str:
    """The SHA-256 of a ``pcfg_rules`` spec's file; ValueError naming ``language.path``."""
    if "path" not in spec:
        raise ValueError("language.path: missing (the rules file of a 'pcfg_rules' language)")
    try:
        data = Path(spec["path"]).read_bytes()
    except (OSError, TypeError) as error:
        raise ValueError(f"language.path: cannot read the rules file {spec['path']!r} ({error})") from None
    return hashlib.sha256(data).hexdigest()


def complete_language(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` as it enters a run's key: a ``pcfg_rules`` spec gains ``sha256``, the hash of its
    file's contents, so that editing the file makes a new run instead of returning the old one (the
    path stays, for humans). Other specs are returned unchanged."""
    if spec.get("kind") != "pcfg_rules" or "sha256" in spec:
        return spec
    return {**spec, "sha256": _rules_digest(spec)}


def build_language(spec: dict[str, Any]) -> Language:
    """A language from its spec: ``{"kind": "hmm" | "pcfg" | "teacher", "seed": int, **kwargs}``
    (the kwargs of ``HMM.random`` / ``PCFG.random`` / ``TeacherLM.random``), or ``{"kind":
    "pcfg_rules", "path": ..., "sha256": ...}`` (``PCFG.from_rules`` keyword arguments besides; a
    file whose contents no longer match ``sha256`` is an error: that run's grammar is gone)."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    try:
        if kind == "hmm":
            return HMM.random(**spec)
        if kind == "pcfg":
            return PCFG.random(**spec)
        if kind == "pcfg_rules":
            digest = _rules_digest(spec)
            path, expected = spec.pop("path"), spec.pop("sha256", digest)
            if digest != expected:
                raise ValueError(f"path: the rules file {path!r} has changed since this run was keyed "
                                 f"(sha256 {digest[:12]}..., the run's {expected[:12]}...); restore it to "
                                 "use this run, or build a new config from the edited file")
            return PCFG.from_rules(Path(path), **spec)
        if kind == "teacher":
            return TeacherLM.random(**spec)
    except (TypeError, ValueError) as error:
        raise ValueError(f"language.{error}") from None
    raise ValueError(f"language.kind: expected 'hmm', 'pcfg', 'pcfg_rules' or 'teacher', got {kind!r}")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines a run (its hash is the run's key in the store)."""

    language: dict[str, Any]  # see build_language
    model: dict[str, Any] = field(default_factory=lambda: {"n_layer": 2, "n_head": 2, "d_model": 64, "d_ff": 256})
    optimizer: str = "adamw"  # "adamw" | "sgd"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01  # on matrices only (not biases, LayerNorm or embeddings' ... see _param_groups)
    momentum: float = 0.0  # SGD only
    warmup_steps: int = 200
    schedule: str = "constant"  # after warm-up: "constant" | "linear" | "cosine" decay to min_lr at `steps`
    min_lr: float = 0.0
    steps: int = 5000  # the most steps the run takes
    batch_size: int = 256  # sentences per step
    supervise_all: bool = False
    mask_rate: float | None = None
    train_sentences: int | None = None  # None: fresh samples every step
    eval_every: int = 500
    eval_pairs: int = 4096  # validation (sentence, position) pairs
    checkpoint_every: int = 1000
    stop_gap: float | None = None  # stop once the gap is <= stop_gap ...
    extra_steps: int = 0  # ... plus this many more steps
    init_from: dict[str, Any] | None = None  # {"config": <PretrainConfig dict>, "step": int}: start there
    seed: int = 0
    # {"weight", "task", "refit_every", "head_sentences", "batch_sentences"}: see the module
    # docstring. Omitted from to_dict when None, so that older configs keep their keys.
    adversarial: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_pairs", "checkpoint_every"):
            check_int(name, getattr(self, name))
        for name in ("warmup_steps", "extra_steps"):
            check_int(name, getattr(self, name), low=0)
        check_seed("seed", self.seed)
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer: expected 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule: expected 'constant', 'linear' or 'cosine', got {self.schedule!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: expected in [0, lr], got {self.min_lr!r}")
        if not (0 <= self.weight_decay and 0 <= self.momentum < 1):
            raise ValueError("weight_decay, momentum: expected weight_decay >= 0 and 0 <= momentum < 1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        if self.stop_gap is not None and not self.stop_gap > 0:
            raise ValueError(f"stop_gap: expected > 0 (an epsilon in nats), got {self.stop_gap!r}")
        if self.mask_rate is not None and not 0 < self.mask_rate <= 1:
            raise ValueError(f"mask_rate: expected in (0, 1], got {self.mask_rate!r}")
        if self.mask_rate is not None and self.supervise_all:
            raise ValueError("mask_rate: cannot be combined with supervise_all")
        if self.train_sentences is not None:
            check_int("train_sentences", self.train_sentences)
        if self.init_from is not None:
            _check_init_from(self.init_from)
        # a rules file is keyed by its contents (frozen dataclass: set the completed spec directly)
        object.__setattr__(self, "language", complete_language(self.language))
        language = build_language(self.language)  # raises "language.<field>: ..."
        if self.adversarial is not None:
            _check_adversarial(self.adversarial, language)
            if self.mask_rate is not None:
                raise ValueError("adversarial: cannot be combined with mask_rate (single-mask MLM only)")
        object.__setattr__(self, "model", complete_model(self.model))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        if d["adversarial"] is None:  # fields added later are left out at their default: old keys hold
            del d["adversarial"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainConfig":
        d = dict(d)
        if "betas" in d:  # JSON has lists
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    @property
    def key(self) -> str:
        return config_hash(self.to_dict())


def continuation(base: PretrainConfig, from_step: int, steps: int, **overrides: Any) -> PretrainConfig:
    """A run that starts from ``base``'s checkpoint at ``from_step`` with a fresh optimizer and the
    given overrides (e.g. ``optimizer="sgd", lr=0.05``), for ``steps`` more steps. Warm-up and
    evaluation settings default to: no warm-up, a constant learning rate."""
    settings = {"warmup_steps": 0, "schedule": "constant", **overrides}
    return replace(base, steps=steps, init_from={"config": base.to_dict(), "step": from_step},
                   stop_gap=None, extra_steps=0, **settings)


def _check_init_from(init_from: Any) -> None:
    """ValueError naming ``init_from.config`` (with the parent's own field) or ``init_from.step``."""
    if not isinstance(init_from, dict) or set(init_from) != {"config", "step"}:
        raise ValueError(f"init_from: expected {{'config': <parent config dict>, 'step': int}}, "
                         f"got {init_from!r}")
    check_int("init_from.step", init_from["step"], low=0)
    if not isinstance(init_from["config"], dict):
        raise ValueError(f"init_from.config: expected a PretrainConfig dict, got {init_from['config']!r}")
    try:
        PretrainConfig.from_dict(init_from["config"])
    except (TypeError, ValueError) as error:  # TypeError: a missing or unknown field
        raise ValueError(f"init_from.config.{error}" if isinstance(error, ValueError)
                         else f"init_from.config: {error}") from None


def _check_adversarial(adversarial: Any, language: Language) -> None:
    """ValueError naming the key (``adversarial.<key>: ...``) for invalid adversarial settings."""
    if not isinstance(adversarial, dict):
        raise ValueError(f"adversarial: expected a dict with the keys {ADVERSARIAL_KEYS}, "
                         f"got {adversarial!r}")
    for key in adversarial:
        if key not in ADVERSARIAL_KEYS:
            raise ValueError(f"adversarial.{key}: unknown key; expected the keys {ADVERSARIAL_KEYS}")
    for key in ADVERSARIAL_KEYS:
        if key not in adversarial:
            raise ValueError(f"adversarial.{key}: missing (expected the keys {ADVERSARIAL_KEYS})")
    weight = adversarial["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
            weight > 0 and math.isfinite(weight)):
        raise ValueError(f"adversarial.weight: expected a positive number (lambda), got {weight!r}")
    if adversarial["task"] not in language.tasks:
        raise ValueError(f"adversarial.task: expected one of the language's tasks {language.tasks}, "
                         f"got {adversarial['task']!r}")
    lows = {"refit_every": 1, "head_sentences": ADVERSARIAL_MIN_HEAD_SENTENCES, "batch_sentences": 1}
    for key, low in lows.items():
        check_int(f"adversarial.{key}", adversarial[key], low)


# ---------------------------------------------------------------------------- building blocks
MODEL_SHAPE = ("n_layer", "n_head", "d_model", "d_ff")  # always in a run's key


def complete_model(model: dict[str, Any]) -> dict[str, Any]:
    """``model`` with every shape field (``MODEL_SHAPE``) filled in from ``TransformerConfig``'s
    defaults, so that the run key holds the whole architecture, and validated now (before a run
    directory exists): ValueError naming ``model.<field>``. ``layer_norm_eps`` enters the key only
    when given (its default is part of the store's format: tests/test_train.py pins it, so older
    keys keep their meaning); ``causal`` is refused (the objective is a bidirectional MLM);
    ``vocab_size`` and ``max_len`` come from the language."""
    if not isinstance(model, dict):
        raise ValueError(f"model: expected a dict of TransformerConfig fields, got {model!r}")
    allowed = set(MODEL_SHAPE) | {"layer_norm_eps"}
    for key in model:
        if key not in allowed:
            why = "set by the language" if key in ("vocab_size", "max_len") else \
                "the objective is a bidirectional MLM" if key == "causal" else "unknown field"
            raise ValueError(f"model.{key}: not allowed ({why}); expected fields of {sorted(allowed)}")
    defaults = {f.name: f.default for f in fields(TransformerConfig)}
    completed = {**{key: defaults[key] for key in MODEL_SHAPE}, **model}
    try:
        TransformerConfig(vocab_size=1, max_len=1, **completed)
    except ValueError as error:
        raise ValueError(f"model.{error}") from None
    return completed


def model_config(config: PretrainConfig, language: Language) -> TransformerConfig:
    return TransformerConfig(vocab_size=language.vocab_size, max_len=language.max_len, **config.model)


def new_model(config: PretrainConfig, language: Language) -> Transformer:
    with preserved_rng():  # initialise from the seed (on the CPU), leave the global RNG alone
        torch.manual_seed(config.seed)
        return Transformer(model_config(config, language))


def _param_groups(model: Transformer, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices of linear layers only (nanoGPT's convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and not name.endswith(("tok_emb.weight", "pos_emb.weight"))
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(config: PretrainConfig, model: Transformer) -> torch.optim.Optimizer:
    groups = _param_groups(model, config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def learning_rate(config: PretrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then constant or a linear / cosine decay to ``min_lr`` at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    if config.schedule == "linear":
        scale = 1 - progress
    else:
        scale = 0.5 * (1 + math.cos(math.pi * progress))
    return config.min_lr + (config.lr - config.min_lr) * scale


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
    mc = model_config(config, language)
    return _validation_set(canonical_json(config.language), config.eval_pairs, mc.pad_id, mc.mask_id)


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
    p = val.true_probs
    log_p = torch.log(p.clamp(min=1e-300))
    kl = (p * (log_p - log_q)).sum(dim=-1)  # per context: the expected excess loss
    rows = torch.arange(len(p))
    nll = -log_q[rows, val.targets]
    optimum = -log_p[rows, val.targets]
    n = len(p)
    return {
        "val_loss": float(nll.mean()),
        "val_optimum": float(optimum.mean()),
        "gap": float(kl.mean()),
        "gap_se": float(kl.std() / math.sqrt(n)),
        "gap_paired": float((nll - optimum).mean()),  # the same gap through the sampled words
        "gap_paired_se": float((nll - optimum).std() / math.sqrt(n)),
    }


# ---------------------------------------------------------------------------- the adversary's head
@dataclass(frozen=True)
class AdversarialHead:
    """A linear head on pooled features: standardize with the fit split's ``mean`` and ``std``
    ([D], float64), then ``x @ weight[:-1] + weight[-1]`` (``weight`` [D + 1, C], float64, last row
    the bias; the layout of ``flatlib.downstream.fit_logistic``). Plain tensors: no gradient reaches
    them; the gradient through ``logits`` reaches the features."""

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


def _sample(language: Language, n: int, seed: int) -> Corpus:
    if isinstance(language, PCFG):  # the trees are not needed (labels come from the words)
        return language.sample(n, seed=seed, trees=False)
    return language.sample(n, seed=seed)


def adversarial_head_corpus(config: PretrainConfig, language: Language) -> Corpus:
    """The held-out split the adversary's head is fitted on (its own stream: independent of the
    training sentences, the masks, the downstream batches and the probe corpus)."""
    return _sample(language, config.adversarial["head_sentences"],
                   derived_seed("adversarial head sentences", config.seed))


def _adversarial_corpus(config: PretrainConfig, language: Language, step: int) -> Corpus:
    """The downstream batch of ``step``: fresh sentences, a function of (seed, step)."""
    return _sample(language, config.adversarial["batch_sentences"],
                   derived_seed("adversarial sentences", config.seed, step))


class _Adversary:
    """The adversarial term of one run: the head, the step it was fitted at, and the sums of the
    head's cross-entropy and accuracy on the downstream batches since the last evaluation."""

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

    def term(self, model: Transformer, step: int) -> Tensor | None:
        """-weight * L_down on the downstream batch of ``step`` (differentiable in the model; None
        when no sentence of the batch has a label), recording the unclipped cross-entropy."""
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

    def row(self) -> dict[str, float]:
        """The metrics columns since the last evaluation (then reset)."""
        n = self.n_steps
        row = {"adv_loss": self.loss_sum / n if n else math.nan,
               "adv_accuracy": self.accuracy_sum / n if n else math.nan,
               "adv_refit_accuracy": self.refit_accuracy}
        self.loss_sum = self.accuracy_sum = 0.0
        self.n_steps = 0
        return row

    def state(self) -> dict[str, Any]:
        return {"adv_fitted_at": self.fitted_at, "adv_refit_accuracy": self.refit_accuracy,
                "adv_loss_sum": self.loss_sum, "adv_accuracy_sum": self.accuracy_sum,
                "adv_steps": self.n_steps}

    def restore(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        self.head = AdversarialHead.from_tensors(tensors)
        self.fitted_at, self.refit_accuracy = state["adv_fitted_at"], state["adv_refit_accuracy"]
        self.loss_sum, self.accuracy_sum = state["adv_loss_sum"], state["adv_accuracy_sum"]
        self.n_steps = state["adv_steps"]


# ---------------------------------------------------------------------------- checkpoints
def _checkpoint_tensors(model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = value.cpu()
    return tensors


def _restore(model: Transformer, optimizer: torch.optim.Optimizer | None, tensors: dict[str, Tensor]) -> None:
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if optimizer is None:
        return
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)


def load_model(run: Run, step: int | None = None, device: str | torch.device | None = None) -> Transformer:
    """The model of ``run`` at checkpoint ``step`` (default: the last), in eval mode, on ``device``
    (default: ``flatlib.device.default_device()``)."""
    config = PretrainConfig.from_dict(run.config)
    language = build_language(config.language)
    checkpoint = run.load_checkpoint(step)
    if checkpoint is None:
        raise FileNotFoundError(f"{run}: no checkpoint")
    model = Transformer(model_config(config, language))
    _restore(model, None, checkpoint.tensors)
    return model.to(resolve_device(device)).eval()


# ---------------------------------------------------------------------------- the loop
def _mask_generator(config: PretrainConfig, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed("masks", config.seed, step))


def _training_corpus(config: PretrainConfig, language: Language, step: int,
                     fixed: Corpus | None) -> Corpus:
    if fixed is None:  # fresh sentences every step, a function of (seed, step)
        return _sample(language, config.batch_size, derived_seed("sentences", config.seed, step))
    per_epoch = len(fixed) // config.batch_size
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(fixed), generator=torch.Generator().manual_seed(derived_seed("epoch", config.seed, epoch)))
    return fixed[order[index * config.batch_size : (index + 1) * config.batch_size]]


def _metrics_state(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics rows as a checkpoint stores them (JSON: column order kept, NaN as null)."""
    def plain(value: Any) -> Any:
        value = value.item() if hasattr(value, "item") else value  # numpy scalars from an older csv
        return None if isinstance(value, float) and math.isnan(value) else value

    return {"columns": list(rows[0]), "rows": [[plain(v) for v in row.values()] for row in rows]}


def _resumed_metrics(run: Run, config: PretrainConfig, checkpoint: Checkpoint) -> list[dict[str, Any]]:
    """The metrics rows up to ``checkpoint``'s step: from the checkpoint itself; from a checkpoint
    written before checkpoints held them, the rows of metrics.csv, which must reach its step."""
    if "metrics" in checkpoint.state:
        saved = checkpoint.state["metrics"]
        return [{c: math.nan if v is None else v for c, v in zip(saved["columns"], row)} for row in saved["rows"]]
    rows = [row for row in run.metrics().to_dict("records") if row["step"] <= checkpoint.step]
    if not rows or checkpoint.step - rows[-1]["step"] >= config.eval_every:
        raise CorruptRunError(f"{run.metrics_path}: its rows end at step {rows[-1]['step'] if rows else None}, "
                              f"before the checkpoint at step {checkpoint.step} (truncated?); delete the run "
                              "directory to retrain it")
    return rows


def _distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device): (0, 1, device) unless launched by torchrun, which
    sets RANK, WORLD_SIZE and LOCAL_RANK. Then a process group is started (nanoGPT's pattern): nccl
    with one GPU per process (cuda:LOCAL_RANK) when ``device`` is a GPU, gloo on the CPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"device: LOCAL_RANK {local_rank} but {torch.cuda.device_count()} CUDA devices; "
                             "launch at most one process per GPU")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"device: {device} is not supported under torchrun (cuda with nccl, or cpu with gloo)")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def pretrain(config: PretrainConfig, store: RunStore | None = None, progress: bool = True,
             device: str | torch.device | None = None) -> Run:
    """Train (or resume, or just return) the run of ``config`` on ``device`` (default:
    ``flatlib.device.default_device()``; not part of the run's key, recorded in its summary as
    ``device``). See the module docstring.

    Under ``torchrun --nproc_per_node K`` the same call trains with DistributedDataParallel: every
    rank draws the same global batch (a function of (seed, step)) and takes every K-th sentence of
    it; the loss is scaled so that the averaged gradient is the global batch's. Rank 0 alone writes
    to the run store.
    """
    rank, world, device = _distributed(resolve_device(device))
    if config.adversarial is not None and world > 1:
        raise ValueError(f"adversarial: not supported with DistributedDataParallel ({world} processes); "
                         "run adversarial training in a single process")
    if config.batch_size % world:
        raise ValueError(f"batch_size: {config.batch_size} is not divisible by the {world} processes")
    store = store or RunStore()
    # rank 0 creates (or checks) the run directory; the others wait for it, then just point at it
    run = store.open(config.to_dict()) if rank == 0 else Run(store.path(config.to_dict()), config.to_dict())
    if world > 1:
        dist.barrier()
    if run.finished:
        return run
    language = build_language(config.language)
    model = new_model(config, language).to(device)  # initialised on the CPU: the same weights anywhere
    optimizer = make_optimizer(config, model)
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    mc = model.config
    val = validation_set(config, language)
    fixed = None
    if config.train_sentences is not None:
        if config.train_sentences < config.batch_size:
            raise ValueError("train_sentences: must be at least batch_size")
        fixed = language.sample(config.train_sentences, seed=derived_seed("training corpus", config.seed))

    checkpoint = run.load_checkpoint()
    metrics: list[dict[str, Any]] = []
    reached_at: int | None = None
    running = 0.0  # sum of training losses (the MLM term only) since the last evaluation
    adversary = _Adversary(config, language) if config.adversarial is not None else None
    if checkpoint is not None:  # resume
        _restore(model, optimizer, checkpoint.tensors)
        start = checkpoint.step
        reached_at = checkpoint.state["reached_at"]
        running = checkpoint.state["running"]
        if adversary is not None:  # the head in use at `start` (it may have been fitted before)
            adversary.restore(checkpoint.tensors, checkpoint.state)
        metrics = _resumed_metrics(run, config, checkpoint)
        if rank == 0:  # a truncated or longer metrics.csv is rewritten from the checkpoint
            run.write_metrics(metrics)
    elif config.init_from is not None:  # continue from another run's checkpoint (a new optimizer)
        parent = pretrain(PretrainConfig.from_dict(config.init_from["config"]), store, progress, device)
        parent_checkpoint = parent.load_checkpoint(config.init_from["step"])
        _restore(model, None, parent_checkpoint.tensors)
        start = 0
    else:
        start = 0
    if adversary is not None:
        adversary.refit_if_due(model, start)  # a fresh run's (or a continuation's) first head
    if not metrics:
        metrics.append({"step": start, "lr": learning_rate(config, start), "train_loss": math.nan,
                        **evaluate(model, val), **(adversary.row() if adversary is not None else {})})

    def save(step: int) -> None:
        if rank != 0:
            return
        run.write_metrics(metrics)
        tensors = _checkpoint_tensors(model, optimizer)
        state = {"reached_at": reached_at, "running": running, "metrics": _metrics_state(metrics)}
        if adversary is not None:
            tensors.update(adversary.head.tensors())
            state.update(adversary.state())
        run.save_checkpoint(step, tensors, state)

    if checkpoint is None:
        save(start)
    end = config.steps
    if reached_at is not None:
        end = min(end, reached_at + config.extra_steps)
    model.train()
    quiet = not progress or rank != 0 or bool(os.environ.get("PYTEST_CURRENT_TEST"))
    bar = tqdm(total=config.steps, initial=start, disable=quiet,
               desc=f"pretrain {run.key[:8]}", leave=False)
    step = start
    diverged = False
    while step < end:
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        corpus = _training_corpus(config, language, step, fixed)
        generator = _mask_generator(config, step)
        # the global batch's rows, then this rank's share; loss = (sum over my rows) / (global rows)
        # * world, so that DDP's gradient average is the gradient of the global mean
        if config.mask_rate is None:
            inputs, positions, targets = single_mask_batch(corpus, mc.mask_id, mc.pad_id, generator,
                                                           config.supervise_all)
            n_global = len(inputs)
            inputs, positions, targets = (t[rank::world].to(device) for t in (inputs, positions, targets))
            logits = net(inputs, positions)
            loss = F.cross_entropy(logits, targets, reduction="sum") * (world / n_global)
        else:
            inputs, targets = multi_mask_batch(corpus, mc.mask_id, mc.pad_id, config.mask_rate, generator)
            n_global = int((targets != -100).sum())
            inputs, targets = inputs[rank::world].to(device), targets[rank::world].to(device)
            loss = F.cross_entropy(net(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100,
                                   reduction="sum") * (world / n_global)
        objective = loss
        if adversary is not None:  # L_mlm - weight * L_down (single process: net is model)
            adversary.refit_if_due(model, step)
            term = adversary.term(model, step)
            if term is not None:
                objective = loss + term
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        global_loss = loss.detach() / world
        if world > 1:
            dist.all_reduce(global_loss)
        running += global_loss.item()
        step += 1
        bar.update(1)
        diverged = not math.isfinite(running) or (adversary is not None and not adversary.finite)
        if diverged:  # record where it happened and stop: the run is finished, as diverged
            end = step
        if step % config.eval_every == 0 or step == end:
            row = {"step": step, "lr": lr, "train_loss": running / (step - metrics[-1]["step"]),
                   **evaluate(model, val), **(adversary.row() if adversary is not None else {})}
            running = 0.0
            metrics.append(row)
            bar.set_postfix(gap=f"{row['gap']:.4f}")
            if config.stop_gap is not None and reached_at is None and row["gap"] <= config.stop_gap:
                reached_at = step
                end = min(config.steps, step + config.extra_steps)
            if step % config.checkpoint_every == 0 or step == end:
                save(step)
        elif step % config.checkpoint_every == 0:
            save(step)
    bar.close()
    last = metrics[-1]
    if rank != 0:
        dist.barrier()  # rank 0 is writing the last checkpoint and the summary
        return run
    summary = {"steps": step, "reached_at": reached_at, "diverged": diverged,
               "final_gap": last["gap"], "final_gap_se": last["gap_se"], "final_val_loss": last["val_loss"],
               "val_optimum": last["val_optimum"], "n_params": model.n_params(),
               "device": describe_device(device), "processes": world,
               "threads": torch.get_num_threads()}  # float reductions differ at ~1e-9 with the count
    # JSON has no NaN: a diverged run's numbers are recorded as null
    run.mark_finished({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()})
    if world > 1:
        dist.barrier()
    return run
