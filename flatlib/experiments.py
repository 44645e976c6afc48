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

from flatlib.downstream import linear_probe, lookup_table_features, model_features, pool
from flatlib.flatness import hessian_trace, mlm_batches, mlm_loss_fn
from flatlib.languages import HMM, Corpus, Language
from flatlib.runs import Run, atomic_write, canonical_json, config_hash
from flatlib.train import PretrainConfig, build_language, derived_seed, evaluate, load_model, validation_set


def continuation(base: PretrainConfig, from_step: int, steps: int, **overrides: Any) -> PretrainConfig:
    """A run that starts from ``base``'s checkpoint at ``from_step`` with a fresh optimizer and the
    given overrides (e.g. ``optimizer="sgd", lr=0.05``), for ``steps`` more steps. Warm-up and
    evaluation settings default to: no warm-up, a constant learning rate."""
    settings = {"warmup_steps": 0, "schedule": "constant", **overrides}
    return replace(base, steps=steps, init_from={"config": base.to_dict(), "step": from_step},
                   stop_gap=None, extra_steps=0, **settings)


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

    def key(self) -> str:
        return config_hash(asdict(self))


def probe_inputs(language: Language, corpus: Corpus, features: torch.Tensor, task: str) -> torch.Tensor:
    """The probe's input for ``task``: for an HMM state task, the representation at the task's
    position (the sensitive choice, PILOT.md); for a PCFG task, all positions concatenated (the
    paper's choice)."""
    if isinstance(language, HMM):
        return pool(features, corpus, "position", int(task.split("@")[1]))
    return pool(features, corpus, "concat")


def downstream_corpus(language_spec: dict[str, Any], n: int) -> Corpus:
    """The fixed corpus every probe of a language is trained and tested on."""
    language = build_language(language_spec)
    return language.sample(n, seed=derived_seed("downstream corpus", canonical_json(language_spec)))


def _probe(language: Language, corpus: Corpus, features: torch.Tensor, protocol: Protocol) -> dict[str, Any]:
    out = {}
    for task in protocol.tasks or language.tasks:
        labels = language.task_labels(corpus, task)
        result = linear_probe(probe_inputs(language, corpus, features, task), labels,
                              language.n_classes(task), protocol.probe_train, protocol.probe_test,
                              l2_grid=protocol.probe_l2_grid, n_splits=protocol.probe_splits,
                              seed=protocol.seed)
        out[task] = {"accuracy": result.accuracy, "ci95": result.ci95,
                     "splits": result.split_accuracies, "chosen_l2": result.chosen_l2,
                     "sweep": {str(k): v for k, v in result.sweep["test_accuracy"].items()}}
    return out


def measure_checkpoint(run: Run, step: int, protocol: Protocol = Protocol()) -> dict[str, Any]:
    """Gap to the exact optimum, probe accuracy per task (mean, 95% CI over resplits, the L2
    sweep) and the Hessian trace (± SE) of ``run``'s model at ``step``. Cached in the run."""
    path = run.dir / "evals" / f"{step:08d}_{protocol.key()}.json"
    if path.exists():
        return json.loads(path.read_text())
    config = PretrainConfig.from_dict(run.config)
    language = build_language(config.language)
    model = load_model(run, step)
    val = validation_set(config, language)
    gap = evaluate(model, val)
    corpus = downstream_corpus(config.language, protocol.probe_sentences)
    probes = _probe(language, corpus, model_features(model, corpus), protocol)
    # the trace of the Hessian of the *expected* single-mask loss at the first trace_pairs validation
    # contexts (targets = the exact conditionals): the sampled words' noise does not enter it
    n = min(protocol.trace_pairs, len(val.inputs))
    batches = mlm_batches((val.inputs[:n], val.positions[:n], val.targets[:n], val.true_probs[:n]),
                          protocol.trace_batch, soft_targets=True)
    trace = hessian_trace(model, mlm_loss_fn, batches, n_probes=protocol.trace_probes,
                          seed=derived_seed("trace probes", protocol.seed))
    result = {"run": run.key, "step": step, **gap, "trace": trace.mean, "trace_se": trace.stderr,
              "trace_description": trace.description, "probes": probes}
    atomic_write(path, json.dumps(result, indent=1))
    return result


def lookup_table_probe(language_spec: dict[str, Any], protocol: Protocol = Protocol()) -> dict[str, Any]:
    """The same probe on the exact conditionals (the paper's lookup table), plus each task's
    majority-class rate and, for HMM tasks, the exact Bayes accuracy."""
    language = build_language(language_spec)
    corpus = downstream_corpus(language_spec, protocol.probe_sentences)
    features = lookup_table_features(language, corpus).to(torch.float32)
    out = _probe(language, corpus, features, protocol)
    for task in out:
        labels = language.task_labels(corpus, task)
        labels = labels[labels >= 0]
        out[task]["majority"] = float(torch.bincount(labels).max()) / len(labels)
        if isinstance(language, HMM):
            bayes = language.bayes_accuracy(corpus, task)
            out[task]["bayes"], out[task]["bayes_se"] = bayes.mean, bayes.stderr
    return out


def _measure_one(args: tuple[str, dict[str, Any], int, dict[str, Any], int]) -> dict[str, Any]:
    directory, config, step, protocol, threads = args
    torch.set_num_threads(threads)
    fields = {**protocol, "probe_l2_grid": tuple(protocol["probe_l2_grid"])}
    if fields.get("tasks") is not None:
        fields["tasks"] = tuple(fields["tasks"])
    return measure_checkpoint(Run(Path(directory), config), step, Protocol(**fields))


def measure_checkpoints(checkpoints: list[tuple[Run, int]], protocol: Protocol = Protocol(),
                        workers: int = 1, threads_per_worker: int = 1) -> list[dict[str, Any]]:
    """``measure_checkpoint`` for every ``(run, step)`` of ``checkpoints`` (same order). Cached
    results are read at once; the others are measured in ``workers`` spawned processes with
    ``threads_per_worker`` threads each (on a 2-core machine two single-threaded processes beat one
    two-threaded one, as for training), or in this process when ``workers == 1``. The numbers are
    the same whichever way they were computed (each measurement is a function of the checkpoint and
    the protocol)."""
    if workers < 1 or threads_per_worker < 1:
        raise ValueError("workers, threads_per_worker: expected >= 1")
    results: list[dict[str, Any] | None] = [None] * len(checkpoints)
    todo = []
    for index, (run, step) in enumerate(checkpoints):
        path = run.dir / "evals" / f"{step:08d}_{protocol.key()}.json"
        if path.exists():
            results[index] = json.loads(path.read_text())
        else:
            todo.append(index)
    if workers == 1 or len(todo) <= 1:
        for index in todo:
            results[index] = measure_checkpoint(*checkpoints[index], protocol)
    else:
        import multiprocessing as mp  # noqa: PLC0415

        jobs = [(str(checkpoints[i][0].dir), checkpoints[i][0].config, checkpoints[i][1], asdict(protocol),
                 threads_per_worker) for i in todo]
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for index, result in zip(todo, pool.imap(_measure_one, jobs)):
                results[index] = result
    return results  # type: ignore[return-value]
