"""Gemma3 with images (``gemma3``: google/gemma-3-4b-it and up): the HF vision encoder
pattern. The SigLIP tower and the projector (average pooling to ``mm_tokens_per_image``
tokens, a zero-centred RMSNorm, one projection matrix) stay transformers' modules, replicated
over TP on the first pipeline stage; the language model is Gemma3's (``gemma3_text``) under
``language_model.``, with the image mask Gemma3 uses: the tokens of one image attend to each
other both ways (``token_type_ids``). Megatron side: ``modeling_gemma3_vl.py``.
"""
from __future__ import annotations

import functools
import json
from types import SimpleNamespace
from typing import Any

import torch

from bridges.core.config import Field
from bridges.flops import FlopsError, vision_flops
from bridges.core.mappings import Mapping
from bridges.core.provider import ModelProvider
from bridges.core.registry import register_bridge
from bridges.core.vlm import LLAVA_LEGACY, LLAVA_PARTS, VLMBridge, hf_module_mappings
from bridges.models.gemma3.gemma3_bridge import Gemma3TextBridge


class Gemma3LanguageBridge(Gemma3TextBridge):
    """Gemma3's text model inside the VLM: its layers honour the image mask."""

    def decoder_layer(self, provider: ModelProvider, vp_stage: int | None = None):
        from bridges.models.gemma3_vl.modeling_gemma3_vl import block_mask_layer_spec

        return block_mask_layer_spec(super().decoder_layer(provider, vp_stage))


@functools.lru_cache(maxsize=8)
def _meta_modules(vision_json: str, text_hidden: int, tokens: int):
    """The HF tower and projector for a vision config, on the meta device (names only)."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    vision = json.loads(vision_json)
    vision = AutoConfig.for_model(vision.pop("model_type", "siglip_vision_model"), **vision)
    # what the projector reads of the whole config
    cfg = SimpleNamespace(vision_config=vision, text_config=SimpleNamespace(hidden_size=text_hidden),
                          mm_tokens_per_image=tokens)
    with torch.device("meta"):
        return AutoModel.from_config(vision), Gemma3MultiModalProjector(cfg)


@register_bridge(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"])
class Gemma3VLBridge(VLMBridge):
    language_bridge = Gemma3LanguageBridge
    LEGACY = LLAVA_LEGACY
    tower_level = ("model.vision_tower.", "vision_model.")  # the published files have it
    vision_parts = LLAVA_PARTS
    vlm_fields = (Field("image_token_index", "image_token_id"),
                  Field("boi_token_index", "boi_token_id", None),
                  Field("eoi_token_index", "eoi_token_id", None),
                  Field("mm_tokens_per_image", "mm_tokens_per_image"))

    def vision_mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        tower, projector = _meta_modules(json.dumps(attrs["vision_config"], sort_keys=True),
                                         attrs["hidden_size"], attrs["mm_tokens_per_image"])
        return (hf_module_mappings(tower, "vision_tower.", "model.vision_tower.", strip="vision_model.")
                + hf_module_mappings(projector, "multi_modal_projector.", "model.multi_modal_projector."))

    def wrap(self, language_model, provider: ModelProvider, pre_process: bool, post_process: bool,
             vp_stage: int | None):
        from bridges.models.gemma3_vl.modeling_gemma3_vl import Gemma3VLModel

        return Gemma3VLModel(language_model, self.hf_config, provider.image_token_id, with_vision=pre_process)

    # -- conformance hooks ----------------------------------------------------------------
    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """A small SigLIP tower (2 layers, 16 patches of 4x4 pooled to 4 image tokens) and the
        image / boundary token ids moved into the toy's vocabulary."""
        vocab = config["text_config"]["vocab_size"]
        config["vision_config"] = {**config.get("vision_config", {}), "hidden_size": 32,
                                   "intermediate_size": 48, "num_hidden_layers": 2,
                                   "num_attention_heads": 2, "image_size": 16, "patch_size": 4}
        config.update(mm_tokens_per_image=4, boi_token_index=vocab - 5, eoi_token_index=vocab - 4,
                      image_token_index=vocab - 3)
        return config

    @classmethod
    def image_inputs(cls, config: dict[str, Any], ids: torch.Tensor, seed: int = 0) -> dict[str, Any]:
        """One image per sequence, a quarter of the way in: <boi>, the image tokens, <eoi>."""
        special = [config["boi_token_index"], config["eoi_token_index"], config["image_token_index"]]
        ids = ids.clone()
        for s in special:  # no stray special token in the text
            ids[ids == s] = (s + 7) % config["text_config"]["vocab_size"]
        n, start = int(config["mm_tokens_per_image"]), ids.shape[1] // 4
        ids[:, start] = special[0]
        ids[:, start + 1:start + 1 + n] = special[2]
        ids[:, start + 1 + n] = special[1]
        size = int(config["vision_config"]["image_size"])
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn(ids.shape[0], 3, size, size, generator=g)
        return {"input_ids": ids, "pixel_values": pixels, "token_type_ids": (ids == special[2]).long()}

    @classmethod
    def banned_tokens(cls, config: dict[str, Any]) -> list[int]:
        return [config["image_token_index"]]


@vision_flops("siglip_vision_model")
def siglip_flops(attrs: dict[str, Any], image_size=None) -> dict[str, tuple[int, int]]:
    """Gemma3's vision side: component -> (parameters, forward FLOPs per image). The tower is a
    ViT of pre-norm blocks with biases (SigLIP's): a patch convolution, learned positions, per
    block LayerNorm, q/k/v/o, LayerNorm, a two-matrix MLP, bidirectional attention over all
    patches, a final LayerNorm; the projector a norm and one matrix from the pooled patches
    (``mm_tokens_per_image`` tokens) to the language model's width."""
    v = attrs["vision_config"]
    if v.get("vision_use_head"):
        raise FlopsError("vision_config.vision_use_head=True: the tower's pooling head is not "
                         "counted by the FLOPs calculator (bridges/flops.py)")
    size = int(v["image_size"])
    if image_size is not None and image_size not in (size, (size, size)):
        raise FlopsError(f"image_size={image_size}: this tower takes {size} x {size} images only")
    d, f, layers = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["num_hidden_layers"])
    p, c = int(v["patch_size"]), int(v.get("num_channels") or 3)
    patches = (size // p) ** 2
    block = 4 * (d * d + d) + 2 * d * f + f + d + 2 * 2 * d
    tower = c * p * p * d + d + patches * d + layers * block + 2 * d
    tower_fwd = 2 * patches * c * p * p * d + layers * (2 * patches * (4 * d * d + 2 * d * f) + 4 * patches ** 2 * d)
    h, tokens = int(attrs["hidden_size"]), int(attrs["mm_tokens_per_image"])
    return {"vision_tower": (tower, tower_fwd), "projector": (d + d * h, 2 * tokens * d * h)}
