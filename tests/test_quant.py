"""FP8 formats: dequantization, ragged edge tiles, bit-exact requantization, refusals."""
import pytest
import torch

from bridges.core import quant


@pytest.mark.parametrize("shape,block", [((96, 64), (32, 32)), ((100, 70), (32, 32)), ((5, 300), (128, 128))])
def test_block_roundtrip_with_ragged_edges(shape, block):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    q, s = quant.quantize(w, None, "block", block)
    assert q.dtype == torch.float8_e4m3fn
    assert s.shape == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    deq = quant.dequantize(q, s, "block", block)
    assert (deq - w).abs().max() <= w.abs().max() * 2 ** -3  # e4m3: 3 mantissa bits
    q2, s2 = quant.quantize(deq, s, "block", block)  # the source scales give back the codes
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    q3, _ = quant.quantize(deq.bfloat16(), s, "block", block)  # through a bf16 model too
    assert torch.equal(q3.view(torch.uint8), q.view(torch.uint8))


def test_per_tensor_and_per_row_scales():
    w = torch.randn(8, 16)
    q, s = quant.quantize(w, None, "tensor", None)
    assert s.shape == () and torch.allclose(quant.dequantize(q, s, "tensor", None), w, rtol=0.07, atol=1e-3)
    rows = w.abs().amax(1, keepdim=True) / 448
    q = (w / rows).to(torch.float8_e4m3fn)
    assert torch.allclose(quant.dequantize(q, rows, "tensor", None), w, rtol=0.07, atol=1e-3)


def test_bad_scale_shape_is_named():
    with pytest.raises(quant.QuantError, match=r"does not tile \(64, 64\) by \(32, 32\)"):
        quant.dequantize(torch.zeros(64, 64, dtype=torch.float8_e4m3fn), torch.ones(3, 2), "block", (32, 32))


def test_companions():
    names = {"a.weight", "a.weight_scale_inv", "b.weight", "b.weight_scale", "c.weight"}
    assert quant.companion("a.weight", names) == ("a.weight_scale_inv", "block")
    assert quant.companion("b.weight", names) == ("b.weight_scale", "tensor")
    assert quant.companion("c.weight", names) is None


def test_fp8_tensor_without_scale_is_refused(toy, toy_tensors, tmp_path):
    """End to end: the error names the tensor, and nothing is loaded silently."""
    import json
    import shutil

    from safetensors.torch import save_file

    from bridges import AutoBridge, CoverageError

    d = tmp_path / "fp8-noscale"
    shutil.copytree(toy, d)
    t = dict(toy_tensors)
    t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"].to(torch.float8_e4m3fn)
    save_file(t, str(d / "model.safetensors"))
    bridge = AutoBridge.from_hf_pretrained(d)
    chunks = bridge.to_megatron_provider().provide_distributed_model()
    with pytest.raises(CoverageError, match=r"model.layers.0.mlp.down_proj.weight is torch.float8_e4m3fn with no scale companion"):
        bridge.load_hf_weights(chunks)
    assert json.loads((d / "config.json").read_text())["model_type"] == "qwen3"
