"""FLOPs and parameters of hybrid stacks (Megatron-Core's HybridModel: Mamba-2, gated delta net,
attention, MLP and MoE layers from ``hybrid_layer_pattern``), counted from Megatron attributes:
the parameters equal transformers' models for the published Nemotron-H-56B and Qwen3-Next-80B
configs, the terms equal a hand count on a small pattern, and the figures in docs/flops.md are
the calculator's."""
import json
import re
from pathlib import Path

import pytest
import torch

from bridges.flops import FlopsError, attention_pairs, training_flops

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"  # published config.json files without a bridge yet (provenance: fixtures/README.md)
PUBLISHED = {"Nemotron-H-56B-Base-8K": ROOT / "fixtures/configs/nvidia/Nemotron-H-56B-Base-8K/config.json",
             "Qwen3-Next-80B-A3B-Instruct": ROOT / "fixtures/configs/Qwen/Qwen3-Next-80B-A3B-Instruct/config.json"}
NEMOTRON_PATTERN = ("M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-"
                    "M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-")

# nvidia/Nemotron-H-56B-Base-8K as Megatron attributes (each pattern symbol one layer: Mamba-2
# mixer, attention or squared-ReLU MLP, each behind its own RMSNorm; no position embedding)
NEMOTRON_H_56B = dict(
    num_layers=118, hidden_size=8192, num_attention_heads=64, num_query_groups=8, kv_channels=128,
    ffn_hidden_size=32768, gated_linear_unit=False, add_bias_linear=False, normalization="RMSNorm",
    vocab_size=131072, position_embedding_type="none", share_embeddings_and_output_weights=False,
    hybrid_layer_pattern=NEMOTRON_PATTERN, mamba_num_heads=256, mamba_head_dim=64, mamba_num_groups=8,
    mamba_state_dim=256, mamba_conv_kernel=4, mamba_chunk_size=128)

# Qwen/Qwen3-Next-80B-A3B-Instruct: 48 decoder layers, each a mixer (gated delta net, or gated
# attention every 4th) and an MoE layer with a gated shared expert: 96 pattern symbols
QWEN3_NEXT_80B = dict(
    num_layers=96, hidden_size=2048, num_attention_heads=16, num_query_groups=2, kv_channels=256,
    qk_layernorm=True, attention_output_gate=True, gated_linear_unit=True, add_bias_linear=False,
    normalization="RMSNorm", vocab_size=151936, position_embedding_type="rope",
    share_embeddings_and_output_weights=False, ffn_hidden_size=5120,
    num_moe_experts=512, moe_router_topk=10, moe_ffn_hidden_size=512,
    moe_shared_expert_intermediate_size=512, moe_shared_expert_gate=True,
    hybrid_layer_pattern="".join(("*" if (i + 1) % 4 == 0 else "G") + "E" for i in range(48)),
    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4)


def _meta_params(path: Path) -> tuple[int, dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads(path.read_text())
    cfg.pop("auto_map", None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return sum(p.numel() for p in model.parameters()), dict(model.named_parameters())


@pytest.mark.parametrize("attrs,config", [
    (NEMOTRON_H_56B, "Nemotron-H-56B-Base-8K"), (QWEN3_NEXT_80B, "Qwen3-Next-80B-A3B-Instruct")])
def test_parameters_equal_transformers_for_the_published_configs(attrs, config):
    published = json.loads(PUBLISHED[config].read_text())
    if "hybrid_override_pattern" in published:  # the translation by hand, checked field by field
        assert attrs["hybrid_layer_pattern"] == published["hybrid_override_pattern"]
        assert (attrs["mamba_num_heads"], attrs["mamba_head_dim"], attrs["mamba_num_groups"], attrs["mamba_state_dim"],
                attrs["mamba_conv_kernel"], attrs["mamba_chunk_size"]) == (
            published["mamba_num_heads"], published["mamba_head_dim"], published["n_groups"],
            published["ssm_state_size"], published["conv_kernel"], published["chunk_size"])
    else:
        every = published["full_attention_interval"]
        mixers = attrs["hybrid_layer_pattern"][::2]
        assert [m == "*" for m in mixers] == [(i + 1) % every == 0 for i in range(published["num_hidden_layers"])]
        assert (attrs["num_moe_experts"], attrs["moe_router_topk"], attrs["linear_num_value_heads"]) == (
            published["num_experts"], published["num_experts_per_tok"], published["linear_num_value_heads"])
    total, _ = _meta_params(PUBLISHED[config])
    assert training_flops(attrs, seq_len=1).params.total == total


# a small hybrid with every kind: Mamba, attention, dense MLP, GDN, MoE, and one MTP depth
SMALL = dict(num_layers=5, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
             ffn_hidden_size=96, gated_linear_unit=True, add_bias_linear=False, normalization="RMSNorm",
             vocab_size=100, position_embedding_type="rope", attention_output_gate=True,
             num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
             hybrid_layer_pattern="M*-|GE/*E", mamba_num_heads=8, mamba_head_dim=16, mamba_num_groups=2,
             mamba_state_dim=8, mamba_conv_kernel=4, mamba_chunk_size=16,
             linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=16,
             linear_conv_kernel_dim=4)


def test_small_hybrid_equals_a_hand_count():
    s, h = 40, 64
    r = training_flops(SMALL, seq_len=s)
    f = r.as_dict()["forward"]
    # Mamba: 8 heads x 16 = 128 inner, 2 groups x 8 state; chunks of 16: 16, 16, 8 tokens
    inner, gn, nh = 128, 16, 8
    assert f["mamba_in_projection"] == 2 * s * h * (2 * inner + 2 * gn + nh)
    assert f["mamba_conv"] == 2 * s * (inner + 2 * gn) * 4
    pairs = 2 * (16 * 17 // 2) + 8 * 9 // 2
    assert f["mamba_scan"] == 2 * pairs * (2 * 8 + 8 * 16) + 4 * s * 8 * 8 * 16
    assert f["mamba_out_projection"] == 2 * s * inner * h
    # GDN: keys 2 x 8, values 4 x 16
    assert f["gdn_in_projection"] == 2 * s * h * (2 * 16 + 2 * 64 + 2 * 4)
    assert f["gdn_conv"] == 2 * s * (2 * 16 + 64) * 4
    assert f["gdn_recurrence"] == 6 * s * 4 * 8 * 16
    assert f["gdn_out_projection"] == 2 * s * 64 * h
    # the one attention layer of the main stack, with its output gate
    assert f["qkv_projection"] == 2 * s * h * (4 * 16 + 2 * 2 * 16)
    assert f["attention_output_gate"] == 2 * s * h * 4 * 16
    assert f["core_attention"] == 2 * attention_pairs(s) * 4 * 32
    assert f["mlp"] == 2 * s * (h * 96 * 2 + 96 * h)
    assert f["routed_experts"] == 2 * s * 2 * (h * 32 * 2 + 32 * h) and f["router"] == 2 * s * h * 4
    # MTP depth "*E": eh_proj, an attention layer with its gate, an MoE layer, the logits
    attn = 2 * s * h * (4 * 16 + 2 * 2 * 16) + 2 * s * h * 64 + 2 * attention_pairs(s) * 4 * 32 + 2 * s * 64 * h
    moe = 2 * s * h * 4 + 2 * s * 2 * (h * 32 * 2 + 32 * h)
    assert f["mtp"] == 2 * s * 2 * h * h + attn + moe + 2 * s * h * 100
    assert r.total == 3 * r.forward
    # parameters: per layer its norm; Mamba's conv has a bias, A_log, D, dt_bias per head
    p = r.params.by_component
    assert p["mamba"] == h * (2 * inner + 2 * gn + nh) + (inner + 2 * gn) * 5 + 3 * nh + inner + inner * h
    assert p["gdn"] == h * (2 * 16 + 2 * 64 + 8) + (2 * 16 + 64) * 4 + 2 * 4 + 16 + 64 * h


def test_linear_blocks_differ_from_attention_and_their_ratio_counts():
    base = training_flops({**SMALL, "hybrid_layer_pattern": "**-*E"}, seq_len=4096)
    hybrid = training_flops({**SMALL, "hybrid_layer_pattern": "M*-GE"}, seq_len=4096)
    assert hybrid.total != base.total and hybrid.step("core_attention") == base.step("core_attention") // 3
    # Qwen3-Next with full attention every 2nd layer instead of every 4th: more attention FLOPs
    every2 = {**QWEN3_NEXT_80B, "hybrid_layer_pattern": "".join(("*" if i % 2 else "G") + "E" for i in range(48))}
    a, b = training_flops(QWEN3_NEXT_80B, seq_len=4096), training_flops(every2, seq_len=4096)
    assert b.step("core_attention") == 2 * a.step("core_attention")
    assert b.step("gdn_recurrence") * 3 == a.step("gdn_recurrence") * 2 and a.total != b.total
    # the SSD scan's quadratic part grows with the chunk length
    assert training_flops({**NEMOTRON_H_56B, "mamba_chunk_size": 256}, seq_len=4096).step("mamba_scan") > \
        training_flops(NEMOTRON_H_56B, seq_len=4096).step("mamba_scan")


@pytest.mark.parametrize("change,says", [
    (dict(hybrid_layer_pattern="M*D-E"), "symbol 'D' has no FLOPs term"),
    (dict(hybrid_layer_pattern="M*-E"), "hybrid_layer_pattern has 4 layers, num_layers is 5"),
    (dict(hybrid_layer_pattern="M*-GE/*E/E*"), "MTP depths differ"),
    (dict(hybrid_layer_pattern=None, mamba_num_heads=8), "mamba_num_heads=8 is set but hybrid_layer_pattern is not"),
    (dict(linear_num_value_heads=3), "linear_num_value_heads=3 does not divide by linear_num_key_heads=2"),
])
def test_bad_hybrid_configs_are_named(change, says):
    with pytest.raises(FlopsError, match=re.escape(says)):
        training_flops({**SMALL, **change}, seq_len=8)


def test_docs_record_the_hybrid_figures():
    """docs/flops.md's per-component table for the two published hybrids at seq 4096 is the
    calculator's (TFLOPs of one training step, batch 1)."""
    doc = (ROOT / "docs" / "flops.md").read_text()
    for name, attrs in (("Nemotron-H-56B", NEMOTRON_H_56B), ("Qwen3-Next-80B-A3B", QWEN3_NEXT_80B)):
        r = training_flops(attrs, seq_len=4096)
        row = next(x for x in doc.splitlines() if x.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.split("|")[2:-1]]
        assert cells[0] == f"{r.params.total / 1e9:.2f} B" and cells[1] == f"{r.total / 1e12:,.1f}", (row, r.total)
