"""Ministral-3's attention on Megatron-Core's local modules: Llama-4's attention temperature.

HF scales the rotated query by ``1 + beta * log(1 + floor(pos / period))`` per position (in
float32, cast to the query's dtype). ``PositionScaledAttention`` (the core attention) does the
same to Megatron's query [s, b, heads, dim]; the positions are the model's ``position_ids``,
which ``PositionScaledGPTModel`` hands to its attention modules for the length of a forward.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.dot_product_attention import DotProductAttention


class _Positions:
    """The position ids [b, s] of the forward in progress (None outside one)."""
    ids: torch.Tensor | None = None


def attention_scale(position_ids: torch.Tensor, beta: float, period: int) -> torch.Tensor:
    """[b, s] float32: HF's ``get_llama_4_attn_scale`` before its broadcast."""
    return 1 + beta * torch.log(1 + torch.floor(position_ids / period))


class PositionScaledAttention(DotProductAttention):
    def __init__(self, *args, beta: float, period: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.period = beta, period
        self.positions = _Positions()  # replaced by the model's

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        pos = self.positions.ids
        if pos is None:  # no position ids given: 0 .. s-1, as GPTModel's rotary assumes
            pos = torch.arange(query.shape[0], device=query.device)[None].expand(query.shape[1], -1)
        scale = attention_scale(pos, self.beta, self.period).t()[:, :, None, None]
        return super().forward(query * scale.to(query.dtype), key, value, attention_mask, *args, **kwargs)


class PositionScaledGPTModel(GPTModel):
    """A GPTModel chunk whose position-scaled attentions see its ``position_ids``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._positions = _Positions()
        for m in self.modules():
            if isinstance(m, PositionScaledAttention):
                m.positions = self._positions

    def forward(self, input_ids, position_ids, *args, **kwargs):
        self._positions.ids = position_ids
        try:
            return super().forward(input_ids, position_ids, *args, **kwargs)
        finally:
            self._positions.ids = None


def position_scaled_layer_spec(layer_spec, beta: float, period: int):
    """A TransformerLayer spec whose core attention scales the query by position."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    attn = layer_spec.submodules.self_attention
    core = ModuleSpec(module=PositionScaledAttention, params={"beta": beta, "period": period})
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=core))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        layer_spec.submodules, self_attention=attn))
