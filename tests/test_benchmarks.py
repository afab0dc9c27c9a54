"""The benchmark scripts (benchmarks/): the end-to-end CLI runner, the CLI targets and their
section of docs/performance.md, and the GPU benchmark run blind on CPU with a tiny model."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

GiB = 2**30


def test_run_cli_times_the_command_and_names_its_process():
    from endtoend import run_cli

    r = run_cli(["--help"], timeout=120)
    assert r["rc"] == 0 and "convert" in r["output"]
    assert set(r["peak_rss"]) == {"rank0"} and r["peak_rss"]["rank0"] > 10 * 2**20
    assert r["wall_s"] > 0


def test_run_cli_kills_a_command_past_its_timeout():
    from endtoend import run_cli

    r = run_cli(["convert", "import", "--hf", "/nonexistent", "--out", "/tmp/x"], timeout=0.01)
    assert r["rc"] is None


def _fake(read=1.0, write=3.0, bare=5.0, imp=10.0, exp=12.0, peak=3 * GiB):
    one = lambda wall: {"wall_s": wall, "peak_rss": {"rank0": peak, "rank1": peak / 2, "launcher": GiB / 2},  # noqa: E731
                        "foreign_cpu_s": 0.0}
    floor = lambda name, s: {"ranks": [{"phases": {name: {"wall_s": s}}}]}  # noqa: E731
    return {"model": "org/Model", "layers": None, "ckpt": {"largest_bytes": GiB // 2},
            "read": [floor("read", read)], "write": [floor("write", write)],
            "bare": [{"wall_s": bare}], "cli": {"tp2": [{"import": one(imp), "export": one(exp)}]},
            "cli_share": {"tp2": [GiB, GiB]}}


def test_cli_targets_are_net_of_bare_imports_against_read_plus_write_floor():
    from run import _cli_targets

    v = _cli_targets(_fake(), base=0.5 * GiB)["tp2"]
    assert v["floor"] == 4.0 and v["bare"] == 5.0
    assert v["import"]["ratio"] == pytest.approx((10 - 5) / 4) and v["import"]["ok"]
    assert v["export"]["ratio"] == pytest.approx((12 - 5) / 4) and not v["export"]["ok"]
    assert v["ranks"][0]["budget"] == pytest.approx(0.5 * GiB + GiB + GiB)
    assert v["ranks"][0]["ok"] is False and v["ranks"][1]["ok"] is True  # 3 GiB > 2.5 GiB
    assert v["launcher"] == GiB / 2 and v["ok"] is False


def test_cli_section_renders_every_layout_with_its_verdicts():
    from render_cli import cli_section
    from run import _cli_targets

    res = _fake()
    res["t"] = {"cli": _cli_targets(res, base=0.5 * GiB)}
    text = "\n".join(cli_section({"runs": 1, "models": {"m": res}}, lambda r: "Model"))
    assert "| Model | TP2 | 5.00 | 4.00 | 10.00 | 1.25 (met) | 12.00 | 1.75 (**missed**) |" in text
    assert "| Model | TP2 | 1 | 1.00 | 2.50 | 1.50 | 1.50 (met) |" in text
    assert cli_section({"runs": 1, "models": {}}, str) == []


def test_gpu_bench_runs_blind_on_cpu_with_a_tiny_model(tmp_path):
    """What the GPU machine will run, on CPU: every step ends ok, JSON and summary written."""
    import gpu

    out = tmp_path / "results"
    gpu.main(["--gpu", "--device", "cpu", "--models", "tiny", "--out-dir", str(out),
              "--tmp", str(tmp_path), "--budget", "400"])
    res = json.loads((out / "gpu-bench.json").read_text())
    steps = res["models"]["tiny"]["steps"]
    assert [k for k, v in steps.items() if not v.get("ok")] == []
    assert set(steps) == {"checkpoint", "read_floor", "write_floor", "bridge_tp1", "bare_imports",
                          "cli_import_tp1", "cli_export_tp1"}
    nbytes = res["models"]["tiny"]["bytes"]
    assert nbytes <= steps["bridge_tp1"]["written_bytes"] <= nbytes + 2**20  # tensors + headers
    assert steps["bridge_tp1"]["device"] == "cpu"
    summary = (out / "summary.txt").read_text()
    assert "cli_import_tp1" in summary and "GB/s" in summary
    assert not list(tmp_path.glob("mbridge-gpu-bench-*"))  # its checkpoints are gone


def test_gpu_bench_skips_layouts_the_machine_cannot_hold_and_steps_past_the_budget(tmp_path, monkeypatch):
    import gpu

    monkeypatch.setattr(gpu, "devices", lambda device: 1)
    out = tmp_path / "r"
    gpu.main(["--device", "cpu", "--models", "tiny-moe", "--out-dir", str(out), "--tmp", str(tmp_path),
              "--budget", "10"])  # under the 20 s a step needs: nothing runs
    m = json.loads((out / "gpu-bench.json").read_text())["models"]["tiny-moe"]
    assert m["skipped_layouts"] == {"ep2": "needs 2 devices, 1 here"}
    assert "time budget" in m["steps"]["checkpoint"]["skipped"]
