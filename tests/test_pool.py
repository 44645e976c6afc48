import os
import signal
import time

from flatlib.pool import WORKER_DIED, run_jobs


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
