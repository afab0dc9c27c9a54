"""Gemma3's attention on Megatron-Core's local modules: sliding-window layers rotate with their
own rope base (``rope_parameters["sliding_attention"]``, 10 000) while global layers use the
model's (``full_attention``: 1 000 000, linearly scaled on the 4B+ models).

GPTModel computes one rotary table for every layer; ``LocalRopeSelfAttention`` replaces it, on
the layers Megatron windows (``window_attn_skip_freq``, by global layer number), with a table
of the local base of the same length. Everything else (QK norms, soft-caps, sandwich norms) is
Gemma2's and Gemma's.
"""
from __future__ import annotations

from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.utils import is_layer_window_attention


class LocalRopeSelfAttention(SelfAttention):
    def __init__(self, config, submodules, layer_number: int, *args, local_rotary_base: float,
                 **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.local_rope = None
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, self.layer_number):
            self.local_rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                              rotary_base=local_rotary_base,
                                              use_cpu_initialization=config.use_cpu_initialization)

    def forward(self, *args, rotary_pos_emb=None, **kwargs):
        if self.local_rope is not None and rotary_pos_emb is not None:
            full = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            rotary_pos_emb = self.local_rope(full.size(0))
        return super().forward(*args, rotary_pos_emb=rotary_pos_emb, **kwargs)


def local_rope_layer_spec(layer_spec, local_rotary_base: float):
    """A TransformerLayer spec whose self-attention rotates windowed layers with the local base."""
    import dataclasses

    attn = layer_spec.submodules.self_attention
    attn = dataclasses.replace(attn, module=LocalRopeSelfAttention,
                               params={**attn.params, "local_rotary_base": local_rotary_base})
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        layer_spec.submodules, self_attention=attn))
