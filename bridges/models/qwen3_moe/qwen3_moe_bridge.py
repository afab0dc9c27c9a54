"""Qwen3-MoE: Qwen3 attention (per-head q/k norm, no bias) with routed experts only, softmax
routing renormalised over the top-k (norm_topk_prob), optional dense layers (mlp_only_layers,
decoder_sparse_step)."""
from bridges.core.config import GPT_FIELDS
from bridges.core.moe import MoEBridge, moe_fields, qwen_moe_layers
from bridges.core.registry import register_bridge


@register_bridge(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
class Qwen3MoeBridge(MoEBridge):
    qk_norm = True
    quantized_formats = ("nvfp4", "compressed", "gptq")  # ModelOpt NVFP4; compressed-tensors FP8 (RedHat, routers kept); GPTQ int4 (Qwen's)
    config_fields = GPT_FIELDS + moe_fields()

    def moe_layers(self):
        return qwen_moe_layers(self.hf_config)
