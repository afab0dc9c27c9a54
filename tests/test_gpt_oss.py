"""GPT-OSS: the published config (sinks, alternating windows, YaRN without truncation, the
clamped gated experts, MXFP4), its pieces against transformers' own (the interleaved gate/up,
the activation, the MXFP4 layout), whole experts under TP, FLOPs and parameters, and the suite
catching each bug of the family."""
import json
from pathlib import Path

import pytest
import torch

from bridges.core.auto import AutoBridge
from conformance.models import resolve
from tests.mutant_case import assert_caught

MODEL = "openai/gpt-oss-20b"
PUBLISHED = resolve(MODEL).config


def test_published_config_and_transformers_reads_it_back():
    from transformers import GptOssConfig

    b = AutoBridge.from_hf_config(PUBLISHED)
    a = b.megatron_attrs()
    assert (a["num_layers"], a["hidden_size"], a["num_attention_heads"], a["num_query_groups"], a["kv_channels"]) == \
        (24, 2880, 64, 8, 64)
    assert (a["num_moe_experts"], a["moe_router_topk"], a["moe_ffn_hidden_size"]) == (32, 4, 2880)
    assert a["softmax_type"] == "learnable" and a["add_bias_linear"] and a["add_qkv_bias"]
    assert (a["activation_func_clamp_value"], a["glu_linear_offset"], a["moe_router_pre_softmax"]) == (7.0, 1.0, False)
    assert a["window_size"] == (127, 0) and a["window_attn_skip_freq"] == [1, 0] * 12
    assert (a["position_embedding_type"], a["yarn_rotary_scaling_factor"], a["yarn_original_max_position_embeddings"],
            a["yarn_correction_range_round_to_int"], a["rotary_base"]) == ("yarn", 32.0, 4096, False, 150000.0)
    back = GptOssConfig(**{k: v for k, v in b.hf_config_dict().items() if k != "model_type"})
    src = GptOssConfig(**{k: v for k, v in PUBLISHED.items() if k not in ("model_type", "quantization_config")})
    for f in ("layer_types", "sliding_window", "swiglu_limit", "num_local_experts", "num_experts_per_tok",
              "attention_bias", "head_dim", "rope_parameters"):
        assert getattr(back, f) == getattr(src, f), f


def test_parameters_match_transformers():
    from transformers import AutoConfig, AutoModelForCausalLM

    from bridges.flops import training_flops

    cfg = {k: v for k, v in PUBLISHED.items() if k != "quantization_config"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    params = training_flops(AutoBridge.from_hf_config(PUBLISHED), seq_len=4096, batch_size=1).as_dict()["params"]
    assert params["total"] == sum(p.numel() for p in model.parameters()) == 20_914_757_184
    per_layer_sinks = 64
    assert params["by_component"]["attention"] == 24 * (2880 * 64 * 64 + 2 * 2880 * 8 * 64 + 64 * 64 + 2 * 8 * 64
                                                        + 64 * 64 * 2880 + 2880 + per_layer_sinks)


def test_interleaved_gate_up_round_trips_under_tp():
    """Megatron's fc1 rows per TP shard are [gate; up] with gate = HF's even columns; back to
    HF's interleaved [H, 2I] bit-exactly (weight and bias)."""
    from bridges.core.mappings import Shapes
    from bridges.models.gpt_oss.gpt_oss_bridge import InterleavedGateUp

    m = InterleavedGateUp("x", {"gate_up": "y[*]"})
    shapes = Shapes(4, 2, 8, 16, 16)
    for hf in (torch.randn(6, 8), torch.randn(8)):  # [H, 2I] and [2I], I = 4
        shards = [m.to_megatron({"gate_up": hf}, r, 2, shapes) for r in range(2)]
        t = hf.transpose(0, 1) if hf.dim() == 2 else hf
        gate, up = t[0::2], t[1::2]
        assert torch.equal(shards[0], torch.cat([gate[:2], up[:2]])) and torch.equal(shards[1], torch.cat([gate[2:], up[2:]]))
        assert torch.equal(m.to_hf(shards, shapes)["gate_up"], hf)


def test_activation_is_transformers():
    """Megatron-Core's clamped GLU with the bridge's settings equals HF's ``_apply_gate``."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from bridges.models.gpt_oss.gpt_oss_bridge import sigmoid_gate

    experts = GptOssExperts(GptOssConfig(num_local_experts=2, hidden_size=8, intermediate_size=8, swiglu_limit=1.5))
    x = torch.randn(32, 16) * 3
    gate, up = x[..., ::2].clamp(max=1.5), x[..., 1::2].clamp(-1.5, 1.5)
    torch.testing.assert_close(sigmoid_gate(gate) * (up + 1.0), experts._apply_gate(x), rtol=0, atol=0)


def test_mxfp4_toy_is_the_published_layout(conformance, spec, tmp_path):
    """The quant item's MXFP4 twin stores what the published files store: ``*_blocks`` uint8
    [E, rows, H/32, 16] and ``*_scales`` [E, rows, H/32] per expert projection (rows: 2I for
    gate_up, H for down), biases and everything else as values; transformers' own unpacking
    gives the values the bridge imports."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from bridges.core import quant
    from bridges.core.hf_io import HFCheckpoint
    from conformance.toy import make_mxfp4_checkpoint

    toy = conformance.checkpoint(spec(MODEL))
    mx, deq = make_mxfp4_checkpoint(toy, tmp_path)
    ck, d = HFCheckpoint(mx), HFCheckpoint(deq)
    cfg = json.loads((Path(mx) / "config.json").read_text())
    h, i, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    name = "model.layers.0.mlp.experts."
    assert ck.shape(name + "gate_up_proj_blocks") == (e, 2 * i, h // 32, 16) and ck.dtype(name + "gate_up_proj_blocks") == torch.uint8
    assert ck.shape(name + "gate_up_proj_scales") == (e, 2 * i, h // 32)
    assert ck.shape(name + "down_proj_blocks") == (e, h, i // 32, 16)
    assert name + "gate_up_proj" not in ck and name + "gate_up_proj_bias" in ck
    for part in ("gate_up_proj", "down_proj"):
        ours = quant.mxfp4_dequantize(ck.get(name + part + "_blocks"), ck.get(name + part + "_scales"), torch.float32)
        theirs = convert_moe_packed_tensors(ck.get(name + part + "_blocks"), ck.get(name + part + "_scales"),
                                            dtype=torch.float32)
        assert torch.equal(ours, theirs) and torch.equal(ours, d.get(name + part).float())


def test_mxfp4_checkpoint_round_trips_through_megatron(conformance, spec, tmp_path):
    """Published layout -> Megatron at TP2 x EP2 (experts whole) -> MXFP4 again at PP2: every
    stored tensor back bit-exactly; a dequantized export writes the expert values."""
    from bridges.core.hf_io import HFCheckpoint
    from conformance.toy import make_mxfp4_checkpoint

    mx, _ = make_mxfp4_checkpoint(conformance.checkpoint(spec(MODEL)), tmp_path / "toys")
    mc = tmp_path / "m"
    run = lambda argv: conformance.pool.run("tests.convert_tasks:cli", argv=argv)  # noqa: E731
    got = conformance.pool.run("tests.convert_tasks:cli_captured", argv=[
        "convert", "import", "--hf", mx, "--out", str(mc), "--tp", "2", "--ep", "2", "--etp", "1", "--dtype", "float32"])
    assert [rc for rc, _ in got] == [0] * 4, got[0][1]
    assert run(["convert", "export", "--megatron", str(mc), "--out", str(tmp_path / "q"), "--pp", "2", "--fp8"]) == [0] * 4
    from tests.convert_tasks import assert_same_checkpoint

    assert_same_checkpoint(HFCheckpoint(mx), HFCheckpoint(tmp_path / "q"))
    assert run(["convert", "export", "--megatron", str(mc), "--out", str(tmp_path / "d")]) == [0] * 4
    deq = HFCheckpoint(tmp_path / "d")
    assert "model.layers.0.mlp.experts.gate_up_proj" in deq and not [n for n in deq.names() if n.endswith("_blocks")]


def test_expert_tp_is_refused_by_name():
    from bridges.core.config import ConfigError
    from bridges.core.parallel import Layout

    b = AutoBridge.from_hf_config(PUBLISHED)
    with pytest.raises(ConfigError, match=r"layout tp2ep2: whole experts .*ETP 1.* does not divide by expert TP=2"):
        b.to_megatron_provider().set_layout(Layout.parse("tp2ep2")).finalize()  # the experts' biases: Megatron-Core asserts ETP 1
    from conformance.session import layouts_for

    assert "tp2ep2etp1" in layouts_for(PUBLISHED) and "tp2ep2" not in layouts_for(PUBLISHED)


def test_swiglu_alpha_other_than_quick_gelu_is_refused():
    from bridges.core.config import ConfigError

    with pytest.raises(ConfigError, match="swiglu_alpha=1.5"):
        AutoBridge.from_hf_config({**PUBLISHED, "swiglu_alpha": 1.5}).megatron_attrs()


MUTANTS = [
    ("SinksDropped", {"coverage", "roundtrip", "logits", "generation"}),
    ("GateUpNotInterleaved", {"logits", "generation"}),
    ("ClampDropped", {"logits", "generation"}),
    ("YarnTruncated", {"logits"}),
    ("WindowsOnTheWrongLayers", {"logits", "generation"}),
]


@pytest.mark.parametrize("mutant,expect", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(conformance, mutant, expect):
    assert_caught(conformance, MODEL, f"tests.gpt_oss_mutants:{mutant}", expect, None)


def test_mxfp4_scale_off_by_one_is_caught(conformance, spec):
    """A codec that decodes and encodes MXFP4 with the same wrong exponent bias re-exports
    bit-exactly (the quant check's re-export cannot see it); the logits on the dequantized
    reference do (the experts' values are doubled)."""
    bad = conformance.quant_case(spec(MODEL), "mxfp4", bridge_ref="tests.gpt_oss_mutants:MXFP4ScaleOffByOne")
    assert bad["quant"].passed and not bad["logits"].passed, bad
    assert bad["logits"].data["rel_err"] > 0.01, bad["logits"].details
