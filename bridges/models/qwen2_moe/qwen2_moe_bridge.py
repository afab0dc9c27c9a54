"""Qwen2-MoE (Qwen1.5-MoE): q/k/v bias, routed experts with softmax over all experts before
the top-k (norm_topk_prob=False), and one shared expert scaled by a sigmoid gate
(shared_expert_gate)."""
from typing import Any

from bridges.core.config import GPT_FIELDS, Field
from bridges.core.moe import MoEBridge, moe_fields, qwen_moe_layers
from bridges.core.registry import register_bridge


@register_bridge(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"])
class Qwen2MoeBridge(MoEBridge):
    qkv_bias = True
    config_fields = GPT_FIELDS + moe_fields() + (
        Field("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),)
    shared_hf = {"gate": "mlp.shared_expert.gate_proj.weight", "up": "mlp.shared_expert.up_proj.weight",
                 "down": "mlp.shared_expert.down_proj.weight"}
    shared_gate_hf = "mlp.shared_expert_gate.weight"

    def megatron_attrs(self) -> dict[str, Any]:
        return {**super().megatron_attrs(), "moe_shared_expert_gate": True}

    def moe_layers(self):
        return qwen_moe_layers(self.hf_config)
