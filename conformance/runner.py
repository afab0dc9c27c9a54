"""Distributed runner: a pool of rank processes that stay up across tests.

The heavy imports (megatron.core, transformers) are paid once, in a forkserver that preloads
them; the ranks fork from it. Each task runs one function on every rank (or a subset) and
returns the per-rank results. A rank that raises fails the task with its traceback; a rank
that dies or hangs fails it within the timeout, and the pool is restarted: never a hang.
"""
from __future__ import annotations

import atexit
import importlib
import io
import itertools
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from typing import Any

PRELOAD = ["conformance._preload"]


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


def _worker(rank: int, world: int, port: int, inbox, outbox, path: list[str], env: dict) -> None:
    sys.path[:] = path
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
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


class RankPool:
    """``world`` rank processes over gloo (CPU) or NCCL (one GPU per rank)."""

    def __init__(self, world: int = 4, start_method: str | None = None):
        import torch

        self.world = world
        # forkserver shares the preloaded imports; a CUDA process must not be forked from a
        # parent whose imports touched CUDA, so GPU ranks are spawned (and import themselves).
        self._start_method = start_method or ("spawn" if torch.cuda.is_available() else "forkserver")
        self._procs: list = []
        self._ids = itertools.count()
        atexit.register(self.close)

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
        # Not daemonic: ranks may start helpers of their own (dist_checkpointing's writer
        # does); close() runs at exit (registered in __init__) so no rank outlives the session.
        self._procs = [ctx.Process(target=_worker, daemon=False,
                                   args=(r, self.world, port, self._in[r], self._out, list(sys.path), env))
                       for r in range(self.world)]
        for p in self._procs:
            p.start()

    def close(self, graceful: bool = True) -> None:
        for q, p in zip(getattr(self, "_in", []), self._procs):
            if not graceful:
                p.kill()
            elif p.is_alive():
                try:
                    q.put(None)
                except Exception:
                    pass
        deadline = time.monotonic() + 5
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1)
        self._procs = []

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
