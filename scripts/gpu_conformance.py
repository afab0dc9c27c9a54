"""GPU conformance table: run the suite with --run-gpu on this machine's GPUs, run the mutants
under it, or render docs/conformance-gpu.md from the JSON reports of such runs (one per GPU
count, plus the mutants' report).

    python scripts/gpu_conformance.py run --out report-<n>gpu.json            # on a GPU machine
    python scripts/gpu_conformance.py mutants --out mutants-<n>gpu.json -j 6  # on a GPU machine
    python scripts/gpu_conformance.py render report-1gpu.json ... [--mutants mutants-1gpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "conformance-gpu.md"


def plugin_args() -> list[str]:
    """``-p pytest_mbridge.plugin`` where the plugin is not installed (the GPU machines take the
    source tree on PYTHONPATH); nothing where its pytest11 entry point would load it anyway."""
    from importlib.metadata import entry_points

    installed = any(ep.value.startswith("pytest_mbridge.plugin") for ep in entry_points(group="pytest11"))
    return [] if installed else ["-p", "pytest_mbridge.plugin"]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}


def run(out: str, extra: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pytest", *plugin_args(), "-p", "no:cacheprovider", "--mbridge",
               "--run-gpu", "-q", "-W", "ignore", f"--mbridge-report={Path(out).resolve()}", *extra]
        return subprocess.call(cmd, cwd=tmp, env=_env())


def _failures(xml: Path) -> dict[str, str]:
    """Failed or errored test -> its message, from a junit XML file."""
    if not xml.exists():
        return {}
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        for bad in (*case.findall("failure"), *case.findall("error")):
            out[case.get("name", "?")] = (bad.get("message") or bad.text or "").strip()[:3000]
    return out


def mutants(out: str, jobs: int, timeout: float, extra: list[str], gpu: bool = True,
            only: str | None = None, merge: str | None = None) -> int:
    """Each mutant of scripts/gpu_mutants.py under the default ``--run-gpu`` suite (one pytest
    run per mutant, from an empty directory), ``jobs`` at a time; one JSON file. ``gpu=False``
    runs the default CPU suite instead (to try this script on a machine without a GPU).
    ``only``: the mutants whose bridge ref contains it; ``merge``: an earlier report whose other
    rows are kept (each row carries its own environment and commit)."""
    sys.path.insert(0, str(ROOT))
    from scripts.gpu_mutants import descriptions, gpu_mutants

    about = descriptions()

    def one(row):
        name, ref, model, expect = row
        with tempfile.TemporaryDirectory() as tmp:
            rep, xml = Path(tmp) / "r.json", Path(tmp) / "j.xml"
            cmd = [sys.executable, "-m", "pytest", *plugin_args(), "-p", "no:cacheprovider",
                   *(["--run-gpu"] if gpu else []), "-q", "-W", "ignore", f"--mbridge-model={model}", f"--mbridge-bridge={ref}",
                   f"--mbridge-report={rep}", f"--junitxml={xml}", *extra]
            t = time.perf_counter()
            try:
                p = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=timeout)
                rc, tail = p.returncode, (p.stdout + p.stderr)[-3000:]
            except subprocess.TimeoutExpired as e:
                rc, tail = "timeout", str(e.stdout or "")[-3000:]
            wall = round(time.perf_counter() - t, 1)
            report = json.loads(rep.read_text()) if rep.exists() else {}
            print(f"{name}: exit {rc}, {wall} s", flush=True)
            return {"mutant": name, "bridge": ref, "model": model, "bug": about.get(ref) or about.get(name, ""),
                    "cpu_expects": sorted(expect), "exit": rc, "wall_s": wall, "tail": tail,
                    "results": report.get("results", []), "environment": report.get("environment", {}),
                    "failures": _failures(xml)}

    def safe(row):
        try:
            return one(row)
        except Exception as e:  # noqa: BLE001 - one broken run must not lose the others' figures
            return {"mutant": row[0], "bridge": row[1], "model": row[2], "bug": about.get(row[1]) or about.get(row[0], ""),
                    "cpu_expects": sorted(row[3]), "exit": f"runner error: {e!r}", "wall_s": 0, "tail": "",
                    "results": [], "environment": {}, "failures": {}}

    t0 = time.perf_counter()
    todo = [r for r in gpu_mutants() if only is None or any(o in r[1] for o in only.split(","))]
    with ThreadPoolExecutor(jobs) as pool:
        new = {r["bridge"]: r for r in pool.map(safe, todo)}
    old = {r["bridge"]: r for r in json.loads(Path(merge).read_text())["mutants"]} if merge else {}
    rows = [new.get(ref) or old[ref] for _, ref, _, _ in gpu_mutants() if ref in new or ref in old]
    Path(out).write_text(json.dumps({"wall_s": round(time.perf_counter() - t0, 1), "jobs": jobs,
                                     "mutants": rows}, indent=1, sort_keys=True) + "\n")
    return 0 if all(r["exit"] == 1 for r in new.values()) else 1


HEAD = ["# Conformance on GPUs", "",
        "Generated by `scripts/gpu_conformance.py render` from `run` and `mutants` reports; do not",
        "edit by hand. Toy models from every fixture config, NCCL, one rank per GPU, fp32 and bf16",
        "against HF in the same dtype on the same card (the default `--run-gpu` run). fp32: logits",
        "relative error <= 1e-5, all finite, greedy tokens identical. bf16 (only beside fp32; the",
        "rule in docs/conformance.md, `conformance/checks.py`): per-position error against HF's fp32",
        "run at most 3x HF bf16's own, positions moved wholesale (routing flips) counted apart, top-1",
        "judged on decisive positions. Older sections were judged with the rules of their day (the",
        "1- and 2-GPU ones of 2025 with cosine >= 0.9999)."]


MAIN = ("logits", "generation", "roundtrip", "coverage")


def _cell(checks: dict, c: str) -> str:
    return "" if c not in checks else ("PASS " if checks[c]["passed"] else "FAIL ") + checks[c]["figure"]


def _section(r: dict, note: str = "") -> list[str]:
    env = r["environment"]
    gpus = env.get("gpus", [])
    models = sorted({row["model"] for row in r["results"] if "model" in row})
    out = [f"## {len(gpus)} x {gpus[0] if gpus else '?'}" + (f" ({note})" if note else ""), "",
           f"torch {env['torch']}, megatron-core {env['megatron-core']}, transformers {env['transformers']}; "
           f"{len(models)} models; suite wall time {r['wall_s']} s; {r['passed']} checks passed, "
           f"{r['failed']} failed.", "",
           "| model | layout | dtype | logits | generation | roundtrip | coverage | other |",
           "|---|---|---|---|---|---|---|---|"]
    by: dict = {}
    for row in r["results"]:
        if "check" not in row or row["layout"] == "-":
            continue
        check, what = re.match(r"(\w+)(?: \((.*)\))?$", row["check"]).groups()
        layout, _, dtype = row["layout"].partition("/")
        if what:  # stacked experts, a quantised format: a row of their own
            layout = f"{layout} ({what})"
        by.setdefault((row["model"], layout, dtype or "float32"), {})[check] = row
    for (model, layout, dtype), checks in sorted(by.items()):
        out.append(f"| {model} | {layout} | {dtype} | {_cell(checks, 'logits')} | {_cell(checks, 'generation')} | "
                   f"{_cell(checks, 'roundtrip')} | {_cell(checks, 'coverage')} | "
                   + "; ".join(f"{c}: {_cell(checks, c)}" for c in sorted(checks) if c not in MAIN) + " |")
    other = [row for row in r["results"] if "check" in row and row["layout"] == "-"]
    bad = [row for row in other if not row["passed"]]
    out += ["", f"Per-model checks (config roundtrip): {len(other) - len(bad)} passed, {len(bad)} failed"
            + (": " + "; ".join(f"{x['model']} {x['check']}" for x in bad) if bad else ".")]
    return out + [""]


def _mutant_rows(m: dict) -> tuple[str, str, str, str, str]:
    """(checks failed fp32, checks failed bf16, module named, fp32 figure, bf16 figure)."""
    failed = {"float32": [], "bfloat16": []}
    logits = {}
    for row in m["results"]:
        if "check" not in row:
            continue
        layout, _, dtype = row["layout"].partition("/")
        dtype = dtype or "float32"
        if row["check"] == "logits" and layout == "tp1pp1":
            logits[dtype] = row
        if not row["passed"]:
            failed[dtype if layout != "-" else "float32"].append(
                row["check"] if layout in ("tp1pp1", "-") else f"{row['check']} ({layout})")
    for test, msg in m["failures"].items():  # snapshot items record no check row
        fn = test.split("[")[0]
        if "snapshot" in fn:
            failed["float32"].append(fn.removeprefix("test_").replace("_", " "))
    named = (logits.get("float32", {}).get("data", {}) or {}).get("divergence")
    if named:
        named = f"first divergence: {named}"
    else:  # coverage and the like name the tensor in their message
        msg = next((v for k, v in m["failures"].items() if "float32" in k or "-" not in k.split("[")[-1]), "")
        lines = [x.strip() for x in msg.splitlines() if x.strip() and not x.startswith(("coverage", "roundtrip"))]
        named = (lines[0] if lines else msg.splitlines()[0] if msg else "")
        named = named if len(named) <= 140 else named[:137] + "..."
    f32 = logits.get("float32")
    b16 = logits.get("bfloat16")
    fig32 = f"{f32['data']['rel_err']:.2e} (re-init. {f32['data'].get('baseline_rel_err', float('nan')):.2f})" \
        if f32 and "rel_err" in f32["data"] else ""  # a crashed conversion has no figure
    fig16 = ""
    if b16 and "noise_ratio" in b16["data"]:
        fig16 = (f"{b16['data']['noise_ratio']:.2f}x noise, {b16['data'].get('flips', 0)} moved "
                 f"(HF {b16['data'].get('hf_flips', 0)})")
    join = lambda xs: ", ".join(dict.fromkeys(xs)) or "none"
    return join(failed["float32"]), join(failed["bfloat16"]), named.replace("|", "/"), fig32, fig16


def _mutant_section(path: str, note: str = "") -> list[str]:
    d = json.loads(Path(path).read_text())
    rows = d["mutants"]
    env = next((m["environment"] for m in rows if m["environment"]), {})
    gpus = env.get("gpus", ["?"])
    caught = [m for m in rows if m["exit"] == 1 and any(not r["passed"] for r in m["results"] if "check" in r)
              or m["failures"]]
    out = ["## Mutants under --run-gpu" + (f" ({note})" if note else ""), "",
           f"{len(gpus)} x {gpus[0]}; torch {env.get('torch')}, megatron-core {env.get('megatron-core')}, "
           f"transformers {env.get('transformers')}. Each deliberately broken bridge (scripts/gpu_mutants.py: "
           "the mutants of tests/mutants.py and of the family mutant files that the CPU "
           "self-tests expect to fail at tp1pp1, the one layout one GPU runs, plus a single pair of "
           "query heads swapped) ran the default "
           "`pytest --mbridge-model=<model> --mbridge-bridge=<mutant> --run-gpu` (fp32 and bf16) from "
           f"an empty directory, {d['jobs']} at a time, {d['wall_s']} s in all. "
           f"{len(caught)} of {len(rows)} fail the run (exit status 1).", "",
           "Columns: the checks that failed in each dtype; the module the failure names (the logits "
           "check's first divergence, else the failing message's first line); fp32 logits relative "
           "error (bound 1e-5) beside the re-initialised model's; bf16 error as a multiple of HF's own "
           "bf16 noise (bound 3x) and positions moved wholesale. A bug the CPU self-test expects "
           "another check to catch is marked.", "",
           "| mutant | injected bug | model | exit | failed (fp32) | failed (bf16) | module named | fp32 logits rel err | bf16 logits |",
           "|---|---|---|---|---|---|---|---|---|"]
    for m in rows:
        f32, f16, named, fig32, fig16 = _mutant_rows(m)
        got = set(f32.split(", ")) & {"coverage", "roundtrip", "logits", "generation"}
        mark = "" if set(m["cpu_expects"]) <= got else f" (CPU self-test: {', '.join(m['cpu_expects'])})"
        out.append(f"| {m['mutant']} | {m['bug']} | {m['model'].split('/')[-1]} | {m['exit']} | {f32}{mark} | "
                   f"{f16} | {named} | {fig32} | {fig16} |")
    return out + [""]


def render(reports: list[str], mutants_reports: list[str], notes: list[str], to_stdout: bool = False,
           mutants_notes: list[str] = ()) -> None:
    out = list(HEAD) + [""]
    for i, path in enumerate(mutants_reports):
        out += _mutant_section(path, mutants_notes[i] if i < len(mutants_notes) else "")
    for i, path in enumerate(reports):
        out += _section(json.loads(Path(path).read_text()), notes[i] if i < len(notes) else "")
    if to_stdout:  # `summary`: the figures in the log too, should the files not come back
        print("\n".join(out))
        return
    DOC.write_text("\n".join(out))
    print(f"wrote {DOC}")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    m = sub.add_parser("mutants")
    m.add_argument("--out", required=True)
    m.add_argument("-j", "--jobs", type=int, default=4)
    m.add_argument("--timeout", type=float, default=300)
    m.add_argument("--cpu", action="store_true", help="the default CPU suite instead of --run-gpu (a dry run)")
    m.add_argument("--only", default=None, help="only the mutants whose bridge ref contains this (or one of these, comma-separated)")
    m.add_argument("--merge", default=None, help="an earlier mutants report whose other rows are kept")
    d = sub.add_parser("render")
    d.add_argument("reports", nargs="*")
    d.add_argument("--mutants", action="append", default=[], help="a `mutants` report: adds a mutants section (repeatable)")
    d.add_argument("--mutants-note", action="append", default=[], help="a note for each mutants section's heading, in order")
    d.add_argument("--note", action="append", default=[], help="a note for each report's heading, in order")
    d.add_argument("--stdout", action="store_true", help="print the document instead of writing it")
    args, extra = ap.parse_known_args()
    if args.cmd == "run":
        sys.exit(run(args.out, extra))
    if args.cmd == "mutants":
        sys.exit(mutants(args.out, args.jobs, args.timeout, extra, gpu=not args.cpu, only=args.only,
                         merge=args.merge))
    render(args.reports, args.mutants, args.note, to_stdout=args.stdout, mutants_notes=args.mutants_note)


if __name__ == "__main__":
    main()
