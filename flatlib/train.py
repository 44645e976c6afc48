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

Every run lives in the run store (``flatlib.runs``): a finished run is returned at once; a partial
one resumes from its last checkpoint and produces bit-identical results (each step's data and masks
are a function of (seed, step), and model and optimizer state are checkpointed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from flatlib.languages import HMM, PCFG, Corpus, Language, TeacherLM
from flatlib.model import Transformer, TransformerConfig
from flatlib.runs import Run, RunStore, canonical_json, config_hash



def derived_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of parts, e.g. ("masks", seed, step).

    Every random stream gets its own seed: a mask position drawn from the same stream as the
    sentence it masks would be correlated with the sentence (the first uniforms of a stream pick
    both the first hidden state and the position), and a model learns to exploit that.
    """
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def build_language(spec: dict[str, Any]) -> Language:
    """A language from its spec: ``{"kind": "hmm" | "pcfg" | "teacher", "seed": int, **kwargs}``
    (the kwargs of ``HMM.random`` / ``PCFG.random`` / ``TeacherLM.random``), or ``{"kind": "pcfg_rules", "path": ...}``."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    try:
        if kind == "hmm":
            return HMM.random(**spec)
        if kind == "pcfg":
            return PCFG.random(**spec)
        if kind == "pcfg_rules":
            return PCFG.from_rules(spec.pop("path"), **spec)
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

    def __post_init__(self) -> None:
        def positive_int(name: str, low: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")

        for name in ("steps", "batch_size", "eval_every", "eval_pairs", "checkpoint_every"):
            positive_int(name)
        for name in ("warmup_steps", "extra_steps", "seed"):
            positive_int(name, low=0)
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
            positive_int("train_sentences")
        if self.init_from is not None and not {"config", "step"} <= set(self.init_from):
            raise ValueError("init_from: expected {'config': <parent config dict>, 'step': int}")
        build_language(self.language)  # raises "language.<field>: ..."
        unknown = set(self.model) - {f.name for f in fields(TransformerConfig)}
        if unknown or {"vocab_size", "max_len"} & set(self.model):
            raise ValueError(f"model: unknown or derived fields {sorted(unknown | ({'vocab_size', 'max_len'} & set(self.model)))}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PretrainConfig":
        d = dict(d)
        d["betas"] = tuple(d["betas"])
        return cls(**d)

    @property
    def key(self) -> str:
        return config_hash(self.to_dict())


# ---------------------------------------------------------------------------- building blocks
def model_config(config: PretrainConfig, language: Language) -> TransformerConfig:
    return TransformerConfig(vocab_size=language.vocab_size, max_len=language.max_len, **config.model)


def new_model(config: PretrainConfig, language: Language) -> Transformer:
    with torch.random.fork_rng(devices=[]):  # initialise from the seed, leave the global RNG alone
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
    log_q = []
    for start in range(0, len(val.inputs), batch_size):
        inputs = val.inputs[start : start + batch_size]
        logits = model(inputs, val.positions[start : start + batch_size])
        log_q.append(F.log_softmax(logits.double(), dim=-1))
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


# ---------------------------------------------------------------------------- checkpoints
def _checkpoint_tensors(model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = value
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


def load_model(run: Run, step: int | None = None) -> Transformer:
    """The model of ``run`` at checkpoint ``step`` (default: the last), in eval mode."""
    config = PretrainConfig.from_dict(run.config)
    language = build_language(config.language)
    checkpoint = run.load_checkpoint(step)
    if checkpoint is None:
        raise FileNotFoundError(f"{run}: no checkpoint")
    model = Transformer(model_config(config, language))
    _restore(model, None, checkpoint.tensors)
    return model.eval()


# ---------------------------------------------------------------------------- the loop
def _mask_generator(config: PretrainConfig, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed("masks", config.seed, step))


def _training_corpus(config: PretrainConfig, language: Language, step: int,
                     fixed: Corpus | None) -> Corpus:
    if fixed is None:  # fresh sentences every step, a function of (seed, step)
        seed = derived_seed("sentences", config.seed, step)
        if isinstance(language, PCFG):
            return language.sample(config.batch_size, seed=seed, trees=False)
        return language.sample(config.batch_size, seed=seed)
    per_epoch = len(fixed) // config.batch_size
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(fixed), generator=torch.Generator().manual_seed(derived_seed("epoch", config.seed, epoch)))
    return fixed[order[index * config.batch_size : (index + 1) * config.batch_size]]


def _distributed() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless launched by torchrun, which sets RANK and WORLD_SIZE.
    Then a gloo process group is started (CPU; nanoGPT's pattern)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def pretrain(config: PretrainConfig, store: RunStore | None = None, progress: bool = True) -> Run:
    """Train (or resume, or just return) the run of ``config``. See the module docstring.

    Under ``torchrun --nproc_per_node K`` the same call trains with DistributedDataParallel: every
    rank draws the same global batch (a function of (seed, step)) and takes every K-th sentence of
    it; the loss is scaled so that the averaged gradient is the global batch's. Rank 0 alone writes
    to the run store.
    """
    rank, world = _distributed()
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
    model = new_model(config, language)
    optimizer = make_optimizer(config, model)
    net = DistributedDataParallel(model) if world > 1 else model
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
    running = 0.0  # sum of training losses since the last evaluation
    if checkpoint is not None:  # resume
        _restore(model, optimizer, checkpoint.tensors)
        start = checkpoint.step
        reached_at = checkpoint.state["reached_at"]
        running = checkpoint.state["running"]
        metrics = [row for row in run.metrics().to_dict("records") if row["step"] <= start]
    elif config.init_from is not None:  # continue from another run's checkpoint (a new optimizer)
        parent = pretrain(PretrainConfig.from_dict(config.init_from["config"]), store, progress)
        parent_checkpoint = parent.load_checkpoint(config.init_from["step"])
        _restore(model, None, parent_checkpoint.tensors)
        start = 0
    else:
        start = 0
    if not metrics:
        metrics.append({"step": start, "lr": learning_rate(config, start), "train_loss": math.nan,
                        **evaluate(model, val)})

    def save(step: int) -> None:
        if rank != 0:
            return
        run.write_metrics(metrics)
        run.save_checkpoint(step, _checkpoint_tensors(model, optimizer),
                            {"reached_at": reached_at, "running": running})

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
            inputs, positions, targets = inputs[rank::world], positions[rank::world], targets[rank::world]
            logits = net(inputs, positions)
            loss = F.cross_entropy(logits, targets, reduction="sum") * (world / n_global)
        else:
            inputs, targets = multi_mask_batch(corpus, mc.mask_id, mc.pad_id, config.mask_rate, generator)
            n_global = int((targets != -100).sum())
            inputs, targets = inputs[rank::world], targets[rank::world]
            loss = F.cross_entropy(net(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100,
                                   reduction="sum") * (world / n_global)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        global_loss = loss.detach() / world
        if world > 1:
            dist.all_reduce(global_loss)
        running += global_loss.item()
        step += 1
        bar.update(1)
        diverged = not math.isfinite(running)
        if diverged:  # record where it happened and stop: the run is finished, as diverged
            end = step
        if step % config.eval_every == 0 or step == end:
            row = {"step": step, "lr": lr, "train_loss": running / (step - metrics[-1]["step"]),
                   **evaluate(model, val)}
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
               "val_optimum": last["val_optimum"], "n_params": model.n_params()}
    # JSON has no NaN: a diverged run's numbers are recorded as null
    run.mark_finished({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()})
    if world > 1:
        dist.barrier()
    return run
