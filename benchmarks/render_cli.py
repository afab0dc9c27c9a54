"""The docs/performance.md section on the whole `mbridge convert` commands (called by render.py)."""
from __future__ import annotations

GiB = 2**30
TARGET = 1.5


def _g(b) -> str:
    return "n/a" if b is None else f"{b / GiB:.2f}"


def _ok(flag: bool) -> str:
    return "met" if flag else "**missed**"


def cli_section(results: dict, short) -> list[str]:
    """``short(res)``: a model's short name. Empty when no model ran the CLI."""
    rows = [(res, lay, v) for res in results["models"].values()
            for lay, v in res["t"].get("cli", {}).items()]
    if not rows:
        return []
    runs = results["runs"]
    L = ["## End to end: `mbridge convert import` and `export`", "",
         "The real command line (`python -m bridges.cli convert ...`, what the `mbridge` script "
         "runs; benchmarks/endtoend.py), started as one process as a user would: for TP2, PP2 "
         "and EP2 it relaunches itself as two local ranks (bridges/launch.py). `import` reads the "
         "HF checkpoint and writes the Megatron distributed checkpoint (torch_dist, as "
         "Megatron-LM's `--ckpt-format torch_dist` loads it); `export` reads that back at the "
         "same layout and writes the HF checkpoint. Each is timed from its start to its exit; "
         "**bare** is a process that only runs `import torch, megatron.core, transformers`, "
         "timed the same way in the same repetition. **floor** = read floor + write floor "
         "(the tables above): what moving the same bytes in and out with safetensors costs. "
         f"Target: (command - bare) / floor <= {TARGET}. Peak RSS per rank: the `VmHWM` of "
         "every process under the command, sampled every 20 ms, against baseline + the rank's "
         "parameters (the model built at that layout) + 2 x the largest HF tensor; the "
         "launcher (no model; it only waits for its ranks) is listed apart.", "",
         "| model | layout | bare (s) | floor (s) | import (s) | (import - bare) / floor | "
         "export (s) | (export - bare) / floor | peak RSS import / export, worst rank (GiB) | "
         "budget (GiB) | launcher (GiB) | other processes (cores) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res, lay, v in rows:
        worst = max(v["ranks"].values(), key=lambda r: max(r["import"] or 0, r["export"] or 0)
                    - r["budget"])
        rss_ok = all(r["ok"] for r in v["ranks"].values())
        L.append(f"| {short(res)} | {lay.upper()} | {v['bare']:.2f} | {v['floor']:.2f} | "
                 f"{v['import']['wall']:.2f} | {v['import']['ratio']:.2f} ({_ok(v['import']['ok'])}) | "
                 f"{v['export']['wall']:.2f} | {v['export']['ratio']:.2f} ({_ok(v['export']['ok'])}) | "
                 f"{_g(worst['import'])} / {_g(worst['export'])} ({_ok(rss_ok)}) | "
                 f"{_g(worst['budget'])} | {_g(v['launcher']) if v['launcher'] else '-'} | "
                 f"{max(v['import']['foreign'], v['export']['foreign']):.2f} |")
    busy = [f"{short(res)} {lay.upper()}" for res, lay, v in rows
            if max(v["import"]["foreign"], v["export"]["foreign"]) > 0.3]
    if busy:
        L += ["", f"**Not a verdict where other processes took a large share of the 2 cores** "
              f"(over 0.3 of a core during the command: {', '.join(busy)}): the floors, the bare "
              "imports and each command ran minutes apart, and a shared machine slows each of "
              "them by a different factor; such a ratio says how busy the machine was as much as "
              "how fast the command is. The profiles below show where the time of a command goes "
              "whatever the load."]
    if runs > 1:
        L += ["", "Run by run, each against the floors and bare imports of the same repetition:", "",
              "| model | layout | (import - bare) / floor, per run | (export - bare) / floor, per run | "
              "other processes (cores) |", "|---|---|---|---|---|"]
        for res, lay, v in rows:
            L.append(f"| {short(res)} | {lay.upper()} | "
                     + " / ".join(f"{x:.2f}" for x in v["import"]["per_run"]) + " | "
                     + " / ".join(f"{x:.2f}" for x in v["export"]["per_run"]) + " | "
                     f"{max(v['import']['foreign'], v['export']['foreign']):.2f} |")
    L += ["", "Peak RSS per rank (GiB), import / export, against the budget:", "",
          "| model | layout | rank | share | budget | import | export |", "|---|---|---|---|---|---|---|"]
    for res, lay, v in rows:
        for r, x in sorted(v["ranks"].items()):
            L.append(f"| {short(res)} | {lay.upper()} | {r} | {_g(x['share'])} | {_g(x['budget'])} | "
                     f"{_g(x['import'])} | {_g(x['export'])} ({_ok(x['ok'])}) |")
    L += ["", "What the commands do with the bytes (bridges/core/megatron_ckpt.py, dist_read.py), "
          "and what was taken out of their way (issue #20; before: Llama-3.2-1B TP1 import 19.2 s "
          "wall, peak RSS 4.2 GB, of which the dist-checkpoint save 10.3 s):", "",
          "- **import** = imports + model build (no random init) + `load_hf_weights` (one copy per "
          "byte, see above) + megatron-core's torch_dist save: per tensor a `torch.save` archive "
          "appended to a `.distcp` file, one writer thread and file per core of the rank "
          "(`TorchDistSaveShardedStrategy(thread_count=...)`; megatron-core's default is one), "
          "fsynced. Megatron-core hands the write results back through a "
          "`multiprocessing.Manager` queue, a spawned server process meant for its async saver: "
          "seconds to start beside the writing and to stop at exit; the save here is synchronous, "
          "so an in-process queue is put in its place. Megatron-core also copies every tensor "
          "saved as a view before writing anything (SwiGLU's fc1 is saved as its gate and up "
          "halves: a third of the model); with `last_use` (the CLI's import) each half is copied "
          "and its parameter dropped, one at a time, so the writer copies nothing.",
          "- **export** = imports + model build + torch_dist load + `save_hf_pretrained`. "
          "torch.distributed.checkpoint's `FileSystemReader` reads each archive into a buffer, "
          "unpickles a new tensor from it and copies that into the parameter; `DirectReader` "
          "parses the archive's directory and pickle and `pread`s the bytes straight into the "
          "parameter (into a pinned host buffer for a GPU parameter), falling back to "
          "`FileSystemReader` for anything else. The fc1 halves, loaded into the parameter's own "
          "memory, are no longer concatenated into a new tensor and copied back.",
          "- Multi-rank commands: the launcher decides to relaunch before importing torch (it "
          "only waits for its ranks), so the ranks start at once.",
          "- The format is unchanged (torch_dist, same archives, metadata and key names): "
          "tests/test_convert.py exports bit-exact across layouts, and tests/test_megatron_ckpt_"
          "speed.py loads the same bytes as `FileSystemReader`.", "",
          "On a CUDA machine, `python benchmarks/run.py --gpu --models qwen3-8b-full --out-dir DIR` "
          "(benchmarks/gpu.py) measures the same in GB/s: import straight into GPU parameters, "
          "export from them, and the whole commands, against that machine's read and write floors "
          "(`--models qwen3-30b-a3b-full` for EP2/EP4 where there are several GPUs; `--device cpu "
          "--models tiny` checks the script without one). Its results are JSON in DIR, not this page; "
          "the runs on 1 x H200 (2026-12-04 and 2026-12-05) are docs/performance-gpu.md.", ""]
    for res in results["models"].values():
        prof = res.get("cli_profile")
        if not prof:
            continue
        L += [f"### Profile: `mbridge convert` of {short(res)}, TP1 (cProfile, one extra run)", ""]
        for d, p in prof.items():
            L += [f"`{d}`: {p['wall']:.2f} s under the profiler (own time of the main thread; "
                  "the writer threads' time shows as their waits). Functions by own time:", "",
                  "| function | calls | own (s) |", "|---|---|---|"]
            L += [f"| `{x['fn']}` | {x['calls']} | {x['tottime']:.2f} |" for x in p["self"]]
            L += [""]
    return L
