"""GLM-4.5 (glm4_moe): q/k/v bias (none on o_proj), optional per-head q/k norm (use_qk_norm),
partial rotary (half the head dim), the first ``first_k_dense_replace`` layers dense, then
routed experts with sigmoid scores, a score-correction bias for the choice
(``e_score_correction_bias``), group-limited top-k, renormalised and scaled by
``routed_scaling_factor``, plus ``n_shared_experts`` always-on experts (no gate).
The MTP layer of published checkpoints (``model.layers.<num_hidden_layers>``) is not mapped."""
from typing import Any

from bridges.core.config import GPT_FIELDS, ConfigError, Field, get_path
from bridges.core.moe import MoEBridge, moe_fields
from bridges.core.registry import register_bridge


@register_bridge(model_type="glm4_moe", architectures=["Glm4MoeForCausalLM"])
class Glm4MoeBridge(MoEBridge):
    attention_bias_on_o = False
    config_fields = GPT_FIELDS + moe_fields(experts="n_routed_experts") + (
        Field("routed_scaling_factor", "moe_router_topk_scaling_factor", 1.0),
        Field("n_group", "moe_router_num_groups", 1),
        Field("topk_group", "moe_router_group_topk", 1),
        Field("first_k_dense_replace", "first_k_dense_replace", 1),
        Field("n_shared_experts", "n_shared_experts", 1),
        Field("use_qk_norm", "qk_layernorm", False),
    )
    router_bias_hf = "mlp.gate.e_score_correction_bias"
    shared_hf = {"gate": "mlp.shared_experts.gate_proj.weight", "up": "mlp.shared_experts.up_proj.weight",
                 "down": "mlp.shared_experts.down_proj.weight"}

    def moe_layers(self) -> list[int]:
        k = get_path(self.hf_config, "first_k_dense_replace", 1)
        return [int(i >= k) for i in range(self._num_layers())]

    def megatron_attrs(self) -> dict[str, Any]:
        qk_norm = bool(get_path(self.hf_config, "use_qk_norm", False))
        attrs = super().megatron_attrs()
        if attrs["moe_router_pre_softmax"]:
            raise ConfigError("norm_topk_prob=False with sigmoid routing: Megatron-Core always "
                              "renormalises sigmoid scores over the top-k")
        attrs.update(qk_layernorm=qk_norm, moe_router_score_function="sigmoid",
                     moe_router_pre_softmax=False, moe_router_enable_expert_bias=True,
                     moe_shared_expert_intermediate_size=attrs["moe_ffn_hidden_size"] * attrs["n_shared_experts"])
        if attrs["moe_router_num_groups"] == 1:  # one group: plain top-k
            attrs.update(moe_router_num_groups=None, moe_router_group_topk=None)
        return attrs

    def hf_config_dict(self, attrs=None):
        attrs = attrs if attrs is not None else self.megatron_attrs()
        out = super().hf_config_dict({**attrs, "moe_router_num_groups": attrs["moe_router_num_groups"] or 1,
                                      "moe_router_group_topk": attrs["moe_router_group_topk"] or 1,
                                      "moe_router_pre_softmax": False})
        return out
