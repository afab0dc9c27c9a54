"""Run one ``mbridge`` command as several local ranks (the CLI's relaunch for TP/PP/EP > 1).

Each rank is this same command in a child process with torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...). A rank that fails does not print: it writes its
error to ``$MBRIDGE_ERROR_DIR/rank<N>.json`` (``report_failure``), and this launcher, once every
rank has ended, prints it once: the user errors (the same message from several ranks is one
line), else the traceback of the rank that failed first. When a rank fails the others get a
grace period to notice (gloo fails them within about a second), then are killed. Ctrl-C is
forwarded to the ranks once (they run in their own session), so each removes what it was writing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ERROR_DIR = "MBRIDGE_ERROR_DIR"
GRACE_S = 10.0


def report_failure(exc: BaseException, status: int, user: bool, text: str = "") -> bool:
    """On a rank started by ``relaunch``: record ``exc`` (``user``: its message is the whole
    story; ``status``: the exit status it means) for the launcher and return True (the rank then
    exits quietly); elsewhere return False (the caller prints)."""
    where = os.environ.get(ERROR_DIR)
    if not where:
        return False
    rank = os.environ.get("RANK", "0")
    record = {"rank": int(rank), "user": user, "status": status, "message": text or str(exc), "type": type(exc).__name__,
              "traceback": "".join(traceback.format_exception(exc))}
    path = Path(where) / f"rank{rank}.json"
    path.with_suffix(".tmp").write_text(json.dumps(record))
    path.with_suffix(".tmp").rename(path)
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(argv: list[str], world: int, debug: bool = False) -> int:
    """Run ``mbridge <argv>`` as ``world`` local ranks; return the exit status to use."""
    errdir = tempfile.mkdtemp(prefix="mbridge-ranks-")
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), ERROR_DIR: errdir}
    procs = [subprocess.Popen([sys.executable, "-m", "bridges.cli", *argv], start_new_session=True,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(world)]
    order: list[int] = []  # ranks in the order they failed
    interrupted = False
    try:
        interrupted = _wait(procs, order)
        return _verdict(procs, order, Path(errdir), debug, interrupted)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(errdir, ignore_errors=True)


def _wait(procs: list[subprocess.Popen], order: list[int]) -> bool:
    deadline, interrupted = None, False
    while any(p.poll() is None for p in procs):
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:
            if not interrupted:  # forward once; the ranks clean up, then exit
                interrupted = True
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGINT)
                deadline = time.monotonic() + GRACE_S
        for r, p in enumerate(procs):
            if p.poll() not in (None, 0) and r not in order:
                order.append(r)
                deadline = deadline or time.monotonic() + GRACE_S
        if deadline and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    for r, p in enumerate(procs):
        if p.returncode and r not in order:
            order.append(r)
    return interrupted


def _verdict(procs, order: list[int], errdir: Path, debug: bool, interrupted: bool) -> int:
    if not order:
        return 0
    records = {}
    for r in order:
        f = errdir / f"rank{r}.json"
        if f.exists():
            records[r] = json.loads(f.read_text())
    if interrupted:
        print("mbridge: interrupted; the output path was left as it was before", file=sys.stderr)
        return 130
    user = [records[r] for r in order if r in records and records[r]["user"]]
    if user:
        seen = []
        for rec in user:
            if rec["message"] not in seen:
                seen.append(rec["message"])
        for rec in user if debug else []:
            print(f"--- rank {rec['rank']} ---\n{rec['traceback']}", file=sys.stderr)
        for msg in seen:
            print(f"mbridge: error: {msg}", file=sys.stderr)
        return user[0]["status"]
    first = order[0]
    if first in records:
        print(f"mbridge: rank {first} failed:\n{records[first]['traceback']}", file=sys.stderr, end="")
    else:
        print(f"mbridge: rank {first} exited with status {procs[first].returncode}", file=sys.stderr)
    return 1
