"""Prepare Megatron-LM trainer cases for scripts/megatron_lm_runs.sh (run here, on the CPU machine):
per model, a toy of its fixture config (.whl/trainer/cases/<name>/hf), `mbridge convert import --tp 1`
of it (meg/) and `mbridge megatron-args hf --one-line` (model.args); plus a memory case: the
pretrain recipe's flags of a full-size model on one GPU (memory/recipe.args, no checkpoint).
After the device run, `check` exports what each trainer run saved and compares it with the toy.

    python scripts/megatron_lm_cases.py prepare qwen3moe=Qwen/Qwen3-30B-A3B dsv2=deepseek-ai/DeepSeek-V2-Lite ...
    python scripts/megatron_lm_cases.py check <dir with <case>/saved> [--out report.txt]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / ".whl" / "trainer" / "cases"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def mbridge(*argv: str) -> str:
    p = subprocess.run([sys.executable, "-m", "bridges.cli", *argv], capture_output=True, text=True, env=ENV)
    if p.returncode:
        raise SystemExit(f"mbridge {' '.join(argv)} failed:\n{p.stderr[-3000:]}")
    return p.stdout


def prepare(pairs: list[str], memory: str, memory_mode: str) -> None:
    sys.path.insert(0, str(ROOT))
    from conformance.models import resolve
    from bridges.core.auto import AutoBridge
    from bridges.core.hf_io import HFCheckpoint
    from conformance.toy import make_toy_checkpoint, shrink_config

    for pair in pairs:
        name, model = pair.split("=")
        case = CASES / name
        shutil.rmtree(case, ignore_errors=True)
        case.mkdir(parents=True)
        config = HFCheckpoint.parse_config(json.dumps(resolve(model).config))  # tagged infinity decoded
        toy = make_toy_checkpoint(shrink_config(config), case / "toys")
        shutil.move(str(toy), case / "hf")
        shutil.rmtree(case / "toys")
        mbridge("convert", "import", "--hf", str(case / "hf"), "--out", str(case / "meg"), "--tp", "1")
        (case / "model.args").write_text(mbridge("megatron-args", str(case / "hf"), "--one-line"))
        (case / "model.txt").write_text(model + "\n")
        (case / "script").write_text(AutoBridge.from_hf_config(resolve(model).config).megatron_lm_script + "\n")
        print(f"{name}: {model}, {sum(f.stat().st_size for f in case.rglob('*') if f.is_file()) >> 10} KiB")
    if memory:
        case = CASES.parent / "memory"
        case.mkdir(parents=True, exist_ok=True)
        out = mbridge("recipe", memory, "--mode", memory_mode, "--gpus", "1", "--gpu-memory", "141", "--json")
        (case / "recipe.json").write_text(out)
        flags = mbridge("recipe", memory, "--mode", memory_mode, "--gpus", "1", "--gpu-memory", "141", "--one-line")
        (case / "recipe.args").write_text(flags.strip().splitlines()[-1] + "\n")
        print(f"memory: {memory} {memory_mode}: {json.loads(out).get('estimate', {})}")


def check(results: Path, out: Path | None) -> int:
    """Export each case's saved checkpoint with --hf-source its toy and compare bit-exactly."""
    lines, bad = [], 0
    for case in sorted(CASES.iterdir()):
        saved = results / case.name / "saved"
        if not saved.exists():
            lines.append(f"{case.name}: no saved checkpoint came back")
            bad += 1
            continue
        exp = results / case.name / "exported"
        shutil.rmtree(exp, ignore_errors=True)
        try:
            mbridge("convert", "export", "--megatron", str(saved), "--hf-source", str(case / "hf"), "--out", str(exp))
            cmp = mbridge("convert", "compare", str(case / "hf"), str(exp))
            lines.append(f"{case.name} ({(case / 'model.txt').read_text().strip()}): {cmp.strip().splitlines()[-1]}")
        except SystemExit as e:
            lines.append(f"{case.name}: {e}")
            bad += 1
    text = "\n".join(lines)
    print(text)
    if out:
        out.write_text(text + "\n")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("pairs", nargs="*", help="case=org/model")
    p.add_argument("--memory", default=None, help="a fixture model for the memory case")
    p.add_argument("--memory-mode", default="pretrain")
    c = sub.add_parser("check")
    c.add_argument("results", type=Path)
    c.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.pairs, a.memory, a.memory_mode)
    else:
        raise SystemExit(check(a.results, a.out))


if __name__ == "__main__":
    main()
