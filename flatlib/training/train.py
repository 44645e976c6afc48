"""Pre-training to the exact optimum, and beyond: ``pretrain(PretrainConfig) -> Run``.

A run's configuration, ``PretrainConfig`` (and ``continuation``), is ``flatlib.training.config``; this module
re-exports both.

The objective (the paper's single-mask MLM loss, whose optimum is known exactly, and its options
``supervise_all``, ``mask_rate`` and ``train_sentences``), its batches and the validation set every
evaluation measures the gap to the optimum on are ``flatlib.training.objective``. Option ``adversarial`` adds
the paper's third way to reach the same loss, a term that erases a downstream task's information:
``flatlib.training.adversary``, plugged into the loop as an ``ObjectiveHook``. A config's language spec is
built by ``flatlib.languages.build_language``.

The loop (``pretrain``) is nanoGPT's: set the learning rate, draw the step's batch, add the hooks'
terms, step the optimizer; evaluate every ``eval_every`` steps and checkpoint every
``checkpoint_every``.

Every run lives in the run store (``flatlib.runner.runs``): a finished run is returned at once; a partial
one resumes from its last checkpoint and produces bit-identical results (each step's data and masks
are a function of (seed, step), and model and optimizer state are checkpointed; so is every hook's
state, e.g. the adversary's head, the step it was fitted at and its running sums). Bit-identical on
one device: a run trains on ``flatlib.device.default_device()`` (or ``device=``): the model, the
batches and the optimizer state live there; data are drawn and checkpoints saved on the CPU, so a
run can resume on another device (then to float error, not bit for bit).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from flatlib.device import describe as describe_device
from flatlib.device import preserved_rng, resolve_device
from flatlib.languages import Language, build_language
from flatlib.runner.runs import Checkpoint, CorruptRunError, Run, RunStore
from flatlib.training.adversary import Adversary
from flatlib.training.config import PretrainConfig, continuation  # noqa: F401 (continuation: re-exported)
from flatlib.training.model import Transformer, TransformerConfig
from flatlib.training.objective import (
    ObjectiveHook,
    ValidationSet,
    evaluate,
    fixed_corpus,
    mask_generator,
    mlm_loss,
    training_corpus,
    validation_set,
)


# ---------------------------------------------------------------------------- building blocks
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


# ---------------------------------------------------------------------------- checkpoints
def _checkpoint_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The model's state and the optimizer's tensor state, on the CPU, as one checkpoint's tensors (any model:
    ``flatlib.hf.train_mlm`` saves its runs with it too)."""
    tensors = {f"model.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = value.cpu()
    return tensors


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer | None, tensors: dict[str, Tensor]) -> None:
    """Load ``_checkpoint_tensors``' tensors back (``load_state_dict`` copies them onto each parameter's and
    state's device); ``optimizer`` None: the model only."""
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
        return [{c: math.nan if v is None else v for c, v in zip(saved["columns"], row)}
                for row in saved["rows"]]
    rows = [row for row in run.metrics().to_dict("records") if row["step"] <= checkpoint.step]
    if not rows or checkpoint.step - rows[-1]["step"] >= config.eval_every:
        raise CorruptRunError(f"{run.metrics_path}: its rows end at step "
                              f"{rows[-1]['step'] if rows else None}, before the checkpoint at step "
                              f"{checkpoint.step} (truncated?); delete the run directory to retrain it")
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
        raise ValueError(f"device: {device} is not supported under torchrun (cuda with nccl, or cpu with "
                         "gloo)")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device



@dataclass
class _TrainState:
    """Where a run stands: its step, its metrics rows so far, the step its gap reached ``stop_gap``
    at, and the sum of training losses (the MLM term only) since the last evaluation."""

    step: int
    metrics: list[dict[str, Any]]
    reached_at: int | None = None
    running: float = 0.0


def _check_processes(config: PretrainConfig, world: int) -> None:
    """ValueError for a run that cannot train in ``world`` processes."""
    if config.adversarial is not None and world > 1:
        raise ValueError(f"adversarial: not supported with DistributedDataParallel ({world} processes); "
                         "run adversarial training in a single process")
    if config.batch_size % world:
        raise ValueError(f"batch_size: {config.batch_size} is not divisible by the {world} processes")


def _open_run(config: PretrainConfig, store: RunStore, rank: int, world: int) -> Run:
    """Rank 0 creates (or checks) the run directory; the others wait for it, then just point at it."""
    run = store.open(config.to_dict()) if rank == 0 else Run(store.path(config.to_dict()), config.to_dict())
    if world > 1:
        dist.barrier()
    return run


def _hooks(config: PretrainConfig, language: Language) -> list[ObjectiveHook]:
    """The terms added to the MLM loss: the adversary's (option ``adversarial``), or none."""
    return [Adversary(config, language)] if config.adversarial is not None else []


def _start(config: PretrainConfig, run: Run, model: Transformer, optimizer: torch.optim.Optimizer,
           hooks: list[ObjectiveHook], rank: int, store: RunStore, progress: bool,
           device: torch.device) -> tuple[_TrainState, bool]:
    """Resume from the run's last checkpoint (model, optimizer, hooks and metrics); or load the
    parent run's checkpoint (``init_from``: the parent is trained first if need be, with the same
    ``store``, ``progress`` and ``device``; a fresh optimizer); or start afresh. Returns the state
    and whether it was resumed."""
    checkpoint = run.load_checkpoint()
    if checkpoint is not None:
        _restore(model, optimizer, checkpoint.tensors)
        for hook in hooks:  # e.g. the adversary's head in use at the checkpoint (maybe fitted before)
            hook.restore(checkpoint.tensors, checkpoint.state)
        metrics = _resumed_metrics(run, config, checkpoint)
        if rank == 0:  # a truncated or longer metrics.csv is rewritten from the checkpoint
            run.write_metrics(metrics)
        saved = checkpoint.state
        return _TrainState(checkpoint.step, metrics, saved["reached_at"], saved["running"]), True
    if config.init_from is not None:
        parent = pretrain(config.parent(), store, progress, device)
        _restore(model, None, parent.load_checkpoint(config.init_from["step"]).tensors)
    return _TrainState(0, []), False


def _metrics_row(step: int, lr: float, train_loss: float, model: Transformer, val: ValidationSet,
                 hooks: list[ObjectiveHook]) -> dict[str, Any]:
    row = {"step": step, "lr": lr, "train_loss": train_loss, **evaluate(model, val)}
    for hook in hooks:
        row.update(hook.metrics_row())
    return row


def _save(run: Run, state: _TrainState, model: Transformer, optimizer: torch.optim.Optimizer,
          hooks: list[ObjectiveHook]) -> None:
    """metrics.csv, and a checkpoint at ``state.step`` with everything needed to resume there."""
    run.write_metrics(state.metrics)
    tensors = _checkpoint_tensors(model, optimizer)
    saved = {"reached_at": state.reached_at, "running": state.running,
             "metrics": _metrics_state(state.metrics)}
    for hook in hooks:
        hook_tensors, hook_state = hook.state()
        tensors.update(hook_tensors)
        saved.update(hook_state)
    run.save_checkpoint(state.step, tensors, saved)


def _finish(run: Run, state: _TrainState, diverged: bool, model: Transformer, device: torch.device,
            world: int) -> None:
    """Mark the run finished with its summary (JSON has no NaN: a diverged run's numbers are null)."""
    last = state.metrics[-1]
    summary = {"steps": state.step, "reached_at": state.reached_at, "diverged": diverged,
               "final_gap": last["gap"], "final_gap_se": last["gap_se"], "final_val_loss": last["val_loss"],
               "val_optimum": last["val_optimum"], "n_params": model.n_params(),
               "device": describe_device(device), "processes": world,
               "threads": torch.get_num_threads()}  # float reductions differ at ~1e-9 with the count
    run.mark_finished({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in summary.items()})


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
    _check_processes(config, world)
    store = store or RunStore()
    run = _open_run(config, store, rank, world)
    if run.finished:
        return run.verified()
    # one writer at a time (another process on the same store waits here, then finds the run finished)
    with run.writing() if rank == 0 else contextlib.nullcontext():
        if world > 1:
            dist.barrier()
        if run.finished:
            return run.verified()
        _train(config, run, store, progress, device, rank, world)
    if world > 1:
        dist.barrier()
    return run


def _train(config: PretrainConfig, run: Run, store: RunStore, progress: bool, device: torch.device,
           rank: int, world: int) -> None:
    """``pretrain``'s work on an unfinished ``run`` whose lock this process holds (rank 0)."""
    language = build_language(config.language)
    model = new_model(config, language).to(device)  # initialised on the CPU: the same weights anywhere
    optimizer = make_optimizer(config, model)
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    val = validation_set(config, language)
    fixed = fixed_corpus(config, language)  # None: fresh sentences every step
    hooks = _hooks(config, language)
    state, resumed = _start(config, run, model, optimizer, hooks, rank, store, progress, device)
    for hook in hooks:
        hook.start(model, state.step)
    if not state.metrics:
        lr = learning_rate(config, state.step)
        state.metrics.append(_metrics_row(state.step, lr, math.nan, model, val, hooks))
    if not resumed and rank == 0:
        _save(run, state, model, optimizer, hooks)
    end = config.steps
    if state.reached_at is not None:  # resumed after the gap reached stop_gap
        end = min(end, state.reached_at + config.extra_steps)
    model.train()
    quiet = not progress or rank != 0 or bool(os.environ.get("PYTEST_CURRENT_TEST"))
    bar = tqdm(total=config.steps, initial=state.step, disable=quiet, desc=f"pretrain {run.key[:8]}",
               leave=False)
    diverged = False
    while state.step < end:
        step, lr = state.step, learning_rate(config, state.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        corpus = training_corpus(config, language, step, fixed)
        loss = mlm_loss(config, net, model.config, corpus, mask_generator(config, step), device, rank, world)
        objective = loss
        for hook in hooks:  # e.g. the adversary's -weight * L_down (single process: net is model)
            term = hook.extra_term(model, step)
            if term is not None:
                objective = objective + term
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        optimizer.step()
        global_loss = loss.detach() / world
        if world > 1:
            dist.all_reduce(global_loss)
        state.running += global_loss.item()
        state.step = step = step + 1
        bar.update(1)
        diverged = not math.isfinite(state.running) or not all(hook.finite for hook in hooks)
        if diverged:  # record where it happened and stop: the run is finished, as diverged
            end = step
        if step % config.eval_every == 0 or step == end:
            row = _metrics_row(step, lr, state.running / (step - state.metrics[-1]["step"]), model, val,
                               hooks)
            state.metrics.append(row)
            state.running = 0.0
            bar.set_postfix(gap=f"{row['gap']:.4f}")
            if config.stop_gap is not None and state.reached_at is None and row["gap"] <= config.stop_gap:
                state.reached_at = step
                end = min(config.steps, step + config.extra_steps)
        if rank == 0 and (step % config.checkpoint_every == 0 or step == end):
            _save(run, state, model, optimizer, hooks)
    bar.close()
    # the others wait (pretrain's barrier) while rank 0 writes the last checkpoint and the summary
    if rank == 0:
        _finish(run, state, diverged, model, device, world)
