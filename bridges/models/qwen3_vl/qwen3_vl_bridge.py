"""Qwen3-VL (``qwen3_vl``: Qwen/Qwen3-VL-2B/4B/8B/32B-Instruct): the Megatron vision encoder
pattern, as Qwen2.5-VL (whose bridge this extends: image tokens, toy images, TP constraints),
with Qwen3's text model (QK norm, head_dim apart from hidden / heads) and what Qwen3-VL adds:
a learned position table in the tower, LayerNorm blocks with a plain MLP, no windows, deepstack
mergers feeding the language model's first layers, interleaved M-RoPE. Megatron side:
``modeling_qwen3_vl.py``. Checkpoints use transformers' in-memory names (``model.visual.``,
``model.language_model.``, ``lm_head.``), as published.
"""
from __future__ import annotations

from typing import Any

from bridges.core.gpt import L as _L
from bridges.core.mappings import ColumnParallel, FusedQKV, Mapping, Replicated, RowParallel
from bridges.core.provider import ModelProvider
from bridges.core.registry import register_bridge
from bridges.flops import FlopsError, vision_flops
from bridges.models.qwen2_5_vl.qwen2_5_vl_bridge import V, VH, MRoPEText, Qwen25VLBridge
from bridges.models.qwen3.qwen3_bridge import Qwen3Bridge


def deepstack_indexes(vision) -> list[int]:
    """The tower layers whose outputs feed the language model (none where the config has no
    ``deepstack_visual_indexes``, as Qwen3.5's tower)."""
    return list(getattr(vision, "deepstack_visual_indexes", None) or ())


class InterleavedMRoPEText(MRoPEText):
    """Mixin for a Qwen3-VL text bridge: interleaved M-RoPE (HF interleaves always;
    ``mrope_interleaved`` is written back true)."""

    interleaved = True


class Qwen3VLLanguageBridge(InterleavedMRoPEText, Qwen3Bridge):
    """Qwen3-VL's text model: Qwen3's layers, interleaved M-RoPE."""

    quantized_formats = ()


@register_bridge(model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"])
class Qwen3VLBridge(Qwen25VLBridge):
    language_bridge = Qwen3VLLanguageBridge
    LEGACY: dict[str, str] = {}  # published in transformers' in-memory names
    vision_parts = (("vision embedding", V + "patch_embed", VH + "patch_embed"),
                    ("vision block {}", V + "decoder.layers.{}", VH + "blocks.{}"),
                    ("merger", V + "merger", VH + "merger"))

    def vision_mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        v = self.vision()
        layers, deep = tuple(range(v.depth)), tuple(range(len(deepstack_indexes(v))))
        b = "blocks.*."
        table: list[Mapping] = [Replicated(V + "pos_embed.weight", VH + "pos_embed.weight")]
        for suffix in ("weight", "bias"):
            row = RowParallel if suffix == "weight" else Replicated  # a row-parallel bias is whole
            table += [
                Replicated(f"{V}patch_embed.proj.{suffix}", f"{VH}patch_embed.proj.{suffix}"),
                FusedQKV(f"{V}{_L}self_attention.linear_qkv.{suffix}", {"qkv": f"{VH}{b}attn.qkv.{suffix}"}, layers),
                row(f"{V}{_L}self_attention.linear_proj.{suffix}", f"{VH}{b}attn.proj.{suffix}", layers),
                ColumnParallel(f"{V}{_L}mlp.linear_fc1.{suffix}", f"{VH}{b}mlp.linear_fc1.{suffix}", layers),
                row(f"{V}{_L}mlp.linear_fc2.{suffix}", f"{VH}{b}mlp.linear_fc2.{suffix}", layers),
                Replicated(f"{V}{_L}input_layernorm.{suffix}", f"{VH}{b}norm1.{suffix}", layers),
                Replicated(f"{V}{_L}pre_mlp_layernorm.{suffix}", f"{VH}{b}norm2.{suffix}", layers),
            ]
            mergers = [(V + "merger.", VH + "merger.", None)]
            if deep:
                mergers.append((V + "deepstack_merger_list.*.", VH + "deepstack_merger_list.*.", deep))
            for meg, hf, idx in mergers:
                table += [Replicated(f"{meg}norm.{suffix}", f"{hf}norm.{suffix}", idx),
                          ColumnParallel(f"{meg}mlp.linear_fc1.{suffix}", f"{hf}linear_fc1.{suffix}", idx),
                          row(f"{meg}mlp.linear_fc2.{suffix}", f"{hf}linear_fc2.{suffix}", idx)]
        return table

    def wrap(self, language_model, provider: ModelProvider, pre_process: bool, post_process: bool,
             vp_stage: int | None):
        from bridges.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        return Qwen3VLModel(language_model, provider, self.vision(), provider.image_token_id, with_vision=pre_process)

    # -- conformance hooks ----------------------------------------------------------------
    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """8 text layers (the two deepstack layers stay in the first chunk at PP2 x VPP2),
        M-RoPE sections (4, 2, 2) of the 8 rotary pairs of a 16-wide head; a 4-layer tower
        with deepstack taps after layers 1 and 2, a 4 x 4 learned position grid (resampled to
        every image's grid), a merger as wide in as out; the special tokens in the vocabulary."""
        text = config["text_config"]
        text["num_hidden_layers"] = 8
        hidden = int(text["hidden_size"])
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
        rope.update(mrope_section=[4, 2, 2], mrope_interleaved=True, rope_type="default")
        rope.pop("type", None)
        text.pop("rope_scaling", None)
        text["rope_parameters"] = {**rope, "rope_theta": rope.get("rope_theta", text.pop("rope_theta", 5e6))}
        vocab = text["vocab_size"]
        config["vision_config"] = {**config.get("vision_config", {}), "depth": 4, "hidden_size": hidden // 4,
                                   "intermediate_size": 48, "num_heads": 2, "patch_size": 4,
                                   "temporal_patch_size": 2, "spatial_merge_size": 2, "num_position_embeddings": 16,
                                   "deepstack_visual_indexes": [1, 2], "out_hidden_size": hidden}
        config.update(vision_start_token_id=vocab - 6, vision_end_token_id=vocab - 5,
                      video_token_id=vocab - 4, image_token_id=vocab - 3)
        return config


@vision_flops("qwen3_vl_vision", "qwen3_vl", "qwen3_vl_moe_vision", "qwen3_vl_moe")  # published: "qwen3_vl(_moe)"
def qwen3_vision_flops(attrs: dict[str, Any], image_size=None) -> dict[str, tuple[int, int]]:
    """Qwen3-VL's vision side for one image of ``image_size`` pixels (default 448 x 448; a
    multiple of patch x merge): component -> (parameters, forward FLOPs). The tower: the patch
    convolution (with bias), the learned position table (resampled: no matrix product), per
    block two LayerNorms, qkv / proj with biases, a two-matrix MLP, full attention over the
    image; the projector: the merger and the deepstack mergers (each two matrices over every
    merged block)."""
    v = attrs["vision_config"]
    d, f, depth = int(v["hidden_size"]), int(v["intermediate_size"]), int(v["depth"])
    p, m, frames = int(v["patch_size"]), int(v["spatial_merge_size"]), int(v["temporal_patch_size"])
    c = int(v.get("in_channels") or 3)
    hp, wp = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size or (448, 448))
    if hp % (p * m) or wp % (p * m):
        raise FlopsError(f"image_size={hp}x{wp}: a multiple of patch_size x spatial_merge_size = {p * m} "
                         f"pixels expected (the processor resizes images to one)")
    n = (hp // p) * (wp // p)
    conv = c * frames * p * p * d
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * d * f + f + d)
    tower = conv + d + int(v["num_position_embeddings"]) * d + depth * block
    tower_fwd = 2 * n * conv + depth * (2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d)
    u, h, k = d * m * m, int(v["out_hidden_size"]), 1 + len(v.get("deepstack_visual_indexes") or ())
    merger = u * u + u + u * h + h
    norms = 2 * d + (k - 1) * 2 * u  # the merger's over a patch, the deepstack mergers' over a block
    return {"vision_tower": (tower, tower_fwd),
            "projector": (k * merger + norms, k * 2 * (n // (m * m)) * (u * u + u * h))}
