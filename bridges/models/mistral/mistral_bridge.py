"""Mistral: Llama layout with an optional sliding attention window (v0.1: 4096)."""
from bridges.core.gpt import GPTBridge
from bridges.core.registry import register_bridge


@register_bridge(model_type="mistral", architectures=["MistralForCausalLM"])
class MistralBridge(GPTBridge):
    sliding_window = "all"
    quantized_formats = ("tensor",)  # per-tensor FP8 with weight_scale
