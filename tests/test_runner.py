"""The rank pool never hangs the session: a raising, dying or hung rank fails the task with
the rank's traceback within the timeout, and the pool comes back for the next task."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conformance.runner import RankError

ROOT = Path(__file__).resolve().parents[1]


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


# -- no rank outlives its owner --------------------------------------------------------------------
OWNER = """
import json, sys, threading, time
import multiprocessing.forkserver as fs
from conformance.runner import RankPool

pool = RankPool(2)
pool.start()
helper = pool.run("tests.runner_tasks:start_helper", ranks=[1])[0]
if sys.argv[1] == "sigkill":  # rank 0 waits in a collective that rank 1 never joins
    threading.Thread(target=pool.run, args=("tests.runner_tasks:barrier",),
                     kwargs={"ranks": [0], "timeout": 600}, daemon=True).start()
    time.sleep(0.5)
print(json.dumps({"ranks": [p.pid for p in pool._procs], "helper": helper,
                  "forkserver": fs._forkserver._forkserver_pid}), flush=True)
if sys.argv[1] == "exit":
    sys.exit(0)  # without close()
time.sleep(600)
"""


def _alive(pid: int, start: str | None = None) -> bool:
    """``pid`` runs (not a zombie), and is the same process (start time) as when first seen."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return stat[0] != "Z" and (start is None or stat[19] == start)


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("end", ["sigkill", "exit"])
def test_no_pool_process_outlives_its_owner(end, tmp_path):
    """The owner of a pool SIGKILLed (a rank blocked in a collective, another idle) or exiting
    without close(): its ranks, the helper a rank started and the forkserver all go."""
    err, procs = open(tmp_path / "stderr", "w"), {}
    owner = subprocess.Popen([sys.executable, "-c", OWNER, end], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=err, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = owner.stdout.readline()
        assert line, f"owner failed:\n{(tmp_path / 'stderr').read_text()[-3000:]}"
        pids = json.loads(line)
        procs = {pid: _start_time(pid) for pid in [*pids["ranks"], pids["helper"], pids["forkserver"]]}
        assert all(_alive(pid) for pid in procs)
        if end == "sigkill":
            owner.kill()
        assert owner.wait(30) is not None
        deadline = time.monotonic() + 10
        while (left := [pid for pid, start in procs.items() if _alive(pid, start)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"still alive after the owner ended ({end}): {left} of {pids}"
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
        err.close()
        for pid, start in procs.items():
            if _alive(pid, start):  # a failed run leaves nothing behind either
                os.kill(pid, signal.SIGKILL)


def test_a_dead_ranks_helpers_go_with_the_pool_restart(conformance):
    helper = conformance.pool.run("tests.runner_tasks:start_helper", ranks=[1])[0]
    start = _start_time(helper)
    with pytest.raises(RankError, match=r"rank 1 died"):
        conformance.pool.run("tests.runner_tasks:die_on", rank=1, timeout=60)
    deadline = time.monotonic() + 5
    while _alive(helper, start) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(helper, start)
    if alive:
        os.kill(helper, signal.SIGKILL)
    assert not alive, "a helper of a dead rank survived the pool's restart"
