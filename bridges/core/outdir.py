"""Output directories that never lose a user's data.

Every writer of this project (HF export, Megatron checkpoint) goes through ``writing(out)``:

- ``out`` may be absent or an empty directory. A non-empty one is refused (``OutputExistsError``
  names what is there) unless ``overwrite=True``, and even then only when it is an earlier output
  of this project: it holds a marker (``.mbridge-output.json``) listing every entry it was
  written with, and nothing else. Unrelated files (a README, a training run's ``iter_0000100/``)
  are never replaced: the refusal names them.
- A lock beside ``out`` (``.<name>.lock``, flock) keeps two writers apart: the second gets
  ``OutputBusyError`` at once, so the result is never a mix. It is held by this process from
  ``claim`` (the CLI claims before loading anything) to the end of the write.
- The files are written into a temporary sibling, flushed, then renamed into place (an existing
  output is moved aside first and removed after), so ``out`` is always either the previous
  content or the complete new output, whatever kills the writer. What a killed writer left
  beside ``out`` is removed by the next writer (only names of this host whose process is gone).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from bridges.core.errors import MBridgeError

MARKER = ".mbridge-output.json"
_HELD: dict[Path, tuple[int, int]] = {}  # locked target -> (lock fd, claim depth), this process


class OutputExistsError(MBridgeError, FileExistsError):
    """The output path holds data this project did not write, or overwrite was not asked."""


class OutputBusyError(MBridgeError):
    """Another process is writing the same output path."""


def _listing(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _entries(out: Path) -> list[str]:
    return sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())


def check_target(out: str | os.PathLike, overwrite: bool = False, option: str = "--out") -> None:
    """Refuse ``out`` unless it is absent, empty, or (with ``overwrite``) wholly an earlier output
    of this project. Raises ``OutputExistsError`` naming what is there; never changes anything."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise OutputExistsError(f"{option} {out}: exists and is not a directory; choose another path")
    held = _entries(out)
    if not held:
        return
    if not overwrite:
        raise OutputExistsError(
            f"{option} {out}: directory is not empty (holds {_listing(held)}); choose a new or empty "
            f"directory, or pass --overwrite to replace an earlier mbridge output there")
    marker = out / MARKER
    try:
        ours = set(json.loads(marker.read_text())["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputExistsError(
            f"{option} {out}: --overwrite replaces only an earlier mbridge output, and this directory "
            f"has no readable {MARKER} (holds {_listing(held)}); nothing was changed") from None
    foreign = [e for e in held if e != MARKER and e not in ours]
    if foreign:
        raise OutputExistsError(
            f"{option} {out}: --overwrite replaces only what mbridge wrote there, and the directory "
            f"also holds {_listing(foreign)}; move those away first (nothing was changed)")


def mark(tmp: Path, kind: str) -> None:
    """Record in ``tmp`` (the new output, before its rename) every entry it holds."""
    entries = [e for e in _entries(tmp) if e != MARKER]
    (tmp / MARKER).write_text(json.dumps({"tool": "pytest-mbridge", "kind": kind, "entries": entries},
                                         indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def claim(out: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of ``out`` (re-entrant in this process); ``OutputBusyError`` if another
    process holds it. The lock file is removed on release."""
    out = Path(os.path.abspath(out))
    if out in _HELD:
        fd, depth = _HELD[out]
        _HELD[out] = (fd, depth + 1)
    else:
        _HELD[out] = (_lock(out), 1)
    try:
        yield
    finally:
        fd, depth = _HELD[out]
        if depth > 1:
            _HELD[out] = (fd, depth - 1)
        else:
            del _HELD[out]
            with contextlib.suppress(OSError):
                os.unlink(_lock_path(out))
            os.close(fd)


@contextlib.contextmanager
def claim_checked(out: str | os.PathLike, overwrite: bool = False) -> Iterator[None]:
    """Collective form of ``claim`` + ``check_target`` for a writer whose rank 0 writes: rank 0
    takes the lock and checks ``out``; every rank raises the same error if either fails, so no
    rank is left waiting in a collective. The lock is held on rank 0 for the body."""
    import torch.distributed as dist

    spread = dist.is_initialized() and dist.get_world_size() > 1
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    with contextlib.ExitStack() as stack:
        box: list = [None]
        if rank0:
            try:
                stack.enter_context(claim(out))
                check_target(out, overwrite)
            except MBridgeError as e:
                box = [e]
        if spread:
            dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise box[0]
        yield


def _lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def _lock(out: Path) -> int:
    path = _lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputBusyError(f"{out}: another mbridge process ({holder}) is writing this output "
                                  f"now; wait for it or choose another path") from None
        try:  # the file we locked may have been unlinked by a releasing holder: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def writing(out: str | os.PathLike, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out`` to write into; on success mark it as this
    project's output (``kind``), flush it and rename it into place. Refused up front (under the
    lock) as ``check_target`` says. On any error the temporary directory is removed and ``out``
    is left as it was."""
    out = Path(out)
    with claim(out):
        check_target(out, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_owner()}-", dir=out.parent))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp's 0700 would hide the output from the user's group
        try:
            yield tmp
            mark(tmp, kind)
            fsync_tree(tmp)
            _replace_dir(tmp, out)
            fsync_tree(out.parent, files=False)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            text = (f"writing {out} failed: {e.strerror or e} (is the disk full, or a file-size limit "
                    f"set?); {out} was left as it was")
            raise (OSError(e.errno, text) if e.errno else OSError(text)) from e
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is moved aside first and removed after."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{_owner()}")
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)  # put the previous output back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def host() -> str:
    """This host's name with no '-' (so ``<host>-<pid>-<random>`` parses back unambiguously)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())


def _owner() -> str:
    """``<host>-<pid>`` of this writer, for the names of its temporary siblings."""
    return f"{host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove what a killed writer left beside ``out``: ``.<name>.tmp-<host>-<pid>-*``
    directories, and ``.<name>.old-<host>-<pid>`` (the previous output, moved aside for the swap:
    put back when ``out`` is missing, i.e. the writer died between its two renames). Only names
    of this host whose process is gone are touched: a live writer's files, or another host's on
    a shared file system, are left alone."""
    pat = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-{re.escape(host())}-(\d+)"
                     rf"(-[a-z0-9_]+)?")
    for p in sorted(out.parent.iterdir()):
        m = pat.fullmatch(p.name)
        if m is None or (m.group(1) == "tmp") != bool(m.group(3)) or not p.is_dir() \
                or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            try:
                p.rename(out)
                continue
            except OSError:
                pass
        shutil.rmtree(p, ignore_errors=True)


def fsync_tree(d: Path, files: bool = True) -> None:
    """Flush a directory's files (recursively) and the directory itself to disk before the
    rename, so the renamed output is complete even after a power loss, not only after a killed
    process."""
    paths = [p for p in d.rglob("*") if p.is_file() or p.is_dir()] if files else []
    for p in paths + [d]:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass  # file systems without fsync on directories
        finally:
            os.close(fd)
