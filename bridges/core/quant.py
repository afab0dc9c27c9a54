"""Quantized HF checkpoints: FP8 weights with scale companions, never loaded silently.

Formats (shared by several families, so they live here):
- block FP8 (DeepSeek-V3, Qwen3-FP8): ``<w>`` float8_e4m3fn + ``<w>_scale_inv`` float32 of
  shape [ceil(rows/b0), ceil(cols/b1)], ``weight_block_size`` [b0, b1] in the config's
  ``quantization_config``; value = q * scale_inv, edge tiles ragged;
- per-tensor / per-row FP8 (Mistral style): ``<w>`` float8 + ``<w minus 'weight'>weight_scale``
  of shape [] / [1] / [rows, 1]; value = q * scale.

Import dequantizes on the fly; a float8 tensor without a companion is an error naming it.
Export writes the model dtype by default, or re-quantizes to the source's layout (reusing the
source scales, so an FP8 checkpoint goes HF -> Megatron -> HF bit-exactly).
"""
from __future__ import annotations

import math
from typing import Any

import torch

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


class QuantError(ValueError):
    """A quantized tensor has no dequantization path; the message names it."""


def block_size(config: Any) -> tuple[int, int] | None:
    qc = (config.get("quantization_config") if isinstance(config, dict)
          else getattr(config, "quantization_config", None)) or {}
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    b = qc.get("weight_block_size")
    return (int(b[0]), int(b[1])) if b else None


def companion(name: str, names) -> tuple[str, str] | None:
    """(companion name, kind) of a quantized tensor: kind 'block' or 'tensor'."""
    if f"{name}_scale_inv" in names:
        return f"{name}_scale_inv", "block"
    if name.endswith("weight") and f"{name}_scale" in names:
        return f"{name}_scale", "tensor"
    return None


def expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    want = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale.shape) != want:
        raise QuantError(f"scale shape {tuple(scale.shape)} does not tile {shape} by {block} "
                         f"(expected {want})")
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def dequantize(q: torch.Tensor, scale: torch.Tensor, kind: str,
               block: tuple[int, int] | None) -> torch.Tensor:
    """float32 values of a quantized tensor."""
    if kind == "block":
        if block is None:
            raise QuantError("block scales but no quantization_config.weight_block_size")
        return q.float() * expand(scale.float(), tuple(q.shape), block)
    s = scale.float()
    return q.float() * (s.reshape(-1, *([1] * (q.dim() - 1))) if s.numel() > 1 else s.reshape(()))


def quantize(w: torch.Tensor, scale: torch.Tensor | None, kind: str, block: tuple[int, int] | None,
             dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale). With the source's ``scale`` the source's q comes back exactly; without one,
    scales are amax / FP8 max per tile (block) or per tensor."""
    w = w.float()
    if scale is None:
        if kind == "block":
            rows, cols = w.shape
            tiles = torch.nn.functional.pad(w.abs(), (0, -cols % block[1], 0, -rows % block[0]))
            amax = tiles.reshape(tiles.shape[0] // block[0], block[0], tiles.shape[1] // block[1],
                                 block[1]).amax(dim=(1, 3))
        else:
            amax = w.abs().amax()
        scale = (amax / FP8_MAX[dtype]).clamp_min(1e-12)
    full = expand(scale.float(), tuple(w.shape), block) if kind == "block" else scale.float()
    return (w / full).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype), scale
