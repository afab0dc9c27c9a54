"""Qwen3.5's pieces on Megatron-Core, beside what it reuses (Qwen3-Next's gated delta net,
gated attention and norms; Qwen3-VL's tower without deepstack):

- ``SplitGDNInProj``: HF keeps the gated delta net's input projection as four tensors,
  ``in_proj_qkv`` ([q; k; v], each section whole), ``in_proj_z``, ``in_proj_b``, ``in_proj_a``;
  Megatron's in_proj is the sections q, k, v, z, beta, alpha, each split over TP on its own.
- ``PositionedMRoPE``: HybridModel asks its rotary module for angles by sequence length only;
  this one answers with interleaved M-RoPE angles over the partial rotary width, from the
  3-D positions the chunk hands the language model.
- ``Qwen35Model``: Qwen3-VL's chunk (tower, merger, image tokens, M-RoPE positions) around a
  HybridModel language model.
"""
from __future__ import annotations

import torch

from bridges.core.mappings import MappingError
from bridges.models.qwen3_next.modeling_qwen3_next import GDNInProj
from bridges.models.qwen3_vl.modeling_qwen3_vl import InterleavedMRoPE, Qwen3VLModel


class SplitGDNInProj(GDNInProj):
    """``in_proj_qkv`` + ``in_proj_z`` + ``in_proj_b`` + ``in_proj_a`` <-> Megatron's in_proj."""

    kind = "gdn_in_proj_split"

    def _sections(self, hf):
        nk, nv, dk, dv = self.dims
        qkv, z, b, a = hf["qkv"], hf["z"], hf["b"], hf["a"]
        if qkv.shape[0] != 2 * nk * dk + nv * dv or z.shape[0] != nv * dv or b.shape[0] != nv or a.shape[0] != nv:
            raise MappingError(f"{self.hf['qkv']} {tuple(qkv.shape)}, z {tuple(z.shape)}, b {tuple(b.shape)}, "
                               f"a {tuple(a.shape)} do not fit {nk} key heads of {dk}, {nv} value heads of {dv}")
        return [*qkv.split([nk * dk, nk * dk, nv * dv]), z, b, a]

    def to_hf(self, shards, shapes):
        q, k, v, z, b, a = self._unshard(shards)
        return {"qkv": torch.cat([q, k, v]), "z": z, "b": b, "a": a}


class PositionedMRoPE(InterleavedMRoPE):
    """HybridModel's rotary module: ``positions`` ([3, b, s], set before each forward) in,
    interleaved M-RoPE angles [s, b, 1, rotary dim] out; the rotary dim is the head's rotated
    part (Megatron rotates the first ``rotary dim`` channels, as HF does)."""

    def __init__(self, rotary_dim: int, base: float, section):
        super().__init__(rotary_dim, base)
        self.section, self.positions = list(section), None

    def get_rotary_seq_len(self, *args, **kwargs) -> int:
        return 0  # the angles come from ``positions``

    def forward(self, seq_len=None, packed_seq: bool = False, **kwargs):
        if self.positions is None:
            raise RuntimeError("PositionedMRoPE: no positions set (the VLM chunk sets them)")
        return super().forward(self.positions, self.section)


class Qwen35Model(Qwen3VLModel):
    """One pipeline chunk of Qwen3.5: Qwen3-VL's (tower on the first stage, no deepstack) with
    a HybridModel language model, whose rotary module reads the positions the chunk passes."""

    def __init__(self, language_model, provider, vision, image_token_id: int, with_vision: bool):
        super().__init__(language_model, provider, vision, image_token_id, with_vision)
        rotary = int(provider.kv_channels * provider.rotary_percent)
        language_model.rotary_pos_emb = PositionedMRoPE(rotary, provider.rotary_base, provider.mrope_section)
        language_model.register_forward_pre_hook(self._set_positions, with_kwargs=True)

    @staticmethod
    def _set_positions(module, args, kwargs):
        positions = args[1] if len(args) > 1 else kwargs.get("position_ids")
        module.rotary_pos_emb.positions = positions
