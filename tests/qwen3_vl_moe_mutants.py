"""Deliberately broken Qwen3-VL-MoE bridges (tests/test_qwen3_vl_moe.py)."""
from __future__ import annotations

from bridges.models.qwen3_vl_moe.qwen3_vl_moe_bridge import Qwen3VLMoeBridge, Qwen3VLMoeLanguageBridge


class _InMemory(Qwen3VLMoeLanguageBridge):
    def transposed(self, part, moe):
        return False


class ExpertsReadInMemoryLayout(Qwen3VLMoeBridge):
    """The published transposed experts read as transformers' in-memory layout."""

    language_bridge = _InMemory


class _NotRenormalised(Qwen3VLMoeLanguageBridge):
    def megatron_attrs(self):
        return {**super().megatron_attrs(), "moe_router_pre_softmax": True}


class TopKNotRenormalised(Qwen3VLMoeBridge):
    """The router's top-k probabilities not renormalised (softmax over all experts, then top-k)."""

    language_bridge = _NotRenormalised
