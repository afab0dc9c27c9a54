"""Qwen3: per-head RMSNorm on queries and keys (q_norm / k_norm), head_dim set apart from
hidden_size / num_attention_heads, no QKV bias."""
from bridges.core.gpt import GPTBridge
from bridges.core.registry import register_bridge


@register_bridge(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
class Qwen3Bridge(GPTBridge):
    qk_norm = True
    # Qwen3-*-FP8: 128 x 128 blocks with weight_scale_inv; NVIDIA's ModelOpt NVFP4 releases
    # Qwen's FP8, ModelOpt NVFP4, compressed-tensors FP8, W4A16 and NVFP4 (RedHat's releases), Qwen's AWQ
    quantized_formats = ("block", "nvfp4", "compressed", "w4a16", "ct-nvfp4", "awq")
