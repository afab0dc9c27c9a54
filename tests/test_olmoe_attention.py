"""OLMoE q/k norm over the full projection (bridges/models/olmoe/modeling_olmoe.py).

(a) TP=1: Megatron SelfAttention with OlmoeQNorm/OlmoeKNorm == transformers' OlmoeAttention
    (outputs and gradients, fp32); (b) TP=2 on two gloo ranks == TP=1, and the same layer with
    each rank normalising only its own heads (no TP reduction) differs; (c) Megatron's stock
    per-head qk_layernorm differs from HF, so the module is needed.
"""
from __future__ import annotations

import threading

import pytest
import torch

from bridges.core import cpu_compat

H, NH, NG, D = 32, 4, 2, 8  # hidden, heads, kv heads (GQA), head_dim (OLMoE ties it to H/NH)
B, S, EPS, THETA = 2, 7, 1e-5, 10000.0
FP32 = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- HF reference -----------------------------------------------------------------------------
def _hf_reference(unit_norms: bool = False, seed: int = 0) -> dict:
    """Random OlmoeAttention (norm weights re-randomised unless ``unit_norms``), its input,
    output and the gradients of <output, g> for a fixed random g."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeAttention, OlmoeRotaryEmbedding

    cfg = OlmoeConfig(hidden_size=H, num_attention_heads=NH, num_key_value_heads=NG,
                      rms_norm_eps=EPS, rope_parameters={"rope_type": "default", "rope_theta": THETA},
                      intermediate_size=16, num_experts=4, num_experts_per_tok=2, vocab_size=97)
    cfg._attn_implementation = "eager"
    g = torch.Generator().manual_seed(seed)
    attn = OlmoeAttention(cfg, layer_idx=0).float()
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if "norm" in name:
                p.copy_(torch.ones_like(p) if unit_norms else 0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(B, S, H, generator=g).requires_grad_()
    gout = torch.randn(B, S, H, generator=g)
    cos_sin = OlmoeRotaryEmbedding(cfg)(x, torch.arange(S)[None])
    mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
    out = attn(x, cos_sin, mask)[0]
    (out * gout).sum().backward()
    return dict(state={k: v.detach().clone() for k, v in attn.state_dict().items()},
                x=x.detach(), gout=gout, out=out.detach(), x_grad=x.grad,
                q_norm_grad=attn.q_norm.weight.grad, k_norm_grad=attn.k_norm.weight.grad)


# -- Megatron side ----------------------------------------------------------------------------
def _megatron_attention(tp: int, stock: bool = False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from bridges.models.olmoe.modeling_olmoe import olmoe_layer_spec

    cfg = TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=NH, num_query_groups=NG, kv_channels=D,
        ffn_hidden_size=16, normalization="RMSNorm", layernorm_epsilon=EPS, qk_layernorm=True,
        add_bias_linear=False, tensor_model_parallel_size=tp, use_cpu_initialization=True,
        params_dtype=torch.float32, masked_softmax_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, attention_softmax_in_fp32=True, hidden_dropout=0.0,
        attention_dropout=0.0)
    spec = (get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm") if stock
            else olmoe_layer_spec())
    return build_module(spec.submodules.self_attention, config=cfg, layer_number=1)


def _load(attn, state: dict, tp: int, rank: int) -> None:
    """HF weights -> this rank's Megatron shards (what the bridge will do)."""
    per_group = lambda w, rows: w.view(NG, rows, H)  # noqa: E731
    qkv = torch.cat([per_group(state["q_proj.weight"], NH // NG * D),  # [q heads of g, k_g, v_g]
                     per_group(state["k_proj.weight"], D), per_group(state["v_proj.weight"], D)],
                    dim=1).reshape(-1, H)
    with torch.no_grad():
        attn.linear_qkv.weight.copy_(qkv.chunk(tp, 0)[rank])
        attn.linear_proj.weight.copy_(state["o_proj.weight"].chunk(tp, 1)[rank])
        for mine, hf in (("q_layernorm", "q_norm.weight"), ("k_layernorm", "k_norm.weight")):
            w = getattr(attn, mine).weight
            if w.numel() == state[hf].numel() // tp:  # full-projection norm: contiguous head slice
                w.copy_(state[hf].chunk(tp, 0)[rank])
            else:  # stock per-head norm: only a uniform weight has a per-head equivalent
                assert torch.all(state[hf] == state[hf][0]), "stock norm needs a uniform weight"
                w.fill_(state[hf][0].item())


def _run(attn, ref: dict) -> dict:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    emb = RotaryEmbedding(kv_channels=D, rotary_percent=1.0, rotary_base=THETA,
                          use_cpu_initialization=True)(S)
    x = ref["x"].transpose(0, 1).contiguous().requires_grad_()  # Megatron: [s, b, h]
    out, _ = attn(x, attention_mask=None, rotary_pos_emb=emb)
    (out * ref["gout"].transpose(0, 1)).sum().backward()
    grads = {f"{n}_grad": getattr(attn, m).weight.grad.clone()
             for n, m in (("q_norm", "q_layernorm"), ("k_norm", "k_layernorm"))}
    attn.zero_grad()
    return dict(out=out.detach().transpose(0, 1), x_grad=x.grad.transpose(0, 1), **grads)


# -- worker for the two-rank test (imported by the pool's ranks as f"{__name__}:...") ---------
def tp2_worker(ref: dict) -> dict:
    import torch.distributed as dist

    from bridges.core.parallel import Layout, init_model_parallel
    from bridges.models.olmoe import modeling_olmoe

    init_model_parallel(Layout(tp=2))
    rank = dist.get_rank()
    attn = _megatron_attention(tp=2)
    _load(attn, ref["state"], tp=2, rank=rank)
    result = _run(attn, ref)
    sharded = attn.sharded_state_dict(prefix="self_attention.")
    result["q_shard"] = (sharded["self_attention.q_layernorm.weight"].global_shape,
                         sharded["self_attention.q_layernorm.weight"].global_offset)
    reduce = modeling_olmoe._tp_mean
    modeling_olmoe._tp_mean = lambda x, group, world: x  # each rank: RMS over its own heads only
    try:
        result["local_out"] = _run(attn, ref)["out"]
    finally:
        modeling_olmoe._tp_mean = reduce
    return result


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool():
    """Two ranks, started in a thread at once so their imports overlap the in-process tests."""
    from conformance.runner import RankPool

    if torch.cuda.is_available():
        yield lambda: pytest.skip("gloo test for a machine without CUDA")
        return
    p = RankPool(2)
    errors: list[BaseException] = []

    def start():
        try:
            p.start()
        except BaseException as e:  # surfaced by the test that uses the pool
            errors.append(e)

    t = threading.Thread(target=start, daemon=True)
    t.start()

    def ready():
        t.join()
        if errors:
            raise errors[0]
        return p

    yield ready
    t.join()
    p.close()


@pytest.fixture(scope="module")
def world1(pool):
    from megatron.core import parallel_state as ps

    from bridges.core.parallel import Layout, current_layout, init_model_parallel

    before = current_layout() if ps.model_parallel_is_initialized() else None
    if before != Layout():
        init_model_parallel(Layout())
    cpu_compat.ensure()
    yield
    if before is not None and before != Layout():
        init_model_parallel(before)


@pytest.fixture(scope="module")
def ref():
    return _hf_reference()


@pytest.fixture(scope="module")
def tp1(world1, ref):
    attn = _megatron_attention(tp=1)
    _load(attn, ref["state"], tp=1, rank=0)
    return _run(attn, ref)


# -- tests ------------------------------------------------------------------------------------
def test_tp1_matches_hf(tp1, ref):
    for key in ("out", "x_grad", "q_norm_grad", "k_norm_grad"):
        assert _rel(tp1[key], ref[key]) < FP32, (key, _rel(tp1[key], ref[key]))


def test_tp2_matches_tp1_and_needs_the_reduction(pool, tp1, ref):
    r0, r1 = pool().run(f"{__name__}:tp2_worker", ref=ref)
    for key in ("out", "x_grad"):  # replicated after linear_proj / linear_qkv's reductions
        for r in (r0, r1):
            assert _rel(r[key], tp1[key]) < FP32, (key, _rel(r[key], tp1[key]))
    for key in ("q_norm_grad", "k_norm_grad"):  # each rank: its heads' slice of the weight
        got = torch.cat([r0[key], r1[key]])
        assert _rel(got, tp1[key]) < FP32, (key, _rel(got, tp1[key]))
    assert r0["q_shard"] == ((NH * D,), (0,)) and r1["q_shard"] == ((NH * D,), (NH * D // 2,))
    # Without the TP reduction each rank normalises its own heads only: visibly wrong.
    assert _rel(r0["local_out"], tp1["out"]) > 1e-2


def test_stock_per_head_qk_layernorm_differs_from_hf(world1):
    ref = _hf_reference(unit_norms=True)  # unit weights: the only difference is the RMS span
    ours, stock = _megatron_attention(tp=1), _megatron_attention(tp=1, stock=True)
    assert stock.q_layernorm.weight.shape == (D,) and ours.q_layernorm.weight.shape == (NH * D,)
    _load(ours, ref["state"], 1, 0)
    _load(stock, ref["state"], 1, 0)
    assert _rel(_run(ours, ref)["out"], ref["out"]) < FP32
    assert _rel(_run(stock, ref)["out"], ref["out"]) > 1e-2


def test_moe_layer_spec_parameter_names(world1):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import build_module

    from bridges.models.olmoe.modeling_olmoe import olmoe_layer_spec

    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=NH, num_query_groups=NG,
                            kv_channels=D, ffn_hidden_size=16, moe_ffn_hidden_size=16,
                            num_moe_experts=4, moe_router_topk=2, normalization="RMSNorm",
                            qk_layernorm=True, add_bias_linear=False, gated_linear_unit=True,
                            use_cpu_initialization=True, bias_activation_fusion=False,
                            masked_softmax_fusion=False, persist_layer_norm=False,
                            apply_rope_fusion=False, gradient_accumulation_fusion=False)
    layer = build_module(olmoe_layer_spec(num_experts=4), config=cfg, layer_number=1)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes["self_attention.q_layernorm.weight"] == (NH * D,)
    assert shapes["self_attention.k_layernorm.weight"] == (NG * D,)
    assert shapes["mlp.router.weight"] == (4, H)
    assert shapes["mlp.experts.local_experts.3.linear_fc1.weight"] == (32, H)
    out, _ = layer(torch.randn(S, B, H), attention_mask=None)
    assert out.shape == (S, B, H)
