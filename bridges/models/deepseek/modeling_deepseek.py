"""Multi-latent attention (DeepSeek-V2/V3, Kimi-K2) on Megatron-Core's local spec, plus a
reference for DeepSeek-V3's multi-token-prediction (MTP) head.

Megatron-Core 0.19.2's local spec cannot build MLA: ``MultiLatentAttention.__init__`` passes
``k_channels`` / ``v_channels`` to its core attention, which ``DotProductAttention`` does not take
(and it could not honour a v head dim that differs from the q/k head dim anyway).
``MLACoreAttention`` takes its place; ``mla_layer_spec`` / ``mla_block_spec`` /
``mla_mtp_block_spec`` return the local specs with it substituted (and with
``local_mla_self_attention()``, which builds V2-Lite style ``q_lora_rank=None`` layers that
Megatron's QK-norm resolver refuses on the local backend).

HF -> Megatron, per layer (HF ``model.layers.{i}.``, Megatron ``decoder.layers.{i}.``; local
spec; every Megatron linear below is column-parallel unless marked row):

====================================  ===============================================  ==========
HF                                    Megatron                                         TP split
====================================  ===============================================  ==========
self_attn.q_a_proj.weight             self_attention.linear_q_down_proj.weight         dim 0 (1)
self_attn.q_a_layernorm.weight        self_attention.q_layernorm.weight                replicated
self_attn.q_b_proj.weight             self_attention.linear_q_up_proj.weight           dim 0
self_attn.q_proj.weight (q_lora None) self_attention.linear_q_proj.weight              dim 0
self_attn.kv_a_proj_with_mqa.weight   self_attention.linear_kv_down_proj.weight        dim 0 (1)
self_attn.kv_a_layernorm.weight       self_attention.kv_layernorm.weight               replicated
self_attn.kv_b_proj.weight            self_attention.linear_kv_up_proj.weight          dim 0
self_attn.o_proj.weight               self_attention.linear_proj.weight (row)          dim 1
input_layernorm.weight                input_layernorm.weight                           replicated
post_attention_layernorm.weight       pre_mlp_layernorm.weight                         replicated
====================================  ===============================================  ==========

All copies are verbatim: the row orders agree. q (q_b_proj / q_proj) is per head
``[qk_nope | qk_rope]``; kv_a_proj_with_mqa is ``[kv_lora_rank latent | qk_rope (shared k_pe)]``;
kv_b_proj is per head ``[k_nope | v]``. A TP split of dim 0 is therefore a split by heads.
(1) The local spec builds both down projections as ColumnParallelLinear(gather_output=False):
each rank holds a row slice of the (replicated) HF matrix and Megatron all-gathers the output;
so ``q_lora_rank`` and ``kv_lora_rank + qk_rope_head_dim`` must divide by TP. (TE's spec uses a
duplicated TELinear instead, and fuses the q/kv norms into ``linear_q_up_proj`` /
``linear_kv_up_proj`` as ``layer_norm_weight``: other names there.)

RoPE: Megatron's MLA always de-interleaves the rope dims before rotate-half
(``mla_rotary_interleaved=True`` is hard-coded in multi_latent_attention.py, there is no config
flag; ``TransformerConfig`` rejects ``rotary_interleaved=True`` with MLA). That is exactly HF's
DeepSeek-V3 ``rope_interleave=True`` (the default; the published V3 and Kimi-K2 configs do not
set it) and DeepSeek-V2's complex-pair rope. HF ``rope_interleave=False`` has no Megatron
equivalent: permute the rope rows with ``interleave_rope_rows`` (q per head, and the rope tail of
kv_a_proj_with_mqa) or reject the config.

Config (HF -> ``MLATransformerConfig``): q_lora_rank, kv_lora_rank, v_head_dim as is;
qk_nope_head_dim -> qk_head_dim; qk_rope_head_dim -> qk_pos_emb_head_dim; rope_theta ->
rotary_base; rope_scaling yarn -> rope_type="yarn", factor -> rotary_scaling_factor, mscale,
mscale_all_dim, original_max_position_embeddings, beta_fast, beta_slow; no yarn -> rope_type="rope"
and rotary_scaling_factor=1.0 (MLA's softmax scale reads rotary_scaling_factor / mscale_all_dim even
for plain rope); qk_layernorm=True (the q/kv latent norms; with q_lora_rank=None
``local_mla_self_attention`` drops the q norm); activation_func=F.silu (MLATransformerConfig
defaults to gelu); transformer_impl="local"; GPTModel position_embedding_type="rope" (the MLA
layer makes its own rotary embedding; "yarn" would make GPTModel build a second, unused one).
Softmax scale: Megatron uses mscale(factor, mscale_all_dim)**2 / sqrt(qk_nope + qk_rope), as HF.

MTP (DeepSeek-V3, ``num_nextn_predict_layers``: one extra HF layer ``model.layers.{N}``,
N = num_hidden_layers; Megatron ``mtp.layers.0.``, built by ``mla_mtp_block_spec`` and
``GPTModel(mtp_block_spec=...)`` with ``config.mtp_num_layers``):

====================================  ===============================================
HF model.layers.{N}.                  Megatron mtp.layers.0.
====================================  ===============================================
enorm.weight                          enorm.weight
hnorm.weight                          hnorm.weight
eh_proj.weight  [h, 2h]               eh_proj.weight (column-parallel: dim 0 split)
(decoder layer: self_attn, mlp,       mtp_model_layer.<decoder-layer names above>
 input_layernorm, post_attn...)
shared_head.norm.weight               final_layernorm.weight
shared_head.head.weight               none: Megatron reuses output_layer (= lm_head)
embed_tokens.weight                   none: Megatron reuses embedding (= embed_tokens)
====================================  ===============================================

(The bridge maps those two copies onto the main embedding / output layer: equality checked on
import, the main tensor written under both names on export.)

Both sides concatenate ``[enorm(embedding of token i+1), hnorm(main hidden state i)]`` (the
embedding half is eh_proj's first h input columns), and both take the main model's hidden state
*after* its final norm. DeepSeek published no MTP forward; the paper's formula (eq. 21) writes
``[RMSNorm(h); RMSNorm(Emb)]``, but the code that serves the published weights (vLLM
``deepseek_mtp.py``, SGLang) and Megatron (``multi_token_prediction.py``, ``_concat_embeddings``)
put the embedding first, so this reference does too. The last position has no next token:
Megatron rolls token 0 in there, so compare positions ``0..s-2`` only.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from bridges.core.experts import stack_hf_experts


# -- core attention ---------------------------------------------------------------------------
class MLACoreAttention(torch.nn.Module):
    """Plain-torch causal core attention with separate q/k and v head dims.

    Constructor and forward follow what ``MultiLatentAttention`` passes. Inputs are
    ``[s, b, heads_per_partition, d]``; the output is ``[sq, b, heads_per_partition * v_dim]``.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__()
        if config.context_parallel_size != 1:
            raise NotImplementedError("MLACoreAttention: context parallelism is not supported")
        if getattr(config, "softmax_type", "vanilla") != "vanilla" or config.window_size is not None:
            raise NotImplementedError("MLACoreAttention: only vanilla softmax without a sliding "
                                      f"window (softmax_type={config.softmax_type!r}, "
                                      f"window_size={config.window_size})")
        if pg_collection is not None:
            tp = pg_collection.tp.size()
        else:
            from megatron.core import parallel_state as ps

            tp = ps.get_tensor_model_parallel_world_size()
        self.config = config
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.k_channels = k_channels or config.kv_channels
        self.v_channels = v_channels or config.kv_channels
        self.softmax_scale = self.k_channels ** -0.5 if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.heads_per_partition = config.num_attention_heads // tp

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        from megatron.core.transformer.enums import AttnMaskType

        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("MLACoreAttention: packed sequences / attention bias")
        if query.size(2) != self.heads_per_partition:
            raise ValueError(f"MLACoreAttention: query has {query.size(2)} heads, expected "
                             f"{self.heads_per_partition} per tensor-parallel partition")
        if key.size(2) != query.size(2):  # GQA-style key/value groups
            key = key.repeat_interleave(query.size(2) // key.size(2), dim=2)
            value = value.repeat_interleave(query.size(2) // value.size(2), dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.softmax_scale
        if self.config.attention_softmax_in_fp32:
            scores = scores.float()
        sq, sk = scores.shape[-2:]
        mask = attention_mask
        if mask is None and (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and sq > 1:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).triu(sk - sq + 1)
        if mask is not None:  # Megatron's convention: True = masked out
            scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(dim=-1).to(query.dtype)
        if self.training and self.dropout_p:
            from megatron.core import tensor_parallel

            with tensor_parallel.get_cuda_rng_tracker().fork():
                probs = torch.nn.functional.dropout(probs, self.dropout_p)
        out = torch.matmul(probs, v)  # [b, n, sq, dv]
        return out.permute(2, 0, 1, 3).reshape(sq, out.size(0), -1)


# -- specs ------------------------------------------------------------------------------------
_LOCAL_MLA: list[type] = []


def local_mla_self_attention() -> type:
    """``MLASelfAttention`` with the q/kv norms and projections taken from the spec as given.

    Megatron's ``QKNormConfigResolver`` (mla_qk_norm_config.py, ``_resolve_mla_qk_layernorm``)
    demands a fused norm+linear for ``linear_q_proj`` when ``q_lora_rank`` is None and
    ``qk_layernorm`` is on: the local backend has none (RuntimeError), and with TE it would add a
    q norm that DeepSeek-V2 does not have. Same parameter names as ``MLASelfAttention``.
    """
    if not _LOCAL_MLA:
        from megatron.core.transformer.identity_op import IdentityOp
        from megatron.core.transformer.multi_latent_attention import MLASelfAttention

        class LocalMLASelfAttention(MLASelfAttention):
            def _resolve_qk_norm_config(self, submodules):
                lora = self.config.q_lora_rank is not None
                return dict(linear_q_proj=IdentityOp if lora else submodules.linear_q_proj,
                            linear_q_up_proj=submodules.linear_q_up_proj if lora else IdentityOp,
                            linear_kv_up_proj=submodules.linear_kv_up_proj,
                            q_layernorm=submodules.q_layernorm if lora else IdentityOp,
                            kv_layernorm=submodules.kv_layernorm)

        _LOCAL_MLA.append(LocalMLASelfAttention)
    return _LOCAL_MLA[0]


def _config(obj):
    """A TransformerConfig from a config or a provider (anything with ``transformer_config()``)."""
    return obj.transformer_config() if hasattr(obj, "transformer_config") else obj


def localize_mla_layer(layer_spec):
    """The same layer spec with MLACoreAttention and ``local_mla_self_attention()``."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    attn = layer_spec.submodules.self_attention
    if not issubclass(attn.module, MLASelfAttention):
        raise ValueError(f"expected an MLASelfAttention layer spec, got {attn.module}")
    attn = dataclasses.replace(attn, module=local_mla_self_attention(),
                               submodules=dataclasses.replace(attn.submodules,
                                                              core_attention=MLACoreAttention))
    layer_sub = dataclasses.replace(layer_spec.submodules, self_attention=attn)
    return dataclasses.replace(layer_spec, submodules=layer_sub)


def mla_layer_spec(config_or_provider, moe: bool = False):
    """One local-spec MLA ``TransformerLayer`` spec: dense MLP, or MoE (``num_moe_experts``
    SequentialMLP experts; grouped GEMM is GPU-only) when ``moe``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    cfg = _config(config_or_provider)
    spec = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts if moe else None,
                                    moe_grouped_gemm=False, qk_layernorm=cfg.qk_layernorm,
                                    multi_latent_attention=True, normalization=cfg.normalization)
    return localize_mla_layer(spec)


def mla_block_spec(config_or_provider, vp_stage: int | None = None, pp_rank: int | None = None):
    """This pipeline stage's decoder block spec: dense and MoE layers as ``config.moe_layer_freq``
    says (DeepSeek: ``[0] * first_k_dense_replace + [1] * rest``), all with MLACoreAttention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    cfg = _config(config_or_provider)
    if not cfg.multi_latent_attention:
        raise ValueError("mla_block_spec needs a config with multi_latent_attention=True")
    block = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False,
                                       normalization=cfg.normalization, vp_stage=vp_stage,
                                       pp_rank=pp_rank)
    local = {id(s): localize_mla_layer(s) for s in block.layer_specs}  # dense / MoE specs are shared
    return dataclasses.replace(block, layer_specs=[local[id(s)] for s in block.layer_specs])


def mla_mtp_block_spec(config_or_provider, vp_stage: int | None = None, pp_rank: int | None = None):
    """The MTP block spec (None where this stage builds no MTP layer). DeepSeek-V3's MTP layer is
    MoE exactly when the model has experts (its index is past ``first_k_dense_replace``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    cfg = _config(config_or_provider)
    layer = mla_layer_spec(cfg, moe=cfg.num_moe_experts is not None)
    return get_gpt_mtp_block_spec(cfg, layer, use_transformer_engine=False, vp_stage=vp_stage,
                                  pp_rank=pp_rank)


def interleave_rope_rows(weight: torch.Tensor, rope_dim: int, head_dim: int) -> torch.Tensor:
    """For HF ``rope_interleave=False``: reorder the last ``rope_dim`` rows of every ``head_dim``
    block (``[x0..x_{d/2-1}, y0..]`` -> ``[x0, y0, x1, y1, ...]``) so that Megatron's fixed
    de-interleave gives back HF's rotate-half layout. Use head_dim = rows for kv_a_proj_with_mqa."""
    w = weight.reshape(-1, head_dim, *weight.shape[1:])
    rope = w[:, head_dim - rope_dim:]
    half = rope_dim // 2
    inter = torch.stack((rope[:, :half], rope[:, half:]), dim=2).reshape(rope.shape)
    return torch.cat((w[:, :head_dim - rope_dim], inter), dim=1).reshape(weight.shape)


# -- MTP --------------------------------------------------------------------------------------
def hf_mtp_layer(hf_config, layer_idx: int | None = None):
    """An HF ``DeepseekV3DecoderLayer`` carrying the MTP extras, so that its ``state_dict`` keys
    are the checkpoint's ``model.layers.{N}.*`` names (transformers does not build these)."""
    from torch import nn
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3DecoderLayer,
                                                                      DeepseekV3RMSNorm)

    h, eps = hf_config.hidden_size, hf_config.rms_norm_eps
    idx = hf_config.num_hidden_layers if layer_idx is None else layer_idx
    layer = DeepseekV3DecoderLayer(hf_config, idx)
    layer.embed_tokens = nn.Embedding(hf_config.vocab_size, h)
    layer.enorm = DeepseekV3RMSNorm(h, eps)
    layer.hnorm = DeepseekV3RMSNorm(h, eps)
    layer.eh_proj = nn.Linear(2 * h, h, bias=False)
    layer.shared_head = nn.Module()
    layer.shared_head.norm = DeepseekV3RMSNorm(h, eps)
    layer.shared_head.head = nn.Linear(h, hf_config.vocab_size, bias=False)
    return layer


def add_toy_mtp_layers(model, randomize) -> None:
    """Append ``num_nextn_predict_layers`` MTP layers to a toy ``DeepseekV3ForCausalLM`` (as
    ``model.model.layers[N + k]``, which its forward skips), so that ``save_pretrained`` writes
    them under the checkpoint's names. Each is re-drawn by ``randomize``; its ``embed_tokens``
    and ``shared_head.head`` are copies of the main ones, as in the published checkpoint."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    for k in range(getattr(cfg, "num_nextn_predict_layers", 0) or 0):
        layer = hf_mtp_layer(cfg, cfg.num_hidden_layers + k).float()
        randomize(layer)
        with torch.no_grad():
            layer.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
            layer.shared_head.head.weight.copy_(model.lm_head.weight)
        model.model.layers.append(layer.to(dtype).eval())


def load_hf_mtp_layer(hf_config, tensors: dict[str, torch.Tensor], layer_idx: int):
    """``hf_mtp_layer`` holding the checkpoint tensors ``model.layers.{layer_idx}.*`` (per-expert
    tensors stacked as transformers holds them); every tensor of the layer must be used."""
    import copy

    prefix = f"model.layers.{layer_idx}."
    sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    hf_config = copy.copy(hf_config)
    hf_config._attn_implementation = "eager"
    layer = hf_mtp_layer(hf_config, layer_idx)
    experts = getattr(layer.mlp, "experts", None)
    if experts is not None:
        stack_hf_experts(sd, "mlp.experts.", experts.gate_up_proj.shape[0])
    layer.load_state_dict(sd, strict=True)
    return layer.float().eval()


def mtp_reference_logits(layer, input_ids: torch.Tensor, main_hidden: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's MTP head (depth 1) on top of the main model, from its description.

    ``main_hidden``: the main model's last hidden state after its final norm, [b, s, h]
    (HF ``DeepseekV3Model(...).last_hidden_state``). Position i combines that state with the
    embedding of token i+1: ``eh_proj(cat(enorm(emb(t[i+1])), hnorm(h[i])))``, runs one decoder
    layer (causal, positions 0..s-2), then ``shared_head.norm`` and ``shared_head.head``.
    Returns [b, s-1, vocab]: the logits predicting token i+2.
    """
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    cfg = layer.self_attn.config
    b, s = input_ids.shape
    x = torch.cat((layer.enorm(layer.embed_tokens(input_ids[:, 1:])),
                   layer.hnorm(main_hidden[:, :-1])), dim=-1)
    x = layer.eh_proj(x)
    pos = torch.arange(s - 1, device=x.device).unsqueeze(0).expand(b, -1)
    cos_sin = DeepseekV3RotaryEmbedding(cfg).to(x.device)(x, pos)
    causal = torch.ones(s - 1, s - 1, dtype=torch.bool, device=x.device).triu(1)
    mask = torch.zeros(s - 1, s - 1, dtype=x.dtype, device=x.device).masked_fill(
        causal, torch.finfo(x.dtype).min)[None, None]
    x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    return layer.shared_head.head(layer.shared_head.norm(x))


def megatron_mtp_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main logits, [MTP logits per depth]) of a Megatron ``GPTModel`` with an MTP block, all
    [b, s, vocab] and gathered over TP. Without labels GPTModel returns only the main logits (it
    turns the MTP outputs into an auxiliary loss), so the MTP block's output is caught with a
    forward hook and passed through the shared output layer."""
    caught: list[Any] = []
    handle = model.mtp.register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        main = model(input_ids, position_ids, attention_mask, runtime_gather_output=True)
    finally:
        handle.remove()
    depths = torch.chunk(caught[0], 1 + model.config.mtp_num_layers, dim=0)[1:]
    tied = model.share_embeddings_and_output_weights
    weight = model.shared_embedding_or_output_weight() if tied else None
    outs = [model.output_layer(h, weight=weight, runtime_gather_output=True)[0].transpose(0, 1)
            for h in depths]
    return main, outs
