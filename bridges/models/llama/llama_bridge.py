"""Llama 2 and 3.x: GQA, SwiGLU, RMSNorm, llama3 rope scaling, tied embeddings (3.2 1B/3B)."""
from bridges.core.gpt import GPTBridge
from bridges.core.registry import register_bridge


@register_bridge(model_type="llama", architectures=["LlamaForCausalLM"])
class LlamaBridge(GPTBridge):
    # NVIDIA ModelOpt NVFP4 / FP8; compressed-tensors FP8 and NVFP4 (RedHat's releases); bitsandbytes
    # NF4 (the *-bnb-4bit releases QLoRA starts from) and LLM.int8
    quantized_formats = ("nvfp4", "modelopt", "compressed", "ct-nvfp4", "bnb-nf4", "bnb-int8")
