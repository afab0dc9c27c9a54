"""Quantized HF checkpoints: FP8 weights with scale companions, never loaded silently.

Formats (shared by several families, so they live here):
- block FP8 (DeepSeek-V3, Qwen3-FP8): ``<w>`` float8_e4m3fn + ``<w>_scale_inv`` float32 of
  shape [ceil(rows/b0), ceil(cols/b1)], ``weight_block_size`` [b0, b1] in the config's
  ``quantization_config``; value = q * scale_inv, edge tiles ragged;
- per-tensor / per-row FP8 (Mistral style): ``<w>`` float8 + ``<w minus 'weight'>weight_scale``
  of shape [] / [1] / [rows, 1]; value = q * scale. transformers' fine-grained FP8 without
  blocks (Ministral-3 / Devstral-2: ``weight_block_size`` null) names the per-tensor scale
  ``<w>_scale_inv`` (same formula), and with ``activation_scheme: static`` stores a calibrated
  input scale ``<w minus 'weight'>activation_scale`` beside each weight: the Megatron model
  (dequantized weights) does not use it; a quantized export writes the source's back. NVIDIA
  ModelOpt's FP8 (``quant_algo: FP8``) is the per-tensor form with ``weight_scale`` and a static
  ``input_scale``, read the same way;
- MXFP4 (gpt-oss experts, ``quant_method: mxfp4``): the logical ``<w>`` is absent, stored as
  ``<w>_blocks`` uint8 [E, rows, G, 16] (two FP4 E2M1 codes a byte, low nibble first, 32 values
  a block) + ``<w>_scales`` uint8 [E, rows, G] (E8M0 exponents, bias 127); value =
  FP4[code] * 2**(scale - 127), laid out [E, G*32, rows] (transformers' dequantized layout).

- NVFP4 (NVIDIA ModelOpt, ``quant_algo: NVFP4``: Nemotron 3 Super, Llama / Qwen3 / DeepSeek FP4
  releases): ``<w>`` uint8 [rows, cols/2] (two E2M1 codes a byte, low nibble first), ``<w>_scale``
  float8_e4m3fn [rows, cols/16] (one scale per 16 values of a row), ``<w>_scale_2`` float32
  (per tensor), and a calibrated ``<w minus 'weight'>input_scale``; value = FP4[code] * scale *
  scale_2 (the last product rounded once, in float32, then to the model dtype).
- KV-cache scales (ModelOpt's ``kv_cache_quant_algo: FP8``): ``<w minus 'weight'>k_scale`` /
  ``v_scale`` beside the k / v projections, quantized or not; compressed-tensors'
  ``kv_cache_scheme``: ``<attention>.k_scale`` / ``v_scale`` on the attention module; kept like
  an activation scale.
- compressed-tensors FP8 (``quant_method: compressed-tensors``, ``format: float-quantized``, as
  llm-compressor writes and RedHat publishes): ``<w>`` float8 + ``<w minus 'weight'>weight_scale``
  per tensor [1] or per output channel [rows, 1] (model dtype) and, with static activations, an
  ``input_scale`` [1]: the per-tensor / per-row form above.

- compressed-tensors pack-quantized (``format: pack-quantized``: Kimi-K2-Thinking's int4 experts,
  RedHat's w4a16): ``<w>_packed`` int32 words of 4- / 8-bit codes, ``<w>_scale`` per column
  group, ``<w>_shape``, and ``<w>_zero_point`` (packed down the rows) when asymmetric; its NVFP4
  (``nvfp4-pack-quantized``): ``<w>_packed`` uint8 codes, ``<w>_scale`` float8 and
  ``<w>_global_scale``, a divisor.

Import dequantizes on the fly; a float8 tensor without a companion is an error naming it.
Export writes the model dtype by default, or re-quantizes to the source's layout (reusing the
source scales, so an FP8 checkpoint goes HF -> Megatron -> HF bit-exactly; ``mxfp4_quantize``
is the bit-exact inverse for MXFP4, its wiring into the bridge is pending).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from bridges.core.errors import MBridgeError

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


class QuantError(MBridgeError, ValueError):
    """A quantized tensor has no dequantization path; the message names it."""


def block_size(config: Any) -> tuple[int, int] | None:
    qc = (config.get("quantization_config") if isinstance(config, dict)
          else getattr(config, "quantization_config", None)) or {}
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    b = qc.get("weight_block_size")
    return (int(b[0]), int(b[1])) if b else None


def companion(name: str, names) -> tuple[str, str] | None:
    """(companion name, kind) of a quantized tensor: kind 'block' or 'tensor' (a ``_scale_inv``
    without a ``weight_block_size`` in the config is per tensor: ``FP8._layout`` decides)."""
    if f"{name}_scale_inv" in names:
        return f"{name}_scale_inv", "block"
    if name.endswith("weight") and f"{name}_scale" in names:
        return f"{name}_scale", "tensor"
    return None


def activation_scale(name: str, names) -> str | None:
    """The static input scale stored beside FP8 weight ``name``, if any: transformers'
    ``activation_scale``, or NVIDIA ModelOpt's ``input_scale``."""
    if not name.endswith("weight"):
        return None
    stem = name[:-len("weight")]
    return next((a for a in (f"{stem}activation_scale", f"{stem}input_scale") if a in names), None)


KV_CACHE_SCALES = ("k_scale", "v_scale")
# compressed-tensors (llm-compressor's ``kv_cache_scheme``) stores the scales on the attention
# module instead, ``self_attn.k_scale`` / ``v_scale`` of shape [1]; they count as parts of the
# projection that makes the keys / the values (one that makes both: qkv_proj)
KV_SCALE_HOLDERS = {"k_scale": ("k_proj", "qkv_proj"), "v_scale": ("v_proj", "qkv_proj")}


def kv_cache_scales(name: str, names) -> tuple[str, ...]:
    """The FP8 KV-cache scales that belong to projection ``name``: NVIDIA ModelOpt's beside it
    (``kv_cache_quant_algo``: ``self_attn.k_proj.k_scale`` / ``v_proj.v_scale``) and
    compressed-tensors' on its attention module (``self_attn.k_scale`` / ``v_scale``); float32 or
    model-dtype scalars, whatever the weight's own format: calibration for an inference engine's
    cache, which the Megatron model does not hold."""
    if not name.endswith("weight"):
        return ()
    stem = name[:-len("weight")]
    own = tuple(f"{stem}{s}" for s in KV_CACHE_SCALES if f"{stem}{s}" in names)
    attn, _, leaf = stem[:-1].rpartition(".")
    return own + tuple(f"{attn}.{s}" for s, holders in KV_SCALE_HOLDERS.items()
                       if attn and leaf in holders and f"{attn}.{s}" in names)


def calibration(name: str, names) -> tuple[str, ...]:
    """Every calibrated scale stored beside weight ``name``: its static activation scale and its
    KV-cache scales. Read as used; a quantized export writes the source's back."""
    act = activation_scale(name, names)
    return ((act,) if act else ()) + kv_cache_scales(name, names)


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
    if s.numel() not in (1, q.shape[0]):
        raise QuantError(f"scale shape {tuple(s.shape)} is neither per tensor nor per row of "
                         f"{tuple(q.shape)} (and quantization_config has no weight_block_size)")
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


# -- MXFP4 ---------------------------------------------------------------------------------
# E2M1 code -> value (bit 3 sign, bits 0-2 magnitude), as transformers.integrations.mxfp4.FP4_VALUES.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_BIAS = 127
MX_BLOCK = 32  # values per scale: 16 bytes of blocks
CHUNK = 1 << 22  # values handled at once (a few 16 MiB temporaries)


def _mx_check(blocks: tuple, scales: tuple, bdtype: torch.dtype, sdtype: torch.dtype,
              what: str = "blocks / scales") -> None:
    for n, dt in (("blocks", bdtype), ("scales", sdtype)):
        if dt != torch.uint8:
            raise QuantError(f"MXFP4 {n} are {dt}, expected torch.uint8 ({what})")
    if len(blocks) != 4 or blocks[-1] != MX_BLOCK // 2 or tuple(scales) != tuple(blocks[:-1]):
        raise QuantError(f"MXFP4 scales shape {tuple(scales)} does not match blocks shape "
                         f"{tuple(blocks)} ({what}): expected blocks [experts, rows, groups, 16] "
                         f"and scales [experts, rows, groups]")


def packed_parts(name: str, ckpt) -> tuple[str, str] | None:
    """(``<name>_blocks``, ``<name>_scales``) when the checkpoint stores ``name`` as MXFP4, else
    None. Half a pair, a pair beside a stored ``name``, or wrong dtypes / shapes are errors."""
    blocks, scales = f"{name}_blocks", f"{name}_scales"
    if blocks not in ckpt and scales not in ckpt:
        return None
    if blocks not in ckpt or scales not in ckpt:
        have, lack = (blocks, scales) if blocks in ckpt else (scales, blocks)
        raise QuantError(f"{have} has no {lack}: MXFP4 needs both")
    if name in ckpt:
        raise QuantError(f"{name} is stored both as values and as MXFP4 {blocks} / {scales}")
    _mx_check(ckpt.shape(blocks), ckpt.shape(scales), ckpt.dtype(blocks), ckpt.dtype(scales),
              f"{blocks} / {scales}")
    return blocks, scales


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Values of MXFP4 ``blocks`` [E, R, G, 16] and ``scales`` [E, R, G], shaped [E, G*32, R]:
    out[e, g*32 + 2k + h, r] = FP4[nibble h of blocks[e, r, g, k]] * 2**(scales[e, r, g] - 127),
    h = 0 the low nibble. This is transformers' ``convert_moe_packed_tensors`` (the transpose
    included: gpt-oss experts hold gate_up_proj [E, hidden, 2*inter], down_proj [E, inter,
    hidden]), value for value, computed in float32 and rounded once to ``dtype``; exact in bf16 /
    fp32 for scales <= 252 (253-255 overflow to inf, zeros stay zero, as in transformers; OCP
    MX calls 255 NaN).
    Works in row chunks of about ``CHUNK`` values."""
    _mx_check(tuple(blocks.shape), tuple(scales.shape), blocks.dtype, scales.dtype)
    E, R, G, _ = blocks.shape
    out = torch.empty(E, G * MX_BLOCK, R, dtype=dtype, device=blocks.device)
    lut = torch.tensor(FP4_VALUES, device=blocks.device)
    step = max(1, CHUNK // (G * MX_BLOCK))
    for e in range(E):
        for r0 in range(0, R, step):
            b = blocks[e, r0:r0 + step]
            v = torch.stack((lut[(b & 15).int()], lut[(b >> 4).int()]), -1).reshape(len(b), G, MX_BLOCK)
            v = torch.ldexp(v, scales[e, r0:r0 + step, :, None].int() - E8M0_BIAS)
            out[e, :, r0:r0 + step] = v.reshape(len(b), G * MX_BLOCK).T
    return out


def mxfp4_quantize(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks [E, R, G, 16] of ``values`` [E, G*32, R] with the given ``scales`` [E, R, G]:
    the exact inverse of ``mxfp4_dequantize`` (its output re-encodes to the same bytes, -0.0
    included). A value that is not exactly FP4 * 2**(scale - 127) raises QuantError naming it."""
    if scales.dtype != torch.uint8 or scales.dim() != 3:
        raise QuantError(f"MXFP4 scales are {scales.dtype} {tuple(scales.shape)}, expected "
                         f"torch.uint8 [experts, rows, groups]")
    E, R, G = scales.shape
    if tuple(values.shape) != (E, G * MX_BLOCK, R) or not values.is_floating_point():
        raise QuantError(f"values {values.dtype} {tuple(values.shape)} do not match MXFP4 scales "
                         f"shape {tuple(scales.shape)} (expected float {(E, G * MX_BLOCK, R)})")
    blocks = torch.empty(E, R, G, MX_BLOCK // 2, dtype=torch.uint8, device=values.device)
    mags = torch.tensor(FP4_VALUES[:8], device=values.device)
    step = max(1, CHUNK // (G * MX_BLOCK))
    for e in range(E):
        for r0 in range(0, R, step):
            v = values[e, :, r0:r0 + step].T.float().contiguous().reshape(-1, G, MX_BLOCK)
            exp = scales[e, r0:r0 + step, :, None].int() - E8M0_BIAS
            q = torch.ldexp(v, -exp).abs()
            idx = torch.searchsorted(mags, q).clamp_(max=7)
            code = idx.to(torch.uint8) | (v.signbit().to(torch.uint8) << 3)
            back = torch.ldexp(torch.tensor(FP4_VALUES, device=v.device)[code.int()], exp)
            bad = (mags[idx] != q) | (back != v)
            if bad.any():
                r, g, k = (int(i) for i in bad.nonzero()[0])
                s = int(scales[e, r0 + r, g])
                raise QuantError(f"value {v[r, g, k].item()!r} at [{e}, {g * MX_BLOCK + k}, {r0 + r}] "
                                 f"is not representable in MXFP4 with scale {s} (2**{s - E8M0_BIAS}); "
                                 f"{int(bad.sum())} such value(s) in rows {r0}:{r0 + len(v)}")
            blocks[e, r0:r0 + step] = (code[..., 0::2] | (code[..., 1::2] << 4)).reshape(-1, G, MX_BLOCK // 2)
    return blocks


# -- NVFP4 (ModelOpt) -------------------------------------------------------------------------
NV_BLOCK = 16


def nvfp4_parts(name: str, ckpt) -> tuple[str, ...] | None:
    """(codes, block scales, tensor scale[, input scale]) of ``name`` stored as ModelOpt NVFP4:
    a uint8 ``name`` beside a ``<name>_scale``; None when it is not; a missing or misshapen
    companion raises QuantError naming it."""
    if name not in ckpt or ckpt.dtype(name) != torch.uint8 or f"{name}_scale" not in ckpt:
        return None
    scale, scale2 = f"{name}_scale", f"{name}_scale_2"
    if scale2 not in ckpt:
        raise QuantError(f"{name} is NVFP4 ({scale}) without its per-tensor {scale2}")
    rows, half = ckpt.shape(name)
    want = (rows, 2 * half // NV_BLOCK)
    if (2 * half) % NV_BLOCK or tuple(ckpt.shape(scale)) != want or ckpt.dtype(scale) not in (torch.float8_e4m3fn,
                                                                                             torch.uint8):
        raise QuantError(f"{scale} is {ckpt.dtype(scale)} {tuple(ckpt.shape(scale))}: NVFP4 {name} "
                         f"[{rows}, {half}] (two codes a byte) needs float8_e4m3fn {want}, a scale per "
                         f"{NV_BLOCK} values")
    if math.prod(ckpt.shape(scale2)) != 1:
        raise QuantError(f"{scale2} has shape {tuple(ckpt.shape(scale2))}: one per-tensor scale expected")
    return (name, scale, scale2) + calibration(name, ckpt)


def ct_nvfp4_parts(name: str, ckpt) -> tuple[str, ...] | None:
    """compressed-tensors' NVFP4 (``nvfp4-pack-quantized``): (``<name>_packed`` uint8 codes,
    ``<name>_scale`` float8 [rows, cols/16], ``<name>_global_scale`` [1], the divisor: ModelOpt's
    ``weight_scale_2`` is its reciprocal[, ``input_global_scale``, KV-cache scales]); None when
    ``name`` is not stored so."""
    packed, scale, glob = f"{name}_packed", f"{name}_scale", f"{name}_global_scale"
    if packed not in ckpt or ckpt.dtype(packed) != torch.uint8 or glob not in ckpt:
        return None
    if name in ckpt:
        raise QuantError(f"{name} is stored both as values and as NVFP4 {packed}")
    rows, half = ckpt.shape(packed)
    if scale not in ckpt or tuple(ckpt.shape(scale)) != (rows, 2 * half // NV_BLOCK) or (2 * half) % NV_BLOCK:
        raise QuantError(f"{packed} [{rows}, {half}] (NVFP4, two codes a byte) needs {scale} float8 "
                         f"[{rows}, {2 * half // NV_BLOCK}], a scale per {NV_BLOCK} values")
    if math.prod(ckpt.shape(glob)) != 1:
        raise QuantError(f"{glob} has shape {tuple(ckpt.shape(glob))}: one per-tensor scale expected")
    stem = name[:-len("weight")] if name.endswith("weight") else name
    inp = (f"{stem}input_global_scale",) if f"{stem}input_global_scale" in ckpt else ()
    return (packed, scale, glob) + inp + kv_cache_scales(name, ckpt)


def _nv_scales(scale: torch.Tensor, scale2: torch.Tensor, divisor: bool = False) -> torch.Tensor:
    """float32 [rows, cols/16] block scale x tensor scale (the fp8 scales may be stored as
    bytes); ``divisor``: compressed-tensors' global scale, block scale / global scale."""
    if scale.dtype == torch.uint8:
        scale = scale.view(torch.float8_e4m3fn)
    s2 = scale2.float().reshape(())
    return scale.float() / s2 if divisor else scale.float() * s2


def nvfp4_dequantize(codes: torch.Tensor, scale: torch.Tensor, scale2: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16, divisor: bool = False) -> torch.Tensor:
    """Values [rows, cols] of NVFP4 ``codes`` [rows, cols/2]: value[r, 2k + h] = FP4[nibble h of
    codes[r, k]] * scale[r, (2k + h) // 16] * scale2, h = 0 the low nibble; in float32, rounded
    once to ``dtype``."""
    rows, half = codes.shape
    lut = torch.tensor(FP4_VALUES, device=codes.device)
    v = torch.stack((lut[(codes & 15).int()], lut[(codes >> 4).int()]), -1).reshape(rows, -1, NV_BLOCK)
    return (v * _nv_scales(scale, scale2, divisor)[..., None]).reshape(rows, 2 * half).to(dtype)


def nvfp4_quantize(values: torch.Tensor, scale: torch.Tensor, scale2: torch.Tensor,
                   divisor: bool = False) -> torch.Tensor:
    """NVFP4 codes of ``values`` [rows, cols] with the given scales: the exact inverse of
    ``nvfp4_dequantize`` (a value decodes from the code whose dequantized value equals it, in
    float32, the values' dtype or bfloat16, -0.0 included: FP4 magnitudes lie >= 1.33x apart,
    so no rounding merges two codes). A value no code gives raises QuantError naming it."""
    rows, cols = values.shape
    if cols % NV_BLOCK or tuple(scale.shape) != (rows, cols // NV_BLOCK):
        raise QuantError(f"values {tuple(values.shape)} do not match NVFP4 scales {tuple(scale.shape)}")
    lut, scales = torch.tensor(FP4_VALUES, device=values.device), _nv_scales(scale, scale2, divisor)
    out = torch.empty(rows, cols // 2, dtype=torch.uint8, device=values.device)
    step = max(1, CHUNK // (cols * 16))
    for r0 in range(0, rows, step):
        # what each code decodes to, per block of these rows: [r, blocks, 16] in float32, and as
        # rounded on import to bfloat16 (values held in a wider dtype than they were read in)
        exact = lut * scales[r0:r0 + step, :, None]
        v = values[r0:r0 + step].float().reshape(len(exact), -1, NV_BLOCK, 1)
        hit = torch.zeros(*v.shape[:-1], NV_BLOCK, dtype=torch.bool, device=v.device)
        for dtype in dict.fromkeys((values.dtype, torch.float32, torch.bfloat16)):
            table = exact.to(dtype).float()
            hit |= (table[:, :, None, :] == v) & (table.signbit()[:, :, None, :] == v.signbit())
        if not hit.any(-1).all():
            r, b, k = (int(i) for i in (~hit.any(-1)).nonzero()[0])
            raise QuantError(f"value {v[r, b, k, 0].item()!r} at [{r0 + r}, {b * NV_BLOCK + k}] is not "
                             f"representable in NVFP4 with block scale {float(scales[r0 + r, b])!r}")
        code = hit.float().argmax(-1).to(torch.uint8).reshape(len(exact), cols)
        out[r0:r0 + step] = code[:, 0::2] | (code[:, 1::2] << 4)
    return out


# -- compressed-tensors pack-quantized (W4A16 / W8A16: Kimi-K2-Thinking's experts, RedHat's w4a16) --
def int_packed_parts(name: str, ckpt) -> tuple[str, ...] | None:
    """(``<name>_packed``, ``<name>_scale``, ``<name>_shape``[, ``_zero_point``][, ``_g_idx``]) when
    ``name`` is stored in compressed-tensors' pack-quantized form, else None: int32 words of
    32 / bits signed codes along the columns (lowest bits first, offset by 2**(bits-1)), a scale
    per group of columns [rows, groups] (one group: per channel), the logical [rows, cols], and
    for asymmetric codes a zero point per group, packed the same way down the rows; with
    activation order (``actorder: group``) ``<name>_g_idx`` [cols], each column's group."""
    packed = f"{name}_packed"
    if packed not in ckpt:
        return None
    scale, shape = f"{name}_scale", f"{name}_shape"
    for part in (scale, shape):
        if part not in ckpt:
            raise QuantError(f"{packed} has no {part}: pack-quantized needs both")
    if name in ckpt:
        raise QuantError(f"{name} is stored both as values and as pack-quantized {packed}")
    if ckpt.dtype(packed) != torch.int32 or len(ckpt.shape(packed)) != 2:
        raise QuantError(f"{packed} is {ckpt.dtype(packed)} {tuple(ckpt.shape(packed))}: int32 [rows, words] expected")
    return (packed, scale, shape) + tuple(f"{name}{s}" for s in ("_zero_point", "_g_idx") if f"{name}{s}" in ckpt)


def int_bits(words: int, cols: int, what: str) -> int:
    """The code width that packs ``cols`` values into ``words`` int32 words (4 or 8)."""
    for bits in (4, 8):
        if math.ceil(cols * bits / 32) == words:
            return bits
    raise QuantError(f"{what}: {words} int32 words a row hold neither 4- nor 8-bit codes of {cols} columns")


def _per_column(t: torch.Tensor, rows: int, cols: int, what: str, part: str = "scale",
                g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` [rows, groups] spread over each group's consecutive columns (``g_idx`` [cols]: over
    the columns it assigns the group): [rows, cols]."""
    if g_idx is not None:
        g = g_idx.to(torch.int64)
        if t.dim() != 2 or t.shape[0] != rows or g.shape != (cols,) or int(g.min()) < 0 or int(g.max()) >= t.shape[1]:
            raise QuantError(f"{what}: g_idx {tuple(g_idx.shape)} does not give each of {cols} columns one of "
                             f"the {part}'s groups {tuple(t.shape)}")
        return t[:, g]
    if t.dim() != 2 or t.shape[0] != rows or cols % t.shape[1]:
        raise QuantError(f"{what}: {part} {tuple(t.shape)} is not [{rows}, groups] with groups dividing "
                         f"{cols} columns (ragged groups are not read)")
    return t.repeat_interleave(cols // t.shape[1], 1)


def int_unpack(packed: torch.Tensor, cols: int, bits: int) -> torch.Tensor:
    """Signed codes [rows, cols] (int32) of int32 words [rows, words]."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))


def int_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words of signed codes [rows, cols] (the inverse of ``int_unpack``)."""
    per = 32 // bits
    rows, cols = codes.shape
    u = torch.nn.functional.pad(codes.to(torch.int64) + (1 << (bits - 1)), (0, -cols % per))
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (u.reshape(rows, -1, per) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement


def _zero_points(zero: torch.Tensor | None, rows: int, cols: int, bits: int, what: str,
                 g_idx: torch.Tensor | None = None) -> torch.Tensor | int:
    """Signed zero points [rows, cols] of words packed down the rows (0 without any)."""
    if zero is None:
        return 0
    if zero.dtype != torch.int32 or zero.dim() != 2 or zero.shape[0] != math.ceil(rows * bits / 32):
        raise QuantError(f"{what}: zero point {zero.dtype} {tuple(zero.shape)} is not int32 "
                         f"[{math.ceil(rows * bits / 32)}, groups] (codes packed down {rows} rows)")
    return _per_column(int_unpack(zero.T.contiguous(), rows, bits).T, rows, cols, what, "zero point", g_idx)


def int_dequantize(packed: torch.Tensor, scale: torch.Tensor, shape: torch.Tensor, what: str = "weight",
                   dtype: torch.dtype = torch.bfloat16, zero: torch.Tensor | None = None,
                   g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """(code - zero point) x group scale, in float32 (exact for bf16 / fp16 scales), rounded once
    to ``dtype``; ``g_idx``: each column's group (activation order)."""
    rows, cols = (int(x) for x in shape.tolist())
    if packed.shape[0] != rows:
        raise QuantError(f"{what}: {packed.shape[0]} packed rows, weight_shape says {rows}")
    bits = int_bits(packed.shape[1], cols, what)
    q = int_unpack(packed, cols, bits) - _zero_points(zero, rows, cols, bits, what, g_idx)
    return (q.float() * _per_column(scale, rows, cols, what, g_idx=g_idx).float()).to(dtype)


def int_quantize(values: torch.Tensor, scale: torch.Tensor, words: int, what: str = "weight",
                 zero: torch.Tensor | None = None, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` [rows, cols] as int32 words with the source's group ``scale`` (zero points,
    g_idx): the codes of ``int_dequantize``'s values come back exactly."""
    rows, cols = values.shape
    bits = int_bits(words, cols, what)
    lim = 1 << (bits - 1)
    q = torch.round(values.float() / _per_column(scale, rows, cols, what, g_idx=g_idx).float()) + \
        _zero_points(zero, rows, cols, bits, what, g_idx)
    return int_pack(q.clamp(-lim, lim - 1).to(torch.int32), bits)
