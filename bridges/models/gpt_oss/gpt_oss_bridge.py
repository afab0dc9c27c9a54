"""GPT-OSS (``gpt_oss``: openai/gpt-oss-20b and -120b): a MoE decoder whose blocks differ from the
stock ones in five places, all on Megatron-Core's own modules:

- attention sinks: a learned logit per head in every softmax denominator (HF ``self_attn.sinks``
  -> Megatron ``core_attention.softmax_offset``, ``softmax_type="learnable"``, split by TP with
  the heads); biases on q, k, v and o;
- sliding-window (128) and full layers alternating by ``layer_types``; YaRN rope (x32 over 4096,
  ``truncate: false``: the correction range not rounded);
- the router: a linear with bias, top-k over the logits, softmax over the k chosen;
- experts with biases and a clamped gated activation: gate clamped above at ``swiglu_limit``, up
  clamped to +-limit, ``(up + 1) * gate * sigmoid(1.702 * gate)`` (Megatron: quick_gelu,
  ``glu_linear_offset=1``, ``activation_func_clamp_value``);
- HF stores each layer's experts stacked, input first, gate and up *interleaved* along the last
  dim: ``gate_up_proj`` [E, H, 2I] (gate = columns 0::2, up = 1::2) with ``gate_up_proj_bias``
  [E, 2I], ``down_proj`` [E, I, H] with ``down_proj_bias`` [E, H]; the published files store the
  expert weights as MXFP4 (``*_blocks`` [E, rows, H/32, 16] / ``*_scales``: the codec reads them,
  ``docs/quantization.md``), everything else in bf16 (``modules_to_not_convert``).
"""
from __future__ import annotations

from typing import Any

import torch

from bridges.core.config import GPT_FIELDS, ConfigError, Field, get_path
from bridges.core.gpt import H, L
from bridges.core.mappings import (ColumnParallel, GatedMLP, Mapping, MappingError, Replicated,
                                   StackedGatedMLP)
from bridges.core.moe import MoEBridge, moe_fields
from bridges.core.registry import register_bridge
from bridges.models.qwen3_vl_moe.qwen3_vl_moe_bridge import TransposedRowParallel

ALPHA = 1.702  # quick_gelu's: the only gate slope Megatron-Core's clamped GLU has


def sigmoid_gate(x: torch.Tensor) -> torch.Tensor:
    """GPT-OSS's gate activation, ``x * sigmoid(1.702 x)`` (Megatron-Core's quick_gelu)."""
    return x * torch.sigmoid(ALPHA * x)


sigmoid_gate.megatron_lm_flag = "--quick-geglu"  # Megatron-LM builds the same function


class InterleavedGateUp(StackedGatedMLP):
    """linear_fc1 (weight or bias) of one expert from a stacked ``gate_up_proj`` row stored input
    first ([H, 2I]; the bias [2I]) with gate and up interleaved along the last dim (gate at even
    positions, up at odd). Megatron's rows are [gate; up] per TP shard, as for ``GatedMLP``."""

    kind = "gated_mlp_interleaved"

    def _gate_up(self, hf):
        t = hf["gate_up"]
        t = t.transpose(0, 1) if t.dim() == 2 else t  # [2I, H] / [2I], still interleaved
        if t.shape[0] % 2:
            raise MappingError(f"{self.hf['gate_up']}: {t.shape[0]} gate/up entries, expected pairs")
        return t[0::2], t[1::2]

    def to_hf(self, shards, shapes):
        halves = GatedMLP.to_hf(self, shards, shapes)
        gate, up = halves["gate"], halves["up"]
        t = torch.stack([gate, up], dim=1).reshape(-1, *gate.shape[1:])
        return {"gate_up": t.transpose(0, 1).contiguous() if t.dim() == 2 else t}


@register_bridge(model_type="gpt_oss", architectures=["GptOssForCausalLM"])
class GptOssBridge(MoEBridge):
    config_fields = tuple(f for f in GPT_FIELDS if f.hf != "hidden_act") + moe_fields(
        "num_local_experts", "intermediate_size", norm_topk=False) + (
        Field("swiglu_limit", "activation_func_clamp_value", 7.0),
        Field("hidden_act", "hidden_act", "silu"),  # unused by HF's experts: kept as written
    )
    qkv_bias = True
    sliding_window = "per_layer"
    router_hf = "mlp.router.weight"
    quantized_formats = ("mxfp4",)  # the published experts: *_blocks / *_scales
    expert_tensor_parallel = False  # biased experts: Megatron-Core asserts expert TP 1
    megatron_lm_spec = ("bridges.models.gpt_oss.megatron_lm_spec", "layer")  # trainable biased experts

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """The clamp cut to 1.0: toy activations stay well inside the published 7.0, and a
        dropped clamp would go unseen; at 1.0 a good share of gates and ups are clamped. The toy
        is unquantized (the mxfp4 item makes its MXFP4 twin in the published layout)."""
        config["swiglu_limit"] = 1.0
        config.pop("quantization_config", None)
        return super().toy_config(config)

    def megatron_attrs(self) -> dict[str, Any]:
        cfg = self.hf_config
        if not get_path(cfg, "attention_bias", True):
            raise ConfigError("attention_bias=False: GPT-OSS's projections all have biases; this "
                              "bridge expects them")
        alpha = float(get_path(cfg, "swiglu_alpha", ALPHA))
        if alpha != ALPHA:
            raise ConfigError(f"swiglu_alpha={alpha}: Megatron-Core's clamped GLU uses quick_gelu's "
                              f"slope {ALPHA} only")
        attrs = super().megatron_attrs()
        attrs.update(add_bias_linear=True, softmax_type="learnable", gated_linear_unit=True,
                     activation_func=sigmoid_gate, glu_linear_offset=1.0,
                     moe_router_pre_softmax=False, moe_router_score_function="softmax")
        return attrs

    def customize_layer(self, layer_spec, is_moe: bool):
        from bridges.models.gpt_oss.modeling_gpt_oss import expert_output_copy

        return expert_output_copy(layer_spec)  # a backward pass through the biased experts

    def hf_config_dict(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        attrs = attrs if attrs is not None else self.megatron_attrs()
        out = super().hf_config_dict(attrs)
        out["attention_bias"] = True
        return out

    def stacked_experts(self) -> bool:
        return True  # the only layout transformers and the published files have

    def mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        moe = tuple(i for i, f in enumerate(attrs["moe_layer_freq"]) if f)
        return super().mappings(attrs) + [
            Replicated(L + "self_attention.linear_proj.bias", H + "self_attn.o_proj.bias"),
            ColumnParallel(L + "self_attention.core_attention.softmax_offset", H + "self_attn.sinks"),
            Replicated(L + "mlp.router.bias", H + "mlp.router.bias", layers=moe),
        ]

    def expert_mappings(self, moe: tuple[int, ...]) -> list[Mapping]:
        gate_up, down = H + "mlp.experts.gate_up_proj", H + "mlp.experts.down_proj"
        out = []
        for meg, alt in ((L + "mlp.experts.local_experts.*.linear_fc{}.{}", False),
                         (L + "mlp.experts.linear_fc{}.{}*", True)):
            out += [InterleavedGateUp(meg.format(1, "weight"), {"gate_up": gate_up + "[*]"}, layers=moe, alternate=alt),
                    InterleavedGateUp(meg.format(1, "bias"), {"gate_up": gate_up + "_bias[*]"}, layers=moe, alternate=alt),
                    TransposedRowParallel(meg.format(2, "weight"), down + "[*]", layers=moe, alternate=alt),
                    Replicated(meg.format(2, "bias"), down + "_bias[*]", layers=moe, alternate=alt)]
        return out
