"""Mistral: Llama layout with an optional sliding attention window (v0.1: 4096)."""
from typing import Any

from bridges.core.gpt import GPTBridge, sliding_window_to_hf, sliding_window_to_megatron
from bridges.core.registry import register_bridge


@register_bridge(model_type="mistral", architectures=["MistralForCausalLM"])
class MistralBridge(GPTBridge):
    quantized_formats = ("tensor",)  # per-tensor FP8 with weight_scale

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        attrs["window_size"] = sliding_window_to_megatron(self.hf_config)
        return attrs

    def hf_config_dict(self, attrs=None):
        attrs = attrs if attrs is not None else self.megatron_attrs()
        return {**super().hf_config_dict(attrs), "sliding_window": sliding_window_to_hf(attrs)}
