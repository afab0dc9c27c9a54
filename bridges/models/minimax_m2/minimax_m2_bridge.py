"""MiniMax-M2 (``minimax_m2``): Mixtral's expert layout (``block_sparse_moe.experts.<e>.w1/w3/w2``
on disk, stacked in transformers' memory) under three differences, each a Megatron-Core setting
or a module another family already brought:

- q/k RMSNorm over the *whole* projection (all heads together, HF ``q_norm`` of
  heads x head_dim), as OLMoE's: each TP rank holds its heads' slice of the weight and the mean
  square is averaged over the TP group (``bridges/models/olmoe/modeling_olmoe.py``);
- partial rotary: the first ``rotary_dim`` (64) of the 128 head dims, from the released
  checkpoints' legacy ``rotary_dim`` (transformers reads it as ``partial_rotary_factor``);
- sigmoid routing with a score-correction bias for the choice (``e_score_correction_bias``),
  top-k renormalised, no shared expert, no group limit.

The published weights are FP8 in 128 x 128 blocks (``weight_scale_inv``), read by the codec.
Multi-token-prediction modules are not mapped (no reference describes them; a checkpoint without their
tensors converts its main model with a warning).
"""
from __future__ import annotations

import warnings
from typing import Any

from bridges.core.config import ConfigError, get_path
from bridges.core.registry import register_bridge
from bridges.models.mixtral.mixtral_bridge import MixtralBridge
from bridges.models.olmoe.olmoe_bridge import FullProjectionQKNorm


@register_bridge(model_type="minimax_m2", architectures=["MiniMaxM2ForCausalLM"])
class MiniMaxM2Bridge(FullProjectionQKNorm, MixtralBridge):
    quantized_formats = ("block",)  # published: FP8 in 128 x 128 blocks
    # the published config's own fields (transformers' class does not read them): held at the
    # released values, another refused by name (it would change the network)
    checked_fields = (("scoring_func", "sigmoid"), ("use_routing_bias", True), ("use_qk_norm", True),
                      ("qk_norm_type", "per_layer"), ("shared_intermediate_size", 0))

    @property
    def router_bias_hf(self) -> str:
        return ("mlp" if self.stacked_experts() else "block_sparse_moe") + ".e_score_correction_bias"

    def _check_mtp(self) -> None:
        """The published config declares MTP modules (``use_mtp``, ``num_mtp_modules``), which no
        reference here describes: unmapped. A checkpoint that holds none of their tensors (layers
        past ``num_hidden_layers``) converts its main model, with a warning; one that holds them,
        or a config alone, is refused, naming what is missing."""
        declared = {f: get_path(self.hf_config, f, None) for f in ("use_mtp", "num_mtp_modules")}
        declared = {f: v for f, v in declared.items() if v}
        if not declared:
            return
        what = ", ".join(f"{f}={v}" for f, v in declared.items())
        ckpt, n = self.checkpoint, get_path(self.hf_config, "num_hidden_layers")
        extra = [] if ckpt is None else sorted(
            name for name in ckpt.names() if name.startswith("model.layers.") and int(name.split(".")[2]) >= n)
        if ckpt is None or extra:
            held = f"; the checkpoint holds {len(extra)} such tensors ({extra[0]}, ...)" if extra else ""
            raise ConfigError(f"{what}: MiniMax-M2's multi-token prediction modules are not mapped by the "
                              f"minimax_m2 bridge (no reference describes their layout){held}")
        warnings.warn(f"{ckpt.path}: {what}, but the checkpoint holds no layer past model.layers.{n - 1}: "
                      f"converting the main model without MTP modules", stacklevel=3)

    def megatron_attrs(self) -> dict[str, Any]:
        self._check_mtp()
        self.refuse_other_values("the minimax_m2 bridge maps MiniMax-M2 as released")
        kinds = get_path(self.hf_config, "attn_type_list", None)
        if kinds is not None and set(kinds) != {1}:
            raise ConfigError(f"attn_type_list={kinds}: 0 marks a linear-attention layer (MiniMax-Text-01's), "
                              f"which the minimax_m2 bridge does not map; MiniMax-M2 is all 1 (softmax attention)")
        attrs = super().megatron_attrs()
        attrs.update(moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
                     moe_router_enable_expert_bias=True)
        return attrs
