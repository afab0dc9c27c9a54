"""OLMoE attention pieces Megatron-Core lacks: q/k RMSNorm over the whole projection.

HF's OlmoeAttention normalises q_proj / k_proj outputs over all heads at once (q_norm weight:
num_heads * head_dim, k_norm: num_kv_heads * head_dim); Megatron's qk_layernorm normalises
each head. ``OlmoeQNorm`` / ``OlmoeKNorm`` drop into ``SelfAttention``'s q_layernorm /
k_layernorm slots (which receive [sq, b, heads_per_rank, head_dim]) and keep the parameter
names ``self_attention.{q,k}_layernorm.weight``. Each TP rank holds its heads' slice of the
weight (HF weight split in TP contiguous chunks along dim 0); the mean square is averaged
over the TP group.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    # Every rank uses the summed value, so the gradient is summed too (Megatron's
    # reduce_from_tensor_model_parallel_region passes it through unreduced).
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _tp_mean(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """Mean over the TP group of per-rank means (every rank holds as many elements)."""
    return _AllReduceSum.apply(x, group) / world


class _FullProjectionRMSNorm(torch.nn.Module):
    _heads_field: ClassVar[str]  # TransformerConfig field giving the number of heads normalised

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        heads = getattr(config, self._heads_field) or config.num_attention_heads
        if heads % self.tp:
            # With num_query_groups < TP Megatron replicates kv heads across ranks; the weight
            # split (and the checkpoint sharding below) would no longer be a plain chunking.
            raise ValueError(f"{type(self).__name__}: {self._heads_field}={heads} does not divide "
                             f"by tensor_model_parallel_size={self.tp}")
        self.eps = eps
        # hidden_size is head_dim (SelfAttention passes hidden_size_per_attention_head)
        self.weight = torch.nn.Parameter(torch.ones(heads // self.tp * hidden_size,
                                                    dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [sq, b, heads_per_rank, head_dim]; fp32 statistics, cast back, then scale (as HF)
        flat = x.flatten(-2).float()
        ms = flat.pow(2).mean(-1, keepdim=True)
        if self.tp > 1:
            ms = _tp_mean(ms, self.tp_group, self.tp)
        out = self.weight * (flat * torch.rsqrt(ms + self.eps)).to(x.dtype)
        return out.view_as(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                                     make_sharded_tensors_for_checkpoint)

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, tp={self.tp}"


class OlmoeQNorm(_FullProjectionRMSNorm):
    """RMSNorm over this rank's num_attention_heads / TP heads, TP-averaged mean square."""

    _heads_field = "num_attention_heads"


class OlmoeKNorm(_FullProjectionRMSNorm):
    """RMSNorm over this rank's num_query_groups / TP kv heads, TP-averaged mean square."""

    _heads_field = "num_query_groups"


def full_projection_qk_norm(layer_spec, is_moe: bool = False):
    """The same layer spec with the OLMoE q/k norms (any layer: the MLP is left as it is)."""
    attn = layer_spec.submodules.self_attention
    sub = dataclasses.replace(attn.submodules, q_layernorm=OlmoeQNorm, k_layernorm=OlmoeKNorm)
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        layer_spec.submodules, self_attention=dataclasses.replace(attn, submodules=sub)))


def olmoe_layer_spec(num_experts: int | None = None, moe_grouped_gemm: bool = False):
    """Megatron-Core's local (no TransformerEngine) layer spec, RMSNorm, MoE MLP when
    ``num_experts`` is set, with the OLMoE q/k norms. Needs ``qk_layernorm=True`` in the
    TransformerConfig (SelfAttention refuses q/k norms in the spec otherwise)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm,
                                    qk_layernorm=True, normalization="RMSNorm")
    attn = spec.submodules.self_attention.submodules
    attn.q_layernorm, attn.k_layernorm = OlmoeQNorm, OlmoeKNorm
    return spec
