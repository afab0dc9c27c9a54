"""Gemma (v1: gemma-2b / 7b): the Llama layout with zero-centred RMSNorms (the norm scales by
1 + w: Megatron's ``layernorm_zero_centered_gamma``), embeddings scaled by sqrt(hidden_size) in
the model's dtype, GeGLU with tanh-approximate GELU (the published ``hidden_act="gelu"`` means
it, as in transformers), tied embeddings by default (the published configs do not say) and
head_dim 256 apart from hidden / heads (gemma-2b: MQA, 8 heads over one KV head). Megatron
side: ``modeling_gemma.py`` (the norm, the embedding scale, the block spec).
"""
from __future__ import annotations

from typing import Any

from bridges.core.config import GPT_FIELDS, Field, activation_to_hf, activation_to_megatron
from bridges.core.gpt import GPTBridge, local_layer_spec
from bridges.core.provider import ModelProvider
from bridges.core.registry import register_bridge


def _gemma_act(name: str):
    # transformers' GemmaConfig turns the published "gelu" into the tanh approximation
    return activation_to_megatron("gelu_pytorch_tanh" if name == "gelu" else name)


def gemma_fields(act: Field) -> tuple[Field, ...]:
    """GPT's fields with Gemma's defaults: tied embeddings, tanh-GELU under ``act``'s name."""
    out = []
    for f in GPT_FIELDS:
        if f.megatron == "activation_func":
            f = act
        elif f.megatron == "share_embeddings_and_output_weights":
            f = Field(f.hf, f.megatron, True)
        out.append(f)
    return tuple(out)


@register_bridge(model_type="gemma", architectures=["GemmaForCausalLM"])
class GemmaBridge(GPTBridge):
    config_fields = gemma_fields(Field("hidden_act", "activation_func", "gelu_pytorch_tanh",
                                       _gemma_act, activation_to_hf))
    qkv_bias = None  # attention_bias: q, k, v and o
    megatron_lm = ("its zero-centred norms, scaled embeddings (and Gemma2/3's soft-caps and sandwich "
                   "norms) are the family's own modules (bridges/models/gemma*/modeling_*.py); "
                   "Megatron-LM's local layers refuse zero-centred norms and scale nothing")

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        attrs["layernorm_zero_centered_gamma"] = True
        return attrs

    def embedding_scale(self, provider: ModelProvider) -> float | None:
        return provider.hidden_size ** 0.5

    def model_extras(self, provider: ModelProvider) -> dict[str, Any]:
        """GemmaModel's own arguments."""
        return {"embedding_scale": self.embedding_scale(provider)}

    def build_model(self, provider: ModelProvider, pre_process: bool, post_process: bool,
                    vp_stage: int | None = None):
        from bridges.models.gemma.modeling_gemma import gemma_model_class

        return self.gpt_model(gemma_model_class(), provider, pre_process, post_process, vp_stage,
                              **self.model_extras(provider))

    def layer_spec(self, provider: ModelProvider, vp_stage: int | None = None):
        from bridges.models.gemma.modeling_gemma import gemma_block_spec

        return gemma_block_spec(provider, vp_stage, local_layer_spec(provider, vp_stage))
