"""Distributed runner: a pool of rank processes that stay up across tests.

The heavy imports (megatron.core, transformers) are paid once, in a forkserver that preloads
them; the ranks fork from it. Each task runs one function on every rank (or a subset) and
returns the per-rank results. A rank that raises fails the task with its traceback; a rank
that dies or hangs fails it within the timeout, and the pool is restarted: never a hang.

No rank outlives the process that owns the pool, however that process ends (see
``_die_with_owner``): close() runs at exit, and each rank watches its owner itself, so a
SIGKILLed / SIGTERMed / timed-out pytest leaves no rank, rank helper or forkserver behind.
"""
from __future__ import annotations

import atexit
import ctypes
import importlib
import io
import itertools
import multiprocessing as mp
import multiprocessing.util  # noqa: F401  (registers its atexit hook before ours: ours runs first)
import os
import queue
import select
import signal
import sys
import threading
import time
import traceback
from typing import Any

PRELOAD = ["conformance._preload"]
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_LIVE: set["RankPool"] = set()  # pools with ranks up: closed at exit


@atexit.register
def _close_live_pools() -> None:
    """A pool nobody closed is closed at exit, before multiprocessing's own exit hook, which
    would otherwise wait forever on the (non-daemonic) ranks."""
    for pool in list(_LIVE):
        try:
            pool.close()
        except Exception:
            pass


class RankError(RuntimeError):
    """A rank raised, died or timed out; the message holds the rank's traceback."""


def _dumps(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _kill_group_and_exit() -> None:
    """This rank and everything it started (its process group) die now."""
    if os.getpgrp() == os.getpid():  # never the owner's group
        try:
            os.killpg(os.getpid(), signal.SIGKILL)
        except OSError:
            pass
    os._exit(1)


def _watch(fds: list[int], lifeline) -> None:
    try:
        select.select(fds, [], [])  # readable: the owner is gone (pidfd), or its end of the lifeline
    except OSError:
        return
    _kill_group_and_exit()


def _die_with_owner(owner: int, lifeline, pdeathsig: bool) -> None:
    """Make this rank exit when the process that owns the pool exits, however it exits.

    - A daemon thread waits on a pidfd of the owner and on the lifeline pipe, whose only write
      end the owner holds (its end closes on any exit, SIGKILL included, and on close()); then
      it kills this rank's process group: the rank and the helpers it started (e.g. the
      process dist_checkpointing spawns). A rank blocked in a collective releases the GIL, so
      the thread runs.
    - The forkserver exits when every write end of its "alive" pipe is closed, and multiprocessing
      hands each rank a copy (so that a rank could use the forkserver too): while a rank lives,
      the forkserver outlives its owner, and the ranks, their parent. We close our copy, so the
      forkserver exits with its owner, and ask the kernel to SIGKILL us when our parent exits
      (PR_SET_PDEATHSIG): a last resort that needs no Python (a rank stuck holding the GIL).
      Only where the parent is the forkserver (single-threaded) or the owner's main thread: the
      signal comes when the parent *thread* ends.
    """
    try:
        os.setpgid(0, 0)  # own group: the helpers we start go with us
    except OSError:
        pass
    from multiprocessing import forkserver

    fs = forkserver._forkserver
    if getattr(fs, "_forkserver_alive_fd", None) is not None:
        try:
            os.close(fs._forkserver_alive_fd)
        except OSError:
            pass
        fs._forkserver_alive_fd = None
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except Exception:
            pass
    fds = [lifeline.fileno()]
    try:
        fds.append(os.pidfd_open(owner))
    except (AttributeError, OSError):  # no pidfd: the lifeline alone
        pass
    threading.Thread(target=_watch, args=(fds, lifeline), name="owner-watch", daemon=True).start()


def _worker(rank: int, world: int, port: int, inbox, outbox, path: list[str], env: dict,
            owner: int, lifeline, pdeathsig: bool) -> None:
    _die_with_owner(owner, lifeline, pdeathsig)
    sys.path[:] = path
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch._dynamo

    torch.set_num_threads(1)
    # Models run eagerly: Megatron-Core's jit_fuser is torch.compile, which would compile the
    # fused element-wise helpers (gated attention's output gate, the gated delta net's gating)
    # once per rank and input shape: seconds each on a CPU, and nothing the checks look at.
    torch._dynamo.config.disable = True
    try:
        from bridges.core.parallel import init_distributed

        init_distributed()
    except BaseException:
        outbox.put((None, rank, False, _dumps(traceback.format_exc())))
        return
    outbox.put((None, rank, True, b""))  # ready
    while True:
        task = inbox.get()
        if task is None:
            break
        tid, fn, kwargs = task
        try:
            mod, name = fn.split(":")
            result = getattr(importlib.import_module(mod), name)(**kwargs)
            outbox.put((tid, rank, True, _dumps(result)))
        except BaseException:
            outbox.put((tid, rank, False, _dumps(traceback.format_exc())))


def _kill(p) -> None:
    """SIGKILL rank ``p`` and its process group (the helpers it started). The group's id is the
    rank's pid, which the kernel does not reuse while the group has members."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (OSError, TypeError):  # no such group (yet / any more)
        pass
    p.kill()


class RankPool:
    """``world`` rank processes over gloo (CPU) or NCCL (one GPU per rank)."""

    def __init__(self, world: int = 4, start_method: str | None = None):
        import torch

        self.world = world
        # forkserver shares the preloaded imports; a CUDA process must not be forked from a
        # parent whose imports touched CUDA, so GPU ranks are spawned (and import themselves).
        self._start_method = start_method or ("spawn" if torch.cuda.is_available() else "forkserver")
        self._procs: list = []
        self._lifeline = None  # write end of the pipe the ranks watch (see _die_with_owner)
        self._ids = itertools.count()

    def start(self, attempts: int = 3, timeout: float = 300.0) -> None:
        """Start the ranks and wait until all have joined the process group. A failed
        rendezvous (e.g. the free port was taken meanwhile) is retried on a new port."""
        for attempt in range(attempts):
            self._spawn()
            ready, errors, deadline = set(), {}, time.monotonic() + timeout
            while len(ready) + len(errors) < self.world and time.monotonic() < deadline:
                try:
                    tid, rank, ok, data = self._out.get(timeout=0.2)
                except queue.Empty:
                    errors.update({r: f"rank {r} died (exit code {p.exitcode})"
                                   for r, p in enumerate(self._procs) if not p.is_alive() and r not in ready})
                    continue
                (ready.add(rank) if ok else errors.__setitem__(rank, _loads(data)))
            if len(ready) == self.world:
                return
            self.close(graceful=False)
            if attempt == attempts - 1:
                raise RankError("rank pool failed to start:\n" + "\n".join(
                    f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())) or "timed out")

    def _spawn(self) -> None:
        from bridges.core.parallel import free_port

        ctx = mp.get_context(self._start_method)
        if self._start_method == "forkserver":
            ctx.set_forkserver_preload(PRELOAD)
        self._out = ctx.Queue()
        self._in = [ctx.Queue() for _ in range(self.world)]
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k.startswith(("PYTHON", "CUDA", "NCCL", "HF_", "TRANSFORMERS"))}
        lifeline_r, self._lifeline = ctx.Pipe(duplex=False)
        # forkserver ranks: their parent is the (single-threaded) forkserver; spawned ranks: the
        # thread that starts them, which must then be the main thread (see _die_with_owner)
        pdeathsig = self._start_method == "forkserver" or threading.current_thread() is threading.main_thread()
        # Not daemonic: ranks may start helpers of their own (dist_checkpointing's writer
        # does). No rank outlives its owner: close() runs at exit, and _die_with_owner.
        self._procs = [ctx.Process(target=_worker, daemon=False,
                                   args=(r, self.world, port, self._in[r], self._out, list(sys.path), env,
                                         os.getpid(), lifeline_r, pdeathsig))
                       for r in range(self.world)]
        _LIVE.add(self)
        try:
            for p in self._procs:
                p.start()
        finally:
            lifeline_r.close()  # the ranks have their copies; the owner keeps only the write end

    def close(self, graceful: bool = True) -> None:
        """Stop the ranks (asked to finish, or killed), and every helper they started."""
        procs, self._procs = self._procs, []
        for q, p in zip(getattr(self, "_in", []), procs):
            if p.pid is None:  # never started
                continue
            if not graceful:
                _kill(p)
            elif p.is_alive():
                try:
                    q.put(None)
                except Exception:
                    pass
        deadline = time.monotonic() + 5
        for p in procs:
            if p.pid is None:
                continue
            p.join(max(0.0, deadline - time.monotonic()))
            _kill(p)  # still running; or gone, leaving helpers in its process group
            p.join(1)
        if self._lifeline is not None:
            self._lifeline.close()  # a rank still alive somehow exits by itself
            self._lifeline = None
        _LIVE.discard(self)

    def run(self, fn: str, ranks: list[int] | None = None, timeout: float = 300.0,
            **kwargs: Any) -> list[Any]:
        """Run ``module:function(**kwargs)`` on the given ranks (all by default); return the
        results in rank order. Raises RankError naming the failing rank(s)."""
        if not self._procs:
            self.start()
        ranks = list(range(self.world)) if ranks is None else ranks
        tid = next(self._ids)
        for r in ranks:
            self._in[r].put((tid, fn, kwargs))
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        grace = None  # after a first error, give the other ranks a moment to report
        while len(results) + len(errors) < len(ranks):
            now = time.monotonic()
            limit = min(deadline, grace) if grace else deadline
            if now > limit:
                break
            try:
                got_tid, rank, ok, data = self._out.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r in ranks if not self._procs[r].is_alive() and r not in results]
                for r in dead:
                    errors.setdefault(r, f"rank {r} died (exit code {self._procs[r].exitcode})")
                    grace = grace or time.monotonic() + 2
                continue
            if got_tid != tid:
                continue  # stale answer from a task that was abandoned
            elif ok:
                results[rank] = _loads(data)
            else:
                errors[rank] = _loads(data)
                grace = grace or time.monotonic() + 2
        missing = [r for r in ranks if r not in results and r not in errors]
        if errors or missing:
            self.close(graceful=False)  # ranks may be stuck in a collective: start afresh
            parts = [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
            if missing:
                why = "timed out" if not errors else "did not finish after another rank failed"
                parts.append(f"ranks {missing} {why} ({fn}, limit {timeout:.0f} s)")
            raise RankError(f"{fn} failed:\n" + "\n".join(parts))
        return [results[r] for r in ranks]
