"""One run store shared by several processes, and every file the store trusts checked."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import tiny_config

from flatlib.measurement import measure
from flatlib.runner.runs import CorruptRunError, RunStore, atomic_write
from flatlib.training.train import PretrainConfig, load_model, pretrain


def _writer(config: PretrainConfig, store: Path, threads: int) -> subprocess.Popen:
    script = (f"import torch; torch.set_num_threads({threads})\n"
              "from flatlib.runner.runs import RunStore\n"
              "from flatlib.training.train import PretrainConfig, pretrain\n"
              f"pretrain(PretrainConfig.from_dict({config.to_dict()!r}), RunStore({str(store)!r}), "
              "progress=False)\n")
    return subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)


def test_two_writers_with_different_thread_counts_train_a_run_once(tmp_path):
    """Regression: the slower of two writers of one run rewrote metrics.csv after the faster one had
    written FINISHED, and a reader of the finished run got CorruptRunError most of the time."""
    config = tiny_config(steps=300, eval_every=50, checkpoint_every=50)
    writers = [_writer(config, tmp_path, 1), _writer(config, tmp_path, 2)]
    run_dir = RunStore(tmp_path).path(config.to_dict())
    seen, reads, errors = None, 0, []
    deadline = time.time() + 300
    while time.time() < deadline and any(w.poll() is None for w in writers):
        run = RunStore(tmp_path).find(config.to_dict())
        if run is not None and run.finished:
            try:
                metrics = run.metrics_path.read_bytes()
                run.verified()
                seen = seen or metrics
                reads += 1
            except (CorruptRunError, FileNotFoundError) as error:  # FINISHED read as it was replaced
                errors.append(str(error))
        time.sleep(0.01)
    messages = [w.communicate()[1] for w in writers]
    assert all(w.returncode == 0 for w in writers), messages
    assert errors == [], (f"{len(errors)} of {reads + len(errors)} reads of the finished run failed: "
                          f"{errors[:3]}")
    run = RunStore(tmp_path).find(config.to_dict())
    assert run.finished and run.verified() is run
    assert seen is None or run.metrics_path.read_bytes() == seen  # never rewritten once finished
    assert sum("waiting for another process" in m for m in messages) == 1  # one trained, one waited


def test_the_writer_that_waited_resumes_when_the_holder_is_killed(tmp_path):
    """SIGKILL of the process holding a run's lock: the kernel releases it, the waiting writer resumes
    from the last checkpoint, and the result is bit-identical to an uninterrupted run."""
    config = tiny_config(steps=400, eval_every=50, checkpoint_every=50)
    reference = pretrain(config, RunStore(tmp_path / "ref"), progress=False)
    first = _writer(config, tmp_path / "shared", 1)
    run_dir = RunStore(tmp_path / "shared").path(config.to_dict())
    deadline = time.time() + 120
    while time.time() < deadline and len(list(run_dir.glob("ckpt_*.sha256"))) < 2:
        time.sleep(0.02)
    second = _writer(config, tmp_path / "shared", 1)
    time.sleep(1.0)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert second.wait(timeout=300) == 0, second.communicate()[1]
    resumed = RunStore(tmp_path / "shared").find(config.to_dict())
    assert resumed.finished and resumed.metrics().equals(reference.metrics())
    wa, wb = load_model(reference).state_dict(), load_model(resumed).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _edit_one_digit(path: Path, key: str) -> None:
    body = json.loads(path.read_text())
    text = path.read_text()
    old = json.dumps(body[key])
    i = [i for i, c in enumerate(old) if c.isdigit() and c != "0"][1]  # the second significant digit
    new = old[:i] + str((int(old[i]) + 1) % 10) + old[i + 1:]
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))


def test_a_one_digit_edit_of_finished_is_caught(tmp_path):
    """Regression: one digit changed in FINISHED's final_gap was used as is."""
    store = RunStore(tmp_path)
    run = pretrain(tiny_config(), store, progress=False)
    good = (run.dir / "FINISHED").read_bytes()
    _edit_one_digit(run.dir / "FINISHED", "final_gap")
    with pytest.raises(CorruptRunError, match="FINISHED.*SHA-256"):
        run.summary()
    with pytest.raises(CorruptRunError, match="FINISHED"):
        pretrain(tiny_config(), store, progress=False)
    (run.dir / "FINISHED").unlink()  # what the message advises: rewritten from the final checkpoint
    again = pretrain(tiny_config(), store, progress=False)
    assert (again.dir / "FINISHED").read_bytes() == good


def test_an_older_finished_marker_is_cross_checked_against_the_metrics(tmp_path):
    run = pretrain(tiny_config(), RunStore(tmp_path), progress=False)
    path = run.dir / "FINISHED"
    body = json.loads(path.read_text())
    del body["finished_sha256"]  # as written before the marker carried its own digest
    path.write_text(json.dumps(body))
    assert run.summary()["final_gap"] == body["final_gap"]
    _edit_one_digit(path, "final_gap")
    with pytest.raises(CorruptRunError, match="final_gap.*last row"):
        run.summary()


def test_a_finished_run_is_verified_before_it_is_returned(tmp_path):
    """Regression: pretrain returned a finished run whose final checkpoint no longer matched."""
    store = RunStore(tmp_path)
    run = pretrain(tiny_config(), store, progress=False)
    path = run.checkpoint_path(60)
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRunError, match=r"ckpt_00000060.*FINISHED"):
        pretrain(tiny_config(), store, progress=False)


@pytest.mark.parametrize("code, says", [(errno.EACCES, "permissions"), (errno.ENOSPC, "disk is full"),
                                        (errno.EROFS, "read-only")])
def test_a_write_that_fails_names_the_file(tmp_path, monkeypatch, code, says):
    """Regression: a read-only store failed with a raw PermissionError on a temporary file; a full disk
    named no file at all."""
    real_open = os.open

    def refuse(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(OSError, match=f"cannot write .*metrics.csv: .*{says}") as caught:
        atomic_write(tmp_path / "run" / "metrics.csv", "step\n")
    assert caught.value.errno == code and ".tmp" not in str(caught.value)


# ---------------------------------------------------------------------------- the measurement cache
@pytest.fixture
def entry(tmp_path):
    """A measurement computed once and cached (counting the computations)."""
    calls = []

    def compute():
        calls.append(1)
        return {"gap": 0.145, "trace": 12.5}

    path = tmp_path / "evals" / "00000060_abc.json"
    assert measure._cached(path, compute) == {"gap": 0.145, "trace": 12.5} and calls == [1]
    return path, compute, calls


def test_a_cached_measurement_is_read_not_recomputed(entry):
    path, compute, calls = entry
    assert measure._cached(path, compute) == {"gap": 0.145, "trace": 12.5} and calls == [1]
    assert path.with_suffix(".sha256").exists()


def test_a_one_digit_edit_of_a_cache_entry_is_never_used(entry):
    """Regression: a cache entry with one digit changed was returned as is (0.195 for 0.145)."""
    path, compute, calls = entry
    path.write_text(path.read_text().replace("0.145", "0.195"))
    with pytest.warns(UserWarning,
                      match=r"00000060_abc.json does not match .*moved to 00000060_abc.json.corrupt"):
        assert measure._cached(path, compute)["gap"] == 0.145
    assert calls == [1, 1] and "0.195" in path.with_name(path.name + ".corrupt").read_text()
    assert measure.read_cached(path)["gap"] == 0.145


@pytest.mark.parametrize("damage", [b"", b'{"gap": 0.1'])
def test_an_empty_or_truncated_cache_entry_is_measured_again(entry, damage):
    """Regression: a truncated or empty cache file aborted measure_many with a bare JSONDecodeError."""
    path, compute, calls = entry
    path.write_bytes(damage)
    path.with_suffix(".sha256").unlink()  # even without its digest (an entry from before the digests)
    with pytest.warns(UserWarning, match="00000060_abc.json is not valid JSON"):
        assert measure._cached(path, compute)["gap"] == 0.145
    assert calls == [1, 1]


def test_an_entry_from_before_the_digests_is_adopted(entry):
    path, compute, calls = entry
    path.with_suffix(".sha256").unlink()
    assert measure._cached(path, compute)["gap"] == 0.145 and calls == [1]
    assert path.with_suffix(".sha256").exists()


def test_a_read_only_store_is_measured_uncached_with_a_warning(tmp_path, monkeypatch):
    """Regression: measuring a finished run of a read-only store failed on its cache."""
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    (tmp_path / "evals").mkdir()
    monkeypatch.setattr(os, "open", read_only)
    with pytest.warns(UserWarning, match="read-only.*without the cache"):
        assert measure._cached(tmp_path / "evals" / "1.json", lambda: {"gap": 1.0}) == {"gap": 1.0}



def thread_count(run, step, protocol=None):
    """A stand-in measurement: the thread count it ran at."""
    return {"threads": torch.get_num_threads()}


def _thread_path(run, step, protocol, **kwargs):
    return run.dir / "evals" / f"threads_{step}.json"


def test_the_last_measurement_left_goes_to_a_worker(tmp_path, monkeypatch):
    """Regression: with one measurement left, measure_many ran it in the calling process at that
    process's thread count (2), not in a worker at the workers' (1): the trace differed at ~1e-8 from
    an uninterrupted run's."""
    from flatlib.runner.pool import Outcome

    monkeypatch.setitem(measure._MEASURES, "threads", (thread_count, _thread_path))
    submitted = []

    def fake_pool(function, jobs, workers, on_done):
        submitted.extend(jobs)
        return [Outcome(value={"threads": job[-1]}) for job in jobs]

    monkeypatch.setattr(measure, "run_jobs", fake_pool)
    run = RunStore(tmp_path).open({"model": {"d_model": 16}})  # the pool orders jobs by width
    result = measure.measure_many("threads", [(run, 1, {})], workers=2, threads_per_worker=1)[0]
    assert len(submitted) == 1 and submitted[0][-1] == 1 and result == {"threads": 1}


def test_in_process_measurements_run_at_the_workers_thread_count(tmp_path, monkeypatch):
    monkeypatch.setitem(measure._MEASURES, "threads", (thread_count, _thread_path))
    run = RunStore(tmp_path).open({"a": 1})
    torch.set_num_threads(2)
    try:
        result = measure.measure_many("threads", [(run, 1, {})], workers=1, threads_per_worker=1)[0]
        assert torch.get_num_threads() == 2  # the caller's count is restored
    finally:
        torch.set_num_threads(1)
    assert result == {"threads": 1}
