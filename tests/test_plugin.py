"""The plugin as a user meets it: pytest run in an empty directory, in a subprocess."""
import json
import os
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def test_suite_passes_from_an_empty_directory_under_xdist(run, pytester):
    res = run("--mbridge-model=Qwen/Qwen3-8B", "--mbridge-layouts=tp1pp1,tp2pp2", "-n", "2",
              "--mbridge-report=report.json")
    assert res.ret == 0, res.stdout.str()
    # 4 checks x 2 layouts + config + 6 quant items (FP8 blocks, NVFP4, compressed-tensors FP8,
    # W4A16 and NVFP4, AWQ) + 3 snapshots (the shipped ones gate)
    res.assert_outcomes(passed=18)
    res.stdout.fnmatch_lines(["*mbridge conformance*", "*Qwen/Qwen3-8B*logits*tp2pp2*PASS*rel err*"])
    report = json.loads((pytester.path / "report.json").read_text())
    assert report["failed"] == 0 and report["passed"] == 21  # each quant item reports quant and logits
    logits = [r for r in report["results"] if r.get("check") == "logits"]
    assert {r["layout"] for r in logits} == {"tp1pp1", "tp2pp2"}
    assert all(r["data"]["rel_err"] <= 1e-5 and r["data"]["baseline_rel_err"] > 0.5 for r in logits)


def test_injected_bug_fails_with_a_diagnosis(run):
    res = run("--mbridge-model=Qwen/Qwen3-8B", "--mbridge-layouts=tp1pp1",
              "--mbridge-bridge=tests.mutants:GateUpSwapped", "-k", "logits or roundtrip")
    assert res.ret == 1
    res.assert_outcomes(passed=2, failed=1)  # roundtrip and config cannot see it, logits can
    res.stdout.fnmatch_lines(["*first divergence: layer 0 mlp*", "*embedding*rel err 0*"])


def test_snapshots_record_then_gate(run, pytester):
    # a local config directory: no snapshot of it ships with the plugin
    (pytester.path / "mine").mkdir()
    (pytester.path / "mine" / "config.json").write_text(
        (ROOT / "fixtures/configs/Qwen/Qwen3-0.6B/config.json").read_text())
    args = ("--mbridge-model=mine", "-k", "snapshot")
    first = run(*args, "-rs")
    first.assert_outcomes(skipped=3)
    first.stdout.fnmatch_lines(["*--snapshot-update*"])
    run(*args, "--snapshot-update").assert_outcomes(passed=3)
    assert (pytester.path / "__snapshots__" / "mbridge-mine.ambr").exists()
    # another model's recorded file in the same directory is not "unused" in this run
    other = pytester.path / "__snapshots__" / "mbridge-acme_Other.ambr"
    other.write_text((pytester.path / "__snapshots__" / "mbridge-mine.ambr").read_text())
    again = run(*args)
    again.assert_outcomes(passed=3)
    assert again.ret == 0 and other.exists()
    broken = run(*args, "--mbridge-bridge=tests.mutants:NormDropped")
    broken.assert_outcomes(passed=2, failed=1)  # the mapping table changed, the config did not


def test_shipped_snapshots_gate_a_shipped_model_without_recorded_ones(run, pytester):
    """From an empty directory the snapshots shipped with the plugin (fixtures/snapshots) are the
    reference of a shipped model; a recorded snapshot of the run's own directory wins."""
    args = ("--mbridge-model=Qwen/Qwen3-0.6B", "-k", "snapshot")
    res = run(*args)
    assert res.ret == 0, res.stdout.str()
    res.assert_outcomes(passed=3)
    broken = run(*args, "--mbridge-bridge=tests.mutants:NormDropped")
    broken.assert_outcomes(passed=2, failed=1)  # the mapping table changed, the config did not
    broken.stdout.fnmatch_lines(["*mapping table differs from the snapshot shipped with pytest-mbridge in "
                                 "*fixtures/snapshots (none recorded in *__snapshots__*"])
    assert not (pytester.path / "__snapshots__").exists()  # nothing written by a gating run
    # the mutant's own recording, in the run's directory, is what later runs compare with
    run(*args, "--mbridge-bridge=tests.mutants:NormDropped", "--snapshot-update").assert_outcomes(passed=3)
    run(*args, "--mbridge-bridge=tests.mutants:NormDropped").assert_outcomes(passed=3)


def test_unknown_model_offline_is_a_clear_error(run):
    res = run("--mbridge-model=nobody/no-such-model")
    assert res.ret == 4
    res.stderr.fnmatch_lines(["*nobody/no-such-model*HF_HUB_OFFLINE*Qwen/Qwen3-8B*"])


def test_run_gpu_without_gpu_is_an_error(run):
    res = run("--mbridge-model=Qwen/Qwen3-8B", "--run-gpu")
    assert res.ret == 4
    res.stderr.fnmatch_lines(["*--run-gpu*no CUDA device*"])


def test_plugin_is_inert_without_its_options(run, pytester):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    res = run()
    res.assert_outcomes(passed=1)


def test_help_lists_the_option_group(run):
    res = run("--help")
    res.stdout.fnmatch_lines(["*HF <-> Megatron-Core bridge conformance*", "*--mbridge-model*",
                              "*--run-gpu*", "*--mbridge-layouts*", "*--mbridge-report*"])


def test_real_weights_of_a_local_checkpoint(run, conformance, spec, tmp_path):
    toy = conformance.checkpoint(spec("mistralai/Mistral-7B-v0.1"))  # sliding window 8 < 32 tokens
    res = run(f"--mbridge-model={toy}", "--mbridge-weights=real", "--mbridge-layouts=tp2", "-k", "not snapshot")
    assert res.ret == 0, res.stdout.str()
    res.assert_outcomes(passed=6)


def test_cli_lists_bridges_and_runs_the_suite(pytester, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mbridge = str(Path(sys.executable).with_name("mbridge"))  # the console script
    res = pytester.run(mbridge, "list")
    assert res.ret == 0
    res.stdout.fnmatch_lines(["qwen3*Qwen3Bridge*Qwen3ForCausalLM*Qwen/Qwen3-0.6B, Qwen/Qwen3-8B"])
    res = pytester.run(mbridge, "check", "Qwen/Qwen3-0.6B", "--mbridge-layouts=tp1pp1", "-q", "-k", "roundtrip")
    assert res.ret == 0
    res.stdout.fnmatch_lines(["*2 passed*"])


def test_config_and_flops_snapshots_fail_with_a_broken_bridge(run):
    """Against the shipped snapshots: a wrong rope base changes only the config translation; a
    head_dim taken as hidden / heads (64 instead of Qwen3-0.6B's 128) changes the FLOPs too."""
    args = ("-k", "config_snapshot or flops_snapshot")
    rope = run("--mbridge-model=meta-llama/Llama-3.1-8B", "--mbridge-bridge=tests.mutants:WrongRopeTheta", *args)
    rope.assert_outcomes(passed=1, failed=1)
    rope.stdout.fnmatch_lines(["*AssertionError: config translation differs from the snapshot shipped*"])
    rope.stdout.fnmatch_lines(["FAILED suite.py::test_config_snapshot*"])
    head = run("--mbridge-model=Qwen/Qwen3-0.6B", "--mbridge-bridge=tests.mutants:HeadDimFromHidden", *args)
    head.assert_outcomes(failed=2)
    head.stdout.fnmatch_lines(["*AssertionError: FLOPs differs from the snapshot shipped*"])
    head.stdout.fnmatch_lines(["FAILED suite.py::test_flops_snapshot*"])
    run("--mbridge-model=Qwen/Qwen3-0.6B", *args).assert_outcomes(passed=2)


def test_stacked_experts_item_fail_with_a_broken_bridge(run):
    res = run("--mbridge-model=Qwen/Qwen3-30B-A3B", "--mbridge-bridge=tests.mutants:ExpertsPermuted",
              "-k", "stacked")
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines(["*logits (stacked experts)*FAIL*"])


def test_bf16_only_is_refused(run):
    res = run("--mbridge-model=Qwen/Qwen3-8B", "--mbridge-dtype=bfloat16")
    assert res.ret == 4
    res.stderr.fnmatch_lines(["*bfloat16 without float32 is refused*norm eps*rope*"
                              "Use --mbridge-dtype=float32,bfloat16*"])


def test_bf16_results_come_with_what_bf16_cannot_see(run, pytester):
    res = run("--mbridge-model=Qwen/Qwen3-8B", "--mbridge-layouts=tp1pp1", "-k", "test_logits",
              "--mbridge-dtype=bfloat16,float32", "--mbridge-report=report.json")
    assert res.ret == 0, res.stdout.str()
    res.assert_outcomes(passed=2)
    res.stdout.fnmatch_lines(["*logits*tp1pp1 *PASS*rel err*", "*logits*tp1pp1/bfloat16*PASS*x HF bf16's*",
                              "*bf16 verdicts are relative to HF's own bf16 noise*fp32*strict*"])
    report = json.loads((pytester.path / "report.json").read_text())
    from conformance.checks import BF16_BLIND

    assert report["bf16_note"] == BF16_BLIND


def test_run_gpu_asks_triton_for_ieee_fp32(monkeypatch):
    """Triton's kernels would take fp32 dots as TF32: --run-gpu sets IEEE for its workers,
    keeping a value the user gave."""
    import torch

    from pytest_mbridge import plugin

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_F32_DEFAULT", raising=False)
    plugin._gpu_setup()
    assert os.environ["TRITON_F32_DEFAULT"] == "ieee"
    monkeypatch.setenv("TRITON_F32_DEFAULT", "tf32")
    plugin._gpu_setup()
    assert os.environ["TRITON_F32_DEFAULT"] == "tf32"
