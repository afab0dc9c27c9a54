"""Multi-latent attention on Megatron-Core's local spec (bridges/models/deepseek/modeling_deepseek).

One process, gloo world of 1, fp32, tiny dims with the published DeepSeek rope settings. Every
comparison is paired with a mutant that must fail it (ignored mscale, k/v swapped in kv_b_proj,
rope layout not converted, enorm/hnorm order swapped).
"""
from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from bridges.core import cpu_compat
from bridges.models.deepseek.modeling_deepseek import (MLACoreAttention, hf_mtp_layer,
                                                       interleave_rope_rows, megatron_mtp_logits,
                                                       mla_block_spec, mla_layer_spec,
                                                       mla_mtp_block_spec, mtp_reference_logits)

# Published values (config.json of deepseek-ai/DeepSeek-V3 and deepseek-ai/DeepSeek-V2-Lite, as
# copied in /work/shared/hf-configs): the rope / norm settings are kept, the sizes shrunk.
V3 = dict(rope_theta=10000, rms_norm_eps=1e-6, attention_bias=False,
          rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                        "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                        "type": "yarn"})
V2_LITE = dict(rope_theta=10000, rms_norm_eps=1e-6, attention_bias=False, q_lora_rank=None,
               rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                             "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                             "type": "yarn"})
TINY = dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=14,
            qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, intermediate_size=40,
            vocab_size=101, max_position_embeddings=163840, attn_implementation="eager")
NOPE, ROPE, V_DIM, KV_LORA, HEADS = 12, 8, 10, 14, 4

ATTN = {  # Megatron (under self_attention.) <- HF (under self_attn.)
    "linear_q_down_proj.weight": "q_a_proj.weight",
    "q_layernorm.weight": "q_a_layernorm.weight",
    "linear_q_up_proj.weight": "q_b_proj.weight",
    "linear_q_proj.weight": "q_proj.weight",
    "linear_kv_down_proj.weight": "kv_a_proj_with_mqa.weight",
    "kv_layernorm.weight": "kv_a_layernorm.weight",
    "linear_kv_up_proj.weight": "kv_b_proj.weight",
    "linear_proj.weight": "o_proj.weight",
}


@pytest.fixture(scope="module")
def world1():
    from megatron.core import parallel_state as ps

    from bridges.core.parallel import Layout, current_layout, init_model_parallel

    if not ps.model_parallel_is_initialized() or current_layout() != Layout():
        init_model_parallel(Layout())
    cpu_compat.ensure()


def _hf_config(kind: str, **kw):
    from transformers import DeepseekV2Config, DeepseekV3Config

    if kind == "v2":
        return DeepseekV2Config(**{**TINY, **V2_LITE, "first_k_dense_replace": 99, **kw})
    return DeepseekV3Config(**{**TINY, **V3, "q_lora_rank": 20, "first_k_dense_replace": 99, **kw})


def _mla_config(hf, **kw):
    """HF DeepSeek config -> MLATransformerConfig (what the bridge's config translation does)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    rope = hf.rope_parameters
    return MLATransformerConfig(
        num_layers=kw.pop("num_layers", 1), hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size, num_attention_heads=hf.num_attention_heads,
        q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank, qk_head_dim=hf.qk_nope_head_dim,
        qk_pos_emb_head_dim=hf.qk_rope_head_dim, v_head_dim=hf.v_head_dim, rope_type="yarn",
        rotary_base=rope["rope_theta"], rotary_scaling_factor=rope["factor"],
        mscale=rope["mscale"], mscale_all_dim=rope["mscale_all_dim"],
        original_max_position_embeddings=rope["original_max_position_embeddings"],
        beta_fast=rope["beta_fast"], beta_slow=rope["beta_slow"], qk_layernorm=True,
        normalization="RMSNorm", layernorm_epsilon=hf.rms_norm_eps, gated_linear_unit=True,
        transformer_impl="local", activation_func=torch.nn.functional.silu,
        add_bias_linear=False, use_cpu_initialization=True, attention_softmax_in_fp32=True,
        apply_rope_fusion=False, masked_softmax_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        hidden_dropout=0.0, attention_dropout=0.0, **kw)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every tensor re-drawn, norms included (at 1.0 a swapped norm would be invisible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def _causal(s: int) -> torch.Tensor:
    m = torch.ones(s, s, dtype=torch.bool).triu(1)
    return torch.zeros(s, s).masked_fill(m, torch.finfo(torch.float32).min)[None, None]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _load(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Write every parameter exactly once from ``tensors``, consuming all of them."""
    tensors = dict(tensors)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(tensors.pop(name))
    assert not tensors, f"unused tensors: {sorted(tensors)}"


def _attn_tensors(hf_sd: dict, hf_prefix: str, mc_prefix: str) -> dict[str, torch.Tensor]:
    return {mc_prefix + mc: hf_sd.pop(hf_prefix + hf) for mc, hf in ATTN.items()
            if hf_prefix + hf in hf_sd}


# -- (a) core attention vs Megatron's DotProductAttention ------------------------------------
@pytest.mark.parametrize("groups,explicit_mask,scale",
                         [(4, False, None), (2, True, None), (4, False, 0.37)])
def test_core_attention_equals_dot_product_attention(world1, groups, explicit_mask, scale):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, kv_channels=8,
                            num_query_groups=groups, attention_softmax_in_fp32=True,
                            masked_softmax_fusion=False, attention_dropout=0.0)
    args = (cfg, 1, AttnMaskType.causal, "self")
    ref = DotProductAttention(*args, softmax_scale=scale).eval()
    ours = MLACoreAttention(*args, softmax_scale=scale, k_channels=8, v_channels=8).eval()
    g = torch.Generator().manual_seed(groups)
    s, b = 9, 2
    q = torch.randn(s, b, 4, 8, generator=g)
    k, v = (torch.randn(s, b, groups, 8, generator=g) for _ in range(2))
    mask = None
    if explicit_mask:  # padding-style mask on top of causal, diagonal kept
        mask = (torch.rand(b, 1, s, s, generator=g) < 0.3) | torch.ones(s, s, dtype=torch.bool).triu(1)
        mask &= ~torch.eye(s, dtype=torch.bool)
    with torch.no_grad():
        want, got = ref(q, k, v, mask), ours(q, k, v, mask)
    assert got.shape == want.shape == (s, b, 4 * 8)
    assert (got - want).abs().max().item() <= 1e-6
    # ...and the comparison can fail: the causal mask matters.
    with torch.no_grad():
        unmasked = ours(q, k, v, torch.zeros(s, s, dtype=torch.bool))
    assert (unmasked - want).abs().max().item() > 1e-2


def test_core_attention_runs_per_tensor_parallel_partition(world1):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, kv_channels=8,
                            attention_softmax_in_fp32=True, masked_softmax_fusion=False)
    tp2 = types.SimpleNamespace(tp=types.SimpleNamespace(size=lambda: 2))
    full = MLACoreAttention(cfg, 1, AttnMaskType.causal, "self", k_channels=12, v_channels=6).eval()
    half = MLACoreAttention(cfg, 1, AttnMaskType.causal, "self", k_channels=12, v_channels=6,
                            pg_collection=tp2).eval()
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(5, 2, 4, 12, generator=g) for _ in range(2))
    v = torch.randn(5, 2, 4, 6, generator=g)
    with torch.no_grad():
        whole = full(q, k, v, None).view(5, 2, 4, 6)
        for r in range(2):
            h = slice(2 * r, 2 * r + 2)
            part = half(q[:, :, h], k[:, :, h], v[:, :, h], None).view(5, 2, 2, 6)
            torch.testing.assert_close(part, whole[:, :, h], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="has 4 heads, expected 2 per tensor-parallel"):
        half(q, k, v, None)


# -- (b) Megatron MLASelfAttention (local spec) vs transformers -------------------------------
def _attention_pair(kind: str, core=MLACoreAttention, **hf_kw):
    """(HF attention, Megatron MLASelfAttention, HF state dict), both random and unloaded."""
    from megatron.core.transformer.spec_utils import build_module
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    hf_cfg = _hf_config(kind, **hf_kw)
    hf = (DeepseekV2Attention if kind == "v2" else DeepseekV3Attention)(hf_cfg, 0).eval()
    _randomise(hf, seed=1)
    spec = mla_layer_spec(_mla_config(hf_cfg)).submodules.self_attention
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules,
                                                                    core_attention=core))
    mc = build_module(spec, config=_mla_config(hf_cfg), layer_number=1).eval()
    return hf_cfg, hf, mc


def _run_pair(hf_cfg, hf, mc, kind: str, s: int = 11, b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RotaryEmbedding
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    x = torch.randn(b, s, hf_cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(s)[None].expand(b, -1)
    with torch.no_grad():
        if kind == "v2":
            rope = DeepseekV2RotaryEmbedding(hf_cfg)(x, pos)
        else:
            rope = DeepseekV3RotaryEmbedding(hf_cfg)(x, pos)
        want, _ = hf(x, attention_mask=_causal(s), position_embeddings=rope)
        got, bias = mc(x.transpose(0, 1).contiguous(), None)
    assert bias is None
    return got.transpose(0, 1), want


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_mla_attention_matches_transformers(world1, kind):
    hf_cfg, hf, mc = _attention_pair(kind)
    sd = dict(hf.state_dict())
    _load(mc, _attn_tensors(sd, "", ""))
    assert not sd, f"HF tensors not mapped: {sorted(sd)}"  # every HF tensor used exactly once
    assert hasattr(mc, "linear_q_proj") == (kind == "v2")
    got, want = _run_pair(hf_cfg, hf, mc, kind)
    assert _rel(got, want) <= 1e-5

    # Mutant: k_nope and v swapped inside each head of kv_b_proj must be caught.
    w = hf.kv_b_proj.weight.detach().view(HEADS, NOPE + V_DIM, KV_LORA)
    swapped = torch.cat((w[:, NOPE:], w[:, :NOPE]), 1).reshape(-1, KV_LORA)  # [v | k_nope]
    with torch.no_grad():
        mc.linear_kv_up_proj.weight.copy_(swapped)
    got, want = _run_pair(hf_cfg, hf, mc, kind)
    assert _rel(got, want) > 1e-2


def test_rope_interleave_false_needs_interleaved_rows(world1):
    hf_cfg, hf, mc = _attention_pair("v3", rope_interleave=False)
    tensors = _attn_tensors(dict(hf.state_dict()), "", "")
    _load(mc, tensors)
    got, want = _run_pair(hf_cfg, hf, mc, "v3")
    assert _rel(got, want) > 1e-2  # Megatron has no flag for it: a verbatim copy is wrong
    for name, rows in [("linear_q_up_proj.weight", NOPE + ROPE),
                       ("linear_kv_down_proj.weight", KV_LORA + ROPE)]:
        tensors[name] = interleave_rope_rows(tensors[name], ROPE, rows)
    _load(mc, tensors)
    got, want = _run_pair(hf_cfg, hf, mc, "v3")
    assert _rel(got, want) <= 1e-5


# -- (c) the yarn mscale softmax scale is honoured (and the check can fail) ------------------
class _IgnoresSoftmaxScale(MLACoreAttention):
    def __init__(self, *args, softmax_scale=None, **kwargs):
        super().__init__(*args, **kwargs)  # falls back to 1/sqrt(k_channels)


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_mla_softmax_scale_is_yarn_mscale(world1, kind):
    hf_cfg, hf, mc = _attention_pair(kind)
    rope = hf_cfg.rope_parameters
    m = 0.1 * rope["mscale_all_dim"] * math.log(rope["factor"]) + 1.0
    expected = m * m / math.sqrt(NOPE + ROPE)
    assert mc.core_attention.softmax_scale == pytest.approx(expected, rel=1e-12)
    assert hf.scaling == pytest.approx(expected, rel=1e-12)
    assert m > 1.2  # far enough from the plain scale for the mutant below to show

    tensors = _attn_tensors(dict(hf.state_dict()), "", "")
    _, _, plain = _attention_pair(kind, core=_IgnoresSoftmaxScale)
    assert plain.core_attention.softmax_scale == pytest.approx((NOPE + ROPE) ** -0.5)
    _load(plain, tensors)
    got, want = _run_pair(hf_cfg, hf, plain, kind)
    assert _rel(got, want) > 1e-2


# -- specs: dense-first then MoE, MTP, on CPU -------------------------------------------------
def test_block_spec_dense_first_then_moe_runs_on_cpu(world1):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    cfg = _mla_config(_hf_config("v3"), num_layers=3, num_moe_experts=4, moe_router_topk=2,
                      moe_ffn_hidden_size=16, moe_layer_freq=[0, 1, 1], mtp_num_layers=1,
                      moe_token_dispatcher_type="allgather")
    model = GPTModel(cfg, mla_block_spec(cfg), vocab_size=101, max_sequence_length=64,
                     position_embedding_type="rope", mtp_block_spec=mla_mtp_block_spec(cfg)).eval()
    kinds = [type(layer.mlp) for layer in model.decoder.layers]
    assert kinds == [MLP, MoELayer, MoELayer]
    assert isinstance(model.mtp.layers[0].mtp_model_layer.mlp, MoELayer)
    assert all(isinstance(l.self_attention.core_attention, MLACoreAttention)
               for l in [*model.decoder.layers, model.mtp.layers[0].mtp_model_layer])
    ids = torch.randint(0, 101, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        main, (mtp,) = megatron_mtp_logits(model, ids, torch.arange(6)[None].expand(2, -1))
    assert main.shape == mtp.shape == (2, 6, 101) and main.isfinite().all() and mtp.isfinite().all()


# -- MTP: Megatron's MTP head vs the DeepSeek-V3 reference ------------------------------------
def _layer_tensors(sd: dict, hf: str, mc: str) -> dict[str, torch.Tensor]:
    out = _attn_tensors(sd, hf + "self_attn.", mc + "self_attention.")
    out[mc + "input_layernorm.weight"] = sd.pop(hf + "input_layernorm.weight")
    out[mc + "pre_mlp_layernorm.weight"] = sd.pop(hf + "post_attention_layernorm.weight")
    out[mc + "mlp.linear_fc1.weight"] = torch.cat((sd.pop(hf + "mlp.gate_proj.weight"),
                                                   sd.pop(hf + "mlp.up_proj.weight")))
    out[mc + "mlp.linear_fc2.weight"] = sd.pop(hf + "mlp.down_proj.weight")
    return out


def test_mtp_logits_match_deepseek_reference(world1):
    from megatron.core.models.gpt import GPTModel
    from transformers import DeepseekV3ForCausalLM

    n = 2
    hf_cfg = _hf_config("v3", num_hidden_layers=n, num_nextn_predict_layers=1)
    hf = DeepseekV3ForCausalLM(hf_cfg).eval()
    _randomise(hf, seed=4)
    mtp = hf_mtp_layer(hf_cfg).eval()
    _randomise(mtp, seed=5)
    with torch.no_grad():  # as in the published checkpoint: the MTP's copies equal the main ones
        mtp.embed_tokens.weight.copy_(hf.model.embed_tokens.weight)
        mtp.shared_head.head.weight.copy_(hf.lm_head.weight)

    sd = {**hf.state_dict(), **{f"model.layers.{n}.{k}": v for k, v in mtp.state_dict().items()}}
    tensors = {"embedding.word_embeddings.weight": sd.pop("model.embed_tokens.weight"),
               "decoder.final_layernorm.weight": sd.pop("model.norm.weight"),
               "output_layer.weight": sd.pop("lm_head.weight")}
    for i in range(n):
        tensors.update(_layer_tensors(sd, f"model.layers.{i}.", f"decoder.layers.{i}."))
    p, q = f"model.layers.{n}.", "mtp.layers.0."
    tensors.update(_layer_tensors(sd, p, q + "mtp_model_layer."))
    for mc, h in [("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"),
                  ("final_layernorm", "shared_head.norm")]:
        tensors[f"{q}{mc}.weight"] = sd.pop(f"{p}{h}.weight")
    # Shared with the main model on the Megatron side: consumed by checking they are equal.
    assert torch.equal(sd.pop(p + "embed_tokens.weight"), tensors["embedding.word_embeddings.weight"])
    assert torch.equal(sd.pop(p + "shared_head.head.weight"), tensors["output_layer.weight"])
    assert not sd, f"HF tensors not mapped: {sorted(sd)}"

    cfg = _mla_config(hf_cfg, num_layers=n, mtp_num_layers=1)
    model = GPTModel(cfg, mla_block_spec(cfg), vocab_size=hf_cfg.vocab_size,
                     max_sequence_length=64, position_embedding_type="rope",
                     mtp_block_spec=mla_mtp_block_spec(cfg)).eval()
    _load(model, tensors)

    s = 9
    ids = torch.randint(0, hf_cfg.vocab_size, (2, s), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        hidden = hf.model(input_ids=ids).last_hidden_state
        want_main = hf.lm_head(hidden)
        want_mtp = mtp_reference_logits(mtp, ids, hidden)
        got_main, (got_mtp,) = megatron_mtp_logits(model, ids, torch.arange(s)[None].expand(2, -1))
    assert _rel(got_main, want_main) <= 1e-5
    assert want_mtp.shape == (2, s - 1, hf_cfg.vocab_size)
    assert _rel(got_mtp[:, :-1], want_mtp) <= 1e-5  # the last position has no next token

    # Mutant: the reference with [hnorm(h), enorm(e)] instead (eh_proj's column halves swapped).
    h = hf_cfg.hidden_size
    with torch.no_grad():
        w = mtp.eh_proj.weight.clone()
        mtp.eh_proj.weight.copy_(torch.cat((w[:, h:], w[:, :h]), 1))
        swapped = mtp_reference_logits(mtp, ids, hidden)
    assert _rel(got_mtp[:, :-1], swapped) > 1e-2
