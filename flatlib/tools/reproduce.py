"""Run every notebook in order through papermill: ``python -m flatlib.tools.reproduce --profile cpu``.

Executed copies go to ``build/<profile>/`` (with ``<name>.kernel.log``, what the notebook's kernel
and its worker processes wrote to stderr); figures are written by the notebooks themselves (see
``flatlib.plots.style.figures_dir``). A notebook that fails is reported with its error, its partial
copy is kept beside the last good one as ``<name>.failed.ipynb``, and the others still run.
Afterwards the claims report (``REPORT.md`` in the profile's figures folder) is written from what the
notebooks recorded (``flatlib.tools.report``), with every notebook's status and wall time, and the
regenerated CSVs and claims are compared with the committed ones (``flatlib.tools.compare``).

Each notebook gets the parameter ``profile``; a notebook whose ``parameters`` cell does not define it
fails before it runs (``flatlib.tools.script.check_parameters``), and papermill's "Passed unknown parameter"
warning is an error while it runs (papermill would run the notebook on its defaults). A damaged file
of the claims folder (a truncated claims JSON or ``_runs.json``) is named, left out of the report and
the comparison, which are written from everything else, and makes the exit status 1.

While a notebook runs, the terminal shows what it is doing (``flatlib.runner.progress``): a line when a
phase (training runs, measuring checkpoints) starts or ends, and a status line (runs or measurements
done / total, the time left in the phase and, from the notebook's last good wall time, in the
notebook) at most every 30 s, or rewritten in place on a terminal. Ctrl-C stops it with a message
saying what was running and that nothing finished is lost (the run store keeps every finished run
and measurement, so a rerun resumes), and exit status 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatlib.plots.style import REPO_ROOT, figures_dir
from flatlib.profiles import PROFILES
from flatlib.runner import progress
from flatlib.runner.census import forecast
from flatlib.tools.report import DamagedFileError, claims_dir, damaged_files, record_runs, write_report
from flatlib.tools.script import UnknownParameterError, check_parameters, execute_in_subprocess

NOTEBOOKS = REPO_ROOT / "notebooks"


@dataclass
class NotebookResult:
    notebook: str
    ok: bool
    seconds: float
    error: str = ""


class Interrupted(Exception):
    """Ctrl-C while ``notebook`` ran: ``results`` of the notebooks finished before it, ``status`` the
    last progress it reported (or None)."""

    def __init__(self, notebook: str, seconds: float, results: list[NotebookResult], left: list[str],
                 status: dict[str, Any] | None) -> None:
        super().__init__(f"interrupted while running {notebook}")
        (self.notebook, self.seconds, self.results, self.left,
         self.status) = notebook, seconds, results, left, status


@contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Point file descriptor 2 at ``path`` for the block: the kernel (and its pool workers) inherit
    it, so their own messages (ipykernel's warnings, a traceback when the kernel is shut down on
    Ctrl-C) go to that log instead of between the progress lines."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2: nothing to redirect
        yield
        return
    try:
        with open(path, "ab") as log:
            os.dup2(log.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the block (the notebook's kernel inherits the environment)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class _UnknownParameterFilter(logging.Filter):
    """Turns papermill's "Passed unknown parameter: x" warning into ``UnknownParameterError``."""

    def __init__(self, notebook: str) -> None:
        super().__init__()
        self.notebook = notebook

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Passed unknown parameter"):
            raise UnknownParameterError(f"{self.notebook}: papermill: {message} (not assigned in the "
                                        "notebook's 'parameters' cell: papermill would run the notebook on "
                                        "its defaults)")
        return True


@contextmanager
def unknown_parameters_are_errors(notebook: str) -> Iterator[None]:
    """Within the block, papermill's warning that it passed ``notebook`` a parameter the notebook does
    not define raises ``UnknownParameterError`` (out of ``papermill.execute_notebook``, before it runs)."""
    logger, refuse = logging.getLogger("papermill"), _UnknownParameterFilter(notebook)
    logger.addFilter(refuse)
    try:
        yield
    finally:
        logger.removeFilter(refuse)


def run_notebooks(profile: str, out_dir: Path, only: list[str] | None = None, kernel: str = "python3",
                  execute: Callable[..., Any] | None = None, interval: float = 30.0) -> list[NotebookResult]:
    """Execute ``notebooks/*.ipynb`` (sorted, or those whose names contain one of ``only``) with
    ``profile`` injected as a parameter, showing their progress (see the module; ``interval``: the
    seconds between status lines when stdout is not a terminal). Returns one result per notebook;
    raises ``Interrupted`` on Ctrl-C. ``execute``: ``papermill.execute_notebook`` (the tests pass a
    stub)."""
    if execute is None:
        import papermill  # imported here: importing flatlib must not need Jupyter

        execute = papermill.execute_notebook
    if profile not in PROFILES:
        raise ValueError(f"profile: unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(key in p.name for key in only)]
    last = progress.last_wall_times(claims_dir(profile) / "_runs.json")
    if not only and (line := forecast(profile)) is not None:  # the whole story's time, before it starts
        print(line, flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="flatlib-progress-") as folder:
        for k, path in enumerate(paths):
            target = out_dir / path.name
            partial = out_dir / f"{path.stem}.failed.ipynb"
            status = Path(folder) / f"{path.stem}.json"
            log = out_dir / f"{path.stem}.kernel.log"
            log.unlink(missing_ok=True)
            before = (f"; its last good run took {progress.minutes(last[path.stem])}"
                      if path.stem in last else "")
            print(f"[{profile}] {path.name} ... (notebook {k + 1} of {len(paths)}{before})", flush=True)
            printer = progress.Printer(f"[{profile}] {path.stem}", interval=interval,
                                       last_seconds=last.get(path.stem))
            start = time.perf_counter()
            try:
                check_parameters(json.loads(path.read_text()), {"profile": profile}, path)
                with _environ(progress.ENV, str(status)), _stderr_to(log), \
                        progress.Monitor(status, printer), unknown_parameters_are_errors(str(path)):
                    execute(str(path), str(partial), parameters={"profile": profile}, kernel_name=kernel,
                            cwd=str(NOTEBOOKS), progress_bar=False)
            except KeyboardInterrupt:
                # nbclient leaves the interrupted cell's task behind, failed; asyncio would log it with
                # a long traceback when it is collected (the message below says what happened)
                logging.getLogger("asyncio").disabled = True
                raise Interrupted(path.name, time.perf_counter() - start, results,
                                  [p.name for p in paths[k + 1:]],
                                  progress.read_status(status) or printer.status) from None
            except Exception as error:  # noqa: BLE001 - report every failure, then go on
                message = str(error).strip().splitlines()
                results.append(NotebookResult(path.name, False, time.perf_counter() - start,
                                              " ".join(message[-3:])[:2000]))
                print(f"[{profile}] {path.name} FAILED: {results[-1].error}", flush=True)
                if log.exists() and log.stat().st_size:
                    print(f"[{profile}] the kernel's own messages (stderr): {log}", flush=True)
                continue
            partial.replace(target)  # only a complete run replaces the last good copy
            results.append(NotebookResult(path.name, True, time.perf_counter() - start))
            print(f"[{profile}] {path.name} ok ({progress.minutes(results[-1].seconds)}, "
                  f"{results[-1].seconds:.0f} s)", flush=True)
    return results


def interrupted_message(stop: Interrupted, profile: str, out_dir: Path) -> str:
    """What a person who pressed Ctrl-C is told: what was running, what is kept, how to resume."""
    from flatlib.runner.runs import RunStore  # noqa: PLC0415

    s = stop.status
    doing = ""
    if s and "phase" in s:
        doing = (f"; it was {s['phase']}, {s['done']}/{s['total']} {s['unit']} done" if not s.get("finished")
                 else f"; its last phase, {s['phase']}, had ended")
    lines = [f"\nInterrupted (Ctrl-C): {stop.notebook} had run for {progress.minutes(stop.seconds)}{doing}."]
    if stop.results:
        lines.append("Finished before it: " + ", ".join(f"{r.notebook} ({'ok' if r.ok else 'FAILED'})"
                                                       for r in stop.results) + ".")
    if stop.left:
        lines.append("Not started: " + ", ".join(stop.left) + ".")
    partial = out_dir / f"{Path(stop.notebook).stem}.failed.ipynb"
    if partial.exists():
        lines.append(f"Its partly executed copy: {partial}.")
    lines.append(f"Nothing finished is lost: every finished run and measurement is kept in the run store "
                 f"({RunStore().root}), and rerunning `python -m flatlib.tools.reproduce --profile "
                 f"{profile}` resumes from it (a run cut short starts again from its last checkpoint, if it "
                 "had one).")
    return "\n".join(lines)


def main(argv: list[str] | None = None, execute: Callable[..., Any] | None = None) -> int:
    """The command line (see the module); ``execute`` as in ``run_notebooks``. Returns the exit
    status: 0 if every notebook ran, 1 if one failed or a file of the claims folder is damaged, 130 on
    Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument("--out", type=Path, default=None, help="folder for executed notebooks")
    parser.add_argument("--only", nargs="*", help="run only notebooks whose names contain these")
    parser.add_argument("--runner", choices=("papermill", "script"), default="papermill",
                        help="papermill (a Jupyter kernel), or script: flatlib.tools.script in a fresh "
                             "Python process, for a machine without Jupyter (scripts/gpu_story.sh)")
    parser.add_argument("--report-only", action="store_true",
                        help="run no notebook: rewrite the claims report from what the notebooks recorded")
    args = parser.parse_args(argv)
    if args.report_only:
        report = write_report(args.profile, PROFILES[args.profile], moved_verdicts(args.profile))
        damaged = damaged_files(args.profile)
        print(f"claims report: {report}"
              + (f" (without what the {len(damaged)} damaged file(s) held)" if damaged else ""))
        return 1 if damaged else 0
    if execute is None and args.runner == "script":
        execute = execute_in_subprocess
    out_dir = args.out or REPO_ROOT / "build" / args.profile
    try:
        return _run(args.profile, out_dir, args.only, execute)
    except Interrupted as stop:
        print(interrupted_message(stop, args.profile, out_dir), file=sys.stderr, flush=True)
        if stop.results:  # the notebooks that did finish keep their status and wall time
            try:
                record_runs(args.profile, [vars(r) for r in stop.results])
            except DamagedFileError as error:
                print(f"DAMAGED: {error}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:  # after the notebooks: writing the report or comparing
        print("\nInterrupted (Ctrl-C) after the notebooks had run; rerun the command to write the claims "
              "report (finished runs and measurements are kept in the run store).", file=sys.stderr,
              flush=True)
        return 130


def _run(profile: str, out_dir: Path, only: list[str] | None, execute: Callable[..., Any] | None) -> int:
    results = run_notebooks(profile, out_dir, only, execute=execute)
    if not results:
        print("no notebooks found", file=sys.stderr)
        return 1
    damaged = []
    try:
        record_runs(profile, [vars(r) for r in results])
    except DamagedFileError as error:  # recorded in a fresh file all the same
        damaged.append(error)
    # leaves out, and lists, the claims files it cannot read; lists the verdicts that moved
    report = write_report(profile, PROFILES[profile], moved_verdicts(profile))
    damaged += damaged_files(profile)
    total = sum(r.seconds for r in results)
    print(f"\n{'notebook':40s} {'status':8s} {'seconds':>8s}")
    for r in results:
        print(f"{r.notebook:40s} {'ok' if r.ok else 'FAILED':8s} {r.seconds:8.0f}")
    print(f"{'total':40s} {'':8s} {total:8.0f}")
    print(f"claims report: {report}" + (f" (without what the {len(damaged)} damaged file(s) below held)"
                                        if damaged else ""))
    for error in damaged:
        print(f"!! DAMAGED: {error}")
    print_comparison(profile)
    return 0 if all(r.ok for r in results) and not damaged else 1


def moved_verdicts(profile: str) -> tuple[str, list[tuple[str, str, str, str]]] | None:
    """``(against, [(notebook, claim, before, now)])``: the recorded verdicts that differ from those
    committed at HEAD (``flatlib.tools.compare``), for the report; None when the comparison cannot run (not a
    git checkout...), which must not fail the figures."""
    try:
        from flatlib.tools.compare import compare  # noqa: PLC0415 - compare imports the report

        comparison = compare(figures_dir(profile))
        against = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                 text=True, timeout=10, check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - see the docstring
        return None
    return f"commit {against}", [(v.notebook, v.claim, v.ref, v.new) for v in comparison.verdicts]


def print_comparison(profile: str) -> None:
    """Print how the regenerated figures differ from the committed ones (``flatlib.tools.compare``).
    Informative only: a comparison that cannot run (not a git checkout...) must not fail the figures."""
    print(f"\n== the regenerated figures against the committed ones "
          f"(python -m flatlib.tools.compare --profile {profile})")
    try:
        from flatlib.tools.compare import compare, format_comparison  # noqa: PLC0415

        print(format_comparison(compare(figures_dir(profile))), flush=True)
    except Exception as error:  # noqa: BLE001 - see the docstring
        print(f"comparison skipped: {type(error).__name__}: {error}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
