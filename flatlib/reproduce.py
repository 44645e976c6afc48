"""Run every notebook in order through papermill: ``python -m flatlib.reproduce --profile cpu``.

Executed copies go to ``build/<profile>/``; figures are written by the notebooks themselves (see
``flatlib.plotting.figures_dir``). A notebook that fails is reported with its error, its partial
copy is kept beside the last good one as ``<name>.failed.ipynb``, and the others still run.
Afterwards the claims report (``REPORT.md`` in the profile's figures folder) is written from what the
notebooks recorded (``flatlib.report``), with every notebook's status and wall time, and the
regenerated CSVs and claims are compared with the committed ones (``flatlib.compare``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flatlib.plotting import REPO_ROOT, figures_dir
from flatlib.profiles import PROFILES
from flatlib.report import record_runs, write_report

NOTEBOOKS = REPO_ROOT / "notebooks"


@dataclass
class NotebookResult:
    notebook: str
    ok: bool
    seconds: float
    error: str = ""


def run_notebooks(profile: str, out_dir: Path, only: list[str] | None = None,
                  kernel: str = "python3") -> list[NotebookResult]:
    """Execute ``notebooks/*.ipynb`` (sorted, or those whose names contain one of ``only``) with
    ``profile`` injected as a parameter. Returns one result per notebook."""
    import papermill  # imported here: importing flatlib must not need Jupyter

    if profile not in PROFILES:
        raise ValueError(f"profile: unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(key in p.name for key in only)]
    results = []
    for path in paths:
        target = out_dir / path.name
        partial = out_dir / f"{path.stem}.failed.ipynb"
        start = time.perf_counter()
        print(f"[{profile}] {path.name} ...", flush=True)
        try:
            papermill.execute_notebook(str(path), str(partial), parameters={"profile": profile},
                                       kernel_name=kernel, cwd=str(NOTEBOOKS), progress_bar=False)
        except Exception as error:  # noqa: BLE001 - report every failure, then go on
            message = str(error).strip().splitlines()
            results.append(NotebookResult(path.name, False, time.perf_counter() - start,
                                          " ".join(message[-3:])[:2000]))
            print(f"[{profile}] {path.name} FAILED: {results[-1].error}", flush=True)
            continue
        partial.replace(target)  # only a complete run replaces the last good copy
        results.append(NotebookResult(path.name, True, time.perf_counter() - start))
        print(f"[{profile}] {path.name} ok ({results[-1].seconds:.0f} s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument("--out", type=Path, default=None, help="folder for executed notebooks")
    parser.add_argument("--only", nargs="*", help="run only notebooks whose names contain these")
    args = parser.parse_args(argv)
    out_dir = args.out or REPO_ROOT / "build" / args.profile
    results = run_notebooks(args.profile, out_dir, args.only)
    if not results:
        print("no notebooks found", file=sys.stderr)
        return 1
    record_runs(args.profile, [vars(r) for r in results])
    report = write_report(args.profile)
    total = sum(r.seconds for r in results)
    print(f"\n{'notebook':40s} {'status':8s} {'seconds':>8s}")
    for r in results:
        print(f"{r.notebook:40s} {'ok' if r.ok else 'FAILED':8s} {r.seconds:8.0f}")
    print(f"{'total':40s} {'':8s} {total:8.0f}")
    print(f"claims report: {report}")
    print_comparison(args.profile)
    return 0 if all(r.ok for r in results) else 1


def print_comparison(profile: str) -> None:
    """Print how the regenerated figures differ from the committed ones (``flatlib.compare``).
    Informative only: a comparison that cannot run (not a git checkout...) must not fail the figures."""
    print(f"\n== the regenerated figures against the committed ones "
          f"(python -m flatlib.compare --profile {profile})")
    try:
        from flatlib.compare import compare, format_comparison  # noqa: PLC0415

        print(format_comparison(compare(figures_dir(profile))), flush=True)
    except Exception as error:  # noqa: BLE001 - see the docstring
        print(f"comparison skipped: {type(error).__name__}: {error}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
