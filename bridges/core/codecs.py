"""One view of an HF checkpoint, with a codec per stored format.

A mapping names *logical* tensors (``model.layers.0.mlp.experts.gate_up_proj``, or one row of it:
``...gate_up_proj[3]``). How a checkpoint stores one is its codec's business:

- ``Plain``: the tensor itself.
- ``FP8``: float8 codes plus a scale companion, per block (``<name>_scale_inv``, tiles from
  ``quantization_config.weight_block_size``) or per tensor / row (``<name>_scale``, or
  ``<name>_scale_inv`` without a block size), and a static ``activation_scale`` where stored.
- Every codec (``Plain`` too) counts the KV-cache scales ModelOpt stores beside a k / v
  projection (compressed-tensors: on its attention module) as that projection's parts,
  written back only where the export keeps the format.
- ``MXFP4``: ``<name>_blocks`` (uint8, two e2m1 codes a byte) and ``<name>_scales`` (uint8
  exponents), as gpt-oss ships its experts.
- ``PackedInt``: compressed-tensors' pack-quantized ``<name>_packed`` (int32 words of 4- or
  8-bit codes), ``<name>_scale`` (a scale per column group) and ``<name>_shape``.
- ``GPTQ``: GPTQ's and AWQ's ``<p>.qweight`` / ``<p>.qzeros`` / ``<p>.scales`` (/ ``<p>.g_idx``)
  for logical ``<p>.weight`` (bridges/core/gptq.py).
- ``BNB4``: bitsandbytes 4-bit (NF4 / FP4): ``<name>`` uint8 codes with ``<name>.absmax``,
  ``.quant_map`` (double quantization: ``.nested_absmax``, ``.nested_quant_map``) and its
  ``.quant_state.bitsandbytes__<type>``; ``BNB8``: its 8-bit, ``<name>`` int8 with ``<p>.SCB``
  row scales (bridges/core/bnb.py).
- ``NVFP4``: ``<name>`` itself uint8 (two e2m1 codes a byte) with ``<name>_scale`` (float8, one a
  16 values), ``<name>_scale_2`` (per tensor) and an ``input_scale``, as NVIDIA ModelOpt ships;
  or compressed-tensors' ``<name>_packed`` codes with ``<name>_global_scale`` (a divisor).

``CheckpointView`` finds the codec of a name and reads it as values (``read``), says which
stored tensors that consumed (``used``: the coverage ledger counts them), and encodes an
exported tensor back (``encode``): as values in the source's dtype, or, with ``quantized``,
in the source's format with the source's scales, bit-exactly. A new stored format is one more
codec in ``CODECS``; the bridge and the mappings do not change.
"""
from __future__ import annotations

from typing import Any

import torch

from bridges.core import bnb, gptq, quant
from bridges.core.hf_io import CheckpointError, HFCheckpoint
from bridges.core.mappings import split_row


def _named(ckpt: HFCheckpoint, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, a QuantError raised as a CheckpointError naming the checkpoint."""
    try:
        return fn(*args, **kwargs)
    except quant.QuantError as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None


class Codec:
    """A stored format. ``parts`` is None when ``name`` is not stored this way."""

    def parts(self, ckpt: HFCheckpoint, name: str) -> tuple[str, ...] | None:
        raise NotImplementedError

    def decode(self, ckpt: HFCheckpoint, parts: tuple[str, ...], row: int | None,
               dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, ckpt: HFCheckpoint, parts: tuple[str, ...], t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``t`` (values) in this format with the source's scales."""
        raise NotImplementedError

    what = ""  # the format's name in errors

    def _whole(self, ckpt: HFCheckpoint, parts: tuple[str, ...], row: int | None) -> None:
        """Formats read whole only: a row of a stacked tensor is refused, naming it."""
        if row is not None:
            raise CheckpointError(f"{ckpt.path}: {parts[0]} is {self.what} and stacked: no dequantization path")

    @staticmethod
    def _beside_source(ckpt: HFCheckpoint, parts: tuple[str, ...], codes: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """New codes under the codes' name; every companion as the source stores it."""
        return [(parts[0], codes)] + [(p, ckpt.get(p)) for p in parts[1:]]


class Plain(Codec):
    def parts(self, ckpt, name):  # with the KV-cache scales of a projection ModelOpt left unquantized
        return (name,) + quant.kv_cache_scales(name, ckpt) if name in ckpt else None

    def decode(self, ckpt, parts, row, dtype):
        name = parts[0]
        if row is not None:
            return ckpt.get_row(name, row)
        t = ckpt.get(name)
        if t.dtype in (torch.uint8, torch.int8) and name.endswith(("_blocks", "_scales")):
            raise CheckpointError(f"{ckpt.path}: {name} is packed {t.dtype} (MXFP4-style blocks) "
                                  f"and read as a tensor of its own: no mapping dequantizes it")
        return t

    def encode(self, ckpt, parts, t):
        return [(parts[0], t.to(ckpt.dtype(parts[0])))] + [(p, ckpt.get(p)) for p in parts[1:]]


class FP8(Codec):
    def parts(self, ckpt, name):
        if name not in ckpt or ckpt.dtype(name) not in quant.FP8:
            return None
        comp = quant.companion(name, ckpt)
        if comp is None:
            raise CheckpointError(f"{ckpt.path}: {name} is {ckpt.dtype(name)} with no scale companion "
                                  f"({name}_scale_inv or {name}_scale): no dequantization path")
        return (name, comp[0]) + quant.calibration(name, ckpt)

    @staticmethod
    def _layout(ckpt, parts) -> tuple[str, tuple[int, int] | None]:
        """(kind, block size): a ``_scale_inv`` is per block where the config gives a block size,
        per tensor (or row) where it gives none, as transformers' fine-grained FP8."""
        block = quant.block_size(ckpt.config())
        return ("block" if parts[1].endswith("_scale_inv") and block is not None else "tensor"), block

    def decode(self, ckpt, parts, row, dtype):
        if row is not None:
            raise CheckpointError(f"{ckpt.path}: {parts[0]} is FP8 and stacked: reading it row by "
                                  f"row has no dequantization path yet")
        try:
            return quant.dequantize(ckpt.get(parts[0]), ckpt.get(parts[1]), *self._layout(ckpt, parts))
        except quant.QuantError as e:
            raise CheckpointError(f"{ckpt.path}: {parts[0]}: {e}") from None

    def encode(self, ckpt, parts, t):
        q, sc = quant.quantize(t, ckpt.get(parts[1]), *self._layout(ckpt, parts), ckpt.dtype(parts[0]))
        # a static activation scale is calibration data the Megatron model does not hold
        return [(parts[0], q), (parts[1], sc.to(ckpt.dtype(parts[1])))] + [(p, ckpt.get(p)) for p in parts[2:]]


class MXFP4(Codec):
    def parts(self, ckpt, name):
        return None if name in ckpt else _named(ckpt, quant.packed_parts, name, ckpt)

    def decode(self, ckpt, parts, row, dtype):
        blocks, scales = parts
        if row is None:
            return quant.mxfp4_dequantize(ckpt.get(blocks), ckpt.get(scales), dtype)
        return quant.mxfp4_dequantize(ckpt.get_row(blocks, row)[None], ckpt.get_row(scales, row)[None], dtype)[0]

    def encode(self, ckpt, parts, t):
        sc = ckpt.get(parts[1])
        return [(parts[0], quant.mxfp4_quantize(t, sc)), (parts[1], sc)]


class NVFP4(Codec):
    """ModelOpt's (codes under the weight's own name, ``_scale_2`` a factor) and compressed-
    tensors' (``_packed`` codes, ``_global_scale`` a divisor)."""

    what = "NVFP4"

    def parts(self, ckpt, name):
        return _named(ckpt, quant.nvfp4_parts, name, ckpt) or _named(ckpt, quant.ct_nvfp4_parts, name, ckpt)

    @staticmethod
    def _divisor(parts) -> bool:
        return parts[0].endswith("_packed")

    def decode(self, ckpt, parts, row, dtype):
        self._whole(ckpt, parts, row)
        return quant.nvfp4_dequantize(ckpt.get(parts[0]), ckpt.get(parts[1]), ckpt.get(parts[2]), dtype,
                                      self._divisor(parts))

    def encode(self, ckpt, parts, t):
        codes = quant.nvfp4_quantize(t, ckpt.get(parts[1]), ckpt.get(parts[2]), self._divisor(parts))
        # the scales and the calibrated input scale are the source's (the model holds values)
        return self._beside_source(ckpt, parts, codes)


class PackedInt(Codec):
    what = "pack-quantized"

    def parts(self, ckpt, name):
        return _named(ckpt, quant.int_packed_parts, name, ckpt)

    @staticmethod
    def _extra(ckpt, parts) -> dict:  # zero points (asymmetric), g_idx (activation order)
        return {k: next((ckpt.get(p) for p in parts[3:] if p.endswith(s)), None)
                for k, s in (("zero", "_zero_point"), ("g_idx", "_g_idx"))}

    def decode(self, ckpt, parts, row, dtype):
        self._whole(ckpt, parts, row)
        return _named(ckpt, quant.int_dequantize, *(ckpt.get(p) for p in parts[:3]), parts[0], dtype,
                      **self._extra(ckpt, parts))

    def encode(self, ckpt, parts, t):
        words = _named(ckpt, quant.int_quantize, t, ckpt.get(parts[1]), ckpt.shape(parts[0])[1], parts[0],
                       **self._extra(ckpt, parts))
        return self._beside_source(ckpt, parts, words)


class GPTQ(Codec):
    what = "GPTQ / AWQ"

    def parts(self, ckpt, name):
        return _named(ckpt, gptq.parts, name, ckpt)

    @staticmethod
    def _g_idx(ckpt, parts):
        return ckpt.get(parts[3]) if len(parts) > 3 else None

    def decode(self, ckpt, parts, row, dtype):
        self._whole(ckpt, parts, row)
        return _named(ckpt, gptq.dequantize, *(ckpt.get(p) for p in parts[:3]), self._g_idx(ckpt, parts),
                      ckpt.config(), parts[0], dtype)

    def encode(self, ckpt, parts, t):
        words = _named(ckpt, gptq.quantize, t, ckpt.get(parts[1]), ckpt.get(parts[2]), self._g_idx(ckpt, parts),
                       ckpt.config(), parts[0])
        return self._beside_source(ckpt, parts, words)


class BNB4(Codec):
    what = "bitsandbytes 4-bit"

    def parts(self, ckpt, name):
        return _named(ckpt, bnb.parts, name, ckpt)

    @staticmethod
    def _state(ckpt, parts):
        tensors = {p.rsplit(".", 1)[1]: ckpt.get(p) for p in parts[1:-1]}
        return tensors, _named(ckpt, bnb.state, ckpt.get(parts[-1]), parts[0])

    def decode(self, ckpt, parts, row, dtype):
        self._whole(ckpt, parts, row)
        return _named(ckpt, bnb.dequantize, ckpt.get(parts[0]), *self._state(ckpt, parts), parts[0], dtype)

    def encode(self, ckpt, parts, t):
        codes = _named(ckpt, bnb.quantize, t, *self._state(ckpt, parts), parts[0])
        return self._beside_source(ckpt, parts, codes)


class BNB8(Codec):
    what = "bitsandbytes 8-bit"

    def parts(self, ckpt, name):
        return _named(ckpt, bnb.parts8, name, ckpt)

    def decode(self, ckpt, parts, row, dtype):
        self._whole(ckpt, parts, row)
        return _named(ckpt, bnb.dequantize8, ckpt.get(parts[0]), ckpt.get(parts[1]), parts[0], dtype)

    def encode(self, ckpt, parts, t):
        codes = _named(ckpt, bnb.quantize8, t, ckpt.get(parts[1]), parts[0])
        return self._beside_source(ckpt, parts, codes)


CODECS: tuple[Codec, ...] = (MXFP4(), BNB4(), BNB8(), NVFP4(), PackedInt(), GPTQ(), FP8(), Plain())
# formats whose codes are not stored under the logical tensor's name: (logical suffix, codes suffix)
STORED_APART = (("", "_blocks"), ("", "_packed"), (".weight", ".qweight"))


def stored_apart(name: str) -> list[str]:
    """The names a logical tensor's codes may be stored under in those formats."""
    return [name[:len(name) - len(a)] + c for a, c in STORED_APART if name.endswith(a)]


def logical_name(stored: str) -> str | None:
    """The logical tensor whose codes ``stored`` holds in one of those formats (None: not such)."""
    return next((stored[:-len(c)] + a for a, c in STORED_APART if stored.endswith(c)), None)


def quantized_name(stored: str) -> str | None:
    """The logical weight that stored tensor ``stored`` shows to be quantized in an integer / FP4
    format (codes stored apart, or a bitsandbytes state / row scales), else None. FP8 and
    ModelOpt's NVFP4 show it by dtype instead."""
    return logical_name(stored) or bnb.weight_of(stored)


class CheckpointView:
    """A checkpoint as logical tensors (``name`` or ``name[row]``), through its codecs."""

    def __init__(self, ckpt: HFCheckpoint, dequantized_dtype: torch.dtype = torch.bfloat16,
                 export_dtype: torch.dtype | None = None):
        self.ckpt = ckpt
        self.dequantized_dtype = dequantized_dtype
        self.export_dtype = export_dtype  # values written in this dtype instead of the source's
        self._memo: dict[str, Any] = {}

    def codec(self, name: str) -> tuple[Codec, tuple[str, ...]] | None:
        """The codec storing logical tensor ``name`` and its stored parts (None: absent)."""
        if name not in self._memo:
            self._memo[name] = next(((c, p) for c in CODECS if (p := c.parts(self.ckpt, name))), None)
        return self._memo[name]

    def has(self, name: str) -> bool:
        base, row = split_row(name)
        try:
            found = self.codec(base)
        except CheckpointError:
            return True  # a broken pair: reading it names the problem
        return found is not None and (row is None or row < self.ckpt.shape(found[1][0])[0])

    def read(self, name: str) -> torch.Tensor:
        """The values of ``name`` (or of one row: ``name[k]``)."""
        base, row = split_row(name)
        found = self.codec(base)
        if found is None:
            raise CheckpointError(f"{self.ckpt.path}: no tensor {base}")
        codec, parts = found
        return codec.decode(self.ckpt, parts, row, self.dequantized_dtype)

    def used(self, name: str) -> list[str]:
        """The stored tensors (or rows) that reading ``name`` consumes."""
        base, row = split_row(name)
        found = self.codec(base)
        parts = found[1] if found else (base,)
        if row is None:
            return list(parts)
        # the rows of a stacked tensor; an FP8 scale companion is read whole
        return [f"{p}[{row}]" if i == 0 or isinstance(found[0], MXFP4) else p for i, p in enumerate(parts)]

    def encode(self, name: str, t: torch.Tensor, quantized: bool) -> list[tuple[str, torch.Tensor]]:
        """An exported tensor as the output stores it: in the source's format (``quantized``)
        or as values (the source's dtype; dequantized_dtype for what was quantized there)."""
        found = self.codec(name) if name in self.ckpt or self._packed(name) else None
        if found is None:
            return [(name, t)]
        codec, parts = found
        if isinstance(codec, Plain):  # its KV-cache scales only where the export keeps the format
            out = codec.encode(self.ckpt, parts if quantized else parts[:1], t)
            if self.export_dtype is not None and self.ckpt.dtype(parts[0]).is_floating_point:
                out[0] = (name, t.to(self.export_dtype))
            return out
        if quantized:
            return codec.encode(self.ckpt, parts, t)
        return [(name, t.to(self.export_dtype or self.dequantized_dtype))]

    def output_dtype(self, name: str) -> torch.dtype:
        """The dtype ``encode`` writes a stored (non-float8) tensor in, as values."""
        dtype = self.ckpt.dtype(name)
        return self.export_dtype if self.export_dtype is not None and dtype.is_floating_point else dtype

    def _packed(self, name: str) -> bool:  # stored under other names only: MXFP4, pack-quantized, GPTQ
        return any(n in self.ckpt for n in stored_apart(name))

    def output_names(self, names: set[str], quantized: bool) -> set[str]:
        """What an export of the stored ``names`` writes: the same names with ``quantized``;
        else values only (no scale companions, an MXFP4 pair as its logical tensor)."""
        if quantized:
            return set(names)
        out = set(names)
        for n in names:
            out -= set(quant.kv_cache_scales(n, self.ckpt))
            b = (bnb.parts(n, self.ckpt) or bnb.parts8(n, self.ckpt)) if n in self.ckpt else None
            if b:  # the codes' name is the weight's: its companions go
                out -= set(b[1:])
                continue
            nv = quant.nvfp4_parts(n, self.ckpt) if n in self.ckpt else None
            if nv:
                out -= set(nv[1:])
                continue
            comp = quant.companion(n, self.ckpt)
            if comp:
                out -= {comp[0], *quant.calibration(n, self.ckpt)}
            logical = logical_name(n)
            if logical and (found := self.codec(logical)):
                out -= set(found[1])  # codes and every companion: scales, zero points, shape, g_idx
                out.add(logical)
        return out
