"""Deliberately broken Mistral3 / Ministral-3 bridges (tests/test_mistral3.py): each injects one
bug of the kind this family's conversion gets wrong (the HF config and tensors stay right)."""
from __future__ import annotations

import dataclasses

from bridges.core.gpt import local_layer_spec
from bridges.models.ministral3.ministral3_bridge import Ministral3Bridge
from bridges.models.mistral3.mistral3_bridge import Mistral3Bridge
from bridges.models.mistral3.modeling_mistral3 import Mistral3VLModel
from tests.gemma3_vl_mutants import _Transposed

TOWER, PROJ = "vision_tower.", "multi_modal_projector."


class _Language(Mistral3Bridge):
    """A Mistral3 bridge whose language model is ``text`` (a Ministral3Bridge subclass)."""
    text: type = Ministral3Bridge

    def __init__(self, hf_config, checkpoint=None):
        super().__init__(hf_config, checkpoint)
        self.language = self.text(self.language.hf_config, self.language.checkpoint)


class _Unscaled(Ministral3Bridge):
    def layer_spec(self, provider, vp_stage=None):
        return local_layer_spec(provider, vp_stage)


class Llama4ScalingDropped(_Language):
    """The query is not scaled by position (plain Mistral attention)."""
    text = _Unscaled


class _DefaultRope(Ministral3Bridge):
    def rope(self):
        return {**super().rope(), "rope_type": "default"}


class YarnIgnored(_Language):
    """YaRN read as plain rope of the same base (the frequencies not interpolated)."""
    text = _DefaultRope


class ImageTokenOffByOne(Mistral3Bridge):
    """The model looks for the image features at the id after the image token's."""

    def megatron_attrs(self):
        attrs = super().megatron_attrs()
        return {**attrs, "image_token_id": attrs["image_token_id"] + 1}


class _SizesDropped(Mistral3VLModel):
    def forward(self, *args, image_sizes=None, **kwargs):
        return super().forward(*args, **kwargs)


class ImageSizesIgnored(Mistral3Bridge):
    """Every image run through the tower at the batch's padded size (its own size ignored)."""

    def wrap(self, lm, provider, pre_process, post_process, vp_stage):
        return _SizesDropped(lm, self.hf_config, provider.image_token_id, with_vision=pre_process)


class PatchEmbeddingTransposed(Mistral3Bridge):
    """The patch kernel's height and width exchanged (both directions)."""

    def vision_mappings(self, attrs):
        return [_Transposed(m.megatron, m.hf) if m.megatron.endswith("patch_conv.weight") else m
                for m in super().vision_mappings(attrs)]


class VisionLayersSwapped(Mistral3Bridge):
    """The tower's layers 0 and 1 read from (and written to) each other's tensors."""

    def vision_mappings(self, attrs):
        out = []
        for m in super().vision_mappings(attrs):
            if m.layers and m.megatron.startswith(TOWER) and "*" in m.megatron:
                for i in m.layers:
                    out.append(dataclasses.replace(m, megatron=m.megatron.replace("*", str(i)),
                                                   hf=m.hf.replace("*", str({0: 1, 1: 0}.get(i, i))), layers=None))
            else:
                out.append(m)
        return out


class ProjectorNormSwapped(Mistral3Bridge):
    """The projector's norm and the tower's ln_pre weights exchanged (same size)."""

    def vision_mappings(self, attrs):
        table = super().vision_mappings(attrs)
        hf = {m.megatron: m.hf for m in table}
        a, b = PROJ + "norm.weight", TOWER + "ln_pre.weight"
        return [dataclasses.replace(m, hf=hf[b]) if m.megatron == a else
                dataclasses.replace(m, hf=hf[a]) if m.megatron == b else m for m in table]


class TopLevelTieIgnored(Mistral3Bridge):
    """The text config's tie_word_embeddings read, the top level's (which transformers honours) not."""

    def __init__(self, hf_config, checkpoint=None):
        super().__init__(hf_config, checkpoint)
        self.language = self.language_bridge(self.hf_config.text_config)


# -- the FP8 'static' layout ------------------------------------------------------------------
class ScaleInvIgnored(Mistral3Bridge):
    """FP8 codes read as values: the per-tensor weight_scale_inv never applied."""

    def _read(self, ckpt, name):
        return ckpt.get(name).float()


class ActivationScalesDropped(Mistral3Bridge):
    """A quantized export that writes weights and weight scales but not the static input scales."""

    def export_hf_weights(self, *args, quantized=False, **kwargs):
        for name, t in super().export_hf_weights(*args, quantized=quantized, **kwargs):
            if not name.endswith("activation_scale"):
                yield name, t
