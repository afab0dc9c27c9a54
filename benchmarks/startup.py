"""Start-up benchmark (#20): wall time of fresh processes for ``mbridge --help``, ``mbridge
inspect`` (dense, MoE, MLA fixtures, a directory holding a config.json), a pytest run of one
trivial test with and without the pytest-mbridge plugin, and, for reference, the bare interpreter
and ``import torch, megatron.core, transformers``.

    .venv/bin/python benchmarks/startup.py                  # median of 7, markdown table
    .venv/bin/python benchmarks/startup.py -n 15 --json out.json

Every figure is a new process (``subprocess``), this checkout's code first on PYTHONPATH. The
cases run round-robin (run i of every case, then run i + 1, every other round in reverse
order), so a change in the machine's load falls on all of them alike; one warm-up round is discarded (page cache, __pycache__). CPU is the
child's user + system time: on a shared machine the wall time also holds the waiting.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cases(tmp: Path) -> dict[str, tuple[list[str], Path]]:
    """name -> (argv, cwd)."""
    py = sys.executable
    mbridge = [py, "-m", "bridges.cli"]
    config_dir = tmp / "config_dir"
    config_dir.mkdir()
    shutil.copy(ROOT / "fixtures/configs/Qwen/Qwen3-8B/config.json", config_dir)
    tests = tmp / "trivial"
    tests.mkdir()
    (tests / "test_trivial.py").write_text("def test_one():\n    assert True\n")
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_trivial.py"]
    return {
        "python -c pass": ([py, "-c", "pass"], ROOT),
        "mbridge --help": ([*mbridge, "--help"], ROOT),
        "mbridge inspect Qwen/Qwen3-8B (dense)": ([*mbridge, "inspect", "Qwen/Qwen3-8B"], ROOT),
        "mbridge inspect Qwen/Qwen3-30B-A3B (MoE)": ([*mbridge, "inspect", "Qwen/Qwen3-30B-A3B"], ROOT),
        "mbridge inspect deepseek-ai/DeepSeek-V3 (MLA)": ([*mbridge, "inspect", "deepseek-ai/DeepSeek-V3"], ROOT),
        "mbridge inspect <dir with config.json>": ([*mbridge, "inspect", str(config_dir)], ROOT),
        "pytest, 1 trivial test, plugin loaded": (pytest, tests),
        "pytest, 1 trivial test, -p no:mbridge": ([*pytest, "-p", "no:mbridge"], tests),
        "python -c 'import torch, megatron.core, transformers'":
            ([py, "-c", "import torch, megatron.core, transformers"], ROOT),
    }


def _once(argv: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """Wall and CPU seconds of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} (in {cwd}) failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def measure(n: int, warmup: int = 1) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mbridge-startup-") as d:
        todo = cases(Path(d))
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in todo}
        for i in range(warmup + n):
            for name, (argv, cwd) in list(todo.items())[::-1 if i % 2 else 1]:
                result = _once(argv, cwd, env)
                if i >= warmup:
                    runs[name].append(result)
    out = {"machine": f"{_cpu()}, {os.cpu_count()} CPUs",
           "python": platform.python_version(), "runs": n,
           "load_before": [round(x, 2) for x in load_before],
           "load_after": [round(x, 2) for x in os.getloadavg()], "cases": {}}
    for name, results in runs.items():
        walls = [w for w, _ in results]
        out["cases"][name] = {"argv": [Path(a).name if a == sys.executable else a for a in todo[name][0]],
                              "wall_s": [round(w, 4) for w in walls],
                              "median_s": round(statistics.median(walls), 3),
                              "min_s": round(min(walls), 3), "max_s": round(max(walls), 3),
                              "cpu_median_s": round(statistics.median(c for _, c in results), 3)}
    with_, without = (runs[f"pytest, 1 trivial test, {k}"] for k in ("plugin loaded", "-p no:mbridge"))
    out["plugin_overhead_s"] = {k: round(statistics.median(r[i] for r in with_) - statistics.median(r[i] for r in without), 3)
                                for i, k in enumerate(("wall", "cpu"))}
    return out


def table(result: dict) -> str:
    lines = ["| case | median s | min s | max s | CPU s (median) |", "|---|---:|---:|---:|---:|"]
    for name, c in result["cases"].items():
        lines.append(f"| {name} | {c['median_s']:.2f} | {c['min_s']:.2f} | {c['max_s']:.2f} | {c['cpu_median_s']:.2f} |")
    lines.append("")
    over = result["plugin_overhead_s"]
    lines.append(f"Plugin overhead (median with - median without): wall {over['wall']:+.3f} s, "
                 f"CPU {over['cpu']:+.3f} s. "
                 f"{result['runs']} runs each, {result['machine']}, Python {result['python']}, "
                 f"load average {result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=7, help="runs per case (default 7)")
    ap.add_argument("--warmup", type=int, default=1, help="discarded rounds first (default 1)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args(argv)
    result = measure(args.n, args.warmup)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
