"""The rank pool never hangs the session: a raising, dying or hung rank fails the task with
the rank's traceback within the timeout, and the pool comes back for the next task."""
import time

import pytest

from conformance.runner import RankError


def test_every_rank_answers(conformance):
    assert conformance.pool.run("tests.runner_tasks:rank_and_world") == [(r, 4) for r in range(4)]


def test_a_raising_rank_fails_the_task_with_its_traceback(conformance):
    t = time.monotonic()
    with pytest.raises(RankError) as e:
        conformance.pool.run("tests.runner_tasks:raise_on", rank=2, timeout=60)
    assert "--- rank 2 ---" in str(e.value) and "injected failure on rank 2" in str(e.value)
    assert time.monotonic() - t < 30
    assert len(conformance.pool.run("tests.runner_tasks:rank_and_world")) == 4  # restarted


def test_a_dying_rank_is_reported(conformance):
    with pytest.raises(RankError, match=r"rank 1 died \(exit code 3\)"):
        conformance.pool.run("tests.runner_tasks:die_on", rank=1, timeout=60)
    assert len(conformance.pool.run("tests.runner_tasks:rank_and_world")) == 4


def test_a_hung_task_times_out(conformance):
    t = time.monotonic()
    with pytest.raises(RankError, match="timed out"):
        conformance.pool.run("tests.runner_tasks:hang", seconds=120, timeout=3)
    assert time.monotonic() - t < 15
    assert len(conformance.pool.run("tests.runner_tasks:rank_and_world")) == 4
