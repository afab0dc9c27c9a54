"""Streaming HF safetensors I/O.

Reader: one file or a sharded ``model.safetensors.index.json``; headers are read up front and
validated (shards inside the directory, sizes consistent with the header), tensors are read one
at a time on demand, so each rank reads only what it needs.

Writer: sharded safetensors + index + config.json (+ tokenizer / generation files copied from
the source), written into a temporary sibling directory that is renamed into place at the end:
a failed export leaves nothing at the target path.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json",
                "generation_config.json", "chat_template.jinja", "chat_template.json")

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed or inconsistent; the message names the file."""


def read_header(path: Path) -> dict:
    """Parse and validate a safetensors header without reading tensor data."""
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
        need = math.prod(shape) * _DTYPES[dtype].itemsize if dtype in _DTYPES else b - a
        if b - a != need or a > b:
            raise CheckpointError(f"{path}: tensor {name}: data_offsets [{a}, {b}] hold {b - a} "
                                  f"bytes, shape {shape} {dtype} needs {need}")
        end = max(end, b)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + n + end} "
                              f"bytes, file has {size}")
    return header


class HFCheckpoint:
    """Read-only view of an HF safetensors checkpoint directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._open: dict[Path, object] = {}
        index, single = self.path / INDEX, self.path / SINGLE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            shards = {}
            root = self.path.resolve()
            for name, shard in weight_map.items():
                p = (self.path / shard).resolve()
                if root not in p.parents:
                    raise CheckpointError(f"{index}: shard {shard!r} of {name} lies outside "
                                          f"the checkpoint directory")
                if not p.exists():
                    raise CheckpointError(f"{index}: shard {shard!r} (holding {name}) does not exist")
                shards.setdefault(p, []).append(name)
            files = list(shards)
        elif single.exists():
            files = [single]
        else:
            raise CheckpointError(f"{self.path}: no {SINGLE} or {INDEX} found")
        for f in files:
            for name, info in read_header(f).items():
                if name in self._where:
                    raise CheckpointError(f"{f}: tensor {name} also in {self._where[name]}")
                if info["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{f}: tensor {name} has unsupported dtype {info['dtype']}")
                self._where[name] = f
                self._meta[name] = (tuple(info["shape"]), _DTYPES[info["dtype"]])
        if index.exists():
            missing = set(weight_map) - set(self._where)
            if missing:
                raise CheckpointError(f"{index}: tensors listed but absent from their shard: "
                                      f"{sorted(missing)[:5]}")

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name} not found in the checkpoint")
        f = self._where[name]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f].get_tensor(name)

    def config(self) -> dict:
        return self.read_config(self.path)

    @staticmethod
    def read_config(path: str | os.PathLike) -> dict:
        p = Path(path) / "config.json"
        if not p.exists():
            raise CheckpointError(f"{path}: no config.json")
        try:
            cfg = json.loads(p.read_text())
        except ValueError as e:
            raise CheckpointError(f"{p}: invalid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{p}: not a JSON object")
        return cfg


def save_hf_checkpoint(tensors: Iterable[tuple[str, torch.Tensor]], config: dict,
                       out_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write an HF checkpoint atomically (temporary directory, then rename into place)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        shards = list(_write_shards(tensors, tmp, max_shard_bytes))
        weight_map = {n: f for f, names in shards for n in names}
        if len(shards) == 1:
            (tmp / shards[0][0]).rename(tmp / SINGLE)
        else:
            total = sum((tmp / f).stat().st_size for f, _ in shards)
            _write_json(tmp / INDEX, {"metadata": {"total_size": total},
                                      "weight_map": dict(sorted(weight_map.items()))})
        _write_json(tmp / "config.json", config)
        if source_dir is not None:
            for name in COPIED_FILES:
                if (Path(source_dir) / name).exists():
                    shutil.copy2(Path(source_dir) / name, tmp / name)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_shards(tensors, tmp: Path, max_bytes: int) -> Iterator[tuple[str, list[str]]]:
    batch: dict[str, torch.Tensor] = {}
    size, idx, written = 0, 0, set()
    for name, t in tensors:
        if name in written or name in batch:
            raise ValueError(f"export produced tensor {name} twice")
        nbytes = t.numel() * t.element_size()
        if batch and size + nbytes > max_bytes:
            idx += 1
            yield _flush(batch, tmp, idx)
            written |= set(batch)
            batch, size = {}, 0
        batch[name] = t.detach().cpu().contiguous()
        size += nbytes
    idx += 1
    yield _flush(batch, tmp, idx)


def _flush(batch: dict, tmp: Path, idx: int) -> tuple[str, list[str]]:
    name = f"model-{idx:05d}.safetensors"
    save_file(batch, str(tmp / name), metadata={"format": "pt"})
    return name, list(batch)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is moved aside first and removed after."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
