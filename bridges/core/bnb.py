"""bitsandbytes 4-bit checkpoints (``quant_method: bitsandbytes``, ``load_in_4bit``: NF4 / FP4, the
``*-bnb-4bit`` releases QLoRA users start from). A linear's ``<w>`` is uint8 [ceil(n / 2), 1]: two
4-bit codes a byte, the first in the high nibble, over the weight's n values in row-major order.
Beside it: ``<w>.quant_map`` fp32 [16] (each code's value), ``<w>.absmax`` (one scale per
``blocksize`` consecutive values, the last block ragged) and ``<w>.quant_state.bitsandbytes__<type>``
(uint8 bytes of a JSON dict: shape, dtype, blocksize, quant_type, and with double quantization
nested_blocksize, nested_offset, nested_dtype). Double quantization
(``bnb_4bit_use_double_quant``): ``absmax`` is uint8 codes into ``<w>.nested_quant_map`` fp32
[256], scaled by ``<w>.nested_absmax`` (one a ``nested_blocksize`` of them), plus the offset.

value = quant_map[code] x absmax[block] in float32, rounded once to the model dtype (as
bitsandbytes dequantizes). Re-encoding keeps the source's scales and maps: each value goes back
to the code whose value it is (the model dtype's rounding moves it far less than the codes'
spacing).
"""
from __future__ import annotations

import json

import torch

from bridges.core.quant import CHUNK, QuantError

TYPES = ("nf4", "fp4")


def parts(name: str, ckpt) -> tuple[str, ...] | None:
    """(``<w>``, absmax, quant_map[, nested_absmax, nested_quant_map], quant_state) when ``name``
    is stored as bitsandbytes 4-bit, else None."""
    state = next((f"{name}.quant_state.bitsandbytes__{t}" for t in TYPES
                  if f"{name}.quant_state.bitsandbytes__{t}" in ckpt), None)
    if state is None or name not in ckpt:
        return None
    if ckpt.dtype(name) != torch.uint8:
        raise QuantError(f"{name} is {ckpt.dtype(name)} beside {state}: packed uint8 codes expected")
    found = [name] + [f"{name}.{s}" for s in ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
                      if f"{name}.{s}" in ckpt]
    for s in ("absmax", "quant_map"):
        if f"{name}.{s}" not in found:
            raise QuantError(f"{state} has no {name}.{s}")
    if (f"{name}.nested_absmax" in found) != (f"{name}.nested_quant_map" in found):
        raise QuantError(f"{name}: nested_absmax and nested_quant_map go together (double quantization)")
    return tuple(found) + (state,)


def weight_of(stored: str) -> str | None:
    """The weight a stored bitsandbytes companion belongs to (its 4-bit quant_state, its 8-bit
    SCB), else None: the mark that the weight is quantized this way."""
    if ".quant_state.bitsandbytes__" in stored:
        return stored.split(".quant_state.")[0]
    return stored[:-len("SCB")] + "weight" if stored.endswith(".SCB") else None


def state(packed: torch.Tensor, what: str) -> dict:
    """The quant_state's JSON dict, checked."""
    try:
        s = json.loads(bytes(packed.to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantError(f"{what}: quant_state is not JSON bytes ({e})") from None
    for k in ("shape", "blocksize", "quant_type"):
        if k not in s:
            raise QuantError(f"{what}: quant_state has no {k!r}")
    if s["quant_type"] not in TYPES:
        raise QuantError(f"{what}: quant_type {s['quant_type']!r} is not nf4 / fp4")
    return s


def absmax(tensors: dict[str, torch.Tensor], s: dict, what: str) -> torch.Tensor:
    """The float32 scale of each block (double quantization undone: map[code] x scale + offset)."""
    a = tensors["absmax"]
    if "nested_absmax" not in tensors:
        return a.float()
    if a.dtype != torch.uint8 or "nested_offset" not in s or "nested_blocksize" not in s:
        raise QuantError(f"{what}: double-quantized absmax must be uint8 codes with nested_offset / nested_blocksize")
    n, b = a.numel(), int(s["nested_blocksize"])
    scale = tensors["nested_absmax"].float().repeat_interleave(b)[:n]
    if scale.numel() != n:
        raise QuantError(f"{what}: {tensors['nested_absmax'].numel()} nested scales of {b} do not cover {n} absmax codes")
    return tensors["nested_quant_map"].float()[a.long()] * scale + float(s["nested_offset"])


def _block_scales(scale: torch.Tensor, n: int, blocksize: int, what: str) -> torch.Tensor:
    if scale.numel() != -(-n // blocksize):
        raise QuantError(f"{what}: {scale.numel()} absmax values for {n} values in blocks of {blocksize}")
    return scale.repeat_interleave(blocksize)[:n]


def dequantize(codes: torch.Tensor, tensors: dict[str, torch.Tensor], s: dict, what: str = "weight",
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    shape = [int(x) for x in s["shape"]]
    n = int(torch.tensor(shape).prod())
    flat = codes.reshape(-1)
    if flat.numel() != -(-n // 2):
        raise QuantError(f"{what}: {flat.numel()} code bytes for {shape} ({n} values)")
    q = torch.stack([flat >> 4, flat & 0xF], 1).reshape(-1)[:n].long()
    values = tensors["quant_map"].float()[q] * _block_scales(absmax(tensors, s, what), n, int(s["blocksize"]), what)
    return values.reshape(shape).to(dtype)


def quantize(values: torch.Tensor, tensors: dict[str, torch.Tensor], s: dict, what: str = "weight") -> torch.Tensor:
    """``values`` as the source's code bytes [ceil(n / 2), 1], with its scales and map."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    scale = _block_scales(absmax(tensors, s, what), n, int(s["blocksize"]), what)
    table = tensors["quant_map"].float()
    q = torch.empty(n + n % 2, dtype=torch.uint8)
    q[n:] = 0
    for i in range(0, n, CHUNK // 16):  # the code whose value (x the block's scale) is nearest
        j = min(n, i + CHUNK // 16)
        q[i:j] = (table[None, :] * scale[i:j, None] - flat[i:j, None]).abs().argmin(-1).to(torch.uint8)
    return ((q[0::2] << 4) | q[1::2]).unsqueeze(1)


# -- 8-bit (LLM.int8, ``load_in_8bit``) ---------------------------------------------------------
INV127 = 7.874015718698502e-3  # bitsandbytes' 1 / 127, as its dequantization multiplies


def parts8(name: str, ckpt) -> tuple[str, ...] | None:
    """(``<p>.weight`` int8 [out, in], ``<p>.SCB`` fp32 [out][, ``<p>.weight_format``]) when
    ``name`` is stored as bitsandbytes 8-bit (row-wise absmax scales), else None."""
    if not name.endswith(".weight") or f"{name[:-len('weight')]}SCB" not in ckpt or name not in ckpt:
        return None
    p = name[:-len("weight")]
    if ckpt.dtype(name) != torch.int8:
        raise QuantError(f"{name} is {ckpt.dtype(name)} beside {p}SCB: int8 codes expected")
    fmt = f"{p}weight_format"
    if fmt in ckpt and int(ckpt.get(fmt).reshape(-1)[0]) != 0:
        raise QuantError(f"{fmt} is {int(ckpt.get(fmt).reshape(-1)[0])}: only the row-major layout (0) is read")
    return (name, f"{p}SCB") + ((fmt,) if fmt in ckpt else ())


def dequantize8(codes: torch.Tensor, scb: torch.Tensor, what: str = "weight",
                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """code x row absmax / 127, in float32 as bitsandbytes computes it, rounded once to ``dtype``."""
    if codes.dim() != 2 or scb.shape != (codes.shape[0],):
        raise QuantError(f"{what}: SCB {tuple(scb.shape)} is not one scale per row of {tuple(codes.shape)}")
    return (codes * scb.float().view(-1, 1) * INV127).to(dtype)


def quantize8(values: torch.Tensor, scb: torch.Tensor, what: str = "weight") -> torch.Tensor:
    """``values`` as the source's int8 codes with its row scales."""
    if values.dim() != 2 or scb.shape != (values.shape[0],):
        raise QuantError(f"{what}: SCB {tuple(scb.shape)} is not one scale per row of {tuple(values.shape)}")
    return torch.round(values.float() / (scb.float().view(-1, 1) * INV127)).clamp(-127, 127).to(torch.int8)
