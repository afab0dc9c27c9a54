"""Process-group setup: torch.distributed + Megatron-Core model parallel state.

gloo on CPU (with the cpu_compat patches), NCCL on GPU. Works under torchrun, under the
conformance runner's workers, and as one plain process (world size 1).
"""
from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bridges.core import cpu_compat
from bridges.core.errors import LayoutError
from bridges.core.layout import Layout  # noqa: F401 - its home before; imported from here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 600.0) -> None:
    """Initialise torch.distributed from torchrun's environment, or as a single process."""
    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # One process without torchrun: a private rendezvous, leaving os.environ alone (children
    # started later, e.g. a torchrun of our own, must not inherit a port that is now taken).
    init = None if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{free_port()}"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def init_model_parallel(layout: Layout, seed: int = 1234) -> None:
    """(Re)initialise Megatron-Core's parallel state for ``layout`` on the current world."""
    from megatron.core import parallel_state as ps

    init_distributed()
    world = dist.get_world_size()
    if world % layout.world_size:
        raise LayoutError(
            f"layout {layout.name} needs a multiple of {layout.world_size} ranks, the world has "
            f"{world}; launch with torchrun --nproc-per-node {layout.world_size}")
    if ps.model_parallel_is_initialized():
        destroy_model_parallel()
    cpu_compat.ensure()
    with _groups_kept():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
            expert_model_parallel_size=layout.ep,
            expert_tensor_parallel_size=layout.expert_tp,
            # On CPU every group is gloo already; the extra gloo copies only cost threads.
            create_gloo_process_groups=torch.cuda.is_available(),
        )
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)


# Process groups by (ranks, backend, description), kept for the process's life: a process that
# switches layouts (the suite's rank pool) builds each group once, not once per model and layout.
_GROUPS: dict[tuple, Any] = {}


@contextlib.contextmanager
def _groups_kept():
    """While Megatron-Core initialises its parallel state, a group it asks for again is the one
    made before. ``new_group`` is collective over the world: every rank asks for the same groups
    in the same order, so every rank finds (or makes) each one alike."""
    from megatron.core import parallel_state as ps

    make = ps.create_group

    def create_group(ranks=None, timeout=None, backend=None, pg_options=None,
                     use_local_synchronization=False, group_desc=None):
        if pg_options is not None:  # options are objects without a value to compare: not kept
            return make(ranks=ranks, timeout=timeout, backend=backend, pg_options=pg_options,
                        use_local_synchronization=use_local_synchronization, group_desc=group_desc)
        key = (tuple(ranks) if ranks is not None else None, backend, group_desc, use_local_synchronization)
        if key not in _GROUPS:
            _GROUPS[key] = make(ranks=ranks, timeout=timeout, backend=backend, pg_options=pg_options,
                                use_local_synchronization=use_local_synchronization, group_desc=group_desc)
        return _GROUPS[key]

    ps.create_group = create_group
    try:
        yield
    finally:
        ps.create_group = make


def destroy_model_parallel() -> None:
    """Tear down Megatron's parallel state *and* the process groups not kept for reuse.

    Megatron only forgets its groups; each gloo group keeps its threads (about 60 per rank for
    one layout), so a long-lived process that switches layouts must destroy them itself, except
    those ``init_model_parallel`` keeps (``_GROUPS``: each layout's groups made once).
    """
    from megatron.core import parallel_state as ps

    groups = []
    for value in list(vars(ps).values()):
        items = value if isinstance(value, (list, tuple)) else [value]
        groups += [g for g in items if isinstance(g, dist.ProcessGroup)]
    ps.destroy_model_parallel()
    seen = set()
    for g in groups:
        if id(g) in seen or g is dist.GroupMember.WORLD or g == dist.group.WORLD or _kept(g):
            continue
        seen.add(id(g))
        try:
            dist.destroy_process_group(g)
        except (ValueError, RuntimeError):
            pass  # not a live group of this rank


def _kept(group) -> bool:
    return id(group) in {id(g) for g in _GROUPS.values()}


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(tp=ps.get_tensor_model_parallel_world_size(),
                  pp=ps.get_pipeline_model_parallel_world_size(),
                  vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
                  ep=ps.get_expert_model_parallel_world_size(),
                  etp=ps.get_expert_tensor_parallel_world_size())
