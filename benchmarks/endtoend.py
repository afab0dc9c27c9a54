"""The real ``mbridge`` command line, timed end to end, with the peak RSS of each of its ranks.

    from endtoend import run_cli, bare_imports
    run_cli(["convert", "import", "--hf", CKPT, "--out", OUT, "--tp", "2"])

``run_cli`` starts ``python -m bridges.cli ARGS`` (what the ``mbridge`` console script runs) as
one process; for a layout of several ranks the CLI relaunches itself as that many local ranks
(bridges/launch.py). While it runs, every process under it is looked at every 20 ms: its peak
resident set (``VmHWM`` of ``/proc/<pid>/status``, a high-water mark kept by the kernel, so a
sample taken any time after the peak sees it) and its ``RANK`` (from ``/proc/<pid>/environ``;
the launcher has none; any other process under it counts as ``other``). A peak reached in the last 20 ms before a process exits may be missed.

``bare_imports`` times a process that only runs ``import torch, megatron.core, transformers``
(interpreter start to exit): what any conversion process pays before it does anything.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARE = "import torch, megatron.core, transformers"
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(extra: dict | None = None) -> dict:
    """This environment without torchrun's variables, offline, quiet; the repository first on
    the path (the package may be installed from another checkout)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.update(extra or {})
    return env


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rank(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"RANK="):
                    return item[5:].decode()
    except OSError:
        pass
    return None


def run_cli(args: list[str], env: dict | None = None, timeout: float = 600.0,
            interval: float = 0.02, root: Path = ROOT) -> dict:
    """Run ``mbridge ARGS`` from the checkout ``root`` (its code comes first on the path: ``-m``
    puts the working directory first); return ``{wall_s, rc, peak_rss: {"launcher" or
    "rank<N>": bytes}, output}`` (``rc`` None when it ran past ``timeout`` and was killed)."""
    cmd = [sys.executable, "-m", "bridges.cli", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env or clean_env(), cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    peaks: dict[int, int] = {}
    names: dict[int, str] = {}
    out_chunks: list[bytes] = []
    import threading

    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    rc = None
    while True:
        for pid in descendants(proc.pid):
            h = _hwm(pid)
            if h is None:
                continue
            peaks[pid] = max(peaks.get(pid, 0), h)
            if pid not in names:  # a child between fork and exec has its parent's environment yet
                r = _rank(pid)
                if r is not None:
                    names[pid] = f"rank{r}"
                elif pid == proc.pid:
                    names[pid] = "launcher"
        rc = proc.poll()
        if rc is not None:
            break
        if time.perf_counter() - t0 > timeout:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
            break
        time.sleep(interval)
    wall = time.perf_counter() - t0
    reader.join(timeout=5)
    by_name: dict[str, int] = {}
    for pid, peak in peaks.items():
        name = names.get(pid, "other")  # e.g. a helper process a rank started
        by_name[name] = max(by_name.get(name, 0), peak)
    if "launcher" in by_name and not any(k.startswith("rank") for k in by_name):
        by_name["rank0"] = by_name.pop("launcher")  # one process: it is rank 0
    text = b"".join(out_chunks).decode(errors="replace")
    return {"wall_s": wall, "rc": rc, "peak_rss": by_name, "output": text[-4000:]}


def bare_imports(env: dict | None = None, timeout: float = 300.0) -> dict:
    """Wall time and peak RSS of ``python -c 'import torch, megatron.core, transformers'``."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", BARE], env=env or clean_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{BARE!r} failed: {proc.stderr[-2000:]}")
    return {"wall_s": wall}
