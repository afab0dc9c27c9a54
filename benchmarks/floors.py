"""Floors: what plain safetensors costs, with nothing of the bridge in between.

    python benchmarks/floors.py read  CKPT_DIR [--json OUT] [--device cuda]
    python benchmarks/floors.py write CKPT_DIR OUT_DIR [--json OUT] [--device cuda]
    python benchmarks/floors.py imports [--json OUT]
    python benchmarks/floors.py hold BYTES

``read``: open every shard with ``safe_open`` and read every tensor once into process memory
(``get_tensor(name).clone()``), keeping it. safetensors >= 0.8 returns ``get_tensor`` as a
zero-copy view of the memory-mapped file, so the copy is what makes the bytes actually read; a
loader must copy them into its parameters anyway, and keep them. (Dropping each tensor after
reading it lets the allocator hand the next one the same, already-faulted pages: for the MoE
checkpoint's 3-6 MiB expert tensors that floor was about 1.6 x faster than any loader, which
must fault in memory for every byte it keeps.)
``write``: read every tensor into process memory first (not part of the write phase), then
write them with ``save_file``
in the shards the exporter would cut (5 GiB, in checkpoint order), and fsync each file, as the
exporter does; the fsync share is reported apart.
``imports``: a process that only imports torch, megatron.core (GPTModel) and transformers: the
RSS baseline of any conversion process.
``hold``: a process that touches BYTES of memory, says ``ready`` and keeps them until its stdin
closes: it stands in for a second rank's memory beside a write floor (the page-cache write speed
of this machine drops as more memory is in use).

``--device cuda``: the read floor reads every tensor into GPU memory (``get_tensor(name).to(device)``,
what an import into GPU parameters must do at least), the write floor writes tensors that are in GPU
memory (each shard copied to the host, ``save_file``, fsync).

The parent passes the spawn time in ``BENCH_T0`` so "start+imports" covers interpreter start.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from _common import Phases, emit

T0 = float(os.environ["BENCH_T0"]) if "BENCH_T0" in os.environ else None
MAX_SHARD = 5 * 2**30  # save_hf_pretrained's default


def _names_by_shard(ckpt: Path) -> dict[str, list[str]]:
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        shards: dict[str, list[str]] = {}
        for name, f in json.loads(index.read_text())["weight_map"].items():
            shards.setdefault(f, []).append(name)
        return shards
    return {"model.safetensors": None}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _load(t, device: str):
    """``t`` (a view of the mapped file) copied into process memory, or onto ``device``."""
    return t.clone() if device == "cpu" else t.to(device)


def read_floor(ckpt: Path, phases: Phases, device: str = "cpu") -> dict:
    from safetensors import safe_open

    phases.startup()
    kept = []
    with phases("read"):
        for f, names in _names_by_shard(ckpt).items():
            with safe_open(str(ckpt / f), framework="pt") as st:
                for name in names or st.keys():
                    kept.append(_load(st.get_tensor(name), device))
        _sync(device)
    return {"tensors": len(kept), "bytes": sum(t.numel() * t.element_size() for t in kept)}


def write_floor(ckpt: Path, out: Path, phases: Phases, device: str = "cpu") -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_checkpoint import _order

    phases.startup()
    tensors = {}
    with phases("read (untimed setup)"):
        for f, names in _names_by_shard(ckpt).items():
            with safe_open(str(ckpt / f), framework="pt") as st:
                for name in names or st.keys():
                    tensors[name] = _load(st.get_tensor(name), device)  # in process memory
        _sync(device)
    order = sorted(tensors, key=_order)
    batches, size = [[]], 0
    for name in order:
        nb = tensors[name].numel() * tensors[name].element_size()
        if batches[-1] and size + nb > MAX_SHARD:
            batches.append([])
            size = 0
        batches[-1].append(name)
        size += nb
    out.mkdir(parents=True, exist_ok=True)
    fsync_s = 0.0
    with phases("write"):
        for i, batch in enumerate(batches, 1):
            path = out / f"model-{i:05d}.safetensors"
            save_file({n: tensors[n].cpu() for n in batch}, str(path), metadata={"format": "pt"})
            t = time.perf_counter()
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            fsync_s += time.perf_counter() - t
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"tensors": len(tensors), "bytes": nbytes, "shards": len(batches), "fsync_s": fsync_s}


def imports_only(phases: Phases) -> dict:
    import torch  # noqa: F401
    import megatron.core  # noqa: F401
    from megatron.core.models.gpt import GPTModel  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoConfig  # noqa: F401

    phases.startup()
    return {}


def hold(nbytes: int) -> None:
    import torch

    kept = torch.ones(nbytes // 4)  # noqa: F841 - touched, so resident
    print("ready", flush=True)
    sys.stdin.read()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["read", "write", "imports", "hold"])
    ap.add_argument("paths", nargs="*")
    ap.add_argument("--json")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: read into / write from GPU memory")
    a = ap.parse_args()
    if a.mode == "hold":
        return hold(int(a.paths[0]))
    import torch  # the floors read into torch tensors, as the bridge does

    phases = Phases(T0)
    if a.mode == "read":
        extra = read_floor(Path(a.paths[0]), phases, a.device)
    elif a.mode == "write":
        extra = write_floor(Path(a.paths[0]), Path(a.paths[1]), phases, a.device)
    else:
        extra = imports_only(phases)
    emit(a.json, phases.result(mode=a.mode, threads=torch.get_num_threads(), device=a.device, **extra))


if __name__ == "__main__":
    main()
