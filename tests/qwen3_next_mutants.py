"""Deliberately broken Qwen3-Next bridges (tests/test_qwen3_next.py): each injects one bug of the
kind hybrid conversions get wrong (the HF config and tensors stay right)."""
from __future__ import annotations

import copy

import torch

from bridges.core.hybrid import split_pattern
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
        main = split_pattern(p)[0]
        return {**a, "hybrid_layer_pattern": main[2:] + main[:2] + p[len(main):]}


# -- the multi-token-prediction block ------------------------------------------------------------
def _renamed(m, rename):
    """``m`` with every HF name it yields passed through ``rename`` (import and export alike)."""
    class Renamed(type(m)):
        def hf_names(self, captures):
            return {r: rename(n) for r, n in super().hf_names(captures).items()}

    out = copy.copy(m)
    object.__setattr__(out, "__class__", Renamed)
    return out


class MTPReadsLastLayer(Qwen3NextBridge):
    """The MTP depth's layer read from the last decoder layer (HF layer N-1, full attention and
    MoE as the MTP layer is) and that layer from the MTP's: every tensor still used once."""

    def mappings(self, attrs):
        last = f"model.layers.{attrs['num_layers'] // 2 - 1}."
        swap = lambda n: n.replace(last, "mtp.layers.0.") if n.startswith(last) else \
            n.replace("mtp.layers.0.", last) if n.startswith("mtp.layers.0.") else n  # noqa: E731
        return [_renamed(m, swap) for m in super().mappings(attrs)]


class MTPNormsSwapped(Qwen3NextBridge):
    """The MTP's embedding and hidden-state norms read in each other's place."""

    def mappings(self, attrs):
        names = {"mtp.pre_fc_norm_embedding.weight": "mtp.pre_fc_norm_hidden.weight",
                 "mtp.pre_fc_norm_hidden.weight": "mtp.pre_fc_norm_embedding.weight"}
        return [_renamed(m, lambda n: names.get(n, n)) for m in super().mappings(attrs)]


class _HalvesSwapped:
    """A [out, 2 x h] projection read as [second half | first half] of its inputs (and written
    back so)."""

    def _merge(self, hf, shapes):
        return torch.cat(super()._merge(hf, shapes).chunk(2, dim=1)[::-1], dim=1)

    def _unmerge(self, full, shapes):
        return super()._unmerge(torch.cat(full.chunk(2, dim=1)[::-1], dim=1), shapes)


class MTPProjectionInputsSwapped(Qwen3NextBridge):
    """mtp.fc's input halves exchanged: the hidden state first, then the embedding (the other
    concatenation order)."""

    def mappings(self, attrs):
        out = []
        for m in super().mappings(attrs):
            if m.megatron.endswith("eh_proj.weight"):
                m = copy.copy(m)
                object.__setattr__(m, "__class__", type("Swapped", (_HalvesSwapped, type(m)), {}))
            out.append(m)
        return out
