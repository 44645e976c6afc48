import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatlib.runner.pool import WORKER_DIED, run_jobs


def square_or_die(job: int) -> int:
    """Module-level (spawned workers import it): job 2 kills its own worker, as the OOM killer would;
    job 3 raises."""
    if job == 2:
        time.sleep(0.2)  # let the other worker start a job: it is stopped with this one
        os.kill(os.getpid(), signal.SIGKILL)
    if job == 3:
        raise ArithmeticError("job 3 fails")
    return job * job


def test_a_dead_worker_fails_its_job_and_the_others_finish():
    """Regression: Pool.imap waited forever for the task of a SIGKILLed worker."""
    done = []
    outcomes = run_jobs(square_or_die, list(range(6)), workers=2, on_done=lambda: done.append(1))
    assert [o.value for o in outcomes] == [0, 1, None, None, 16, 25]
    assert outcomes[2].error == WORKER_DIED and not outcomes[2].ok
    assert "ArithmeticError: job 3 fails" in outcomes[3].error
    assert all(o.ok for i, o in enumerate(outcomes) if i not in (2, 3))
    assert len(done) == 6  # every job reported done exactly once


def test_no_jobs():
    assert run_jobs(square_or_die, [], workers=2) == []


def sleep_and_report(job: str) -> None:
    """Module-level (spawned workers import it): say which process runs the job, then compute on."""
    with open(job, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc): the pool's workers and multiprocessing's helpers."""
    found, frontier = set(), {pid}
    while frontier:
        parents, frontier = frontier, set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) in parents and int(entry) not in found:
                    found.add(int(entry))
                    frontier.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (its parent, now init, reaps it when it will)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts processes through /proc")
def test_workers_die_when_their_parent_is_killed(tmp_path):
    """Regression: after a SIGKILL of the process running a pool (a kernel killed from JupyterLab), its
    workers were re-parented to init and kept computing for minutes on both cores."""
    jobs = [str(tmp_path / f"job{i}") for i in range(2)]
    script = ("import sys\n"
              f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from flatlib.runner.pool import run_jobs\nfrom test_pool import sleep_and_report\n"
              f"run_jobs(sleep_and_report, {jobs!r}, workers=2)\n")
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while time.time() < deadline and not all(Path(j).exists() and Path(j).read_text() for j in jobs):
        time.sleep(0.05)
    workers = {int(Path(j).read_text()) for j in jobs}
    descendants = _children(parent.pid)
    assert workers <= descendants and len(workers) == 2
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(pid) for pid in descendants):
        time.sleep(0.1)
    survivors = sorted(pid for pid in descendants if _alive(pid))
    for pid in survivors:  # leave no orphan behind, whatever the verdict
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"{len(survivors)} of {len(descendants)} child processes outlived their parent"
