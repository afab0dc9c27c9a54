"""IBM Granite: ``granite`` (dense, the Llama layout) and ``granitemoe`` (the Mixtral layout with
Granite's stored expert names), each plus four scalars:

- ``embedding_multiplier``: embeddings * m. Megatron-Core's own ``use_mup`` +
  ``mup_embedding_mult`` (LanguageModelEmbedding multiplies after the lookup). use_mup's other
  effects are neutral here: ``mup_base_hidden_size`` is left unset, so the width multiplier is 1
  (no init, LR or output rescaling), ``softmax_scale`` is set by the bridge (use_mup only fills
  it when None), ``mup_output_mult`` is set by the bridge (use_mup only sets it at a width
  multiplier != 1), the init methods do not matter for loaded weights, and the parameters'
  ``is_embedding_parameter`` marks only group a MuP optimizer. No hook: Megatron-LM's trainer
  gets the same through ``--use-mup --mup-embedding-mult``.
- ``attention_multiplier``: the softmax scale (``softmax_scale``; HF's default 1.0, not
  1/sqrt(head_dim)).
- ``residual_multiplier``: residual + m * sublayer output, after attention and after the MLP.
  Not in Megatron-Core: modeling_granite.py's bias-dropout-add builder in the layer spec's
  ``self_attn_bda`` / ``mlp_bda``; the trainer takes it through ``--spec`` (megatron_lm_spec.py).
- ``logits_scaling``: logits / s. Megatron-Core's ``mup_output_mult`` = 1 / s multiplies the
  logits (LanguageModule._scale_logits): x * (1/s) and x / s differ by at most an ulp, far
  inside the fp32 bound (measured in docs/granite.md). The HF value is kept as the
  ``logits_scaling`` attribute, so export writes back the file's s exactly.

granitemoe's experts are stored stacked (what transformers' save_pretrained writes, and the
published checkpoints): ``block_sparse_moe.input_linear.weight`` [E, 2I, H] with the gate half
first (GraniteMoeExperts: ``gate, up = ... .chunk(2)``), ``block_sparse_moe.output_linear.weight``
[E, H, I], router ``block_sparse_moe.router.layer.weight`` [E, H] (transformers 5 renames them
on load only; a checkpoint saved from transformers' state dict has those in-memory names
``block_sparse_moe.experts.gate_up_proj`` / ``down_proj`` / ``router.weight``, read too, and
written back as found). Router: top-k of the logits, softmax over those k (= softmax renormalised over
the top-k, Mixtral's; no norm_topk_prob field); no shared expert (granitemoeshared is another
model type, not handled). See docs/granite.md.
"""
from __future__ import annotations

from typing import Any

from bridges.core.config import GPT_FIELDS, Field
from bridges.core.gpt import GPTBridge, local_layer_spec
from bridges.core.moe import MoEBridge, moe_fields
from bridges.core.provider import ModelProvider
from bridges.core.registry import register_bridge

# The four scalars. Megatron side: TransformerConfig fields (mup_embedding_mult, softmax_scale)
# and two bridge attributes the family's modules read (residual_multiplier; logits_scaling, as
# mup_output_mult = 1 / s). Defaults: transformers' GraniteConfig / GraniteMoeConfig (all 1.0).
GRANITE_FIELDS = (Field("embedding_multiplier", "mup_embedding_mult", 1.0),
                  Field("attention_multiplier", "softmax_scale", 1.0),
                  Field("residual_multiplier", "residual_multiplier", 1.0),
                  Field("logits_scaling", "logits_scaling", 1.0))


class GraniteScalars:
    """A bridge mixin: Granite's four multipliers on a GPT / MoE bridge."""

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        # use_mup: Megatron applies mup_embedding_mult and mup_output_mult only with it
        attrs.update(use_mup=True, mup_output_mult=self.output_mult(attrs["logits_scaling"]))
        return attrs

    def output_mult(self, logits_scaling: float) -> float:
        """Megatron's logit multiplier for HF's logits / logits_scaling."""
        return 1.0 / logits_scaling

    def residual_multiplier(self, provider: ModelProvider) -> float:
        return provider.residual_multiplier

    @property
    def megatron_lm_spec(self) -> tuple[str, str] | None:
        from bridges.models.granite.megatron_lm_spec import spec_name

        m = self.megatron_attrs()["residual_multiplier"]
        return None if m == 1.0 else ("bridges.models.granite.megatron_lm_spec", spec_name(m))


@register_bridge(model_type="granite", architectures=["GraniteForCausalLM"])
class GraniteBridge(GraniteScalars, GPTBridge):
    config_fields = GPT_FIELDS + GRANITE_FIELDS

    def layer_spec(self, provider: ModelProvider, vp_stage: int | None = None):
        from bridges.models.granite.modeling_granite import residual_scaled

        return residual_scaled(local_layer_spec(provider, vp_stage), self.residual_multiplier(provider))


@register_bridge(model_type="granitemoe", architectures=["GraniteMoeForCausalLM"])
class GraniteMoeBridge(GraniteScalars, MoEBridge):
    # top-k logits, softmax over them: always renormalised (no norm_topk_prob field)
    config_fields = GPT_FIELDS + moe_fields(experts="num_local_experts", ffn="intermediate_size",
                                            norm_topk=False) + GRANITE_FIELDS
    # the stored names, and transformers' in-memory ones (a checkpoint saved from a state dict)
    STORED = {"gate_up": "block_sparse_moe.input_linear.weight", "down": "block_sparse_moe.output_linear.weight",
              "router": "block_sparse_moe.router.layer.weight"}
    IN_MEMORY = {"gate_up": "block_sparse_moe.experts.gate_up_proj", "down": "block_sparse_moe.experts.down_proj",
                 "router": "block_sparse_moe.router.weight"}

    def _names(self) -> dict[str, str]:
        return self.IN_MEMORY if self._in_some_layer(self.IN_MEMORY["gate_up"]) else self.STORED

    @property
    def stacked_hf(self) -> dict[str, str]:
        n = self._names()
        return {"gate_up": n["gate_up"], "down": n["down"]}

    @property
    def router_hf(self) -> str:
        return self._names()["router"]

    def stacked_experts(self) -> bool:
        return True  # granitemoe checkpoints have no per-expert layout

    def layer_spec(self, provider: ModelProvider, vp_stage: int | None = None):
        from bridges.core.experts import block_spec
        from bridges.models.granite.modeling_granite import residual_scaled

        m = self.residual_multiplier(provider)
        return block_spec(provider, vp_stage, lambda spec, is_moe: residual_scaled(
            self.customize_layer(spec, is_moe), m))
