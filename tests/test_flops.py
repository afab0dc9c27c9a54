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
from bridges.flops import (COMPONENTS, FlopsError, attention_pairs, parameter_counts,
                           training_flops)

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
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
    ("num_moe_experts", 64), ("moe_shared_expert_intermediate_size", 1408),
    ("moe_ffn_hidden_size", 1408), ("num_experts", 128), ("n_routed_experts", 256),
    ("multi_latent_attention", True), ("q_lora_rank", 1536), ("kv_lora_rank", 512),
    ("mtp_num_layers", 1), ("num_nextn_predict_layers", 1),
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
