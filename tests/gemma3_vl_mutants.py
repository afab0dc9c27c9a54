"""Deliberately broken Gemma3 VLM bridges (tests/test_gemma3_vl.py): each injects one bug of the
kind a VLM conversion gets wrong (the HF config and tensors stay right)."""
from __future__ import annotations

import dataclasses

from bridges.core.mappings import Replicated
from bridges.models.gemma3_vl.gemma3_vl_bridge import Gemma3VLBridge
from bridges.models.gemma3_vl.modeling_gemma3_vl import Gemma3VLModel

TOWER, PROJ = "vision_tower.", "multi_modal_projector."


class _NoImageMask(Gemma3VLModel):
    def forward(self, *args, token_type_ids=None, **kwargs):
        return super().forward(*args, **kwargs)


class ImageMaskDropped(Gemma3VLBridge):
    """The image tokens attend causally only (the bidirectional block of each image lost)."""

    def wrap(self, lm, provider, pre_process, post_process, vp_stage):
        return _NoImageMask(lm, self.hf_config, provider.image_token_id, with_vision=pre_process)


class ImageTokenOffByOne(Gemma3VLBridge):
    """The model looks for the image features at the id after the image token's."""

    def megatron_attrs(self):
        attrs = super().megatron_attrs()
        return {**attrs, "image_token_id": attrs["image_token_id"] + 1}


class _Transposed(Replicated):
    """The patch kernel's height and width exchanged (both directions)."""

    def _merge(self, hf, shapes):
        return hf[""].transpose(-1, -2).contiguous()

    def _unmerge(self, full, shapes):
        return {"": full.transpose(-1, -2).contiguous()}


class PatchEmbeddingTransposed(Gemma3VLBridge):
    def vision_mappings(self, attrs):
        return [_Transposed(m.megatron, m.hf) if m.megatron.endswith("patch_embedding.weight") else m
                for m in super().vision_mappings(attrs)]


class VisionLayersSwapped(Gemma3VLBridge):
    """The tower's layers 0 and 1 read from (and written to) each other's tensors."""

    def vision_mappings(self, attrs):
        out = []
        for m in super().vision_mappings(attrs):
            if m.layers and m.megatron.startswith(TOWER) and "*" in m.megatron:
                for i in m.layers:
                    j = {0: 1, 1: 0}.get(i, i)
                    out.append(dataclasses.replace(m, megatron=m.megatron.replace("*", str(i)),
                                                   hf=m.hf.replace("*", str(j)), layers=None))
            else:
                out.append(m)
        return out


class ProjectorNormSwapped(Gemma3VLBridge):
    """The projector's norm and the tower's final norm weights exchanged (same size)."""

    def vision_mappings(self, attrs):
        table = super().vision_mappings(attrs)
        hf = {m.megatron: m.hf for m in table}
        a, b = PROJ + "mm_soft_emb_norm.weight", next(n for n in hf if n.endswith("post_layernorm.weight"))
        return [dataclasses.replace(m, hf=hf[b]) if m.megatron == a else
                dataclasses.replace(m, hf=hf[a]) if m.megatron == b else m for m in table]


class TopLevelTieIgnored(Gemma3VLBridge):
    """The text config's tie_word_embeddings read, the top level's (which transformers honours) not."""

    def __init__(self, hf_config, checkpoint=None):
        super().__init__(hf_config, checkpoint)
        self.language = self.language_bridge(self.hf_config.text_config)
