"""Nemotron 3 Super's latent MoE (``moe_latent_size``) on Megatron-Core without TransformerEngine.

The routed experts work in a latent space: ``fc1_latent_proj`` [latent, hidden] takes each token
down before dispatch, the experts map latent -> latent, ``fc2_latent_proj`` [hidden, latent] takes
the combined result back up; the router and the shared expert see the full hidden state.
Megatron-Core's ``MoELayer`` does exactly this, but builds both projections as TransformerEngine's
``TELinear(parallel_mode="duplicated")`` and refuses to build them without TE.
``LatentMoELayer`` builds them as ``DuplicatedLinear``: the same full weight on every rank, the
same ``(output, bias)`` return, the same parameter names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class DuplicatedLinear(torch.nn.Module):
    """``TELinear(parallel_mode="duplicated")`` as ``MoELayer`` calls it: no bias, a full weight on
    every TP rank (its gradient summed over TP under sequence parallelism, as a norm's)."""

    def __init__(self, input_size: int, output_size: int, *, parallel_mode: str, config, init_method,
                 bias: bool, skip_bias_add: bool, skip_weight_param_allocation: bool, is_expert: bool,
                 name: str | None = None, **_):
        super().__init__()
        if parallel_mode != "duplicated" or bias or is_expert or skip_weight_param_allocation:
            raise NotImplementedError("DuplicatedLinear builds MoELayer's latent projections only "
                                      "(duplicated, no bias, not an expert)")
        on_gpu = torch.cuda.is_available() and not config.use_cpu_initialization
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype,
                                                     device=torch.cuda.current_device() if on_gpu else "cpu"))
        if config.perform_initialization:
            init_method(self.weight)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.linear(x, self.weight), None


def latent_moe_layer():
    """Megatron-Core's ``MoELayer``, its latent projections built as ``DuplicatedLinear``."""
    from megatron.core.transformer.moe import moe_layer

    class LatentMoELayer(moe_layer.MoELayer):
        def __init__(self, *args, **kwargs):
            saved = moe_layer.HAVE_TE, moe_layer.TELinear
            moe_layer.HAVE_TE, moe_layer.TELinear = True, DuplicatedLinear  # read for the projections only
            try:
                super().__init__(*args, **kwargs)
            finally:
                moe_layer.HAVE_TE, moe_layer.TELinear = saved

    return LatentMoELayer


def with_latent_moe(spec):
    """The hybrid stack ``spec`` (``bridges.core.hybrid.local_hybrid_stack_spec``) with its MoE
    layers' MoELayer replaced by ``latent_moe_layer()`` (the MTP depths' too: HybridModel builds
    them from the same layer specs). Without ``moe_latent_size`` the layer is Megatron-Core's."""
    import dataclasses
    import functools

    layer = spec.submodules.moe_layer.submodules
    moe, cls = layer.mlp, latent_moe_layer()
    layer.mlp = (functools.partial(cls, *moe.args, **moe.keywords) if isinstance(moe, functools.partial)
                 else dataclasses.replace(moe, module=cls))  # Megatron-Core writes either
    return spec
