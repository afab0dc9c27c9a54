"""Fault injection for test_faults.py and test_atomicity.py.

Rank-pool tasks (``conformance.runner.RankPool``): ``rank_and_world``, ``load_raising_on``,
``load_collecting_warnings``.

As a script (plain processes, no megatron import, so one starts in about 2 s):

    python tests/fault_tasks.py collective <failing rank> <timeout_s> [raise|stall]
        one process per rank (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the caller, as
        torchrun would), over gloo: every rank initialises torch.distributed with
        ``init_distributed(timeout_s)``; the failing rank raises (or, with ``stall``, sleeps and
        never joins) before the collective the others enter (an ``all_gather_object``, as
        ``load_hf_weights`` gathers its ledgers).

    python tests/fault_tasks.py export <out dir> <seed> <delay_s>
        ``save_hf_checkpoint(export_tensors(seed, delay_s), ...)``: deterministic tensors, one
        every ``delay_s`` seconds, small shards, so a test can kill the writer mid-write.
"""
from __future__ import annotations

import sys
import time
import warnings
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

INJECTED = "injected failure on rank {rank} reading {name}"
EXPORT_CONFIG = {"model_type": "toy", "hidden_size": 64, "num_hidden_layers": 24}
EXPORT_SHARD_BYTES = 40_000  # two 16 KiB tensors per shard


# -- rank-pool tasks ----------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def _chunks(bridge, tp: int, pp: int) -> list:
    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = tp
    provider.pipeline_model_parallel_size = pp
    return provider.provide_distributed_model()


def load_raising_on(checkpoint: str, rank: int, tensor: str, tp: int = 2) -> None:
    """Import ``checkpoint`` at TP=``tp`` with a bridge whose ``hf_weight`` hook raises on
    ``rank`` when it reads ``tensor`` (mid-conversion: earlier tensors are already loaded, the
    other ranks go on to the ledger gather and wait there)."""
    from bridges.core.auto import AutoBridge

    base = AutoBridge.from_hf_pretrained(checkpoint)

    class Faulty(type(base)):  # type: ignore[misc, valid-type]
        def hf_weight(self, name, t):
            if dist.get_rank() == rank and name == tensor:
                raise RuntimeError(INJECTED.format(rank=rank, name=name))
            return super().hf_weight(name, t)

    bridge = Faulty(base.hf_config, base.checkpoint)
    bridge.load_hf_weights(_chunks(bridge, tp, 1))


def load_collecting_warnings(checkpoint: str, tp: int = 1, pp: int = 1,
                             strict: bool = False) -> list[str]:
    """Import ``checkpoint``; return the NonFiniteWeightWarning messages this rank saw."""
    from bridges.core.auto import AutoBridge
    from bridges.core.bridge import NonFiniteWeightWarning

    bridge = AutoBridge.from_hf_pretrained(checkpoint)
    chunks = _chunks(bridge, tp, pp)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        bridge.load_hf_weights(chunks, strict=strict)
    return [str(w.message) for w in seen if issubclass(w.category, NonFiniteWeightWarning)]


# -- export ---------------------------------------------------------------------------------------
def export_tensors(seed: int = 0, delay_s: float = 0.0, n: int = 24) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic named tensors (64x64 fp32 and a bf16 vector per layer)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        yield f"model.layers.{i}.mlp.down_proj.weight", torch.randn(64, 64, generator=g)
        yield f"model.layers.{i}.input_layernorm.weight", torch.randn(64, generator=g).bfloat16()
        if delay_s:
            time.sleep(delay_s)


def export(out: str, seed: int = 0, delay_s: float = 0.0, source_dir: str | None = None) -> None:
    from bridges.core.hf_io import save_hf_checkpoint

    save_hf_checkpoint(export_tensors(seed, delay_s), EXPORT_CONFIG, out, source_dir,
                       max_shard_bytes=EXPORT_SHARD_BYTES, overwrite=True)


# -- collective ---------------------------------------------------------------------------------
def collective(failing: int, timeout_s: float, mode: str = "raise") -> None:
    from bridges.core.parallel import init_distributed

    # the rendezvous waits long (start-up on a loaded machine); the collective has timeout_s
    init_distributed(timeout_s=300.0)
    group = dist.new_group(timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank}/{world} up", flush=True)
    if rank == failing and mode == "stall":
        time.sleep(20 * timeout_s)  # alive, never joins: the others must time out
    elif rank == failing:
        raise RuntimeError(f"injected failure on rank {rank} before the collective")
    t = time.monotonic()
    out: list = [None] * world
    try:
        dist.all_gather_object(out, {"rank": rank}, group=group)
    finally:
        print(f"rank {rank}: collective ended after {time.monotonic() - t:.1f} s", flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "collective":
        collective(int(args[0]), float(args[1]), *args[2:3])
    elif cmd == "export":
        export(args[0], int(args[1]), float(args[2]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
