"""Deliberately broken Granite bridges (tests/test_granite.py): each injects one bug of the kind a
Granite conversion gets wrong, on the Megatron side (the HF config and tensors stay right)."""
from __future__ import annotations

import copy

import torch

from bridges.core.mappings import GatedMLP, StackedGatedMLP
from bridges.models.granite.granite_bridge import GraniteBridge, GraniteMoeBridge


class ResidualMultiplierDropped(GraniteMoeBridge):
    """The layers add the attention and MLP outputs unscaled (Llama's residual)."""

    def residual_multiplier(self, provider):
        return 1.0


class DenseResidualMultiplierDropped(GraniteBridge):
    def residual_multiplier(self, provider):
        return 1.0


class EmbeddingMultiplierDropped(GraniteMoeBridge):
    def megatron_attrs(self):
        return {**super().megatron_attrs(), "mup_embedding_mult": 1.0}


class LogitsScalingMultiplied(GraniteMoeBridge):
    """logits * s instead of logits / s."""

    def output_mult(self, logits_scaling):
        return logits_scaling


class AttentionMultiplierIgnored(GraniteMoeBridge):
    """The softmax scale left at Megatron's 1 / sqrt(head_dim)."""

    def megatron_attrs(self):
        attrs = super().megatron_attrs()
        return {**attrs, "softmax_scale": attrs["kv_channels"] ** -0.5}


class _UpFirst(StackedGatedMLP):
    """input_linear read as [up; gate] (and written back so: the roundtrip stays bit-exact)."""

    def _gate_up(self, hf):
        gate, up = super()._gate_up(hf)
        return up, gate

    def to_hf(self, shards, shapes):
        out = GatedMLP.to_hf(self, shards, shapes)
        return {"gate_up": torch.cat([out["up"], out["gate"]])}


class GateUpSwapped(GraniteMoeBridge):
    def expert_mappings(self, moe):
        out = []
        for m in super().expert_mappings(moe):
            if type(m) is StackedGatedMLP:
                m = copy.copy(m)
                object.__setattr__(m, "__class__", _UpFirst)
            out.append(m)
        return out
