"""Granite's one block Megatron-Core lacks: the residual multiplier.

HF's Granite / GraniteMoe decoder layers add ``residual + residual_multiplier * out`` after the
attention and after the MLP. Megatron-Core's TransformerLayer adds its sublayer outputs through
the spec's ``self_attn_bda`` / ``mlp_bda`` (bias-dropout-add) builders; ``scaled_bda(m)`` is such
a builder whose function scales ``x + bias`` by m before Megatron's own dropout and residual add
(the same product and the same add as HF: x * m in x's dtype, then residual + it). It holds in
every layout: the multiplication is elementwise on each rank's full hidden states (after the
TP reduction of linear_proj / linear_fc2 and the MoE combine), with no communication.

``residual_scaled(layer_spec, m)`` swaps both builders into a layer spec (dense or MoE alike).
The other three multipliers are Megatron-Core's own fields (granite_bridge.py).
"""
from __future__ import annotations

import dataclasses


def scaled_bda(multiplier: float):
    """A bias-dropout-add builder (Megatron's ``get_bias_dropout_add`` signature) adding
    ``multiplier * (x + bias)`` to the residual. A plain function: ``build_module`` returns
    functions as they are."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    m = float(multiplier)

    def get_scaled_bias_dropout_add(training: bool, fused: bool):
        bda = get_bias_dropout_add(training, fused)

        def scaled_bias_dropout_add(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            return bda((x * m, None), residual, prob)
        return scaled_bias_dropout_add

    get_scaled_bias_dropout_add.residual_multiplier = m  # for reading back in tests
    return get_scaled_bias_dropout_add


def residual_scaled(layer_spec, multiplier: float):
    """``layer_spec`` with both residual adds scaled by ``multiplier`` (1.0: unchanged)."""
    if float(multiplier) == 1.0:
        return layer_spec
    bda = scaled_bda(multiplier)
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        layer_spec.submodules, self_attn_bda=bda, mlp_bda=bda))
