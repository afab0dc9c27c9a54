"""Qwen3.5 (dense and MoE): the fixture configs as a HybridModel pattern with M-RoPE, parameters
against transformers' model, the split GDN projection and the M-RoPE angles against
transformers', the tower's FLOPs, and the suite catching each bug of the family."""
import json
from pathlib import Path

import pytest
import torch

from bridges.core.auto import AutoBridge
from tests.mutant_case import assert_caught

DENSE, MOE = "Qwen/Qwen3.5-9B-transformers-defaults", "Qwen/Qwen3.5-35B-A3B-transformers-defaults"


def _config(name):
    return json.loads((Path(__file__).resolve().parents[1] / f"fixtures/configs/{name}/config.json").read_text())


def test_dense_config():
    b = AutoBridge.from_hf_config(_config(DENSE))
    a = b.megatron_attrs()
    assert a["num_layers"] == 64 and a["hybrid_layer_pattern"] == "G-G-G-*-" * 8 + "/*-"  # the MTP depth
    assert (a["attention_output_gate"], a["qk_layernorm"], a["layernorm_zero_centered_gamma"]) == (True, True, True)
    assert (a["rotary_percent"], a["kv_channels"], a["mrope_section"]) == (0.25, 256, [11, 11, 10])
    assert (a["linear_num_key_heads"], a["linear_num_value_heads"], a["ffn_hidden_size"]) == (16, 32, 12288)
    assert not any(k.startswith("moe_") for k in a) and not type(b.language).mixture_of_experts
    assert "pretrain_gpt.py" in b.megatron_lm


def test_moe_config():
    a = AutoBridge.from_hf_config(_config(MOE)).megatron_attrs()
    assert a["num_layers"] == 80 and a["hybrid_layer_pattern"] == "GEGEGE*E" * 10 + "/*E"
    assert (a["num_moe_experts"], a["moe_router_topk"], a["moe_ffn_hidden_size"]) == (256, 8, 512)
    assert (a["moe_shared_expert_intermediate_size"], a["moe_shared_expert_gate"]) == (512, True)
    assert a["moe_router_pre_softmax"] is False  # HF renormalises the top-k always


@pytest.mark.parametrize("name,total", [(DENSE, 9_409_813_744), (MOE, 35_107_181_936)])
def test_parameters_match_transformers(name, total):
    from bridges.core.vlm import meta_model
    from bridges.flops import parameter_counts

    cfg = _config(name)
    hf = meta_model(cfg)
    b = AutoBridge.from_hf_config(cfg)
    counts = parameter_counts(b)
    assert counts.main == sum(p.numel() for p in hf.parameters()) == total  # transformers builds no MTP
    assert counts.total > counts.main
    if name == DENSE:  # the MoE table names experts per expert (as saved), transformers stacks them
        names = set(b.expected_hf_names())
        assert {n for n in names if not n.startswith("mtp.")} == {n for n, _ in hf.named_parameters()}
        assert {"mtp.fc.weight", "mtp.layers.0.mlp.down_proj.weight", "mtp.layers.0.self_attn.q_proj.weight"} <= names


def test_split_in_proj_round_trips_at_tp2():
    from bridges.core.mappings import Shapes
    from bridges.models.qwen3_5.modeling_qwen3_5 import SplitGDNInProj

    m = SplitGDNInProj("x", {k: k for k in ("qkv", "z", "b", "a")}, dims=(4, 8, 3, 2))
    hf = {"qkv": torch.randn(2 * 12 + 16, 5), "z": torch.randn(16, 5), "b": torch.randn(8, 5), "a": torch.randn(8, 5)}
    shards = [m.to_megatron(hf, r, 2, Shapes(1, 1, 1)) for r in range(2)]
    assert torch.equal(shards[0][:6], hf["qkv"][:6]) and torch.equal(shards[1][6:12], hf["qkv"][18:24])
    back = m.to_hf(shards, Shapes(1, 1, 1))
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_mrope_matches_transformers_at_the_published_width():
    """head_dim 256, partial rotary 0.25, default sections [11, 11, 10] (h and w's last pair cut off)."""
    from transformers import Qwen3_5Config
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    from bridges.models.qwen3_5.modeling_qwen3_5 import PositionedMRoPE

    cfg = Qwen3_5Config().text_config
    pos = torch.randint(0, 500, (3, 2, 9))
    cos, _ = Qwen3_5TextRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), pos)
    rotary = PositionedMRoPE(64, cfg.rope_parameters["rope_theta"], [11, 11, 10])
    rotary.positions = pos
    torch.testing.assert_close(rotary(9)[:, :, 0].transpose(0, 1).cos(), cos)


@pytest.mark.parametrize("section", [[12, 12, 12], [4, 14, 14]], ids=["sum", "interleave"])
def test_sections_that_do_not_fit_are_refused(section):
    """32 rotary pairs: the sections must add up to them, h and w each on every third pair."""
    from bridges.core.config import ConfigError

    cfg = _config(DENSE)
    cfg["text_config"]["rope_parameters"] = {**cfg["text_config"]["rope_parameters"], "mrope_section": section}
    with pytest.raises(ConfigError, match="mrope_section"):
        AutoBridge.from_hf_config(cfg).megatron_attrs()


def test_vision_flops_equal_torch_flop_counter_on_the_hf_tower():
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    from tests.test_qwen3_vl import assert_tower_flops

    assert_tower_flops("qwen3_5", Qwen3_5VisionModel, depth=2)


# -- the suite catches each bug ------------------------------------------------------------------
# where: the logits check's first divergence (HF layer i pairs with Megatron's mixer 2i and MLP 2i + 1)
MUTANTS = [
    ("GDNQKSwapped", {"logits", "generation"}, "layer 0 attention"),
    ("GDNValueGateSwapped", {"logits", "generation"}, None),
    ("AttentionIntervalOffByOne", {"coverage"}, None),
    ("MRopeNotInterleaved", {"logits"}, "layer 3 attention"),  # the first full-attention layer  # two attention layers in eight: greedy tokens hold
    ("PositionGridTransposed", {"logits", "generation"}, "vision block 0"),
    ("MTPReadsLastLayer", {"logits", "generation", "mtp"}, None),
]


@pytest.mark.parametrize("mutant,expect,where", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(conformance, mutant, expect, where):
    assert_caught(conformance, DENSE, f"tests.qwen3_5_mutants:{mutant}", expect, where, mtp=mutant.startswith("MTP"))


def test_moe_mutant_is_caught(conformance):
    assert_caught(conformance, MOE, "tests.qwen3_5_mutants:TopKNotRenormalised", {"logits", "generation"}, None)


# -- text-only checkpoints (Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM) -------------------------
@pytest.mark.parametrize("name,model_type,arch,mtp", [
    (DENSE, "qwen3_5_text", "Qwen3_5ForCausalLM", "/*-"),
    (MOE, "qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", "/*E")])
def test_text_only_checkpoint_converts(conformance, tmp_path, name, model_type, arch, mtp):
    """The VLM's language model alone: its own bridge, every check and the MTP item at TP2."""
    from conformance.models import resolve

    cfg = _config(name)
    text = {**cfg["text_config"], "model_type": model_type, "architectures": [arch],
            "tie_word_embeddings": cfg.get("tie_word_embeddings", False), "dtype": "bfloat16"}
    bridge = AutoBridge.from_hf_config(text)
    assert type(bridge).__name__.endswith("ForCausalLMBridge")
    assert bridge.megatron_attrs()["hybrid_layer_pattern"].endswith(mtp)
    d = tmp_path / model_type
    d.mkdir()
    (d / "config.json").write_text(json.dumps(text))
    spec = resolve(str(d))
    results = {**conformance.case(spec, "tp2"), "mtp": conformance.mtp_case(spec, "tp2")}
    assert all(r.passed for r in results.values()), "\n".join(str(r) for r in results.values() if not r.passed)


def _published_moe_text(**change):
    """The MoE fixture with the text values Qwen/Qwen3.5-35B-A3B publishes where transformers'
    defaults differ (field by field from an inventory of the published snapshot ec2d4ece: rope
    theta 1e7, interleaved M-RoPE [11, 11, 10], one MTP depth, and two switches transformers does
    not read)."""
    cfg = _config(MOE)
    t = cfg["text_config"]
    t["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                            "mrope_interleaved": True, "mrope_section": [11, 11, 10]}
    t.update({"mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "attn_output_gate": True,
              "eos_token_id": 248044, **change})
    return cfg


def test_published_text_values():
    from bridges.commands.inspect import inspect_config

    cfg = _published_moe_text()
    b = AutoBridge.from_hf_config(cfg)
    a = b.megatron_attrs()
    assert (a["rotary_base"], a["mrope_section"], a["mtp_num_layers"]) == (1e7, [11, 11, 10], 1)
    assert a["hybrid_layer_pattern"] == "GEGEGE*E" * 10 + "/*E" and a["attention_output_gate"]
    back = b.hf_config_dict()["text_config"]
    assert (back["attn_output_gate"], back["mtp_use_dedicated_embeddings"]) == (True, False)
    assert back["rope_parameters"]["mrope_section"] == [11, 11, 10] and back["rope_parameters"]["mrope_interleaved"]
    assert inspect_config(cfg, None)["unknown_fields"] == []  # every published field is read


@pytest.mark.parametrize("change", [dict(attn_output_gate=False), dict(mtp_use_dedicated_embeddings=True)],
                         ids=["no-output-gate", "dedicated-mtp-embeddings"])
def test_published_switches_other_than_published_are_refused(change):
    from bridges.core.config import ConfigError

    (field, value), = change.items()
    with pytest.raises(ConfigError, match=f"{field}={value!r}: the qwen3_5 bridge maps Qwen3.5 as published"):
        AutoBridge.from_hf_config(_published_moe_text(**change)).megatron_attrs()
