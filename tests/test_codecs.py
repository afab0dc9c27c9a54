"""The checkpoint view: each stored format read as values, its parts counted as used, and an
export encoded back, as values or bit-exactly in the source's format."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from bridges.core import quant
from bridges.core.codecs import BNB4, BNB8, CODECS, FP8, GPTQ, MXFP4, NVFP4, CheckpointView, Codec, PackedInt, Plain
from bridges.core.hf_io import CheckpointError, HFCheckpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> HFCheckpoint:
    d = tmp_path_factory.mktemp("codecs")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g)
    q, s = quant.quantize(w, None, "block", (32, 32))
    pq, ps = quant.quantize(w, None, "tensor", None)
    scales = torch.randint(120, 130, (2, 6, 1), generator=g, dtype=torch.uint8)
    blocks = torch.randint(0, 256, (2, 6, 1, 16), generator=g, dtype=torch.uint8)
    save_file({"plain.weight": w.bfloat16(), "stack.weight": torch.randn(3, 4, 5, generator=g),
               "block.weight": q, "block.weight_scale_inv": s,
               "tensor.weight": pq, "tensor.weight_scale": ps.reshape(1),
               "raw.weight": q.clone(), "int8.weight": torch.randint(-127, 128, (4, 3), generator=g, dtype=torch.int8),
               "int8.weight_s": torch.tensor([0.5, 1.0, 2.0, 4.0]), "experts.gate_up_proj_blocks": blocks, "experts.gate_up_proj_scales": scales},
              str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "toy", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [32, 32]}}))
    return HFCheckpoint(d)


def test_each_name_finds_its_codec(ckpt):
    view = CheckpointView(ckpt)
    assert isinstance(view.codec("plain.weight")[0], Plain)
    assert view.codec("block.weight") == (view.codec("block.weight")[0], ("block.weight", "block.weight_scale_inv"))
    assert isinstance(view.codec("tensor.weight")[0], FP8)
    assert isinstance(view.codec("experts.gate_up_proj")[0], MXFP4)
    assert view.codec("absent.weight") is None and not view.has("absent.weight")
    assert view.has("stack.weight[2]") and not view.has("stack.weight[3]")
    with pytest.raises(CheckpointError, match="raw.weight is torch.float8_e4m3fn with no scale companion"):
        view.codec("raw.weight")
    # MXFP4, PackedInt and GPTQ: their logical name is not stored; NVFP4 before Plain: its codes
    # are the name itself
    assert [type(c) for c in CODECS] == [MXFP4, BNB4, BNB8, NVFP4, PackedInt, GPTQ, FP8, Plain]


def test_read_and_used(ckpt):
    view = CheckpointView(ckpt, torch.float32)
    w = ckpt.get("plain.weight")
    assert torch.equal(view.read("plain.weight"), w)
    assert torch.equal(view.read("block.weight"), quant.dequantize(
        ckpt.get("block.weight"), ckpt.get("block.weight_scale_inv"), "block", (32, 32)))
    err = (view.read("block.weight") - w.float()).norm() / w.float().norm()
    assert err < 0.05  # near the values it came from (e4m3: 3 mantissa bits), not raw codes
    assert torch.equal(view.read("stack.weight[1]"), ckpt.get("stack.weight")[1])
    mx = view.read("experts.gate_up_proj")
    assert mx.shape == (2, 32, 6) and torch.equal(view.read("experts.gate_up_proj[1]"), mx[1])
    assert view.used("block.weight") == ["block.weight", "block.weight_scale_inv"]
    assert view.used("experts.gate_up_proj[1]") == ["experts.gate_up_proj_blocks[1]", "experts.gate_up_proj_scales[1]"]
    assert view.used("stack.weight[2]") == ["stack.weight[2]"]
    with pytest.raises(CheckpointError, match="no tensor absent"):
        view.read("absent")


def test_encode_is_bit_exact_in_the_source_format(ckpt):
    view = CheckpointView(ckpt, torch.float32)
    for name, parts in (("block.weight", ["block.weight", "block.weight_scale_inv"]),
                        ("tensor.weight", ["tensor.weight", "tensor.weight_scale"]),
                        ("experts.gate_up_proj", ["experts.gate_up_proj_blocks", "experts.gate_up_proj_scales"])):
        out = view.encode(name, view.read(name), quantized=True)
        assert [n for n, _ in out] == parts
        for n, t in out:
            src = ckpt.get(n)
            assert t.dtype == src.dtype and torch.equal(t.view(torch.uint8), src.view(torch.uint8)), n
        values = view.encode(name, view.read(name), quantized=False)
        assert [(n, t.dtype) for n, t in values] == [(name, torch.float32)]
    plain = view.encode("plain.weight", ckpt.get("plain.weight").float(), quantized=True)
    assert plain[0][1].dtype == torch.bfloat16  # the source's dtype
    assert view.encode("new.weight", torch.ones(2), quantized=True)[0][0] == "new.weight"


def test_output_names(ckpt):
    view = CheckpointView(ckpt)
    stored = set(ckpt.names()) - {"raw.weight", "int8.weight", "int8.weight_s"}
    assert view.output_names(stored, quantized=True) == stored
    assert view.output_names(stored, quantized=False) == {
        "plain.weight", "stack.weight", "block.weight", "tensor.weight", "experts.gate_up_proj"}


def test_a_new_format_is_one_codec(ckpt, monkeypatch):
    """A stored format the view does not know (int8 codes with a per-row '_s' scale, say) is
    one Codec subclass in CODECS; nothing else changes."""
    import bridges.core.codecs as codecs

    class Int8(Codec):
        def parts(self, c, name):
            return (name, name + "_s") if name + "_s" in c else None

        def decode(self, c, parts, row, dtype):
            return c.get(parts[0]).float() * c.get(parts[1])[:, None]

    codes = ckpt.get("int8.weight")
    assert torch.equal(CheckpointView(ckpt).read("int8.weight"), codes)  # unknown: raw codes
    monkeypatch.setattr(codecs, "CODECS", (Int8(), *codecs.CODECS))
    view = CheckpointView(ckpt)
    assert torch.equal(view.read("int8.weight"), codes.float() * torch.tensor([0.5, 1.0, 2.0, 4.0])[:, None])
    assert view.used("int8.weight") == ["int8.weight", "int8.weight_s"]
    assert isinstance(view.codec("plain.weight")[0], Plain)  # untouched where the new one does not apply
