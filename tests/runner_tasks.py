"""Tasks for test_runner.py, run inside the rank pool."""
import os
import time

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


def raise_on(rank: int) -> None:
    if dist.get_rank() == rank:
        raise ValueError(f"injected failure on rank {rank}")
    dist.barrier()  # the other ranks wait in a collective that will never complete


def die_on(rank: int) -> None:
    if dist.get_rank() == rank:
        os._exit(3)
    dist.barrier()


def hang(seconds: float) -> None:
    time.sleep(seconds)


def start_helper() -> int:
    """Start a process of this rank's own (as dist_checkpointing's writer does); return its pid."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid


def barrier() -> None:
    dist.barrier()
