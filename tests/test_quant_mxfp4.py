"""MXFP4 (gpt-oss): dequantization against transformers' own, bit-exact re-encoding, refusals."""
import json
import re

import pytest
import torch

from bridges.core import quant

ref = pytest.importorskip("transformers.integrations.mxfp4").convert_moe_packed_tensors

EXTREMES = (0, 1, 2, 126, 127, 128, 200, 250, 252)  # every value finite in bf16 / fp32


def packed(experts=2, rows=24, groups=3, exps=EXTREMES, seed=0):
    """Blocks holding every byte (every low/high code pair, codes 8 = -0.0 included) and
    scales cycling through ``exps``; rows != groups * 32, so a missing transpose shows."""
    g = torch.Generator().manual_seed(seed)
    n = experts * rows * groups * 16
    b = torch.cat([torch.arange(256), torch.randint(0, 256, (n,), generator=g)])[:n]
    b = b[torch.randperm(n, generator=g)].to(torch.uint8).reshape(experts, rows, groups, 16)
    s = torch.tensor(exps)[torch.randint(0, len(exps), (experts, rows, groups), generator=g)]
    return b, s.to(torch.uint8)


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):  # several chunks per expert, the last one ragged
    monkeypatch.setattr(quant, "CHUNK", 7 * 3 * 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_is_transformers(dtype):
    b, s = packed(rows=48)
    s = (torch.arange(s.numel()) % 256).to(torch.uint8).reshape(s.shape)  # every scale: 0 gives
    want = ref(b, s, dtype=dtype)  # subnormals, 253-255 overflow to inf
    got = quant.mxfp4_dequantize(b, s, dtype)
    assert got.shape == want.shape == (2, 3 * 32, 48) and got.dtype == dtype
    assert torch.equal(bits(got), bits(want))  # bit for bit: -0.0, subnormals, inf, nan
    assert (got < 0).any() and (got == 0).any() and got.isinf().any()
    swapped = (b >> 4) | (b << 4)  # the data tells the nibble order apart
    assert not torch.equal(bits(quant.mxfp4_dequantize(swapped, s, dtype)), bits(want))


def test_layout_by_hand():
    """out[e, g*32 + 2k + h, r] = FP4[nibble h of blocks[e, r, g, k]] * 2**(scale - 127)."""
    b = torch.zeros(1, 2, 2, 16, dtype=torch.uint8)
    s = torch.full((1, 2, 2), 127, dtype=torch.uint8)
    b[0, 1, 1, 3] = 0xF2  # low nibble 2 (1.0), high nibble 15 (-6.0)
    s[0, 1, 1] = 129
    out = quant.mxfp4_dequantize(b, s, torch.float32)
    assert out.shape == (1, 64, 2)
    assert out[0, 32 + 6, 1] == 4.0 and out[0, 32 + 7, 1] == -24.0
    assert (out != 0).sum() == 2
    assert torch.equal(bits(torch.tensor(quant.FP4_VALUES)),
                       bits(torch.tensor(pytest.importorskip("transformers.integrations.mxfp4").FP4_VALUES)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_requantize_is_bit_exact(dtype):
    b, s = packed(seed=1)
    v = quant.mxfp4_dequantize(b, s, dtype)
    assert torch.equal(quant.mxfp4_quantize(v, s), b)
    assert torch.equal(quant.mxfp4_quantize(v.float(), s), b)  # through an fp32 model too


@pytest.mark.parametrize("bad", [0.7 * 2.0 ** 125, -5.0 * 2.0 ** 125, 5.0 * 2.0 ** 124,
                                 float("nan"), float("inf"), 2.0 ** -149])
def test_unrepresentable_value_is_named(bad):
    """Never rounded: not a code, between codes, off by the scale, non-finite, or so small that
    value / scale rounds to the 0.0 code (caught by re-dequantizing)."""
    b, s = packed(seed=2)
    s[1, 5, 2] = 252  # 2**125
    v = quant.mxfp4_dequantize(b, s, torch.float32)
    v[1, 2 * 32 + 9, 5] = bad
    with pytest.raises(quant.QuantError, match=re.escape(
            f"value {v[1, 73, 5].item()!r} at [1, 73, 5] is not representable in MXFP4 with scale 252 "
            f"(2**125); 1 such value(s)")):
        quant.mxfp4_quantize(v, s)


def test_shape_and_dtype_errors():
    b, s = packed()
    with pytest.raises(quant.QuantError, match=r"scales shape \(2, 24, 4\) does not match blocks shape \(2, 24, 3, 16\)"):
        quant.mxfp4_dequantize(b, torch.zeros(2, 24, 4, dtype=torch.uint8))
    with pytest.raises(quant.QuantError, match=r"blocks are torch.int8, expected torch.uint8"):
        quant.mxfp4_dequantize(b.view(torch.int8), s)
    with pytest.raises(quant.QuantError, match=r"scales are torch.float32"):
        quant.mxfp4_dequantize(b, s.float())
    v = quant.mxfp4_dequantize(b, s)
    with pytest.raises(quant.QuantError, match=r"values torch.bfloat16 \(2, 24, 96\) do not match MXFP4 scales "
                                               r"shape \(2, 24, 3\) \(expected float \(2, 96, 24\)\)"):
        quant.mxfp4_quantize(v.transpose(1, 2), s)


def test_packed_parts_in_a_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from bridges.core.hf_io import HFCheckpoint

    b, s = packed()
    e = "model.layers.0.mlp.experts"
    save_file({f"{e}.gate_up_proj_blocks": b, f"{e}.gate_up_proj_scales": s,
               f"{e}.down_proj_blocks": b.clone(), f"{e}.gate_up_proj_bias": torch.zeros(2, 24),
               "model.layers.0.mlp.router.weight": torch.zeros(2, 8)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.mlp.router"]}}))
    ckpt = HFCheckpoint(tmp_path)
    parts = quant.packed_parts(f"{e}.gate_up_proj", ckpt)
    assert parts == (f"{e}.gate_up_proj_blocks", f"{e}.gate_up_proj_scales")
    assert torch.equal(bits(quant.mxfp4_dequantize(*map(ckpt.get, parts))), bits(ref(b, s)))
    assert quant.packed_parts("model.layers.0.mlp.router.weight", ckpt) is None
    assert quant.packed_parts(f"{e}.gate_up_proj_bias", ckpt) is None
    with pytest.raises(quant.QuantError, match=rf"{e}.down_proj_blocks has no {e}.down_proj_scales"):
        quant.packed_parts(f"{e}.down_proj", ckpt)


def test_packed_parts_checks_headers():
    class Ckpt(dict):
        def dtype(self, n):
            return self[n][0]

        def shape(self, n):
            return self[n][1]

    u8 = torch.uint8
    ok = Ckpt({"w_blocks": (u8, (2, 4, 3, 16)), "w_scales": (u8, (2, 4, 3))})
    assert quant.packed_parts("w", ok) == ("w_blocks", "w_scales")
    with pytest.raises(quant.QuantError, match=r"scales shape \(2, 4, 2\) does not match .*\(w_blocks / w_scales\)"):
        quant.packed_parts("w", Ckpt(ok, w_scales=(u8, (2, 4, 2))))
    with pytest.raises(quant.QuantError, match=r"scales are torch.float32, expected torch.uint8 \(w_blocks / w_scales\)"):
        quant.packed_parts("w", Ckpt(ok, w_scales=(torch.float32, (2, 4, 3))))
    with pytest.raises(quant.QuantError, match=r"w is stored both as values and as MXFP4"):
        quant.packed_parts("w", Ckpt(ok, w=(torch.bfloat16, (2, 96, 4))))


def test_mxfp4_moe_checkpoint_imports_runs_and_reexports_bit_exact(conformance, spec):
    """An MXFP4-packed MoE checkpoint (stacked experts as _blocks / _scales) through the
    bridge at EP2: values equal the dequantized reference, logits match HF on them, and
    --fp8-style re-export gives back the blocks and scales bit-exactly."""
    res = conformance.quant_case(spec("Qwen/Qwen3-30B-A3B"), "mxfp4", layout="ep2")
    assert res["quant"].passed and res["logits"].passed, "\n".join(str(r) for r in res.values())
    assert "8 quantized tensors" in res["quant"].figure  # gate_up and down of 4 layers


def test_mxfp4_loaded_as_raw_bytes_is_caught(conformance, spec):
    res = conformance.quant_case(spec("Qwen/Qwen3-30B-A3B"), "mxfp4", bridge_ref="tests.mutants:MXFP4Raw")
    assert not res["quant"].passed
