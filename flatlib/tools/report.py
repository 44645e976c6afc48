"""The claims report, figures/REPORT.md: what each notebook found, claim by claim.

Each notebook ends by recording its claims (``record_claims``): for every claim of the paper it
checks, the paper's number, ours at the profile (mean and CI), whether it held, and the notebook and
figure that show it. The claims are written next to the figures (``<figures>/claims/<notebook>.json``,
atomically), so they always come from the same computation as the figures beside them.
``flatlib.tools.reproduce`` records each notebook's status and wall time (``claims/_runs.json``) and then
calls ``write_report``, which assembles REPORT.md from those files. Nothing in the report is typed in
by hand: a notebook that failed keeps its last good claims, marked as such.

A file of the claims folder that cannot be read (truncated, hand-edited, a claim without its ``held``)
is a ``DamagedFileError`` naming the file, what is wrong and what to do. The report leaves such a file
out, lists it at the top, and reports everything else (``damaged_files`` says which are damaged).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from flatlib.claims import DESIGN_CHANGES, HELD, RULE_CHANGES, RULES, Claim
from flatlib.plots.style import REPO_ROOT, figures_dir


class DamagedFileError(ValueError):
    """A file of the claims folder that cannot be read as what it should be: ``path``, what is wrong
    with it (``problem``) and what to do (``remedy``), all three in the message."""

    def __init__(self, path: str | Path, problem: str, remedy: str) -> None:
        super().__init__(f"{path}: {problem}; {remedy}")
        self.path, self.problem, self.remedy = str(path), problem, remedy


def parse_claims(text: str, source: str | Path, remedy: str | None = None) -> dict[str, Any]:
    """A claims file's data (``record_claims``), checked for what every reader relies on: a JSON
    object whose ``claims`` is a list of objects, each with a non-empty ``claim`` text and its verdict
    ``held`` (a text; ``Claim`` checks its value). Raises ``DamagedFileError`` naming ``source``;
    ``remedy``: what to do about it (default: rerun the notebook or restore the file from git)."""
    remedy = remedy or (f"rerun its notebook ({Path(source).stem}), which records its claims again, or "
                        f"restore the committed file with `git checkout -- {source}`")
    try:
        data = json.loads(text)
    except ValueError as error:
        raise DamagedFileError(source, f"not valid JSON ({error}; truncated?)", remedy) from None
    if not isinstance(data, dict) or not isinstance(data.get("claims"), list):
        raise DamagedFileError(source, "expected a JSON object with a list 'claims'", remedy)
    if not isinstance(data.get("notebook", ""), str):
        raise DamagedFileError(source, f"'notebook' is {data['notebook']!r}, not a notebook name", remedy)
    for k, c in enumerate(data["claims"], 1):
        if not isinstance(c, dict) or not isinstance(c.get("claim"), str) or not c["claim"]:
            raise DamagedFileError(source, f"claim {k} has no 'claim' text", remedy)
        if not isinstance(c.get("held"), str):
            what = ("has no 'held' (its verdict)" if "held" not in c
                    else f"has 'held' = {c['held']!r}, not a verdict")
            raise DamagedFileError(source, f"claim {k} ({c['claim']!r}) {what}", remedy)
    return data


def read_runs(path: Path) -> dict[str, dict[str, Any]]:
    """``claims/_runs.json`` (``record_runs``): {notebook: {"ok", "seconds", "error", "when"[,
    "last_good"]}}, {} if there is none. Raises ``DamagedFileError`` naming the file."""
    if not path.exists():
        return {}
    remedy = (f"delete it (it holds only the notebooks' statuses and wall times; the next `python -m "
              f"flatlib.tools.reproduce` writes it again) or restore it with `git checkout -- {path}`")
    try:
        runs = json.loads(path.read_text())
    except ValueError as error:
        raise DamagedFileError(path, f"not valid JSON ({error}; truncated?)", remedy) from None
    if not isinstance(runs, dict):
        raise DamagedFileError(path, "expected a JSON object {notebook: its last run}", remedy)
    for name, r in runs.items():
        if not _is_run(r) or ("last_good" in r and not _is_run({"ok": True, "error": "", **r["last_good"]})):
            raise DamagedFileError(path, f"the entry of {name!r} is not {{'ok', 'seconds', 'error', 'when'"
                                         f"[, 'last_good']}}: {r!r}", remedy)
    return runs


def _is_run(r: object) -> bool:
    """Whether ``r`` is one notebook's entry of ``_runs.json``, with the types the report uses."""
    return (isinstance(r, dict) and isinstance(r.get("ok"), bool)
            and isinstance(r.get("seconds"), (int, float)) and not isinstance(r["seconds"], bool)
            and isinstance(r.get("when"), str) and isinstance(r.get("error"), str))


def claims_dir(profile: str) -> Path:
    return figures_dir(profile) / "claims"


def record_claims(profile: str, notebook: str, claims: list[Claim],
                  parameters: dict[str, Any] | None = None) -> Path:
    """Write ``notebook``'s claims at ``profile`` (replacing its previous ones), with the parameters
    the notebook ran with (seeds, languages, overrides: shown in the report). Returns the path."""
    if not notebook or "/" in notebook:
        raise ValueError("notebook: expected a notebook name like '02_pretraining_to_optimality', got "
                         f"{notebook!r}")
    for claim in claims:
        if not isinstance(claim, Claim):
            raise ValueError(f"claims: expected Claim objects, got {type(claim).__name__}")
    path = claims_dir(profile) / f"{notebook}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps({"notebook": notebook, "profile": profile, "parameters": parameters or {},
                                   "claims": [asdict(c) for c in claims]}, indent=1, default=str))
    return path


def load_claims(profile: str) -> dict[str, list[Claim]]:
    """Every recorded notebook's claims at ``profile``, by notebook name (sorted). Raises
    ``DamagedFileError`` for the first claims file that cannot be read."""
    loaded, damaged = _load(profile)
    if damaged:
        raise damaged[0]
    return {name: claims for name, (claims, _) in loaded.items()}


def _load(profile: str) -> tuple[dict[str, tuple[list[Claim], dict[str, Any]]], list[DamagedFileError]]:
    """The readable claims files' claims and parameters by notebook, and the damaged files."""
    out, damaged = {}, []
    for path in sorted(claims_dir(profile).glob("[0-9][0-9]_*.json")):
        try:
            data = parse_claims(path.read_text(), path)
            claims = [_claim(c, k, path) for k, c in enumerate(data["claims"], 1)]
        except DamagedFileError as error:
            damaged.append(error)
            continue
        out[data.get("notebook") or path.stem] = (claims, data.get("parameters", {}))
    return out, damaged


def _claim(fields: dict[str, Any], k: int, path: Path) -> Claim:
    try:
        return Claim(**fields)
    except (TypeError, ValueError) as error:  # an unknown field, a verdict not in HELD...
        raise DamagedFileError(path, f"claim {k} ({fields['claim']!r}): {error}",
                               f"rerun its notebook ({path.stem}), which records its claims again") from None


def damaged_files(profile: str) -> list[DamagedFileError]:
    """Every file of the claims folder at ``profile`` that cannot be read (claims, ``_runs.json``)."""
    damaged = _load(profile)[1]
    try:
        read_runs(claims_dir(profile) / "_runs.json")
    except DamagedFileError as error:
        damaged.append(error)
    return damaged


def record_runs(profile: str, results: list[dict[str, Any]]) -> Path:
    """Merge notebook results (``{"notebook", "ok", "seconds", "error"}``) into ``claims/_runs.json``:
    the latest status of every notebook at ``profile``; a failure does not erase the time of the
    last good run. If the file is damaged, it is kept as ``_runs.json.damaged``, ``results`` are
    written to a fresh ``_runs.json`` (earlier runs' times are only in the kept copy), and then
    ``DamagedFileError`` says so: the results are recorded either way."""
    path = claims_dir(profile) / "_runs.json"
    try:
        runs, damage = read_runs(path), None
    except DamagedFileError as error:
        runs, damage = {}, error
        kept = path.with_name(path.name + ".damaged")
        path.replace(kept)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for r in results:
        name = Path(r["notebook"]).stem
        previous = runs.get(name, {})
        entry = {"ok": bool(r["ok"]), "seconds": round(float(r["seconds"]), 1), "error": r.get("error", ""),
                 "when": now}
        if not r["ok"] and previous.get("ok"):
            entry["last_good"] = {k: previous[k] for k in ("seconds", "when")}
        elif not r["ok"] and "last_good" in previous:
            entry["last_good"] = previous["last_good"]
        runs[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(runs, indent=1, sort_keys=True))
    if damage is not None:
        raise DamagedFileError(path, damage.problem, f"kept as {kept}; this run's results are in a fresh "
                                                     f"{path.name}, without earlier runs' wall times (read "
                                                     "them in the kept copy, then delete it)")
    return path


def _atomic_write(path: Path, text: str) -> None:
    """``flatlib.runner.runs.atomic_write``, imported on use: the run store imports torch, which reading and
    rendering the report do not need."""
    from flatlib.runner.runs import atomic_write  # noqa: PLC0415

    atomic_write(path, text)


def machine_description() -> str:
    import torch  # noqa: PLC0415

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, {device}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_report(profile: str, parameters: dict[str, Any] | None = None,
                  moved: tuple[str, Sequence[tuple[str, str, str, str]]] | None = None) -> str:
    """REPORT.md's text at ``profile`` from the recorded claims and notebook runs. ``parameters``: the
    profile's parameters the notebooks ran with (``flatlib.profiles.get_profile(profile)``, as
    ``flatlib.tools.reproduce`` passes them), whose ``pretraining`` seeds, model and ε the header shows;
    without them the header names the profile only. ``moved``: ``(against, [(notebook, claim, before,
    after)])``, the verdicts that differ from the claims committed at ``against`` (``flatlib.tools.compare``,
    as ``flatlib.tools.reproduce`` passes them), listed in their own section; None leaves the section out."""
    recorded, damaged = _load(profile)
    claims = {name: items for name, (items, _) in recorded.items()}
    try:
        runs = read_runs(claims_dir(profile) / "_runs.json")
    except DamagedFileError as error:
        runs = {}
        damaged.append(error)
    pretraining = (parameters or {}).get("pretraining", {})
    settings = (f"training seeds per experiment {pretraining.get('seeds', '?')}, "
                f"model {pretraining.get('model', '?')}, ε = {pretraining.get('epsilon', '?')} nats; "
                if pretraining else "")
    total = sum(r["seconds"] for r in runs.values() if r["ok"])
    lines = [
        f"# Claims report · profile `{profile}`",
        "",
        "Generated by `python -m flatlib.tools.reproduce --profile " + profile + "` from what the notebooks "
        "recorded (`claims/*.json` beside the figures). Every number below was computed by the notebook "
        "named in its row; the paper's numbers are second-hand (docs/paper.md). \"held\" is decided by each "
        "notebook from its own numbers and confidence intervals, never typed in.",
        "",
        f"- machine: {machine_description()}",
        f"- commit: {_git_commit()}",
        (f"- profile `{profile}`: {settings}the notebooks' own parameters are printed in their executed "
         f"copies (`build/{profile}/`)"),
        f"- wall time of the notebooks' last good runs: {total / 60:.1f} min in total",
        "",
        *_damaged_lines(damaged, figures_dir(profile)),
        "## Notebooks",
        "",
        "| notebook | status | wall time | when |",
        "|---|---|---|---|",
    ]
    for name in sorted(set(runs) | set(claims)):
        r = runs.get(name)
        if r is None:
            lines.append(f"| {name} | claims recorded outside `reproduce` | | |")
            continue
        if r["ok"]:
            status = "ok"
        else:
            status = f"FAILED: {_cell(r['error'][:300])}"
            if "last_good" in r:
                status += f" (claims below are from the last good run, {r['last_good']['when']})"
        lines.append(f"| {name} | {status} | {r['seconds'] / 60:.1f} min | {r['when']} |")
    lines += ["", "## Claims", ""]
    counts = {h: 0 for h in HELD}
    for notebook, items in claims.items():
        lines += [f"### {notebook}", ""]
        if recorded[notebook][1]:
            lines += ["run with: " + ", ".join(f"{k} = `{v}`" for k, v in recorded[notebook][1].items()), ""]
        lines += ["| claim | paper | ours | held | figure |", "|---|---|---|---|---|"]
        for c in items:
            counts[c.held] += 1
            figure = f"[{c.figure}]({c.figure})" if c.figure else ""
            claim = _cell(c.claim) + (f" <br><sub>{_cell(c.detail)}</sub>" if c.detail else "")
            claim += (f" <br><sub>rule: {_cell(c.rule)}</sub>" if c.rule
                      else " <br><sub>rule: the notebook's own (before flatlib.claims)</sub>")
            lines.append(f"| {claim} | {_cell(c.paper)} | {_cell(c.ours)} | **{c.held}** | {figure} |")
        lines.append("")
    if not claims:
        lines.append("No notebook has recorded claims at this profile yet.")
    if moved is not None:
        lines += _moved_lines(*moved)
    protocol = (parameters or {}).get("pretraining", {}).get("protocol", {})
    lines += l2_edge_lines(figures_dir(profile), protocol.get("probe_l2_grid")
                           if protocol.get("probe_version") == 2 else None)
    lines += ["## Decision rules", "", "Declared in `flatlib/claims.py` (tested in `tests/test_claims.py`) "
              "before the experiments they judge:", ""]
    lines += [f"- **{name}**: {text}" for name, text in RULES.items()]
    lines += _changes("Changes of a rule after results it judges were seen:", "rule", RULE_CHANGES)
    lines += _changes("Changes of what is run or measured (not of a rule), made or considered after results "
                      "they affect were seen:", "what", DESIGN_CHANGES)
    lines.insert(lines.index("## Damaged files" if damaged else "## Notebooks"),
                 "In short: " + ", ".join(f"{n} {h}" for h, n in counts.items() if n)
                 + " (claims: held / not held / partly / inconclusive / not tested at this profile).\n")
    return "\n".join(lines) + "\n"


def l2_edge_lines(folder: Path, grid: Sequence[float] | None) -> list[str]:
    """The report's section on probe protocol 2's L2 choices at an edge of ``grid``: for every table
    ``<folder>/*.csv`` with ``l2 <task>`` columns (``flatlib.measurement.measure.measurement_row``,
    ``flatlib.analysis.size.measurement_table``), how many (model, task) choices it holds and how many sit
    at the grid's lower or upper edge, by language and task. Empty when ``grid`` is None (no protocol-2
    grid in the profile) or no table records a choice."""
    import pandas as pd  # noqa: PLC0415 - the report itself needs no pandas

    from flatlib.measurement.downstream import grid_edge  # noqa: PLC0415 - imports torch: only here

    if grid is None or len(set(grid)) < 2:  # no grid, or one fixed strength: nothing is chosen
        return []
    rows = []
    for path in sorted(folder.glob("*.csv")):
        try:
            table = pd.read_csv(path)
        except (OSError, ValueError) as error:  # a damaged table must not cost the rest of the report
            rows.append(f"| {path.name} | could not be read: {_cell(str(error)[:200])} | | | |")
            continue
        columns = [c for c in table.columns if c.startswith("l2 ")]
        if not columns:
            continue
        edges = {"lower": {}, "upper": {}}
        choices = 0
        for column in columns:
            values = pd.to_numeric(table[column], errors="coerce")  # a cell that is not a number: no choice
            for language, value in zip(table.get("language", [""] * len(table)), values):
                if pd.isna(value):
                    continue
                choices += 1
                edge = grid_edge(grid, float(value))
                if edge is not None:
                    where = f"{language} {column[3:]}".strip()
                    edges[edge][where] = edges[edge].get(where, 0) + 1
        where = "; ".join(f"{edge}: " + ", ".join(f"{k} {n}" for k, n in found.items())
                          for edge, found in edges.items() if found)
        rows.append(f"| {path.name} | {choices} | {sum(edges['lower'].values())} | "
                    f"{sum(edges['upper'].values())} | {where or 'none'} |")
    if not rows:
        return []
    intro = ("Probe protocol 2 chooses one L2 strength per model and task on the pooled validation splits, "
             f"from the grid {min(grid):g} .. {max(grid):g}. A choice at an edge means the validation "
             "optimum may lie beyond the grid, so that probe's accuracy may fall short of what a longer grid "
             "would give. Counted in the measurement tables beside the figures (a model measured for two "
             "notebooks counts in both):")
    header = ("| table | choices (model, task) | at the lower edge | at the upper edge "
              "| where (language task: count) |")
    return ["## The probe's L2 at the grid's edge", "", intro, "", header, "|---|---|---|---|---|", *rows, ""]


def _moved_lines(against: str, changes: Sequence[tuple[str, str, str, str]]) -> list[str]:
    """The report's section on the verdicts that differ from those committed at ``against``."""
    lines = [f"## Verdicts that moved against the committed figures ({against})", ""]
    if not changes:
        return lines + ["None: every claim recorded at both has the same verdict.", ""]
    lines += [f"{len(changes)} verdict(s) differ from those committed at {against} (`python -m "
              "flatlib.tools.compare`). Why: the rule and design changes in the tables at the end, those "
              "dated after that commit; a claim added or removed reads \"(absent)\" on the side that lacks "
              "it.", "", "| notebook | claim | before | now |", "|---|---|---|---|"]
    lines += [f"| {_cell(n)} | {_cell(c)} | {_cell(b)} | **{_cell(a)}** |" for n, c, b, a in changes]
    return lines + [""]


def _damaged_lines(damaged: list[DamagedFileError], folder: Path) -> list[str]:
    """The report's list of the files it had to leave out, by their path in the figures folder."""
    if not damaged:
        return []
    lines = ["## Damaged files", "", "These files could not be read; what they held is missing below:", ""]
    for error in damaged:
        path = Path(error.path)
        shown = path.relative_to(folder).as_posix() if path.is_relative_to(folder) else error.path
        lines.append(f"- **`{shown}`**: {_cell(error.problem)}; {_cell(error.remedy)}")
    return lines + [""]


def _changes(title: str, subject: str, changes: list[tuple[str, str, str, str]]) -> list[str]:
    """A titled table of ``(subject, change, when, what had been seen)`` rows (``flatlib.claims``)."""
    return (["", title, "", f"| {subject} | change | when | what had been seen |", "|---|---|---|---|"]
            + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in changes])


def write_report(profile: str, parameters: dict[str, Any] | None = None,
                 moved: tuple[str, Sequence[tuple[str, str, str, str]]] | None = None) -> Path:
    """Write ``<figures>/REPORT.md`` for ``profile`` (``parameters``, ``moved``: see ``render_report``).
    Returns its path."""
    path = figures_dir(profile) / "REPORT.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, render_report(profile, parameters, moved))
    return path


def parameter_lines(params: dict[str, Any], sections: tuple[str, ...] = ()) -> str:
    """A resolved profile as aligned ``key: value`` lines, the keys of ``sections`` one per line
    (``section.key``) after the other top-level entries: what a notebook prints under its
    parameters."""
    width = max([len(k) for k in params] + [len(s) + 1 + len(k) for s in sections for k in params[s]])
    lines = [f"{key:>{width}}: {value}" for key, value in params.items() if key not in sections]
    lines += [f"{section + '.' + key:>{width}}: {value}" for section in sections
              for key, value in params[section].items()]
    return "\n".join(lines)
