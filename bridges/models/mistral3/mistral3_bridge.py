"""Mistral3 with images (``mistral3``: Devstral-Small-2, Ministral-3, Mistral-Small-3.1/3.2):
the HF vision encoder pattern. The Pixtral tower (2-D rope, images of any size packed into one
sequence, attention within each image) and the projector (RMSNorm, a learned merge of each
``spatial_merge_size``^2 block of patches, two matrices) stay transformers' modules, replicated
over TP on the first pipeline stage; the language model is Ministral-3's (``ministral3``: YaRN
and the position-scaled query) or Mistral's (``mistral``: Mistral-Small-3.x), as ``text_config``
says, under ``language_model.``, causal over image tokens. The published Devstral / Ministral-3
weights are FP8 per tensor with static activation scales (``static`` in docs/quantization.md).
Megatron side: ``modeling_mistral3.py``.
"""
from __future__ import annotations

import functools
import json
from types import SimpleNamespace
from typing import Any

import torch

from bridges.core.config import ConfigError, Field, get_path
from bridges.core.mappings import Mapping
from bridges.core.provider import ModelProvider
from bridges.core.registry import register_bridge
from bridges.core.vlm import LLAVA_LEGACY, LLAVA_PARTS, VLMBridge, hf_module_mappings
from bridges.flops import FlopsError, vision_flops
from bridges.models.ministral3.ministral3_bridge import Ministral3Bridge
from bridges.models.mistral.mistral_bridge import MistralBridge

# text_config.model_type -> the language model's bridge
TEXT_BRIDGES = {"ministral3": Ministral3Bridge, "mistral": MistralBridge}
PROJECTOR_FIELDS = ("spatial_merge_size", "vision_feature_layer", "multimodal_projector_bias",
                    "projector_hidden_act")


def vision_config_dict(v: dict[str, Any]) -> dict[str, Any]:
    """Pixtral's vision config with transformers' defaults for what ``v`` leaves out."""
    from transformers import AutoConfig

    v = dict(v)
    return AutoConfig.for_model(v.pop("model_type", "pixtral"), **v).to_dict()


@functools.lru_cache(maxsize=8)
def _meta_modules(vision_json: str, top_json: str, text_hidden: int, eps: float):
    """The HF tower and projector for a config, on the meta device (names only)."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

    vision = json.loads(vision_json)
    vision = AutoConfig.for_model(vision.pop("model_type", "pixtral"), **vision)
    cfg = SimpleNamespace(vision_config=vision, text_config=SimpleNamespace(hidden_size=text_hidden, rms_norm_eps=eps),
                          **json.loads(top_json))
    with torch.device("meta"):
        return AutoModel.from_config(vision), Mistral3MultiModalProjector(cfg)


@register_bridge(model_type="mistral3", architectures=["Mistral3ForConditionalGeneration"])
class Mistral3Bridge(VLMBridge):
    language_bridge = Ministral3Bridge
    LEGACY = LLAVA_LEGACY
    vision_parts = LLAVA_PARTS
    vlm_fields = (Field("image_token_index", "image_token_id"),
                  Field("spatial_merge_size", "spatial_merge_size", 2),
                  Field("vision_feature_layer", "vision_feature_layer", -1),
                  Field("multimodal_projector_bias", "multimodal_projector_bias", False),
                  Field("projector_hidden_act", "projector_hidden_act", "gelu"))

    def __init__(self, hf_config: Any, checkpoint=None):
        kind = get_path(hf_config, "text_config.model_type", "ministral3")
        if kind not in TEXT_BRIDGES:
            raise ConfigError(f"text_config.model_type={kind!r}: the mistral3 bridge knows the "
                              f"language models {sorted(TEXT_BRIDGES)}")
        self.language_bridge = TEXT_BRIDGES[kind]
        super().__init__(hf_config, checkpoint)

    @property
    def quantized_formats(self) -> tuple[str, ...]:
        return self.language_bridge.quantized_formats

    def vision_mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        top = {f: attrs[f] for f in PROJECTOR_FIELDS}
        tower, projector = _meta_modules(json.dumps(attrs["vision_config"], sort_keys=True),
                                         json.dumps(top, sort_keys=True), attrs["hidden_size"],
                                         attrs["layernorm_epsilon"])
        return (hf_module_mappings(tower, "vision_tower.", "model.vision_tower.")
                + hf_module_mappings(projector, "multi_modal_projector.", "model.multi_modal_projector."))

    def wrap(self, language_model, provider: ModelProvider, pre_process: bool, post_process: bool,
             vp_stage: int | None):
        from bridges.models.mistral3.modeling_mistral3 import Mistral3VLModel

        return Mistral3VLModel(language_model, self.hf_config, provider.image_token_id, with_vision=pre_process)

    # -- conformance hooks ----------------------------------------------------------------
    # the toy's images (height, width) in pixels, one per row in turn: grids of 4x6, 6x4, 4x4
    # and 6x6 patches of 4 pixels, merged 2x2 into 6, 6, 4 and 9 image tokens
    TOY_SIZES = ((16, 24), (24, 16), (16, 16), (24, 24))

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """A small Pixtral tower (2 layers, patches of 4 pixels, images up to 32 x 32) and the
        image token moved into the toy's vocabulary; the toy is unquantized (the quant item
        makes its FP8 twin)."""
        vocab = config["text_config"]["vocab_size"]
        config.pop("quantization_config", None)
        config["vision_config"] = {**config.get("vision_config", {}), "hidden_size": 32, "head_dim": 16,
                                   "intermediate_size": 48, "num_hidden_layers": 2,
                                   "num_attention_heads": 2, "image_size": 32, "patch_size": 4}
        config["image_token_index"] = vocab - 3
        return config

    @classmethod
    def image_inputs(cls, config: dict[str, Any], ids: torch.Tensor, seed: int = 0) -> dict[str, Any]:
        """One image per row (``TOY_SIZES`` in turn), a quarter of the way in, laid out as the
        Pixtral processor does: each merged row's image tokens then a break token, an end token
        after the last row (plain text tokens here: the two ids after the image token's)."""
        image, vocab = config["image_token_index"], config["text_config"]["vocab_size"]
        brk, end = image + 1, image + 2
        ids = ids.clone()
        for s in (image, brk, end):
            ids[ids == s] = (s + 7) % vocab
        unit = int(config["vision_config"]["patch_size"]) * int(config.get("spatial_merge_size", 2))
        sizes = [cls.TOY_SIZES[i % len(cls.TOY_SIZES)] for i in range(ids.shape[0])]
        for row, (h, w) in enumerate(sizes):
            layout = ([image] * (w // unit) + [brk]) * (h // unit)
            layout[-1] = end
            start = ids.shape[1] // 4
            ids[row, start:start + len(layout)] = torch.tensor(layout)
        g = torch.Generator().manual_seed(seed)
        top = max(max(s) for s in sizes)
        pixels = torch.randn(ids.shape[0], 3, top, top, generator=g)
        return {"input_ids": ids, "pixel_values": pixels, "image_sizes": torch.tensor(sizes)}

    @classmethod
    def banned_tokens(cls, config: dict[str, Any]) -> list[int]:
        return [config["image_token_index"]]


@vision_flops("pixtral")
def pixtral_flops(attrs: dict[str, Any], image_size=None) -> dict[str, tuple[int, int]]:
    """Mistral3's vision side for one image of ``image_size`` pixels (default: the config's
    ``image_size`` square, the largest the processor makes): component -> (parameters, forward
    FLOPs). The tower: a patch convolution without bias, an RMSNorm, per block two RMSNorms,
    q/k/v/o without biases, a SwiGLU MLP, bidirectional attention over the image's patches, no
    final norm; the projector: an RMSNorm, the merge of each m x m block of patches (one
    matrix), two matrices to the language model's width."""
    v = vision_config_dict(attrs["vision_config"])
    d, f, layers = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["num_hidden_layers"])
    p, c, m = int(v["patch_size"]), int(v.get("num_channels") or 3), int(attrs["spatial_merge_size"])
    side = int(v["image_size"])
    hp, wp = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size or (side, side))
    if hp % (p * m) or wp % (p * m) or max(hp, wp) > side:
        raise FlopsError(f"image_size={hp}x{wp}: at most {side} pixels a side and a multiple of "
                         f"patch_size x spatial_merge_size = {p * m} expected (the processor resizes to one)")
    n = (hp // p) * (wp // p)
    block = 2 * d + 4 * d * d + 3 * d * f
    conv = c * p * p * d
    tower_fwd = 2 * n * conv + layers * (2 * n * (4 * d * d + 3 * d * f) + 4 * n * n * d)
    h, bias = int(attrs["hidden_size"]), bool(attrs["multimodal_projector_bias"])
    layer = attrs["vision_feature_layer"]
    u = d * (1 if isinstance(layer, int) else len(layer))
    projector = d + d * m * m * d + u * h + h * h + (2 * h if bias else 0)
    tokens = n // (m * m)
    return {"vision_tower": (conv + d + layers * block, tower_fwd),
            "projector": (projector, 2 * tokens * (d * m * m * d + u * h + h * h))}
