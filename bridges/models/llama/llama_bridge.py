"""Llama 2 and 3.x: GQA, SwiGLU, RMSNorm, llama3 rope scaling, tied embeddings (3.2 1B/3B)."""
from bridges.core.gpt import GPTBridge
from bridges.core.registry import register_bridge


@register_bridge(model_type="llama", architectures=["LlamaForCausalLM"])
class LlamaBridge(GPTBridge):
    quantized_formats = ("nvfp4", "modelopt", "compressed")  # NVIDIA ModelOpt NVFP4 / FP8; compressed-tensors FP8 (RedHat)
