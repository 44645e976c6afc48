"""flatlib.runner.progress (the reporter in the kernel, the printer in reproduce) and its hooks: the sweep,
the pool, measure_many, and reproduce's Ctrl-C path (with a stub instead of papermill)."""

import io
import json
import os
import time
from pathlib import Path

import pytest

from flatlib.measurement import measure
from flatlib.runner import progress, sweep
from flatlib.runner.pool import run_jobs
from flatlib.runner.runs import RunStore
from flatlib.tools import reproduce
from flatlib.training.train import PretrainConfig


@pytest.fixture(autouse=True)
def fresh_reporter(monkeypatch):
    """Each test starts with no phase reported in this process."""
    monkeypatch.setattr(progress, "_current", None)
    monkeypatch.setattr(progress, "_ended", [])


@pytest.fixture
def status(tmp_path, monkeypatch):
    path = tmp_path / "status.json"
    monkeypatch.setenv(progress.ENV, str(path))
    return path


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


# ---------------------------------------------------------------------------- the reporter
def test_the_reporter_writes_each_phase_and_its_counts(status):
    shown = progress.start("training", 3, "runs", skipped=2)
    s = progress.read_status(status)
    assert ((s["phase"], s["unit"], s["done"], s["total"], s["skipped"], s["finished"])
            == ("training", "runs", 0, 3, 2, False))
    assert s["pid"] == os.getpid() and s["started"] <= s["last"]
    shown.advance()
    shown.advance(2)
    assert progress.read_status(status)["done"] == 3
    shown.finish()
    s = progress.read_status(status)
    assert s["finished"] and s["ended"][-1]["seq"] == s["seq"] and s["ended"][-1]["phase"] == "training"
    with progress.start("measuring", 1, "measurements") as second:  # the latest phase replaces it
        assert progress.read_status(status)["phase"] == "measuring" and second.seq == s["seq"] + 1
    assert progress.read_status(status)["finished"]
    assert not list(status.parent.glob("*.tmp"))  # written atomically: no temporary file left


def test_nothing_is_written_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert not progress.enabled()
    with progress.start("training", 2, "runs") as shown:
        shown.advance()
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_path_never_fails_the_computation(tmp_path, monkeypatch):
    monkeypatch.setenv(progress.ENV, str(tmp_path / "no such folder" / "status.json"))
    progress.start("training", 1, "runs").advance()  # no exception
    assert progress.read_status(tmp_path / "no such folder" / "status.json") is None


# ---------------------------------------------------------------------------- time left
def test_eta_arithmetic():
    s = {"done": 0, "total": 10, "started": 100.0, "last": 100.0}
    assert progress.phase_eta(s, 500.0) is None  # no guess before one item ends
    s = {"done": 2, "total": 10, "started": 100.0, "last": 120.0}  # 10 s an item, 8 to go
    assert progress.phase_eta(s, 120.0) == pytest.approx(80.0)
    assert progress.phase_eta(s, 125.0) == pytest.approx(75.0)  # 5 s into the next ones
    assert progress.phase_eta(s, 500.0) == 0.0  # never negative
    assert progress.phase_eta({**s, "done": 10}, 500.0) == 0.0
    assert progress.notebook_eta(None, 30.0) is None
    assert progress.notebook_eta(600.0, 150.0) == 450.0
    assert progress.minutes(20) == "under a minute" and progress.minutes(150) == "2 min"
    assert progress.minutes(89 * 60) == "89 min" and progress.minutes(3 * 3600) == "3.0 h"


def test_last_wall_times_from_the_runs_record(tmp_path):
    path = tmp_path / "_runs.json"
    assert progress.last_wall_times(path) == {}
    path.write_text(json.dumps({
        "01_a": {"ok": True, "seconds": 61.0},
        "02_b": {"ok": False, "seconds": 5.0, "last_good": {"seconds": 300.0, "when": "x"}},
        "03_c": {"ok": False, "seconds": 5.0}}))
    assert progress.last_wall_times(path) == {"01_a": 61.0, "02_b": 300.0}
    path.write_text("{not json")
    assert progress.last_wall_times(path) == {}


# ---------------------------------------------------------------------------- the printer
def _phase(done, total, started, last, finished=False, seq=1, skipped=0, phase="training", unit="runs"):
    state = {"seq": seq, "phase": phase, "unit": unit, "done": done, "total": total, "skipped": skipped,
             "started": started, "last": last, "finished": finished}
    return {"pid": 7, "time": last, **state, "ended": [state] if finished else []}


def test_the_printer_prints_phase_changes_at_once_and_status_lines_at_most_every_interval():
    clock, out = Clock(1000.0), io.StringIO()
    printer = progress.Printer("[cpu] 03_x", out=out, tty=False, interval=30, clock=clock, last_seconds=1200)
    for t in range(1000, 1030):  # polled every second for 30 s: one line, the phase's start
        clock.t = t
        printer.update(_phase(0, 4, 1000.0, 1000.0, skipped=2))
    lines = out.getvalue().splitlines()
    assert lines == ["[cpu] 03_x [0:00:00] training: 4 runs to do, 2 already done"]
    clock.t = 1030
    printer.update(_phase(0, 4, 1000.0, 1000.0, skipped=2))  # 30 s after the last line: a status line
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "training 0/4 runs (+2 already done)" in lines[1]
    assert "known once one is done" in lines[1]  # no guess before one run ends
    assert "this notebook: about 20 min left if it takes as long as its last run (20 min)" in lines[1]
    for t in range(1031, 1060):
        clock.t = t
        printer.update(_phase(1, 4, 1000.0, 1040.0))
    assert len(out.getvalue().splitlines()) == 2  # none within 30 s of the last
    clock.t = 1060
    printer.update(_phase(1, 4, 1000.0, 1040.0))  # 40 s a run, 3 to go, 20 s into them: 100 s
    line = out.getvalue().splitlines()[-1]
    assert "training 1/4 runs" in line and "about 2 min left in this phase" in line
    clock.t = 1061
    printer.update(_phase(4, 4, 1000.0, 1061.0, finished=True))  # a phase change: printed at once
    assert out.getvalue().splitlines()[-1] == "[cpu] 03_x [0:01:01] training: done, 4/4 runs in 1 min"
    clock.t = 1062
    printer.update(_phase(0, 0, 1062.0, 1062.0, finished=True, seq=2, skipped=5, phase="measuring",
                          unit="measurements"))  # seen only after it ended: its end line alone
    assert out.getvalue().splitlines()[-1].endswith("measuring: all 5 measurements already done")
    clock.t = 3000
    printer.update(None)  # no new status: a status line all the same (it is still running)
    assert "this notebook: longer than its last run (20 min)" in out.getvalue().splitlines()[-1]
    assert len(out.getvalue().splitlines()) == 6


def test_the_printer_sees_phases_that_ended_between_two_polls():
    clock, out = Clock(), io.StringIO()
    printer = progress.Printer("nb", out=out, tty=False, clock=clock)
    first = _phase(2, 2, 990.0, 995.0, finished=True, seq=1)["ended"][0]
    current = _phase(0, 3, 996.0, 996.0, seq=2, phase="measuring", unit="measurements")
    printer.update({**current, "ended": [first]})
    lines = out.getvalue().splitlines()
    assert "training: done, 2/2 runs" in lines[0] and "measuring: 3 measurements to do" in lines[1]
    printer.update({**current, "ended": [first]})
    assert len(out.getvalue().splitlines()) == 2  # each said once


def test_on_a_terminal_one_line_is_rewritten_in_place():
    clock, out = Clock(), io.StringIO()
    printer = progress.Printer("nb", out=out, tty=True, clock=clock)
    printer.update(_phase(0, 2, 1000.0, 1000.0))
    clock.t = 1001
    printer.update(_phase(1, 2, 1000.0, 1001.0))
    text = out.getvalue()
    assert text.count("\n") == 1  # the start line; the status line is rewritten, not repeated
    assert text.endswith("training 1/2 runs · under a minute left in this phase")
    assert text.count("\r\x1b[K") == 3
    printer.close()
    assert out.getvalue().endswith("\r\x1b[K")


def test_the_monitor_polls_the_file_until_stopped(status):
    out = io.StringIO()
    printer = progress.Printer("nb", out=out, tty=False, interval=3600)
    with progress.Monitor(status, printer, poll=0.01):
        shown = progress.start("training", 2, "runs")
        shown.advance(2)
        shown.finish()
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("nb [0:00:00] training: done, 2/2 runs")  # the end, read at stop


def test_a_failing_display_is_reported_once_and_the_monitor_goes_on(status, capsys):
    class Broken:
        calls = 0

        def update(self, state):
            Broken.calls += 1
            raise RuntimeError("terminal gone")

        def close(self, final=True):
            pass

    monitor = progress.Monitor(status, Broken(), poll=0.01)
    monitor._thread.start()
    while Broken.calls < 3:  # it kept polling after the first failure
        time.sleep(0.01)
    monitor._stop.set()
    monitor._thread.join()
    assert isinstance(monitor.error, RuntimeError)
    assert capsys.readouterr().err.count("the progress display failed") == 1


# ---------------------------------------------------------------------------- the hooks
def whose_progress(job):
    """Module-level (spawned workers import it): what a worker sees of the progress variable."""
    return os.environ.get(progress.ENV)


def test_the_pool_counts_jobs_and_its_workers_never_report(status):
    shown = progress.start("jobs", 3, "jobs")
    outcomes = run_jobs(whose_progress, [0, 1, 2], workers=2, on_done=shown.advance)
    assert [o.value for o in outcomes] == [None, None, None]  # the variable is removed in the workers
    s = progress.read_status(status)
    assert s["done"] == s["total"] == 3


def test_measure_many_advances_one_per_measurement_and_counts_the_cached(status, tmp_path, monkeypatch):
    calls = []

    def fake_measure(run, step, protocol, **kwargs):
        calls.append(step)
        assert progress.read_status(status)["done"] == len(calls) - 1
        return {"step": step}

    def fake_path(run, step, protocol, **kwargs):
        return tmp_path / f"{step}.json"

    (tmp_path / "2.json").write_text(json.dumps({"step": 2, "cached": True}))
    monkeypatch.setitem(measure._MEASURES, "fake", (fake_measure, fake_path))
    results = measure.measure_many("fake", [(None, step, {}) for step in (1, 2, 3)])
    assert results == [{"step": 1}, {"step": 2, "cached": True}, {"step": 3}] and calls == [1, 3]
    s = progress.read_status(status)
    assert ((s["phase"], s["done"], s["total"], s["skipped"], s["finished"])
            == ("measuring (fake)", 2, 2, 1, True))


def test_a_sweep_counts_the_runs_it_trains_and_not_those_in_the_store(status, tmp_path, monkeypatch):
    language = {"kind": "hmm", "n_states": 4, "vocab_size": 8, "seq_len": 8, "concentration": 0.5, "seed": 3}
    configs = [PretrainConfig(language=language, model={"n_layer": 1, "n_head": 2, "d_model": 16, "d_ff": 32},
                              steps=10, seed=s) for s in range(3)]
    store = RunStore(tmp_path / "runs")
    (store.open(configs[1].to_dict()).dir / "FINISHED").write_text("{}")  # in the store already
    trained = []

    def fake_run_one(job):
        config, root, threads = job
        trained.append(config["seed"])
        return str(store.path(config)), ""

    monkeypatch.setattr(sweep, "_run_one", fake_run_one)
    results = sweep.run_configs(configs, store, backend="serial", progress=False)
    assert [r.run.dir for r in results] == [store.path(c.to_dict()) for c in configs]  # the same order
    assert trained == [0, 2, 1]  # the two to train, then the stored one, only looked up
    s = progress.read_status(status)
    assert ((s["phase"], s["unit"], s["done"], s["total"], s["skipped"], s["finished"])
            == ("training", "runs", 2, 2, 1, True))


# ---------------------------------------------------------------------------- reproduce
@pytest.fixture
def figures(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATLIB_FIGURES", str(tmp_path / "figures"))
    return tmp_path / "figures"


def test_reproduce_runs_each_notebook_with_a_status_file(figures, tmp_path, capsys):
    seen = []

    def execute(input_path, output_path, parameters, kernel_name, cwd, progress_bar):
        seen.append(os.environ[progress.ENV])
        assert not progress_bar and parameters == {"profile": "smoke"}
        if "02_" in input_path:
            raise RuntimeError("cell 3 failed\nValueError: boom")
        with progress.start("training", 1, "runs") as shown:
            shown.advance()
        Path(output_path).write_text("{}")

    results = reproduce.run_notebooks("smoke", tmp_path / "out", only=["01_", "02_"], execute=execute)
    assert [(r.notebook[:2], r.ok) for r in results] == [("01", True), ("02", False)]
    assert "boom" in results[1].error and (tmp_path / "out" / "01_synthetic_languages.ipynb").exists()
    assert len(set(seen)) == 2 and progress.ENV not in os.environ  # one file each; the variable restored
    out = capsys.readouterr().out
    assert "[smoke] 01_synthetic_languages.ipynb ... (notebook 1 of 2)" in out
    assert "training: done, 1/1 runs" in out and "02_pretraining_to_optimality.ipynb FAILED" in out


def test_ctrl_c_says_what_ran_and_what_is_kept_and_exits_non_zero(figures, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)

    def execute(input_path, output_path, **kwargs):
        Path(output_path).write_text("{}")
        if "02_" in input_path:
            shown = progress.start("training", 4, "runs", skipped=1)
            shown.advance()
            raise KeyboardInterrupt  # as papermill raises it when the user presses Ctrl-C

    code = reproduce.main(["--profile", "smoke", "--out", str(tmp_path / "out"), "--only", "01_", "02_",
                           "03_"],
                          execute=execute)
    assert code == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    err = captured.err
    assert "Interrupted (Ctrl-C): 02_pretraining_to_optimality.ipynb" in err
    assert "training, 1/4 runs done" in err
    assert ("Finished before it: 01_synthetic_languages.ipynb (ok)" in err
            and "Not started: 03_model_size.ipynb" in err)
    assert "run store" in err and "resumes" in err and "--profile smoke" in err
    runs = json.loads((figures / "smoke" / "claims" / "_runs.json").read_text())
    assert set(runs) == {"01_synthetic_languages"}  # the finished notebook keeps its time, the cut one none
    assert progress.ENV not in os.environ
