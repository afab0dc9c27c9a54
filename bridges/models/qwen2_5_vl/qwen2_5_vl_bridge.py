"""Qwen2.5-VL (``qwen2_5_vl``: Qwen/Qwen2.5-VL-3B/7B/32B/72B-Instruct): the Megatron vision
encoder pattern. The vision tower is built from Megatron-Core layers (TP-sharded), the language
model is Qwen2's with M-RoPE. Megatron side: ``modeling_qwen2_5_vl.py``.

- Config: the published files are the flat legacy layout (text fields at the top level, with
  ``rope_scaling: {type: mrope, mrope_section}``); transformers 5 nests them under
  ``text_config``; both are read, and an export is written in the source's layout. The text
  model's head size is hidden / heads (HF's code ignores a ``head_dim`` field).
- Tensors: HF's vision attention stores ``qkv`` as [q; k; v] over all heads (``FusedQKV``
  interleaves it per head for Megatron); the vision MLP has biases everywhere; the merger is
  ``ln_q`` + ``mlp.0`` / ``mlp.2``. Checkpoints: transformers' in-memory names
  (``model.language_model.``, ``model.visual.``) or the published legacy ones (``model.``,
  ``visual.``).
- Not covered: video inputs (``pixel_values_videos``; the positions of video frames need the
  frame timing), Qwen2-VL (LayerNorm and a QuickGELU MLP in its tower; another family).
"""
from __future__ import annotations

from typing import Any

import torch

from bridges.core.config import ConfigError, Field, get_path
from bridges.core.gpt import L as _L
from bridges.core.mappings import FusedQKV, GatedMLP, ColumnParallel, Mapping, Replicated, RowParallel
from bridges.core.provider import ModelProvider
from bridges.core.registry import register_bridge
from bridges.core.vlm import VLMBridge
from bridges.flops import FlopsError, vision_flops
from bridges.models.qwen2.qwen2_bridge import Qwen2Bridge

V, VH = "vision_model.", "model.visual."


class MRoPEText:
    """Mixin for a Qwen-VL text bridge: positions by M-RoPE (``mrope_section``: the rotary pairs
    of each head given to the t, h and w axes; ``interleaved``: cycled t, h, w, t, ... as in
    Qwen3-VL, instead of three contiguous sections). A head size the config does not give is
    hidden / heads."""

    interleaved = False

    def rope(self) -> dict[str, Any]:
        p = super().rope()
        if p.get("rope_type") == "mrope":  # the legacy spelling: plain rope on 3-D positions
            p["rope_type"] = "default"
        return p

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        attrs.setdefault("kv_channels", attrs["hidden_size"] // attrs["num_attention_heads"])
        section, pairs = self.rope().get("mrope_section"), attrs["kv_channels"] // 2
        fits = section and len(section) == 3 and sum(section) == pairs
        if not fits or self.interleaved and 3 * max(section[1:]) > pairs:
            raise ConfigError(f"rope_parameters.mrope_section={section!r}: three sizes (t, h, w) summing to the "
                              f"head's {pairs} rotary pairs expected"
                              + (", h and w at most a third of them each (interleaved)" if self.interleaved else ""))
        attrs.update(position_embedding_type="mrope", mrope_section=list(section))
        return attrs

    def hf_config_dict(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        attrs = attrs if attrs is not None else self.megatron_attrs()
        out = super().hf_config_dict(attrs)
        out["rope_parameters"]["mrope_section"] = list(attrs["mrope_section"])
        if self.interleaved:
            out["rope_parameters"]["mrope_interleaved"] = True
        return out


class Qwen25VLLanguageBridge(MRoPEText, Qwen2Bridge):
    """Qwen2.5-VL's text model: Qwen2's layers with M-RoPE; the head size is hidden / heads (HF's
    code ignores a head_dim field)."""

    config_fields = tuple(f for f in Qwen2Bridge.config_fields if f.megatron != "kv_channels")


@register_bridge(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"])
class Qwen25VLBridge(VLMBridge):
    language_bridge = Qwen25VLLanguageBridge
    vision_pattern = "megatron"
    LEGACY = {"model.language_model.": "model.", "model.visual.": "visual.", "lm_head.": "lm_head."}
    vlm_fields = (Field("image_token_id", "image_token_id"),
                  Field("video_token_id", "video_token_id", None),
                  Field("vision_start_token_id", "vision_start_token_id", None),
                  Field("vision_end_token_id", "vision_end_token_id", None))
    vision_parts = (("vision embedding", V + "patch_embed", VH + "patch_embed"),
                    ("vision block {}", V + "decoder.layers.{}", VH + "blocks.{}"),
                    ("merger", V + "merger", VH + "merger"))

    def vision(self):
        return get_path(self.hf_config, "vision_config")

    def vision_mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        layers = tuple(range(self.vision().depth))
        b = "blocks.*."
        table: list[Mapping] = [Replicated(V + "patch_embed.proj.weight", VH + "patch_embed.proj.weight")]
        for suffix in ("weight", "bias"):
            table += [
                FusedQKV(f"{V}{_L}self_attention.linear_qkv.{suffix}", {"qkv": f"{VH}{b}attn.qkv.{suffix}"}, layers),
                GatedMLP(f"{V}{_L}mlp.linear_fc1.{suffix}",
                         {"gate": f"{VH}{b}mlp.gate_proj.{suffix}", "up": f"{VH}{b}mlp.up_proj.{suffix}"}, layers),
                ColumnParallel(f"{V}merger.mlp.linear_fc1.{suffix}", f"{VH}merger.mlp.0.{suffix}"),
            ]
            # a row-parallel layer's bias is added after the reduction: whole on every rank
            row = RowParallel if suffix == "weight" else Replicated
            table += [row(f"{V}{_L}self_attention.linear_proj.{suffix}", f"{VH}{b}attn.proj.{suffix}", layers),
                      row(f"{V}{_L}mlp.linear_fc2.{suffix}", f"{VH}{b}mlp.down_proj.{suffix}", layers),
                      row(f"{V}merger.mlp.linear_fc2.{suffix}", f"{VH}merger.mlp.2.{suffix}")]
        table += [Replicated(f"{V}{_L}input_layernorm.weight", f"{VH}{b}norm1.weight", layers),
                  Replicated(f"{V}{_L}pre_mlp_layernorm.weight", f"{VH}{b}norm2.weight", layers),
                  Replicated(V + "merger.norm.weight", VH + "merger.ln_q.weight")]
        return table

    def layout_constraints(self, provider: ModelProvider) -> list[tuple[str, int, int, str]]:
        v, tp = self.vision(), provider.layout.tp
        units = v.hidden_size * v.spatial_merge_size ** 2
        return super().layout_constraints(provider) + [
            ("vision_config.num_heads", v.num_heads, tp, "TP"),
            ("vision_config.intermediate_size", v.intermediate_size, tp, "TP"),
            ("vision_config.hidden_size x spatial_merge_size^2", units, tp, "TP")]

    def wrap(self, language_model, provider: ModelProvider, pre_process: bool, post_process: bool,
             vp_stage: int | None):
        from bridges.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen25VLModel

        return Qwen25VLModel(language_model, provider, self.vision(), provider.image_token_id, with_vision=pre_process)

    # -- conformance hooks ----------------------------------------------------------------
    # toy images: (frames, rows, columns) in patches; 2x2 merged, windows of 2x2 merged
    # blocks: one wide and one tall image (a row/column mix-up shows), one with a ragged last
    # window row, one a single window
    TOY_GRIDS = ((1, 4, 8), (1, 8, 4), (1, 6, 8), (1, 4, 4))

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Head size 16 (hidden / heads, as HF derives it) with M-RoPE sections (2, 3, 3); a
        4-layer tower (layers 1 and 3 full attention, 0 and 2 windowed) whose merger output
        is as wide as its input (so a swap of the merger's two layers loads, and is caught by
        the numbers); patches of 4 pixels, windows of 16; the special tokens in the vocabulary."""
        text = config["text_config"]
        text.pop("head_dim", None)
        heads = 4 * int(text["num_key_value_heads"])
        text.update(num_attention_heads=heads, hidden_size=16 * heads)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope.update(mrope_section=[2, 3, 3])
        rope.pop("type", None)
        rope["rope_type"] = "default"
        text.pop("rope_scaling", None)
        text["rope_parameters"] = {**rope, "rope_theta": rope.get("rope_theta", text.pop("rope_theta", 1e6))}
        vocab = text["vocab_size"]
        config["vision_config"] = {**config.get("vision_config", {}), "depth": 4, "hidden_size": 4 * heads,
                                   "intermediate_size": 48, "num_heads": 2, "patch_size": 4,
                                   "temporal_patch_size": 2, "spatial_merge_size": 2, "window_size": 16,
                                   "fullatt_block_indexes": [1, 3], "out_hidden_size": 16 * heads}
        config.update(vision_start_token_id=vocab - 6, vision_end_token_id=vocab - 5,
                      video_token_id=vocab - 4, image_token_id=vocab - 3)
        if "vision_token_id" in config:  # a legacy field transformers no longer reads
            config["vision_token_id"] = vocab - 7
        return config

    @classmethod
    def image_inputs(cls, config: dict[str, Any], ids: torch.Tensor, seed: int = 0) -> dict[str, Any]:
        """One image per row (``TOY_GRIDS`` in turn), a quarter of the way in:
        <vision_start>, its tokens, <vision_end>; pixels as the processor lays them out."""
        v = config["vision_config"]
        special = [config[k] for k in ("vision_start_token_id", "vision_end_token_id", "video_token_id",
                                       "image_token_id")]
        ids = ids.clone()
        for s in special:
            ids[ids == s] = (s + 7) % config["text_config"]["vocab_size"]
        merge = v["spatial_merge_size"]
        grids = [cls.TOY_GRIDS[i % len(cls.TOY_GRIDS)] for i in range(ids.shape[0])]
        start = ids.shape[1] // 4
        for row, (t, h, w) in enumerate(grids):
            n = t * h * w // merge ** 2
            ids[row, start] = special[0]
            ids[row, start + 1:start + 1 + n] = special[3]
            ids[row, start + 1 + n] = special[1]
        per_patch = v.get("in_channels", 3) * v["temporal_patch_size"] * v["patch_size"] ** 2
        g = torch.Generator().manual_seed(seed)
        pixels = torch.randn(sum(t * h * w for t, h, w in grids), per_patch, generator=g)
        return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": torch.tensor(grids),
                "mm_token_type_ids": (ids == special[3]).long()}

    @classmethod
    def banned_tokens(cls, config: dict[str, Any]) -> list[int]:
        return [config["image_token_id"], config["video_token_id"]]


@vision_flops("qwen2_5_vl_vision")
def qwen25_vision_flops(attrs: dict[str, Any], image_size=None) -> dict[str, tuple[int, int]]:
    """Qwen2.5-VL's vision side for one image of ``image_size`` pixels (default 448 x 448; the
    processor resizes to a multiple of patch x merge): component -> (parameters, forward
    FLOPs). The tower: a patch convolution over ``temporal_patch_size`` frames (an image is
    repeated), per block two RMSNorms, qkv and proj with biases, a SwiGLU MLP with biases,
    bidirectional attention inside each window (``window_size`` pixels; ragged at the image's
    edges) or over the whole image (``fullatt_block_indexes``); the projector is the merger:
    an RMSNorm, then two matrices over each merged block of patches."""
    v = attrs["vision_config"]
    d, f, depth = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["depth"])
    p, m, frames = int(v["patch_size"]), int(v["spatial_merge_size"]), int(v["temporal_patch_size"])
    c = int(v.get("in_channels") or v.get("in_chans") or 3)
    hp, wp = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size or (448, 448))
    if hp % (p * m) or wp % (p * m):
        raise FlopsError(f"image_size={hp}x{wp}: a multiple of patch_size x spatial_merge_size = {p * m} "
                         f"pixels expected (the processor resizes images to one)")
    gh, gw = hp // p // m, wp // p // m  # merged blocks
    side = int(v["window_size"]) // p // m
    n = gh * gw * m * m
    windows = sum((min(side, gh - y) * min(side, gw - x) * m * m) ** 2
                  for y in range(0, gh, side) for x in range(0, gw, side))
    full = len(v.get("fullatt_block_indexes") or ())
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * d * f + 2 * f) + (f * d + d)
    conv = c * frames * p * p * d
    tower_fwd = 2 * n * conv + depth * 2 * n * (4 * d * d + 3 * d * f) \
        + 4 * d * (full * n * n + (depth - full) * windows)
    u, h = d * m * m, int(v["out_hidden_size"])
    projector = d + u * u + u + u * h + h
    return {"vision_tower": (conv + depth * block, tower_fwd),
            "projector": (projector, 2 * (n // (m * m)) * (u * u + u * h))}
