"""Process-group setup: torch.distributed + Megatron-Core model parallel state.

gloo on CPU (with the cpu_compat patches), NCCL on GPU. Works under torchrun, under the
conformance runner's workers, and as one plain process (world size 1).
"""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bridges.core import cpu_compat
from bridges.core.errors import LayoutError


@dataclass(frozen=True)
class Layout:
    """A parallel layout. ``name`` is the short form used in test ids: tp2pp2, vpp2, ep2,
    tp2ep2etp1 (expert TP; default: TP, as Megatron), ep2grouped (experts in Megatron's grouped
    GEMM layout instead of sequential experts)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int | None = None
    grouped: bool = False

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def groups(self) -> tuple:
        """What the process groups depend on (not ``grouped``, a model-side choice)."""
        return self.tp, self.pp, self.vpp, self.ep, self.expert_tp

    @property
    def world_size(self) -> int:
        """Smallest world for this layout: dense ranks tp*pp, expert ranks etp*ep*pp."""
        return math.lcm(self.tp * self.pp, self.expert_tp * self.ep * self.pp)

    @property
    def name(self) -> str:
        parts = [f"tp{self.tp}"] if self.tp > 1 else []
        parts += [f"pp{self.pp}"] if self.pp > 1 else []
        parts += [f"vpp{self.vpp}"] if self.vpp else []
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        parts += [f"etp{self.etp}"] if self.etp is not None and self.etp != self.tp else []
        name = "".join(parts) or "tp1pp1"
        return name + ("grouped" if self.grouped else "")

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """Parse 'tp2pp2', 'tp1pp1', 'vpp2' (implies pp2), 'ep2', 'tp2ep2etp1', 'ep2grouped'."""
        import re

        text = text.strip().lower()
        grouped = text.endswith("grouped")
        body = text[: -len("grouped")] if grouped else text
        parts = dict(re.findall(r"(etp|tp|vpp|pp|ep)(\d+)", body))
        if (not parts and not grouped) or re.sub(r"(etp|tp|vpp|pp|ep)\d+", "", body):
            raise LayoutError(f"bad layout {text!r}: expected e.g. tp1pp1, tp2, pp2, tp2pp2, vpp2, "
                             f"ep2, tp2ep2, tp2ep2etp1, ep2grouped")
        vpp = int(parts["vpp"]) if "vpp" in parts else None
        pp = int(parts.get("pp", 2 if vpp else 1))
        return cls(tp=int(parts.get("tp", 1)), pp=pp, vpp=vpp, ep=int(parts.get("ep", 1)),
                   etp=int(parts["etp"]) if "etp" in parts else None, grouped=grouped)


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


def destroy_model_parallel() -> None:
    """Tear down Megatron's parallel state *and* its process groups.

    Megatron only forgets its groups; each gloo group keeps its threads (about 60 per rank for
    one layout), so a long-lived process that switches layouts must destroy them itself.
    """
    from megatron.core import parallel_state as ps

    groups = []
    for value in list(vars(ps).values()):
        items = value if isinstance(value, (list, tuple)) else [value]
        groups += [g for g in items if isinstance(g, dist.ProcessGroup)]
    ps.destroy_model_parallel()
    seen = set()
    for g in groups:
        if id(g) in seen or g is dist.GroupMember.WORLD or g == dist.group.WORLD:
            continue
        seen.add(id(g))
        try:
            dist.destroy_process_group(g)
        except (ValueError, RuntimeError):
            pass  # not a live group of this rank


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(tp=ps.get_tensor_model_parallel_world_size(),
                  pp=ps.get_pipeline_model_parallel_world_size(),
                  vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
                  ep=ps.get_expert_model_parallel_world_size(),
                  etp=ps.get_expert_tensor_parallel_world_size())
