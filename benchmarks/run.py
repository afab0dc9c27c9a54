"""Conversion benchmark: HF <-> Megatron import / export of full-size synthetic checkpoints,
against the floors of plain safetensors I/O, and the conformance suite's wall time per bridge.
Writes docs/performance.md.

    .venv/bin/python benchmarks/run.py            # median of 3, all models, profiles, suites
    .venv/bin/python benchmarks/run.py --quick    # 1 run, Llama-3.2-1B only, no profile,
                                                  # the llama bridge's suite only
    python benchmarks/run.py --gpu --models qwen3-8b-full --out-dir DIR   # on a CUDA machine:
                                                  # benchmarks/gpu.py (JSON results in DIR)

Every figure is a whole process started afresh (``subprocess``): TP1 is one process, TP2 and EP2
two gloo ranks (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), each running
benchmarks/convert.py; then the whole ``mbridge convert import`` / ``export`` commands
(benchmarks/endtoend.py: the real CLI, which relaunches itself for several ranks) against the
read + write floor and a bare ``import torch, megatron.core, transformers``. Checkpoints are made under a temporary directory
(benchmarks/make_checkpoint.py) and deleted at the end. See docs/performance.md for what is
measured and how the targets are computed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

from endtoend import clean_env  # noqa: E402,F401
from make_checkpoint import load_config, make_checkpoint  # noqa: E402

# key: (fixture config, layers kept (None: all), label, layouts, layouts of the whole CLI)
MODELS = {
    "llama": ("meta-llama/Llama-3.2-1B", None, "Llama-3.2-1B (whole model, tied embeddings)",
              ("tp1", "tp2"), ("tp1", "tp2", "pp2")),
    "qwen": ("Qwen/Qwen3-8B", 4, "Qwen3-8B, first 4 of 36 layers (untied lm_head)",
             ("tp1", "tp2"), ()),
    "qwen-moe": ("Qwen/Qwen3-30B-A3B", 2, "Qwen3-30B-A3B, first 2 of 48 layers, all 128 experts "
                 "per layer (per-expert tensors)", ("tp1", "tp2", "ep2"), ("tp1", "ep2")),
}
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "ep2": (1, 2)}  # name: (TP, EP); world = TP x EP
CLI_LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 1), "pp2": (1, 2, 1), "ep2": (1, 1, 2)}  # TP, PP, EP
CLI_TARGET = 1.5
GiB, MiB = 2**30, 2**20
IMPORT_TARGET = EXPORT_TARGET = 1.5


# -- CPU accounting: how much of the machine other processes took during a measurement -----
def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = parts[:8]
    return user + nice + system + irq + softirq + steal


def _own_cpu() -> float:
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class Meter:
    """CPU seconds used by processes other than this benchmark, over a measurement."""

    def __enter__(self):
        self.busy, self.own, self.t = _busy_ticks(), _own_cpu(), time.monotonic()
        self.load = os.getloadavg()[0]
        return self

    def __exit__(self, *exc):
        hz = os.sysconf("SC_CLK_TCK")
        self.wall = time.monotonic() - self.t
        self.foreign = max(0.0, (_busy_ticks() - self.busy) / hz - (_own_cpu() - self.own))


# -- processes --------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def spawn(script: str, args: list[str], work: Path, tag: str, world: int = 1,
          timeout: float = 600.0, env_extra: dict | None = None) -> dict:
    """Run ``script`` as ``world`` fresh processes (one per rank); return ``{wall_s,
    foreign_cpu_s, load_before, ranks: [each rank's JSON]}``."""
    for attempt in range(2):
        port = free_port()
        logs, procs, jsons = [], [], []
        base = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
        base.update(PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                    **(env_extra or {}))
        os.sync()  # start from no dirty pages: earlier writes must not be flushed on our time
        with Meter() as meter:
            t0 = time.time()
            for r in range(world):
                env = dict(base, BENCH_T0=repr(t0))
                if world > 1:
                    env.update(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                jsons.append(work / f"{tag}.r{r}.json")
                jsons[-1].unlink(missing_ok=True)
                logs.append(open(work / f"{tag}.r{r}.log", "w"))
                procs.append(subprocess.Popen([sys.executable, str(BENCH / script), *args,
                                               "--json", str(jsons[-1])], env=env, cwd=BENCH,
                                              stdout=logs[-1], stderr=subprocess.STDOUT))
            failed = _wait(procs, timeout)
            wall = time.time() - t0
        for f in logs:
            f.close()
        if not failed:
            return {"wall_s": wall, "foreign_cpu_s": meter.foreign, "load_before": meter.load,
                    "ranks": [json.loads(j.read_text()) for j in jsons]}
        tail = "\n".join(f"--- rank {r} ---\n" + (work / f"{tag}.r{r}.log").read_text()[-3000:]
                         for r in failed)
        if attempt == 0 and world > 1 and "address already in use" in tail.lower():
            continue  # the free port was taken meanwhile: once more on another
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{tail}")
    raise AssertionError("unreachable")


def _wait(procs: list, timeout: float) -> list[int]:
    """Wait for all; on the first failure or the timeout, kill the others. Returns failed ranks."""
    deadline = time.monotonic() + timeout
    failed: list[int] = []
    while any(p.poll() is None for p in procs):
        bad = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
        if bad or time.monotonic() > deadline:
            failed = bad or [r for r, p in enumerate(procs) if p.poll() is None]
            for p in procs:
                if p.poll() is None:
                    p.kill()
            for p in procs:
                p.wait()
            return failed
        time.sleep(0.05)
    return [r for r, p in enumerate(procs) if p.returncode != 0]


# -- statistics -------------------------------------------------------------------------------
def med(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def phase(run: dict, rank: int, name: str, key: str = "wall_s"):
    return run["ranks"][rank]["phases"].get(name, {}).get(key)


def max_over_ranks(run: dict, name: str, key: str = "wall_s") -> float:
    return max(phase(run, r, name, key) for r in range(len(run["ranks"])))


# -- main -------------------------------------------------------------------------------------
def main() -> None:
    if "--gpu" in sys.argv[1:]:  # the CUDA benchmark: benchmarks/gpu.py, its own options
        import gpu

        return gpu.main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="one run, Llama-3.2-1B only, no profile, the llama suite only")
    ap.add_argument("--runs", type=int, help="runs per figure (default 3; 1 with --quick)")
    ap.add_argument("--models", help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--profile", choices=["auto", "always", "never"], default=None,
                    help="cProfile run where a target is missed (auto: each model's last "
                         "missed layout; default: auto, never with --quick)")
    ap.add_argument("--suites", default=None,
                    help="'all', 'none' or a comma list of bridge model types whose suite to "
                         "time (default: all; with --quick, the bridges of the models run)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="first wait up to S seconds for the 1-minute load average to fall "
                         "below 1")
    ap.add_argument("--tmp",
                    help="parent directory of the temporary checkpoints (default: $TMPDIR)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    ap.add_argument("--save-results", metavar="JSON", help="also save the raw figures")
    ap.add_argument("--render-only", metavar="JSON",
                    help="no measurement: write the doc from figures saved by --save-results")
    a = ap.parse_args()
    if a.render_only:
        results = json.loads(Path(a.render_only).read_text())
        Path(a.out).write_text(render(results))
        print(f"[bench] wrote {a.out} from {a.render_only}")
        return
    runs = a.runs or (1 if a.quick else 3)
    models = a.models.split(",") if a.models else (["llama"] if a.quick else list(MODELS))
    profile = a.profile or ("never" if a.quick else "auto")
    suites = a.suites or (",".join(_bridge_of(MODELS[k][0]) for k in models) if a.quick
                          else "all")
    started = time.monotonic()
    if a.wait_idle:
        _wait_idle(a.wait_idle)
    load_start = os.getloadavg()
    mem_start = _mem_available()

    tmp = Path(tempfile.mkdtemp(prefix="mbridge-bench-", dir=a.tmp))
    work = tmp / "work"
    work.mkdir()
    results: dict = {"runs": runs, "quick": a.quick, "load_start": load_start,
                     "mem_start": mem_start, "models": {}}
    try:
        print(f"[bench] temp dir {tmp}; {runs} run(s); models {models}", flush=True)
        results["baseline"] = [spawn("floors.py", ["imports"], work, f"imports{i}")
                               for i in range(runs)]
        results["baseline_rss"] = med(r["ranks"][0]["peak_rss"] for r in results["baseline"])
        print(f"[bench] imports-only baseline: {results['baseline_rss'] / MiB:.0f} MiB",
              flush=True)
        for key in models:
            results["models"][key] = _bench_model(key, tmp, work, runs, results["baseline_rss"],
                                                  profile, a.quick)
        results["suites"] = _suites(suites, tmp, runs)
        if suites == "all":
            results["registry"] = _registry(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["load_end"] = os.getloadavg()
    results["total_s"] = time.monotonic() - started
    if a.save_results:
        Path(a.save_results).write_text(json.dumps(results, indent=1, default=str))
    text = render(results)
    Path(a.out).write_text(text)
    print(text)
    print(f"[bench] wrote {a.out} in {results['total_s']:.0f} s", flush=True)


def _bridge_of(model: str) -> str:
    from bridges.core.registry import lookup

    return lookup(load_config(model)).model_type


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _wait_idle(limit: float) -> None:
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        time.sleep(5)


def _convert(ckpt: Path, out: Path, work: Path, tag: str, layout: str,
             extra: tuple = ()) -> dict:
    tp, ep = LAYOUTS[layout]
    return spawn("convert.py", [str(ckpt), str(out), "--tp", str(tp), "--ep", str(ep), *extra],
                 work, tag, world=tp * ep)


def _bench_model(key: str, tmp: Path, work: Path, runs: int, base: float, profile: str,
                 quick: bool = False) -> dict:
    """Floors and the conversion at each layout of one model, ``runs`` times; profiles
    (``auto``: one run of the last layout that misses a target; ``always``: every layout)."""
    model, layers, label, layouts, cli_layouts = MODELS[key]
    if quick:  # the whole CLI at TP1 only
        cli_layouts = cli_layouts[:1]
    cfg = load_config(model, layers)
    ckpt = tmp / key
    info = make_checkpoint(cfg, ckpt)
    print(f"[bench] {key}: checkpoint {info['bytes'] / GiB:.2f} GiB in {info['shards']} shards, "
          f"made in {info['seconds']:.0f} s", flush=True)
    out = tmp / "out"
    res = {"model": model, "layers": layers, "label": label, "config": cfg, "ckpt": info,
           "read": [], "write": [], "runs": {lay: [] for lay in layouts},
           "bare": [], "cli": {lay: [] for lay in cli_layouts},
           "cli_share": {lay: _cli_share(ckpt, work, f"{key}-share-{lay}", lay) for lay in cli_layouts}}
    for i in range(runs):
        res["read"].append(spawn("floors.py", ["read", str(ckpt)], work, f"{key}-read{i}"))
        res["write"].append(spawn("floors.py", ["write", str(ckpt), str(out)], work,
                                  f"{key}-write{i}"))
        shutil.rmtree(out, ignore_errors=True)
        print(f"[bench] {key} run {i + 1}/{runs} floors: read "
              f"{phase(res['read'][-1], 0, 'read'):.2f} s, write "
              f"{phase(res['write'][-1], 0, 'write'):.2f} s", flush=True)
        for lay in layouts:
            run = _convert(ckpt, out, work, f"{key}-{lay}-{i}", lay)
            _check_written(run, info, f"{key} {lay}")
            shutil.rmtree(out, ignore_errors=True)
            res["runs"][lay].append(run)
            print(f"[bench] {key} run {i + 1}/{runs} {lay.upper()}: process {run['wall_s']:.1f} s,"
                  f" load {max_over_ranks(run, 'load'):.1f} s, export "
                  f"{max_over_ranks(run, 'export'):.1f} s, peak RSS "
                  f"{max(r['peak_rss'] for r in run['ranks']) / GiB:.2f} GiB "
                  f"(other processes: {run['foreign_cpu_s']:.0f} CPU-s)", flush=True)
        if cli_layouts:
            res["bare"].append(_bare())
        for lay in cli_layouts:
            res["cli"][lay].append(_cli(ckpt, tmp, lay))
            c = res["cli"][lay][-1]
            print(f"[bench] {key} run {i + 1}/{runs} mbridge convert {lay.upper()}: import "
                  f"{c['import']['wall_s']:.1f} s, export {c['export']['wall_s']:.1f} s (bare imports "
                  f"{res['bare'][-1]['wall_s']:.1f} s); peak RSS GiB " + ", ".join(
                      f"{k} {v / GiB:.2f}" for k, v in sorted(c['import']['peak_rss'].items())),
                  flush=True)
    two = [lay for lay in layouts if LAYOUTS[lay] != (1, 1)]
    if two:  # the write floor again, beside a process holding a second rank's memory
        held = int(max(med(x["ranks"][1]["phases"]["export"]["peak_rss"] for x in res["runs"][lay])
                       for lay in two))
        res["write_beside"] = {"bytes": held, "runs": []}
        for i in range(runs):
            res["write_beside"]["runs"].append(_write_beside(ckpt, out, work, f"{key}-wb{i}", held))
            shutil.rmtree(out, ignore_errors=True)
        print(f"[bench] {key} write floor beside {held / GiB:.2f} GiB held: " + ", ".join(
            f"{phase(r, 0, 'write'):.2f} s" for r in res["write_beside"]["runs"]), flush=True)
    res["t"] = _targets(res, base)
    res["t"]["cli"] = _cli_targets(res, base)
    missed_cli = [lay for lay, v in res["t"]["cli"].items() if not (v["import"]["ok"] and v["export"]["ok"])]
    if "tp1" in res["cli"] and (profile == "always" or (profile == "auto" and missed_cli)):
        res["cli_profile"] = _cli_profile(ckpt, tmp, work, key)
    missed = [lay for lay, v in res["t"]["layouts"].items() if not v["ok"]]
    todo = list(layouts) if profile == "always" else missed[-1:] if profile == "auto" else []
    res["profile"] = {lay: _profile(key, ckpt, tmp, work, lay) for lay in todo}
    shutil.rmtree(ckpt, ignore_errors=True)
    return res


def _cli_share(ckpt: Path, work: Path, tag: str, layout: str) -> list[int]:
    """Each rank's parameter bytes at a layout of the whole CLI (the model built, nothing read)."""
    tp, pp, ep = CLI_LAYOUTS[layout]
    run = spawn("convert.py", [str(ckpt), "-", "--tp", str(tp), "--pp", str(pp), "--ep", str(ep),
                               "--build-only"], work, tag, world=tp * pp * ep)
    return [r["share_bytes"] for r in run["ranks"]]


def _bare() -> dict:
    """``python -c "import torch, megatron.core, transformers"``, interpreter start to exit."""
    from endtoend import bare_imports

    os.sync()
    with Meter() as m:
        out = bare_imports()
    return {**out, "foreign_cpu_s": m.foreign, "load_before": m.load}


def _cli(ckpt: Path, tmp: Path, layout: str) -> dict:
    """``mbridge convert import`` of the HF checkpoint, then ``mbridge convert export`` of the
    result, at ``layout``; each command timed from its start to its exit."""
    from endtoend import run_cli

    tp, pp, ep = CLI_LAYOUTS[layout]
    flags = ["--tp", str(tp), "--pp", str(pp), "--ep", str(ep)]
    mg, hf = tmp / "cli-megatron", tmp / "cli-hf"
    out = {}
    for direction, src, dst in (("import", ["--hf", str(ckpt)], mg),
                                ("export", ["--megatron", str(mg)], hf)):
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()  # no dirty pages of earlier writes flushed on its time
        with Meter() as m:
            r = run_cli(["convert", direction, *src, "--out", str(dst), *flags])
        if r["rc"] != 0:
            raise RuntimeError(f"mbridge convert {direction} {' '.join(flags)}: exit status "
                               f"{r['rc']}:\n{r['output']}")
        out[direction] = {**r, "foreign_cpu_s": m.foreign, "load_before": m.load}
    written = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    shutil.rmtree(mg, ignore_errors=True)
    shutil.rmtree(hf, ignore_errors=True)
    out["written_bytes"] = written
    return out


def _write_beside(ckpt: Path, out: Path, work: Path, tag: str, nbytes: int) -> dict:
    hog = subprocess.Popen([sys.executable, str(BENCH / "floors.py"), "hold", str(nbytes)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        hog.stdout.readline()  # "ready"
        return spawn("floors.py", ["write", str(ckpt), str(out)], work, tag)
    finally:
        hog.stdin.close()
        hog.wait()


def _check_written(run: dict, info: dict, what: str) -> None:
    written = run["ranks"][0]["written_bytes"]
    if written is None or abs(written - info["bytes"]) > 16 * MiB:
        raise RuntimeError(f"{what}: export wrote {written} bytes of tensors, source has "
                           f"{info['bytes']}")


def _targets(res: dict, base: float) -> dict:
    """Medians, ratios and verdicts of one model."""
    read = med(phase(r, 0, "read") for r in res["read"])
    write = med(phase(r, 0, "write") for r in res["write"])
    largest = res["ckpt"]["largest_bytes"]
    t = {"read_floor": read, "write_floor": write, "largest": largest, "layouts": {},
         "write_beside": med(phase(r, 0, "write") for r in res.get("write_beside", {})
                             .get("runs", []))}
    for lay, rs in res["runs"].items():
        world = len(rs[0]["ranks"])
        ranks = []
        for r in range(world):
            share = rs[0]["ranks"][r]["share_bytes"]
            peak = med(x["ranks"][r]["peak_rss"] for x in rs)
            budget = base + share + 2 * largest
            ranks.append({
                "share": share, "peak": peak, "budget": budget, "ok": peak <= budget,
                "phases": {name: {k: med(x["ranks"][r]["phases"][name][k] for x in rs)
                                  for k in ("wall_s", "peak_rss", "peak_anon", "peak_file",
                                            "end_rss")}
                           for name in rs[0]["ranks"][r]["phases"]},
            })
        load = med(max_over_ranks(x, "load") for x in rs)
        export = med(max_over_ranks(x, "export") for x in rs)
        imp_total = med(max(sum(phase(x, r, n) for n in ("start+imports", "setup", "build",
                                                         "load")) for r in range(world))
                        for x in rs)
        v = {"process": med(x["wall_s"] for x in rs), "import_total": imp_total,
             "load": load, "export": export, "ranks": ranks,
             "import_ratio": load / read, "export_ratio": export / write,
             "import_ok": load / read <= IMPORT_TARGET,
             "export_ok": export / write <= EXPORT_TARGET,
             "foreign": max(x["foreign_cpu_s"] / x["wall_s"] for x in rs)}
        v["ok"] = v["import_ok"] and v["export_ok"] and all(r["ok"] for r in ranks)
        t["layouts"][lay] = v
    return t


def _cli_profile(ckpt: Path, tmp: Path, work: Path, key: str) -> dict:
    """``mbridge convert import`` then ``export`` at TP1 (one process each) under cProfile: the
    functions with the most time of their own, and where the time goes by callee."""
    import pstats

    from endtoend import clean_env

    mg, hf = tmp / "cli-megatron", tmp / "cli-hf"
    out = {}
    for direction, src, dst in (("import", ["--hf", str(ckpt)], mg),
                                ("export", ["--megatron", str(mg)], hf)):
        prof = work / f"{key}-cli-{direction}.prof"
        shutil.rmtree(dst, ignore_errors=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "bridges.cli",
                        "convert", direction, *src, "--out", str(dst)], env=clean_env(), cwd=ROOT,
                       check=True, capture_output=True, timeout=900)
        wall = time.perf_counter() - t
        st = pstats.Stats(str(prof))
        rows = [{"fn": _where(file, line, fn), "calls": nc, "tottime": tt, "cumtime": ct}
                for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items()]
        out[direction] = {"wall": wall, "total": st.total_tt,
                          "self": sorted(rows, key=lambda x: -x["tottime"])[:10]}
        print(f"[bench] {key} mbridge convert {direction} TP1 profiled: {wall:.1f} s", flush=True)
    shutil.rmtree(mg, ignore_errors=True)
    shutil.rmtree(hf, ignore_errors=True)
    return out


def _cli_targets(res: dict, base: float) -> dict:
    """The whole commands: (wall - bare imports) against read floor + write floor, medians;
    peak RSS per rank against baseline + share + 2 x largest tensor."""
    out = {}
    if not res["cli"]:
        return out
    floor = med(phase(r, 0, "read") for r in res["read"]) + med(phase(r, 0, "write") for r in res["write"])
    bare = med(b["wall_s"] for b in res["bare"])
    largest = res["ckpt"]["largest_bytes"]
    for lay, rs in res["cli"].items():
        share = res["cli_share"][lay]
        v = {"floor": floor, "bare": bare, "ranks": {}}
        for d in ("import", "export"):
            wall = med(x[d]["wall_s"] for x in rs)
            per_run = [(x[d]["wall_s"] - b["wall_s"]) / ((phase(rr, 0, "read") + phase(w, 0, "write")))
                       for x, b, rr, w in zip(rs, res["bare"], res["read"], res["write"])]
            v[d] = {"wall": wall, "net": wall - bare, "ratio": (wall - bare) / floor,
                    "ok": (wall - bare) / floor <= CLI_TARGET, "per_run": per_run,
                    "foreign": max(x[d]["foreign_cpu_s"] / x[d]["wall_s"] for x in rs)}
        for r, sh in enumerate(share):
            budget = base + sh + 2 * largest
            peaks = {d: med(x[d]["peak_rss"].get(f"rank{r}") for x in rs) for d in ("import", "export")}
            v["ranks"][r] = {"share": sh, "budget": budget, **peaks,
                             "ok": max(peaks.values()) <= budget}
        launcher = [x["import"]["peak_rss"].get("launcher") for x in rs]
        v["launcher"] = med(launcher) if any(launcher) else None
        v["ok"] = v["import"]["ok"] and v["export"]["ok"] and all(x["ok"] for x in v["ranks"].values())
        out[lay] = v
    return out


def _profile(key: str, ckpt: Path, tmp: Path, work: Path, layout: str) -> dict:
    """One run under cProfile (build, load and export phases, separately; every rank)."""
    import pstats

    out = tmp / "out"
    tag = f"{key}-{layout}-profile"
    run = _convert(ckpt, out, work, tag, layout, ("--profile", "build,load,export"))
    shutil.rmtree(out, ignore_errors=True)
    world = len(run["ranks"])
    prof = {"wall": {n: max(phase(run, r, n) for r in range(world))
                     for n in run["ranks"][0]["phases"]}, "top": {}}
    for r in range(world):
        for name in ("load", "export"):
            st = pstats.Stats(str(work / f"{tag}.r{r}.json.{name}.prof"))
            rows = [{"fn": _where(file, line, fn), "calls": nc, "tottime": tt, "cumtime": ct}
                    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items()]
            prof["top"][f"{name} r{r}"] = {
                "total": st.total_tt,
                "self": sorted(rows, key=lambda x: -x["tottime"])[:6],
                "cum": [x for x in sorted(rows, key=lambda x: -x["cumtime"])
                        if _interesting(x["fn"])][:6],
            }
    walls = ", ".join(f"{n} {w:.1f} s" for n, w in prof["wall"].items())
    print(f"[bench] {key} {layout.upper()}: profiled ({walls})", flush=True)
    return prof


# -- conformance suite wall time per bridge ---------------------------------------------------
def _suites(which: str, tmp: Path, runs: int) -> list[dict]:
    """``pytest --mbridge-model=<first fixture of the bridge> -p no:cacheprovider -q`` run from
    an empty directory, whole process, per registered bridge (median of ``runs``)."""
    if which == "none":
        return []
    from bridges.core.registry import registered
    from conformance.models import fixture_names

    first: dict[str, str] = {}
    for name in fixture_names():
        try:
            first.setdefault(_bridge_of(name), name)
        except LookupError:  # a fixture no bridge reads
            continue
    wanted = list(registered()) if which == "all" else which.split(",")
    empty = tmp / "suite-cwd"
    out = []
    for bridge in dict.fromkeys(wanted):
        fixture = first.get(bridge)
        if fixture is None:
            out.append({"bridge": bridge, "fixture": None, "runs": []})
            continue
        rows = []
        for i in range(runs):
            m, proc, last = _pytest(empty, [f"--mbridge-model={fixture}"], 1800)
            rows.append({"wall_s": m.wall, "rc": proc.returncode, "summary": last,
                         "foreign_cpu_s": m.foreign})
            print(f"[bench] suite {bridge} ({fixture}) run {i + 1}/{runs}: {m.wall:.1f} s, "
                  f"rc {proc.returncode}: {last}", flush=True)
        out.append({"bridge": bridge, "fixture": fixture, "runs": rows})
    return out


# The registry when the 2-minute target was set (issue #20): its 16 fixture models then.
TARGET_MODELS = (
    "Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-0.6B",
    "Qwen/Qwen3-235B-A22B", "Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-8B", "allenai/OLMoE-1B-7B-0924",
    "deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V3", "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.2-1B", "mistralai/Mistral-7B-v0.1", "mistralai/Mixtral-8x7B-v0.1",
    "moonshotai/Kimi-K2-Instruct", "zai-org/GLM-4.5")


def _registry(tmp: Path) -> list[dict]:
    """The whole registry (``pytest --mbridge``) and the 16 models of the target, each one
    pytest process from an empty directory, once."""
    return [_registry_run(tmp, "every fixture model", ["--mbridge"], target=False),
            _registry_run(tmp, "the 16 fixture models of the target",
                          [f"--mbridge-model={m}" for m in TARGET_MODELS], target=True)]


def _pytest(cwd: Path, args: list[str], timeout: float):
    """``python -m pytest ARGS -p no:cacheprovider -q`` from the empty directory ``cwd`` (made
    afresh), timed whole: (Meter, completed process, its last output line)."""
    shutil.rmtree(cwd, ignore_errors=True)
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    os.sync()
    with Meter() as m:
        proc = subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider", "-q"],
                              cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return m, proc, (proc.stdout.strip().splitlines() or [""])[-1].strip("= ")


def _registry_run(tmp: Path, what: str, args: list[str], target: bool) -> dict:
    """One pytest process (one rank pool) over ``args``, whole process; per bridge the summed
    durations of its models' items (from the report). ``target``: the run the target is set on."""
    report = tmp / "registry-report.json"
    report.unlink(missing_ok=True)
    m, proc, last = _pytest(tmp / "registry-cwd", [*args, f"--mbridge-report={report}"], 3600)
    rows = json.loads(report.read_text())["results"] if report.exists() else []
    per: dict[str, dict] = {}
    for r in rows:
        if "check" not in r:
            continue
        bridge = _bridge_of(r["model"])
        b = per.setdefault(bridge, {"models": set(), "checks": 0, "failed": 0, "items_s": 0.0})
        b["models"].add(r["model"])
        b["checks"] += 1
        b["failed"] += not r["passed"]
        b["items_s"] += r.get("duration_s", 0.0)
    for b in per.values():
        b["models"] = sorted(b["models"])
    print(f"[bench] registry, {what}: {m.wall:.1f} s, rc {proc.returncode}: {last}", flush=True)
    return {"what": what, "target": target, "wall_s": m.wall, "rc": proc.returncode, "summary": last, "foreign_cpu_s": m.foreign,
            "bridges": per}


def _where(file: str, line: int, fn: str) -> str:
    if file == "~":
        return fn
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    else:
        file = Path(file).name
    return f"{file}:{line}({fn})"


def _interesting(fn: str) -> bool:
    return not any(s in fn for s in ("convert.py", "_common.py", "contextlib", "<lambda>",
                                     "threading.py", "{built-in method builtins.exec}"))


# -- report -----------------------------------------------------------------------------------
def _versions() -> str:
    from importlib.metadata import version

    out = []
    for p in ("torch", "megatron-core", "transformers", "safetensors", "psutil"):
        try:
            out.append(f"{p} {version(p)}")
        except Exception:  # noqa: BLE001
            out.append(f"{p} ?")
    return ", ".join(out)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, CPU only, Linux "
            f"{platform.release()}; Python {platform.python_version()}")


def render(results: dict) -> str:
    from render import render as _render  # benchmarks/render.py

    return _render(results, machine=_machine(), versions=_versions())


if __name__ == "__main__":
    main()
