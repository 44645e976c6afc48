"""Compare a rerun's figures with the committed ones: ``python -m flatlib.tools.compare [--profile cpu]``.

What a rerun guarantees. Every run is a function of its config and seeds: on one machine, with the
same pinned packages and the same thread count, a rerun reproduces every CSV of ``figures/`` bit for
bit. On another CPU (or with another thread count, or on a GPU) the kernels sum in another order, the
last bits differ, training amplifies them, and the numbers come out as another draw of the same
noise: they agree within their stated uncertainty (SE or 95% CI; with thousands of numbers, a few
fall outside their 95% interval by chance), and a verdict can flip only where it sits at its
threshold. This module checks exactly that: for every CSV of the profile's figures folder and every
recorded claim (``claims/*.json``) it compares the working tree with a git revision (default HEAD),
reports each changed number's difference in units of its own SE, and flags every claim whose verdict
("held") changed.

Two numbers within a relative floor of each other (``--floor``, default 1e-9: float noise) are equal,
whatever their SE: a number with a degenerate CI (an SE of 5e-18) would otherwise be flagged at
hundreds of SE for a difference in its last bits. The floor applies to floats only: counts (integer
columns) compare exactly. Exact zeros have no relative floor: 0 against 1e-17 is still a change.

A file that cannot be read on either side (a truncated claims JSON, a claim without its ``held``, a
CSV that is not text) is named with its side (the working tree, or the revision), left out, and the
rest is compared; the exit status is then 3 (1 is a changed verdict under ``--strict``, 2 a
comparison that could not run at all). ``claims/_runs.json`` (wall times) is never compared.

Uncertainty columns follow the naming the notebooks use: ``x_se``, ``x se``, ``x ± se`` (a standard
error), ``x ci95`` (a 95% CI half-width), ``x low`` / ``x high`` (CI bounds), and cells printed as
``"0.008 ± 0.001"`` (mean ± 95% CI, the 04 tables). When ``x`` itself is not a column, the uncertainty
belongs to the column just before it (``MLM optimum``, ``MLM ± se``); so do columns named just ``low``
and ``high`` (the verdict tables' 95% CI of their ``effect`` or ``delta``). A CI half-width counts as
1.96 SE (a normal approximation; the CIs over 3 seeds are t-based and wider, so differences in those
units look smaller than they are). Numbers without an uncertainty get a relative difference.
"""

from __future__ import annotations

import argparse
import io
import math
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from flatlib.plots.style import figures_dir
from flatlib.profiles import PROFILES
from flatlib.tools.report import DamagedFileError, parse_claims

# suffix -> kind; longest first, so "x ± se" is not read as "x ±" + " se"
SUFFIXES = ((" ± se", "SE"), ("_se", "SE"), (" se", "SE"), (" ci95", "CI"), (" low", "CI"), (" high", "CI"))
# whole names: a bare interval belongs to the column before it ("flow" or "below" are values)
NAMES = {"low": "CI", "high": "CI"}
PLUS_MINUS = re.compile(r"^\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*±\s*([\d.]+(?:[eE][-+]?\d+)?)\s*$")
Z_95 = 1.96
REL_FLOOR = 1e-9   # |new - ref| <= REL_FLOOR * max(|new|, |ref|): equal (float noise), whatever the SE
EXIT_VERDICTS, EXIT_CANNOT, EXIT_DAMAGED = 1, 2, 3
# what to do about a damaged file, in the working tree or committed at the reference revision
FIX_HERE = "regenerate it (rerun its notebook) or restore the committed one with `git checkout`"
FIX_COMMITTED = ("the committed file is damaged: compare against another revision (--against) or commit "
                 "a good one")


@dataclass
class Change:
    """One number (or one text / True-False cell) that differs between the reference and the rerun."""

    file: str
    row: str
    column: str
    ref: object
    new: object
    se: float | None = None      # the committed number's own SE (a CI half-width / 1.96), if it has one
    from_ci: bool = False        # se came from a 95% CI

    @property
    def delta(self) -> float:
        return float(self.new) - float(self.ref)

    @property
    def sigmas(self) -> float | None:
        """The difference in units of the number's own SE (None without one, or without both values)."""
        if self.se is None or not self.se > 0 or math.isnan(self.delta):
            return None
        return self.delta / self.se

    @property
    def relative(self) -> float:
        ref = float(self.ref)
        return self.delta / abs(ref) if ref else math.inf


@dataclass
class FileDiff:
    name: str
    status: str = "same"         # same / changed / missing (only in the reference) / new (only here)
    rows: int = 0
    numbers: int = 0             # numbers compared
    within_floor: int = 0        # numbers that differ by at most the relative floor: counted as equal
    changes: list[Change] = field(default_factory=list)      # numeric cells that differ
    decisions: list[Change] = field(default_factory=list)    # text / True-False cells that differ
    rows_missing: list[str] = field(default_factory=list)
    rows_new: list[str] = field(default_factory=list)
    columns_missing: list[str] = field(default_factory=list)
    columns_new: list[str] = field(default_factory=list)

    @property
    def beyond(self) -> int:
        """Changed numbers outside their own 95% uncertainty."""
        return sum(1 for c in self.changes if c.sigmas is not None and abs(c.sigmas) > Z_95)


@dataclass
class VerdictChange:
    notebook: str
    claim: str
    ref: str                     # "yes" / "no" / "partly" / "not tested", or "(absent)"
    new: str


@dataclass
class Comparison:
    against: str
    folder: str
    files: list[FileDiff]
    verdicts: list[VerdictChange]  # every claim whose "held" differs, including claims added or removed
    claims_compared: int = 0
    reference_files: int = 0       # CSVs and claims files committed at ``against``
    damaged: list[str] = field(default_factory=list)  # files left out: each names itself, its side, its fault
    floor: float = REL_FLOOR

    @property
    def changed(self) -> bool:
        return bool(self.verdicts) or any(f.status != "same" for f in self.files)


# ---------------------------------------------------------------------------------------------------
# one CSV

def read_csv(text: str) -> pd.DataFrame:
    # pandas >= 3 parses floats round-trip: a number written with repr() reads back as that float
    return split_plus_minus(pd.read_csv(io.StringIO(text)))


def split_plus_minus(df: pd.DataFrame) -> pd.DataFrame:
    """Turn text columns of "mean ± ci" cells into a number column and its " ci95" column. Other cells
    of such a column ("0 (exact)", "(no parameters)" in the 04 tables) become empty."""
    out = {}
    for col in df.columns:
        text = df[col].dropna().astype(str)
        if pd.api.types.is_numeric_dtype(df[col]) or not text.str.fullmatch(PLUS_MINUS).any():
            out[col] = df[col]
            continue
        parsed = df[col].astype(str).str.extract(PLUS_MINUS).astype(float)
        out[col], out[f"{col} ci95"] = parsed[0], parsed[1]
    return pd.DataFrame(out)


def uncertainties(columns: list[str]) -> dict[str, tuple[list[str], str]]:
    """{value column: ([its uncertainty columns], "SE" or "CI")} by the notebooks' naming."""
    found: dict[str, tuple[list[str], str]] = {}
    is_unc = {c: (c, NAMES[c]) if c in NAMES else next(((c[: -len(s)], kind) for s, kind in SUFFIXES
                                                         if c.endswith(s)), None) for c in columns}
    for i, col in enumerate(columns):
        if is_unc[col] is None:
            continue
        base, kind = is_unc[col]
        if base == col or base not in columns or is_unc.get(base) is not None:
            # the uncertainty of the column before it ("MLM optimum", "MLM ± se")
            before = [c for c in columns[:i] if is_unc[c] is None]
            if not before:
                continue
            base = before[-1]
        found.setdefault(base, ([], kind))[0].append(col)
    return found


def _is_number(s: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)


def _is_label(s: pd.Series) -> bool:
    return pd.api.types.is_integer_dtype(s) or not (_is_number(s) or pd.api.types.is_bool_dtype(s))


def key_columns(ref: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """The leading columns that name a row (text or integers: language, seed, optimizer, step...).

    Measured values are floats, so the run of labels stops at the first float column. But an integer
    can be a result too (a token count), and a label that changed would turn a changed number into a
    row missing plus a row new: of the run's prefixes, the longest that matches the most rows wins.
    """
    run = []
    for col in ref.columns:
        if col not in new.columns or not (_is_label(ref[col]) and _is_label(new[col])):
            break
        run.append(col)

    def matched(k: int) -> int:
        return len(set(_row_labels(ref, run[:k])) & set(_row_labels(new, run[:k])))

    return run[:max(range(len(run) + 1), key=lambda k: (matched(k), k))]


def _row_labels(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """One label per row: its key values, numbered when they repeat (so reruns align row by row)."""
    if not keys:
        return [f"row {i + 1}" for i in range(len(df))]
    labels = df[keys].astype(str).agg(" · ".join, axis=1).tolist()
    counts, seen = Counter(labels), Counter()
    out = []
    for label in labels:
        seen[label] += 1
        out.append(label if counts[label] == 1 else f"{label} #{seen[label]}")
    return out


def _same(a: object, b: object) -> bool:
    return a == b or (pd.isna(a) and pd.isna(b))


def within_floor(x: object, y: object, floor: float) -> bool:
    r"""Whether two finite floats are equal up to the relative floor: :math:`|y - x| \le
    \text{floor} \cdot \max(|x|, |y|)`."""
    a, b = float(x), float(y)
    return math.isfinite(a) and math.isfinite(b) and abs(b - a) <= floor * max(abs(a), abs(b))


def _check_floor(floor: float) -> None:
    if not (isinstance(floor, (int, float)) and not isinstance(floor, bool) and 0 <= floor < 1):
        raise ValueError(f"floor: expected a relative difference in [0, 1), e.g. {REL_FLOOR}, got {floor!r}")


def compare_frames(name: str, ref: pd.DataFrame | None, new: pd.DataFrame | None,
                   floor: float = REL_FLOOR) -> FileDiff:
    """Cell-by-cell comparison of one CSV, rows aligned by their leading label columns; float cells
    within the relative ``floor`` of each other are equal (counted in ``within_floor``)."""
    _check_floor(floor)
    if ref is None or new is None:
        frame = new if ref is None else ref
        return FileDiff(name, "new" if ref is None else "missing", rows=0 if frame is None else len(frame))
    keys = key_columns(ref, new)
    a = ref.set_axis(_row_labels(ref, keys), axis=0)
    b = new.set_axis(_row_labels(new, keys), axis=0)
    rows = [r for r in a.index if r in b.index]
    columns = [c for c in a.columns if c in b.columns and c not in keys]
    diff = FileDiff(name, rows=len(rows),
                    rows_missing=[r for r in a.index if r not in b.index],
                    rows_new=[r for r in b.index if r not in a.index],
                    columns_missing=[c for c in a.columns if c not in b.columns],
                    columns_new=[c for c in b.columns if c not in a.columns])
    owner = uncertainties(list(a.columns))
    for col in columns:
        numeric = _is_number(a[col]) and _is_number(b[col])
        exact = pd.api.types.is_integer_dtype(a[col]) and pd.api.types.is_integer_dtype(b[col])  # counts
        for row in rows:
            x, y = a.at[row, col], b.at[row, col]
            diff.numbers += numeric
            if _same(x, y):
                continue
            if numeric and not exact and within_floor(x, y, floor):
                diff.within_floor += 1
                continue
            change = Change(name, row, col, x, y)
            if not numeric:
                diff.decisions.append(change)
                continue
            if col in owner:
                uncs, kind = owner[col]
                # the committed number's own uncertainty (the rerun's when the committed one is empty)
                width = _width(a.loc[row], uncs) if not pd.isna(x) else _width(b.loc[row], uncs)
                if width is not None:
                    change.se, change.from_ci = (width / Z_95, True) if kind == "CI" else (width, False)
            diff.changes.append(change)
    if diff.changes or diff.decisions or diff.rows_missing or diff.rows_new or diff.columns_missing \
            or diff.columns_new:
        diff.status = "changed"
    return diff


def _width(row: pd.Series, uncs: list[str]) -> float | None:
    """A standard error or CI half-width from one row's uncertainty cells (a half-width from low/high)."""
    values = pd.to_numeric(row[uncs], errors="coerce").dropna().tolist()
    if len(uncs) == 2 and len(values) == 2:  # low, high
        return abs(values[1] - values[0]) / 2
    return abs(values[0]) if len(values) == 1 else None


# ---------------------------------------------------------------------------------------------------
# claims

Verdicts = dict[tuple[str, str], str]


def claim_verdicts(texts: dict[str, str | DamagedFileError], source: Callable[[str], str] = str,
                   remedy: str | None = None) -> tuple[dict[str, Verdicts], dict[str, DamagedFileError]]:
    """{claims file: {(notebook, claim): held}} of the readable claims files among ``texts`` (their
    texts by path in the figures folder; ``source(path)`` names one in a message), and the damaged
    ones by path (``flatlib.tools.report.parse_claims``; ``remedy``: what to do about one)."""
    out, damaged = {}, {}
    for name, text in texts.items():
        try:
            if isinstance(text, DamagedFileError):
                raise text
            data = parse_claims(text, source(name), remedy)
        except DamagedFileError as error:
            damaged[name] = error
            continue
        out[name] = {(data.get("notebook", name), c["claim"]): c["held"] for c in data["claims"]}
    return out, damaged


def _merged(verdicts: dict[str, Verdicts], leave_out: set[str]) -> Verdicts:
    return {key: held for name, v in verdicts.items() if name not in leave_out for key, held in v.items()}


def compare_verdicts(ref: dict[tuple[str, str], str], new: dict[tuple[str, str], str]) -> list[VerdictChange]:
    absent = "(absent)"
    return [VerdictChange(nb, claim, ref.get((nb, claim), absent), new.get((nb, claim), absent))
            for nb, claim in sorted(set(ref) | set(new)) if ref.get((nb, claim)) != new.get((nb, claim))]


# ---------------------------------------------------------------------------------------------------
# git and the figures folder

def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {out.stderr.strip() or 'failed'}")
    return out.stdout


def _in_repository(folder: Path) -> tuple[Path, str]:
    """The top of the git checkout holding ``folder``, and ``folder``'s path in it."""
    top = Path(_git(folder if folder.exists() else folder.parent, "rev-parse", "--show-toplevel").strip())
    return top, folder.resolve().relative_to(top.resolve()).as_posix()


def committed_files(folder: Path, against: str) -> dict[str, str]:
    """{path relative to folder: text} of the CSVs and claims files committed at ``against``."""
    top, prefix = _in_repository(folder)
    try:
        _git(top, "rev-parse", "--verify", "--quiet", f"{against}^{{commit}}")
    except RuntimeError:
        raise ValueError(f"--against: {against!r} is not a commit of {top}") from None
    listed = _git(top, "ls-tree", "-r", "--name-only", against, "--", f"{prefix}/").splitlines()
    wanted = [p[len(prefix) + 1:] for p in listed]
    wanted = [p for p in wanted if _is_compared(p)]
    return {p: _git(top, "show", f"{against}:{prefix}/{p}") for p in wanted}


def _is_compared(path: str) -> bool:
    # the profile's own CSVs and claims (figures/gpu/... belongs to another profile); _runs.json
    # holds wall times, which differ on every run
    return (path.endswith(".csv") and "/" not in path) or (
        path.startswith("claims/") and path.endswith(".json") and path.count("/") == 1
        and not path.startswith("claims/_"))


def current_files(folder: Path) -> dict[str, str | DamagedFileError]:
    """{path relative to folder: text} of the compared files in ``folder``; a file that is not UTF-8
    text is a ``DamagedFileError`` in its place."""
    if not folder.is_dir():
        return {}
    paths = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return {p: _read_text(folder / p) for p in sorted(paths) if _is_compared(p)}


def _read_text(path: Path) -> str | DamagedFileError:
    try:
        return path.read_text()
    except UnicodeDecodeError as error:
        return DamagedFileError(path, f"not UTF-8 text ({error})", FIX_HERE)


def compare(folder: Path, against: str = "HEAD", floor: float = REL_FLOOR) -> Comparison:
    """Compare the CSVs and claims in ``folder`` with those committed at git revision ``against``;
    floats within the relative ``floor`` of each other are equal. A damaged file (either side) is
    named in ``Comparison.damaged`` and left out; everything else is compared."""
    _check_floor(floor)
    ref, new = committed_files(folder, against), current_files(folder)
    prefix = _in_repository(folder)[1]

    def committed(name: str) -> str:
        return f"{prefix}/{name} at {against}"

    def here(name: str) -> str:
        return str(folder / name)

    files, damaged = [], []
    for name in sorted(p for p in set(ref) | set(new) if p.endswith(".csv")):
        try:
            files.append(compare_frames(name, _frame(ref, name, committed(name), FIX_COMMITTED),
                                        _frame(new, name, here(name), FIX_HERE), floor))
        except ValueError as error:  # one unreadable file must not hide the rest
            files.append(FileDiff(name, f"unreadable: {error}"))
            damaged.append(str(error) if isinstance(error, DamagedFileError) else f"{here(name)}: {error}")
    ref_v, ref_bad = claim_verdicts(_claims_files(ref), committed, FIX_COMMITTED)
    new_v, new_bad = claim_verdicts(_claims_files(new), here)
    # a file damaged on one side is left out on both: its claims are unknown, not gone or new
    leave_out = set(ref_bad) | set(new_bad)
    damaged += [str(e) for bad in (ref_bad, new_bad) for _, e in sorted(bad.items())]
    ref_m, new_m = _merged(ref_v, leave_out), _merged(new_v, leave_out)
    return Comparison(against, str(folder), files, compare_verdicts(ref_m, new_m),
                      len(set(ref_m) | set(new_m)), len(ref), damaged, floor)


def _claims_files(texts: dict[str, str | DamagedFileError]) -> dict[str, str | DamagedFileError]:
    return {path: text for path, text in texts.items() if path.endswith(".json")}


def _frame(texts: dict[str, str | DamagedFileError], name: str, where: str,
           remedy: str) -> pd.DataFrame | None:
    """One side's CSV (None if absent); raises ``DamagedFileError`` naming ``where`` if it cannot be read."""
    text = texts.get(name)
    if text is None:
        return None
    if isinstance(text, DamagedFileError):
        raise text
    try:
        return read_csv(text)
    except (ValueError, pd.errors.ParserError) as error:
        raise DamagedFileError(where, f"not a readable CSV ({error})", remedy) from None


# ---------------------------------------------------------------------------------------------------
# the report

def _num(x: object) -> str:
    return "nan" if pd.isna(x) else f"{float(x):.5g}"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_comparison(c: Comparison, top: int = 8) -> str:
    """The comparison as a compact text: verdict changes first, then one line per changed file, the
    ``top`` largest differences, the changed decisions, and the rows that exist on one side only."""
    lines = [f"Comparing {c.folder} with the files committed at {c.against}: "
             f"{len(c.files)} CSV files, {c.claims_compared} claims."]
    if c.damaged:
        lines += ["", f"!! {len(c.damaged)} DAMAGED FILE(S), left out of the comparison (the rest is "
                      "compared):"]
        lines += [f"!!   {d}" for d in c.damaged]
    if not c.reference_files:
        return "\n".join(lines + [f"Nothing is committed there at {c.against}: nothing to compare with."])
    changed = [v for v in c.verdicts if "(absent)" not in (v.ref, v.new)]
    if changed:
        lines += ["", f"!! {len(changed)} CLAIM VERDICT(S) CHANGED:"]
        lines += [f"!!   {v.notebook}: {v.claim}\n!!       held: {v.ref} -> {v.new}" for v in changed]
    if len(changed) < len(c.verdicts):
        lines += ["", "claims recorded on one side only:"]
        lines += [f"  {v.notebook}: {v.claim}: "
                  + (f"new, held: {v.new}" if v.ref == "(absent)" else f"gone (was held: {v.ref})")
                  for v in c.verdicts if v not in changed]
    noise = sum(f.within_floor for f in c.files)
    floor = (f"{noise} number(s) differ by at most {c.floor:g} of their value (the relative floor: float "
             "noise, counted as equal)")
    if not c.changed:
        return "\n".join(lines + ["No differences: every number and every verdict is identical."
                                   + (f" Only {floor}." if noise else "")])
    changes = [ch for f in c.files for ch in f.changes]
    decisions = [d for f in c.files for d in f.decisions]
    lines += _file_table(c.files) + _largest(changes, top) + _decisions(decisions) + _one_sided(c.files, top)
    numbers, beyond = sum(f.numbers for f in c.files), sum(f.beyond for f in c.files)
    lines += ["", f"In short: {len(changes)} of {numbers} numbers differ, {beyond} of them beyond their own "
                  f"95% uncertainty; {len(decisions)} text/True-False cells differ; {len(changed)} claim "
                  f"verdict(s) changed, {len(c.verdicts) - len(changed)} claim(s) on one side only"
                  + (f"; {floor}." if noise else ".")]
    return "\n".join(lines)


def _file_table(files: list[FileDiff]) -> list[str]:
    lines = ["", f"{'file':34s} {'rows':>5s} {'numbers':>8s} {'changed':>8s} {'max |Δ|/SE':>11s} "
                 f"{'beyond 95%':>10s}  other"]
    for f in files:
        if f.status == "same":
            continue
        sigmas = [abs(ch.sigmas) for ch in f.changes if ch.sigmas is not None]
        other = [f"{len(x)} {what}" for x, what in (
            (f.rows_missing, "rows missing"), (f.rows_new, "rows new"),
            (f.columns_missing, "columns missing"), (f.columns_new, "columns new"),
            (f.decisions, "text/True-False cells changed")) if x]
        if f.status != "changed":
            other = [f.status.upper() if f.status in ("missing", "new") else f.status]
        lines.append(f"{_short(f.name, 34):34s} {f.rows:5d} {f.numbers:8d} {len(f.changes):8d} "
                     f"{(f'{max(sigmas):.2f}' if sigmas else '-'):>11s} {f.beyond:10d}  {', '.join(other)}")
    same = sum(f.status == "same" for f in files)
    return lines + ([f"identical: {same} file(s)"] if same else [])


def _largest(changes: list[Change], top: int) -> list[str]:
    lines = []
    head = f"  {'file':24s} {'row':28s} {'column':22s} {'committed':>10s} {'now':>10s}"

    def cells(ch: Change) -> str:
        return f"  {_short(ch.file, 24):24s} {_short(ch.row, 28):28s} {_short(ch.column, 22):22s} " \
               f"{_num(ch.ref):>10s} {_num(ch.new):>10s}"

    with_se = sorted((ch for ch in changes if ch.sigmas is not None), key=lambda ch: -abs(ch.sigmas))
    if with_se:
        lines += ["", "largest differences in units of the number's own SE "
                      f"(* from a 95% CI half-width / {Z_95}):",
                  f"{head} {'Δ':>10s} {'Δ/SE':>7s}"]
        lines += [f"{cells(ch)} {ch.delta:>+10.3g} {ch.sigmas:>+6.2f}{'*' if ch.from_ci else ''}"
                  for ch in with_se[:top]]
    bare = sorted((ch for ch in changes if ch.sigmas is None), key=lambda ch: -_size(ch.relative))
    if bare:
        lines += ["", "largest relative differences of the other numbers (uncertainties, counts, no SE):",
                  f"{head} {'relative':>9s}"]
        lines += [f"{cells(ch)} {_rel(ch):>9s}" for ch in bare[:top]]
    return lines


def _decisions(decisions: list[Change]) -> list[str]:
    # one line per file, column and change ("within ε: False -> True: <3 rows>, ... (21 rows)")
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for d in decisions:
        groups.setdefault((d.file, d.column, str(d.ref), str(d.new)), []).append(d.row)
    lines = ["", "text / True-False cells that changed (the CSVs' per-row decisions):"] if groups else []
    for (name, column, ref, new), rows in groups.items():
        more = f", ... ({len(rows)} rows)" if len(rows) > 3 else ""
        lines.append(f"  {name}: {column}: {ref} -> {new}: {'; '.join(rows[:3])}{more}")
    return lines


def _one_sided(files: list[FileDiff], top: int) -> list[str]:
    lines = []
    for f in files:
        for what, names in (("rows missing", f.rows_missing), ("rows new", f.rows_new),
                            ("columns missing", f.columns_missing), ("columns new", f.columns_new)):
            if names:
                more = f" ... and {len(names) - top} more" if len(names) > top else ""
                lines.append(f"{f.name}: {what}: {', '.join(names[:top])}{more}")
    return [""] + lines if lines else []


def _size(relative: float) -> float:
    # a number that appeared, vanished or left 0 is as large a change as there is
    return abs(relative) if math.isfinite(relative) else math.inf


def _rel(ch: Change) -> str:
    if pd.isna(ch.ref) or pd.isna(ch.new):
        return "appeared" if pd.isna(ch.ref) else "vanished"
    return "from 0" if math.isinf(ch.relative) else f"{ch.relative:+.2%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    parser.add_argument("--against", default="HEAD", help="the git revision whose figures are the reference")
    parser.add_argument("--top", type=int, default=8, help="how many of the largest differences to list")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a claim's verdict changed (or a claim is on one side only)")
    parser.add_argument("--floor", type=float, default=REL_FLOOR,
                        help="relative difference up to which two floats are equal, whatever their SE")
    args = parser.parse_args(argv)
    try:
        result = compare(figures_dir(args.profile), args.against, args.floor)
    except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as error:
        print(f"flatlib.tools.compare: cannot compare: {error}", file=sys.stderr)
        return EXIT_CANNOT
    print(format_comparison(result, args.top))
    if result.damaged:
        return EXIT_DAMAGED
    return EXIT_VERDICTS if args.strict and result.verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
