"""VLMBridge: the base for vision-language families (a config with ``text_config`` and
``vision_config``).

A VLM bridge is a language bridge (a text family's bridge, read from ``text_config``) whose
table sits under a prefix, plus the vision side's table. What stays with the family: the vision
table (``vision_mappings``), the Megatron model that holds both (``wrap``), the toy's vision
config and image inputs (``toy_config``, ``image_inputs``).

Config rules: text fields come from ``text_config`` (transformers' class defaults where the
published file leaves them out, as the published VLM configs do), vision fields from
``vision_config``; ``tie_word_embeddings`` at the top level wins over the text config's.

HF names: the table is written in transformers' in-memory layout (``model.language_model.``,
``model.vision_tower.``, ``model.multi_modal_projector.``, ``lm_head.``); a checkpoint stored in
the legacy layout that transformers' own ``save_pretrained`` and the published files use
(``language_model.model.``, ``language_model.lm_head.``, ``vision_tower.``,
``multi_modal_projector.``, a tower's ``vision_model.`` level) is read and written back in that
layout.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from typing import Any, ClassVar

from bridges.core.bridge import Bridge
from bridges.core.config import Field, get_path
from bridges.core.mappings import Mapping, Replicated
from bridges.core.provider import ModelProvider

LM, LM_HF = "language_model.", "model.language_model."


def hf_module_mappings(module, megatron_prefix: str, hf_prefix: str, strip: str = "") -> list[Mapping]:
    """Replicated mappings for every parameter of an HF module kept as it is inside the
    Megatron model (the HF vision encoder pattern): the module's own names under both prefixes
    (``strip``: a leading level the HF side leaves out), one mapping per layer-wise name, with
    the layers it exists in."""
    layers: dict[str, list[int]] = {}
    out: list[Mapping] = []
    for name, _ in module.named_parameters():
        m = re.match(r"^(.*?\blayers\.)(\d+)(\..*)$", name)
        if m:
            layers.setdefault(f"{m.group(1)}*{m.group(3)}", []).append(int(m.group(2)))
        else:
            layers.setdefault(name, [])
    for pat, idx in layers.items():
        hf = hf_prefix + (pat[len(strip):] if strip and pat.startswith(strip) else pat)
        out.append(Replicated(megatron_prefix + pat, hf, layers=tuple(sorted(idx)) if idx else None))
    return out


def meta_model(config: dict[str, Any]):
    """transformers' own model for a VLM config dict, on the meta device: its modules and
    tensor names, nothing allocated (memoised per config)."""
    return _meta_model(json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=4)
def _meta_model(config_json: str):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = json.loads(config_json)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


class VLMBridge(Bridge):
    modality: ClassVar[str] = "vision"
    # "hf": the tower kept as transformers' modules (Gemma3); "megatron": built from
    # Megatron-Core blocks (Qwen-VL); `mbridge inspect` names it
    vision_pattern: ClassVar[str] = "hf"
    megatron_lm = "a vision-language model: pretrain_gpt.py builds a GPTModel without a vision side"
    # the text family's bridge class, built from ``text_config``
    language_bridge: ClassVar[type[Bridge]]
    # top-level config fields the family keeps (image token ids, tokens per image, ...)
    vlm_fields: ClassVar[tuple[Field, ...]] = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "language_bridge" in cls.__dict__:
            cls.config_fields = tuple(dataclasses.replace(f, hf="text_config." + f.hf)
                                      for f in cls.language_bridge.config_fields) + cls.vlm_fields

    def __init__(self, hf_config: Any, checkpoint=None):
        super().__init__(hf_config, checkpoint)
        text = copy.deepcopy(get_path(hf_config, "text_config"))
        for top in ("tie_word_embeddings", "dtype"):  # the top level's word wins
            v = get_path(hf_config, top, None)
            if v is not None:
                text.__setitem__(top, v) if isinstance(text, dict) else setattr(text, top, v)
        self.language = self.language_bridge(text)
        self._layout: dict[str, str] | None = None

    # -- config ---------------------------------------------------------------------------
    def megatron_attrs(self) -> dict[str, Any]:
        from bridges.core.config import translate

        attrs = self.language.megatron_attrs()
        attrs.update(translate(self.hf_config, self.vlm_fields))
        vision = get_path(self.hf_config, "vision_config")
        # the fields that differ from the class's defaults (a full dump differs between
        # transformers versions, and the config snapshot would with it)
        vision = vision.to_diff_dict() if hasattr(vision, "to_diff_dict") else dict(vision)
        attrs["vision_config"] = {k: v for k, v in vision.items() if k != "transformers_version"}
        return attrs

    def hf_config_dict(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        from bridges.core.config import untranslate

        attrs = attrs if attrs is not None else self.megatron_attrs()
        text = self.language.hf_config_dict(attrs)
        text.pop("architectures", None)
        out = untranslate(attrs, self.vlm_fields)
        out.update(model_type=self.model_type, architectures=list(self.architectures[:1]),
                   text_config=text, vision_config=dict(attrs["vision_config"]),
                   tie_word_embeddings=text.get("tie_word_embeddings",
                                                attrs["share_embeddings_and_output_weights"]))
        return out

    def export_config(self, quantized: bool = False) -> dict[str, Any]:
        """The source's config with the mapped fields rewritten, sub-configs merged field by field."""
        out = super().export_config(quantized)
        base = self.checkpoint.config() if self.checkpoint is not None else {}
        for sub in ("text_config", "vision_config"):
            if isinstance(base.get(sub), dict):
                out[sub] = {**base[sub], **out[sub]}
        return out

    @classmethod
    def text_config_dict(cls, config: dict[str, Any]) -> dict[str, Any]:
        """``text_config`` as a text family's config dict: its model type, and the fields of the
        language table the published file leaves to transformers' class defaults written out."""
        from transformers import AutoConfig

        text = dict(config.get("text_config") or {})
        text.setdefault("model_type", cls.language_bridge.model_type)
        defaults = AutoConfig.for_model(cls.language_bridge.hf_model_type or text["model_type"])
        for f in cls.language_bridge.config_fields:
            key = f.hf.split(".")[0]
            if key not in text and get_path(defaults, key, None) is not None:
                text[key] = getattr(defaults, key)
        return text

    # -- weights --------------------------------------------------------------------------
    def vision_mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        raise NotImplementedError

    def mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        from bridges.core.bridge import prefixed

        text = prefixed(self.language.mappings(attrs), LM,
                        lambda n: LM_HF + n[len("model."):] if n.startswith("model.") else n)
        return text + self.vision_mappings(attrs)

    def hf_name(self, name: str) -> str:
        """The table's name (in-memory layout) as this checkpoint stores it."""
        for new, old in self._checkpoint_layout().items():
            if name.startswith(new):
                return old + name[len(new):]
        return name

    # in-memory prefix -> legacy (saved) prefix
    LEGACY = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
              "model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector."}

    def _checkpoint_layout(self) -> dict[str, str]:
        """Prefix renames from the table's layout to the checkpoint's. The vision tables leave
        out a tower's ``vision_model.`` level (transformers versions differ there); it is added
        where the checkpoint has it (the published files do), or where there is no checkpoint."""
        if self._layout is None:
            names = list(self.checkpoint.names()) if self.checkpoint is not None else []
            legacy = not any(n.startswith("model.language_model.") for n in names)
            self._layout = dict(self.LEGACY) if legacy else {k: k for k in self.LEGACY}
            if not names or any(".vision_model." in n for n in names):
                self._layout["model.vision_tower."] += "vision_model."
        return self._layout

    # -- the Megatron model ---------------------------------------------------------------
    @property
    def config_class(self):
        return self.language.config_class

    def layout_constraints(self, provider: ModelProvider) -> list[tuple[str, int, int, str]]:
        return self.language.layout_constraints(provider)

    def build_model(self, provider: ModelProvider, pre_process: bool, post_process: bool,
                    vp_stage: int | None = None):
        lm = self.language.build_model(provider, pre_process, post_process, vp_stage)
        return self.wrap(lm, provider, pre_process, post_process, vp_stage)

    def wrap(self, language_model, provider: ModelProvider, pre_process: bool, post_process: bool,
             vp_stage: int | None):
        """The chunk: the language model chunk with the vision side (first stage) around it."""
        raise NotImplementedError

    # -- conformance hooks ----------------------------------------------------------------
    @classmethod
    def image_inputs(cls, config: dict[str, Any], ids, seed: int = 0) -> dict[str, Any]:
        """Model inputs with images for the toy ``config``: ``input_ids`` (``ids`` with the
        image tokens placed in the middle of the text) and the family's image tensors."""
        raise NotImplementedError

    @classmethod
    def banned_tokens(cls, config: dict[str, Any]) -> list[int]:
        """Token ids greedy generation must not produce (an image placeholder without its image)."""
        return []
