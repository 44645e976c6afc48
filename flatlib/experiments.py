"""The experiment protocols the notebooks share: continue training from a checkpoint with other
optimizers, and measure a checkpoint (gap to the optimum, linear-probe accuracy per task, Hessian
trace) under one fixed, cached protocol.

A checkpoint's measurements are cached in its run directory (``evals/<step>_<protocol hash>.json``,
written atomically), keyed by everything that determines them, so notebooks that revisit a model
(02, 05) read the numbers instead of recomputing them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from flatlib.checks import check_int, check_seed
from flatlib.clock import clock_grid
from flatlib.device import module_device
from flatlib.downstream import (linear_probe, lookup_table_features, model_features, pool, probe_inputs,
                                probe_pooling)
from flatlib.flatness import (TraceEstimate, hessian_trace, invariant_trace, mlm_batches, mlm_logits_fn, mlm_loss_fn,
                              trainable_parameters)
from flatlib.model import rescale_norms
from flatlib.languages import HMM, Corpus, Language
from flatlib.runs import Run, atomic_write, canonical_json, config_hash
from flatlib.train import (PretrainConfig, ValidationSet, build_language, derived_seed, evaluate, load_model,
                           validation_set)


def continuation(base: PretrainConfig, from_step: int, steps: int, **overrides: Any) -> PretrainConfig:
    """A run that starts from ``base``'s checkpoint at ``from_step`` with a fresh optimizer and the
    given overrides (e.g. ``optimizer="sgd", lr=0.05``), for ``steps`` more steps. Warm-up and
    evaluation settings default to: no warm-up, a constant learning rate."""
    settings = {"warmup_steps": 0, "schedule": "constant", **overrides}
    return replace(base, steps=steps, init_from={"config": base.to_dict(), "step": from_step},
                   stop_gap=None, extra_steps=0, **settings)


# The probes a checkpoint is measured with. Only "standard" decides a claim (flatlib.claims).
PROBES = {
    "standard": "final-layer features of the unmasked sentence (HMM: at the task's position; PCFG: all positions "
                "concatenated), standardised, L2 chosen on a validation split",
    "all positions": "HMM: every position's final-layer features concatenated (PCFG: the standard probe already is)",
    "limited": "the standard inputs, few training examples (limited_train), features NOT standardised, one weak L2 "
               "(limited_l2): close to the theory's minimum-norm head; it sees the feature scales, which the "
               "LayerNorm gauge changes",
    "masked": "HMM: the final-layer features at the task's position with that word masked: the representation the "
              "pre-training loss supervises (the head reads it); PCFG tasks have no single position",
}


@dataclass(frozen=True)
class Protocol:
    """How a checkpoint is measured. Every field enters the cache key."""

    probe_sentences: int = 4000  # one fixed downstream corpus per language
    probe_train: int = 1000
    probe_test: int = 1000
    probe_splits: int = 3
    probe_l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    trace_pairs: int = 1024  # validation pairs the trace is measured on (the first ones)
    trace_probes: int = 10
    trace_batch: int = 512
    seed: int = 0
    tasks: tuple[str, ...] | None = None  # None: all of the language's tasks
    # the probes shown beside the standard one (which decides, flatlib.claims.DECIDING_PROBE): see PROBES
    extra_probes: tuple[str, ...] = ("all positions", "limited", "masked")
    limited_train: int = 256  # the data-limited probe's training examples ...
    limited_l2: float = 1e-4  # ... and its (weak, fixed) L2 strength, on unstandardised features
    invariant_trace: bool = True  # also flatness.invariant_trace (the deciding trace) beside the raw one

    def __post_init__(self) -> None:
        check_seed("seed", self.seed)
        for name in ("probe_sentences", "probe_train", "probe_test", "probe_splits", "trace_pairs", "trace_probes",
                     "trace_batch", "limited_train"):
            check_int(name, getattr(self, name), low=2 if name in ("probe_splits", "trace_probes") else 1)
        unknown = sorted(set(self.extra_probes) - set(PROBES))
        if unknown:
            raise ValueError(f"extra_probes: unknown probes {unknown} (expected some of {sorted(PROBES)})")

    def key(self) -> str:
        return config_hash(asdict(self))


def downstream_corpus(language_spec: dict[str, Any], n: int) -> Corpus:
    """The fixed corpus every probe of a language is trained and tested on."""
    language = build_language(language_spec)
    return language.sample(n, seed=derived_seed("downstream corpus", canonical_json(language_spec)))


def _probe(language: Language, corpus: Corpus, features: torch.Tensor, protocol: Protocol,
           inputs: Any = None, limited: bool = False) -> dict[str, Any]:
    """``{task: result}`` of the standard probe on ``features`` (``inputs(task)`` overrides the
    probe's input; ``limited``: the data-limited protocol)."""
    out = {}
    for task in protocol.tasks or language.tasks:
        labels = language.task_labels(corpus, task)
        x = probe_inputs(language, corpus, features, task) if inputs is None else inputs(task)
        settings = ({"n_train": protocol.limited_train, "l2_grid": (protocol.limited_l2,), "standardize": False}
                    if limited else {"n_train": protocol.probe_train, "l2_grid": protocol.probe_l2_grid})
        result = linear_probe(x, labels, language.n_classes(task), n_test=protocol.probe_test,
                              n_splits=protocol.probe_splits, seed=protocol.seed, **settings)
        out[task] = {"accuracy": result.accuracy, "ci95": result.ci95,
                     "splits": result.split_accuracies, "chosen_l2": result.chosen_l2,
                     "sweep": {str(k): v for k, v in result.sweep["test_accuracy"].items()}}
    return out


def _extra_probes(model: torch.nn.Module, language: Language, corpus: Corpus, features: torch.Tensor,
                  protocol: Protocol) -> dict[str, dict[str, Any]]:
    """``{probe: {task: result}}`` for the protocol's ``extra_probes`` that apply to the language."""
    out = {}
    is_hmm = isinstance(language, HMM)
    for kind in protocol.extra_probes:
        if kind == "limited":
            out[kind] = _probe(language, corpus, features, protocol, limited=True)
        elif kind == "all positions" and is_hmm:
            out[kind] = _probe(language, corpus, features, protocol, inputs=lambda task: pool(features, corpus))
        elif kind == "masked" and is_hmm:
            def masked(task: str) -> torch.Tensor:
                position = probe_pooling(language, task)[1]
                return model_features(model, corpus, masked_position=position)[:, position]
            out[kind] = _probe(language, corpus, features, protocol, inputs=masked)
    return out


def _trace(model: torch.nn.Module, val: ValidationSet, protocol: Protocol) -> TraceEstimate:
    """The trace of the Hessian of the *expected* single-mask loss at the first ``trace_pairs``
    validation contexts (targets = the exact conditionals: the sampled words' noise does not enter
    it), with the protocol's probes."""
    return hessian_trace(model, mlm_loss_fn, _trace_batches(model, val, protocol), n_probes=protocol.trace_probes,
                         seed=derived_seed("trace probes", protocol.seed))


def _trace_batches(model: torch.nn.Module, val: ValidationSet, protocol: Protocol) -> list[tuple]:
    n = min(protocol.trace_pairs, len(val.inputs))
    batches = mlm_batches((val.inputs[:n], val.positions[:n], val.targets[:n], val.true_probs[:n]),
                          protocol.trace_batch, soft_targets=True)
    device = module_device(model)
    return [tuple(t.to(device) for t in batch) for batch in batches]


def _traces(model: torch.nn.Module, val: ValidationSet, protocol: Protocol) -> dict[str, Any]:
    """The raw trace (``hessian_trace``) and, if the protocol asks, the LayerNorm-gauge-invariant
    trace (``invariant_trace``, the deciding one) on the same pairs, as measurement fields."""
    raw = _trace(model, val, protocol)
    out = {"trace": raw.mean, "trace_se": raw.stderr, "trace_description": raw.description}
    if protocol.invariant_trace:
        inv = invariant_trace(model, mlm_loss_fn, mlm_logits_fn, _trace_batches(model, val, protocol),
                              n_probes=protocol.trace_probes, seed=derived_seed("trace probes", protocol.seed))
        out.update({"invariant_trace": inv.mean, "invariant_trace_se": inv.stderr,
                    "trace_body": inv.body.mean, "trace_gauge": inv.gauge,
                    "invariant_trace_description": inv.description})
    return out


def measure_checkpoint(run: Run, step: int, protocol: Protocol = Protocol()) -> dict[str, Any]:
    """Gap to the exact optimum, probe accuracy per task (mean, 95% CI over resplits, the L2
    sweep; ``probes`` the standard probe, ``extra_probes`` the others of ``PROBES``) and the raw and
    gauge-invariant Hessian traces (± SE) of ``run``'s model at ``step``. Cached in the run."""

    def compute() -> dict[str, Any]:
        config = PretrainConfig.from_dict(run.config)
        language = build_language(config.language)
        model = load_model(run, step)
        val = validation_set(config, language)
        gap = evaluate(model, val)
        corpus = downstream_corpus(config.language, protocol.probe_sentences)
        features = model_features(model, corpus)
        probes = _probe(language, corpus, features, protocol)
        extra = _extra_probes(model, language, corpus, features, protocol)
        return {"run": run.key, "step": step, **gap, **_traces(model, val, protocol), "probes": probes,
                "extra_probes": extra}

    return _cached(_checkpoint_path(run, step, protocol), compute)


def lookup_table_probe(language_spec: dict[str, Any], protocol: Protocol = Protocol()) -> dict[str, Any]:
    """The same probe on the exact conditionals (the paper's lookup table), plus each task's
    majority-class rate and, for HMM and teacher tasks, the Bayes accuracy (exact per sentence, ± SE over
    sentences)."""
    language = build_language(language_spec)
    corpus = downstream_corpus(language_spec, protocol.probe_sentences)
    features = lookup_table_features(language, corpus).to(torch.float32)
    out = _probe(language, corpus, features, protocol)
    for task in out:
        labels = language.task_labels(corpus, task)
        labels = labels[labels >= 0]
        out[task]["majority"] = float(torch.bincount(labels).max()) / len(labels)
        if hasattr(language, "bayes_accuracy"):  # HMM and teacher tasks (a PCFG label is a function of the sentence)
            bayes = language.bayes_accuracy(corpus, task)
            out[task]["bayes"], out[task]["bayes_se"] = bayes.mean, bayes.stderr
    return out


def measure_checkpoints(checkpoints: list[tuple[Run, int]], protocol: Protocol = Protocol(),
                        workers: int = 1, threads_per_worker: int = 1) -> list[dict[str, Any]]:
    """``measure_checkpoint`` for every ``(run, step)`` of ``checkpoints`` (same order), cached ones
    read at once, the others in ``workers`` spawned processes (see ``measure_many``): on a 2-core
    machine two single-threaded processes beat one two-threaded one, as for training."""
    return measure_many("checkpoint", [(run, step, {}) for run, step in checkpoints], protocol, workers,
                        threads_per_worker)


# ---------------------------------------------------------------------------- traces in one parameterization
def _cached(path: Path, compute: Any) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    result = compute()
    atomic_write(path, json.dumps(result, indent=1))
    return result


def measure_gauge(run: Run, step: int, protocol: Protocol = Protocol()) -> dict[str, Any]:
    """The LayerNorm gauge on ``run``'s model at ``step``: one function in three parameterizations
    (as trained; the final LayerNorm's gain folded into the head, ``rescale_norms`` with ``c = 1 /
    |gain|``; then the gain x3 and the head's columns /3), each with the largest logit change, the raw
    trace and the invariant trace (the protocol's pairs and probes); and where the raw trace of the
    trained model sits (``hessian_trace`` of the diagonal blocks: head weights, head bias, final
    LayerNorm, everything else). Cached in the run."""

    def compute() -> dict[str, Any]:
        config = PretrainConfig.from_dict(run.config)
        model = load_model(run, step)
        val = validation_set(config, build_language(config.language))
        batches = _trace_batches(model, val, protocol)
        seed = derived_seed("trace probes", protocol.seed)
        gain = model.ln_f.weight.detach().abs()
        points = {"as trained": model, "ln_f gain folded into the head": rescale_norms(model, {"ln_f": 1 / gain}),
                  "then ln_f gain x3, head columns /3": rescale_norms(model, {"ln_f": 3 / gain})}
        rows = []
        for name, m in points.items():
            with torch.no_grad():
                change = max(float((mlm_logits_fn(m, b) - mlm_logits_fn(model, b)).abs().max()) for b in batches)
            raw = hessian_trace(m, mlm_loss_fn, batches, protocol.trace_probes, seed)
            inv = invariant_trace(m, mlm_loss_fn, mlm_logits_fn, batches, protocol.trace_probes, seed)
            rows.append({"parameterization": name, "max logit change": change, "ln_f gain norm": float(m.ln_f.weight.detach().norm()),
                         "head norm": float(m.head.weight.detach().norm()), "trace": raw.mean, "trace_se": raw.stderr,
                         "invariant_trace": inv.mean, "invariant_trace_se": inv.stderr})
        names = list(trainable_parameters(model))
        blocks = {"head weights": ["head.weight"], "head bias": ["head.bias"], "ln_f": ["ln_f.weight", "ln_f.bias"],
                  "everything else": [n for n in names if not n.startswith(("head.", "ln_f."))]}
        parts = {}
        for name, block in blocks.items():
            e = hessian_trace(model, mlm_loss_fn, batches, protocol.trace_probes, seed, parameters=block)
            parts[name] = {"trace": e.mean, "trace_se": e.stderr}
        return {"run": run.key, "step": step, "points": rows, "blocks": parts}

    return _cached(run.dir / "evals" / f"gauge_{step}_{protocol.key()}.json", compute)


def measure_widened_trace(run: Run, step: int, width: int, protocol: Protocol = Protocol()) -> dict[str, Any]:
    """The Hessian trace of ``run``'s model at ``step`` after ``widen`` to ``d_model = width``
    (a function-preserving embedding into the wider architecture, ``flatlib.model.widen``), on the
    same validation pairs, probes seed and loss as ``measure_checkpoint``'s trace. The trace depends
    on the parameterization: comparing models of different sizes in one architecture is what makes
    their traces comparable (the paper's procedure). Also returns the largest logit difference
    between the model and its widening on those pairs (0 up to float error). Cached in the run."""
    from flatlib.model import widen  # noqa: PLC0415

    config = PretrainConfig.from_dict(run.config)
    d_model = config.model["d_model"]
    if width % d_model:
        raise ValueError(f"width: {width} is not a multiple of the model's d_model {d_model}")
    factor = width // d_model

    def compute() -> dict[str, Any]:
        language = build_language(config.language)
        model = load_model(run, step)
        wide = widen(model, factor).eval()
        val = validation_set(config, language)
        n = min(protocol.trace_pairs, len(val.inputs))
        device = module_device(model)
        inputs, positions = val.inputs[:n].to(device), val.positions[:n].to(device)
        with torch.no_grad():
            drift = float((wide(inputs, positions) - model(inputs, positions)).abs().max())
        return {"run": run.key, "step": step, "width": width, "factor": factor, **_traces(wide, val, protocol),
                "n_params": sum(p.numel() for p in wide.parameters()), "max_logit_change": drift}

    return _cached(_widened_trace_path(run, step, protocol, width), compute)


def measure_finetune(run: Run, step: int, protocol: Protocol = Protocol(), epochs: int = 10,
                     lr: float = 1e-4) -> dict[str, Any]:
    """Full fine-tuning accuracy per task (``flatlib.downstream.finetune``: AdamW on the whole model
    and a linear head on the same pooled features as the probe, the head initialised at the fitted
    probe: LP-FT) on the probe's corpus, ``probe_train`` / ``probe_test`` examples, one split (the
    spread comes from the training seeds). Cached in the run."""
    from flatlib.downstream import finetune  # noqa: PLC0415

    config = PretrainConfig.from_dict(run.config)

    def compute() -> dict[str, Any]:
        language = build_language(config.language)
        model = load_model(run, step)
        corpus = downstream_corpus(config.language, protocol.probe_sentences)
        out = {}
        for task in protocol.tasks or language.tasks:
            pooling, position = probe_pooling(language, task)
            out[task] = finetune(model, corpus, language.task_labels(corpus, task), language.n_classes(task),
                                 protocol.probe_train, protocol.probe_test, epochs=epochs, lr=lr,
                                 seed=protocol.seed, pooling=pooling, position=position, init_head="probe")
        return {"run": run.key, "step": step, "epochs": epochs, "lr": lr, "init_head": "probe", "accuracy": out}

    return _cached(_finetune_path(run, step, protocol, epochs, lr), compute)


def _checkpoint_path(run: Run, step: int, protocol: Protocol) -> Path:
    return run.dir / "evals" / f"{step:08d}_{protocol.key()}.json"


def _widened_trace_path(run: Run, step: int, protocol: Protocol, width: int) -> Path:
    return run.dir / "evals" / f"{step:08d}_{protocol.key()}_wide{width}.json"


def _finetune_path(run: Run, step: int, protocol: Protocol, epochs: int = 10, lr: float = 1e-4) -> Path:
    return run.dir / "evals" / f"{step:08d}_{protocol.key()}_lpft{epochs}_{lr:g}.json"


_MEASURES = {"checkpoint": (measure_checkpoint, _checkpoint_path),
             "widened_trace": (measure_widened_trace, _widened_trace_path),
             "finetune": (measure_finetune, _finetune_path)}


def _measure_job(args: tuple[str, str, dict[str, Any], int, dict[str, Any], dict[str, Any], int]) -> dict[str, Any]:
    kind, directory, config, step, protocol, kwargs, threads = args
    torch.set_num_threads(threads)
    fields = {**protocol, "probe_l2_grid": tuple(protocol["probe_l2_grid"])}
    if fields.get("tasks") is not None:
        fields["tasks"] = tuple(fields["tasks"])
    return _MEASURES[kind][0](Run(Path(directory), config), step, protocol=Protocol(**fields), **kwargs)


def measure_many(kind: str, items: list[tuple[Run, int, dict[str, Any]]], protocol: Protocol = Protocol(),
                 workers: int = 1, threads_per_worker: int = 1) -> list[dict[str, Any]]:
    """Run one of the cached measurements (``kind``: "checkpoint", "widened_trace" or "finetune") for
    every ``(run, step, keyword arguments)`` of ``items``, in ``workers`` spawned single-threaded
    processes (or in this process for ``workers == 1``). Same numbers whichever way (each is a
    function of the checkpoint, the protocol and the arguments); cached ones cost nothing. In workers,
    an item that fails (or whose worker dies: ``flatlib.pool``) does not stop the others; then
    ``flatlib.pool.PoolError`` lists the failed items with their causes."""
    if kind not in _MEASURES:
        raise ValueError(f"kind: expected one of {sorted(_MEASURES)}, got {kind!r}")
    if workers < 1 or threads_per_worker < 1:
        raise ValueError("workers, threads_per_worker: expected >= 1")
    measure, path = _MEASURES[kind]
    results: list[dict[str, Any] | None] = [None] * len(items)
    todo = []
    for index, (run, step, kwargs) in enumerate(items):
        cached = path(run, step, protocol, **kwargs)
        if cached.exists():
            results[index] = json.loads(cached.read_text())
        else:
            todo.append(index)
    from flatlib import progress  # noqa: PLC0415 - what flatlib.reproduce shows

    shown = progress.start(f"measuring ({kind})", len(todo), "measurements", skipped=len(items) - len(todo))
    if workers == 1 or len(todo) <= 1:
        for index in todo:
            run, step, kwargs = items[index]
            results[index] = measure(run, step, protocol=protocol, **kwargs)
            shown.advance()
    else:
        from flatlib.pool import PoolError, run_jobs  # noqa: PLC0415

        jobs = [(kind, str(items[i][0].dir), items[i][0].config, items[i][1], asdict(protocol), items[i][2],
                 threads_per_worker) for i in todo]
        # a worker that raises or dies fails only its own item; the others finish (and are cached)
        failed = []
        for index, outcome in zip(todo, run_jobs(_measure_job, jobs, workers, on_done=shown.advance)):
            results[index] = outcome.value
            if not outcome.ok:
                run, step, kwargs = items[index]
                failed.append(f"- {kind} of run {run.key} at step {step} {kwargs}:\n{outcome.error}")
        if failed:
            raise PoolError(f"{len(failed)} of {len(items)} measurements failed:\n" + "\n".join(failed))
    shown.finish()
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------- the notebooks' run grids
# One definition of every run the notebooks train, from the resolved profile (flatlib.profiles.resolve):
# notebooks 02-05 ask for the same configs, so they share runs through the store (a config's hash is
# its run's key), and notebook 05 finds every model of 02-04 without retraining.
def model_of(params: dict[str, Any], width: int | None = None) -> dict[str, int]:
    """The profile's pre-training model (``pretraining.model``), or its ``model_size`` family at
    ``width`` (``d_ff = ff_mult * width``, heads of ``head_dim``: ``widen`` multiplies the number of
    heads, so a widened model of this family has exactly the widest model's architecture)."""
    if width is None:
        return dict(params["pretraining"]["model"])
    s = params["model_size"]
    return {"n_layer": s["n_layer"], "n_head": width // s["head_dim"], "d_model": width, "d_ff": s["ff_mult"] * width}


def phase1_config(params: dict[str, Any], name: str, seed: int, width: int | None = None) -> PretrainConfig:
    """Pre-training towards the optimum (notebook 02's phase 1, notebook 03's sizes): AdamW, a linear
    warm-up, then a linear decay to 0 at ``pretraining.steps[name]`` (for a ``width`` of notebook 03,
    at ``model_size.steps[name]``); one checkpoint at the end.

    Every width of notebook 03 trains at **one** learning rate, the one the widest width can take:
    ``pretraining.lr * min(1, d_model / widest)`` (Adam's learning rate falls as 1/width, as in muP:
    at the cpu profile a 2x128 HMM model at the 2x64 model's lr 3e-3 stalls at a gap of 0.035 nats,
    at 1.5e-3 it reaches 0.015). An earlier version scaled each width's own rate, which confounded
    size with learning rate (issue 14)."""
    from flatlib.profiles import language_spec  # noqa: PLC0415 - profiles imports the languages

    t = params["pretraining"]
    steps = t["steps"][name] if width is None else params["model_size"]["steps"][name]
    widest = max(params["model_size"]["widths"])
    lr = t["lr"] if width is None else t["lr"] * min(1.0, t["model"]["d_model"] / widest)
    return PretrainConfig(language=language_spec(params, name), model=model_of(params, width), optimizer="adamw",
                          lr=lr, warmup_steps=t["warmup_steps"], schedule="linear", min_lr=0.0, steps=steps,
                          batch_size=t["batch_size"], eval_every=t["eval_every"], eval_pairs=t["eval_pairs"],
                          checkpoint_every=steps, seed=seed)


# SGD continues on the loss alone: the theory's slow flow (docs/paper.md) moves along the loss's minimizers,
# which an L2 term would move. With PretrainConfig's default (coupled) weight decay 0.01 at lr 0.1 the
# weights shrink by 1 - 0.001 a step (x0.3 over 1200 steps), and because LayerNorm makes the loss
# scale-invariant in most of them, the trace *doubled* and the gap rose 0.013 nats (cpu, 3 seeds);
# without it the trace fell 20.6 -> 14.2 at a gap +0.0015 (seed 0).
SGD_WEIGHT_DECAY = 0.0


def phase2_config(params: dict[str, Any], name: str, seed: int, optimizer: str, **overrides: Any) -> PretrainConfig:
    """Training on after phase 1 (notebook 02's phase 2, notebook 04's algorithms): a fresh
    ``optimizer`` ("sgd" at ``pretraining.sgd_lr`` without weight decay, see ``SGD_WEIGHT_DECAY``, or
    "adamw" at ``pretraining.adamw_lr`` with phase 1's decoupled weight decay) at a constant learning
    rate from the final phase-1 checkpoint, for ``continue_steps`` steps, checkpoints every
    ``checkpoint_every``. ``overrides`` go to ``continuation`` (e.g. ``adversarial={...}``)."""
    t = params["pretraining"]
    base = phase1_config(params, name, seed)
    lr = {"sgd": t["sgd_lr"], "adamw": t["adamw_lr"]}[optimizer]
    settings = {"eval_every": t["continue_eval_every"], "checkpoint_every": t["checkpoint_every"],
                **({"weight_decay": SGD_WEIGHT_DECAY} if optimizer == "sgd" else {}), **overrides}
    return continuation(base, from_step=base.steps, steps=t["continue_steps"], optimizer=optimizer, lr=lr, **settings)


@dataclass(frozen=True)
class ModelRef:
    """One measured model of the notebooks: the run's config and the checkpoint's step, where it
    comes from (``origin``), the parameterization its trace is measured in (``family``; ``widen_to``
    is the width it is widened to first, or None), and its training ``lineage`` (a phase-1 run and
    its continuations share one: they are not independent)."""

    language: str
    origin: str
    family: str
    lineage: str
    config: PretrainConfig
    step: int
    widen_to: int | None = None


def experiment_models(params: dict[str, Any], names: list[str] | None = None) -> list[ModelRef]:
    """Every checkpoint notebooks 02-04 measure at the resolved profile ``params``: the end of phase
    1, every constant-lr continuation checkpoint (SGD, AdamW) and every clock anneal's end (02), the
    adversarial continuations of notebook 04 (for the languages of its profile section), and every width of notebook 03 (for
    ``model_size.languages``, traces after widening to the widest)."""
    t = params["pretraining"]
    names = list(names or t["languages"])
    seeds = [params["seed"] + i for i in range(t["seeds"])]
    base = model_of(params)
    family = f"{base['n_layer']}x{base['d_model']}"
    checkpoints = list(range(t["checkpoint_every"], t["continue_steps"] + 1, t["checkpoint_every"]))
    out = []
    for name in names:
        for s in seeds:
            lineage = f"{name} seed {s}"
            first = phase1_config(params, name, s)
            out.append(ModelRef(name, "02 phase 1", family, lineage, first, first.steps))
            for optimizer in ("sgd", "adamw"):  # constant-lr continuations (notebook 04's SGD, 02's and 04's AdamW)
                config = phase2_config(params, name, s, optimizer)
                out += [ModelRef(name, f"02 {optimizer}", family, lineage, config, k) for k in checkpoints]
            if "clock" in params:  # notebook 02's dose-response: every anneal's end
                out += [ModelRef(name, "02 sgd clock", family, lineage, p.anneal, p.anneal.steps)
                        for p in clock_grid({(name, s): first}, params["clock"])]
            adversarial = adversarial_config(params, name, s)
            if adversarial is not None:
                out += [ModelRef(name, "04 adversarial", family, lineage, adversarial, k) for k in checkpoints]
    sizes = params["model_size"]
    widest = sizes["widths"][-1]
    for name in names:
        if name not in sizes["languages"]:
            continue
        for w in sizes["widths"]:
            for s in seeds:
                config = phase1_config(params, name, s, width=w)
                out.append(ModelRef(name, "03 sizes", f"widths widened to {widest}", f"{name} w{w} seed {s}",
                                    config, config.steps, None if w == widest else widest))
    return out


def adversarial_config(params: dict[str, Any], name: str, seed: int) -> PretrainConfig | None:
    """Notebook 04's adversarial continuation of ``name`` (None if the profile's ``algorithms``
    section does not list ``name``): AdamW at ``pretraining.adamw_lr`` from the same phase-1
    checkpoint as notebook 02's continuations, on L_mlm - weight * L_downstream for the language's
    adversarial task (``flatlib.train``, option ``adversarial``)."""
    a = params.get("algorithms")
    if a is None or name not in a["languages"]:
        return None
    settings = {**a["adversarial"], "task": a["tasks"][name], "weight": a["weights"][name]}
    return phase2_config(params, name, seed, "adamw", adversarial=settings)


def measurement_row(m: dict[str, Any]) -> dict[str, Any]:
    """A flat table row of a ``measure_checkpoint`` result: gap, gap_se, trace, trace_se,
    invariant_trace, invariant_trace_se, trace_body, ``acc <task>`` and ``acc <task> ci95`` (the
    standard probe) and ``acc <task> [<probe>]`` for the extra probes."""
    row = {key: m[key] for key in ("val_loss", "val_optimum", "gap", "gap_se", "trace", "trace_se") if key in m}
    row.update({key: m[key] for key in ("invariant_trace", "invariant_trace_se", "trace_body") if key in m})
    for task, probe in m["probes"].items():
        row[f"acc {task}"], row[f"acc {task} ci95"] = probe["accuracy"], probe["ci95"]
    for kind, tasks in m.get("extra_probes", {}).items():
        for task, probe in tasks.items():
            row[f"acc {task} [{kind}]"] = probe["accuracy"]
    return row
