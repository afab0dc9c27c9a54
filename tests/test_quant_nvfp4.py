"""NVFP4 (NVIDIA ModelOpt): dequantization against the format's definition, bit-exact
re-encoding, refusals naming the tensor, and the suite's quant item catching misreads; ModelOpt's
FP8 input and KV-cache scales."""
import pytest
import torch
from safetensors.torch import save_file

from bridges.core import quant
from bridges.core.codecs import CheckpointView
from bridges.core.hf_io import CheckpointError, HFCheckpoint


def nvfp4(rows=6, cols=48, seed=0):
    """Codes holding every byte (every low / high code pair, -0.0 included), float8 block scales
    from tiny to large, a float32 tensor scale that is not a power of two."""
    g = torch.Generator().manual_seed(seed)
    n = rows * cols // 2
    b = torch.cat([torch.arange(256), torch.randint(0, 256, (n,), generator=g)])[:n]
    codes = b[torch.randperm(n, generator=g)].to(torch.uint8).reshape(rows, cols // 2)
    scale = (torch.rand(rows, cols // 16, generator=g) * 400 + 0.01).to(torch.float8_e4m3fn)
    return codes, scale, torch.tensor(0.0123)


def by_definition(codes, scale, scale2):
    """value[r, 2k + h] = FP4[nibble h of codes[r, k]] * scale[r, (2k + h) // 16] * scale2, h = 0 low."""
    rows, half = codes.shape
    out = torch.empty(rows, 2 * half)
    for r in range(rows):
        for k in range(half):
            for h, nib in enumerate((int(codes[r, k]) & 15, int(codes[r, k]) >> 4)):
                c = 2 * k + h
                out[r, c] = quant.FP4_VALUES[nib] * float(scale[r, c // 16].float()) * float(scale2)
    return out


def test_dequantize_is_the_definition():
    codes, scale, scale2 = nvfp4()
    got = quant.nvfp4_dequantize(codes, scale, scale2, torch.float32)
    want = by_definition(codes, scale, scale2)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())  # -0.0 kept
    # block scales stored as bytes (some exporters) read the same
    assert torch.equal(quant.nvfp4_dequantize(codes, scale.view(torch.uint8), scale2, torch.float32), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_inverts_dequantize_bit_exactly(dtype, monkeypatch):
    monkeypatch.setattr(quant, "CHUNK", 2 * 48 * 16)  # several row chunks, the last ragged
    codes, scale, scale2 = nvfp4(rows=7)
    values = quant.nvfp4_dequantize(codes, scale, scale2, dtype)
    assert torch.equal(quant.nvfp4_quantize(values, scale, scale2), codes)


def test_a_value_off_the_grid_is_named():
    codes, scale, scale2 = nvfp4()
    values = quant.nvfp4_dequantize(codes, scale, scale2, torch.float32)
    values[2, 17] = values[2, 17] * 1.01 + 1e-3
    with pytest.raises(quant.QuantError, match=r"at \[2, 17\] is not representable in NVFP4"):
        quant.nvfp4_quantize(values, scale, scale2)


def _ckpt(tmp_path, **drop_or_change):
    codes, scale, scale2 = nvfp4()
    t = {"l.weight": codes, "l.weight_scale": scale, "l.weight_scale_2": scale2, "l.input_scale": torch.tensor(0.5)}
    for k, v in drop_or_change.items():
        t.pop(k) if v is None else t.__setitem__(k, v)
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    return HFCheckpoint(tmp_path)


def test_the_codec_reads_values_and_reencodes_the_source(tmp_path):
    view = CheckpointView(_ckpt(tmp_path), torch.float32)
    ckpt = view.ckpt
    w = view.read("l.weight")
    assert torch.equal(w, quant.nvfp4_dequantize(ckpt.get("l.weight"), ckpt.get("l.weight_scale"),
                                                 ckpt.get("l.weight_scale_2"), torch.float32))
    assert view.used("l.weight") == ["l.weight", "l.weight_scale", "l.weight_scale_2", "l.input_scale"]
    back = dict(view.encode("l.weight", w, quantized=True))
    assert all(torch.equal(back[n].view(torch.uint8) if back[n].dtype == torch.float8_e4m3fn else back[n],
                           ckpt.get(n).view(torch.uint8) if ckpt.dtype(n) == torch.float8_e4m3fn else ckpt.get(n))
               for n in ckpt.names())
    assert view.output_names(set(ckpt.names()), quantized=False) == {"l.weight"}  # values, no scales
    assert dict(view.encode("l.weight", w, quantized=False))["l.weight"].dtype == torch.float32  # the view's


@pytest.mark.parametrize("change,says", [
    (dict(**{"l.weight_scale_2": None}), "l.weight is NVFP4 .l.weight_scale. without its per-tensor l.weight_scale_2"),
    (dict(**{"l.weight_scale": torch.ones(6, 2, dtype=torch.float8_e4m3fn)}), r"l.weight_scale is .* needs float8_e4m3fn \(6, 3\)"),
    (dict(**{"l.weight_scale_2": torch.ones(2)}), "l.weight_scale_2 has shape .2,.: one per-tensor scale"),
])
def test_broken_companions_are_named(tmp_path, change, says):
    view = CheckpointView(_ckpt(tmp_path, **change), torch.float32)
    with pytest.raises(CheckpointError, match=says):
        view.read("l.weight")


MODEL = "meta-llama/Llama-3.2-1B"


def test_the_suite_passes_a_right_bridge(conformance, spec):
    res = conformance.quant_case(spec(MODEL), "nvfp4")
    assert res["quant"].passed and res["logits"].passed, res["quant"].details


@pytest.mark.parametrize("mutant", ["NVFP4HighNibbleFirst", "NVFP4TensorScaleDropped"])
def test_misreads_are_caught(conformance, spec, mutant):
    """Caught on import (values differ from the reference) or, where the misread values fit no
    code, when the export re-encodes them: either way the quant item fails."""
    res = conformance.quant_case(spec(MODEL), "nvfp4", bridge_ref=f"tests.mutants:{mutant}")
    assert not res["quant"].passed
    assert ("differ from the dequantized reference" in res["quant"].details
            or "not representable in NVFP4" in res["quant"].details), res["quant"].details


def test_values_imported_in_bf16_and_held_wider_reencode():
    """The usual path: import dequantizes to bf16, the model (or a float32 export) holds those
    values; the re-encode still finds each code."""
    codes, scale, scale2 = nvfp4(rows=5)
    held = quant.nvfp4_dequantize(codes, scale, scale2, torch.bfloat16).float()
    assert torch.equal(quant.nvfp4_quantize(held, scale, scale2), codes)


def test_modelopt_fp8_input_scale_is_the_static_activation_scale():
    """NVIDIA ModelOpt's FP8 names the calibrated input scale ``input_scale`` (transformers'
    static FP8: ``activation_scale``): read as used, written back on a quantized export."""
    assert quant.activation_scale("l.weight", {"l.weight", "l.weight_scale", "l.input_scale"}) == "l.input_scale"
    assert quant.activation_scale("l.weight", {"l.weight", "l.activation_scale"}) == "l.activation_scale"
    assert quant.activation_scale("l.weight", {"l.weight", "l.weight_scale"}) is None


def test_modelopt_fp8_through_the_suite(conformance, spec):
    res = conformance.quant_case(spec(MODEL), "modelopt")
    assert res["quant"].passed and res["logits"].passed, res["quant"].details


def _kv_ckpt(tmp_path):
    """A ModelOpt checkpoint's attention: NVFP4 k_proj, bf16 v_proj (excluded from quantization),
    each with its FP8 KV-cache scale."""
    codes, scale, scale2 = nvfp4()
    t = {"a.k_proj.weight": codes, "a.k_proj.weight_scale": scale, "a.k_proj.weight_scale_2": scale2,
         "a.k_proj.input_scale": torch.tensor(0.5), "a.k_proj.k_scale": torch.tensor(0.03),
         "a.v_proj.weight": torch.randn(4, 48, dtype=torch.bfloat16), "a.v_proj.v_scale": torch.tensor(0.07)}
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "llama", "quantization_config": '
                                          '{"quant_method": "modelopt", "kv_cache_quant_algo": "FP8"}}')
    return CheckpointView(HFCheckpoint(tmp_path), torch.float32)


def test_kv_cache_scales_are_read_as_used_and_written_back_only_quantized(tmp_path):
    view = _kv_ckpt(tmp_path)
    assert quant.kv_cache_scales("a.k_proj.weight", view.ckpt) == ("a.k_proj.k_scale",)
    assert view.used("a.k_proj.weight")[-2:] == ["a.k_proj.input_scale", "a.k_proj.k_scale"]
    assert view.used("a.v_proj.weight") == ["a.v_proj.weight", "a.v_proj.v_scale"]  # an unquantized weight too
    v = view.read("a.v_proj.weight")
    assert torch.equal(v, view.ckpt.get("a.v_proj.weight"))  # the scale is not applied to the weight
    kept = dict(view.encode("a.v_proj.weight", v, quantized=True))
    assert set(kept) == {"a.v_proj.weight", "a.v_proj.v_scale"} and float(kept["a.v_proj.v_scale"]) == float(torch.tensor(0.07))
    k = dict(view.encode("a.k_proj.weight", view.read("a.k_proj.weight"), quantized=True))
    assert torch.equal(k["a.k_proj.k_scale"], view.ckpt.get("a.k_proj.k_scale"))
    assert set(dict(view.encode("a.v_proj.weight", v, quantized=False))) == {"a.v_proj.weight"}
    names = set(view.ckpt.names())
    assert view.output_names(names, quantized=True) == names
    assert view.output_names(names, quantized=False) == {"a.k_proj.weight", "a.v_proj.weight"}


@pytest.mark.parametrize("kind", ["nvfp4", "modelopt"])
def test_kv_cache_scales_through_the_suite(conformance, spec, kind):
    """The toys carry ModelOpt's KV-cache scales (every k / v projection of Llama's 2 layers);
    the quant item's re-export gives each back bit-exactly."""
    fp8 = conformance.quantized_checkpoint(spec(MODEL), kind)[0]
    assert len([n for n in HFCheckpoint(fp8).names() if n.endswith(("k_scale", "v_scale"))]) >= 4
    res = conformance.quant_case(spec(MODEL), kind)
    assert res["quant"].passed, res["quant"].details


@pytest.mark.parametrize("mutant,says", [("KVCacheScalesDropped", "k_scale: missing from"),
                                         ("KVCacheScalesSwapped", "k_scale: FP8 re-export differs")])
def test_kv_cache_scale_bugs_are_caught(conformance, spec, mutant, says):
    res = conformance.quant_case(spec(MODEL), "nvfp4", bridge_ref=f"tests.mutants:{mutant}")
    assert not res["quant"].passed and says in res["quant"].details, res["quant"].details


def test_nvfp4_through_the_cli_keeps_modelopt_files(conformance, spec, tmp_path):
    """HF NVFP4 (ModelOpt: scales, KV-cache scales, hf_quant_config.json) -> Megatron TP2 ->
    HF at PP2 with --fp8: every tensor bit-exact and ModelOpt's file beside it; without --fp8,
    values only: no scale, no quantization_config, no hf_quant_config.json."""
    import json

    from conformance.toy import make_nvfp4_checkpoint
    from tests.convert_tasks import assert_same_checkpoint

    nv, _ = make_nvfp4_checkpoint(conformance.checkpoint(spec(MODEL)), tmp_path / "toys")
    mc = tmp_path / "m"
    run = lambda argv: conformance.pool.run("tests.convert_tasks:cli", argv=argv)  # noqa: E731
    assert run(["convert", "import", "--hf", nv, "--out", str(mc), "--tp", "2"]) == [0] * 4
    assert run(["convert", "export", "--megatron", str(mc), "--out", str(tmp_path / "q"), "--pp", "2", "--fp8"]) == [0] * 4
    assert_same_checkpoint(HFCheckpoint(nv), HFCheckpoint(tmp_path / "q"))
    assert (tmp_path / "q" / "hf_quant_config.json").read_text() == (tmp_path / "toys").joinpath(
        nv, "hf_quant_config.json").read_text()
    assert run(["convert", "export", "--megatron", str(mc), "--out", str(tmp_path / "v")]) == [0] * 4
    values = HFCheckpoint(tmp_path / "v")
    assert not [n for n in values.names() if n.endswith(("_scale", "_scale_2", "input_scale", "k_scale", "v_scale"))]
    assert values.dtype("model.layers.0.self_attn.q_proj.weight") == torch.bfloat16
    assert not (tmp_path / "v" / "hf_quant_config.json").exists()
    assert "quantization_config" not in json.loads((tmp_path / "v" / "config.json").read_text())


def test_mixed_precision_modelopt_reads_each_tensor_by_its_own_layout(tmp_path):
    """ModelOpt's MIXED_PRECISION checkpoints (Nemotron 3 NVFP4 releases) hold FP8 and NVFP4
    linears and bf16 ones side by side; each is read and re-encoded by its own layout."""
    codes, scale, scale2 = nvfp4()
    fp8, s8 = quant.quantize(torch.randn(8, 48), None, "tensor", None)
    t = {"a.weight": codes, "a.weight_scale": scale, "a.weight_scale_2": scale2, "a.input_scale": torch.tensor(0.5),
         "b.weight": fp8, "b.weight_scale": s8.float(), "b.input_scale": torch.tensor(0.25),
         "c.weight": torch.randn(4, 48, dtype=torch.bfloat16)}
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "nemotron_h", "quantization_config": {"quant_method": '
                                          '"modelopt", "quant_algo": "MIXED_PRECISION"}}')
    view = CheckpointView(HFCheckpoint(tmp_path), torch.float32)
    assert torch.equal(view.read("a.weight"), quant.nvfp4_dequantize(codes, scale, scale2, torch.float32))
    assert torch.equal(view.read("b.weight"), quant.dequantize(fp8, s8, "tensor", None))
    assert view.used("b.weight") == ["b.weight", "b.weight_scale", "b.input_scale"]
    back = {n: v for w in ("a.weight", "b.weight", "c.weight") for n, v in view.encode(w, view.read(w), quantized=True)}
    assert set(back) == set(t)
    assert all(torch.equal(back[n].view(torch.uint8) if back[n].dtype == torch.float8_e4m3fn else back[n],
                           t[n].view(torch.uint8) if t[n].dtype == torch.float8_e4m3fn else t[n]) for n in t)
