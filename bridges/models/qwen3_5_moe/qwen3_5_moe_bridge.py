"""Qwen3.5-MoE (``qwen3_5_moe``: Qwen/Qwen3.5 MoE checkpoints, ``Qwen3_5MoeForConditionalGeneration``):
Qwen3.5 (``bridges/models/qwen3_5/``: the hybrid text stack with split GDN input projections,
interleaved M-RoPE over the partial rotary width, Qwen3-VL's tower without deepstack) whose every
MLP is Qwen3-Next's MoE: routed experts and a shared expert behind a sigmoid gate. HF's router
renormalises the top-k probabilities always (the config has no ``norm_topk_prob``); no layer
is dense (no ``intermediate_size``). Experts are
read per expert (``mlp.experts.<e>.gate_proj``, as transformers saves them) or stacked
(``mlp.experts.gate_up_proj``, its in-memory layout), as Qwen3-Next's are.
"""
from __future__ import annotations

from typing import Any

from bridges.core.registry import register_bridge
from bridges.flops import vision_flops
from bridges.models.qwen3_5.qwen3_5_bridge import Qwen35Bridge, Qwen35TextBridge, TextOnlyToy
from bridges.models.qwen3_next.qwen3_next_bridge import FIELDS
from bridges.models.qwen3_vl.qwen3_vl_bridge import qwen3_vision_flops


class Qwen35MoeTextBridge(Qwen35TextBridge):
    """Qwen3.5-MoE's text model: Qwen3.5's, every MLP Qwen3-Next's MoE block."""

    # no dense MLP (no ``intermediate_size``), no ``norm_topk_prob``
    config_fields = tuple(f for f in FIELDS if f.hf not in ("norm_topk_prob", "intermediate_size"))
    mixture_of_experts = True
    hf_modeling = "qwen3_5_moe"

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        attrs["moe_router_pre_softmax"] = False  # HF renormalises the top-k
        attrs["ffn_hidden_size"] = attrs["moe_ffn_hidden_size"]  # Megatron wants one; no layer uses it
        return attrs


@register_bridge(model_type="qwen3_5_moe_text", architectures=["Qwen3_5MoeForCausalLM"])
class Qwen35MoeForCausalLMBridge(TextOnlyToy, Qwen35MoeTextBridge):
    """A text-only Qwen3.5-MoE checkpoint (``Qwen3_5MoeForCausalLM``): the VLM's language model alone."""


@register_bridge(model_type="qwen3_5_moe", architectures=["Qwen3_5MoeForConditionalGeneration"])
class Qwen35MoeBridge(Qwen35Bridge):
    language_bridge = Qwen35MoeTextBridge


vision_flops("qwen3_5_moe_vision", "qwen3_5_moe")(qwen3_vision_flops)
