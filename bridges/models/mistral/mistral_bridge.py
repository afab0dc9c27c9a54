"""Mistral: Llama layout with an optional sliding attention window (v0.1: 4096)."""
from typing import Any

from bridges.core.config import get_path
from bridges.core.gpt import GPTBridge
from bridges.core.registry import register_bridge


@register_bridge(model_type="mistral", architectures=["MistralForCausalLM"])
class MistralBridge(GPTBridge):
    quantized_formats = ("tensor",)  # per-tensor FP8 with weight_scale

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        window = get_path(self.hf_config, "sliding_window", None)
        # HF attends to the last `sliding_window` positions, the current one included.
        attrs["window_size"] = (window - 1, 0) if window else None
        return attrs

    def hf_config_dict(self, attrs=None):
        attrs = attrs if attrs is not None else self.megatron_attrs()
        out = super().hf_config_dict(attrs)
        out["sliding_window"] = attrs["window_size"][0] + 1 if attrs["window_size"] else None
        return out
