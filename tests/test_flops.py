"""The FLOPs calculator (bridges/flops.py): every term against a closed form computed by hand on a
tiny config, the invariants the conventions imply, an independent count by torch's
FlopCounterMode on an HF model, and agreement with published figures (sources cited per test).

Conventions under test (docs/flops.md): matmul FLOPs only, 2 FLOPs per multiply-add, backward =
2 x forward, embedding 0, causal attention counted as exactly s(s+1)/2 query-key pairs per head.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch

from bridges import AutoBridge, ConfigError
from bridges.flops import (COMPONENTS, FlopsError, attention_pairs, attrs_from_hf_config,
                           parameter_counts, training_flops)

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
HF_DATA = Path(__file__).resolve().parent / "data" / "flops"  # provenance: its README.md
LLAMA31_8B = "meta-llama/Llama-3.1-8B"
MISTRAL_7B = "mistralai/Mistral-7B-v0.1"
LINEAR = ("qkv_projection", "attention_output_projection", "mlp", "logits")


def bridge(model: str):
    return AutoBridge.from_hf_config(CONFIGS / model / "config.json")


# A tiny Llama-like config: GQA (4 heads, 2 groups), head_dim 24 decoupled from 64 / 4, SwiGLU.
TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
            num_query_groups=2, kv_channels=24, vocab_size=101, gated_linear_unit=True,
            add_bias_linear=False, normalization="RMSNorm", position_embedding_type="rope",
            share_embeddings_and_output_weights=False)


# -- each term, by hand ------------------------------------------------------------------------
def test_each_term_matches_its_closed_form_on_a_tiny_config():
    r = training_flops(TINY, seq_len=10, batch_size=3)  # 30 tokens
    fwd = {t.name: t.forward for t in r.terms}
    assert list(fwd) == list(COMPONENTS)
    assert fwd["embedding"] == 0  # a row lookup: no matmul
    # QKV: 2 * tokens * hidden * (heads*d + 2*groups*d) * layers = 2*30*64*(96+96)*2
    assert fwd["qkv_projection"] == 1_474_560
    # core attention: causal pairs 10*11/2 = 55 per sequence, 3 sequences; QK^T and AV each
    # 2 * pairs * d per head: 2 * 165 * 4 heads * (24 + 24) * 2 layers
    assert fwd["core_attention"] == 126_720
    # output projection: 2 * tokens * heads*d * hidden * layers = 2*30*96*64*2
    assert fwd["attention_output_projection"] == 737_280
    # gated MLP, 3 matmuls: gate + up 2*30*64*(2*96), down 2*30*96*64; 2 layers
    assert fwd["mlp"] == 2 * (737_280 + 368_640) == 2_211_840
    # logits: 2 * tokens * hidden * vocab = 2*30*64*101
    assert fwd["logits"] == 387_840
    assert r.forward == 4_938_240 and r.total == 3 * 4_938_240
    assert r.tokens == 30 and r.per_token == r.total / 30


def test_mlp_without_gating_is_two_matmuls():
    r = training_flops({**TINY, "gated_linear_unit": False}, seq_len=10, batch_size=3)
    assert r.term("mlp").forward == 2 * (2 * 30 * 64 * 96 + 2 * 30 * 96 * 64) == 1_474_560


def test_parameter_counts_match_their_closed_form_on_a_tiny_config():
    p = parameter_counts(TINY)
    # per layer: qkv 64*192 + proj 96*64 + fc1 64*192 + fc2 96*64 + 2 RMSNorms of 64
    per_layer = 12_288 + 6_144 + 12_288 + 6_144 + 128
    assert p.total == 2 * per_layer + 101 * 64 * 2 + 64 == 86_976
    assert p.active == p.total and p.embedding == p.output == 6_464
    assert p.non_embedding == 86_976 - 2 * 6_464
    tied = parameter_counts({**TINY, "share_embeddings_and_output_weights": True})
    assert tied.total == p.total - 6_464 and tied.output == 0
    # Megatron-Core defaults: LayerNorm (weight + bias), biases on every linear, learned positions
    biased = parameter_counts({**TINY, "add_bias_linear": True, "normalization": "LayerNorm",
                               "position_embedding_type": "learned_absolute",
                               "max_sequence_length": 32, "qk_layernorm": True})
    extra = 2 * (192 + 64 + 192 + 64) + 2 * (2 * 64 + 2 * 2 * 24) + 64 + 32 * 64
    assert biased.total == p.total + extra


def test_a_training_step_is_three_forwards_and_recompute_adds_one_more():
    r = training_flops(bridge(LLAMA31_8B), seq_len=4096)
    assert all(t.backward == 2 * t.forward and t.step == 3 * t.forward for t in r.terms)
    assert r.total == 3 * r.forward and r.backward == 2 * r.forward
    layers = r.forward - r.term("logits").forward
    assert training_flops(bridge(LLAMA31_8B), 4096, recompute="full").total == r.total + layers
    assert (training_flops(bridge(LLAMA31_8B), 4096, recompute="selective").total
            == r.total + r.term("core_attention").forward)


# -- attention pairs -------------------------------------------------------------------------
def _megatron_mask_pairs(s: int, causal: bool, left: int, right: int) -> int:
    """Unmasked entries of Megatron-Core's sliding-window mask (get_sliding_window_causal_mask,
    sq = skv): it keeps triu(diagonal=-left) & tril(diagonal=right), i.e. entries with
    -left <= j - i <= right; a bound of -1 ("infinite window size" in TransformerConfig's
    window_size doc) leaves that side open. Causal also keeps only j <= i."""
    return sum(1 for i in range(s) for j in range(s)
               if (left < 0 or j - i >= -left) and (right < 0 or j - i <= right)
               and (not causal or j <= i))


def test_attention_pairs_equal_the_unmasked_entries():
    for s in range(1, 11):
        assert attention_pairs(s) == s * (s + 1) // 2  # exact causal half, diagonal included
        assert attention_pairs(s, causal=False) == s * s
        for left in range(-1, s + 2):
            for right in range(-1, s + 2):
                for causal in (True, False):
                    assert attention_pairs(s, causal, (left, right)) == \
                        _megatron_mask_pairs(s, causal, left, right), (s, left, right, causal)
    assert attention_pairs(6, window=(2, 0)) == 1 + 2 + 3 + 3 + 3 + 3


def test_sliding_window_at_least_the_sequence_equals_full_attention():
    mistral = bridge(MISTRAL_7B)
    assert mistral.megatron_attrs()["window_size"] == (4095, 0)  # 4096 positions, self included
    full = {**mistral.to_megatron_provider().as_dict(), "window_size": None}
    for s in (1, 4095, 4096):
        assert training_flops(mistral, s).as_dict() == training_flops(full, s).as_dict()
    # past the window, the attended pairs are exactly counted: 4096*4097/2 + (s-4096)*4096
    s = 8192
    pairs = 4096 * 4097 // 2 + (s - 4096) * 4096
    assert training_flops(mistral, s).term("core_attention").forward == 32 * 2 * pairs * 32 * 256
    assert training_flops(full, s).term("core_attention").forward == 32 * 2 * (s * (s + 1) // 2) * 32 * 256


def test_window_attn_skip_freq_makes_every_nth_layer_full():
    base = {**TINY, "num_layers": 4, "window_size": (2, 0)}
    windowed = training_flops(base, 10).term("core_attention").forward
    full = training_flops({**base, "window_size": None}, 10).term("core_attention").forward
    for skip in (2, [1, 0, 1, 0]):  # Megatron-Core: layers 2 and 4 full attention
        mixed = training_flops({**base, "window_attn_skip_freq": skip}, 10)
        assert mixed.term("core_attention").forward == (windowed + full) // 2
    with pytest.raises(FlopsError, match="window_attn_skip_freq"):
        training_flops({**base, "window_attn_skip_freq": [1, 0]}, 10)
    with pytest.raises(FlopsError, match="window_attn_skip_freq"):
        training_flops({**base, "window_attn_skip_freq": 0}, 10)


def test_doubling_the_sequence_doubles_linear_terms_and_adds_s_squared_pairs():
    b = bridge(LLAMA31_8B)
    s = 4096
    one, two = training_flops(b, s), training_flops(b, 2 * s)
    for name in LINEAR:
        assert two.step(name) == 2 * one.step(name), name
    assert two.step("embedding") == one.step("embedding") == 0
    # pairs(2s) - 2 pairs(s) = s(2s+1) - s(s+1) = s^2 extra pairs per head and layer; each pair
    # costs 2 * (128 + 128) FLOPs per head forward, x 32 heads x 32 layers, x 3 for the step
    extra = two.step("core_attention") - 2 * one.step("core_attention")
    assert extra == 3 * 32 * 32 * 2 * 256 * s * s
    assert two.total - 2 * one.total == extra


def test_varlen_batches_sum_attention_per_sequence():
    b = bridge(LLAMA31_8B)
    assert training_flops(b, [4096]).as_dict() == training_flops(b, 4096).as_dict()
    packed = training_flops(b, [1000, 3096])
    whole = training_flops(b, 4096)
    for name in LINEAR:
        assert packed.step(name) == whole.step(name)
    per_pair = whole.step("core_attention") // attention_pairs(4096)
    assert packed.step("core_attention") == per_pair * (attention_pairs(1000) + attention_pairs(3096))
    # a batch of 2 equal rows is the same as one row packing the two sequences
    assert training_flops(b, [2048, 2048]).total == training_flops(b, 2048, batch_size=2).total


# -- unsupported configs raise ---------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    # Megatron MoE / MLA fields without the field that turns the block on
    ("moe_shared_expert_intermediate_size", 1408), ("moe_ffn_hidden_size", 1408),
    ("moe_shared_expert_gate", True), ("q_lora_rank", 1536), ("kv_lora_rank", 512),
    # HF spellings in a Megatron dict (HF configs go through attrs_from_hf_config)
    ("num_experts", 128), ("n_routed_experts", 256), ("num_local_experts", 8),
    ("num_nextn_predict_layers", 1), ("moe_pad_expert_input_to_capacity", True),
    ("experimental_attention_variant", "gated_delta_net"), ("linear_attention_freq", 4),
    ("is_hybrid_model", True), ("hybrid_override_pattern", "M-M*-"), ("mamba_num_heads", 64),
    ("heterogeneous_block_specs", True), ("attention_output_gate", True),
    ("softmax_type", "learnable"), ("layer_types", ["full_attention", "linear_attention"]),
])
def test_unsupported_blocks_raise_naming_the_field(field, value):
    with pytest.raises(FlopsError, match=field) as e:
        training_flops({**TINY, field: value}, 16)
    assert isinstance(e.value, ConfigError)
    with pytest.raises(FlopsError, match=field):
        parameter_counts({**TINY, field: value})


def test_transformer_config_defaults_of_those_fields_do_not_raise():
    # Fields every TransformerConfig carries, at their Megatron-Core 0.19 defaults.
    defaults = dict(num_moe_experts=None, moe_ffn_hidden_size=None, moe_router_topk=2,
                    moe_layer_freq=1, moe_shared_expert_intermediate_size=None,
                    multi_latent_attention=False, mtp_num_layers=None,
                    experimental_attention_variant=None, linear_attention_freq=None,
                    linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                    is_hybrid_model=False, mamba_state_dim=128, mamba_head_dim=64,
                    mamba_num_groups=8, mamba_num_heads=None, heterogeneous_block_specs=False,
                    attention_output_gate=False, softmax_type="vanilla",
                    layer_types=["full_attention"] * 2)
    assert training_flops({**TINY, **defaults}, 16).as_dict() == training_flops(TINY, 16).as_dict()


def test_a_missing_required_field_is_named():
    cfg = {k: v for k, v in TINY.items() if k != "vocab_size"}
    with pytest.raises(FlopsError, match="vocab_size"):
        training_flops(cfg, 16)
    with pytest.raises(FlopsError, match="max_sequence_length"):
        parameter_counts({**TINY, "position_embedding_type": "learned_absolute"})
    with pytest.raises(ValueError, match="recompute"):
        training_flops(TINY, 16, recompute="some")


# -- published reference figures -------------------------------------------------------------
# GPT-3 175B (Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1): 96 layers,
# d_model 12288, 96 heads of 128, context 2048; GPT-2's BPE vocabulary of 50257, learned
# positions, LayerNorm, biases, d_ff = 4 d_model, tied input / output embedding.
GPT3 = dict(num_layers=96, hidden_size=12288, num_attention_heads=96, vocab_size=50257,
            max_sequence_length=2048, position_embedding_type="learned_absolute",
            share_embeddings_and_output_weights=True)


def test_megatron_lm_paper_flops_per_iteration():
    """Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
    Using Megatron-LM" (SC'21, arXiv:2104.04473), section 5.1: a GPT layer costs 24Bsh^2 + 4Bs^2h
    forward, the logits 2BshV, backward twice the forward; with full activation recomputation
    (one more forward of the layers) F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) per iteration,
    eq. (3); without it the same derivation gives 72 B s l h^2 (1 + s/(6h) + V/(12 l h)). The paper
    counts the full s x s attention (causal=False here), with V = 51200 for GPT-3."""
    B, s, l, h, V = 1536, 2048, 96, 12288, 51200
    cfg = {**GPT3, "vocab_size": V}
    paper = 72 * B * s * l * h * h * (1 + Fraction(s, 6 * h) + Fraction(V, 12 * l * h))
    paper_recompute = 96 * B * s * l * h * h * (1 + Fraction(s, 6 * h) + Fraction(V, 16 * l * h))
    ours = training_flops(cfg, s, B, causal=False).total
    assert ours == paper  # exact; in particular within 1 %
    assert training_flops(cfg, s, B, causal=False, recompute="full").total == paper_recompute
    # counted causally, the attention term 12 B s^2 l h shrinks to 12 B s l h (s+1)/2 exactly
    causal = training_flops(cfg, s, B).total
    assert paper - causal == 12 * B * l * h * (s * s - s * (s + 1) // 2)
    assert causal / paper == pytest.approx(0.9865, abs=1e-4)  # the paper's s/(6h) term, halved


def test_gpt3_parameter_count_and_training_compute():
    """Brown et al. 2020, Table D.1: GPT-3 175B has 174,600 M parameters and took 3.14e23 FLOPs
    for 300 B tokens, counted as 6 N per token without attention (their Appendix D)."""
    p = parameter_counts(GPT3)
    assert p.total == pytest.approx(174.6e9, rel=0.01)
    r = training_flops(GPT3, 2048)
    without_attention = r.total - r.step("core_attention")
    assert without_attention / r.tokens * 300e9 == pytest.approx(3.14e23, rel=0.01)


def test_palm_model_flops_per_token():
    """Chowdhery et al. 2022, "PaLM" (arXiv:2204.02311), Appendix B (the MFU definition):
    6N + 12LHQT model FLOPs per token with full (non-causal) attention, L layers, H heads of
    size Q, sequence T, N the parameters in matmuls (Llama-3.1-8B: all but the untied input
    embedding; the norm weights, 0.003 %, are no matmul either)."""
    b = bridge(LLAMA31_8B)
    p = parameter_counts(b)
    L, H, Q, T = 32, 32, 128, 4096
    palm = 6 * (p.total - p.embedding) + 12 * L * H * Q * T
    r = training_flops(b, T, causal=False)
    assert r.per_token == pytest.approx(palm, rel=1e-4)
    norms = p.by_component["norms"]
    assert r.per_token == palm - 6 * norms  # exact once the norm weights are taken out


# Published sizes. Llama-3.1-8B: 8.03 B (the HF hub model page, from its safetensors);
# Llama-3.2-1B: 1.24 B and Mistral-7B-v0.1: 7.24 B (same source); Qwen2.5 technical report
# (arXiv:2412.15115, Table 1): 0.5B 0.49 B / 0.36 B non-embedding, 7B 7.61 B / 6.53 B; Qwen3
# model cards: Qwen3-8B 8.2 B / 6.95 B, Qwen3-0.6B 0.6 B / 0.44 B.
PUBLISHED = {LLAMA31_8B: (8.03e9, None), "meta-llama/Llama-3.2-1B": (1.24e9, None),
             MISTRAL_7B: (7.24e9, None), "Qwen/Qwen2.5-0.5B": (0.49e9, 0.36e9),
             "Qwen/Qwen2.5-7B-Instruct": (7.61e9, 6.53e9), "Qwen/Qwen3-8B": (8.2e9, 6.95e9),
             "Qwen/Qwen3-0.6B": (0.6e9, 0.44e9)}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_parameter_counts_match_published_sizes(model):
    total, non_embedding = PUBLISHED[model]
    p = parameter_counts(bridge(model))
    assert p.total == pytest.approx(total, rel=0.01)
    assert p.active == p.total  # dense
    if non_embedding:
        assert p.non_embedding == pytest.approx(non_embedding, rel=0.01)


def test_llama31_8b_exact_figures():
    """The numbers docs/flops.md quotes. The parameter count was checked equal, once by hand,
    to that of the GPTModel Megatron-Core builds from the provider (count_params of
    tests/test_config.py, on the meta device), as it was for the six other shipped configs."""
    r = training_flops(bridge(LLAMA31_8B), 4096, 1)
    assert r.params.total == 8_030_261_248
    assert {t.name: t.step for t in r.terms} == {
        "embedding": 0,
        "qkv_projection": 19_791_209_299_968,
        "core_attention": 13_197_360_758_784,
        "attention_output_projection": 13_194_139_533_312,
        "mlp": 138_538_465_099_776,
        "logits": 12_910_671_691_776,
    }
    assert r.total == 197_631_846_383_616
    assert r.mfu(1.0, 197_631_846_383_616 * 2) == 0.5


# -- CLI -------------------------------------------------------------------------------------
def test_cli_prints_the_breakdown(capsys, monkeypatch):
    from bridges.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["flops", LLAMA31_8B, "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "seq 4096 x batch 1 = 4,096 tokens" in out and "causal" in out
    for line in ("embedding", "qkv_projection", "core_attention", "attention_output_projection",
                 "mlp", "logits"):
        assert any(row.startswith(line) for row in out.splitlines()), line
    assert "197,631,846,383,616" in out
    assert "parameters: total 8,030,261,248 (8.03 B), active 8,030,261,248" in out
    assert "MFU" not in out
    path = str(CONFIGS / LLAMA31_8B / "config.json")
    assert main(["flops", path, "--seq-len", "4096", "--step-time", "0.5", "--peak", "989"]) == 0
    assert "MFU: 39.97 %" in capsys.readouterr().out  # 1.976e14 / (0.5 s * 989e12)
    assert main(["flops", "nobody/no-such-model"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err


# -- an independent count ------------------------------------------------------------------
def test_independent_count_by_torch_flop_counter_on_the_hf_model():
    """torch.utils.flop_counter counts every matmul HF runs, forward and backward (2 FLOPs per
    multiply-add). Eager attention multiplies the whole s x s score matrix, so it is compared
    with causal=False."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=24, num_hidden_layers=2, vocab_size=101,
                      max_position_embeddings=64, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 101, (3, 10), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids=ids).logits
        forward = counter.get_total_flops()
        logits.float().square().mean().backward()
    r = training_flops(AutoBridge.from_hf_config(cfg.to_dict()), seq_len=10, batch_size=3,
                       causal=False)
    assert (forward, counter.get_total_flops()) == (r.forward, r.total) == (5_041_920, 15_125_760)


# -- MoE, MLA, MTP: each term by hand -----------------------------------------------------------
# TINY with 4 routed experts of width 40 (top-2), a shared expert of 48 with Qwen2-MoE's sigmoid
# gate, and layer 0 dense (DeepSeek's first_k_dense_replace = 1): Megatron's moe_layer_freq list.
TINY_MOE = {**TINY, "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 40,
            "moe_shared_expert_intermediate_size": 48, "moe_shared_expert_gate": True,
            "moe_layer_freq": [0, 1]}


def test_moe_terms_match_their_closed_form():
    r = training_flops(TINY_MOE, seq_len=10, batch_size=3)  # 30 tokens
    dense = training_flops(TINY, seq_len=10, batch_size=3)
    fwd = {t.name: t.forward for t in r.terms}
    assert list(fwd) == ["embedding", "qkv_projection", "core_attention",
                         "attention_output_projection", "mlp", "router", "routed_experts",
                         "shared_experts", "logits"]
    for name in ("qkv_projection", "core_attention", "attention_output_projection", "logits"):
        assert fwd[name] == dense.term(name).forward
    # the dense first layer: 2*30*(64*2*96 + 96*64), exactly half of TINY's two dense layers
    assert fwd["mlp"] == 1_105_920 == dense.term("mlp").forward // 2
    # router 64 -> 4 experts plus the 64 -> 1 shared-expert gate: 2*30*64*(4+1)
    assert fwd["router"] == 19_200
    # top-2 experts of width 40, gated (3 matmuls): 2*30*2*(64*80 + 40*64)
    assert fwd["routed_experts"] == 921_600
    # the shared expert of width 48: 2*30*(64*96 + 48*64)
    assert fwd["shared_experts"] == 552_960
    assert all(t.backward == 2 * t.forward for t in r.terms)
    p = r.params
    # MoE layer: router 64*4 + gate 64, 4 experts of 3*64*40, shared 3*64*48; it replaces
    # one dense MLP of 3*64*96
    assert p.by_component["router"] == 320 and p.by_component["routed_experts"] == 30_720
    assert p.by_component["shared_experts"] == 9_216 and p.by_component["mlp"] == 18_432
    assert p.total == 86_976 - 18_432 + 320 + 30_720 + 9_216 == 108_800
    assert p.active == p.total - 2 * 7_680 == 93_440  # 2 of the 4 routed experts idle


def test_mla_terms_match_their_closed_form():
    mla = {**TINY, "multi_latent_attention": True, "q_lora_rank": 16, "kv_lora_rank": 8,
           "qk_head_dim": 6, "qk_pos_emb_head_dim": 2, "v_head_dim": 5, "qk_layernorm": True}
    r = training_flops(mla, seq_len=10, batch_size=3)
    # q_a 64*16 + q_b 16*4*(6+2) + kv_a 64*(8+2) + kv_b 8*4*(6+5) = 2528 weights; 2 layers
    assert r.term("qkv_projection").forward == 2 * 30 * 2528 * 2 == 303_360
    # 165 causal pairs, 4 heads, QK over 6+2, AV over 5: 2*165*4*(8+5) * 2 layers
    assert r.term("core_attention").forward == 34_320
    assert r.term("attention_output_projection").forward == 2 * 30 * (4 * 5) * 64 * 2
    assert r.term("mlp").forward == training_flops(TINY, 10, 3).term("mlp").forward
    no_lora = training_flops({**mla, "q_lora_rank": None}, seq_len=10, batch_size=3)
    # q_proj 64*4*8 instead of q_a + q_b
    assert no_lora.term("qkv_projection").forward == 2 * 30 * (2048 + 640 + 352) * 2
    # parameters: attention 2528 + o_proj 1280, norms 2*64 + q_a and kv_a latent norms 16 + 8
    p = parameter_counts(mla)
    assert p.by_component["attention"] == 2 * 3808 and p.by_component["norms"] == 2 * 152 + 64
    assert p.total == 86_976 - 2 * (18_432 + 128) + 2 * (3_808 + 152) == 57_776
    assert parameter_counts({**mla, "q_lora_rank": None}).total == 57_776 + 2 * (2048 - 1536 - 16)
    with pytest.raises(FlopsError, match="q_lora_rank"):  # None (no LoRA) must be said
        parameter_counts({k: v for k, v in mla.items() if k != "q_lora_rank"})
    with pytest.raises(FlopsError, match="kv_lora_rank"):
        parameter_counts({k: v for k, v in mla.items() if k != "kv_lora_rank"})


def test_mtp_terms_match_their_closed_form():
    r = training_flops({**TINY, "mtp_num_layers": 1}, seq_len=10, batch_size=3)
    dense = training_flops(TINY, seq_len=10, batch_size=3)
    assert [t.name for t in r.terms] == list(COMPONENTS) + ["mtp"]
    # eh_proj 2*30*(2*64)*64 + one layer (half of TINY's two) + logits 2*30*64*101
    one_layer = (dense.forward - dense.term("logits").forward) // 2
    assert r.term("mtp").forward == 491_520 + one_layer + 387_840 == 3_154_560
    assert r.total == dense.total + 3 * 3_154_560
    # full recompute: the MTP layer and eh_proj again, not its logits; selective: its attention
    full = training_flops({**TINY, "mtp_num_layers": 1}, 10, 3, recompute="full")
    assert full.term("mtp").recompute == 491_520 + one_layer
    sel = training_flops({**TINY, "mtp_num_layers": 1}, 10, 3, recompute="selective")
    assert sel.term("mtp").recompute == dense.term("core_attention").forward // 2
    p = parameter_counts({**TINY, "mtp_num_layers": 2})
    # per MTP layer: enorm, hnorm, final norm (3*64), eh_proj 2*64*64, one layer 36,992
    assert p.by_component["mtp"] == 2 * (192 + 8_192 + 36_992)
    assert p.main == 86_976 and p.total == 86_976 + 90_752 and p.active == p.total


def test_moe_with_one_expert_equals_the_dense_model_but_the_router():
    """One expert, top-1, the dense width, no shared expert: every token runs the same MLP, so
    the step differs from the dense model's only by the router's h x 1 matmul (2 T h forward per
    layer) and the parameters by its h weights per layer."""
    one = {**TINY, "num_moe_experts": 1, "moe_router_topk": 1, "moe_ffn_hidden_size": 96}
    r, d = training_flops(one, 10, 3), training_flops(TINY, 10, 3)
    assert r.term("routed_experts").forward == d.term("mlp").forward and r.term("mlp").forward == 0
    assert r.term("router").forward == 2 * 30 * 64 * 2
    assert r.total - r.step("router") == d.total
    assert parameter_counts(one).total == parameter_counts(TINY).total + 2 * 64
    assert parameter_counts(one).active == parameter_counts(one).total


def test_dense_first_layers_are_counted_as_dense():
    r = training_flops({**TINY_MOE, "moe_layer_freq": [0, 0]}, 10, 3)
    assert r.term("routed_experts").forward == r.term("router").forward == 0
    assert r.total == training_flops(TINY, 10, 3).total
    # Megatron's int frequency: layer i is MoE when i % freq == 0 (layer 0 of 2 with freq 2)
    # Megatron's int frequency: layer i is MoE when i % freq == 0, so freq 2 makes layer 0 MoE
    # and layer 1 dense: the same counts as [0, 1]
    flipped = training_flops({**TINY_MOE, "moe_layer_freq": 2}, 10, 3)
    assert flipped.as_dict() == training_flops(TINY_MOE, 10, 3).as_dict()
    with pytest.raises(FlopsError, match="moe_layer_freq"):
        training_flops({**TINY_MOE, "moe_layer_freq": "([0]+[1]*1)"}, 10)


# -- HF configs of MoE / MLA families ----------------------------------------------------------
def _hf(model_type, **kw):
    base = dict(model_type=model_type, num_hidden_layers=4, hidden_size=64, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=101, intermediate_size=96,
                tie_word_embeddings=False)
    return {**base, **kw}


def test_hf_layer_patterns():
    q = attrs_from_hf_config(_hf("qwen2_moe", num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=40, shared_expert_intermediate_size=48,
                                 decoder_sparse_step=2, mlp_only_layers=[3]))
    assert q["moe_layer_freq"] == [0, 1, 0, 0]  # (i+1) % 2 == 0, and not layer 3
    assert q["moe_shared_expert_gate"] and q["add_qkv_bias"] and not q["qk_layernorm"]
    ds = attrs_from_hf_config(_hf(
        "deepseek_v3", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
        n_shared_experts=2, first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=16,
        kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=2, v_head_dim=5,
        num_nextn_predict_layers=1))
    assert ds["moe_layer_freq"] == [0, 1, 1, 1] and ds["moe_shared_expert_intermediate_size"] == 80
    assert ds["mtp_num_layers"] == 1 and ds["multi_latent_attention"]
    r = training_flops(ds, 10)
    # the MTP layer is built like the last decoder layer: MoE here
    dense_first = training_flops({**ds, "mtp_num_layers": None}, 10)
    assert r.term("mtp").forward > 0 and dense_first.term("mlp").forward == 2 * 10 * 3 * 64 * 96
    mix = attrs_from_hf_config(_hf("mixtral", num_local_experts=8, num_experts_per_tok=2))
    assert mix["moe_layer_freq"] == 1 and mix["moe_ffn_hidden_size"] == 96


@pytest.mark.parametrize("cfg,field", [
    (_hf("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
         use_sliding_window=True, sliding_window=8), "use_sliding_window"),
    (_hf("mixtral", num_local_experts=8, num_experts_per_tok=2, sliding_window=4096),
     "sliding_window"),
    (_hf("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
         layer_types=["full_attention", "linear_attention"] * 2), "layer_types"),
    (_hf("deepseek_v3", attention_bias=True), "attention_bias"),
    (_hf("deepseek_v3", index_n_heads=64), "index_n_heads"),
    (_hf("qwen3_next"), "model_type"),
    (_hf("mixtral", num_experts_per_tok=2), "num_local_experts"),
])
def test_hf_configs_with_uncounted_features_raise(cfg, field):
    with pytest.raises(FlopsError, match=field):
        training_flops(attrs_from_hf_config(cfg), 16)


# -- published MoE figures ---------------------------------------------------------------------
def _published(model):
    return attrs_from_hf_config(HF_DATA / model / "config.json")


def test_qwen3_30b_a3b_published_sizes():
    """Qwen3 technical report (arXiv:2505.09388) and the Qwen3-30B-A3B model card:
    30.5 B total, 3.3 B activated, 29.9 B non-embedding. Our active count, 3.353 B, is 1.6 %
    above 3.3 B: the card truncates (3.35 -> 3.3; 30.53 -> 30.5), so it is checked to the
    figure's precision."""
    p = parameter_counts(_published("Qwen/Qwen3-30B-A3B"))
    assert p.total == pytest.approx(30.5e9, rel=0.01)
    assert p.non_embedding == pytest.approx(29.9e9, rel=0.01)
    assert 3.3e9 <= p.active < 3.4e9
    assert (p.total, p.active) == (30_532_122_624, 3_353_032_704)


def test_deepseek_v3_published_sizes():
    """DeepSeek-V3 technical report (arXiv:2412.19437): 671 B total parameters, 37 B activated
    per token; the hub checkpoint is 685 B = 671 B main model + 14 B MTP module. The 671 B leaves
    the MTP module out (Params.main). The hub's MTP weights hold their own copy of the embedding
    and output head (2 V h), which Megatron-Core shares: 11.6 B unique + 1.85 B copies."""
    p = parameter_counts(_published("deepseek-ai/DeepSeek-V3"))
    assert p.main == pytest.approx(671e9, rel=0.01)
    assert p.main + p.by_component["mtp"] + 2 * 129280 * 7168 == pytest.approx(685e9, rel=0.01)
    assert p.by_component["mtp"] + 2 * 129280 * 7168 == pytest.approx(14e9, rel=0.05)
    # 37.55 B with the input embedding (+1.5 %), 36.63 B without it (-1.0 %): the report's
    # "37B" is within its precision either way
    assert 37e9 <= p.main_active < 38e9
    assert p.main_active - p.embedding == pytest.approx(37e9, rel=0.011)
    assert (p.main, p.main_active, p.total) == (671_026_404_352, 37_552_282_624, 682_636_472_320)


def test_mixtral_8x7b_published_sizes():
    """Jiang et al. 2024, "Mixtral of Experts" (arXiv:2401.04088): 47 B parameters (rounded),
    13 B active; 46.7 B / 12.9 B in the Mixtral announcement (mistral.ai/news/mixtral-of-experts)."""
    p = parameter_counts(_published("mistralai/Mixtral-8x7B-v0.1"))
    assert p.total == pytest.approx(46.7e9, rel=0.01)
    assert p.active == pytest.approx(12.9e9, rel=0.01)


# docs/flops.md quotes these (seq 4096, batch 1, training step)
QWEN3_30B_A3B_STEP = {
    "embedding": 0, "qkv_projection": 12_369_505_812_480, "core_attention": 19_796_041_138_176,
    "attention_output_projection": 9_895_604_649_984, "mlp": 0, "router": 309_237_645_312,
    "routed_experts": 44_530_220_924_928, "logits": 7_647_189_270_528}
DEEPSEEK_V3_STEP = {
    "embedding": 0, "qkv_projection": 104_436_961_640_448,
    "core_attention": 125_787_344_732_160, "attention_output_projection": 176_059_299_397_632,
    "mlp": 29_222_957_481_984, "router": 2_615_635_083_264,
    "routed_experts": 502_201_935_986_688, "shared_experts": 62_775_241_998_336,
    "logits": 22_774_064_087_040, "mtp": 41_745_974_820_864}


def test_moe_exact_figures_quoted_in_the_docs():
    q = training_flops(_published("Qwen/Qwen3-30B-A3B"), 4096)
    d = training_flops(_published("deepseek-ai/DeepSeek-V3"), 4096)
    assert {t.name: t.step for t in q.terms} == QWEN3_30B_A3B_STEP
    assert {t.name: t.step for t in d.terms} == DEEPSEEK_V3_STEP


def test_cli_accepts_hf_moe_configs(capsys):
    from bridges.cli import main

    assert main(["flops", str(HF_DATA / "deepseek-ai/DeepSeek-V3/config.json")]) == 0
    out = capsys.readouterr().out
    for row in ("router", "routed_experts", "shared_experts", "mtp"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert "without MTP: total 671,026,404,352" in out
    assert main(["flops", str(HF_DATA / "Qwen/Qwen3-30B-A3B")]) == 0  # a directory
    assert "active 3,353,032,704 (3.35 B)" in capsys.readouterr().out
