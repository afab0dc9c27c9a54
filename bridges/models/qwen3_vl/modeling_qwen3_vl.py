"""Qwen3-VL on Megatron-Core: the Megatron vision encoder pattern, Qwen2.5-VL's pieces
(``bridges/models/qwen2_5_vl/modeling_qwen2_5_vl.py``) with what Qwen3-VL changes:

- the tower: a patch embedding with a bias, plus a learned position table (a square grid,
  resampled bilinearly to each image's grid, corners aligned); LayerNorm blocks with a plain
  GELU-tanh MLP; full attention in every layer (no windows); the merger's norm a LayerNorm;
- deepstack: the outputs of the tower's ``deepstack_visual_indexes`` layers go through their
  own mergers (normed over each whole 2x2 block) and are added to the image tokens' hidden
  states after the language model's first layers (one layer per deepstack index);
- interleaved M-RoPE: the rotary pairs of a head cycle t, h, w, t, h, w, ... (h and w over the
  first 3 x ``mrope_section`` pairs, t over the rest), not in three contiguous sections.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule

from bridges.core.config import ConfigError
from bridges.core.vlm import VLMChunk
from bridges.models.qwen2_5_vl.modeling_qwen2_5_vl import (PatchEmbed, PatchMerger, axial_angles, axial_inv_freq,
                                                           frames, mrope_positions, patch_positions,
                                                           vision_configs, vision_layer_spec)
from bridges.models.qwen3_vl.qwen3_vl_bridge import deepstack_indexes


def learned_positions(table: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[patches, hidden]: the square position ``table`` ([side², hidden]) resampled bilinearly
    (corners aligned) to each image's grid, in the processor's patch order, every frame alike."""
    side = int(round(table.shape[0] ** 0.5))
    square = table.float().reshape(side, side, -1).permute(2, 0, 1)[None]
    out = []
    for t, h, w in grid_thw.tolist():
        g = torch.nn.functional.interpolate(square, size=(h, w), mode="bilinear", align_corners=True)[0]
        g = g.permute(1, 2, 0).reshape(h // merge, merge, w // merge, merge, -1).transpose(1, 2)
        out.append(g.reshape(h * w, -1).repeat(t, 1))
    return torch.cat(out)


class ShardedModuleList(torch.nn.ModuleList):
    """A ModuleList whose modules keep their own distributed-checkpoint layout (a plain one is
    saved whole per rank: a TP-sharded merger's half would pass for the whole tensor)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        from megatron.core.transformer.utils import sharded_state_dict_default

        out = {}
        for i, module in enumerate(self):
            out.update(sharded_state_dict_default(module, f"{prefix}{i}.", sharded_offsets, metadata))
        return out


class InterleavedMRoPE(torch.nn.Module):
    """Megatron-Core's M-RoPE module interface (position ids [3, b, s] and sections in, angles
    [s, b, 1, head dim] out) with Qwen3-VL's interleaved layout of the three axes."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim),
                             persistent=False)

    def forward(self, position_ids: torch.Tensor, mrope_section, cp_group=None) -> torch.Tensor:
        freqs = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device)  # [3, b, s, d/2]
        out = freqs[0].clone()
        for axis in (1, 2):
            idx = slice(axis, 3 * mrope_section[axis], 3)
            out[..., idx] = freqs[axis][..., idx]
        return torch.cat([out, out], -1).transpose(0, 1)[:, :, None, :].contiguous()


class VisionEncoder(MegatronModule):
    """Pixels and grids -> (one language-model vector per merged 2x2 block, and the deepstack
    features: one such tensor per ``deepstack_visual_indexes`` layer), in the processor's order."""

    def __init__(self, provider, vision):
        from megatron.core.transformer.transformer_block import TransformerBlock

        layers, merger = vision_configs(provider, vision, normalization="LayerNorm", gated=False)
        super().__init__(config=layers)
        self.merge = vision.spatial_merge_size
        self.deepstack = deepstack_indexes(vision)
        units = self.merge ** 2
        self.patch_embed = PatchEmbed(vision, bias=True)
        self.pos_embed = torch.nn.Embedding(vision.num_position_embeddings, vision.hidden_size)
        self.decoder = TransformerBlock(config=layers, spec=vision_layer_spec("LayerNorm"), post_layer_norm=False)
        self.merger = PatchMerger(merger, vision.hidden_size, units)
        self.deepstack_merger_list = ShardedModuleList(
            [PatchMerger(merger, vision.hidden_size, units, postshuffle=True) for _ in self.deepstack])
        self.register_buffer("inv_freq", axial_inv_freq(layers.kv_channels, vision), persistent=False)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        dev, grid = pixel_values.device, grid_thw.cpu()
        x = self.patch_embed(pixel_values)
        if x.shape[0] != int(grid.prod(-1).sum()):
            raise ValueError(f"pixel_values has {x.shape[0]} patches; image_grid_thw {grid.tolist()} "
                             f"says {int(grid.prod(-1).sum())}")
        x = x + learned_positions(self.pos_embed.weight, grid, self.merge).to(x.dtype)
        rope = axial_angles(patch_positions(grid, self.merge).to(dev), self.inv_freq)[:, None, None, :]
        frame = frames(grid).to(dev)
        mask = (frame[:, None] != frame[None, :])[None, None]
        h, deep = x.unsqueeze(1), []
        for i, layer in enumerate(self.decoder.layers):
            out = layer(hidden_states=h, attention_mask=mask, rotary_pos_emb=rope)
            h = out[0] if isinstance(out, tuple) else out
            if i in self.deepstack:
                deep.append(self.deepstack_merger_list[self.deepstack.index(i)](h.squeeze(1)))
        return self.merger(h.squeeze(1)), deep


class Qwen3VLModel(VLMChunk):
    """One pipeline chunk of Qwen3-VL: ``vision_model`` (first stage), ``language_model`` (a
    GPTModel chunk whose rotary is ``InterleavedMRoPE``); the deepstack features are added after
    the language model's first layers, which must therefore be in the first chunk."""

    def __init__(self, language_model, provider, vision, image_token_id: int, with_vision: bool):
        super().__init__(language_model, image_token_id)
        self.merge = vision.spatial_merge_size
        self.vision_model = VisionEncoder(provider, vision) if with_vision else None
        if getattr(language_model, "rotary_pos_emb", None) is not None:
            language_model.rotary_pos_emb = InterleavedMRoPE(provider.kv_channels, provider.rotary_base)
        n = len(deepstack_indexes(vision))
        self._deep = None
        for layer in language_model.decoder.layers:
            i = layer.layer_number - 1
            if i < n and not with_vision:
                raise ConfigError(f"layout: language layer {i} takes deepstack features "
                                  f"(vision_config.deepstack_visual_indexes has {n}) but is not in the "
                                  f"first pipeline chunk, where the vision tower runs")
            if i < n:
                layer.register_forward_hook(self._deepstack_hook(i))

    def _deepstack_hook(self, i: int):
        def hook(_module, _inputs, out):
            if self._deep is None:
                return out
            mask, feats = self._deep
            h = (out[0] if isinstance(out, tuple) else out).clone()
            rows = h.transpose(0, 1)  # a view: [b, s, hidden]
            rows[mask] = rows[mask] + feats[i].to(h.dtype)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook

    def forward(self, input_ids, position_ids, attention_mask=None, pixel_values=None,
                image_grid_thw=None, mm_token_type_ids=None, **kwargs):
        positions = mrope_positions(input_ids, self.image_token_id, image_grid_thw, self.merge)
        decoder_input, feats = None, None
        if self.pre_process:
            if pixel_values is not None:
                feats, deep = self.vision_model(pixel_values, image_grid_thw)
                self._deep = (input_ids == self.image_token_id, deep)
            decoder_input = self.embed(input_ids, None, feats)
        try:
            return self.language_model(input_ids, positions, attention_mask,
                                       decoder_input=decoder_input, **kwargs)
        finally:
            self._deep = None
