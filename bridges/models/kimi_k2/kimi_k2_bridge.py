"""Kimi-K2 (kimi_k2): the DeepSeek-V3 architecture with its own sizes (384 experts, 64 heads,
one dense layer, no group limit, no MTP layer in the published checkpoint). transformers has no
kimi_k2 type: the config is read as deepseek_v3 and the model built by transformers' DeepSeek-V3
class; the published ``auto_map`` names a copy of DeepSeek-V3's code, which is never run."""
from typing import Any

from bridges.core.registry import register_bridge
from bridges.models.deepseek.deepseek_bridge import DeepseekV3Bridge


@register_bridge(model_type="kimi_k2")
class KimiK2Bridge(DeepseekV3Bridge):
    hf_model_type = "deepseek_v3"

    def hf_config_dict(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**super().hf_config_dict(attrs), "architectures": ["DeepseekV3ForCausalLM"]}
