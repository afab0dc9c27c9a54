"""Deliberately broken Gemma bridges (tests/test_gemma.py): each injects one bug of the kind a
Gemma conversion gets wrong, on the Megatron side (the HF config and tensors stay right)."""
from __future__ import annotations

from bridges.core.gpt import local_layer_spec
from bridges.core.mappings import Replicated
from bridges.models.gemma.gemma_bridge import GemmaBridge
from bridges.models.gemma.modeling_gemma import gemma_block_spec
from bridges.models.gemma2.gemma2_bridge import Gemma2Bridge
from bridges.models.gemma2.modeling_gemma2 import sandwich_layer_spec
from bridges.models.gemma3.gemma3_bridge import Gemma3TextBridge


class ZeroCentreDropped(GemmaBridge):
    """The Megatron flag left off: every norm scales by w instead of 1 + w."""

    def megatron_attrs(self):
        return {**super().megatron_attrs(), "layernorm_zero_centered_gamma": False}


class EmbeddingScaleDropped(GemmaBridge):
    def embedding_scale(self, provider):
        return None


class AttnSoftcapDropped(Gemma2Bridge):
    """The cap is translated (the config is right) but the attention never applies it."""

    def layer_spec(self, provider, vp_stage=None):
        return gemma_block_spec(provider, vp_stage, sandwich_layer_spec(local_layer_spec(provider, vp_stage), None))


class FinalSoftcapDropped(Gemma2Bridge):
    def model_extras(self, provider):
        return {**super().model_extras(provider), "final_logit_softcapping": None}


class PostNormsSwapped(Gemma2Bridge):
    """post_attention_layernorm and post_feedforward_layernorm exchanged."""

    def mappings(self, attrs):
        swap = {"post_attention_layernorm": "post_feedforward_layernorm",
                "post_feedforward_layernorm": "post_attention_layernorm"}
        out = []
        for m in super().mappings(attrs):
            for a, b in swap.items():
                if m.megatron.endswith("post_layernorm.weight") and f".{a}." in m.hf:
                    m = Replicated(m.megatron, m.hf.replace(a, b))
                    break
            out.append(m)
        return out


class SlidingPatternShifted(Gemma3TextBridge):
    """Megatron windows the layer after each windowed one (an off-by-one in the layer pattern)."""

    def window_attrs(self):
        attrs = super().window_attrs()
        skip = attrs.get("window_attn_skip_freq")
        if skip:
            attrs["window_attn_skip_freq"] = skip[-1:] + skip[:-1]
        return attrs


class RopeBasesSwapped(Gemma3TextBridge):
    """Local layers rotate with the global base and global layers with the local one."""

    def megatron_attrs(self):
        attrs = super().megatron_attrs()
        attrs["rotary_base"], attrs["local_rotary_base"] = attrs["local_rotary_base"], attrs["rotary_base"]
        return attrs
