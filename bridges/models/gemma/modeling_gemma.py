"""Gemma's blocks on Megatron-Core's local modules (no TransformerEngine), shared by the Gemma,
Gemma2 and Gemma3 bridges.

- ``ZeroCenteredRMSNorm``: the stored weight is w with the norm scaling by (1 + w), computed in
  fp32 and cast back, as HF's GemmaRMSNorm does. It is what Megatron's
  ``layernorm_zero_centered_gamma`` means (TransformerEngine's norms honour the flag, the
  local ones refuse it), so the checkpoint keeps HF's values: no +1 / -1 on the way through,
  and the roundtrip stays bit-exact in bf16.
- ``GemmaModel``: a GPTModel whose embeddings are scaled by sqrt(hidden_size) in the model's
  dtype (bf16 rounds sqrt(3072) to 55.5, as HF does) and whose final logits may be soft-capped
  (Gemma2). Both are forward hooks: the parameters and their names are GPTModel's.
- ``gemma_block_spec``: every layer's norms (and the final one) zero-centred.
"""
from __future__ import annotations

import dataclasses

import torch


class ZeroCenteredRMSNorm(torch.nn.Module):
    """y = x / rms(x) * (1 + w), in fp32, cast back to x's dtype; the weight alone (no + 1)
    where the config's ``layernorm_zero_centered_gamma`` is off, as TransformerEngine's norms."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__()
        self.eps = eps
        self.offset = 1.0 if config.layernorm_zero_centered_gamma else 0.0
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (self.offset + self.weight.float())).type_as(x)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), in x's dtype (as HF)."""
    return torch.tanh(x / cap) * cap


def _scale_output(scale: float):
    def hook(_module, _inputs, out):
        return out * torch.tensor(scale, dtype=out.dtype, device=out.device)
    return hook


def _cap_logits(cap: float):
    def hook(_module, _inputs, out):
        logits, bias = out
        return soft_cap(logits, cap), bias
    return hook


def gemma_model_class():
    from megatron.core.models.gpt import GPTModel

    class GemmaModel(GPTModel):
        """GPTModel with Gemma's embedding scale and optional final-logit soft-cap."""

        def __init__(self, *args, embedding_scale: float | None = None,
                     final_logit_softcapping: float | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            if self.pre_process and embedding_scale:
                self.embedding.register_forward_hook(_scale_output(embedding_scale))
            if self.post_process and final_logit_softcapping:
                self.output_layer.register_forward_hook(_cap_logits(final_logit_softcapping))

    return GemmaModel


def gemma_block_spec(provider, vp_stage: int | None, layer_spec):
    """The decoder block of one chunk: ``layer_spec`` (a local TransformerLayer spec) with
    zero-centred norms wherever it has a norm, and a zero-centred final norm."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    def zero_centred(sub):
        """Submodules with every norm (a field named *layernorm that is not IdentityOp) replaced."""
        changes = {}
        for f in dataclasses.fields(sub):
            v = getattr(sub, f.name)
            if f.name.endswith("layernorm") and v is not IdentityOp:
                changes[f.name] = ZeroCenteredRMSNorm
            elif isinstance(v, ModuleSpec) and dataclasses.is_dataclass(v.submodules):
                changes[f.name] = dataclasses.replace(v, submodules=zero_centred(v.submodules))
        return dataclasses.replace(sub, **changes)

    layer = dataclasses.replace(layer_spec, submodules=zero_centred(layer_spec.submodules))
    config = provider.transformer_config()
    n = get_num_layers_to_build(config, vp_stage=vp_stage,
                                pp_rank=ps.get_pipeline_model_parallel_rank())
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=ZeroCenteredRMSNorm)
