"""Run jobs in spawned worker processes without hanging when a worker dies.

``multiprocessing.Pool.imap`` waits forever for the result of a task whose worker was killed
(SIGKILL, the out-of-memory killer). ``concurrent.futures.ProcessPoolExecutor`` instead fails every
unfinished future with ``BrokenProcessPool``; ``run_jobs`` builds on that:

* a job that raises is reported with its traceback, and the others go on;
* when a worker dies, the jobs that had not started are resubmitted to a fresh pool, and each job
  that was running at the time (the one that killed its worker, and innocent ones the executor
  stopped with it) is run once more *alone*: a job that kills its worker alone is reported failed
  with the cause, one that died only by accident (two big jobs out of memory together) finishes.

Every job finishes or fails; the call always returns. Workers die with the process that started
them (``die_with_parent``), so a killed notebook kernel leaves no orphan computing. Workers are spawned (fork
would copy torch's thread pools and locks). Used by ``flatlib.runner.sweep.run_configs(backend="local")`` and
``flatlib.measurement.measure.measure_many``.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from flatlib.runner.progress import ENV

WORKER_DIED = ("its worker process died (killed by a signal, e.g. SIGKILL or the out-of-memory "
               "killer) twice, the second time running alone")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_started: Any = None  # in a worker: the queue on which it announces each job it starts


class PoolError(RuntimeError):
    """Some jobs failed (the message lists each with its cause); the others finished."""


@dataclass
class Outcome:
    """One job's result: ``value``, or ``error`` (a traceback or the cause of a worker's death)."""

    value: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def _init_worker(started: Any, parent: int) -> None:
    global _started
    _started = started
    # only the process that counts the jobs reports progress (flatlib.runner.progress)
    os.environ.pop(ENV, None)
    die_with_parent(parent)


def die_with_parent(parent: int) -> None:
    """Make this process end when ``parent`` does, even by SIGKILL (a kernel killed from JupyterLab,
    the out-of-memory killer), instead of computing on, orphaned, for minutes. On Linux the kernel
    sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread
    polls the parent's pid. Either way, a parent already gone by now ends this process at once."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="flatlib-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _call(function: Callable[[Any], Any], index: int, job: Any) -> Any:
    _started.put(index)  # a small pipe write: atomic, so a worker killed later cannot garble it
    return function(job)


def _run_pool(function: Callable[[Any], Any], jobs: list[Any], indices: list[int], workers: int,
              outcomes: list[Outcome | None], on_done: Callable[[], None]) -> tuple[list[int], list[int]]:
    """Run ``jobs[i]`` for ``i`` in ``indices`` in one pool, filling ``outcomes``. Returns the jobs
    lost to a dead worker: (those that had started, those that had not)."""
    context = mp.get_context("spawn")
    started = context.SimpleQueue()
    lost = []
    with ProcessPoolExecutor(min(workers, len(indices)), mp_context=context, initializer=_init_worker,
                             initargs=(started, os.getpid())) as pool:
        futures = {pool.submit(_call, function, i, jobs[i]): i for i in indices}
        for future in as_completed(futures):
            index = futures[future]
            try:
                outcomes[index] = Outcome(value=future.result())
            except BrokenProcessPool:
                lost.append(index)
                continue
            except Exception as error:  # noqa: BLE001 - reported with its job by the caller
                outcomes[index] = Outcome(error="".join(traceback.format_exception(error, limit=6)))
            on_done()
    began = set()
    while not started.empty():
        began.add(started.get())
    return [i for i in lost if i in began], [i for i in lost if i not in began]


def run_jobs(function: Callable[[Any], Any], jobs: list[Any], workers: int,
             on_done: Callable[[], None] = lambda: None) -> list[Outcome]:
    """``function(job)`` for every job in ``workers`` spawned processes; one ``Outcome`` per job,
    in order (see the module). ``function`` must be importable (a module-level function);
    ``on_done`` is called as each job ends (a progress bar)."""
    outcomes: list[Outcome | None] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    while pending:
        suspects, pending = _run_pool(function, jobs, pending, workers, outcomes, on_done)
        if not suspects and pending:  # a worker died before starting any job: suspect them all
            suspects, pending = pending, []
        for index in suspects:  # each alone: a job that kills its worker alone is the culprit
            if _run_pool(function, jobs, [index], 1, outcomes, on_done) != ([], []):
                outcomes[index] = Outcome(error=WORKER_DIED)
                on_done()
    return outcomes  # type: ignore[return-value]
