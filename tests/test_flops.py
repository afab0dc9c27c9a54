"""The FLOPs calculator (bridges/flops.py): every term against a closed form computed by hand on a
tiny config, the invariants the conventions imply, an independent count by torch's
FlopCounterMode on an HF model, and agreement with published figures (sources cited per test).

Conventions under test (docs/flops.md): matmul FLOPs only, 2 FLOPs per multiply-add, backward =
2 x forward, embedding 0, causal attention counted as exactly s(s+1)/2 query-key pairs per head.
"""
from __future__ import annotations

import json
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
# The fields of TINY, as the closed forms below use them.
L, H, N, G, D, F, V = (TINY[k] for k in ("num_layers", "hidden_size", "num_attention_heads",
                                          "num_query_groups", "kv_channels", "ffn_hidden_size",
                                          "vocab_size"))


def test_each_term_matches_its_closed_form_on_a_tiny_config():
    s, b = 10, 3
    t = s * b  # 30 tokens
    r = training_flops(TINY, seq_len=s, batch_size=b)
    fwd = {t.name: t.forward for t in r.terms}
    assert list(fwd) == list(COMPONENTS)
    assert fwd["embedding"] == 0  # a row lookup: no matmul
    # QKV: 2 * tokens * hidden * (heads*d + 2*groups*d) * layers
    assert fwd["qkv_projection"] == 2 * t * H * (N * D + 2 * G * D) * L
    # core attention: causal pairs s(s+1)/2 = 55 per sequence, b sequences; QK^T and AV each
    # 2 * pairs * d per head
    assert fwd["core_attention"] == 2 * (b * s * (s + 1) // 2) * N * (D + D) * L
    # output projection: 2 * tokens * heads*d * hidden * layers
    assert fwd["attention_output_projection"] == 2 * t * N * D * H * L
    # gated MLP, 3 matmuls: gate + up 2 * tokens * hidden * 2 ffn, down 2 * tokens * ffn * hidden
    assert fwd["mlp"] == (2 * t * H * 2 * F + 2 * t * F * H) * L
    # logits: 2 * tokens * hidden * vocab
    assert fwd["logits"] == 2 * t * H * V
    assert r.forward == sum(fwd.values()) and r.total == 3 * r.forward
    assert r.tokens == t and r.per_token == r.total / t


def test_mlp_without_gating_is_two_matmuls():
    r = training_flops({**TINY, "gated_linear_unit": False}, seq_len=10, batch_size=3)
    assert r.term("mlp").forward == L * (2 * 30 * H * F + 2 * 30 * F * H)


def test_parameter_counts_match_their_closed_form_on_a_tiny_config():
    p = parameter_counts(TINY)
    # per layer: qkv, proj, fc1 (gate + up), fc2, 2 RMSNorms
    per_layer = H * (N * D + 2 * G * D) + N * D * H + H * 2 * F + F * H + 2 * H
    assert p.total == L * per_layer + V * H * 2 + H
    assert p.active == p.total and p.embedding == p.output == V * H
    assert p.non_embedding == p.total - 2 * V * H
    tied = parameter_counts({**TINY, "share_embeddings_and_output_weights": True})
    assert tied.total == p.total - V * H and tied.output == 0
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
    ("heterogeneous_block_specs", True), ("hybrid_layer_pattern", "M-D-"),
    ("softmax_type", "sparsemax"), ("layer_types", ["full_attention", "linear_attention"]),
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


# -- whole published models: every term from the HF config's fields, seq s, batch 1 ------------
DOCS = Path(__file__).resolve().parents[1] / "docs" / "flops.md"


def _config(path: Path) -> dict:
    return json.loads(path.read_text())


def _attention_step(c: dict, s: int, qkv_weights: int, qk_dim: int, v_dim: int) -> dict:
    """Attention terms of one training step (3 x forward) over every layer, from the weights of
    the projections to Q, K, V (per layer) and the per-head Q/K and V widths."""
    L, h, n, pairs = c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"], s * (s + 1) // 2
    return {"qkv_projection": 3 * L * 2 * s * qkv_weights,
            "core_attention": 3 * L * 2 * pairs * n * (qk_dim + v_dim),
            "attention_output_projection": 3 * L * 2 * s * n * v_dim * h}


def _gqa(c: dict) -> tuple[int, int]:
    """(head_dim, per-layer Q/K/V projection weights) of a grouped-query attention config."""
    h, n, g = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or h // n
    return d, h * (n * d + 2 * g * d)


def _swiglu(h: int, f: int) -> int:
    """Weights of a gated MLP: gate, up (h x f each) and down (f x h)."""
    return 3 * h * f


def test_llama31_8b_exact_figures():
    """Every term and the parameter count from the config's fields (docs/flops.md quotes the
    same numbers). The parameter count was checked equal, once by hand, to that of the GPTModel
    Megatron-Core builds from the provider (count_params of tests/test_config.py, on the meta
    device), as it was for the six other shipped configs."""
    c, s = _config(CONFIGS / LLAMA31_8B / "config.json"), 4096
    L, h, n, V, f = (c[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                    "vocab_size", "intermediate_size"))
    d, qkv = _gqa(c)
    expected = {"embedding": 0, **_attention_step(c, s, qkv, d, d),
                "mlp": 3 * L * 2 * s * _swiglu(h, f), "logits": 3 * 2 * s * h * V}
    r = training_flops(bridge(LLAMA31_8B), s, 1)
    assert {t.name: t.step for t in r.terms} == expected
    assert r.total == sum(expected.values())
    # untied embedding and output head; per layer QKV, o_proj, MLP, 2 RMSNorms; final norm
    assert r.params.total == 2 * V * h + L * (qkv + n * d * h + _swiglu(h, f) + 2 * h) + h
    assert r.mfu(1.0, r.total * 2) == 0.5
    docs = DOCS.read_text()
    for name, step in expected.items():
        assert name == "embedding" or f"| {step:,} |" in docs, f"docs/flops.md: {name} {step:,}"
    assert f"**{r.total:,}**" in docs and f"{r.params.total:,} total" in docs


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
    r = training_flops(bridge(LLAMA31_8B), 4096)  # its terms: test_llama31_8b_exact_figures
    assert f"{r.total:,}" in out
    assert f"parameters: total {r.params.total:,} (8.03 B), active {r.params.total:,}" in out
    assert "MFU" not in out
    path = str(CONFIGS / LLAMA31_8B / "config.json")
    assert main(["flops", path, "--seq-len", "4096", "--step-time", "0.5", "--peak", "989"]) == 0
    assert f"MFU: {100 * r.total / (0.5 * 989e12):.2f} %" in capsys.readouterr().out
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
    assert (forward, counter.get_total_flops()) == (r.forward, r.total)
    # and the closed form: TINY's terms with s x s attention pairs (non-causal)
    assert r.forward == training_flops(TINY, 10, 3).forward + 2 * 3 * (100 - 55) * N * (D + D) * L


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
    E, k, fe, fs = (TINY_MOE[x] for x in ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
                                          "moe_shared_expert_intermediate_size"))
    # the dense first layer: 2*30*(64*2*96 + 96*64), exactly half of TINY's two dense layers
    assert fwd["mlp"] == 2 * 30 * (H * 2 * F + F * H) == dense.term("mlp").forward // 2
    # router 64 -> 4 experts plus the 64 -> 1 shared-expert gate: 2*30*64*(4+1)
    assert fwd["router"] == 2 * 30 * H * (E + 1)
    # top-2 experts of width 40, gated (3 matmuls): 2*30*2*(64*80 + 40*64)
    assert fwd["routed_experts"] == 2 * 30 * k * (H * 2 * fe + fe * H)
    # the shared expert of width 48: 2*30*(64*96 + 48*64)
    assert fwd["shared_experts"] == 2 * 30 * (H * 2 * fs + fs * H)
    assert all(t.backward == 2 * t.forward for t in r.terms)
    p = r.params
    # MoE layer: router 64*4 + gate 64, 4 experts of 3*64*40, shared 3*64*48; it replaces
    # one dense MLP of 3*64*96
    assert p.by_component["router"] == H * E + H and p.by_component["routed_experts"] == E * 3 * H * fe
    assert p.by_component["shared_experts"] == 3 * H * fs and p.by_component["mlp"] == 3 * H * F
    dense_total = parameter_counts(TINY).total
    assert p.total == dense_total - 3 * H * F + H * (E + 1) + E * 3 * H * fe + 3 * H * fs
    assert p.active == p.total - (E - k) * 3 * H * fe  # 2 of the 4 routed experts idle


def test_mla_terms_match_their_closed_form():
    mla = {**TINY, "multi_latent_attention": True, "q_lora_rank": 16, "kv_lora_rank": 8,
           "qk_head_dim": 6, "qk_pos_emb_head_dim": 2, "v_head_dim": 5, "qk_layernorm": True}
    ql, kl, nope, rope, v = (mla[x] for x in ("q_lora_rank", "kv_lora_rank", "qk_head_dim",
                                              "qk_pos_emb_head_dim", "v_head_dim"))
    r = training_flops(mla, seq_len=10, batch_size=3)
    # q_a 64*16 + q_b 16*4*(6+2) + kv_a 64*(8+2) + kv_b 8*4*(6+5) = 2528 weights; 2 layers
    kv = H * (kl + rope) + kl * N * (nope + v)
    weights = H * ql + ql * N * (nope + rope) + kv
    assert r.term("qkv_projection").forward == 2 * 30 * weights * L
    # 165 causal pairs, 4 heads, QK over 6+2, AV over 5: 2*165*4*(8+5) * 2 layers
    assert r.term("core_attention").forward == 2 * 165 * N * (nope + rope + v) * L
    assert r.term("attention_output_projection").forward == 2 * 30 * (N * v) * H * L
    assert r.term("mlp").forward == training_flops(TINY, 10, 3).term("mlp").forward
    no_lora = training_flops({**mla, "q_lora_rank": None}, seq_len=10, batch_size=3)
    # q_proj 64*4*8 instead of q_a + q_b
    assert no_lora.term("qkv_projection").forward == 2 * 30 * (H * N * (nope + rope) + kv) * L
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
    eh_proj, logits = 2 * 30 * (2 * H) * H, 2 * 30 * H * V
    assert r.term("mtp").forward == eh_proj + one_layer + logits
    assert r.total == dense.total + 3 * (eh_proj + one_layer + logits)
    # full recompute: the MTP layer and eh_proj again, not its logits; selective: its attention
    full = training_flops({**TINY, "mtp_num_layers": 1}, 10, 3, recompute="full")
    assert full.term("mtp").recompute == eh_proj + one_layer
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
                tie_word_embeddings=False, max_position_embeddings=256, rms_norm_eps=1e-6)
    return {**base, **kw}


# a small but complete DeepSeek-V3 config (MLA, routing groups, shared experts)
_DS = dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
           n_shared_experts=2, first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=16,
           kv_lora_rank=8, qk_nope_head_dim=6, qk_rope_head_dim=2, v_head_dim=5, n_group=1,
           topk_group=1)


def test_hf_layer_patterns():
    q = attrs_from_hf_config(_hf("qwen2_moe", num_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=40, shared_expert_intermediate_size=48,
                                 decoder_sparse_step=2, mlp_only_layers=[3]))
    assert q["moe_layer_freq"] == [0, 1, 0, 0]  # (i+1) % 2 == 0, and not layer 3
    assert q["moe_shared_expert_gate"] and q["add_qkv_bias"] and not q["qk_layernorm"]
    ds = attrs_from_hf_config(_hf("deepseek_v3", **_DS, num_nextn_predict_layers=1))
    assert ds["moe_layer_freq"] == [0, 1, 1, 1] and ds["moe_shared_expert_intermediate_size"] == 80
    assert ds["mtp_num_layers"] == 1 and ds["multi_latent_attention"]
    r = training_flops(ds, 10)
    # the MTP layer is built like the last decoder layer: MoE here
    dense_first = training_flops({**ds, "mtp_num_layers": None}, 10)
    assert r.term("mtp").forward > 0 and dense_first.term("mlp").forward == 2 * 10 * 3 * 64 * 96
    mix = attrs_from_hf_config(_hf("mixtral", num_local_experts=8, num_experts_per_tok=2))
    assert mix["moe_layer_freq"] == [1] * 4 and mix["moe_ffn_hidden_size"] == 96


def test_hf_config_goes_through_its_bridge():
    """One translator: the calculator reads a config as its bridge does, e.g. Mixtral's sliding
    window (refused by the old hand-written HF table) is counted with its window."""
    from bridges import AutoBridge

    cfg = _hf("mixtral", num_local_experts=8, num_experts_per_tok=2, sliding_window=16)
    attrs = attrs_from_hf_config(cfg)
    assert attrs == AutoBridge.from_hf_config(cfg).to_megatron_provider().as_dict()
    full = training_flops(attrs_from_hf_config({**cfg, "sliding_window": None}), 64)
    win = training_flops(attrs, 64)
    ratio = attention_pairs(64, window=(15, 0)) / attention_pairs(64)
    assert win.term("core_attention").forward == full.term("core_attention").forward * ratio


@pytest.mark.parametrize("cfg,field", [
    (_hf("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
         use_sliding_window=True, sliding_window=8), "use_sliding_window"),
    (_hf("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=40,
         layer_types=["full_attention", "linear_attention"] * 2), "layer_types"),
    (_hf("deepseek_v3", **{**_DS, "attention_bias": True}), "attention_bias"),
    (_hf("deepseek_v3", **{**_DS, "index_n_heads": 64}), "index_n_heads"),
    (_hf("falcon_h1"), "model_type"),  # no bridge for it
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
    c = _config(HF_DATA / "Qwen/Qwen3-30B-A3B/config.json")
    L, h, n, V, E, k, fe = (c[x] for x in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                           "vocab_size", "num_experts", "num_experts_per_tok",
                                           "moe_intermediate_size"))
    d, qkv = _gqa(c)
    # per layer: QKV, o_proj, 2 RMSNorms and the q/k norms (head_dim each), router, E experts
    layer = qkv + n * d * h + 2 * h + 2 * d + h * E + E * _swiglu(h, fe)
    assert p.total == 2 * V * h + L * layer + h  # untied embedding and head, final norm
    assert p.active == p.total - L * (E - k) * _swiglu(h, fe)


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
    c = _config(HF_DATA / "deepseek-ai/DeepSeek-V3/config.json")
    L, h, n, V, f, E, k, fe, ns = (c[x] for x in (
        "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "intermediate_size",
        "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts"))
    nope, rope, v, ql, kl = (c[x] for x in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                            "q_lora_rank", "kv_lora_rank"))
    dense = c["first_k_dense_replace"]
    # MLA projections and o_proj; 2 RMSNorms and the q_a / kv_a latent norms
    attn = h * ql + ql * n * (nope + rope) + h * (kl + rope) + kl * n * (nope + v) + n * v * h
    norms = 2 * h + ql + kl
    moe_layer = attn + norms + h * E + E * _swiglu(h, fe) + _swiglu(h, ns * fe)
    main = 2 * V * h + dense * (attn + norms + _swiglu(h, f)) + (L - dense) * moe_layer + h
    mtp = c["num_nextn_predict_layers"] * (3 * h + 2 * h * h + moe_layer)  # enorm, hnorm, final norm, eh_proj
    idle = (E - k) * _swiglu(h, fe)
    assert (p.main, p.total) == (main, main + mtp)
    assert p.main_active == main - (L - dense) * idle


def test_mixtral_8x7b_published_sizes():
    """Jiang et al. 2024, "Mixtral of Experts" (arXiv:2401.04088): 47 B parameters (rounded),
    13 B active; 46.7 B / 12.9 B in the Mixtral announcement (mistral.ai/news/mixtral-of-experts)."""
    p = parameter_counts(_published("mistralai/Mixtral-8x7B-v0.1"))
    assert p.total == pytest.approx(46.7e9, rel=0.01)
    assert p.active == pytest.approx(12.9e9, rel=0.01)


def _qwen3_moe_step(c: dict, s: int) -> dict:
    """Qwen3-MoE (every layer MoE: decoder_sparse_step 1, no mlp_only_layers), seq s, batch 1."""
    assert c["decoder_sparse_step"] == 1 and not c["mlp_only_layers"]
    L, h, V, E, k, fe = (c[x] for x in ("num_hidden_layers", "hidden_size", "vocab_size",
                                        "num_experts", "num_experts_per_tok", "moe_intermediate_size"))
    d, qkv = _gqa(c)
    return {"embedding": 0, **_attention_step(c, s, qkv, d, d), "mlp": 0,
            "router": 3 * L * 2 * s * h * E, "routed_experts": 3 * L * 2 * s * k * _swiglu(h, fe),
            "logits": 3 * 2 * s * h * V}


def _deepseek_v3_step(c: dict, s: int) -> dict:
    """DeepSeek-V3: MLA with q LoRA, first_k_dense_replace dense layers then MoE layers (routed
    top-k and shared experts), one MTP layer (eh_proj 2h -> h, an MoE layer, the logits)."""
    assert c["moe_layer_freq"] == 1
    L, h, n, V, f, E, k, fe = (c[x] for x in (
        "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
        "intermediate_size", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"))
    nope, rope, v, ql, kl = (c[x] for x in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                            "q_lora_rank", "kv_lora_rank"))
    dense, moe, mtp = c["first_k_dense_replace"], L - c["first_k_dense_replace"], c["num_nextn_predict_layers"]
    # q_a h -> q_lora, q_b q_lora -> n (nope + rope), kv_a h -> kv_lora + rope, kv_b kv_lora -> n (nope + v)
    qkv = h * ql + ql * n * (nope + rope) + h * (kl + rope) + kl * n * (nope + v)
    attn = _attention_step(c, s, qkv, nope + rope, v)
    per_moe_layer = {"router": 2 * s * h * E, "routed_experts": 2 * s * k * _swiglu(h, fe),
                     "shared_experts": 2 * s * _swiglu(h, c["n_shared_experts"] * fe)}
    logits = 2 * s * h * V
    mtp_layer = 2 * s * 2 * h * h + sum(attn.values()) // (3 * L) + sum(per_moe_layer.values()) + logits
    return {"embedding": 0, **attn, "mlp": 3 * dense * 2 * s * _swiglu(h, f),
            **{name: 3 * moe * x for name, x in per_moe_layer.items()},
            "logits": 3 * logits, "mtp": 3 * mtp * mtp_layer}


def test_moe_exact_figures_quoted_in_the_docs():
    """Every term from the published configs' fields; docs/flops.md quotes the same numbers."""
    docs = DOCS.read_text()
    for model, expected_of in (("Qwen/Qwen3-30B-A3B", _qwen3_moe_step),
                               ("deepseek-ai/DeepSeek-V3", _deepseek_v3_step)):
        expected = expected_of(_config(HF_DATA / model / "config.json"), 4096)
        r = training_flops(_published(model), 4096)
        assert {t.name: t.step for t in r.terms} == expected, model
        for name, step in expected.items():
            assert step == 0 or f"| {step:,} |" in docs, f"docs/flops.md: {model} {name} {step:,}"


def test_cli_accepts_hf_moe_configs(capsys):
    from bridges.cli import main

    assert main(["flops", str(HF_DATA / "deepseek-ai/DeepSeek-V3/config.json")]) == 0
    out = capsys.readouterr().out
    for row in ("router", "routed_experts", "shared_experts", "mtp"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert f"without MTP: total {parameter_counts(_published('deepseek-ai/DeepSeek-V3')).main:,}" in out
    assert main(["flops", str(HF_DATA / "Qwen/Qwen3-30B-A3B")]) == 0  # a directory
    active = parameter_counts(_published("Qwen/Qwen3-30B-A3B")).active
    assert f"active {active:,} ({active / 1e9:.2f} B)" in capsys.readouterr().out


# -- vision-language models: the tower and the projector per image --------------------------------
def test_gemma3_vlm_counts_the_published_size_and_each_image():
    """gemma-3-4b-it: 4.3 B parameters on its model card; the text part alone is Gemma3's text
    model (3,880,263,168), the rest the SigLIP tower and the projector. Each image adds the
    same FLOPs; a text-only row (images=0) counts none."""
    b = bridge("google/gemma-3-4b-it")
    p = parameter_counts(b)
    assert p.total == pytest.approx(4.3e9, rel=0.005)
    assert p.total - p.by_component["vision_tower"] - p.by_component["projector"] == 3_880_263_168
    one, two, none = (training_flops(b, 4096, 1, images=n) for n in (1, 2, 0))
    tower = one.term("vision_tower").forward
    assert two.term("vision_tower").forward == 2 * tower and none.term("vision_tower").forward == 0
    assert two.total - one.total == one.total - none.total == 3 * (tower + one.term("projector").forward)


def test_vision_terms_equal_torch_flop_counter_on_the_hf_tower_and_projector():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModel
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    cfg = AutoConfig.for_model("gemma3", vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                            num_attention_heads=2, image_size=16, patch_size=4,
                                                            vision_use_head=False),
                               text_config=dict(hidden_size=40, num_attention_heads=2, num_key_value_heads=1),
                               mm_tokens_per_image=4)
    cfg.vision_config._attn_implementation = "eager"
    tower, proj = AutoModel.from_config(cfg.vision_config), Gemma3MultiModalProjector(cfg)
    with FlopCounterMode(display=False) as counter:
        proj(tower(pixel_values=torch.randn(3, 3, 16, 16)).last_hidden_state)
    attrs = {**TINY, "hidden_size": 40, "vision_config": cfg.vision_config.to_dict(), "mm_tokens_per_image": 4}
    r = training_flops(attrs, 10, 3, images=1)
    assert counter.get_total_flops() == r.term("vision_tower").forward + r.term("projector").forward
    assert sum(p.numel() for m in (tower, proj) for p in m.parameters()) == \
        parameter_counts(attrs).by_component["vision_tower"] + parameter_counts(attrs).by_component["projector"]


def test_sinks_and_router_bias_are_parameters_not_flops():
    """Learnable softmax sinks (GPT-OSS): one parameter per head and layer, no matmul; a router
    with bias (add_bias_linear): one per expert and MoE layer."""
    from bridges.flops import training_flops

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=8, vocab_size=100, ffn_hidden_size=128,
                gated_linear_unit=True, add_bias_linear=True, position_embedding_type="rope",
                num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)
    plain = training_flops(base, seq_len=16)
    sinks = training_flops({**base, "softmax_type": "learnable"}, seq_len=16)
    assert sinks.params.by_component["attention"] - plain.params.by_component["attention"] == 2 * 8
    assert sinks.total == plain.total
    unbiased = training_flops({**base, "add_bias_linear": False}, seq_len=16)
    assert plain.params.by_component["router"] - unbiased.params.by_component["router"] == 2 * 4


@pytest.mark.parametrize("model", ["allenai/OLMoE-1B-7B-0924", "Qwen/Qwen3-30B-A3B", "mistralai/Mixtral-8x7B-v0.1",
                                   "Qwen/Qwen1.5-MoE-A2.7B", "openai/gpt-oss-20b", "Qwen/Qwen3-8B", "google/gemma-2-9b",
                                   "MiniMaxAI/MiniMax-M2"])
def test_parameter_count_equals_transformers(model):
    """The calculator's parameters for a shipped config equal those of transformers' model built
    from it on the meta device (OLMoE's q/k norms span the whole projection: heads x head_dim)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bridges.core.auto import AutoBridge
    from bridges.flops import training_flops
    from conformance.models import resolve

    cfg = {k: v for k, v in resolve(model).config.items() if k != "quantization_config"}
    bridge = AutoBridge.from_hf_config(cfg)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    assert training_flops(bridge, seq_len=16).params.total == sum(p.numel() for p in hf.parameters())
