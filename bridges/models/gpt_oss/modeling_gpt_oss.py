"""GPT-OSS on Megatron-Core's local spec: the experts' down projection for training.

A biased expert MLP (``SequentialMLP``) adds its down-projection bias in place, scaled per
token, to the output of ``RowParallelLinear`` (mlp.py: ``output += output_bias ... *
per_token_scale``), and that output is the tensor the tensor-parallel reduction returned as is:
autograd refuses the in-place change ("Output 0 of _ReduceFromModelParallelRegionBackward is a
view and is being modified inplace"), so a backward pass fails (Megatron-LM d98e8a64dd's trainer
on GPT-OSS, and megatron-core 0.19.2: forward passes are not affected). ``ExpertRowParallelLinear``
returns a copy; ``expert_output_copy`` puts it into a layer spec's routed experts.
"""
from __future__ import annotations

import dataclasses

from megatron.core.tensor_parallel.layers import RowParallelLinear

from bridges.core.experts import submodules_of, with_submodules


class ExpertRowParallelLinear(RowParallelLinear):
    """RowParallelLinear whose output may be changed in place (one copy of the expert output)."""

    def forward(self, input_):
        out, bias = super().forward(input_)
        return out.clone(), bias


def expert_output_copy(layer_spec, is_moe: bool = True):
    """The layer spec with ``ExpertRowParallelLinear`` as the routed experts' ``linear_fc2``
    (SequentialMLP's experts; grouped experts and dense layers are left as they are). Megatron-Core
    writes the MoE MLP and its experts as ``partial(cls, submodules=...)`` or as ModuleSpecs."""
    mlp = layer_spec.submodules.mlp
    moe = submodules_of(mlp)
    experts = getattr(moe, "experts", None)
    mlp_sub = submodules_of(experts)
    if getattr(mlp_sub, "linear_fc2", None) is not RowParallelLinear:
        return layer_spec
    experts = with_submodules(experts, dataclasses.replace(mlp_sub, linear_fc2=ExpertRowParallelLinear))
    mlp = with_submodules(mlp, dataclasses.replace(moe, experts=experts))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp))
