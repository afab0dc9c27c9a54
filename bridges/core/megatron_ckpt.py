"""Megatron-Core distributed checkpoints in the layout Megatron-LM training loads:

    <dir>/latest_checkpointed_iteration.txt     "0" by default
    <dir>/iter_0000000/                          megatron.core.dist_checkpointing files
    <dir>/mbridge.json                           the HF config and bridge, for export

The state dict holds ``model`` (or ``model0``, ``model1``... with VPP), ``checkpoint_version``
and ``iteration``, as Megatron-LM writes it. dist_checkpointing reshards on load, so a
checkpoint saved under one layout loads under another. Saving is atomic: every rank writes into
a temporary sibling directory that rank 0 renames into place once all ranks are done.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from bridges.core.bridge import unwrap
from bridges.core.hf_io import CheckpointError
from bridges.core.outdir import claim_checked, writing

SIDECAR = "mbridge.json"
TRACKER = "latest_checkpointed_iteration.txt"


def _state_dict(chunks) -> dict:
    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def save_megatron(chunks, out_dir: str | Path, meta: dict, iteration: int = 0,
                  overwrite: bool = False, args=None, last_use: bool = False) -> Path:
    """Save this rank's chunks (collective: every rank calls it). ``out_dir`` must be absent or
    empty, or with ``overwrite`` an earlier output of this project holding nothing else: a
    training run's checkpoint root with other iterations is refused, never touched
    (``bridges.core.outdir``). ``args``: Megatron-LM's argument namespace for the model, saved
    as its trainer saves it (``--use-checkpoint-args`` reads it). ``last_use``: the model is not
    used after this save (the CLI's import), so parameters saved in pieces give up their memory
    to those pieces (``_pieces_own_memory``)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    out = Path(out_dir)
    rank0 = dist.get_rank() == 0
    with claim_checked(out, overwrite), contextlib.ExitStack() as stack:
        box = [str(stack.enter_context(writing(out, "megatron", overwrite))) if rank0 else None]
        dist.broadcast_object_list(box, src=0)
        it = iteration_dir(Path(box[0]), iteration)
        if rank0:
            it.mkdir()
        dist.barrier()
        state = {**_state_dict(chunks), "checkpoint_version": 3.0, "iteration": iteration}
        if last_use:
            _pieces_own_memory(state, chunks)
        if args is not None:
            state["args"] = args
        try:
            with _results_in_process(), _host_copies_as_written():
                dist_checkpointing.save(state, str(it), sharded_strategy=_save_strategy())
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - the writer's errors arrive wrapped
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            raise OSError(f"{type(e).__name__}: {lines[-1] if lines else ''}") from e
        dist.barrier()
        if rank0:
            (it.parent / TRACKER).write_text(f"{iteration}\n")
            (it.parent / SIDECAR).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    dist.barrier()  # the rename is done before any rank returns
    return out


def _pieces_own_memory(state: dict, chunks) -> None:
    """A parameter saved in pieces (SwiGLU's fused fc1: its gate and up halves) is given to the
    writer as views, which megatron-core's writer copies, all of them before it writes anything:
    a third of the model on top of the model. Here each piece is copied, then its parameter
    dropped, one parameter at a time; the writer then copies nothing. Same bytes saved."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(state)
    pieces: dict[int, list] = {}
    for sh in _leaves(state):
        t = getattr(sh, "data", None) if isinstance(sh, ShardedTensor) else None
        if t is not None and t.device.type == "cpu" and t.untyped_storage().nbytes() != t.numel() * t.element_size():
            pieces.setdefault(t.untyped_storage().data_ptr(), []).append(sh)
    owners = {p.untyped_storage().data_ptr(): p for c in chunks for p in unwrap(c).parameters()}
    for ptr, shs in pieces.items():
        owner = owners.get(ptr)
        if owner is None:  # not a parameter's memory: left to the writer
            continue
        for sh in shs:
            sh.data = sh.data.clone()
        owner.data = torch.empty(0, dtype=owner.dtype, device=owner.device)


def _save_strategy():
    """torch_dist, the format Megatron-LM's ``--ckpt-format torch_dist`` loads, with one writer
    thread (and file) per core this rank has: a plain page-cache write is CPU-bound in the kernel."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    per_rank = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return TorchDistSaveShardedStrategy(thread_count=min(per_rank, int(os.environ.get("MBRIDGE_SAVE_THREADS", "8"))))


@contextlib.contextmanager
def _results_in_process():
    """A synchronous save hands its write results back through a queue that megatron-core makes
    a ``multiprocessing.Manager`` queue (a spawned server process, for its async saver): seconds
    to start beside the writing, and to stop at exit. The save here is synchronous and in this
    process, so an in-process queue carries them."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if getattr(fa, "_results_queue", ...) is not None:  # set already, or another megatron-core
        yield
        return
    fa._results_queue = queue.Queue()
    try:
        yield
    finally:
        fa._results_queue = None


@contextlib.contextmanager
def _host_copies_as_written():
    """megatron-core's writer stages every tensor of the rank in host memory before writing
    any (``preload_tensors``: for its asynchronous saver, so that training may go on): for a model
    on a GPU the whole rank's share, in host memory, at once (22 GiB of host RSS for a 16 GB
    Qwen3-8B on an H200). The save here is synchronous, so each writer thread copies a tensor to
    the host just before it writes it (``_OnHost``); a CPU tensor is written as it is, as before."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    saved = FileSystemWriterAsync.__dict__["preload_tensors"]

    def preload(write_buckets, non_blocking=True):
        return [(name, key, (data, _OnHost(tensors))) for name, key, (data, tensors) in write_buckets]

    FileSystemWriterAsync.preload_tensors = staticmethod(preload)
    try:
        yield
    finally:
        FileSystemWriterAsync.preload_tensors = saved


class _OnHost(list):
    """A write bucket's ``(item, tensor)`` pairs, each tensor copied to host memory as the writer
    reaches it (and dropped with the writer's reference once written)."""

    def __iter__(self):
        for item, tensor in super().__iter__():
            yield item, tensor.to("cpu")


def read_meta(ckpt_dir: str | Path) -> dict:
    p = Path(ckpt_dir) / SIDECAR
    if not p.exists():
        raise CheckpointError(f"{p}: not found; pass --hf-source to name the HF model this "
                              f"Megatron checkpoint came from")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}: unreadable ({e}); pass --hf-source to name the HF model") from None


def load_megatron(chunks, ckpt_dir: str | Path) -> None:
    """Load a checkpoint into this rank's chunks, resharding to their layout. A damaged or
    mismatched checkpoint (tracker, missing or truncated files, shapes of another model) is a
    ``CheckpointError`` naming the file or tensor, raised before anything is read."""
    from megatron.core import dist_checkpointing

    it = _iteration(Path(ckpt_dir))
    state = _state_dict(chunks)
    _check_shapes(it, _read_metadata(it), state)
    _merge_in_place(state)
    try:
        with _direct_reads():
            loaded = dist_checkpointing.load(state, str(it))
    except Exception as e:  # noqa: BLE001 - whatever the reader hit, name the checkpoint
        raise CheckpointError(f"{it}: cannot be loaded ({type(e).__name__}: {e})") from e
    for i, chunk in enumerate(unwrap(c) for c in chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        if key not in loaded:
            raise CheckpointError(f"{it}: holds no {key!r} (saved with another virtual pipeline size?)")
        missing, unexpected = chunk.load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"{it}: parameters missing from the checkpoint: {missing[:8]}")


@contextlib.contextmanager
def _direct_reads():
    """megatron-core's torch_dist loader reads through ``FileSystemReader``: while loading,
    ``bridges.core.dist_read.DirectReader`` stands in for it (the same bytes into the same
    tensors, in one copy instead of three). Left alone where megatron-core has no such name."""
    from megatron.core.dist_checkpointing.strategies import torch as strategy

    from bridges.core.dist_read import DirectReader

    if getattr(strategy, "FileSystemReader", None) is not DirectReader.__mro__[1] or \
            os.environ.get("MBRIDGE_DIRECT_READS", "1") == "0":
        yield
        return
    strategy.FileSystemReader = DirectReader
    try:
        yield
    finally:
        strategy.FileSystemReader = DirectReader.__mro__[1]


def _merge_in_place(state: dict) -> None:
    """A factory's pieces (SwiGLU's fused fc1: gate and up halves) load into views of the
    parameter, then megatron-core concatenates them into a new tensor that ``load_state_dict``
    copies back. Where the pieces are the parameter's memory, in order, that concatenation is
    the parameter itself: it is returned as is (two copies of a third of the model fewer)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
    from megatron.core.transformer.utils import cat_with_oom_fallback

    def visit(obj):
        if isinstance(obj, ShardedTensorFactory) and obj.merge_fn is cat_with_oom_fallback:
            obj.merge_fn = _cat_or_self(obj.data)
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(state)


def _cat_or_self(whole):
    from megatron.core.transformer.utils import cat_with_oom_fallback

    def merge(parts):
        at = whole.data_ptr()
        if whole.is_contiguous() and isinstance(parts, (list, tuple)) and all(
                isinstance(p, torch.Tensor) and p.is_contiguous() and p.dtype == whole.dtype
                and p.device == whole.device for p in parts):
            for p in parts:
                if p.data_ptr() != at:
                    break
                at += p.numel() * p.element_size()
            else:
                if at == whole.data_ptr() + whole.numel() * whole.element_size() \
                        and tuple(torch.Size((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))) == tuple(whole.shape):
                    return whole
        return cat_with_oom_fallback(parts)

    return merge


def stored_dtype(ckpt_dir: str | Path):
    """The dtype the model's floating-point weights are stored in (the most common one among
    them, by count: a Megatron-LM bf16 run saves its model in bf16 and its optimizer's fp32
    state apart), or None if none is found."""
    from collections import Counter

    it = _iteration(Path(ckpt_dir))
    kinds = Counter(m.properties.dtype for k, m in _read_metadata(it).state_dict_metadata.items()
                    if not k.startswith(("optimizer", "rng_state", "rerun")) and hasattr(m, "properties")
                    and m.properties.dtype.is_floating_point)
    return kinds.most_common(1)[0][0] if kinds else None


def _iteration(root: Path) -> Path:
    """The iteration directory the tracker names."""
    tracker = root / TRACKER
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such Megatron checkpoint directory")
    if not tracker.is_file():
        raise CheckpointError(f"{tracker}: not found; {root} is not a Megatron checkpoint root")
    text = tracker.read_text().strip()
    if text != "release" and not text.isdigit():
        raise CheckpointError(f"{tracker}: holds {text[:40]!r}, expected an iteration number or 'release'")
    it = root / "release" if text == "release" else iteration_dir(root, int(text))
    if not it.is_dir():
        raise CheckpointError(f"{tracker}: names iteration {text}, but {it} does not exist "
                              f"(present: {sorted(p.name for p in root.glob('iter_*')) or 'none'})")
    return it


def _read_metadata(it: Path):
    """The torch_dist metadata, with every file it points into present and long enough."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (it / "metadata.json").is_file():
        raise CheckpointError(f"{it / 'metadata.json'}: not found; {it} is not a distributed checkpoint")
    if not (it / ".metadata").is_file():
        raise CheckpointError(f"{it / '.metadata'}: not found; the checkpoint's index is missing")
    try:
        meta = FileSystemReader(str(it)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise CheckpointError(f"{it / '.metadata'}: unreadable ({type(e).__name__}: {e})") from None
    need: dict[str, int] = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = it / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (the checkpoint's index points into it)")
        if f.stat().st_size < size:
            raise CheckpointError(f"{f}: truncated ({f.stat().st_size} bytes, the index needs {size})")
    return meta


def _check_shapes(it: Path, meta, state: dict) -> None:
    """Every tensor this model needs is in the checkpoint with the same global shape."""
    from megatron.core.dist_checkpointing import ShardedTensor

    missing, wrong = [], []
    for sh in _leaves(state):
        if not isinstance(sh, ShardedTensor):
            continue
        saved = meta.state_dict_metadata.get(sh.key)
        if saved is None:
            missing.append(sh.key)
        elif tuple(getattr(saved, "size", ())) != tuple(sh.global_shape):
            wrong.append(f"{sh.key} is {tuple(saved.size)} there, this model has {tuple(sh.global_shape)}")
    if wrong:
        raise CheckpointError(f"{it}: saved for another model: {'; '.join(sorted(set(wrong))[:4])}"
                              + (f" (and {len(set(wrong)) - 4} more)" if len(set(wrong)) > 4 else ""))
    if missing:
        raise CheckpointError(f"{it}: tensors missing from the checkpoint (saved for another model?): "
                              f"{sorted(set(missing))[:8]}")
    # the other way round, over every rank's tensors: a model tensor this model lacks (e.g. a
    # QK norm) would be dropped without a word
    wanted = [{sh.key for sh in _leaves(state) if isinstance(sh, ShardedTensor)}]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, wanted[0])
        wanted = everyone
    known = set().union(*wanted)
    extra = sorted(k for k, v in meta.state_dict_metadata.items()
                   if hasattr(v, "size") and k not in known and not k.startswith(_NOT_MODEL))
    if extra:
        raise CheckpointError(f"{it}: saved for another model: it holds tensors this model does not "
                              f"have: {extra[:8]}" + (f" (and {len(extra) - 8} more)" if len(extra) > 8 else ""))


_NOT_MODEL = ("optimizer", "rng_state", "rerun_state_machine")  # what a training run saves beside the model


def _leaves(obj):
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if isinstance(obj, ShardedTensorFactory):  # e.g. SwiGLU's fc1 at TP > 1: its tensors
        obj = obj.build()
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj
