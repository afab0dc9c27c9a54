"""A parallel layout (TP, PP, VPP, EP, expert TP), without torch: the CLI decides from it
whether to relaunch itself as several ranks before it imports anything heavy."""
from __future__ import annotations

import math
from dataclasses import dataclass

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
