"""Deliberately broken Qwen3.5 bridges (tests/test_qwen3_5.py): each injects one bug of the kind
its conversion gets wrong (the HF config and tensors stay right)."""
from __future__ import annotations

import torch

from bridges.core.hybrid import split_pattern
from bridges.models.qwen3_5.modeling_qwen3_5 import SplitGDNInProj
from bridges.models.qwen3_5.qwen3_5_bridge import Qwen35Bridge, Qwen35TextBridge
from bridges.models.qwen3_5_moe.qwen3_5_moe_bridge import Qwen35MoeBridge, Qwen35MoeTextBridge
from tests.qwen3_vl_mutants import _GridTransposed


def _with_in_proj(bridge_cls, mapping_cls):
    """``bridge_cls`` whose language table reads the GDN input projection with ``mapping_cls``."""

    class Text(bridge_cls.language_bridge):
        def mappings(self, attrs):
            return [mapping_cls(m.megatron, m.hf, dims=m.dims, layers=m.layers, layer_stride=m.layer_stride)
                    if isinstance(m, SplitGDNInProj) else m for m in super().mappings(attrs)]

    return type(bridge_cls.__name__, (bridge_cls,), {"language_bridge": Text})


class _Swapped(SplitGDNInProj):
    """Two equal-sized sections of in_proj exchanged, both ways (the roundtrip holds)."""

    pair = (0, 1)

    def _sections(self, hf):
        secs = super()._sections(hf)
        i, j = self.pair
        secs[i], secs[j] = secs[j], secs[i]
        return secs

    def _unshard(self, shards):
        secs = super()._unshard(shards)
        i, j = self.pair
        secs[i], secs[j] = secs[j], secs[i]
        return secs


class _QK(_Swapped):
    pair = (0, 1)


class _VZ(_Swapped):
    pair = (2, 3)


# The gated delta net's query and key read in each other's place.
GDNQKSwapped = _with_in_proj(Qwen35Bridge, _QK)
# in_proj_qkv's value rows and in_proj_z exchanged (the qkv / z split read wrong).
GDNValueGateSwapped = _with_in_proj(Qwen35Bridge, _VZ)


class _LateAttention(Qwen35TextBridge):
    def megatron_attrs(self):
        a = super().megatron_attrs()
        p = a["hybrid_layer_pattern"]
        main = split_pattern(p)[0]
        return {**a, "hybrid_layer_pattern": main[-2:] + main[:-2] + p[len(main):]}


class AttentionIntervalOffByOne(Qwen35Bridge):
    """Full attention one layer late (the interval counted from 2)."""

    language_bridge = _LateAttention


class MRopeNotInterleaved(Qwen35Bridge):
    """The t / h / w rotary pairs in contiguous sections, not interleaved."""

    def wrap(self, lm, provider, pre_process, post_process, vp_stage):
        chunk = super().wrap(lm, provider, pre_process, post_process, vp_stage)
        rotary = chunk.language_model.rotary_pos_emb

        def forward(seq_len=None, packed_seq=False, **kw):
            freqs = rotary.positions.float()[..., None] * rotary.inv_freq.to(rotary.positions.device)
            out = torch.cat([part[i] for i, part in enumerate(freqs.split(list(rotary.section), -1))], -1)
            return torch.cat([out, out], -1).transpose(0, 1)[:, :, None, :].contiguous()
        rotary.forward = forward
        return chunk


class PositionGridTransposed(Qwen35Bridge):
    """The tower's learned position grid read with rows and columns exchanged."""

    def vision_mappings(self, attrs):
        return [_GridTransposed(m.megatron, m.hf) if m.megatron.endswith("pos_embed.weight") else m
                for m in super().vision_mappings(attrs)]


class _NotRenormalised(Qwen35MoeTextBridge):
    def megatron_attrs(self):
        return {**super().megatron_attrs(), "moe_router_pre_softmax": True}


class TopKNotRenormalised(Qwen35MoeBridge):
    """Qwen3.5-MoE's router: softmax over all experts, the top-k kept as they are (HF renormalises)."""

    language_bridge = _NotRenormalised


class _MTPReadsLastLayer(Qwen35TextBridge):
    """The MTP depth's layer and the last decoder layer (both full attention, dense MLP) read
    from each other's tensors."""

    def mappings(self, attrs):
        from tests.qwen3_next_mutants import _renamed

        last = f"model.language_model.layers.{attrs['num_layers'] // 2 - 1}."  # names after the VLM's prefix
        swap = lambda n: n.replace(last, "mtp.layers.0.") if n.startswith(last) else \
            n.replace("mtp.layers.0.", last) if n.startswith("mtp.layers.0.") else n  # noqa: E731
        return [_renamed(m, swap) for m in super().mappings(attrs)]


class MTPReadsLastLayer(Qwen35Bridge):
    """Qwen3.5's MTP block, under the VLM's prefixes, read in the last decoder layer's place."""

    language_bridge = _MTPReadsLastLayer
