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
``model.vision_tower.`` or ``model.visual.``, ``lm_head.``); a checkpoint stored in the legacy
layout that transformers' own ``save_pretrained`` and the published files use (the family's
``LEGACY`` prefixes: Gemma3's ``language_model.model.``, Qwen-VL's ``model.`` and ``visual.``) is
read and written back in that layout. A published config in the flat legacy layout (text fields
at the top level, as Qwen2.5-VL's) is read (transformers nests it) and written back flat.

``VLMChunk`` is the Megatron side every family shares: the language model chunk, the vision
side on the first stage, the image features written over the image-token embeddings.
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
# transformers' llava-style saved layout (its "llava" conversion mapping: Gemma3, Mistral3, ...):
# in-memory prefix -> the prefix the saved and published files use; and the vision parts such
# a model keeps as HF modules (label, Megatron path, HF path)
LLAVA_LEGACY = {"model.language_model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
                "model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector."}
LLAVA_PARTS = (("vision tower", "vision_tower", "model.vision_tower"),
               ("projector", "multi_modal_projector", "model.multi_modal_projector"))


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
    # the vision side's stages, for activation capture and divergence localisation:
    # (label, module path in a Megatron chunk, module path in the HF model); "{}" in both paths
    # and the label stands for every index of a layer list (e.g. "vision block {}"). Labels:
    # "vision embedding", "vision block N", "vision tower", "merger" or "projector".
    vision_parts: ClassVar[tuple[tuple[str, str, str], ...]] = ()
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
        self._layout: dict[str, str] | None = None
        text = copy.deepcopy(get_path(hf_config, "text_config"))
        for top in ("tie_word_embeddings", "dtype"):  # the top level's word wins
            v = get_path(hf_config, top, None)
            if v is not None:
                text.__setitem__(top, v) if isinstance(text, dict) else setattr(text, top, v)
        # the language bridge sees its own part of the checkpoint, under its own names (what a
        # text family reads of the stored layout, e.g. stacked experts, it reads there)
        self.language = self.language_bridge(text, LanguagePart(self) if checkpoint is not None else None)

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
        if base and "text_config" not in base:  # a flat source is written back flat
            text = out.pop("text_config")
            out.update({k: v for k, v in text.items() if k not in ("model_type", "tie_word_embeddings")})
        return out

    @classmethod
    def text_config_dict(cls, config: dict[str, Any]) -> dict[str, Any]:
        """``text_config`` as a text family's config dict: its model type, and the fields of the
        language table the published file leaves to transformers' class defaults written out."""
        from transformers import AutoConfig

        if "text_config" in config:
            text = dict(config["text_config"] or {})
        else:  # the flat legacy layout: transformers says which top-level fields are the text's
            text = {k: v for k, v in flat_text_fields(config).items() if k != "dtype"}
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

    # in-memory prefix -> legacy (saved) prefix, per family
    LEGACY: ClassVar[dict[str, str]] = {}
    # (in-memory prefix, level): a level under that prefix the table leaves out and some
    # checkpoints store (Gemma3's tower: ``vision_model.``), added where the checkpoint has it
    # or where there is no checkpoint (the published files have it)
    tower_level: ClassVar[tuple[str, str] | None] = None

    def _checkpoint_layout(self) -> dict[str, str]:
        """Prefix renames from the table's layout to the checkpoint's."""
        if self._layout is None:
            names = list(self.checkpoint.names()) if self.checkpoint is not None else []
            legacy = not any(n.startswith("model.language_model.") for n in names)
            self._layout = dict(self.LEGACY) if legacy else {k: k for k in self.LEGACY}
            if self.tower_level and (not names or any(f".{self.tower_level[1]}" in n for n in names)):
                self._layout[self.tower_level[0]] += self.tower_level[1]
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
        chunk = self.wrap(lm, provider, pre_process, post_process, vp_stage)
        chunk.vision_parts = self.vision_parts  # for the checks' activation capture
        return chunk

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


class LanguagePart:
    """The language model's tensors of a VLM checkpoint under the text family's own names
    (``model.`` for the stored language prefix, ``lm_head.``): what a text bridge reads of its
    checkpoint to tell the stored layout (membership, shape)."""

    def __init__(self, vlm: VLMBridge):
        self.vlm, self.ckpt = vlm, vlm.checkpoint
        self.path = self.ckpt.path

    def stored(self, name: str) -> str:
        return self.vlm.hf_name(LM_HF + name[len("model."):] if name.startswith("model.") else name)

    def __contains__(self, name: str) -> bool:
        return self.stored(name) in self.ckpt

    def shape(self, name: str):
        return self.ckpt.shape(self.stored(name))


def flat_text_fields(config: dict[str, Any], every: bool = False) -> dict[str, Any]:
    """The text config transformers reads from a flat (legacy) VLM config dict: the fields that
    differ from its text class's defaults (``every``: all its fields, and the legacy rope
    spellings it reads them from: the top-level keys that are the text model's)."""
    from transformers import AutoConfig

    kw = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    text = AutoConfig.for_model(config["model_type"], **kw).text_config
    if every:
        return {**text.to_dict(), "rope_scaling": None, "rope_theta": None}
    return text.to_diff_dict()


def _chunk_base():
    from megatron.core.transformer.module import MegatronModule

    class _VLMChunk(MegatronModule):
        """One pipeline chunk of a VLM: ``language_model`` (a GPTModel chunk) and, on the first
        stage, the family's vision side. What the checks and the bridge read of a chunk (its
        output split, its padded vocabulary, its stages) is the language model's."""

        def __init__(self, language_model, image_token_id: int):
            super().__init__(config=language_model.config)
            self.language_model = language_model
            self.pre_process, self.post_process = language_model.pre_process, language_model.post_process
            self.parallel_output, self.vocab_size = language_model.parallel_output, language_model.vocab_size
            self.image_token_id = image_token_id

        def set_input_tensor(self, input_tensor) -> None:
            self.language_model.set_input_tensor(input_tensor)

        def embed(self, input_ids, position_ids, features=None):
            """The first stage's decoder input [s, b, h]: the text embeddings with ``features``
            ([image tokens, h], in HF's order: batch, then position) over the image tokens."""
            is_image = input_ids == self.image_token_id
            lm = self.language_model
            ids = input_ids.masked_fill(is_image, 0) if self.image_token_id >= lm.vocab_size else input_ids
            emb = lm.embedding(input_ids=ids, position_ids=position_ids)
            if features is None:
                return emb
            if int(is_image.sum()) != features.shape[0]:
                raise ValueError(f"{int(is_image.sum())} image tokens (id {self.image_token_id}) "
                                 f"for {features.shape[0]} image features")
            emb = emb.transpose(0, 1).clone()
            emb[is_image] = features.to(emb.dtype)
            return emb.transpose(0, 1).contiguous()

    return _VLMChunk


def __getattr__(name: str):
    if name == "VLMChunk":  # megatron imported when a model is built, not with the bridge
        globals()["VLMChunk"] = cls = _chunk_base()
        return cls
    raise AttributeError(name)
