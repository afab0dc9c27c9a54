"""Deliberately broken MiniMax-M2 bridges (tests/test_minimax_m2.py): each injects one bug of the
kind this family's conversion gets wrong (the HF config and tensors stay right)."""
from __future__ import annotations

import dataclasses

import torch

from bridges.core.mappings import ColumnParallel
from bridges.models.minimax_m2.minimax_m2_bridge import MiniMaxM2Bridge
from bridges.models.olmoe.modeling_olmoe import OlmoeKNorm, OlmoeQNorm


class _PerHead:
    """The full-projection weight, but the mean square taken per head (Megatron's own q/k norm)."""

    def forward(self, x):  # x: [sq, b, heads_per_rank, head_dim]
        flat = x.float()
        normed = (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return self.weight.view(x.shape[-2], x.shape[-1]) * normed


class _PerHeadQ(_PerHead, OlmoeQNorm):
    pass


class _PerHeadK(_PerHead, OlmoeKNorm):
    pass


class QKNormPerHead(MiniMaxM2Bridge):
    """q/k normalised head by head instead of over the whole projection (weights right)."""

    def customize_layer(self, layer_spec, is_moe):
        spec = super().customize_layer(layer_spec, is_moe)
        attn = spec.submodules.self_attention
        sub = dataclasses.replace(attn.submodules, q_layernorm=_PerHeadQ, k_layernorm=_PerHeadK)
        return dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, self_attention=dataclasses.replace(attn, submodules=sub)))


class _Reversed(ColumnParallel):
    """TP shards of the norm weight handed out in reverse rank order (both directions)."""

    def _split_view(self, full, tp_rank, tp_size, shapes):
        return super()._split_view(full, tp_size - 1 - tp_rank, tp_size, shapes)

    def to_hf(self, shards, shapes):
        return super().to_hf(shards[::-1], shapes)


class QKNormShardsReversed(MiniMaxM2Bridge):
    """The q/k norm weights' TP shards in reverse order: rank 0 normalises with rank 1's slice."""

    def mappings(self, attrs):
        return [_Reversed(m.megatron, m.hf, layers=m.layers) if "_layernorm.weight" in m.megatron
                and "self_attention" in m.megatron else m for m in super().mappings(attrs)]


class PartialRotaryIgnored(MiniMaxM2Bridge):
    """Rotary over the whole head instead of its first ``rotary_dim`` dims."""

    def megatron_attrs(self):
        return {**super().megatron_attrs(), "rotary_percent": 1.0}


class ScoreCorrectionBiasIgnored(MiniMaxM2Bridge):
    """Experts chosen without ``e_score_correction_bias`` (the HF tensor on the ignore list)."""
    ignored_hf = MiniMaxM2Bridge.ignored_hf + (r".*e_score_correction_bias",)

    def megatron_attrs(self):
        return {**super().megatron_attrs(), "moe_router_enable_expert_bias": False}

    def mappings(self, attrs):
        return [m for m in super().mappings(attrs) if not m.megatron.endswith("expert_bias")]
