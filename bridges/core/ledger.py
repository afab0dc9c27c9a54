"""Coverage ledger: every HF tensor consumed exactly once, every Megatron parameter written
exactly once, or a named error. Problems are collected (not raised at once) so that all ranks
can agree on one error after a collective, instead of one rank raising and the others hanging.
"""
from __future__ import annotations

from collections import defaultdict

from bridges.core.errors import MBridgeError


class CoverageError(MBridgeError, ValueError):
    """Tensors left unused, parameters left unwritten, or tensors used twice."""


class Ledger:
    def __init__(self) -> None:
        self.pairs: set[tuple[str, str, bool]] = set()  # (hf name, megatron name, shared)
        self.problems: list[str] = []

    def use(self, hf_name: str, megatron_name: str, shared: bool = False) -> None:
        self.pairs.add((hf_name, megatron_name, shared))

    def problem(self, text: str) -> None:
        self.problems.append(text)

    @staticmethod
    def verdict(ledgers: list["Ledger"], hf_names: set[str], context: str) -> list[str]:
        """Merge the ranks' ledgers; return every problem (empty list: full coverage)."""
        problems = sorted({p for lg in ledgers for p in lg.problems})
        users: dict[str, set[str]] = defaultdict(set)
        for lg in ledgers:
            for hf, meg, shared in lg.pairs:
                if not shared:
                    users[hf].add(meg)
        for hf, megs in sorted(users.items()):
            if len(megs) > 1:
                problems.append(f"HF tensor {hf} is used by {len(megs)} Megatron parameters: "
                                f"{sorted(megs)}")
        used = {hf for lg in ledgers for hf, _, _ in lg.pairs}
        unused = sorted(hf_names - used)
        if unused:
            problems.append(f"{len(unused)} HF tensor(s) in the checkpoint were not used "
                            f"({context}): {_clip(unused)}")
        return problems


def _clip(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f" ... (+{len(names) - n} more)" if len(names) > n else "")
