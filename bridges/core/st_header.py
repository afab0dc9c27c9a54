"""safetensors headers, read and validated without torch (``mbridge inspect`` reads them in a
process that never imports torch); ``bridges.core.hf_io`` re-exports these names."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from bridges.core.errors import MBridgeError

# bytes per element of the safetensors dtypes hf_io reads
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(MBridgeError, ValueError):
    """A checkpoint file is missing, malformed or inconsistent; the message names the file."""


def read_header(path: Path) -> dict:
    """Parse and validate a safetensors header without reading tensor data."""
    return _read_header(path)[0]


def _read_header(path: Path) -> tuple[dict, int]:
    """``read_header``, and the file offset where the tensor data starts."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes, "
                                  f"file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            dtype, shape = info["dtype"], [int(s) for s in info["shape"]]
            a, b = (int(x) for x in info["data_offsets"])
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name}: "
                                  f"{info!r}") from None
        need = math.prod(shape) * ITEMSIZE[dtype] if dtype in ITEMSIZE else b - a
        if b - a != need or a > b:
            raise CheckpointError(f"{path}: tensor {name}: data_offsets [{a}, {b}] hold {b - a} "
                                  f"bytes, shape {shape} {dtype} needs {need}")
        end = max(end, b)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + n + end} "
                              f"bytes, file has {size}")
    return header, 8 + n
