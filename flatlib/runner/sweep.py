"""Run a list of pre-training configs through the run store: serially, in a local process pool,
or as a Slurm job array through submitit.

On this kind of machine two single-threaded processes beat one two-threaded process (bench/train.py:
about 1.2x, and far more robust to other load), so ``backend="local"`` starts ``workers``
processes with one thread each. ``backend="submitit"`` submits one array job per sweep
(``submitit.AutoExecutor``; ``cluster="slurm"`` on a cluster, ``cluster="local"`` to run the same
path without Slurm, as the tests do); the store must be on a file system the nodes share. submitit
keeps each job's function and arguments as pickles in ``<store>/submitit``, which the cluster
nodes unpickle and execute: only people who may run code as you should be able to write there. Every
config's run lands in the same store whichever backend ran it; finished runs are skipped at no
cost, and a failing config is reported with its config without losing the others.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flatlib.runner import progress as _progress
from flatlib.runner.pool import run_jobs
from flatlib.runner.runs import Run, RunStore
from flatlib.training.train import PretrainConfig, pretrain


@dataclass
class SweepResult:
    config: PretrainConfig
    run: Run | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.run is not None


BACKENDS = ("serial", "local", "submitit")


def _submit(jobs: list[tuple[dict, str, int]], store: RunStore, cluster: str, slurm: dict[str, Any],
            on_done: Callable[[], None]) -> list[tuple[str, str]]:
    import submitit  # imported here: only this backend needs it

    executor = submitit.AutoExecutor(folder=store.root / "submitit" / "%j", cluster=cluster)
    executor.update_parameters(**{"timeout_min": 60, **slurm})
    submitted = executor.map_array(_run_one, jobs)
    outcomes = []
    for job in submitted:  # in submission order; each result waits for its job
        try:
            outcomes.append(job.result())
        except Exception as error:  # noqa: BLE001 - a job that died outside pretrain (time limit...)
            outcomes.append(("", f"job {job.job_id}: {error}"))
        on_done()
    return outcomes


class SweepError(RuntimeError):
    """Some configs failed; ``results`` holds every config's outcome (finished runs are kept)."""

    def __init__(self, results: list[SweepResult]) -> None:
        self.results = results
        failed = [r for r in results if not r.ok]
        lines = [f"{len(failed)} of {len(results)} configs failed:"]
        lines += [f"- {r.config.key} {r.config.to_dict()}:\n{r.error}" for r in failed]
        super().__init__("\n".join(lines))


def _run_one(args: tuple[dict, str, int]) -> tuple[str, str]:
    """Train one config with ``threads`` threads (every backend: the count changes results at ~1e-9
    and each run records it), leaving the caller's thread count as it was (the serial backend)."""
    config_dict, root, threads = args
    caller = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run = pretrain(PretrainConfig.from_dict(config_dict), RunStore(root), progress=False)
        return str(run.dir), ""
    except Exception:  # noqa: BLE001 - reported with its config by the parent
        return "", traceback.format_exc(limit=6)
    finally:
        torch.set_num_threads(caller)


def training_cost(config: PretrainConfig) -> float:
    """A run's cost up to a constant, for ordering only: steps x sentences a step x the weights a token
    meets (``n_layer (4 d^2 + 2 d d_ff)``), twice for an adversarial run (its head refits; measured
    ~2x a plain step, ``bench.costs``)."""
    m = config.model
    per_token = m["n_layer"] * (4 * m["d_model"] ** 2 + 2 * m["d_model"] * m["d_ff"])
    return config.steps * config.batch_size * per_token * (2.0 if config.adversarial is not None else 1.0)


def training_waves(configs: list[PretrainConfig], store: RunStore) -> list[list[PretrainConfig]]:
    """The unfinished runs among ``configs`` and their unfinished ancestors (``init_from``, listed
    or not), each once, in waves: wave 0 continues nothing unfinished, wave k continues a run of
    wave k - 1. Training the waves in order, each in parallel, never trains one run twice at once
    (a child's ``pretrain`` would otherwise train a missing parent itself, in every worker that
    needs it). Within a wave the costliest runs come first (``training_cost``; ties keep their
    order): the workers take jobs in order, so a long run started last would leave the others idle
    while it finishes. The order changes no number: a run is a function of its config."""
    depth: dict[str, int] = {}
    runs: dict[str, PretrainConfig] = {}

    def place(config: PretrainConfig) -> int | None:  # its wave, or None if it is finished
        if config.key in depth:
            return depth[config.key]
        if store.is_finished(config.to_dict()):
            return None
        parent = config.parent()
        above = None if parent is None else place(parent)
        depth[config.key], runs[config.key] = (0 if above is None else above + 1), config
        return depth[config.key]

    for config in configs:
        place(config)
    waves: list[list[PretrainConfig]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for key, wave in depth.items():
        waves[wave].append(runs[key])
    return [sorted(wave, key=training_cost, reverse=True) for wave in waves]


def run_configs(configs: list[PretrainConfig], store: RunStore | None = None, backend: str = "serial",
                workers: int = 2, threads_per_worker: int = 1, progress: bool = True,
                raise_on_error: bool = True, cluster: str = "slurm",
                slurm: dict[str, Any] | None = None) -> list[SweepResult]:
    """Train every config (in order for ``"serial"``; ``workers`` processes for ``"local"``; a job
    array for ``"submitit"``, with ``slurm`` = ``AutoExecutor.update_parameters`` keyword arguments,
    e.g. ``{"slurm_partition": "gpu", "gpus_per_node": 1, "timeout_min": 120}``; its logs go to
    ``<store>/submitit``).

    Configs that continue another run (``init_from``) are fine in any order: an unfinished parent
    (listed or not) is trained first, in an earlier wave of its own (``training_waves``), so that
    no two workers ever train the same run. Returns one result per config (same order); raises
    ``SweepError`` after all have run if any failed (unless ``raise_on_error=False``). Configs whose
    run is already finished in the store are looked up in this process, whatever the backend; the
    others count as the phase "training" of ``flatlib.runner.progress``.
    """
    store = store or RunStore()
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if workers < 1 or threads_per_worker < 1:
        raise ValueError("workers, threads_per_worker: expected >= 1")
    bar = tqdm(total=len(configs), desc="sweep", disable=not progress)
    waves = training_waves(configs, store)
    trained: dict[str, tuple[str, str]] = {}  # run key -> (directory, error) of what this call trained

    def done() -> None:
        shown.advance()

    # finished runs are just looked up (pretrain returns them at once), here: only the others take
    # time, and only they count in the progress shown by flatlib.tools.reproduce (flatlib.runner.progress)
    todo = sum(len(wave) for wave in waves)
    with _progress.start("training", todo, "runs", skipped=len({c.key for c in configs}) - todo) as shown:
        for wave in waves:
            jobs = [(c.to_dict(), str(store.root), threads_per_worker) for c in wave]
            if backend == "submitit":
                outcomes = _submit(jobs, store, cluster, slurm or {}, done)
            elif backend == "serial" or workers == 1 or len(jobs) <= 1:
                outcomes = []
                for job in jobs:
                    outcomes.append(_run_one(job))
                    done()
            else:
                # spawned workers; a worker that dies (SIGKILL, out of memory) fails only its own config
                outcomes = [o.value if o.ok else ("", o.error)
                            for o in run_jobs(_run_one, jobs, workers, on_done=done)]
            trained.update({c.key: outcome for c, outcome in zip(wave, outcomes)})
    outcomes = []
    for c in configs:
        if c.key not in trained:  # finished before this call
            trained[c.key] = _run_one((c.to_dict(), str(store.root), threads_per_worker))
        outcomes.append(trained[c.key])
        bar.update(1)
    bar.close()
    results = []
    for config, (directory, error) in zip(configs, outcomes):
        run = Run(Path(directory), config.to_dict()) if directory else None
        results.append(SweepResult(config, run, error))
    if raise_on_error and any(not r.ok for r in results):
        raise SweepError(results)
    return results
