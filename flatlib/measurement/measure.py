"""Measuring a checkpoint under one fixed, cached protocol: the gap to the exact optimum, linear-probe
accuracy per task (``PROBES``), and the raw and gauge-invariant Hessian traces; also the LayerNorm
gauge of one model, the trace after widening, fine-tuning, and the lookup-table probe.

A checkpoint's measurements are cached in its run directory (``evals/<step>_<protocol hash>.json``,
written atomically under a lock, then its SHA-256 beside it: a damaged entry is set aside and
measured again), keyed by everything that determines them, so notebooks that revisit a model
(02, 05) read the numbers instead of recomputing them. ``measure_many`` runs many in worker
processes. Which runs the notebooks train is ``flatlib.runner.experiments``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from flatlib.checks import (
    PROBE_SEED_SCALE,
    check_bool,
    check_int,
    check_names,
    check_number,
    check_numbers,
    check_seed,
)
from flatlib.device import module_device
from flatlib.languages import HMM, Corpus, Language, build_language
from flatlib.measurement.downstream import (
    check_probe_version,
    exact_probe,
    finetune,
    linear_probe,
    lookup_table_features,
    model_features,
    pool,
    probe_inputs,
    probe_pooling,
)
from flatlib.measurement.flatness import TraceEstimate, hessian_trace, invariant_trace, trainable_parameters
from flatlib.measurement.mlm import mlm_batches, mlm_logits_fn, mlm_loss_fn
from flatlib.measurement.symmetry import full_gauge_trace, rescale, transformer_groups
from flatlib.runner import progress
from flatlib.runner.pool import PoolError, run_jobs
from flatlib.runner.runs import Run, atomic_write, canonical_json, config_hash, file_lock, writable
from flatlib.seeds import derived_seed
from flatlib.training.model import rescale_norms, widen
from flatlib.training.objective import ValidationSet, evaluate, validation_set
from flatlib.training.train import PretrainConfig, load_model

# The probes a checkpoint is measured with. Only "standard" decides a claim (flatlib.claims).
PROBES = {
    "standard": "final-layer features of the unmasked sentence (HMM: at the task's position; PCFG: all "
                "positions concatenated), standardised, L2 chosen on a validation split",
    "all positions": "HMM: every position's final-layer features concatenated (PCFG: the standard probe "
                     "already is)",
    "limited": "the standard inputs, few training examples (limited_train), features NOT standardised, one "
               "weak L2 (limited_l2): close to the theory's minimum-norm head; it sees the feature scales, "
               "which the LayerNorm gauge changes",
    "masked": "HMM: the final-layer features at the task's position with that word masked: the "
              "representation the pre-training loss supervises (the head reads it); PCFG tasks have no "
              "single position",
}


# The gauges an invariant trace can fix (Protocol.gauge): "layernorm", flatness.invariant_trace (the
# LayerNorm/reader rescalings alone); "full", symmetry.full_gauge_trace (LayerNorm/reader, attention Q/K and
# V/O per head coordinate, jointly), which also records the LayerNorm-only minimum beside it.
GAUGES = ("layernorm", "full")


@dataclass(frozen=True)
class Protocol:
    """How a checkpoint is measured. Every field enters the cache key, except a field at the value that
    reproduces the behaviour from before it existed (``_KEY_OMITTED_AT``): every earlier key stays valid.

    ``probe_version`` 1 is the committed figures' probe (``flatlib.measurement.downstream.linear_probe``:
    capped L-BFGS, L2 chosen per split); 2 is ``flatlib.measurement.downstream.exact_probe`` (the exact
    optimum, one L2 chosen on the pooled validation splits, recorded with a flag when it sits at an edge of
    ``probe_l2_grid``), for every probe (the extra probes too). Version 2 searches ``probe_l2_grid`` as given:
    its grid is ``flatlib.measurement.downstream.PROBE_V2_L2_GRID`` (1e-7 .. 10, walked down to past the
    optimum), which a profile switching to version 2 sets.

    ``gauge`` says which function-preserving rescalings the deciding trace (``invariant_trace``) is minimised
    over: ``"layernorm"`` (the committed figures: ``flatness.invariant_trace``, each LayerNorm against its
    reader) or ``"full"`` (``symmetry.full_gauge_trace``: those and attention's Q/K and V/O per head
    coordinate, jointly; every group verified on the model first). With ``"full"`` a measurement also records
    the LayerNorm-only minimum (``invariant_trace_layernorm``, from the same diagonals and body) and the raw
    trace in the same estimator (``trace_gauged_raw``), so the three can be shown side by side."""

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
    probe_version: int = 1  # 1: linear_probe (the committed figures), 2: exact_probe (see the docstring)
    gauge: str = "layernorm"  # which gauge the invariant trace fixes: one of GAUGES (see the docstring)

    # fields left out of the key at these values (not dataclass fields: no annotation)
    _KEY_OMITTED_AT = {"probe_version": 1, "gauge": "layernorm"}

    def __post_init__(self) -> None:
        """Every field checked now (ValueError naming it), before anything is measured or cached: types
        exact (a bool is not a number, only a bool is a flag), numbers finite and in range, the seed small
        enough that every split seed derived from it is valid. ``tasks`` (non-empty names; None for all)
        is checked against the language where the protocol meets it. Lists, as JSON gives them, become
        tuples (the key is the same)."""
        for name in ("probe_sentences", "probe_train", "probe_test", "probe_splits", "trace_pairs",
                     "trace_probes", "trace_batch", "limited_train"):
            check_int(name, getattr(self, name), low=2 if name in ("probe_splits", "trace_probes") else 1)
        if isinstance(self.extra_probes, str) or not isinstance(self.extra_probes, (tuple, list)):
            raise ValueError(f"extra_probes: expected a tuple of probe names (some of {sorted(PROBES)}), "
                             f"got {self.extra_probes!r}")
        unknown = sorted(set(self.extra_probes) - set(PROBES), key=repr)
        if unknown:
            raise ValueError(f"extra_probes: unknown probes {unknown} (expected some of {sorted(PROBES)})")
        # linear_probe splits the corpus into train, test and validation (test // 2) examples
        trains = {"probe_train": self.probe_train, **({"limited_train": self.limited_train}
                                                      if "limited" in self.extra_probes else {})}
        for name, n_train in trains.items():
            needed = n_train + self.probe_test + self.probe_test // 2
            if self.probe_sentences < needed:
                raise ValueError(f"probe_sentences: expected at least {name} + probe_test + probe_test // 2 "
                                 f"= {needed} (the probe's splits), got {self.probe_sentences}")
        check_numbers("probe_l2_grid", self.probe_l2_grid, 0, low_closed=True)
        check_number("limited_l2", self.limited_l2, 0, low_closed=True)
        if self.tasks is not None:
            check_names("tasks", self.tasks)
        check_bool("invariant_trace", self.invariant_trace)
        check_probe_version(self.probe_version)
        if not isinstance(self.gauge, str) or self.gauge not in GAUGES:
            raise ValueError(f"gauge: expected one of {list(GAUGES)}, got {self.gauge!r}")
        # linear_probe seeds split k with seed * PROBE_SEED_SCALE + k (k < probe_splits)
        check_seed("seed", self.seed, scale=PROBE_SEED_SCALE, offset=self.probe_splits - 1)
        for name in ("probe_l2_grid", "tasks", "extra_probes"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def key(self) -> str:
        """The cache key: a hash of the fields, those at their ``_KEY_OMITTED_AT`` value left out. Every
        measurement path is named by it, so an unknown ``probe_version`` is refused here, before anything
        is read or cached."""
        check_probe_version(self.probe_version)
        return config_hash({name: value for name, value in asdict(self).items()
                            if not (name in self._KEY_OMITTED_AT and value == self._KEY_OMITTED_AT[name])})


def downstream_corpus(language_spec: dict[str, Any], n: int) -> Corpus:
    """The fixed corpus every probe of a language is trained and tested on."""
    language = build_language(language_spec)
    return language.sample(n, seed=derived_seed("downstream corpus", canonical_json(language_spec)))


def _probe(language: Language, corpus: Corpus, features: torch.Tensor, protocol: Protocol,
           inputs: Any = None, limited: bool = False) -> dict[str, Any]:
    """``{task: result}`` of the standard probe on ``features`` (``inputs(task)`` overrides the
    probe's input; ``limited``: the data-limited protocol), with the protocol's ``probe_version``:
    version 2 also records the one chosen ``l2``, its ``l2_edge`` flag, the validation sweep and the fits'
    worst ``max_gradient``."""
    check_probe_version(protocol.probe_version)
    probe = linear_probe if protocol.probe_version == 1 else exact_probe
    out = {}
    for task in protocol.tasks or language.tasks:
        labels = language.task_labels(corpus, task)
        x = probe_inputs(language, corpus, features, task) if inputs is None else inputs(task)
        settings = ({"n_train": protocol.limited_train, "l2_grid": (protocol.limited_l2,),
                     "standardize": False}
                    if limited else {"n_train": protocol.probe_train, "l2_grid": protocol.probe_l2_grid})
        result = probe(x, labels, language.n_classes(task), n_test=protocol.probe_test,
                       n_splits=protocol.probe_splits, seed=protocol.seed, **settings)
        out[task] = {"accuracy": result.accuracy, "ci95": result.ci95,
                     "splits": result.split_accuracies, "chosen_l2": result.chosen_l2,
                     "sweep": {str(k): v for k, v in result.sweep["test_accuracy"].items()}}
        if protocol.probe_version == 2:
            out[task].update({"probe_version": 2, "l2": result.chosen_l2[0], "l2_edge": result.l2_edge,
                              "max_gradient": result.max_gradient,
                              "sweep_val": {str(k): v for k, v in result.sweep["val_accuracy"].items()}})
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
            out[kind] = _probe(language, corpus, features, protocol,
                               inputs=lambda task: pool(features, corpus))
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
    return hessian_trace(model, mlm_loss_fn, _trace_batches(model, val, protocol),
                         n_probes=protocol.trace_probes, seed=derived_seed("trace probes", protocol.seed))


def _trace_batches(model: torch.nn.Module, val: ValidationSet, protocol: Protocol) -> list[tuple]:
    n = min(protocol.trace_pairs, len(val.inputs))
    batches = mlm_batches((val.inputs[:n], val.positions[:n], val.targets[:n], val.true_probs[:n]),
                          protocol.trace_batch, soft_targets=True)
    device = module_device(model)
    return [tuple(t.to(device) for t in batch) for batch in batches]


def _traces(model: torch.nn.Module, val: ValidationSet, protocol: Protocol) -> dict[str, Any]:
    """The raw trace (``hessian_trace``) and, if the protocol asks, the gauge-invariant trace
    (``invariant_trace``, the deciding one, over ``protocol.gauge``) on the same pairs, as measurement
    fields."""
    raw = _trace(model, val, protocol)
    out = {"trace": raw.mean, "trace_se": raw.stderr, "trace_description": raw.description}
    if protocol.invariant_trace and protocol.gauge == "full":
        full = full_gauge_trace(model, mlm_loss_fn, mlm_logits_fn, _trace_batches(model, val, protocol),
                                n_probes=protocol.trace_probes,
                                seed=derived_seed("trace probes", protocol.seed))
        out.update({"invariant_trace": full.mean, "invariant_trace_se": full.stderr,
                    "trace_body": full.body.mean,
                    "invariant_trace_layernorm": full.norm_mean, "trace_gauged_raw": full.raw_mean,
                    "gauge": "full", "gauge_newton_steps": full.minimum.iterations,
                    "gauge_max_logit_change": max(full.deviations.values()),
                    "invariant_trace_description": full.description})
    elif protocol.invariant_trace:
        inv = invariant_trace(model, mlm_loss_fn, mlm_logits_fn, _trace_batches(model, val, protocol),
                              n_probes=protocol.trace_probes,
                              seed=derived_seed("trace probes", protocol.seed))
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
        # HMM and teacher tasks (a PCFG label is a function of the sentence)
        if hasattr(language, "bayes_accuracy"):
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
def _digest_path(path: Path) -> Path:
    return path.with_suffix(".sha256")


def _entry(path: Path) -> tuple[dict[str, Any] | None, str | None, bytes]:
    """The cache entry at ``path`` as read, touching nothing: (its measurement, what is wrong with it,
    its bytes); ``(None, None, b"")`` when there is none. See ``read_cached``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None, b""
    digest = _digest_path(path)
    if digest.exists() and hashlib.sha256(data).hexdigest() != digest.read_text().strip():
        return None, "does not match the SHA-256 recorded beside it (edited or truncated)", data
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, f"is not valid JSON ({error})", data
    if not isinstance(value, dict):
        return None, f"holds a {type(value).__name__}, not a measurement", data
    return value, None, data


def read_cached(path: Path) -> dict[str, Any] | None:
    """The cached measurement at ``path``, checked against the SHA-256 beside it (written after it, as
    a checkpoint's is); None when there is none. A damaged entry (digest mismatch, unreadable JSON) is
    never used: it is renamed ``<name>.corrupt`` with a warning naming it, and None is returned, so
    the measurement is computed again (each is a deterministic function of the checkpoint and the
    protocol). An entry from before the digests (no ``.sha256``) is adopted if it parses: it was
    written atomically, whole."""
    value, problem, data = _entry(path)
    digest = _digest_path(path)
    if problem is not None:
        aside = path.with_name(path.name + ".corrupt")
        warnings.warn(f"{path} {problem}: not used; moved to {aside.name} and measured again", stacklevel=2)
        with contextlib.suppress(OSError):  # a read-only store: leave it, it is ignored all the same
            os.replace(path, aside)
            digest.unlink(missing_ok=True)
        return None
    if value is not None and not digest.exists():
        with contextlib.suppress(OSError):
            atomic_write(digest, hashlib.sha256(data).hexdigest())
    return value


def _cached(path: Path, compute: Any) -> dict[str, Any]:
    """``compute()``'s result, read from the cache entry ``path`` when it holds a good one (see
    ``read_cached``), else computed under the entry's lock (a second process measuring the same
    entry waits, then reads it) and written. A store that cannot be written (read-only) is measured
    uncached, with a warning."""
    cached = read_cached(path)
    if cached is not None:
        return cached
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(file_lock(path.parent / f".{path.name}.lock", f"it is computing {path.name}"))
        except OSError as error:
            if writable(error):
                raise
            warnings.warn(f"{error}; measuring without the cache", stacklevel=2)
            return compute()
        cached = read_cached(path)  # another process may have written it while this one waited
        if cached is not None:
            return cached
        result = compute()
        data = json.dumps(result, indent=1)
        try:
            atomic_write(path, data)
            atomic_write(_digest_path(path), hashlib.sha256(data.encode()).hexdigest())
        except OSError as error:
            if writable(error):
                raise
            warnings.warn(f"{error}; the measurement is returned but not cached", stacklevel=2)
        return result


def measure_gauge(run: Run, step: int, protocol: Protocol = Protocol()) -> dict[str, Any]:
    """The gauge on ``run``'s model at ``step``: one function in several parameterizations (as trained;
    the final LayerNorm's gain folded into the head, ``rescale_norms`` with ``c = 1 / |gain|``; then the
    gain x3 and the head's columns /3; with ``protocol.gauge == "full"`` also every attention V/O and,
    separately, every Q/K head coordinate x3 against /3), each with the largest logit change, the raw
    trace and the invariant trace (the protocol's gauge, pairs and probes; with the full gauge also the
    LayerNorm-only minimum, ``invariant_trace_layernorm``); and where the raw trace of the trained model
    sits (``hessian_trace`` of the diagonal blocks: head weights, head bias, final LayerNorm, everything
    else). Cached in the run."""

    def compute() -> dict[str, Any]:
        config = PretrainConfig.from_dict(run.config)
        model = load_model(run, step)
        val = validation_set(config, build_language(config.language))
        batches = _trace_batches(model, val, protocol)
        seed = derived_seed("trace probes", protocol.seed)
        gain = model.ln_f.weight.detach().abs()
        points = {"as trained": model,
                  "ln_f gain folded into the head": rescale_norms(model, {"ln_f": 1 / gain}),
                  "then ln_f gain x3, head columns /3": rescale_norms(model, {"ln_f": 3 / gain})}
        if protocol.gauge == "full":
            groups = transformer_groups(model)
            for kind, label in (("value/output", "attention V/O x3 per head coordinate"),
                                ("query/key", "attention Q/K x3 per head coordinate")):
                points[label] = rescale(model, groups, {g.name: torch.full((g.size,), math.log(3.0))
                                                         for g in groups if g.kind == kind})
        rows = []
        for name, m in points.items():
            with torch.no_grad():
                change = max(float((mlm_logits_fn(m, b) - mlm_logits_fn(model, b)).abs().max())
                             for b in batches)
            raw = hessian_trace(m, mlm_loss_fn, batches, protocol.trace_probes, seed)
            row = {"parameterization": name, "max logit change": change,
                   "ln_f gain norm": float(m.ln_f.weight.detach().norm()),
                   "head norm": float(m.head.weight.detach().norm()), "trace": raw.mean,
                   "trace_se": raw.stderr}
            if protocol.gauge == "full":
                full = full_gauge_trace(m, mlm_loss_fn, mlm_logits_fn, batches, protocol.trace_probes, seed)
                row.update({"invariant_trace_layernorm": full.norm_mean, "invariant_trace": full.mean,
                            "invariant_trace_se": full.stderr})
            else:
                inv = invariant_trace(m, mlm_loss_fn, mlm_logits_fn, batches, protocol.trace_probes, seed)
                row.update({"invariant_trace": inv.mean, "invariant_trace_se": inv.stderr})
            rows.append(row)
        names = list(trainable_parameters(model))
        blocks = {"head weights": ["head.weight"], "head bias": ["head.bias"],
                  "ln_f": ["ln_f.weight", "ln_f.bias"],
                  "everything else": [n for n in names if not n.startswith(("head.", "ln_f."))]}
        parts = {}
        for name, block in blocks.items():
            e = hessian_trace(model, mlm_loss_fn, batches, protocol.trace_probes, seed, parameters=block)
            parts[name] = {"trace": e.mean, "trace_se": e.stderr}
        return {"run": run.key, "step": step, "points": rows, "blocks": parts}

    return _cached(run.dir / "evals" / f"gauge_{step}_{protocol.key()}.json", compute)


def measure_widened_trace(run: Run, step: int, width: int, protocol: Protocol = Protocol()) -> dict[str, Any]:
    """The Hessian trace of ``run``'s model at ``step`` after ``widen`` to ``d_model = width``
    (a function-preserving embedding into the wider architecture, ``flatlib.training.model.widen``), on the
    same validation pairs, probes seed and loss as ``measure_checkpoint``'s trace. The trace depends
    on the parameterization: comparing models of different sizes in one architecture is what makes
    their traces comparable (the paper's procedure). Also returns the largest logit difference
    between the model and its widening on those pairs (0 up to float error). Cached in the run."""
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
        return {"run": run.key, "step": step, "width": width, "factor": factor,
                **_traces(wide, val, protocol),
                "n_params": sum(p.numel() for p in wide.parameters()), "max_logit_change": drift}

    return _cached(_widened_trace_path(run, step, protocol, width), compute)


def measure_finetune(run: Run, step: int, protocol: Protocol = Protocol(), epochs: int = 10,
                     lr: float = 1e-4) -> dict[str, Any]:
    """Full fine-tuning accuracy per task (``flatlib.measurement.downstream.finetune``: AdamW on the whole
    model and a linear head on the same pooled features as the probe, the head initialised at the fitted
    probe: LP-FT) on the probe's corpus, ``probe_train`` / ``probe_test`` examples, one split (the
    spread comes from the training seeds). Cached in the run."""
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
        return {"run": run.key, "step": step, "epochs": epochs, "lr": lr, "init_head": "probe",
                "accuracy": out}

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


def _kind(kind: str) -> tuple[Callable[..., dict[str, Any]], Callable[..., Path]]:
    """The measurement ``kind`` names and the path of its cached result; ValueError for another."""
    if kind not in _MEASURES:
        raise ValueError(f"kind: expected one of {sorted(_MEASURES)}, got {kind!r}")
    return _MEASURES[kind]


def is_cached(kind: str, run: Run, step: int, protocol: Protocol = Protocol(), **kwargs: Any) -> bool:
    """Whether ``measure_many(kind, [(run, step, kwargs)], protocol)`` would read its result from the
    cache (and so cost nothing)."""
    return _entry(_kind(kind)[1](run, step, protocol, **kwargs))[0] is not None


def _measure_job(args: tuple[str, str, dict[str, Any], int, dict[str, Any], dict[str, Any],
                             int]) -> dict[str, Any]:
    kind, directory, config, step, protocol, kwargs, threads = args
    torch.set_num_threads(threads)
    fields = {**protocol, "probe_l2_grid": tuple(protocol["probe_l2_grid"])}
    if fields.get("tasks") is not None:
        fields["tasks"] = tuple(fields["tasks"])
    return _MEASURES[kind][0](Run(Path(directory), config), step, protocol=Protocol(**fields), **kwargs)


def measure_many(kind: str, items: list[tuple[Run, int, dict[str, Any]]], protocol: Protocol = Protocol(),
                 workers: int = 1, threads_per_worker: int = 1) -> list[dict[str, Any]]:
    """Run one of the cached measurements (``kind``: "checkpoint", "widened_trace" or "finetune") for
    every ``(run, step, keyword arguments)`` of ``items``, in ``workers`` spawned processes of
    ``threads_per_worker`` threads each (or in this process for ``workers == 1``, at that thread count
    for the call). Same numbers whichever way (each is a
    function of the checkpoint, the protocol and the arguments); cached ones cost nothing. In workers,
    an item that fails (or whose worker dies: ``flatlib.runner.pool``) does not stop the others; then
    ``flatlib.runner.pool.PoolError`` lists the failed items with their causes."""
    measure, path = _kind(kind)
    if workers < 1 or threads_per_worker < 1:
        raise ValueError("workers, threads_per_worker: expected >= 1")
    results: list[dict[str, Any] | None] = [None] * len(items)
    todo = []
    for index, (run, step, kwargs) in enumerate(items):
        results[index] = read_cached(path(run, step, protocol, **kwargs))
        if results[index] is None:
            todo.append(index)
    shown = progress.start(f"measuring ({kind})", len(todo), "measurements", skipped=len(items) - len(todo))
    if workers == 1:
        # at the workers' thread count, whatever this process's: float reductions differ at ~1e-9 with it,
        # and a resumed measurement must be the number an uninterrupted run would have cached
        with _threads(threads_per_worker):
            for index in todo:
                run, step, kwargs = items[index]
                results[index] = measure(run, step, protocol=protocol, **kwargs)
                shown.advance()
    elif todo:  # even one left goes to a worker, at the same thread count as the others'
        # the widest models first (a measurement's cost grows with the width: 6 s at 16, 60 s at 128 on the
        # cpu profile), so that no long one starts last while the other workers idle;
        # results keep the items' order
        todo.sort(key=lambda i: -items[i][0].config["model"]["d_model"])
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


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measurement_row(m: dict[str, Any]) -> dict[str, Any]:
    """A flat table row of a ``measure_checkpoint`` result: gap, gap_se, trace, trace_se,
    invariant_trace, invariant_trace_se, trace_body (with the full gauge also invariant_trace_layernorm,
    the LayerNorm-only minimum), ``acc <task>`` and ``acc <task> ci95`` (the standard probe), with probe
    protocol 2 ``l2 <task>``, the L2 strength it chose (``flatlib.tools.report`` lists the choices at an
    edge of the grid), and ``acc <task> [<probe>]`` for the extra probes."""
    row = {key: m[key]
           for key in ("val_loss", "val_optimum", "gap", "gap_se", "trace", "trace_se") if key in m}
    row.update({key: m[key] for key in ("invariant_trace", "invariant_trace_se", "trace_body",
                                        "invariant_trace_layernorm") if key in m})
    for task, probe in m["probes"].items():
        row[f"acc {task}"], row[f"acc {task} ci95"] = probe["accuracy"], probe["ci95"]
    for task, probe in m["probes"].items():
        if "l2" in probe:  # protocol 2's one chosen strength
            row[f"l2 {task}"] = probe["l2"]
    for kind, tasks in m.get("extra_probes", {}).items():
        for task, probe in tasks.items():
            row[f"acc {task} [{kind}]"] = probe["accuracy"]
    return row


def measurement_frame(labels: list[dict[str, Any]], measured: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per measured model: its label (e.g. language, seed, what it is), then
    ``measurement_row`` of its measurement."""
    if len(labels) != len(measured):
        raise ValueError(f"labels, measured: expected one label per measurement, got {len(labels)} and "
                         f"{len(measured)}")
    return pd.DataFrame([{**label, **measurement_row(m)} for label, m in zip(labels, measured)])
