"""The training configuration: ``PretrainConfig``, everything that determines a run (its hash is the
run's key in the store), checked field by field when it is built, and ``continuation``.

Below ``flatlib.training.train`` (the loop), ``flatlib.training.objective`` (its batches) and
``flatlib.training.adversary`` (the adversarial term), which all read it; ``flatlib.training.train``
re-exports ``PretrainConfig`` and ``continuation``. The adversarial settings' checks (``check_adversarial``)
live here, for ``PretrainConfig`` to run them; ``flatlib.training.adversary`` documents what the settings
mean.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from flatlib.checks import check_bool, check_int, check_number, check_seed
from flatlib.languages import Language, build_language, complete_language
from flatlib.runner.runs import config_hash
from flatlib.training.model import TransformerConfig


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines a run (its hash is the run's key in the store)."""

    language: dict[str, Any]  # see build_language
    model: dict[str, Any] = field(default_factory=lambda: {"n_layer": 2, "n_head": 2, "d_model": 64,
                                                           "d_ff": 256})
    optimizer: str = "adamw"  # "adamw" | "sgd"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01  # on matrices only (not biases, LayerNorm or embeddings: train._param_groups)
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
    # {"weight", "task", "refit_every", "head_sentences", "batch_sentences"}: see flatlib.training.adversary.
    # Omitted from to_dict when None, so that older configs keep their keys.
    adversarial: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        """Every field checked now (ValueError naming it), before a run directory exists: types exact
        (``flatlib.checks``: a bool is not a number, only a bool is a flag), numbers finite and in range."""
        for name in ("steps", "batch_size", "eval_every", "eval_pairs", "checkpoint_every"):
            check_int(name, getattr(self, name))
        for name in ("warmup_steps", "extra_steps"):
            check_int(name, getattr(self, name), low=0)
        check_seed("seed", self.seed)  # every seed derived from it is a 63-bit hash (seeds.derived_seed)
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer: expected 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"schedule: expected 'constant', 'linear' or 'cosine', got {self.schedule!r}")
        check_number("lr", self.lr)
        check_number("min_lr", self.min_lr, 0, self.lr, low_closed=True, high_closed=True)
        check_number("weight_decay", self.weight_decay, low_closed=True)
        check_number("momentum", self.momentum, 0, 1, low_closed=True)
        _check_betas(self.betas)
        object.__setattr__(self, "betas", tuple(self.betas))  # JSON gives a list; to_dict writes a list
        check_bool("supervise_all", self.supervise_all)
        if self.stop_gap is not None:
            check_number("stop_gap", self.stop_gap)  # an epsilon in nats
        if self.mask_rate is not None:
            check_number("mask_rate", self.mask_rate, 0, 1, high_closed=True)
        if self.mask_rate is not None and self.supervise_all:
            raise ValueError("mask_rate: cannot be combined with supervise_all")
        if self.train_sentences is not None:
            check_int("train_sentences", self.train_sentences)
            if self.train_sentences < self.batch_size:  # a fixed corpus is cut into batches of batch_size
                raise ValueError(f"train_sentences: expected at least batch_size ({self.batch_size}) "
                                 f"sentences, got {self.train_sentences}")
        if self.init_from is not None:
            _check_init_from(self.init_from)
        # a rules file is keyed by its contents (frozen dataclass: set the completed spec directly)
        object.__setattr__(self, "language", complete_language(self.language))
        language = build_language(self.language)  # raises "language.<field>: ..." (cached: cheap again)
        if self.adversarial is not None:
            check_adversarial(self.adversarial, language)
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

    def parent(self) -> "PretrainConfig | None":
        """The config of the run this one continues (``init_from``), or None."""
        return None if self.init_from is None else PretrainConfig.from_dict(self.init_from["config"])


def continuation(base: PretrainConfig, from_step: int, steps: int, **overrides: Any) -> PretrainConfig:
    """A run that starts from ``base``'s checkpoint at ``from_step`` with a fresh optimizer and the
    given overrides (e.g. ``optimizer="sgd", lr=0.05``), for ``steps`` more steps. Warm-up and
    evaluation settings default to: no warm-up, a constant learning rate."""
    settings = {"warmup_steps": 0, "schedule": "constant", **overrides}
    return replace(base, steps=steps, init_from={"config": base.to_dict(), "step": from_step},
                   stop_gap=None, extra_steps=0, **settings)


def _check_betas(betas: Any) -> None:
    """Adam's two decay rates: a pair of numbers in [0, 1)."""
    if isinstance(betas, str) or not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
    for i, beta in enumerate(betas):
        try:
            check_number(f"betas[{i}]", beta, 0, 1, low_closed=True)
        except ValueError:
            raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}") from None


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


# ---------------------------------------------------------------------------- adversarial settings
ADVERSARIAL_KEYS = ("weight", "task", "refit_every", "head_sentences", "batch_sentences")
ADVERSARIAL_MIN_HEAD_SENTENCES = 100  # fewer held-out sentences make the head mostly noise


def check_adversarial(adversarial: Any, language: Language) -> None:
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
