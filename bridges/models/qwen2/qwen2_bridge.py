"""Qwen2 / Qwen2.5: Llama layout plus a bias on q, k and v (none on o_proj)."""
from bridges.core.gpt import GPTBridge
from bridges.core.registry import register_bridge


@register_bridge(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
class Qwen2Bridge(GPTBridge):
    qkv_bias = True
