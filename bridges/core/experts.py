"""Megatron-Core layer specs for mixture-of-experts decoders, without TransformerEngine.

Two expert layouts, as Megatron-LM checkpoints have them:

- sequential: ``mlp.experts.local_experts.<e>.linear_fc1.weight`` (Megatron-Core's local spec);
- grouped GEMM: ``mlp.experts.linear_fc1.weight<e>`` (``moe_grouped_gemm=True``). Megatron-Core
  builds that layout only from TransformerEngine's grouped linear; ``GroupedLinear`` below is a
  plain-torch stand-in with the same parameters and the same math (one GEMM per local expert),
  plugged into Megatron-Core's own ``TEGroupedMLP``, so the layout converts and runs on CPU.

Expert tensor parallelism needs no communication in these linears: Megatron's token dispatcher
gathers and reduces across the expert TP group itself ("explicit expert comm").
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import torch


class GroupedLinear(torch.nn.Module):
    """``num_local_experts`` linears with parameters ``weight0..weight{n-1}`` (and ``bias<i>``),
    split over the expert TP group along the output (``parallel="column"``) or the input dim."""

    def __init__(self, num_local_experts: int, input_size: int, output_size: int, /, *, config,
                 init_method: Callable, bias: bool, skip_bias_add: bool, is_expert: bool,
                 tp_comm_buffer_name=None, pg_collection=None, name=None, parallel: str = "column"):
        super().__init__()
        etp = pg_collection.expt_tp.size() if pg_collection is not None else 1
        out_f, in_f = (output_size // etp, input_size) if parallel == "column" else (output_size, input_size // etp)
        self.num_gemms, self.in_features, self.out_features = num_local_experts, in_f, out_f
        self.skip_bias_add, self.use_bias = skip_bias_add, bias
        for i in range(num_local_experts):
            w = torch.nn.Parameter(torch.empty(out_f, in_f, dtype=config.params_dtype))
            if config.perform_initialization:
                init_method(w)
            setattr(w, "allreduce", False)
            self.register_parameter(f"weight{i}", w)
            if bias:
                self.register_parameter(f"bias{i}", torch.nn.Parameter(torch.zeros(out_f, dtype=config.params_dtype)))

    def forward(self, x: torch.Tensor, tokens_per_expert: list[int]):
        parts = torch.split(x, list(tokens_per_expert))
        out = torch.cat([torch.nn.functional.linear(p, getattr(self, f"weight{i}"),
                                                    None if self.skip_bias_add or not self.use_bias
                                                    else getattr(self, f"bias{i}"))
                         for i, p in enumerate(parts)]) if parts else x.new_empty(0, self.out_features)
        if self.skip_bias_add and self.use_bias:
            return out, [getattr(self, f"bias{i}") for i in range(self.num_gemms)]
        return out, None

    def backward_dw(self) -> None:
        pass


def stack_hf_experts(sd: dict[str, torch.Tensor], prefix: str, n: int) -> None:
    """Per-expert HF tensors in ``sd`` (``<prefix><e>.{gate,up,down}_proj.weight``) replaced, in
    place, by transformers' in-memory stacked ones (``<prefix>gate_up_proj`` [E, 2I, H] and
    ``<prefix>down_proj``); ``sd`` already stacked is left as it is."""
    if prefix + "gate_up_proj" in sd:
        return
    e = prefix + "{}.{}_proj.weight"
    sd[prefix + "gate_up_proj"] = torch.stack(
        [torch.cat((sd.pop(e.format(x, "gate")), sd.pop(e.format(x, "up")))) for x in range(n)])
    sd[prefix + "down_proj"] = torch.stack([sd.pop(e.format(x, "down")) for x in range(n)])


def submodules_of(spec):
    """The submodules of a spec: a ModuleSpec's, or a ``partial(cls, submodules=...)``'s (how
    Megatron-Core writes its MoE layer and experts), or None."""
    kw = getattr(spec, "keywords", None)
    return kw.get("submodules") if kw is not None else getattr(spec, "submodules", None)


def with_submodules(spec, sub):
    """``spec`` (a ModuleSpec or a partial) with ``sub`` as its submodules."""
    kw = getattr(spec, "keywords", None)
    if kw is not None:
        return type(spec)(spec.func, *spec.args, **{**kw, "submodules": sub})
    return dataclasses.replace(spec, submodules=sub)


def block_spec(provider, vp_stage: int | None = None, layer_hook: Callable | None = None):
    """The decoder block spec for this pipeline stage: dense and MoE layers as
    ``moe_layer_freq`` says, local modules, grouped experts when ``moe_grouped_gemm``.
    ``layer_hook(layer_spec, is_moe)`` may return a changed layer spec (a family's own module)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.experts import GroupedMLPSubmodules, TEGroupedMLP

    config = provider.transformer_config()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                      normalization=provider.normalization, vp_stage=vp_stage)
    layers = []
    for layer in spec.layer_specs:
        mlp = layer.submodules.mlp  # a partial(MoELayer, submodules=...) for MoE layers
        sub = submodules_of(mlp)
        is_moe = hasattr(sub, "experts")
        if is_moe and provider.moe_grouped_gemm:
            grouped = partial(TEGroupedMLP, submodules=GroupedMLPSubmodules(
                linear_fc1=partial(GroupedLinear, parallel="column"),
                linear_fc2=partial(GroupedLinear, parallel="row")))
            mlp = with_submodules(mlp, dataclasses.replace(sub, experts=grouped))
            layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mlp=mlp))
        layers.append(layer_hook(layer, is_moe) if layer_hook else layer)
    return dataclasses.replace(spec, layer_specs=layers)
