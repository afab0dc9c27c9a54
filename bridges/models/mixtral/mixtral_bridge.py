"""Mixtral: Mistral attention, 8 experts of intermediate_size (w1 gate, w3 up, w2 down) under
``block_sparse_moe``, softmax top-2 renormalised. A stacked checkpoint (transformers' in-memory
layout) names the block ``mlp`` instead."""
from bridges.core.config import GPT_FIELDS
from bridges.core.moe import MoEBridge, moe_fields
from bridges.core.registry import register_bridge


@register_bridge(model_type="mixtral", architectures=["MixtralForCausalLM"])
class MixtralBridge(MoEBridge):
    sliding_window = "all"
    # always renormalised over the top-k: no norm_topk_prob field
    config_fields = GPT_FIELDS + moe_fields(experts="num_local_experts", ffn="intermediate_size",
                                            norm_topk=False)
    experts_hf = {"gate": "block_sparse_moe.experts.*.w1.weight", "up": "block_sparse_moe.experts.*.w3.weight",
                  "down": "block_sparse_moe.experts.*.w2.weight"}

    @property
    def router_hf(self) -> str:
        return "mlp.gate.weight" if self.stacked_experts() else "block_sparse_moe.gate.weight"
