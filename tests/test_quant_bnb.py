"""bitsandbytes 4-bit checkpoints (NF4, double quantization): the codes (two a byte, the first in
the high nibble), their map, the block scales (themselves quantized with an offset) read as the
weight and written back bit-exactly, and the reading bugs a converter makes caught."""
import json

import pytest
import torch
from safetensors.torch import save_file

from bridges.core import bnb
from bridges.core.codecs import CheckpointView
from bridges.core.hf_io import CheckpointError, HFCheckpoint
from conformance.toy import NF4
from tests.convert_tasks import assert_quant_bug_caught, assert_quant_passes


def _state(**kw):
    return torch.tensor(list(json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", **kw}).encode()),
                        dtype=torch.uint8)


def test_codes_by_hand():
    """Byte 0x0F: codes 0 then 15 (high nibble first): -1 and +1 times the block's absmax."""
    codes = torch.full((64, 1), 0x0F, dtype=torch.uint8)  # 128 values, two blocks of 64
    tensors = {"quant_map": torch.tensor(NF4), "absmax": torch.tensor([0.5, 2.0])}
    w = bnb.dequantize(codes, tensors, {"shape": [4, 32], "blocksize": 64, "quant_type": "nf4"}, dtype=torch.float32)
    assert w[0, :4].tolist() == [-0.5, 0.5, -0.5, 0.5] and w[3, -2:].tolist() == [-2.0, 2.0]
    assert torch.equal(bnb.quantize(w, tensors, {"shape": [4, 32], "blocksize": 64, "quant_type": "nf4"}), codes)


def test_double_quantized_absmax():
    """absmax = nested_quant_map[code] x nested_absmax[block of 256] + nested_offset."""
    tensors = {"absmax": torch.tensor([0, 255], dtype=torch.uint8), "nested_absmax": torch.tensor([0.25]),
               "nested_quant_map": torch.linspace(-1, 1, 256)}
    a = bnb.absmax(tensors, {"nested_blocksize": 256, "nested_offset": 1.0}, "w")
    assert a.tolist() == [0.75, 1.25]


def test_int8_rows_by_hand():
    """LLM.int8: value = code x SCB[row] x (1 / 127), as bitsandbytes multiplies; codes back exactly
    from fp32 and bf16 values."""
    codes = torch.tensor([[127, -127, 1], [64, 0, -2]], dtype=torch.int8)
    scb = torch.tensor([2.0, 0.5])
    w = bnb.dequantize8(codes, scb, dtype=torch.float32)
    assert torch.equal(w, codes * scb.view(-1, 1) * bnb.INV127) and abs(float(w[0, 0]) - 2.0) < 1e-6
    assert torch.equal(bnb.quantize8(w, scb), codes)
    rnd = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    scb = torch.rand(64) + 0.01
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(bnb.quantize8(bnb.dequantize8(rnd, scb, dtype=dtype), scb), rnd), dtype


def test_broken_state_is_named(tmp_path):
    t = {"l.weight": torch.zeros(64, 1, dtype=torch.uint8), "l.weight.quant_map": torch.tensor(NF4),
         "l.weight.quant_state.bitsandbytes__nf4": _state(shape=[4, 32])}
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="bitsandbytes__nf4 has no l.weight.absmax"):
        CheckpointView(HFCheckpoint(tmp_path)).read("l.weight")


@pytest.mark.parametrize("model,layouts,kind", [("meta-llama/Llama-3.2-1B", ("tp1pp1", "tp2"), "bnb-nf4"),
                                                ("Qwen/Qwen3-8B", ("tp1pp1", "pp2"), "bnb-nf4-plain"),
                                                ("Qwen/Qwen3-30B-A3B", ("tp2ep2",), "bnb-nf4"),
                                                ("meta-llama/Llama-3.2-1B", ("tp1pp1", "tp2"), "bnb-int8")])
def test_bnb_through_the_suite(conformance, spec, model, layouts, kind):
    q = HFCheckpoint(conformance.quantized_checkpoint(spec(model), kind)[0])
    w = "model.layers.0.mlp.down_proj.weight" if "A3B" not in model else "model.layers.0.mlp.experts.0.down_proj.weight"
    assert q.dtype(w) == (torch.int8 if kind == "bnb-int8" else torch.uint8)
    assert (f"{w}.nested_absmax" in q) == (kind == "bnb-nf4")
    assert_quant_passes(conformance, spec(model), kind, layouts)


@pytest.mark.parametrize("mutant,kind", [("BnbLowNibbleFirst", "bnb-nf4"), ("BnbNestedOffsetDropped", "bnb-nf4"),
                                         ("BnbInt8ScaleNotOver127", "bnb-int8")])
def test_bnb_reading_bugs_are_caught(conformance, spec, mutant, kind):
    assert_quant_bug_caught(conformance, spec("meta-llama/Llama-3.2-1B"), kind, mutant)


@pytest.mark.parametrize("maker", ["make_bnb_checkpoint", "make_bnb8_checkpoint"])
def test_bnb_through_the_cli(conformance, spec, tmp_path, maker):
    """A bitsandbytes NF4 / int8 Llama toy -> Megatron TP2 -> HF at PP2 with --keep-quantization:
    every tensor bit-exact; without it, values only (no companions, the model dtype)."""
    from conformance import toy
    from tests.convert_tasks import quantized_roundtrip

    src, _ = getattr(toy, maker)(conformance.checkpoint(spec("meta-llama/Llama-3.2-1B")), tmp_path / "toys")
    values = quantized_roundtrip(conformance.pool, src, tmp_path, ["--tp", "2"])
    assert not [n for n in values.names() if n.endswith((".SCB", ".weight_format")) or ".absmax" in n
                or ".quant_" in n or ".nested_" in n]
    assert values.dtype("model.layers.0.mlp.down_proj.weight").is_floating_point
