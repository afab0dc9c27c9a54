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

import json
import shutil
import tempfile
from pathlib import Path

import torch.distributed as dist

from bridges.core.bridge import unwrap

SIDECAR = "mbridge.json"
TRACKER = "latest_checkpointed_iteration.txt"


def _state_dict(chunks) -> dict:
    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def save_megatron(chunks, out_dir: str | Path, meta: dict, iteration: int = 0) -> Path:
    """Save this rank's chunks (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing

    out = Path(out_dir)
    box = [None]
    if dist.get_rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        box = [tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)]
    dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    try:
        it = iteration_dir(tmp, iteration)
        if dist.get_rank() == 0:
            it.mkdir()
        dist.barrier()
        state = {**_state_dict(chunks), "checkpoint_version": 3.0, "iteration": iteration}
        dist_checkpointing.save(state, str(it))
        dist.barrier()
        if dist.get_rank() == 0:
            (tmp / TRACKER).write_text(f"{iteration}\n")
            (tmp / SIDECAR).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        dist.barrier()
    except BaseException:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(ckpt_dir: str | Path) -> dict:
    p = Path(ckpt_dir) / SIDECAR
    if not p.exists():
        raise FileNotFoundError(f"{p}: not found; pass --hf-source to name the HF model this "
                                f"Megatron checkpoint came from")
    return json.loads(p.read_text())


def load_megatron(chunks, ckpt_dir: str | Path) -> None:
    """Load a checkpoint into this rank's chunks, resharding to their layout."""
    from megatron.core import dist_checkpointing

    root = Path(ckpt_dir)
    tracker = root / TRACKER
    if not tracker.exists():
        raise FileNotFoundError(f"{tracker}: not found; {root} is not a Megatron checkpoint")
    text = tracker.read_text().strip()
    it = root / "release" if text == "release" else iteration_dir(root, int(text))
    loaded = dist_checkpointing.load(_state_dict(chunks), str(it))
    for i, chunk in enumerate(unwrap(c) for c in chunks):
        key = "model" if len(chunks) == 1 else f"model{i}"
        missing, unexpected = chunk.load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise KeyError(f"{it}: parameters missing from the checkpoint: {missing[:8]}")
