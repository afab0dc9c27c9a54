"""Mixtral: Mistral attention, 8 experts of intermediate_size (w1 gate, w3 up, w2 down) under
``block_sparse_moe``, softmax top-2 renormalised. A stacked checkpoint (transformers' in-memory
layout) names the block ``mlp`` instead."""
from typing import Any

from bridges.core.config import GPT_FIELDS
from bridges.core.gpt import sliding_window_to_hf, sliding_window_to_megatron
from bridges.core.moe import MoEBridge, moe_fields
from bridges.core.registry import register_bridge


@register_bridge(model_type="mixtral", architectures=["MixtralForCausalLM"])
class MixtralBridge(MoEBridge):
    # always renormalised over the top-k: no norm_topk_prob field
    config_fields = GPT_FIELDS + moe_fields(experts="num_local_experts", ffn="intermediate_size",
                                            norm_topk=False)
    experts_hf = {"gate": "block_sparse_moe.experts.*.w1.weight", "up": "block_sparse_moe.experts.*.w3.weight",
                  "down": "block_sparse_moe.experts.*.w2.weight"}

    @property
    def router_hf(self) -> str:
        return "mlp.gate.weight" if self.stacked_experts() else "block_sparse_moe.gate.weight"

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        attrs["window_size"] = sliding_window_to_megatron(self.hf_config)
        return attrs

    def hf_config_dict(self, attrs=None):
        attrs = attrs if attrs is not None else self.megatron_attrs()
        return {**super().hf_config_dict(attrs), "sliding_window": sliding_window_to_hf(attrs)}
