"""GPTQ and AWQ int checkpoints: a linear's ``<p>.weight`` stored as ``<p>.qweight`` (int32 words
of codes), ``<p>.qzeros`` (int32 words of zero points), ``<p>.scales`` [groups, out] (fp16) and,
for GPTQ, ``<p>.g_idx`` int32 [in] (each input column's group: activation order included).

- GPTQ (``quant_method: gptq``: AutoGPTQ, GPTQModel, optimum; Qwen's and most community int4 /
  int8 releases): qweight [in * bits / 32, out], codes packed down the input rows, lowest bits
  first; qzeros [groups, out * bits / 32] packed along the output columns the same way.
  ``checkpoint_format: gptq`` (v1, the default) stores every zero point minus one, ``gptq_v2``
  as it is. 2-, 4- and 8-bit codes (3-bit words straddle, refused).
- AWQ (``quant_method: awq``, ``version: gemm``: AutoAWQ, Qwen's AWQ releases): qweight
  [in, out / 8] and qzeros [groups, out / 8], 4-bit codes packed along the output columns in
  AWQ's interleaved order (word nibble k holds column ``AWQ_ORDER[k]`` of its eight); groups of
  ``group_size`` consecutive input rows. Other versions (gemv, marlin) are refused by name.

value[out, in] = (code - zero[g(in), out]) * scales[g(in), out], in float32 (exact for fp16
scales), rounded once to the model dtype. Re-encoding takes the source's scales, zero points and
g_idx, so codes come back exactly (a model dtype's rounding moves a value by under half a step).
"""
from __future__ import annotations

import torch

from bridges.core.quant import QuantError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column (of a word's eight) held by nibble k
PARTS = ("qweight", "qzeros", "scales", "g_idx")


def settings(config: dict) -> dict:
    """The layout a config's ``quantization_config`` describes (method, bits, group size, whether
    zero points are stored minus one), checked; {} for another quantization method. Activation
    order needs no setting: a stored ``g_idx`` gives each row's group."""
    qc = (config.get("text_config") or {}).get("quantization_config") or config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method not in ("gptq", "awq"):
        return {}
    bits, group = int(qc.get("bits", qc.get("w_bit", 4))), int(qc.get("group_size", qc.get("q_group_size", 128)))
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm" or bits != 4:
            raise QuantError(f"quantization_config: AWQ version {version!r} with {bits}-bit codes is not read "
                             "(only AutoAWQ's gemm layout, 4-bit)")
        if qc.get("zero_point") is False:
            raise QuantError("quantization_config: AWQ without zero points (zero_point: false) is not read")
    elif bits not in (2, 4, 8):
        raise QuantError(f"quantization_config: GPTQ with {bits}-bit codes is not read (2, 4 or 8: "
                         "other widths straddle the int32 words)")
    fmt = qc.get("checkpoint_format", "gptq")
    if method == "gptq" and fmt not in ("gptq", "gptq_v2"):
        raise QuantError(f"quantization_config: GPTQ checkpoint_format {fmt!r} is not read (gptq, gptq_v2)")
    return {"method": method, "bits": bits, "group_size": group, "v1": method == "gptq" and fmt == "gptq"}


def parts(name: str, ckpt) -> tuple[str, ...] | None:
    """(qweight, qzeros, scales[, g_idx]) of logical ``<p>.weight`` when stored so, else None."""
    if not name.endswith(".weight") or f"{name[:-len('weight')]}qweight" not in ckpt:
        return None
    p = name[:-len("weight")]
    if not settings(ckpt.config()):
        raise QuantError(f"{p}qweight: a GPTQ / AWQ tensor, but quantization_config's quant_method is "
                         "neither gptq nor awq")
    if name in ckpt:
        raise QuantError(f"{name} is stored both as values and as {p}qweight")
    found = tuple(p + s for s in PARTS if p + s in ckpt)
    for s in PARTS[1:3]:
        if p + s not in found:
            raise QuantError(f"{p}qweight has no {p}{s}")
    for s in PARTS[:2]:
        if ckpt.dtype(p + s) != torch.int32 or len(ckpt.shape(p + s)) != 2:
            raise QuantError(f"{p}{s} is {ckpt.dtype(p + s)} {tuple(ckpt.shape(p + s))}: int32 [rows, cols] expected")
    return found


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned codes of int32 ``words``, each word's codes (lowest bits first) laid along ``dim``."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, C, per]
    if dim == 0:
        return codes.permute(0, 2, 1).reshape(words.shape[0] * per, words.shape[1])
    return codes.reshape(words.shape[0], words.shape[1] * per)


def _pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words of unsigned ``codes`` packed along ``dim`` (the inverse of ``_unpack``)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    c = codes.to(torch.int64)
    c = c.reshape(-1, per, c.shape[1]).permute(0, 2, 1) if dim == 0 else c.reshape(c.shape[0], -1, per)
    words = (c << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement


def _awq_columns(codes: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """AWQ's nibble order to natural column order (``inverse``: back)."""
    order = torch.tensor(AWQ_ORDER)
    index = order if inverse else torch.argsort(order)
    n = codes.shape[1] // 8
    return codes.reshape(codes.shape[0], n, 8)[:, :, index].reshape(codes.shape)


def _groups(rows: int, out: int, qzeros, scales, g_idx, s: dict, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the group of each of ``rows`` input rows [rows], zero points [groups, out]), shapes checked."""
    per = 32 // s["bits"]
    if scales.dim() != 2 or scales.shape[1] != out or out % per or tuple(qzeros.shape) != (scales.shape[0], out // per):
        raise QuantError(f"{what}: qzeros {tuple(qzeros.shape)} and scales {tuple(scales.shape)} do not describe "
                         f"[groups, {out}] in {s['bits']}-bit {s['method']} words")
    groups = scales.shape[0]
    if g_idx is None:
        if rows % groups:
            raise QuantError(f"{what}: {rows} input rows do not split into {groups} equal groups")
        g = torch.arange(rows) // (rows // groups)
    else:
        g = g_idx.to(torch.int64)
        if g.shape != (rows,) or int(g.min()) < 0 or int(g.max()) >= groups:
            raise QuantError(f"{what}: g_idx {tuple(g_idx.shape)} does not give each of {rows} input rows "
                             f"one of {groups} groups")
    zeros = _unpack(qzeros, s["bits"], 1)
    if s["method"] == "awq":
        zeros = _awq_columns(zeros)
    return g, zeros + (1 if s["v1"] else 0)


def dequantize(qweight, qzeros, scales, g_idx, config: dict, what: str = "weight",
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The logical weight [out, in]."""
    s = settings(config)
    if s["method"] == "awq":
        codes = _awq_columns(_unpack(qweight, 4, 1))
    else:
        codes = _unpack(qweight, s["bits"], 0)
    g, zeros = _groups(codes.shape[0], codes.shape[1], qzeros, scales, g_idx, s, what)
    values = (codes - zeros[g]).float() * scales.float()[g]  # [in, out]
    return values.T.to(dtype).contiguous()


def quantize(values: torch.Tensor, qzeros, scales, g_idx, config: dict, what: str = "weight") -> torch.Tensor:
    """``values`` [out, in] as the source's qweight words, with its scales, zero points and g_idx."""
    s = settings(config)
    out, rows = values.shape
    g, zeros = _groups(rows, out, qzeros, scales, g_idx, s, what)
    codes = (torch.round(values.T.float() / scales.float()[g]) + zeros[g]).clamp(0, (1 << s["bits"]) - 1)
    if s["method"] == "awq":
        return _pack(_awq_columns(codes.to(torch.int32), inverse=True), 4, 1)
    return _pack(codes.to(torch.int32), s["bits"], 0)
