"""Gemma2: Gemma's layer (zero-centred norms, scaled embeddings, tanh-GeGLU, tied embeddings)
with four norms per layer (input and post-attention around attention, pre- and post-feedforward
around the MLP: HF's ``post_attention_layernorm`` is the norm after attention here, not the
pre-MLP norm of Llama and Gemma), attention-logit and final-logit soft-capping (50 and 30),
``query_pre_attn_scalar`` ** -0.5 as the attention scale, and sliding-window and global layers
alternating (``layer_types``; the published configs leave it out and transformers windows the
even layers). Megatron side: ``modeling_gemma2.py`` (the soft-capped attention, the post-norm
projections).
"""
from __future__ import annotations

from typing import Any

from bridges.core.config import Field, activation_to_hf, activation_to_megatron, get_path
from bridges.core.gpt import H, L
from bridges.core.mappings import Mapping, Replicated
from bridges.core.provider import ModelProvider
from bridges.core.registry import register_bridge
from bridges.models.gemma.gemma_bridge import GemmaBridge, gemma_fields


def _inverse_sqrt(v: float) -> float:
    return float(v) ** -0.5


def _scalar_from_scale(s: float):
    v = s ** -2
    return int(round(v)) if abs(v - round(v)) < 1e-6 * v else v


def gemma2_fields() -> tuple[Field, ...]:
    return gemma_fields(Field("hidden_activation", "activation_func", "gelu_pytorch_tanh",
                              activation_to_megatron, activation_to_hf)) + (
        Field("query_pre_attn_scalar", "softmax_scale", 256, _inverse_sqrt, _scalar_from_scale),
        Field("attn_logit_softcapping", "attn_logit_softcapping", None),
        Field("final_logit_softcapping", "final_logit_softcapping", None),
    )


@register_bridge(model_type="gemma2", architectures=["Gemma2ForCausalLM"])
class Gemma2Bridge(GemmaBridge):
    config_fields = gemma2_fields()
    sliding_window = "per_layer"
    # transformers' defaults for a config that leaves the caps out (an explicit null: no cap)
    softcap_defaults: dict[str, float] = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        attrs["post_sublayer_norms"] = True  # four norms a layer (the FLOPs calculator counts them)
        cfg = self.hf_config
        for k, v in self.softcap_defaults.items():
            if isinstance(cfg, dict) and k not in cfg:
                attrs[k] = v
        return attrs

    # Toy soft-caps: a toy's attention scores are ~0.7 (99th percentile ~3) and its logits ~0.2
    # (at most ~1.4), where caps of 50 and 30 bend nothing (a dropped cap would pass); 4 and 1
    # bend them by 1-2 %, far above the 1e-5 logits bound.
    toy_softcaps: dict[str, float] = {"attn_logit_softcapping": 4.0, "final_logit_softcapping": 1.0}

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Soft-caps at the toy's scale (where the config has them), and both kinds of layer
        among the toy's few: a per-layer list keeps its head, with the last layer made global
        (and the first windowed) if it lost them."""
        c = dict(config)
        for k, toy in cls.toy_softcaps.items():
            if c.get(k, cls.softcap_defaults.get(k)):
                c[k] = toy
        types = c.get("layer_types")
        if isinstance(types, list):
            types = list(types)
            if "full_attention" not in types:
                types[-1] = "full_attention"
            if "sliding_attention" not in types:
                types[0] = "sliding_attention"
            c["layer_types"] = types
        return c

    def layer_types(self) -> list[str]:
        """The config's, else transformers' default: layer i windowed when i is even."""
        types = get_path(self.hf_config, "layer_types", None)
        n = get_path(self.hf_config, "num_hidden_layers")
        return list(types) if types else ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                          for i in range(n)]

    def model_extras(self, provider: ModelProvider) -> dict[str, Any]:
        return {**super().model_extras(provider),
                "final_logit_softcapping": provider.final_logit_softcapping}

    def layer_spec(self, provider: ModelProvider, vp_stage: int | None = None):
        from bridges.core.gpt import local_layer_spec
        from bridges.models.gemma.modeling_gemma import gemma_block_spec
        from bridges.models.gemma2.modeling_gemma2 import sandwich_layer_spec

        layer = sandwich_layer_spec(local_layer_spec(provider, vp_stage),
                                    provider.attn_logit_softcapping)
        return gemma_block_spec(provider, vp_stage, layer)

    def mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        pre_mlp = L + "pre_mlp_layernorm.weight"
        table = [Replicated(pre_mlp, H + "pre_feedforward_layernorm.weight") if m.megatron == pre_mlp else m
                 for m in super().mappings(attrs)]
        return table + [
            Replicated(L + "self_attention.linear_proj.post_layernorm.weight",
                       H + "post_attention_layernorm.weight"),
            Replicated(L + "mlp.linear_fc2.post_layernorm.weight",
                       H + "post_feedforward_layernorm.weight")]
