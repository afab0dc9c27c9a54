"""Qwen3-Next: the published config as a HybridModel pattern, parameters against transformers'
model, and the suite catching each bug of the family."""
import pytest
import torch

from bridges.core.auto import AutoBridge
from conformance.models import resolve
from tests.mutant_case import assert_caught

MODEL = "Qwen/Qwen3-Next-80B-A3B-Instruct"
PUBLISHED = resolve(MODEL).config


def test_published_config():
    b = AutoBridge.from_hf_config(PUBLISHED)
    a = b.megatron_attrs()
    assert a["num_layers"] == 96 and a["hybrid_layer_pattern"] == "".join(
        ("*" if (i + 1) % 4 == 0 else "G") + "E" for i in range(48))
    assert (a["attention_output_gate"], a["qk_layernorm"], a["layernorm_zero_centered_gamma"]) == (True, True, True)
    assert (a["rotary_percent"], a["kv_channels"], a["num_query_groups"]) == (0.25, 256, 2)
    assert (a["linear_num_key_heads"], a["linear_num_value_heads"], a["linear_key_head_dim"]) == (16, 32, 128)
    assert (a["num_moe_experts"], a["moe_router_topk"], a["moe_shared_expert_gate"], a["moe_router_pre_softmax"]) == \
        (512, 10, True, False)
    assert b.megatron_lm and "pretrain_hybrid.py" in b.megatron_lm


def test_parameters_match_transformers():
    from transformers import AutoConfig, AutoModelForCausalLM

    from bridges.flops import training_flops

    cfg = dict(PUBLISHED)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    params = training_flops(AutoBridge.from_hf_config(PUBLISHED), seq_len=1).params
    assert params.total == sum(p.numel() for p in model.parameters()) == 79_674_391_296


def test_gdn_in_proj_regrouping_round_trips_at_tp2():
    """HF's per-key-head grouping to Megatron's per-section TP shards and back, exactly."""
    from bridges.core.mappings import Shapes
    from bridges.models.qwen3_next.modeling_qwen3_next import GDNInProj

    m = GDNInProj("x", {"qkvz": "a", "ba": "b"}, dims=(4, 8, 3, 2))
    hf = {"qkvz": torch.randn(4 * (6 + 8), 5), "ba": torch.randn(16, 5)}
    sh = Shapes(1, 1, 1)
    shards = [m.to_megatron(hf, r, 2, sh) for r in range(2)]
    assert shards[0].shape[0] == 6 + 6 + 8 + 8 + 4 + 4
    back = m.to_hf(shards, sh)
    assert torch.equal(back["qkvz"], hf["qkvz"]) and torch.equal(back["ba"], hf["ba"])


MUTANTS = [
    ("GDNQKSwapped", {"logits", "generation"}),
    ("OutputGateHalvesSwapped", {"logits"}),  # one attention layer of four: greedy tokens hold
    ("AttentionIntervalOffByOne", {"coverage"}),
]


@pytest.mark.parametrize("mutant,expect", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(conformance, mutant, expect):
    assert_caught(conformance, MODEL, f"tests.qwen3_next_mutants:{mutant}", expect, None)
