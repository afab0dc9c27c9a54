"""Streaming HF safetensors I/O.

Reader: one file or a sharded ``model.safetensors.index.json``; headers are read up front and
validated (shards inside the directory, sizes consistent with the header), tensors are read one
at a time on demand, so each rank reads only what it needs. Each read maps that tensor's bytes
anew (from the offsets of the header read up front): the tensor returned is a view of a memory
map that lives as long as the tensor (a handle kept open would keep every page read resident
in the process, the whole checkpoint after an import).

Pickle checkpoints (``pytorch_model.bin``, its ``.index.json``, any ``*.bin`` / ``*.pt``) can run
arbitrary code when unpickled: they are refused unless the caller passes ``allow_pickle=True``,
and then read with ``torch.load(weights_only=True, mmap=True)``, which refuses every object
that is not a tensor or a plain container. When a directory has safetensors, those are used
and pickle files next to them are ignored.

Writer: sharded safetensors + index + config.json (+ tokenizer / generation files copied from
the source), written into a temporary sibling directory (``.<name>.tmp-<host>-<pid>-*``) that is
fsynced and renamed into place at the end: a failed or killed export leaves nothing at the
target path, and the previous output, if any, stays whole. Temporary siblings left by a killed
writer (a dead process of this host) are removed by the next save to the same target. The
output is deterministic: the same tensors and config give byte-identical files.
"""
from __future__ import annotations

import copy
import ctypes
import json
import math
import mmap
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors.torch import save_file

from bridges.core.outdir import writing
from bridges.core.st_header import CheckpointError, _read_header, read_header  # noqa: F401 - re-exported

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PT_INDEX = "pytorch_model.bin.index.json"
PT_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt")
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json",
                "generation_config.json", "chat_template.jinja", "chat_template.json")
# what a quantized export copies besides: NVIDIA ModelOpt's description of the quantization,
# which inference engines read (a values export is not quantized and leaves it out)
QUANT_FILES = ("hf_quant_config.json",)

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class PickleRefusedError(CheckpointError):
    """A pickle checkpoint was found and ``allow_pickle`` was not given; names the file."""


def _map(path: Path, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes [start, end) of ``path`` as a 1-D tensor: a private (copy-on-write) memory map of
    those pages only, released with the tensor. Costs an open and an mmap (0.02 ms), where a
    ``safe_open`` per read also parses the shard's whole header (0.4 ms for a shard of 400
    tensors; MoE checkpoints have thousands of tensors)."""
    if end == start:
        return torch.empty(0, dtype=dtype)
    base = start - start % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < end:  # a file changed since its header was read
            raise CheckpointError(f"{path}: truncated safetensors file (it changed after it "
                                  f"was opened)")
        mm = mmap.mmap(f.fileno(), end - base, access=mmap.ACCESS_COPY, offset=base)
    return torch.frombuffer(mm, dtype=dtype, count=(end - start) // dtype.itemsize,
                            offset=start - base)


class HFCheckpoint:
    """Read-only view of an HF checkpoint directory: safetensors (one file or sharded), or, only
    with ``allow_pickle=True``, a PyTorch pickle checkpoint (``pytorch_model.bin``, a sharded
    ``pytorch_model.bin.index.json``, or a lone ``*.bin`` / ``*.pt``).

    Pickle files are refused by default (PickleRefusedError names the file): unpickling can run
    arbitrary code. When allowed they are read with ``torch.load(weights_only=True,
    map_location="cpu", mmap=True)``, which refuses any object other than tensors and plain
    containers. A directory holding safetensors is read from those; pickle files beside them
    are ignored (and so never refused).
    """

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False):
        self.path = Path(path)
        self.allow_pickle = allow_pickle
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._span: dict[str, tuple[int, int]] = {}  # safetensors: file offsets of the data
        self._open: dict[Path, int] = {}  # shard -> how many tensors were read from it
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._config: dict | None = None  # config.json, read on first use
        index, single = self.path / INDEX, self.path / SINGLE
        weight_map: dict[str, Path] | None = None
        if index.exists():
            weight_map = _read_index(index, self.path)
            files = list(dict.fromkeys(weight_map.values()))
        elif single.exists():
            files = [single]
        else:
            self._init_pickle()
            return
        for f in files:
            header, data = _read_header(f)
            for name, info in header.items():
                if info["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{f}: tensor {name} has unsupported dtype {info['dtype']}")
                self._add(f, name, tuple(info["shape"]), _DTYPES[info["dtype"]])
                a, b = info["data_offsets"]
                self._span[name] = (data + int(a), data + int(b))
        self._check_index(index, weight_map)

    def _add(self, f: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        if name in self._where:
            raise CheckpointError(f"{f}: tensor {name} also in {self._where[name]}")
        self._where[name] = f
        self._meta[name] = (shape, dtype)

    def _check_index(self, index: Path, weight_map: dict | None) -> None:
        if weight_map is None:
            return
        missing = set(weight_map) - set(self._where)
        if missing:
            raise CheckpointError(f"{index}: tensors listed but absent from their shard: "
                                  f"{sorted(missing)[:5]}")

    def _init_pickle(self) -> None:
        index, single = self.path / PT_INDEX, self.path / PT_SINGLE
        if index.exists():
            found = [index]
        elif single.exists():
            found = [single]
        elif self.path.is_dir():
            found = sorted(p for p in self.path.iterdir()
                           if p.suffix in PICKLE_SUFFIXES and p.is_file())
        else:
            found = []
        if not found:
            raise CheckpointError(f"{self.path}: no {SINGLE} or {INDEX} found")
        if not self.allow_pickle:
            raise PickleRefusedError(
                f"{', '.join(map(str, found))}: pickle checkpoint refused (unpickling can run "
                f"arbitrary code, and {self.path} has no {SINGLE} or {INDEX}). Convert it to "
                f"safetensors, or pass allow_pickle=True if you trust it: it is then read with "
                f"torch.load(weights_only=True), which loads tensors only")
        weight_map = None
        if index.exists():
            weight_map = _read_index(index, self.path)
            files = list(dict.fromkeys(weight_map.values()))
        elif len(found) == 1:
            files = found
        else:
            raise CheckpointError(f"{self.path}: several pickle files "
                                  f"({', '.join(p.name for p in found)}) and no {PT_INDEX}: "
                                  f"cannot tell which holds the weights")
        for f in files:
            state = _torch_load(f)
            for name, t in state.items():
                if t.dtype not in _DTYPES.values():
                    raise CheckpointError(f"{f}: tensor {name} has unsupported dtype {t.dtype}")
                self._add(f, name, tuple(t.shape), t.dtype)
            self._pickled[f] = state
        self._check_index(index, weight_map)

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
        if f in self._pickled:  # memory-mapped: copy out, as safetensors' get_tensor does
            return self._pickled[f][name].clone()
        # A map of its own per read: released with the tensor.
        self._open[f] = self._open.get(f, 0) + 1
        shape, dtype = self._meta[name]
        return _map(f, *self._span[name], dtype).view(shape)

    def get_row(self, name: str, row: int) -> torch.Tensor:
        """Row ``row`` (along dim 0) of a stacked tensor, reading only that row's bytes."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name} not found in the checkpoint")
        if not 0 <= row < self.shape(name)[0]:
            raise CheckpointError(f"{self.path}: {name} has {self.shape(name)[0]} rows along "
                                  f"dim 0; row {row} was asked for")
        f = self._where[name]
        if f in self._pickled:
            return self._pickled[f][name][row].clone()
        self._open[f] = self._open.get(f, 0) + 1
        shape, dtype = self._meta[name]
        step = math.prod(shape[1:]) * dtype.itemsize
        start = self._span[name][0] + row * step
        return _map(f, start, start + step, dtype).view(shape[1:])

    def config(self) -> dict:
        """config.json, read once (codecs ask for it per tensor); a copy the caller may change."""
        if self._config is None:
            self._config = self.read_config(self.path)
        return copy.deepcopy(self._config)

    @staticmethod
    def parse_config(text: str) -> object:
        """config.json's JSON; transformers 5 writes an infinite float as {"__float__": "Infinity"}."""
        return json.loads(text, object_hook=lambda o: float(o["__float__"]) if set(o) == {"__float__"} else o)

    @staticmethod
    def read_config(path: str | os.PathLike) -> dict:
        p = Path(path) / "config.json"
        if not p.exists():
            raise CheckpointError(f"{path}: no config.json")
        try:
            cfg = HFCheckpoint.parse_config(p.read_text())
        except ValueError as e:
            raise CheckpointError(f"{p}: invalid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{p}: not a JSON object")
        return cfg


def _read_index(index: Path, root: Path) -> dict[str, Path]:
    """An index's weight map {tensor: shard path}; every shard inside ``root`` and present."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as e:
        kind = "safetensors" if index.name == INDEX else "PyTorch"
        raise CheckpointError(f"{index}: not a valid {kind} index ({e})") from None
    out = {}
    resolved_root = root.resolve()
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: shard of {name} is {shard!r}, not a file name")
        p = (root / shard).resolve()
        if resolved_root not in p.parents:
            raise CheckpointError(f"{index}: shard {shard!r} of {name} lies outside "
                                  f"the checkpoint directory")
        if not p.exists():
            raise CheckpointError(f"{index}: shard {shard!r} (holding {name}) does not exist")
        out[name] = p
    return out


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A pickle state dict, loaded with weights_only=True (tensors and plain containers only)."""
    import pickle

    kw = dict(weights_only=True, map_location="cpu")
    try:
        try:
            obj = torch.load(path, mmap=True, **kw)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            obj = torch.load(path, **kw)  # legacy (pre-zip) format: cannot be memory-mapped
    except pickle.UnpicklingError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        why = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x),
                   lines[0] if lines else type(e).__name__)
        why = why.split(" Please use")[0]  # not torch's advice to allowlist the global
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True), which reads "
                              f"only tensors and plain containers: {why}") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse names the file
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    for name, t in obj.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor "
                                  f"(expected a flat state dict)")
    return obj


def save_hf_checkpoint(tensors: Iterable[tuple[str, torch.Tensor]], config: dict,
                       out_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None,
                       max_shard_bytes: int = 5 * 2**30,
                       plan: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None,
                       overwrite: bool = False, extra_files: tuple[str, ...] = ()) -> Path:
    """Write an HF checkpoint atomically (temporary directory, fsync, then rename into place).

    ``out_dir`` must be absent or empty; with ``overwrite`` it may also be an earlier output of
    this project and nothing else (``bridges.core.outdir``: anything else is refused, untouched).
    Deterministic: the same tensors (same order) and config give byte-identical files. Before
    writing, temporary siblings left at this target by a killed writer of this host are removed.

    ``extra_files``: more files copied from ``source_dir`` beside ``COPIED_FILES``.

    ``plan``: the ``(name, shape, dtype)`` of every tensor, in the order ``tensors`` yields them.
    With it, the shard headers are written first and each tensor is written into its place as it
    comes, by a writer thread (memory: the tensors in flight, not a shard; writing overlaps
    producing); the files are the same bytes as without a plan. A tensor that is not in the
    plan, or differs from it, is an error naming it.
    """
    out = Path(out_dir)
    with writing(out, "hf", overwrite) as tmp:
        shards = (list(_write_shards(tensors, tmp, max_shard_bytes)) if plan is None
                  else _stream_shards(tensors, plan, tmp, max_shard_bytes))
        weight_map = {n: f for f, names in shards for n in names}
        if len(shards) == 1:
            (tmp / shards[0][0]).rename(tmp / SINGLE)
        else:
            total = sum((tmp / f).stat().st_size for f, _ in shards)
            _write_json(tmp / INDEX, {"metadata": {"total_size": total},
                                      "weight_map": dict(sorted(weight_map.items()))})
        _write_json(tmp / "config.json", config)
        if source_dir is not None:
            for name in COPIED_FILES + extra_files:
                if (Path(source_dir) / name).exists():
                    shutil.copy2(Path(source_dir) / name, tmp / name)
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


# safetensors orders a file's tensors by dtype (this order, descending), then name
_ST_ORDER = {d: i for i, d in enumerate(["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16",
                                         "BF16", "I32", "F32", "F64", "I64"])}
_ST_NAMES = {v: k for k, v in _DTYPES.items()}


# How far the producer may run ahead of the writer thread, in bytes (beyond two tensors): the
# writer is not left idle while a layer's large gathered tensors are rebuilt after small ones
# (at TP > 1 each is a fresh tensor; at TP1 most are views of the parameters, costing nothing).
_AHEAD_BYTES = 256 * 2**20


def _stream_shards(tensors, plan, tmp: Path, max_bytes: int) -> list[tuple[str, list[str]]]:
    """Write ``tensors`` into shards laid out from ``plan`` up front (same cut as
    ``_write_shards``, same bytes as ``save_file``), each tensor as it comes."""
    import queue
    import threading

    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for name, shape, dtype in plan:
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype))
        size += nbytes
    where: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}  # name -> fd, offset...
    fds, out = [], []
    try:
        for idx, entries in enumerate(shards, 1):
            fname = f"model-{idx:05d}.safetensors"
            header: dict = {"__metadata__": {"format": "pt"}}
            off, spans = 0, {}
            for name, shape, dtype in sorted(entries, key=lambda e: (-_ST_ORDER[_ST_NAMES[e[2]]],
                                                                    e[0])):
                n = math.prod(shape) * dtype.itemsize
                header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                                "data_offsets": [off, off + n]}
                spans[name] = off
                off += n
            raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            raw += b" " * (-len(raw) % 8)
            fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            _pwrite_all(fd, memoryview(struct.pack("<Q", len(raw)) + raw), 0)
            os.ftruncate(fd, 8 + len(raw) + off)
            for name, shape, dtype in entries:
                where[name] = (fd, 8 + len(raw) + spans[name], shape, dtype)
            out.append((fname, [e[0] for e in entries]))
        todo: queue.Queue = queue.Queue()
        failed: list[BaseException] = []
        room = threading.Condition()
        held = [0, 0]  # tensors and bytes handed to the writer, not yet written

        def writer():
            while (item := todo.get()) is not None:
                fd, offset, t = item
                n = t.numel() * t.element_size()
                try:
                    if not failed and n:
                        buf = (ctypes.c_char * n).from_address(t.data_ptr())
                        _pwrite_all(fd, memoryview(buf).cast("B"), offset)
                except BaseException as e:  # noqa: BLE001 - re-raised by the producer
                    failed.append(e)
                del item, t  # the memory goes before the producer is told
                with room:
                    held[0] -= 1
                    held[1] -= n
                    room.notify()

        thread = threading.Thread(target=writer, name="save_hf_checkpoint", daemon=True)
        thread.start()
        seen: set[str] = set()
        try:
            for name, t in tensors:
                if failed:
                    break
                if name in seen:
                    raise ValueError(f"export produced tensor {name} twice")
                if name not in where:
                    raise ValueError(f"export produced tensor {name}, which is not in the plan")
                fd, offset, shape, dtype = where[name]
                if tuple(t.shape) != shape or t.dtype != dtype:
                    raise ValueError(f"export produced tensor {name} as {tuple(t.shape)} "
                                     f"{t.dtype}, the plan says {shape} {dtype}")
                seen.add(name)
                t = t.detach().cpu().contiguous()
                n = t.numel() * t.element_size()
                with room:  # two tensors in flight, or more while they fit in _AHEAD_BYTES
                    room.wait_for(lambda: held[0] < 2 or held[1] + n <= _AHEAD_BYTES)
                    held[0] += 1
                    held[1] += n
                todo.put((fd, offset, t))
        finally:
            todo.put(None)
            thread.join()
        if failed:
            raise failed[0]
        missing = [n for n, *_ in plan if n not in seen]
        if missing:
            raise ValueError(f"export did not produce planned tensor(s) {missing[:5]}")
    finally:
        for fd in fds:
            os.close(fd)
    return out


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + 2**30], offset + done)


def _flush(batch: dict, tmp: Path, idx: int) -> tuple[str, list[str]]:
    name = f"model-{idx:05d}.safetensors"
    save_file(batch, str(tmp / name), metadata={"format": "pt"})
    return name, list(batch)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def differences(a: HFCheckpoint, b: HFCheckpoint, limit: int = 10) -> list[str]:
    """How two HF checkpoints differ in their stored tensors (names, dtypes, bits; float8 codes
    compared as bytes): empty when every tensor is bit-identical and neither stores more. At most
    ``limit`` tensors are named."""
    import torch

    na, nb = set(a.names()), set(b.names())
    out = [f"only in {a.path}: {n}" for n in sorted(na - nb)][:limit]
    out += [f"only in {b.path}: {n}" for n in sorted(nb - na)][:limit]
    raw = lambda t: t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t  # noqa: E731
    for n in sorted(na & nb):
        if len(out) >= limit:
            break
        x, y = a.get(n), b.get(n)
        if x.dtype != y.dtype or x.shape != y.shape:
            out.append(f"{n}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
        elif not torch.equal(raw(x), raw(y)):
            diff = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else "-"
            out.append(f"{n}: values differ (max abs difference {diff:.3g})" if diff != "-" else f"{n}: values differ")
    return out
