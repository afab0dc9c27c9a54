"""Phi-3: the shared fused mappings (FusedQKV: [q; k; v] rows; FusedGatedMLP: [gate; up] rows)
against the unfused ones and transformers' own split, and the suite catching each bug in them."""
import pytest
import torch

from bridges.core.mappings import QKV, FusedGatedMLP, FusedQKV, GatedMLP, MappingError, Shapes

# GQA: 6 query heads in 2 KV groups (Phi-3-medium has 40 in 10), head_dim 4, hidden 8
SHAPES = Shapes(num_attention_heads=6, num_query_groups=2, kv_channels=4)
FUSED = FusedQKV("decoder.layers.*.self_attention.linear_qkv.weight", {"qkv": "model.layers.*.self_attn.qkv_proj.weight"})
PLAIN = QKV("decoder.layers.*.self_attention.linear_qkv.weight", {"q": "q", "k": "k", "v": "v"})
FC1 = FusedGatedMLP("decoder.layers.*.mlp.linear_fc1.weight", {"gate_up": "model.layers.*.mlp.gate_up_proj.weight"})
FC1_PLAIN = GatedMLP("decoder.layers.*.mlp.linear_fc1.weight", {"gate": "g", "up": "u"})


def _qkv(bias: bool = False):
    g = torch.Generator().manual_seed(0)
    rows = (6 + 2 * 2) * 4
    return torch.randn((rows,) if bias else (rows, 8), generator=g)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_fused_qkv_is_qkv_of_transformers_split(tp, bias):
    """transformers' Phi3Attention: queries are the first heads x head_dim rows, then keys, then
    values (query_pos = num_attention_heads * head_dim)."""
    w = _qkv(bias)
    q, k, v = w[:24], w[24:32], w[32:]
    for r in range(tp):
        shard = FUSED.to_megatron({"qkv": w}, r, tp, SHAPES)
        assert torch.equal(shard, PLAIN.to_megatron({"q": q, "k": k, "v": v}, r, tp, SHAPES))
        param = torch.empty_like(shard)
        FUSED.copy_into(param, {"qkv": w}, r, tp, SHAPES)  # the no-copy import path
        assert torch.equal(param, shard)
    shards = [FUSED.to_megatron({"qkv": w}, r, tp, SHAPES) for r in range(tp)]
    back = FUSED.to_hf(shards, SHAPES)
    assert set(back) == {"qkv"} and torch.equal(back["qkv"], w)


def test_fused_qkv_wrong_rows_names_the_tensor():
    with pytest.raises(MappingError, match=r"model\.layers\.\*\.self_attn\.qkv_proj\.weight: dim 0 is 36, expected 40"):
        FUSED.to_megatron({"qkv": torch.zeros(36, 8)}, 0, 1, SHAPES)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_gate_up_is_gated_mlp_of_the_halves(tp):
    w = torch.randn(2 * 12, 8, generator=torch.Generator().manual_seed(1))
    gate, up = w[:12], w[12:]  # transformers' Phi3MLP: gate, up = gate_up_proj(x).chunk(2)
    shards = []
    for r in range(tp):
        shard = FC1.to_megatron({"gate_up": w}, r, tp, SHAPES)
        assert torch.equal(shard, FC1_PLAIN.to_megatron({"gate": gate, "up": up}, r, tp, SHAPES))
        param = torch.empty_like(shard)
        FC1.copy_into(param, {"gate_up": w}, r, tp, SHAPES)
        assert torch.equal(param, shard)
        shards.append(shard)
    assert torch.equal(FC1.to_hf(shards, SHAPES)["gate_up"], w)


def test_fused_gate_up_odd_rows_names_the_tensor():
    with pytest.raises(MappingError, match=r"gate_up_proj\.weight: 23 rows"):
        FC1.to_megatron({"gate_up": torch.zeros(23, 8)}, 0, 1, SHAPES)


# Each bug in the fused mappings is caught by the suite, and by the check expected.
MUTANTS = [
    ("Phi3QKSwapped", {"tp1pp1": {"logits", "generation"}}),
    ("Phi3QKVNotRegrouped", {"tp1pp1": {"logits", "generation"}}),
    ("Phi3GateUpSwapped", {"tp1pp1": {"logits", "generation"}}),
    ("Phi3GateUpNaiveTP", {"tp1pp1": set(), "tp2": {"logits", "generation"}}),
]


@pytest.mark.parametrize("mutant,expect", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_phi3_mutant_is_caught(conformance, spec, mutant, expect):
    for layout, checks in expect.items():
        results = conformance.case(spec("microsoft/Phi-3-mini-4k-instruct"), layout,
                                   bridge_ref=f"tests.phi3_mutants:{mutant}")
        got = {n for n, r in results.items() if not r.passed and not r.data.get("blocked")}
        assert got == checks, f"{mutant} at {layout}: caught by {sorted(got)}, expected {sorted(checks)}\n" + \
            "\n".join(str(r) for r in results.values() if not r.passed)
