"""The mutants `scripts/gpu_conformance.py mutants` runs under the default `--run-gpu` suite:
every mutant of tests/mutants.py and the family mutant files (gemma, gemma3_vl, qwen2_5_vl,
qwen3_vl, qwen3_vl_moe, mistral3, gpt_oss, minimax_m2, nemotron_h,
qwen3_next, qwen3_5, phi3, granite) that the CPU self-tests (tests/test_mutations.py,
test_gemma.py, test_gemma3_vl.py, ...) expect to fail at tp1pp1 (the one layout a single GPU runs), the subtle config and module bugs of #22 first,
plus one bug class those lack: a single pair of query heads swapped.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from bridges.core import mappings as M
from bridges.models.qwen3.qwen3_bridge import Qwen3Bridge

ROOT = Path(__file__).resolve().parents[1]

# the bug classes #22 names: eps decade, rope base, rope scaling, one head swapped, a bias
# dropped, a routing detail
SUBTLE = ("EpsInputNorm", "EpsQKNorm", "EpsFinalNorm", "EpsLatentNorm", "RopeBaseDoubled",
          "WrongRopeTheta", "Llama3ScalingDropped", "OneHeadSwapped", "QKSwapped", "WrongGQAGroups",
          "BiasDropped", "BiasInterleave", "NormTopkFlipped", "RouterBiasDropped", "SharedGateDropped")


class _OneHeadSwapped(M.QKV):
    """Query heads 0 and 1 exchanged in every layer's fused QKV (both directions): the class of
    bug where one head's rows land in another's slot, K, V and the output projection right."""

    @staticmethod
    def _swap(q: torch.Tensor, d: int) -> torch.Tensor:
        q = q.clone()
        q[:d], q[d:2 * d] = q[d:2 * d].clone(), q[:d].clone()
        return q

    def _merge(self, hf, shapes):
        return super()._merge({**hf, "q": self._swap(hf["q"], shapes.kv_channels)}, shapes)

    def _unmerge(self, full, shapes):
        out = super()._unmerge(full, shapes)
        out["q"] = self._swap(out["q"], shapes.kv_channels)
        return out


class OneHeadSwapped(Qwen3Bridge):
    def mappings(self, attrs):
        return [_OneHeadSwapped(m.megatron, m.hf) if m.megatron.endswith("linear_qkv.weight") else m
                for m in super().mappings(attrs)]


def descriptions() -> dict[str, str]:
    """Each mutant's one-line description: the comment above its class in tests/mutants.py."""
    out, last = {}, ""
    for line in (ROOT / "tests" / "mutants.py").read_text().splitlines():
        m = re.match(r"# \d+b?\. (.*?)\s*-*$", line)
        if m:
            last = m.group(1)
        elif line.startswith("#") and last and not line.startswith("# --"):
            last = f"{last} {line.lstrip('# ').rstrip(' -')}"
        c = re.match(r"class ([A-Z]\w*)\(", line)
        if c:
            out[c.group(1)], last = last, ""
    out["OneHeadSwapped"] = "query heads 0 and 1 exchanged in every layer's QKV (both directions)"
    import importlib
    import inspect

    for module in ("tests.gemma_mutants", "tests.gemma3_vl_mutants", "tests.qwen2_5_vl_mutants",
                   "tests.qwen3_vl_mutants", "tests.qwen3_vl_moe_mutants", "tests.mistral3_mutants",
                   "tests.gpt_oss_mutants", "tests.minimax_m2_mutants", "tests.nemotron_h_mutants",
                   "tests.qwen3_next_mutants", "tests.qwen3_5_mutants", "tests.phi3_mutants",
                   "tests.granite_mutants"):
        for name, cls in inspect.getmembers(importlib.import_module(module), inspect.isclass):
            if cls.__module__ == module and not name.startswith("_"):  # by bridge ref: names repeat
                out[f"{module}:{name}"] = " ".join((cls.__doc__ or name).split())
    return out


def gpu_mutants() -> list[tuple[str, str, str, set[str]]]:
    """(name, bridge ref, model, checks the CPU self-test expects to fail at tp1pp1), the subtle
    ones first."""
    from tests.test_gemma import MUTANTS as GEMMA
    from tests.test_gemma3_vl import MUTANTS as VLM
    from tests.test_gpt_oss import MODEL as GPT_OSS
    from tests.test_gpt_oss import MUTANTS as OSS
    from tests.test_granite import MOE as GRANITE
    from tests.test_granite import MUTANTS as GRN
    from tests.test_mistral3 import MODEL as MISTRAL3
    from tests.test_minimax_m2 import MODEL as MINIMAX
    from tests.test_minimax_m2 import MUTANTS as MM2
    from tests.test_mistral3 import MUTANTS as M3
    from tests.test_mutations import MUTANTS
    from tests.test_nemotron_h import MODEL as NEMOTRON_H
    from tests.test_nemotron_h import MUTANTS as NH
    from tests.test_nemotron_h import NANO, NANO_MUTANTS, SUPER, SUPER_MUTANTS
    from tests.test_phi3 import MUTANTS as PHI3
    from tests.test_qwen3_next import MODEL as QWEN3_NEXT
    from tests.test_qwen3_next import MUTANTS as Q3N
    from tests.test_qwen3_5 import DENSE as QWEN3_5
    from tests.test_qwen3_5 import MOE as QWEN3_5_MOE
    from tests.test_qwen3_5 import MUTANTS as Q35
    from tests.test_qwen2_5_vl import MODEL as QWEN_VL
    from tests.test_qwen2_5_vl import MUTANTS as QVLM
    from tests.test_qwen3_vl import MODEL as QWEN3_VL
    from tests.test_qwen3_vl import MUTANTS as Q3VLM
    from tests.test_qwen3_vl_moe import MODEL as QWEN3_VL_MOE
    from tests.test_qwen3_vl_moe import MUTANTS as Q3VLMOE

    phi3 = "microsoft/Phi-3-mini-4k-instruct"

    def vlm(model, table):
        return [(n, model, {"tp1pp1": expect}) for n, expect, _ in table]

    rows = [(n, f"tests.{module}:{n}", model, set(expect["tp1pp1"]))
            for module, table in (("mutants", MUTANTS), ("gemma_mutants", GEMMA),
                                  ("gemma3_vl_mutants", vlm("google/gemma-3-4b-it", VLM)),
                                  ("qwen2_5_vl_mutants", vlm(QWEN_VL, QVLM)), ("qwen3_vl_mutants", vlm(QWEN3_VL, Q3VLM)),
                                  ("qwen3_vl_moe_mutants", vlm(QWEN3_VL_MOE, Q3VLMOE)),
                                  ("mistral3_mutants", vlm(MISTRAL3, M3)),
                                  *((f"{m}_mutants", [(n, model, {"tp1pp1": e}) for n, e in table])
                                    for m, model, table in (("gpt_oss", GPT_OSS, OSS), ("minimax_m2", MINIMAX, MM2),
                                                            ("nemotron_h", NEMOTRON_H, NH),
                                                            ("nemotron_h", NANO, NANO_MUTANTS),
                                                            ("nemotron_h", SUPER, SUPER_MUTANTS),
                                                            ("qwen3_next", QWEN3_NEXT, Q3N))),
                                  ("phi3_mutants", [(n, phi3, e) for n, e in PHI3]),
                                  ("granite_mutants", [(n, GRANITE, e) for n, e in GRN]),
                                  ("qwen3_5_mutants", [(n, QWEN3_5, {"tp1pp1": e}) for n, e, _ in Q35]
                                   + [("TopKNotRenormalised", QWEN3_5_MOE, {"tp1pp1": {"logits", "generation"}})]))
            for n, model, expect in table if expect.get("tp1pp1") and "/" in model]  # a fixture's name
    rows.append(("OneHeadSwapped", "scripts.gpu_mutants:OneHeadSwapped", "Qwen/Qwen3-8B", {"logits", "generation"}))
    return sorted(rows, key=lambda r: (r[0] not in SUBTLE, SUBTLE.index(r[0]) if r[0] in SUBTLE else 0))
