"""Reading a torch_dist checkpoint's tensors straight into the tensors they load into.

torch.distributed.checkpoint's ``FileSystemReader`` reads each saved tensor (a ``torch.save``
archive at an offset of a ``.distcp`` file) into a buffer, unpickles it into a new tensor, then
copies the part it needs into the destination: three passes over every byte. ``DirectReader``
does one where it can: it reads the archive's directory and its small pickle (shape, strides,
dtype, storage offset), and ``pread``s the bytes of the part it needs into the destination's
memory (a GPU destination: into a reused pinned host buffer, then copied over). It does so
only for a stored record (no compression, no transform), a contiguous saved tensor whose needed
part is one contiguous range, and a contiguous destination of the same dtype; every other item
(a byte object, a slice across rows) goes through ``FileSystemReader`` unchanged. Same bytes into the same places: only fewer copies.
"""
from __future__ import annotations

import dataclasses
import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType


class _Slice(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file, as a seekable stream."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, off, whence=0):
        self.pos = off if whence == 0 else self.pos + off if whence == 1 else self.length + off
        return self.pos

    def readinto(self, buf):
        n = max(0, min(len(buf), self.length - self.pos))
        data = os.pread(self.fd, n, self.start + self.pos)
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


@dataclasses.dataclass
class _Saved:
    data_at: int  # file offset of the storage's first byte
    dtype: torch.dtype
    size: tuple
    stride: tuple
    offset: int  # storage offset, in elements


class _Rebuild:
    """What ``torch._utils._rebuild_tensor_v2`` would be called with."""

    def __init__(self, storage, offset, size, stride, *rest):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


# torch.save names a storage by its legacy class (torch.BFloat16Storage...); asking that class
# for its dtype warns each time, so the names are mapped here
_STORAGES = {f"{k}Storage": v for k, v in {
    "BFloat16": torch.bfloat16, "Half": torch.float16, "Float": torch.float32,
    "Double": torch.float64, "Long": torch.int64, "Int": torch.int32, "Short": torch.int16,
    "Char": torch.int8, "Byte": torch.uint8, "Bool": torch.bool}.items()}


class _Meta(pickle.Unpickler):
    """Unpickles a ``torch.save`` of one tensor into its layout, touching no data; anything
    else is refused (the caller then reads the item the usual way)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Rebuild
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGES:
            return _STORAGES[name]
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid):
        _, dtype, key, _location, numel = pid  # ('storage', dtype, key, location, numel)
        return (dtype, str(key), numel)


def _saved_layout(fd: int, start: int, length: int) -> _Saved | None:
    with zipfile.ZipFile(io.BufferedReader(_Slice(fd, start, length))) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl")), None)
        if pkl is None:
            return None
        obj = _Meta(io.BytesIO(zf.read(pkl))).load()
        if not isinstance(obj, _Rebuild):
            return None
        dtype, key, numel = obj.storage
        info = zf.getinfo(pkl.rsplit("/", 1)[0] + f"/data/{key}")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        head = os.pread(fd, 30, start + info.header_offset)
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        at = start + info.header_offset + 30 + name_len + extra_len
        if info.file_size < numel * torch.empty((), dtype=dtype).element_size():
            return None
        return _Saved(at, dtype, obj.size, obj.stride, obj.offset)


def _contiguous_strides(size) -> tuple:
    out, step = [], 1
    for s in reversed(size):
        out.append(step)
        step *= s
    return tuple(reversed(out))


def _byte_range(saved: _Saved, offsets, lengths) -> tuple[int, int] | None:
    """File offset and length of the part ``offsets``/``lengths`` of the saved tensor, when it
    is one contiguous range."""
    size = saved.size
    if len(size) != len(offsets) or (size and saved.stride != _contiguous_strides(size)):
        return None
    # one range when every dim before the last partial one has length 1
    partial = [d for d in range(len(size)) if lengths[d] != size[d]]
    if partial and any(lengths[d] != 1 for d in range(partial[-1])):
        return None
    item = torch.empty((), dtype=saved.dtype).element_size()
    first = saved.offset + sum(o * s for o, s in zip(offsets, saved.stride))
    numel = 1
    for n in lengths:
        numel *= n
    return saved.data_at + first * item, numel * item


def _pread_into(fd: int, target: torch.Tensor, at: int, nbytes: int) -> None:
    view = memoryview(target.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], at + done)
        if n <= 0:
            raise OSError(f"unexpected end of file reading {nbytes} bytes at {at}")
        done += n


class DirectReader(FileSystemReader):
    def read_data(self, plan, planner):
        rest, fds, layouts = [], {}, {}
        try:
            for req in plan.items:
                if not self._direct(req, planner, fds, layouts):
                    rest.append(req)
        finally:
            for fd in fds.values():
                os.close(fd)
        return super().read_data(dataclasses.replace(plan, items=rest), planner)

    def _direct(self, req, planner, fds: dict, layouts: dict) -> bool:
        if req.type == LoadItemType.BYTE_IO:
            return False
        info = self.storage_data[req.storage_index]
        if getattr(info, "transform_descriptors", None):
            return False
        target = planner.resolve_tensor(req).detach()
        if not target.is_contiguous():
            return False
        path = str(self.fs.concat_path(self.path, info.relative_path))
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY)
        fd = fds[path]
        key = (path, info.offset)
        if key not in layouts:
            try:
                layouts[key] = _saved_layout(fd, info.offset, info.length)
            except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, ValueError, TypeError,
                    AttributeError, EOFError, struct.error):
                layouts[key] = None
        saved = layouts[key]
        if saved is None or saved.dtype != target.dtype or tuple(target.shape) != tuple(req.lengths):
            return False
        where = _byte_range(saved, tuple(req.storage_offsets), tuple(req.lengths))
        if where is None or where[0] + where[1] > info.offset + info.length:
            return False
        if target.device.type == "cpu" and not self.stage_cpu:
            _pread_into(fd, target, *where)
        else:  # a GPU destination: through a (pinned) host buffer, reused
            host = self._staging(where[1]).view(target.dtype)[:target.numel()].view(target.shape)
            _pread_into(fd, host, *where)
            target.copy_(host)
        planner.commit_tensor(req, target)
        return True

    stage_cpu = False  # tests: CPU destinations through the host buffer too
    _stage: torch.Tensor | None = None

    def _staging(self, nbytes: int) -> torch.Tensor:
        if self._stage is None or self._stage.numel() < nbytes:
            self._stage = None
            self._stage = torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        return self._stage[:nbytes]
