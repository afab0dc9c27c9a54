"""Conversion benchmark on a CUDA machine: import straight into GPU parameters, export from them,
and the whole ``mbridge convert import`` / ``export`` commands, in GB/s against the read and
write floors of the same machine. Made to be run blind, within a time limit:

    python benchmarks/run.py --gpu --models qwen3-8b-full --out-dir RESULTS   # 1 x H200
    python benchmarks/run.py --gpu --models qwen3-30b-a3b-full --out-dir R    # >= 2 GPUs: EP2, EP4
    python benchmarks/run.py --gpu --device cpu --models tiny --out-dir R     # check it on CPU

Per model: a synthetic checkpoint of the published shapes (benchmarks/make_checkpoint.py) under
``--tmp`` (default $TMPDIR), then, each step a fresh process, in this order: read floor and write
floor (benchmarks/floors.py ``--device``), the bridge alone at each layout (benchmarks/convert.py:
``load_hf_weights`` into GPU parameters, ``save_hf_pretrained`` from them), the bare imports, then
``mbridge convert import`` and ``export`` at each layout (benchmarks/endtoend.py). Results go to
``OUT_DIR/gpu-bench.json`` after every step (a step that fails or runs out of time is recorded as
such and the rest go on while time is left), and a summary to ``OUT_DIR/summary.txt``. Layouts
needing more devices than the machine has are skipped, with the reason. ``--budget`` (seconds,
default 500) bounds the whole run: a step gets what is left, and none starts with under 20 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from endtoend import bare_imports, clean_env, run_cli  # noqa: E402
from make_checkpoint import load_config, make_checkpoint  # noqa: E402

# key: (fixture config, config overrides, layouts)
MODELS = {
    "qwen3-8b-full": ("Qwen/Qwen3-8B", {}, ("tp1",)),  # 16.4 GB
    "qwen3-30b-a3b-full": ("Qwen/Qwen3-30B-A3B", {}, ("ep2", "ep4")),  # 61 GB: disk >= 130 GB
    "qwen3-30b-a3b-8l": ("Qwen/Qwen3-30B-A3B", {"num_hidden_layers": 8}, ("tp1", "ep2", "ep4")),
    "tiny": ("Qwen/Qwen3-0.6B", {"num_hidden_layers": 2, "vocab_size": 4096}, ("tp1",)),
    "tiny-moe": ("Qwen/Qwen3-30B-A3B", {"num_hidden_layers": 1, "num_experts": 8,
                                        "vocab_size": 4096}, ("tp1", "ep2")),
}
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "ep2": (1, 2), "ep4": (1, 4), "ep8": (1, 8)}  # (TP, EP)
MIN_STEP_S = 20.0
GB = 1e9


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def devices(device: str) -> int:
    if device == "cpu":
        return os.cpu_count() or 1
    import torch

    return torch.cuda.device_count()


def environment(device: str) -> dict:
    from importlib.metadata import version

    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "device": device,
           "host": platform.node()}
    for p in ("torch", "megatron-core", "transformers", "safetensors"):
        try:
            env[p] = version(p)
        except Exception:  # noqa: BLE001
            env[p] = None
    try:
        env["mem_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    if device != "cpu":
        try:
            env["gpus"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError) as e:
            env["gpus"] = f"nvidia-smi: {e}"
    return env


def _step(res: dict, name: str, budget: Budget, save, fn):
    """Run one step into ``res["steps"][name]``: its result, or why it has none."""
    left = budget.left()
    if left < MIN_STEP_S:
        res["steps"][name] = {"skipped": f"time budget: {left:.0f} s left"}
        save()
        return None
    t = time.monotonic()
    try:
        out = fn(left)
        res["steps"][name] = {"ok": True, **out}
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        res["steps"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[-3000:],
                              "traceback": traceback.format_exc()[-3000:]}
        out = None
    res["steps"][name]["step_s"] = time.monotonic() - t
    print(f"[gpu-bench] {name}: " + ("ok" if out is not None else "FAILED") +
          f" in {time.monotonic() - t:.1f} s ({budget.left():.0f} s left)", flush=True)
    save()
    return out


def bench_model(key: str, device: str, tmp: Path, work: Path, budget: Budget, save,
                res: dict) -> None:
    from run import spawn  # benchmarks/run.py

    model, overrides, layouts = MODELS[key]
    env_extra = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    ndev = devices(device)
    res.update(model=model, overrides=overrides, steps={}, skipped_layouts={})
    usable = []
    for lay in layouts:
        world = LAYOUTS[lay][0] * LAYOUTS[lay][1]
        if world > ndev:
            res["skipped_layouts"][lay] = f"needs {world} devices, {ndev} here"
        else:
            usable.append(lay)
    ckpt, out, mg = tmp / key, tmp / "out", tmp / "megatron"

    def make(_left):
        cfg = load_config(model)
        cfg.update(overrides)
        info = make_checkpoint(cfg, ckpt)
        res["bytes"] = info["bytes"]
        return info

    if _step(res, "checkpoint", budget, save, make) is None:
        return
    nbytes = res["bytes"]

    def floor(mode):
        def go(left):
            args = [mode, str(ckpt)] + ([str(out)] if mode == "write" else []) + ["--device", device]
            r = spawn("floors.py", args, work, f"{key}-{mode}", timeout=left, env_extra=env_extra)
            shutil.rmtree(out, ignore_errors=True)
            s = r["ranks"][0]["phases"][mode]["wall_s"]
            return {"seconds": s, "GB_per_s": nbytes / s / GB, "peak_rss": r["ranks"][0]["peak_rss"]}
        return go

    _step(res, "read_floor", budget, save, floor("read"))
    _step(res, "write_floor", budget, save, floor("write"))

    for lay in usable:
        tp, ep = LAYOUTS[lay]

        def bridge(left, tp=tp, ep=ep, lay=lay):
            r = spawn("convert.py", [str(ckpt), str(out), "--tp", str(tp), "--ep", str(ep)], work,
                      f"{key}-bridge-{lay}", world=tp * ep, timeout=left, env_extra=env_extra)
            shutil.rmtree(out, ignore_errors=True)
            load = max(x["phases"]["load"]["wall_s"] for x in r["ranks"])
            export = max(x["phases"]["export"]["wall_s"] for x in r["ranks"])
            return {"load_s": load, "load_GB_per_s": nbytes / load / GB, "export_s": export,
                    "export_GB_per_s": nbytes / export / GB, "process_s": r["wall_s"],
                    "written_bytes": r["ranks"][0]["written_bytes"],
                    "device": r["ranks"][0].get("device"),
                    "peak_rss": [x["peak_rss"] for x in r["ranks"]],
                    "gpu_peak_bytes": [x.get("gpu_peak_bytes") for x in r["ranks"]],
                    "phases": [x["phases"] for x in r["ranks"]]}

        _step(res, f"bridge_{lay}", budget, save, bridge)

    env = clean_env(env_extra)
    _step(res, "bare_imports", budget, save, lambda left: bare_imports(env, timeout=left))
    for lay in usable:
        tp, ep = LAYOUTS[lay]
        flags = ["--tp", str(tp), "--ep", str(ep)]

        def cli(direction, left, flags=flags):
            src = ["--hf", str(ckpt)] if direction == "import" else ["--megatron", str(mg)]
            dst = mg if direction == "import" else out
            shutil.rmtree(dst, ignore_errors=True)
            r = run_cli(["convert", direction, *src, "--out", str(dst), *flags], env, timeout=left)
            if direction == "export":
                shutil.rmtree(out, ignore_errors=True)
            if r["rc"] != 0:
                raise RuntimeError(f"exit status {r['rc']}: {r['output'][-2000:]}")
            return r

        if _step(res, f"cli_import_{lay}", budget, save, lambda left: cli("import", left)):
            _step(res, f"cli_export_{lay}", budget, save, lambda left: cli("export", left))
        shutil.rmtree(mg, ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)


def summary(results: dict) -> str:
    """One line per figure: seconds, GB/s, ratio to the floor."""
    lines = [f"environment: {json.dumps(results['environment'])}"]
    for key, res in results["models"].items():
        st = res.get("steps", {})
        nbytes = res.get("bytes")
        lines.append(f"== {key} ({res.get('model')}, {nbytes / GB if nbytes else 0:.2f} GB) ==")
        rf, wf = st.get("read_floor", {}).get("seconds"), st.get("write_floor", {}).get("seconds")
        bare = st.get("bare_imports", {}).get("wall_s")
        for name, v in st.items():
            if not v.get("ok"):
                lines.append(f"{name}: {v.get('skipped') or v.get('error', '?').splitlines()[-1]}")
            elif name.endswith("_floor"):
                lines.append(f"{name}: {v['seconds']:.2f} s, {v['GB_per_s']:.2f} GB/s")
            elif name.startswith("bridge_"):
                lines.append(f"{name}: load {v['load_s']:.2f} s ({v['load_GB_per_s']:.2f} GB/s"
                             + (f", {v['load_s'] / rf:.2f} x read floor" if rf else "")
                             + f"), export {v['export_s']:.2f} s ({v['export_GB_per_s']:.2f} GB/s"
                             + (f", {v['export_s'] / wf:.2f} x write floor" if wf else "") + ")")
            elif name.startswith("cli_") and bare is not None:
                net = v["wall_s"] - bare
                ratio = f", {net / (rf + wf):.2f} x read+write floor" if rf and wf else ""
                peaks = ", ".join(f"{k} {p / 2**30:.2f}" for k, p in sorted(v["peak_rss"].items()))
                lines.append(f"{name}: {v['wall_s']:.2f} s, minus bare imports {net:.2f} s "
                             f"({nbytes / net / GB:.2f} GB/s{ratio}); peak RSS GiB: {peaks}")
            elif name == "bare_imports":
                lines.append(f"bare imports: {v['wall_s']:.2f} s")
        for lay, why in res.get("skipped_layouts", {}).items():
            lines.append(f"{lay}: skipped ({why})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="(what run.py passes on; no effect here)")
    ap.add_argument("--models", default="qwen3-8b-full", help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--out-dir", required=True, help="directory for gpu-bench.json and summary.txt")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None,
                    help="default: cuda when present, else cpu (a check of the script)")
    ap.add_argument("--budget", type=float, default=500.0, help="seconds for the whole run")
    ap.add_argument("--tmp", help="parent directory of the checkpoints (default: $TMPDIR)")
    a = ap.parse_args(argv)
    budget = Budget(a.budget)
    if a.device is None:
        import torch

        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    unknown = [m for m in a.models.split(",") if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    outdir = Path(a.out_dir)
    outdir.mkdir(parents=True, exist_ok=True)
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv,
               "environment": environment(a.device), "budget_s": a.budget, "models": {}}

    def save():
        (outdir / "gpu-bench.json").write_text(json.dumps(results, indent=1, default=str))
        (outdir / "summary.txt").write_text(summary(results))

    tmp = Path(tempfile.mkdtemp(prefix="mbridge-gpu-bench-", dir=a.tmp))
    work = tmp / "work"
    work.mkdir()
    try:
        for key in a.models.split(","):
            results["models"][key] = {}
            try:
                bench_model(key, a.device, tmp, work, budget, save, results["models"][key])
            except Exception as e:  # noqa: BLE001 - the next model still runs
                results["models"][key]["error"] = f"{type(e).__name__}: {e}"
            save()
    finally:
        for f in work.glob("*.log"):  # the logs of failed steps, for whoever reads the results
            shutil.copy(f, outdir / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
    results["total_s"] = a.budget - budget.left()
    save()
    print(summary(results), flush=True)
    print(f"[gpu-bench] wrote {outdir / 'gpu-bench.json'} in {results['total_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
