"""Ministral-3 text model (``ministral3``: Ministral-3 3B/8B/14B, and the language model of
Devstral-2 / Ministral-3 VLMs): Mistral's layer with YaRN rope and Llama-4's attention
temperature: after rope, the query is scaled by ``1 + beta * log(1 + floor(pos / m))`` (``beta``
= ``rope_parameters.llama_4_scaling_beta``, ``m`` = its ``original_max_position_embeddings``), so
positions past the pre-training length attend more sharply. Megatron side: ``modeling_ministral3.py``.
"""
from __future__ import annotations

from typing import Any

from bridges.core.config import ConfigError, get_path
from bridges.core.gpt import local_layer_spec
from bridges.core.provider import ModelProvider
from bridges.core.registry import register_bridge
from bridges.models.mistral.mistral_bridge import MistralBridge


@register_bridge(model_type="ministral3", architectures=["Ministral3ForCausalLM"])
class Ministral3Bridge(MistralBridge):
    # transformers' fine-grained FP8 without blocks: per-tensor weight_scale_inv, static activation_scale
    quantized_formats = ("static",)

    @property
    def megatron_lm(self) -> str | None:
        if self.megatron_attrs()["llama_4_scaling_beta"]:
            return ("its query scaling by position (rope_parameters.llama_4_scaling_beta) is the "
                    "family's own module (modeling_ministral3.py): Megatron-LM's GPT layers have none")
        return None

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The scaling's period (``original_max_position_embeddings``) cut to 8 positions, so that
        the toy's 32-token prompts cross it three times (at the published 8192 the scale is 1
        throughout a toy prompt, and dropping it would go unseen)."""
        rope = dict(config.get("rope_parameters") or {})
        if rope.get("llama_4_scaling_beta"):
            rope["original_max_position_embeddings"] = 8
            config["rope_parameters"] = rope
        return super().toy_config(config)

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        rope = self.rope()
        beta = rope.get("llama_4_scaling_beta")
        attrs["llama_4_scaling_beta"] = float(beta) if beta else None
        attrs["llama_4_scaling_period"] = None
        if beta:
            period = rope.get("original_max_position_embeddings")
            if not period:
                raise ConfigError("rope_parameters.llama_4_scaling_beta is set without "
                                  "rope_parameters.original_max_position_embeddings (its period)")
            attrs["llama_4_scaling_period"] = int(period)
        return attrs

    def hf_config_dict(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        attrs = attrs if attrs is not None else self.megatron_attrs()
        out = super().hf_config_dict(attrs)
        if attrs["llama_4_scaling_beta"]:
            out["rope_parameters"].update(llama_4_scaling_beta=attrs["llama_4_scaling_beta"],
                                          original_max_position_embeddings=attrs["llama_4_scaling_period"])
        # transformers' Ministral3Config writes the model's length into its rope parameters too
        # (and ignores it there): kept as the source has it
        length = get_path(self.hf_config, "rope_parameters.max_position_embeddings", None)
        if length is not None:
            out["rope_parameters"]["max_position_embeddings"] = length
        return out

    def layer_spec(self, provider: ModelProvider, vp_stage: int | None = None):
        from bridges.models.ministral3.modeling_ministral3 import position_scaled_layer_spec

        spec = local_layer_spec(provider, vp_stage)
        if not provider.llama_4_scaling_beta:
            return spec
        return position_scaled_layer_spec(spec, provider.llama_4_scaling_beta, provider.llama_4_scaling_period)

    def build_model(self, provider: ModelProvider, pre_process: bool, post_process: bool,
                    vp_stage: int | None = None):
        from bridges.models.ministral3.modeling_ministral3 import PositionScaledGPTModel

        return self.gpt_model(PositionScaledGPTModel, provider, pre_process, post_process, vp_stage)
