"""Helpers shared by the benchmark scripts: phase timing and per-phase peak memory.

Each phase records its wall time and the process's CPU time (all threads: on a shared machine
the CPU time shows the work done, the wall time also the waiting). Peak memory is read from
``/proc/self/status`` (``VmHWM``: the process's peak resident set, the same figure
``resource.getrusage().ru_maxrss`` reports). Between phases the peak is reset by
writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), so each phase gets its own peak; the
lifetime peak is kept as the maximum over phases. A sampler thread (every 10 ms) also tracks the
peaks of ``RssAnon`` (heap: tensors) and ``RssFile`` (file pages mapped into the process, e.g.
memory-mapped safetensors shards), which ``VmHWM`` lumps together.
"""
from __future__ import annotations

import json
import os
import threading
import time

MiB = 2**20


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phases:
    """Wall time and memory peaks per phase: ``with phases("load"): ...``."""

    def __init__(self, t0: float | None = None, sample: bool = True):
        # t0: wall-clock time (time.time()) at which the parent spawned this process
        self.t0 = t0
        self.rows: dict[str, dict] = {}
        self.lifetime_hwm = 0
        self._anon = self._file = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.resettable = _reset_peak()
        if sample:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            s = status()
            with self._lock:
                self._anon = max(self._anon, s.get("RssAnon", 0))
                self._file = max(self._file, s.get("RssFile", 0))

    def startup(self, name: str = "start+imports") -> None:
        """Record the time from spawn (t0) to now as a phase, with the peak so far."""
        s = status()
        wall = time.time() - self.t0 if self.t0 else float("nan")
        self._close(name, wall, s, time.process_time())

    def _close(self, name: str, wall: float, s: dict, cpu: float) -> None:
        with self._lock:
            anon, file = max(self._anon, s["RssAnon"]), max(self._file, s["RssFile"])
            self._anon, self._file = s["RssAnon"], s["RssFile"]
        self.rows[name] = {"wall_s": wall, "cpu_s": cpu, "peak_rss": s["VmHWM"], "peak_anon": anon,
                           "peak_file": file, "end_rss": s["VmRSS"]}
        self.lifetime_hwm = max(self.lifetime_hwm, s["VmHWM"])
        self.resettable = _reset_peak()

    def __call__(self, name: str):
        phases = self

        class _Ctx:
            def __enter__(self):
                self.t, self.cpu = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                if exc[0] is None:
                    phases._close(name, time.perf_counter() - self.t, status(),
                                  time.process_time() - self.cpu)

        return _Ctx()

    def result(self, **extra) -> dict:
        import resource

        self._stop.set()
        hwm = max(self.lifetime_hwm, status()["VmHWM"])
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"phases": self.rows, "peak_rss": hwm, "ru_maxrss_last_phase": ru.ru_maxrss * 1024,
                "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime, "pid": os.getpid(), **extra}


def emit(path: str | None, obj: dict) -> None:
    """Write the result as JSON to ``path`` (or stdout)."""
    text = json.dumps(obj, indent=1, default=str)
    if path:
        with open(path, "w") as f:
            f.write(text)
    else:
        print(text)
