"""Progress a person can see while ``python -m flatlib.tools.reproduce`` runs a notebook for an hour.

Two halves, joined by a small JSON status file whose path is in ``$FLATLIB_PROGRESS``:

* the **reporter**, in the notebook's kernel: the library loops that take the time
  (``flatlib.runner.sweep.run_configs``: runs trained; ``flatlib.runner.experiments.measure_many``:
  measurements) call ``start(phase, total, unit)``, then ``advance()`` as each item ends, then ``finish()``.
  Each call rewrites the file atomically (a few hundred bytes, once per run or measurement). With
  the variable unset (a notebook opened in Jupyter, the tests) nothing is written: every call costs
  nothing and can never fail the computation. Pool workers (``flatlib.runner.pool``) never report: only the
  process that counts the jobs does.
* the **printer**, in ``flatlib.tools.reproduce``: a ``Monitor`` thread reads the file every second and
  hands it to a ``Printer``, which prints one line when a phase starts or ends and, between those,
  a status line (which notebook, the phase, items done / total, time left) at most once every
  ``interval`` seconds; on a terminal it instead rewrites one status line in place.

Time left (``eta``): in a phase, the rate of the items it has finished so far (none before the
first one ends: no guess); for the notebook, its last good wall time (``claims/_runs.json``, written
by ``flatlib.tools.report.record_runs``) minus the time it has run so far.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

ENV = "FLATLIB_PROGRESS"


# ---------------------------------------------------------------------------- the reporter (in the kernel)
class Phase:
    """One phase of work: ``total`` items to do (``skipped`` more were already done, e.g. cached)."""

    def __init__(self, name: str, total: int, unit: str, skipped: int, seq: int) -> None:
        self.name, self.total, self.unit, self.skipped, self.seq = name, int(total), unit, int(skipped), seq
        self.done = 0
        self.started = time.time()
        self.last = self.started  # when the latest item ended
        self.finished = False

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.last = time.time()
        if _current is self:
            _write()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.last = time.time()
        _ended.append(self)
        del _ended[:-_KEEP_ENDED]
        if _current is self:
            _write()

    def state(self) -> dict[str, Any]:
        return {"seq": self.seq, "phase": self.name, "unit": self.unit, "done": self.done,
                "total": self.total, "skipped": self.skipped, "started": self.started, "last": self.last,
                "finished": self.finished}

    def __enter__(self) -> Phase:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


_current: Phase | None = None  # the latest phase started: the one the file shows
_ended: list[Phase] = []  # the latest phases that ended (a poll may miss some in between)
_KEEP_ENDED = 8
_seq = 0


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def start(phase: str, total: int, unit: str = "items", skipped: int = 0) -> Phase:
    """Begin a phase of ``total`` items (``skipped``: how many more were done already, e.g. found in
    the run store; reported, not counted in the rate). Returns the phase: ``advance()`` it as items
    end, ``finish()`` it (or use it as a context manager). Phases do not nest: the file shows the
    latest one started (a phase left unfinished by an error is simply replaced by the next)."""
    global _seq, _current
    _seq += 1
    _current = Phase(phase, total, unit, skipped, _seq)
    _write()
    return _current


def _write() -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    state = {"pid": os.getpid(), "time": time.time(), **(_current.state() if _current else {}),
             "ended": [p.state() for p in _ended]}
    with contextlib.suppress(OSError):  # progress must never fail the computation
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)


def read_status(path: str | Path) -> dict[str, Any] | None:
    """The status the reporter last wrote at ``path`` (None if none yet, or unreadable)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------- time left
def minutes(seconds: float) -> str:
    """A duration for people: "under a minute", "4 min", "1.5 h"."""
    if seconds < 60:
        return "under a minute"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _left(seconds: float) -> str:
    return "under a minute" if seconds < 60 else f"about {minutes(seconds)}"


def phase_eta(status: dict[str, Any], now: float) -> float | None:
    """Seconds left in the phase at ``now``, from the rate of its finished items (their mean time
    from the phase's start to the latest end), less the time since the latest end; None before the
    first item ends (no guess), 0 when all are done."""
    done, total = status.get("done", 0), status.get("total", 0)
    if done >= total:
        return 0.0
    if done <= 0:
        return None
    per_item = (status["last"] - status["started"]) / done
    return max(0.0, per_item * (total - done) - (now - status["last"]))


def notebook_eta(last_seconds: float | None, elapsed: float) -> float | None:
    """Seconds left for a notebook whose last good run took ``last_seconds`` (None if unknown; may be
    negative: it is taking longer than last time)."""
    return None if last_seconds is None else last_seconds - elapsed


def last_wall_times(runs_json: str | Path) -> dict[str, float]:
    """The last good wall time of every notebook (by stem) recorded in ``runs_json``
    (``claims/_runs.json`` of ``flatlib.tools.report.record_runs``); {} if there is none."""
    try:
        runs = json.loads(Path(runs_json).read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for name, r in runs.items():
        if not isinstance(r, dict):
            continue
        if r.get("ok") and "seconds" in r:
            out[name] = float(r["seconds"])
        elif isinstance(r.get("last_good"), dict) and "seconds" in r["last_good"]:
            out[name] = float(r["last_good"]["seconds"])
    return out


# ---------------------------------------------------------------------------- the printer (in reproduce)
def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Printer:
    """Turns status snapshots into lines on ``out`` for one notebook (see the module).

    ``update(status)`` is called every poll; it prints a line when a phase starts or ends, and a
    status line at most every ``interval`` seconds of ``clock`` (on a terminal, ``tty``: the status
    line is rewritten in place at every update instead). ``clock`` is wall time (the reporter
    stamps the file with ``time.time()``); tests pass a fake one."""

    def __init__(self, label: str, out: IO[str] | None = None, tty: bool | None = None,
                 interval: float = 30.0,
                 clock: Callable[[], float] = time.time, last_seconds: float | None = None) -> None:
        self.label = label
        self.out = out if out is not None else sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.interval, self.clock, self.last_seconds = interval, clock, last_seconds
        self.began = clock()
        self.last_line = self.began  # a status line waits ``interval`` after any line
        self.seen: dict[tuple[Any, int], bool] = {}  # (kernel pid, phase seq) -> its end was printed
        self.status: dict[str, Any] | None = None
        self.dirty = False  # a rewritten terminal line is showing

    # -- what is printed
    def _head(self) -> str:
        return f"{self.label} [{_clock(self.clock() - self.began)}]"

    def _counts(self, s: dict[str, Any]) -> str:
        text = f"{s['done']}/{s['total']} {s['unit']}"
        return text + (f" (+{s['skipped']} already done)" if s.get("skipped") else "")

    def _start_line(self, s: dict[str, Any]) -> str:
        extra = f", {s['skipped']} already done" if s.get("skipped") else ""
        return f"{self._head()} {s['phase']}: {s['total']} {s['unit']} to do{extra}"

    def _end_line(self, s: dict[str, Any]) -> str:
        if not s["total"]:
            return f"{self._head()} {s['phase']}: all {s['skipped']} {s['unit']} already done"
        took = minutes(s["last"] - s["started"])
        extra = f" (+{s['skipped']} already done)" if s.get("skipped") else ""
        return f"{self._head()} {s['phase']}: done, {s['done']}/{s['total']} {s['unit']}{extra} in {took}"

    def status_line(self) -> str:
        now = self.clock()
        parts = [self._head()]
        s = self.status
        if s and "phase" in s and not s.get("finished"):
            parts.append(f"{s['phase']} {self._counts(s)}")
            left = phase_eta(s, now)
            parts.append("time left: known once one is done" if left is None
                         else f"{_left(left)} left in this phase")
        else:
            parts.append("running" + (f" (after {s['phase']})" if s and "phase" in s else ""))
        left = notebook_eta(self.last_seconds, now - self.began)
        if left is not None:
            last = minutes(self.last_seconds)
            parts.append(f"this notebook: {_left(left)} left if it takes as long as its last run ({last})"
                         if left > 0 else f"this notebook: longer than its last run ({last})")
        return " · ".join(parts)

    # -- when
    def _emit(self, line: str) -> None:
        if self.tty:
            self.out.write("\r\x1b[K" + line + "\n")
            self.dirty = False
        else:
            self.out.write(line + "\n")
        self.out.flush()
        self.last_line = self.clock()

    def _events(self, s: dict[str, Any]) -> None:
        """A start line for each phase seen running for the first time, an end line for each newly
        ended one (in the order they started)."""
        phases = {p["seq"]: p for p in s.get("ended", [])}
        if "phase" in s:
            phases[s["seq"]] = s
        for seq in sorted(phases):
            p, key = phases[seq], (s.get("pid"), seq)
            if key not in self.seen:
                self.seen[key] = False
                if not p.get("finished"):
                    self._emit(self._start_line(p))
            if p.get("finished") and not self.seen[key]:
                self.seen[key] = True
                self._emit(self._end_line(p))

    def update(self, status: dict[str, Any] | None) -> None:
        if status is not None:
            self.status = status
            self._events(status)
        if self.tty:
            width = max(20, shutil.get_terminal_size((100, 24)).columns - 1)
            self.out.write("\r\x1b[K" + self.status_line()[:width])
            self.out.flush()
            self.dirty = True
        elif self.clock() - self.last_line >= self.interval:
            self._emit(self.status_line())

    def close(self) -> None:
        """Clear a rewritten terminal line (the caller prints the notebook's end next)."""
        if self.tty and self.dirty:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.dirty = False


class Monitor:
    """A thread that feeds ``printer`` the status at ``path`` every ``poll`` seconds until ``stop()``."""

    def __init__(self, path: str | Path, printer: Printer, poll: float = 1.0) -> None:
        self.path, self.printer, self.poll = Path(path), printer, poll
        self.error: Exception | None = None  # the first display problem, reported once on stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="flatlib-progress", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.printer.update(read_status(self.path))
            except Exception as error:  # noqa: BLE001 - a display problem must not stop the notebook
                if self.error is None:
                    self.error = error
                    print(f"(the progress display failed, the notebook goes on: {type(error).__name__}: "
                          f"{error})", file=sys.stderr, flush=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop(final=exc[0] is None)

    def stop(self, final: bool = True) -> None:
        """Stop polling; with ``final``, print the end lines of phases that ended since the last poll."""
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            if final:
                status = read_status(self.path)
                if status is not None:
                    self.printer.status = status
                    self.printer._events(status)
        finally:
            self.printer.close()
