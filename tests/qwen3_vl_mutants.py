"""Deliberately broken Qwen3-VL bridges (tests/test_qwen3_vl.py): each injects one bug in what
Qwen3-VL adds to Qwen2.5-VL's pattern (the HF config and tensors stay right)."""
from __future__ import annotations

import dataclasses

import torch

from bridges.core.mappings import Replicated
from bridges.models.qwen3_vl.modeling_qwen3_vl import InterleavedMRoPE
from bridges.models.qwen3_vl.qwen3_vl_bridge import Qwen3VLBridge


def _deepstack_layers(chunk):
    return [layer for layer in chunk.language_model.decoder.layers if layer._forward_hooks]


class DeepstackDropped(Qwen3VLBridge):
    """The deepstack features never reach the language model."""

    def wrap(self, lm, provider, pre_process, post_process, vp_stage):
        chunk = super().wrap(lm, provider, pre_process, post_process, vp_stage)
        for layer in _deepstack_layers(chunk):
            layer._forward_hooks.clear()
        return chunk


class DeepstackOneLayerLate(Qwen3VLBridge):
    """Deepstack feature k added after language layer k + 1 instead of k."""

    def wrap(self, lm, provider, pre_process, post_process, vp_stage):
        chunk = super().wrap(lm, provider, pre_process, post_process, vp_stage)
        layers = chunk.language_model.decoder.layers
        for layer in _deepstack_layers(chunk):
            layer._forward_hooks.clear()
        n = len(self.vision().deepstack_visual_indexes)
        for layer in layers:
            i = layer.layer_number - 1
            if 1 <= i <= n and pre_process:
                layer.register_forward_hook(chunk._deepstack_hook(i - 1))
        return chunk


class _Sections(InterleavedMRoPE):
    """M-RoPE in three contiguous sections (Megatron-Core's and Qwen2.5-VL's layout)."""

    def forward(self, position_ids, mrope_section, cp_group=None):
        freqs = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device)
        out = torch.cat([part[i] for i, part in enumerate(freqs.split(list(mrope_section), -1))], -1)
        return torch.cat([out, out], -1).transpose(0, 1)[:, :, None, :].contiguous()


class MRopeNotInterleaved(Qwen3VLBridge):
    """The t / h / w rotary pairs in contiguous sections, not interleaved."""

    def wrap(self, lm, provider, pre_process, post_process, vp_stage):
        chunk = super().wrap(lm, provider, pre_process, post_process, vp_stage)
        chunk.language_model.rotary_pos_emb = _Sections(provider.kv_channels, provider.rotary_base)
        return chunk


class _GridTransposed(Replicated):
    """The square position table with its rows and columns exchanged (both directions)."""

    @staticmethod
    def _t(x):
        side = int(round(x.shape[0] ** 0.5))
        return x.reshape(side, side, -1).transpose(0, 1).reshape(x.shape).contiguous()

    def _merge(self, hf, shapes):
        return self._t(hf[""])

    def _unmerge(self, full, shapes):
        return {"": self._t(full)}


class PositionGridTransposed(Qwen3VLBridge):
    """The tower's learned position grid read with rows and columns exchanged."""

    def vision_mappings(self, attrs):
        return [_GridTransposed(m.megatron, m.hf) if m.megatron.endswith("pos_embed.weight") else m
                for m in super().vision_mappings(attrs)]


class DeepstackMergersSwapped(Qwen3VLBridge):
    """The first two deepstack mergers read from (and written to) each other's tensors."""

    def vision_mappings(self, attrs):
        out = []
        for m in super().vision_mappings(attrs):
            if "deepstack_merger_list.*" not in m.megatron:
                out.append(m)
                continue
            for k in m.layers:
                j = str({0: 1, 1: 0}.get(k, k))
                out.append(dataclasses.replace(m, megatron=m.megatron.replace("*", str(k)),
                                               hf=m.hf.replace("*", j), layers=None))
        return out
