"""The Megatron side of a bridge: a flat, editable description of the model that builds this
rank's model chunks.

    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    provider.finalize()
    chunks = provider.provide_distributed_model(wrap_with_ddp=False)

Attributes are TransformerConfig fields, model arguments and the parallel sizes, side by side.
The provider is generic: the bridge says what it builds (``build``: a GPTModel for GPT-style
families, another Megatron-Core model or a family's own module for others) and what a layout
must divide (``constraints``); the provider checks the layout, sets up the parallel state and
builds one chunk per virtual pipeline stage.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

from bridges.core import cpu_compat
from bridges.core.config import ConfigError
from bridges.core.parallel import Layout, current_layout, init_model_parallel

MODEL_ARGS = ("vocab_size", "max_sequence_length", "position_embedding_type", "rotary_base",
              "rotary_percent", "rope_scaling", "rope_scaling_factor",
              "seq_len_interpolation_factor", "share_embeddings_and_output_weights",
              "parallel_output")

# Settings a converted model needs to run anywhere (no fused kernels, no TE).
_PORTABLE = dict(bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
                 bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
                 hidden_dropout=0.0, use_cpu_initialization=True, sequence_parallel=False,
                 normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
                 attention_softmax_in_fp32=True)  # as HF does: bf16 parity depends on it


def _transformer_fields(config_class=None) -> set[str]:
    from megatron.core.transformer import TransformerConfig

    return {f.name for f in dataclasses.fields(config_class or TransformerConfig)}


class ModelProvider:
    """Builds a bridge's model chunks. Set parallel sizes, then ``finalize()``, then provide."""

    def __init__(self, attrs: dict[str, Any], *,
                 build: Callable[["ModelProvider", bool, bool, int | None], Any],
                 constraints: Callable[["ModelProvider"], list[tuple[str, int, int, str]]] | None = None,
                 config_class: type | None = None):
        """``build(provider, pre_process, post_process, vp_stage)``: one chunk (parallel state
        is initialised); ``constraints(provider)``: ``(field, value, divisor, what)`` for every
        size the layout must divide; ``config_class``: a TransformerConfig subclass (e.g.
        MLATransformerConfig) whose extra fields the attributes may set."""
        defaults = dict(_PORTABLE, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
                        expert_tensor_parallel_size=None, moe_grouped_gemm=False,
                        make_vocab_size_divisible_by=128, params_dtype=torch.float32,
                        position_embedding_type="rope", rotary_base=10000.0, rotary_percent=1.0,
                        rope_scaling=False, rope_scaling_factor=8.0,
                        seq_len_interpolation_factor=None, parallel_output=True,
                        share_embeddings_and_output_weights=False)
        object.__setattr__(self, "_attrs", {**defaults, **attrs})
        object.__setattr__(self, "_build", build)
        object.__setattr__(self, "_constraints", constraints)
        object.__setattr__(self, "_config_class", config_class)
        object.__setattr__(self, "_finalized", False)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_attrs"][name]
        except KeyError:
            raise AttributeError(f"provider has no attribute {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._attrs[name] = value
        object.__setattr__(self, "_finalized", False)

    def as_dict(self) -> dict[str, Any]:
        return dict(self._attrs)

    # -- layout ---------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        return Layout(tp=self.tensor_model_parallel_size, pp=self.pipeline_model_parallel_size,
                      vpp=self.virtual_pipeline_model_parallel_size,
                      ep=self.expert_model_parallel_size, etp=self.expert_tensor_parallel_size,
                      grouped=bool(self.moe_grouped_gemm))

    def set_layout(self, lay: Layout) -> "ModelProvider":
        """Set the parallel sizes (and grouped experts) of ``lay``; ``finalize()`` checks them."""
        self.tensor_model_parallel_size, self.pipeline_model_parallel_size = lay.tp, lay.pp
        self.virtual_pipeline_model_parallel_size = lay.vpp
        self.expert_model_parallel_size, self.expert_tensor_parallel_size = lay.ep, lay.etp
        self.moe_grouped_gemm = lay.grouped
        return self

    @property
    def padded_vocab_size(self) -> int:
        if not self.make_vocab_size_divisible_by:  # padding switched off
            return self.vocab_size
        m = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / m) * m)

    def finalize(self) -> "ModelProvider":
        """Check that the layout divides the model; every failure names the field."""
        lay = self.layout
        if (lay.ep > 1 or lay.grouped) and not getattr(self, "num_moe_experts", None):
            raise ConfigError(f"layout {lay.name}: expert parallelism / grouped experts need a "
                              f"mixture-of-experts model (num_moe_experts is not set)")
        for fld, value, by, what in self._constraints(self) if self._constraints else ():
            if value % by:
                raise ConfigError(f"layout {lay.name}: {fld}={value} does not divide by "
                                  f"{what}={by}")
        if self.padded_vocab_size % lay.tp:
            raise ConfigError(f"layout {lay.name}: vocab_size={self.vocab_size} does not divide by "
                              f"TP={lay.tp} and make_vocab_size_divisible_by is off")
        if lay.vpp is not None and lay.pp < 2:
            raise ConfigError(f"layout {lay.name}: virtual pipeline needs PP >= 2")
        object.__setattr__(self, "_finalized", True)
        return self

    # -- building -------------------------------------------------------------------------
    def transformer_config(self):
        from megatron.core.transformer import TransformerConfig

        cls = self._config_class or TransformerConfig
        names = _transformer_fields(cls)
        kw = {k: v for k, v in self._attrs.items() if k in names}
        kw["pipeline_dtype"] = self.params_dtype
        kw["bf16"] = self.params_dtype == torch.bfloat16
        kw["fp16"] = self.params_dtype == torch.float16
        if kw.get("expert_tensor_parallel_size") is None:
            kw["expert_tensor_parallel_size"] = self.tensor_model_parallel_size
        return cls(**kw)

    def provide(self, pre_process: bool, post_process: bool, vp_stage: int | None = None):
        """One chunk, as the bridge builds it (parallel state must be initialised).

        On a machine without CUDA the CPU patches (``cpu_compat``) are applied here, whoever
        initialised the parallel state: a caller that did it itself (as Megatron-LM scripts do)
        never goes through ``init_model_parallel``, and its first forward would fail with
        "Found no NVIDIA driver"."""
        cpu_compat.ensure()
        _quiet_deprecation()
        return self._build(self, pre_process, post_process, vp_stage)

    def provide_distributed_model(self, wrap_with_ddp: bool = False) -> list:
        """This rank's model chunks (one per virtual pipeline stage), on GPU when present.

        Initialises torch.distributed (torchrun env, or one process) and the model-parallel
        state for this provider's layout if that is not already the current one.
        """
        from megatron.core import parallel_state as ps

        if not self._finalized:
            self.finalize()
        if not ps.model_parallel_is_initialized() or current_layout().groups != self.layout.groups:
            init_model_parallel(self.layout)
        vpp = self.layout.vpp
        chunks = []
        for stage in range(vpp or 1):
            vp = stage if vpp else None
            m = self.provide(
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                vp_stage=vp)
            m = m.to(dtype=self.params_dtype)
            if torch.cuda.is_available():
                m = m.cuda(torch.cuda.current_device())
            chunks.append(m)
        if wrap_with_ddp:
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

            cfg = DistributedDataParallelConfig()
            chunks = [DistributedDataParallel(c.config, cfg, c) for c in chunks]
        return chunks


GPTModelProvider = ModelProvider  # the name before providers built other models


def _quiet_deprecation() -> None:
    """megatron-core 0.19 logs "GPTModel IS DEPRECATED ... use HybridModel" at every GPTModel
    built (once per chunk and test). The bridges build GPTModel on purpose: it is what
    Megatron-LM's pretrain_gpt.py builds and loads (docs/architecture.md), so the notice is
    dropped from that logger; its other messages pass."""
    import logging

    log = logging.getLogger("megatron.core.models.gpt.gpt_model")
    if not any(isinstance(f, _DropDeprecation) for f in log.filters):
        log.addFilter(_DropDeprecation())


class _DropDeprecation:
    def filter(self, record) -> bool:
        return "GPTModel IS DEPRECATED" not in str(record.msg)
