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


# -- pack-quantized (W4A16): Kimi-K2-Thinking's routed experts, RedHat's w4a16 releases ---------
KIMI = "moonshotai/Kimi-K2-Instruct"  # Kimi-K2-Thinking is this architecture with int4 routed experts


def test_int4_words_follow_the_format_definition():
    """Eight codes a word, the first in the lowest 4 bits, each stored as code + 8; a scale per
    group of consecutive columns."""
    codes = torch.tensor([[-8, -7, 0, 7, 1, 2, 3, 4, 5, -1, -2, -3, -4, -5, -6, 6]], dtype=torch.int32)
    words = quant.int_pack(codes, 4)
    by_hand = [sum((int(c) + 8) << (4 * i) for i, c in enumerate(codes[0, k:k + 8])) for k in (0, 8)]
    assert words.tolist() == [[w - 2**32 if w >= 2**31 else w for w in by_hand]]
    scale = torch.tensor([[0.5, 2.0]], dtype=torch.bfloat16)
    v = quant.int_dequantize(words, scale, torch.tensor([1, 16]), dtype=torch.float32)
    assert torch.equal(v, torch.cat([codes[0, :8] * 0.5, codes[0, 8:] * 2.0])[None].float())
    assert torch.equal(quant.int_quantize(v, scale, 2), words)
    w8 = quant.int_pack(codes, 8)  # W8A16: four codes a word
    assert w8.shape == (1, 4) and quant.int_bits(4, 16, "x") == 8
    assert torch.equal(quant.int_unpack(w8, 16, 8), codes)


def _packed_ckpt(tmp_path, **extra):
    codes = torch.randint(-8, 8, (4, 64), dtype=torch.int32)
    t = {"l.weight_packed": quant.int_pack(codes, 4), "l.weight_scale": torch.rand(4, 2).to(torch.bfloat16),
         "l.weight_shape": torch.tensor([4, 64]), **extra}
    save_file({k: v for k, v in t.items() if v is not None}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text('{"model_type": "qwen3"}')
    return CheckpointView(HFCheckpoint(tmp_path), torch.float32), t


def test_packed_int_reads_and_writes_back(tmp_path):
    view, t = _packed_ckpt(tmp_path)
    assert view.used("l.weight") == ["l.weight_packed", "l.weight_scale", "l.weight_shape"]
    w = view.read("l.weight")
    back = dict(view.encode("l.weight", w, quantized=True))
    assert all(torch.equal(back[n], t[n]) for n in t) and len(back) == 3
    assert [n for n, _ in view.encode("l.weight", w, quantized=False)] == ["l.weight"]
    assert view.output_names(set(t), quantized=False) == {"l.weight"}


def test_activation_ordered_groups_follow_g_idx(tmp_path):
    """compressed-tensors' ``actorder: group``: ``weight_g_idx`` [cols] names each column's group;
    its scale (and zero point) is that group's, wherever the column sits."""
    g_idx = torch.tensor([1, 0] * 32, dtype=torch.int32)
    view, t = _packed_ckpt(tmp_path, **{"l.weight_g_idx": g_idx})
    assert view.used("l.weight")[-1] == "l.weight_g_idx"
    codes = quant.int_unpack(t["l.weight_packed"], 64, 4)
    want = codes.float() * t["l.weight_scale"].float()[:, g_idx.long()]
    w = view.read("l.weight")
    assert torch.equal(w, want)
    back = dict(view.encode("l.weight", w, quantized=True))
    assert all(torch.equal(back[n], t[n]) for n in t) and len(back) == 4


@pytest.mark.parametrize("extra,says", [
    ({"l.weight_zero_point": torch.zeros(2, 2, dtype=torch.int32)}, r"l.weight_packed: zero point torch.int32 \(2, 2\) is not int32 \[1, groups\]"),
    ({"l.weight_g_idx": torch.zeros(60, dtype=torch.int32)}, r"l.weight_packed: g_idx \(60,\) does not give each of 64 columns"),
    ({"l.weight_scale": torch.rand(4, 3)}, r"l.weight_packed: scale \(4, 3\) is not \[4, groups\]"),
    ({"l.weight_shape": torch.tensor([4, 40])}, r"l.weight_packed: 8 int32 words a row hold neither"),
    ({"l.weight_shape": None}, r"l.weight_packed has no l.weight_shape"),
])
def test_broken_packed_int_is_named(tmp_path, extra, says):
    from bridges.core.hf_io import CheckpointError

    view, _ = _packed_ckpt(tmp_path, **extra)
    with pytest.raises(CheckpointError, match=says):
        view.read("l.weight")


@pytest.mark.parametrize("model,layouts,kind", [("Qwen/Qwen3-8B", ("tp1pp1", "tp2"), "w4a16"),
                                                ("deepseek-ai/DeepSeek-V3", ("tp1pp1", "tp2ep2"), "w4a16"),
                                                ("meta-llama/Llama-3.2-1B", ("tp1pp1", "tp2"), "w4a16-asym"),
                                                ("Qwen/Qwen3-8B", ("tp1pp1", "tp2"), "w4a16-actorder")])
def test_w4a16_through_the_suite(conformance, spec, model, layouts, kind):
    """Qwen3: every linear weight packed; DeepSeek-V3 (Kimi-K2-Thinking's layout): the routed
    experts alone, MTP layer included; Llama with zero points (AWQ-style)."""
    q = HFCheckpoint(conformance.quantized_checkpoint(spec(model), kind)[0])
    assert (kind != "w4a16") == any(n.endswith("_zero_point") for n in q.names())
    assert kind.endswith("actorder") == any(n.endswith("_g_idx") for n in q.names())
    packed = [n for n in q.names() if n.endswith("_packed")]
    assert packed and all((".experts." in n) == ("DeepSeek" in model) or "DeepSeek" not in model for n in packed)
    for layout in layouts:
        res = conformance.quant_case(spec(model), kind, layout=layout)
        assert res["quant"].passed and res["logits"].passed, (layout, res["quant"].details, str(res["logits"]))


@pytest.mark.parametrize("mutant", ["Int4TwosComplement", "Int4GroupScalesTiled"])
def test_int4_reading_bugs_are_caught(conformance, spec, mutant):
    res = conformance.quant_case(spec("Qwen/Qwen3-8B"), "w4a16", bridge_ref=f"tests.mutants:{mutant}")
    assert not res["quant"].passed and "imported values differ" in res["quant"].details, res["quant"].details
    assert not res["logits"].passed


def test_kimi_k2_thinking_layout_through_the_cli(conformance, spec, tmp_path):
    """A Kimi K2 toy with int4 routed experts -> Megatron EP2 x TP2 -> HF at PP2 with
    --keep-quantization (``--fp8``'s other name: the source's format, whatever it is): every tensor bit-exact and the quantization_config as it was;
    without it, the experts as bf16 values."""
    from conformance.toy import make_w4a16_checkpoint
    from tests.convert_tasks import quantized_roundtrip

    src, _ = make_w4a16_checkpoint(conformance.checkpoint(spec(KIMI)), tmp_path / "toys")
    values = quantized_roundtrip(conformance.pool, src, tmp_path, ["--tp", "2", "--ep", "2"])
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    assert not [n for n in values.names() if n.endswith(("_packed", "_shape"))]
    assert values.dtype("model.layers.1.mlp.experts.0.up_proj.weight") == torch.bfloat16


# -- compressed-tensors NVFP4 (nvfp4-pack-quantized): RedHat's NVFP4 releases -------------------
def test_ct_nvfp4_global_scale_divides():
    """compressed-tensors stores NVFP4's per-tensor scale as a divisor (ModelOpt's weight_scale_2
    is its reciprocal): value = FP4 code x block scale / global scale."""
    codes = torch.tensor([[0x21, 0x7F] * 8], dtype=torch.uint8)  # codes 1, 2 / 15, 7 (FP4 0.5, 1 / -6, 6)
    scale = torch.full((1, 2), 2.0).to(torch.float8_e4m3fn)
    v = quant.nvfp4_dequantize(codes, scale, torch.tensor([4.0]), torch.float32, divisor=True)
    assert v[0, :4].tolist() == [0.25, 0.5, -3.0, 3.0]
    assert torch.equal(quant.nvfp4_quantize(v, scale, torch.tensor([4.0]), divisor=True), codes)


@pytest.mark.parametrize("model,layouts", [("meta-llama/Llama-3.2-1B", ("tp1pp1", "tp2")),
                                           ("Qwen/Qwen3-8B", ("tp1pp1", "pp2"))])
def test_ct_nvfp4_through_the_suite(conformance, spec, model, layouts):
    q = HFCheckpoint(conformance.quantized_checkpoint(spec(model), "ct-nvfp4")[0])
    w = "model.layers.0.mlp.down_proj.weight"
    assert q.dtype(w + "_packed") == torch.uint8 and q.dtype(w + "_scale") == torch.float8_e4m3fn
    assert q.shape(w + "_global_scale") == (1,) and w not in q
    for layout in layouts:
        res = conformance.quant_case(spec(model), "ct-nvfp4", layout=layout)
        assert res["quant"].passed and res["logits"].passed, (layout, res["quant"].details, str(res["logits"]))


def test_ct_nvfp4_global_scale_convention_bug_is_caught(conformance, spec):
    res = conformance.quant_case(spec("meta-llama/Llama-3.2-1B"), "ct-nvfp4",
                                 bridge_ref="tests.mutants:CTNVFP4GlobalScaleMultiplied")
    # values 1/global_scale**2 off: the quantized re-export finds no FP4 code for them and says so
    assert not res["quant"].passed and ("imported values differ" in res["quant"].details
                                        or "not representable in NVFP4" in res["quant"].details), res["quant"].details
    assert not res["logits"].passed


def test_zero_points_are_packed_down_the_rows(tmp_path):
    """Asymmetric codes: value = (code - zero point) x scale, the zero points [rows, groups]
    packed eight to a word down the rows, each plus 8, as compressed-tensors packs them."""
    codes = torch.randint(-8, 8, (8, 16), dtype=torch.int32)
    zp = torch.arange(-4, 4, dtype=torch.int32)[:, None]  # one group a row
    word = sum((int(z) + 8) << (4 * i) for i, z in enumerate(zp[:, 0]))
    zero = torch.tensor([[word - 2**32 if word >= 2**31 else word]], dtype=torch.int32)
    scale = torch.full((8, 1), 0.5, dtype=torch.bfloat16)
    v = quant.int_dequantize(quant.int_pack(codes, 4), scale, torch.tensor([8, 16]), "w", torch.float32, zero)
    assert torch.equal(v, (codes - zp).float() * 0.5)
    assert torch.equal(quant.int_quantize(v, scale, 2, "w", zero), quant.int_pack(codes, 4))
