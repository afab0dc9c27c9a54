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
from bridges.core.mappings import Mapping
from bridges.core.provider import ModelProvider
from bridges.core.registry import register_bridge
from bridges.core.vlm import VLMBridge, hf_module_mappings
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
