"""Gemma3 text model (``gemma3_text``: gemma-3-1b, and the language model of the 4B+ VLMs):
Gemma2's layer (zero-centred and sandwich norms, ``query_pre_attn_scalar``, soft-caps when set:
none in the published configs) with a zero-centred QK norm per head, sliding-window layers from
``layer_types`` or, in the published configs, ``sliding_window_pattern`` (every 6th layer
global; any pattern converts), and two rope bases: ``rope_local_base_freq`` (10 000) on the
sliding layers, ``rope_theta`` (1 000 000, with ``rope_scaling``: linear x8 on the 4B+ models)
on the global ones; transformers 5 writes both as ``rope_parameters`` per layer type. Megatron
side: ``modeling_gemma3.py`` (the local rope on windowed layers).
"""
from __future__ import annotations

from typing import Any

from bridges.core.config import ConfigError, get_path
from bridges.core.gpt import local_layer_spec, rope_to_hf
from bridges.core.provider import ModelProvider
from bridges.core.registry import register_bridge
from bridges.models.gemma2.gemma2_bridge import Gemma2Bridge

_THETA = {"full_attention": ("rope_theta", 1_000_000.0),
          "sliding_attention": ("rope_local_base_freq", 10_000.0)}


@register_bridge(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"])
class Gemma3TextBridge(Gemma2Bridge):
    qk_norm = True
    softcap_defaults: dict[str, float] = {}

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Gemma2's, and a ``sliding_window_pattern`` longer than the toy made as long as it
        (every 6th layer global would leave four toy layers all windowed): the last toy layer
        is global, derived by the same rule as the published configs'."""
        c = super().toy_config(config)
        n = c["num_hidden_layers"]
        if not c.get("layer_types") and int(c.get("sliding_window_pattern") or 6) > n:
            c["sliding_window_pattern"] = n
        return c

    def layer_types(self) -> list[str]:
        types = get_path(self.hf_config, "layer_types", None)
        if types:
            return list(types)
        n = get_path(self.hf_config, "num_hidden_layers")
        every = int(get_path(self.hf_config, "sliding_window_pattern", 6))
        return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]

    def _rope_of(self, kind: str) -> dict[str, Any]:
        """The rope parameters of one layer type: transformers 5's ``rope_parameters[kind]``,
        or the published fields (``rope_scaling`` belongs to the global layers only)."""
        cfg = self.hf_config
        nested = dict(get_path(cfg, "rope_parameters", None) or {})
        if nested and not set(nested) & set(_THETA):
            nested = {"full_attention": nested}
        legacy = get_path(cfg, "rope_scaling", None) if kind == "full_attention" else None
        p = dict(nested.get(kind) or legacy or {})
        if "type" in p and "rope_type" not in p:
            p["rope_type"] = p.pop("type")
        p.setdefault("rope_type", "default")
        field, default = _THETA[kind]
        p.setdefault("rope_theta", get_path(cfg, field, default))
        return p

    def rope(self) -> dict[str, Any]:
        return self._rope_of("full_attention")

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        local = self._rope_of("sliding_attention")
        if local["rope_type"] != "default":
            raise ConfigError(f"rope_parameters.sliding_attention.rope_type={local['rope_type']!r}: "
                              f"scaled rope on the sliding-window layers is not supported by the "
                              f"{self.model_type} bridge")
        attrs["local_rotary_base"] = float(local["rope_theta"])
        return attrs

    def hf_config_dict(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        attrs = attrs if attrs is not None else self.megatron_attrs()
        out = super().hf_config_dict(attrs)
        out["rope_parameters"] = {"full_attention": rope_to_hf(attrs),
                                  "sliding_attention": {"rope_type": "default",
                                                        "rope_theta": attrs["local_rotary_base"]}}
        return out

    def layer_spec(self, provider: ModelProvider, vp_stage: int | None = None):
        from bridges.models.gemma.modeling_gemma import gemma_block_spec

        return gemma_block_spec(provider, vp_stage, self.decoder_layer(provider, vp_stage))

    def decoder_layer(self, provider: ModelProvider, vp_stage: int | None = None):
        """One decoder layer's spec (the VLM's language model adds its image mask to it)."""
        from bridges.models.gemma2.modeling_gemma2 import sandwich_layer_spec
        from bridges.models.gemma3.modeling_gemma3 import local_rope_layer_spec

        layer = sandwich_layer_spec(local_layer_spec(provider, vp_stage), provider.attn_logit_softcapping)
        return local_rope_layer_spec(layer, provider.local_rotary_base)
