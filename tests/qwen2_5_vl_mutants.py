"""Deliberately broken Qwen2.5-VL bridges (tests/test_qwen2_5_vl.py): each injects one bug of
the kind a Megatron-vision-encoder conversion gets wrong (the HF config and tensors stay right)."""
from __future__ import annotations

import dataclasses

from bridges.core.mappings import ColumnParallel, Replicated
from bridges.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen25VLModel, patch_positions
from bridges.models.qwen2_5_vl.qwen2_5_vl_bridge import Qwen25VLBridge, Qwen25VLLanguageBridge
from tests.gemma3_vl_mutants import _Transposed

V = "vision_model."


class VisionQKVPerHead(Qwen25VLBridge):
    """HF's vision qkv ([q; k; v] over all heads) loaded as if already interleaved per head."""

    def vision_mappings(self, attrs):
        return [ColumnParallel(m.megatron, m.hf["qkv"], m.layers) if "linear_qkv" in m.megatron else m
                for m in super().vision_mappings(attrs)]


class PatchEmbeddingTransposed(Qwen25VLBridge):
    """The patch kernel's height and width exchanged (both directions)."""

    def vision_mappings(self, attrs):
        return [_Transposed(m.megatron, m.hf) if m.megatron.endswith("patch_embed.proj.weight") else m
                for m in super().vision_mappings(attrs)]


class _SectionsReversed(Qwen25VLLanguageBridge):
    def megatron_attrs(self):
        attrs = super().megatron_attrs()
        return {**attrs, "mrope_section": attrs["mrope_section"][::-1]}


class MRopeSectionsSwapped(Qwen25VLBridge):
    """The t / h / w rotary sections read in the wrong order."""

    language_bridge = _SectionsReversed


class ImageTokenOffByOne(Qwen25VLBridge):
    """The model looks for the image features at the id after the image token's."""

    def megatron_attrs(self):
        attrs = super().megatron_attrs()
        return {**attrs, "image_token_id": attrs["image_token_id"] + 1}


class MergerLayersSwapped(Qwen25VLBridge):
    """The merger's two linear layers (same shape in the toy) read from each other's tensors."""

    def vision_mappings(self, attrs):
        def swap(name):
            return name.replace("mlp.0.", "mlp.@.").replace("mlp.2.", "mlp.0.").replace("mlp.@.", "mlp.2.")
        # the biases change their TP kind with the swap: both kept whole (the toy runs at TP1)
        return [Replicated(m.megatron, swap(m.hf)) if ".merger.mlp." in m.megatron else m
                for m in super().vision_mappings(attrs)]


class VisionLayersSwapped(Qwen25VLBridge):
    """The tower's layers 0 and 1 read from (and written to) each other's tensors."""

    def vision_mappings(self, attrs):
        out = []
        for m in super().vision_mappings(attrs):
            if not (m.megatron.startswith(V) and "*" in m.megatron):
                out.append(m)
                continue
            for i in m.layers:
                j = str({0: 1, 1: 0}.get(i, i))
                hf = {r: n.replace("*", j) for r, n in m.hf.items()} if isinstance(m.hf, dict) else m.hf.replace("*", j)
                out.append(dataclasses.replace(m, megatron=m.megatron.replace("*", str(i)), hf=hf, layers=None))
        return out


class FullAttentionLayersOffByOne(Qwen25VLBridge):
    """``fullatt_block_indexes`` read one layer late: a windowed layer attends to the whole image."""

    def wrap(self, lm, provider, pre_process, post_process, vp_stage):
        chunk = super().wrap(lm, provider, pre_process, post_process, vp_stage)
        if chunk.vision_model is not None:
            chunk.vision_model.full = frozenset(i + 1 for i in chunk.vision_model.full)
        return chunk


class _RowsColumnsSwapped(Qwen25VLModel):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.vision_model is not None:
            merge = self.merge
            self.vision_model.positions = lambda grid: patch_positions(grid, merge)[:, [1, 0]]


class VisionRotaryAxesSwapped(Qwen25VLBridge):
    """The 2-D rotary turns the first half of each head with the column, the second with the row."""

    def wrap(self, lm, provider, pre_process, post_process, vp_stage):
        return _RowsColumnsSwapped(lm, provider, self.vision(), provider.image_token_id, with_vision=pre_process)


class TopLevelTieIgnored(Qwen25VLBridge):
    """The text config's tie_word_embeddings read, the top level's (which transformers honours) not."""

    def __init__(self, hf_config, checkpoint=None):
        super().__init__(hf_config, checkpoint)
        self.language = self.language_bridge(self.hf_config.text_config)
