"""Gemma2's blocks on Megatron-Core's local modules, on top of Gemma's (zero-centred norms,
embedding scale):

- ``SoftCapAttention``: attention scores soft-capped, cap * tanh(s / cap), after the scale and
  before the mask, as HF's eager attention does.
- ``PostNormRowParallelLinear``: the output projection of attention and of the MLP followed by
  its own zero-centred norm (Gemma2's post_attention_layernorm / post_feedforward_layernorm, the
  "sandwich"). The norm runs on the reduced output, so it is replicated over TP; Megatron names
  it ``linear_proj.post_layernorm`` / ``linear_fc2.post_layernorm``.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention

from bridges.models.gemma.modeling_gemma import ZeroCenteredRMSNorm, soft_cap


class _CapThenSoftmax(torch.nn.Module):
    def __init__(self, softmax: torch.nn.Module, cap: float):
        super().__init__()
        self.softmax, self.cap = softmax, cap

    def forward(self, scores, mask, *args):
        return self.softmax(soft_cap(scores, self.cap), mask, *args)


class SoftCapAttention(DotProductAttention):
    def __init__(self, *args, softcap: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if softcap:
            self.scale_mask_softmax = _CapThenSoftmax(self.scale_mask_softmax, softcap)


class PostNormRowParallelLinear(RowParallelLinear):
    def __init__(self, input_size: int, output_size: int, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_layernorm = ZeroCenteredRMSNorm(config, output_size, config.layernorm_epsilon)

    def forward(self, *args, **kwargs):
        out, bias = super().forward(*args, **kwargs)
        return self.post_layernorm(out), bias


def sandwich_layer_spec(layer_spec, attn_softcap: float | None):
    """A local TransformerLayer spec with post-norms on both output projections and the
    attention scores soft-capped (when ``attn_softcap`` is set)."""
    sub = layer_spec.submodules
    attn = sub.self_attention
    attn_sub = dataclasses.replace(
        attn.submodules, linear_proj=PostNormRowParallelLinear,
        core_attention=dataclasses.replace(_spec(attn.submodules.core_attention, SoftCapAttention),
                                           params={"softcap": attn_softcap}))
    mlp = sub.mlp
    mlp = _with_submodules(mlp, linear_fc2=PostNormRowParallelLinear)
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        sub, self_attention=dataclasses.replace(attn, submodules=attn_sub), mlp=mlp))


def _spec(module_or_spec, cls):
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(module_or_spec, ModuleSpec):
        return dataclasses.replace(module_or_spec, module=cls)
    return ModuleSpec(module=cls)


def _with_submodules(mlp, **changes):
    """The MLP spec (a ModuleSpec or a functools.partial carrying ``submodules``) with some of
    its submodules replaced."""
    from bridges.core.experts import submodules_of, with_submodules

    return with_submodules(mlp, dataclasses.replace(submodules_of(mlp), **changes))
