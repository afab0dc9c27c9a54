"""OLMoE: q/k RMSNorm over the whole projection (modeling_olmoe: Megatron normalises per head),
head_dim always hidden_size / num_heads, 64 experts of intermediate_size, softmax over all
experts before the top-8 (norm_topk_prob=False), no shared expert."""
from typing import Any

from bridges.core.config import GPT_FIELDS, ConfigError, get_path
from bridges.core.gpt import H, L
from bridges.core.mappings import ColumnParallel
from bridges.core.moe import MoEBridge, moe_fields
from bridges.core.registry import register_bridge
from bridges.models.olmoe.modeling_olmoe import full_projection_qk_norm


class FullProjectionQKNorm:
    """A bridge mixin: q/k RMSNorm over the whole projection (HF ``self_attn.q_norm`` /
    ``k_norm`` of heads x head_dim) through ``modeling_olmoe``'s modules, each TP rank holding
    its heads' slice of the weights (OLMoE, MiniMax-M2)."""

    # Megatron-LM's --qk-layernorm normalises per head: the trainer takes the family's norms
    megatron_lm_spec = ("bridges.models.olmoe.megatron_lm_spec", "layer")

    def megatron_attrs(self) -> dict[str, Any]:
        # qk_norm_full_projection: for the FLOPs calculator (heads x head_dim norm weights)
        return {**super().megatron_attrs(), "qk_layernorm": True, "qk_norm_full_projection": True}

    def customize_layer(self, layer_spec, is_moe: bool):
        return full_projection_qk_norm(layer_spec)

    def mappings(self, attrs: dict[str, Any]):
        # each TP rank holds its heads' slice of the full-projection norm weights
        return [m for m in super().mappings(attrs) if "_layernorm.weight" not in m.megatron
                or "self_attention" not in m.megatron] + [
            ColumnParallel(L + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight"),
            ColumnParallel(L + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight")]


@register_bridge(model_type="olmoe", architectures=["OlmoeForCausalLM"])
class OlmoeBridge(FullProjectionQKNorm, MoEBridge):
    qkv_bias = False
    config_fields = GPT_FIELDS + moe_fields(ffn="intermediate_size")

    @classmethod
    def toy_config(cls, config):
        return {k: v for k, v in config.items() if k != "head_dim"}  # HF: hidden / heads

    def megatron_attrs(self) -> dict[str, Any]:
        if get_path(self.hf_config, "clip_qkv", None) is not None:
            raise ConfigError("clip_qkv is set: Megatron-Core has no q/k/v clipping")
        attrs = super().megatron_attrs()
        # HF OLMoE has no head_dim: it is hidden_size / num_attention_heads whatever the file says
        attrs["kv_channels"] = attrs["hidden_size"] // attrs["num_attention_heads"]
        return attrs
