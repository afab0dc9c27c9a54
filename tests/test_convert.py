"""mbridge convert: import at one layout, export from another, bit-exact against the source."""
import subprocess
import sys

import pytest
import torch

from bridges.core.hf_io import HFCheckpoint

LAYOUTS = [(["--tp", "2"], ["--pp", "2"]), (["--pp", "2", "--vpp", "2"], ["--tp", "2", "--pp", "2"])]


def _same(a, b) -> None:
    src, out = HFCheckpoint(a), HFCheckpoint(b)
    assert out.names() == src.names()
    for n in src.names():
        assert torch.equal(src.get(n), out.get(n)) and src.dtype(n) == out.dtype(n), n


# Qwen2.5-VL, Qwen3-VL: vision towers of Megatron layers, TP-sharded in the distributed checkpoint too
@pytest.mark.parametrize("model", ["Qwen/Qwen3-8B", "meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-7B-Instruct",
                                   "mistralai/Mistral-7B-v0.1", "Qwen/Qwen2.5-VL-7B-Instruct",
                                   "Qwen/Qwen3-VL-8B-Instruct"])
def test_import_at_one_layout_export_at_another(conformance, spec, tmp_path, model):
    toy = conformance.checkpoint(spec(model))
    for imp, exp in LAYOUTS:
        mc, out = tmp_path / f"megatron{imp}", tmp_path / f"hf{imp}"
        assert conformance.pool.run("tests.convert_tasks:cli",
                                    argv=["convert", "import", "--hf", toy, "--out", str(mc), *imp]) == [0] * 4
        assert (mc / "latest_checkpointed_iteration.txt").read_text() == "0\n"
        assert (mc / "iter_0000000" / "metadata.json").exists()
        assert conformance.pool.run("tests.convert_tasks:cli",
                                    argv=["convert", "export", "--megatron", str(mc), "--out", str(out), *exp]) == [0] * 4
        _same(toy, out)
        assert (out / "config.json").exists()


@pytest.mark.parametrize("model", ["Qwen/Qwen3-30B-A3B", "zai-org/GLM-4.5", "Qwen/Qwen3-VL-30B-A3B-Instruct"])
def test_moe_import_under_ep_export_under_another_layout(conformance, spec, tmp_path, model):
    """Experts saved from EP2 x expert-TP1 (with TP2) reload under PP2 x EP2 and TP2 x EP2."""
    toy = conformance.checkpoint(spec(model))
    mc = tmp_path / "megatron"
    assert conformance.pool.run("tests.convert_tasks:cli", argv=[
        "convert", "import", "--hf", toy, "--out", str(mc), "--tp", "2", "--ep", "2", "--etp", "1"]) == [0] * 4
    for i, exp in enumerate((["--pp", "2", "--ep", "2"], ["--tp", "2", "--ep", "2"])):
        out = tmp_path / f"hf{i}"
        assert conformance.pool.run("tests.convert_tasks:cli", argv=[
            "convert", "export", "--megatron", str(mc), "--out", str(out), *exp]) == [0] * 4
        _same(toy, out)


@pytest.mark.full  # two fresh CLI processes, one relaunching two ranks: minutes on 2 cores
def test_cli_as_one_process_relaunches_for_several_ranks(conformance, spec, tmp_path):
    toy = conformance.checkpoint(spec("Qwen/Qwen3-0.6B"))
    mbridge = [sys.executable, "-m", "bridges.cli", "convert"]
    r = subprocess.run([*mbridge, "import", "--hf", toy, "--out", str(tmp_path / "m"), "--tp", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([*mbridge, "export", "--megatron", str(tmp_path / "m"), "--out", str(tmp_path / "hf")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "export" in r.stderr  # the progress bar
    _same(toy, tmp_path / "hf")


def test_export_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    from bridges.cli import main

    assert main(["convert", "export", "--megatron", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (f"mbridge: error: {tmp_path / 'mbridge.json'}: not found; pass "
                                       f"--hf-source to name the HF model this Megatron checkpoint came from\n")
    assert not (tmp_path / "x").exists()


def test_fp8_checkpoint_round_trips_through_megatron(conformance, spec, tmp_path):
    """HF FP8 -> Megatron (dequantized) -> HF FP8, bit-exact; and a dequantized HF export."""
    import json

    from conformance.toy import make_fp8_checkpoint

    toy = conformance.checkpoint(spec("Qwen/Qwen3-8B"))
    fp8, _ = make_fp8_checkpoint(toy, tmp_path / "toys", "block")
    mc = tmp_path / "m"
    run = lambda argv: conformance.pool.run("tests.convert_tasks:cli", argv=argv)  # noqa: E731
    assert run(["convert", "import", "--hf", fp8, "--out", str(mc), "--tp", "2", "--dtype", "float32"]) == [0] * 4
    assert run(["convert", "export", "--megatron", str(mc), "--out", str(tmp_path / "q"), "--pp", "2", "--fp8"]) == [0] * 4
    from tests.convert_tasks import assert_same_checkpoint

    assert_same_checkpoint(HFCheckpoint(fp8), HFCheckpoint(tmp_path / "q"))
    assert run(["convert", "export", "--megatron", str(mc), "--out", str(tmp_path / "d")]) == [0] * 4
    deq = HFCheckpoint(tmp_path / "d")
    assert not [n for n in deq.names() if n.endswith("_scale_inv")]
    assert {deq.dtype(n) for n in deq.names()} <= {torch.bfloat16, torch.float32}
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())


def test_export_writes_the_dtype_the_megatron_weights_have(conformance, spec, tmp_path):
    """A bf16 Megatron checkpoint of a float32 source (as a bf16 training run leaves it) exports
    in bf16, the config saying so; --dtype float32 writes the same values in float32; the source
    dtype when they agree (the other tests: bit-exact)."""
    import json

    toy = conformance.checkpoint(spec("Qwen/Qwen3-8B"))
    mc = tmp_path / "m"
    assert conformance.pool.run("tests.convert_tasks:cli", argv=[
        "convert", "import", "--hf", toy, "--out", str(mc), "--dtype", "bfloat16"]) == [0] * 4
    outs = {}
    for name, extra in (("default", []), ("fp32", ["--dtype", "float32"])):
        outs[name] = tmp_path / name
        assert conformance.pool.run("tests.convert_tasks:cli", argv=[
            "convert", "export", "--megatron", str(mc), "--out", str(outs[name]), "--hf-source", toy,
            "--tp", "2", *extra]) == [0] * 4
    src, bf, fp = (HFCheckpoint(d) for d in (toy, outs["default"], outs["fp32"]))
    assert bf.names() == fp.names() == src.names()
    for n in src.names():
        assert bf.dtype(n) == torch.bfloat16 and fp.dtype(n) == torch.float32, n
        assert torch.equal(bf.get(n), src.get(n).to(torch.bfloat16)), n  # the stored values
        assert torch.equal(fp.get(n), bf.get(n).float()), n
    assert json.loads((outs["default"] / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((outs["fp32"] / "config.json").read_text())["dtype"] == "float32"
