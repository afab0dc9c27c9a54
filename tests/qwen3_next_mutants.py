"""Deliberately broken Qwen3-Next bridges (tests/test_qwen3_next.py): each injects one bug of the
kind hybrid conversions get wrong (the HF config and tensors stay right)."""
from __future__ import annotations

import torch

from bridges.models.qwen3_next.modeling_qwen3_next import GatedQKV, GDNInProj
from bridges.models.qwen3_next.qwen3_next_bridge import Qwen3NextBridge


class _KQSwapped(GDNInProj):
    """q and k sections exchanged, both ways (the roundtrip holds)."""

    def _sections(self, hf):
        q, k, *rest = super()._sections(hf)
        return [k, q, *rest]

    def to_hf(self, shards, shapes):
        nk, nv, dk, dv = self.dims
        tp = len(shards)
        n = nk * dk // tp
        swapped = [torch.cat([s[n:2 * n], s[:n], s[2 * n:]]) for s in shards]
        return super().to_hf(swapped, shapes)


class GDNQKSwapped(Qwen3NextBridge):
    """The gated delta net's query and key sections read in each other's place."""

    def mappings(self, attrs):
        return [_KQSwapped(m.megatron, m.hf, dims=m.dims, layers=m.layers, layer_stride=m.layer_stride)
                if isinstance(m, GDNInProj) else m for m in super().mappings(attrs)]


class _GateFirst(GatedQKV):
    """q_proj read as [gate, query] per head (and written back so)."""

    def _merge(self, hf, shapes):
        n, d = shapes.num_attention_heads, shapes.kv_channels
        qg = hf["q"].view(n, 2, d, -1).flip(1).reshape(hf["q"].shape)
        return super()._merge({**hf, "q": qg}, shapes)

    def _unmerge(self, full, shapes):
        out = super()._unmerge(full, shapes)
        n, d = shapes.num_attention_heads, shapes.kv_channels
        return {**out, "q": out["q"].view(n, 2, d, -1).flip(1).reshape(out["q"].shape)}


class OutputGateHalvesSwapped(Qwen3NextBridge):
    """The attention's query and output gate exchanged."""

    def mappings(self, attrs):
        return [_GateFirst(m.megatron, m.hf, layers=m.layers, layer_stride=m.layer_stride)
                if isinstance(m, GatedQKV) else m for m in super().mappings(attrs)]


class AttentionIntervalOffByOne(Qwen3NextBridge):
    """Full attention one layer early (every interval-th layer counted from 0)."""

    def megatron_attrs(self):
        a = super().megatron_attrs()
        p = a["hybrid_layer_pattern"]
        return {**a, "hybrid_layer_pattern": p[2:] + p[:2]}
