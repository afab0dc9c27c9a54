"""compressed-tensors FP8 (llm-compressor's ``float-quantized`` format, RedHat's FP8 releases):
per-channel ``weight_scale`` [rows, 1], static ``input_scale`` and the ``kv_cache_scheme``'s
``k_scale`` / ``v_scale`` on the attention module, read as used and written back bit-exactly."""
import json

import pytest
import torch
from safetensors.torch import save_file

from bridges.core import quant
from bridges.core.codecs import CheckpointView
from bridges.core.hf_io import HFCheckpoint

MODEL = "meta-llama/Llama-3.2-1B"


def test_attention_level_kv_scales_belong_to_the_projection_that_makes_them():
    names = {"m.self_attn.k_proj.weight", "m.self_attn.v_proj.weight", "m.self_attn.o_proj.weight",
             "m.self_attn.k_scale", "m.self_attn.v_scale", "f.self_attn.qkv_proj.weight",
             "f.self_attn.k_scale", "f.self_attn.v_scale"}
    assert quant.kv_cache_scales("m.self_attn.k_proj.weight", names) == ("m.self_attn.k_scale",)
    assert quant.kv_cache_scales("m.self_attn.v_proj.weight", names) == ("m.self_attn.v_scale",)
    assert quant.kv_cache_scales("m.self_attn.o_proj.weight", names) == ()
    assert quant.kv_cache_scales("f.self_attn.qkv_proj.weight", names) == ("f.self_attn.k_scale", "f.self_attn.v_scale")
    assert quant.kv_cache_scales("m.self_attn.k_proj.bias", names) == ()


def test_per_channel_scales_and_kv_scales_round_trip(tmp_path):
    w = torch.randn(6, 32)
    scale = (w.abs().amax(1, keepdim=True) / 448).to(torch.bfloat16)
    q, _ = quant.quantize(w, scale, "tensor", None)
    t = {"a.self_attn.k_proj.weight": q, "a.self_attn.k_proj.weight_scale": scale,
         "a.self_attn.k_proj.input_scale": torch.tensor([0.5], dtype=torch.bfloat16),
         "a.self_attn.k_scale": torch.tensor([0.03], dtype=torch.bfloat16),
         "a.self_attn.v_proj.weight": torch.randn(6, 32, dtype=torch.bfloat16),
         "a.self_attn.v_scale": torch.tensor([0.07], dtype=torch.bfloat16)}
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized"}}))
    view = CheckpointView(HFCheckpoint(tmp_path), torch.float32)
    k = view.read("a.self_attn.k_proj.weight")
    assert torch.equal(k, q.float() * scale.float())  # each row by its own scale
    assert view.used("a.self_attn.k_proj.weight") == ["a.self_attn.k_proj.weight", "a.self_attn.k_proj.weight_scale",
                                                      "a.self_attn.k_proj.input_scale", "a.self_attn.k_scale"]
    back = dict(view.encode("a.self_attn.k_proj.weight", k, quantized=True))
    assert all(torch.equal(back[n], t[n]) and back[n].dtype == t[n].dtype for n in back) and len(back) == 4
    v = dict(view.encode("a.self_attn.v_proj.weight", view.read("a.self_attn.v_proj.weight"), quantized=True))
    assert set(v) == {"a.self_attn.v_proj.weight", "a.self_attn.v_scale"}
    assert view.output_names(set(t), quantized=False) == {"a.self_attn.k_proj.weight", "a.self_attn.v_proj.weight"}


def test_compressed_tensors_fp8_through_the_suite(conformance, spec):
    fp8 = HFCheckpoint(conformance.quantized_checkpoint(spec(MODEL), "compressed")[0])
    kv = [n for n in fp8.names() if n.endswith(("self_attn.k_scale", "self_attn.v_scale"))]
    assert len(kv) >= 4 and fp8.shape(kv[0]) == (1,) and fp8.dtype(kv[0]) == torch.bfloat16
    w = "model.layers.0.mlp.up_proj.weight"
    assert fp8.dtype(w) == torch.float8_e4m3fn and fp8.shape(w + "_scale") == (fp8.shape(w)[0], 1)
    assert fp8.config()["quantization_config"]["quant_method"] == "compressed-tensors"
    res = conformance.quant_case(spec(MODEL), "compressed")
    assert res["quant"].passed and res["logits"].passed, res["quant"].details


@pytest.mark.parametrize("mutant,says", [("KVCacheScalesDropped", "k_scale: missing from"),
                                         ("KVCacheScalesSwapped", "k_scale: FP8 re-export differs")])
def test_attention_level_kv_scale_bugs_are_caught(conformance, spec, mutant, says):
    res = conformance.quant_case(spec(MODEL), "compressed", bridge_ref=f"tests.mutants:{mutant}")
    assert not res["quant"].passed and says in res["quant"].details, res["quant"].details


def test_compressed_tensors_through_the_cli(conformance, spec, tmp_path):
    """HF compressed-tensors FP8 -> Megatron TP2 -> HF at PP2 with --fp8: every tensor bit-exact
    (per-channel scales, input scales, attention-level KV scales, their bf16 dtype) and the
    quantization_config as it was; without --fp8: values only."""
    from tests.convert_tasks import assert_same_checkpoint

    src = conformance.quantized_checkpoint(spec(MODEL), "compressed")[0]
    mc = tmp_path / "m"
    run = lambda argv: conformance.pool.run("tests.convert_tasks:cli", argv=argv)  # noqa: E731
    assert run(["convert", "import", "--hf", src, "--out", str(mc), "--tp", "2"]) == [0] * 4
    assert run(["convert", "export", "--megatron", str(mc), "--out", str(tmp_path / "q"), "--pp", "2", "--fp8"]) == [0] * 4
    assert_same_checkpoint(HFCheckpoint(src), HFCheckpoint(tmp_path / "q"))
    out = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert out == HFCheckpoint(src).config()["quantization_config"]
    assert run(["convert", "export", "--megatron", str(mc), "--out", str(tmp_path / "v")]) == [0] * 4
    values = HFCheckpoint(tmp_path / "v")
    assert not [n for n in values.names() if n.endswith(("_scale", "input_scale"))]
    assert "quantization_config" not in json.loads((tmp_path / "v" / "config.json").read_text())
