"""GPTQ (AutoGPTQ / GPTQModel v1 and v2 layouts, activation order) and AWQ (AutoAWQ's gemm
layout) checkpoints: ``qweight`` / ``qzeros`` / ``scales`` (/ ``g_idx``) read as the logical
weight, written back bit-exactly, and the reading bugs a converter makes caught."""
import json

import pytest
import torch
from safetensors.torch import save_file

from bridges.core import gptq
from bridges.core.codecs import CheckpointView
from bridges.core.hf_io import CheckpointError, HFCheckpoint
from tests.convert_tasks import assert_quant_bug_caught, assert_quant_passes

GPTQ = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 8, "checkpoint_format": "gptq"}}
AWQ = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 8, "version": "gemm"}}


def test_packing_by_hand():
    """GPTQ: qweight packs input rows, first row in the lowest bits, and v1 stores zero - 1;
    AWQ: qweight packs output columns, nibble k holding column (0, 2, 4, 6, 1, 3, 5, 7)[k]."""
    word = sum(c << (4 * k) for k, c in enumerate(range(8)))  # codes 0..7, lowest bits first
    qweight = torch.full((1, 8), word, dtype=torch.int32)  # GPTQ: 8 input rows, 8 output columns
    qzeros = torch.tensor([[0x33333333]], dtype=torch.int32)  # v1: zero point 4 for each column
    w = gptq.dequantize(qweight, qzeros, torch.full((1, 8), 0.5, dtype=torch.float16), None, GPTQ, dtype=torch.float32)
    assert w.tolist() == [[-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]] * 8  # [out, in]
    v2 = {"quantization_config": {**GPTQ["quantization_config"], "checkpoint_format": "gptq_v2"}}
    assert gptq.dequantize(qweight, qzeros, torch.ones(1, 8), None, v2, dtype=torch.float32)[0, 0] == -3.0
    # AWQ: the same word as one input row of 8 output columns: nibble k is column ORDER[k]
    awq = qweight[:, :1].contiguous()
    w = gptq.dequantize(awq, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8), None, AWQ, dtype=torch.float32)
    assert w[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    assert torch.equal(gptq.quantize(w, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 8), None, AWQ), awq)


def test_activation_order_groups_follow_g_idx():
    g_idx = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.int32)
    qweight = torch.full((1, 8), 0x77777777, dtype=torch.int32)  # every code 7
    qzeros = torch.full((2, 1), 0x55555555, dtype=torch.int32)  # zero point 6 (v1)
    scales = torch.tensor([[1.0] * 8, [2.0] * 8])
    w = gptq.dequantize(qweight, qzeros, scales, g_idx, GPTQ, dtype=torch.float32)
    assert w.tolist() == [[2.0, 1.0] * 4] * 8
    assert torch.equal(gptq.quantize(w, qzeros, scales, g_idx, GPTQ), qweight)


@pytest.mark.parametrize("qc,says", [({"quant_method": "awq", "version": "gemv"}, "gemv"),
                                     ({"quant_method": "gptq", "bits": 3}, "3-bit"),
                                     ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "marlin"),
                                     ({"quant_method": "fp8"}, "neither gptq nor awq")])
def test_unread_layouts_are_named(tmp_path, qc, says):
    save_file({"l.qweight": torch.zeros(1, 8, dtype=torch.int32), "l.qzeros": torch.zeros(1, 1, dtype=torch.int32),
               "l.scales": torch.ones(1, 8, dtype=torch.float16)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qc}))
    with pytest.raises(CheckpointError, match=says):
        CheckpointView(HFCheckpoint(tmp_path)).read("l.weight")


@pytest.mark.parametrize("model,layouts,kind", [("mistralai/Mistral-7B-v0.1", ("tp1pp1", "tp2"), "gptq"),
                                                ("Qwen/Qwen3-8B", ("tp1pp1", "pp2"), "awq"),
                                                ("meta-llama/Llama-3.2-1B", ("tp1pp1", "tp2"), "gptq-actorder"),
                                                ("Qwen/Qwen3-30B-A3B", ("tp1pp1", "tp2ep2"), "gptq")])
def test_gptq_awq_through_the_suite(conformance, spec, model, layouts, kind):
    q = HFCheckpoint(conformance.quantized_checkpoint(spec(model), kind)[0])
    w = "model.layers.0.mlp.down_proj." if "A3B" not in model else "model.layers.0.mlp.experts.0.down_proj."
    assert q.dtype(w + "qweight") == torch.int32 and w + "weight" not in q
    assert (w + "g_idx" in q) == kind.startswith("gptq")
    assert_quant_passes(conformance, spec(model), kind, layouts)


@pytest.mark.parametrize("mutant,kind", [("AWQNaturalNibbleOrder", "awq"), ("GPTQZeroPointNotOffset", "gptq"),
                                         ("GPTQGroupsByPosition", "gptq-actorder")])
def test_gptq_awq_reading_bugs_are_caught(conformance, spec, mutant, kind):
    assert_quant_bug_caught(conformance, spec("Qwen/Qwen3-8B"), kind, mutant)


def test_awq_through_the_cli(conformance, spec, tmp_path):
    """An AWQ Qwen3 toy -> Megatron TP2 -> HF at PP2 with --keep-quantization: every tensor
    bit-exact and the quantization_config as it was; without it, values only."""
    from conformance.toy import make_gptq_checkpoint
    from tests.convert_tasks import quantized_roundtrip

    src, _ = make_gptq_checkpoint(conformance.checkpoint(spec("Qwen/Qwen3-8B")), tmp_path / "toys", method="awq")
    values = quantized_roundtrip(conformance.pool, src, tmp_path, ["--tp", "2"])
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    assert not [n for n in values.names() if n.endswith(("qweight", "qzeros", "scales", "g_idx"))]
    assert "model.layers.0.mlp.down_proj.weight" in values.names()
