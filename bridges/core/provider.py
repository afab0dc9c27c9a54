"""The Megatron side of a bridge: a flat, editable description of the model that builds
Megatron-Core ``GPTModel`` chunks for this rank.

    provider = bridge.to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    provider.finalize()
    chunks = provider.provide_distributed_model(wrap_with_ddp=False)

Attributes are TransformerConfig fields, GPTModel arguments and the parallel sizes, side by side.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

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


class GPTModelProvider:
    """Builds GPTModel chunks. Set parallel sizes, then ``finalize()``, then provide."""

    def __init__(self, attrs: dict[str, Any], *, layer_spec: Callable[["GPTModelProvider", int | None], Any],
                 post_build: list[Callable[["GPTModelProvider", Any], None]] | None = None,
                 mtp_block_spec: Callable[["GPTModelProvider", int | None], Any] | None = None,
                 config_class: type | None = None):
        """``mtp_block_spec(provider, vp_stage)``: the multi-token-prediction block spec of a
        stage (None where it has none); ``config_class``: a TransformerConfig subclass (e.g.
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
        object.__setattr__(self, "_layer_spec", layer_spec)
        object.__setattr__(self, "_mtp_block_spec", mtp_block_spec)
        object.__setattr__(self, "_config_class", config_class)
        object.__setattr__(self, "_post_build", list(post_build or []))
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

    @property
    def padded_vocab_size(self) -> int:
        if not self.make_vocab_size_divisible_by:  # padding switched off
            return self.vocab_size
        m = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / m) * m)

    def finalize(self) -> "GPTModelProvider":
        """Check that the layout divides the model; every failure names the field."""
        lay = self.layout
        checks = [
            ("num_attention_heads", self.num_attention_heads, lay.tp, "TP"),
            ("num_query_groups", self.num_query_groups, lay.tp, "TP"),
            ("ffn_hidden_size", self.ffn_hidden_size, lay.tp, "TP"),
            ("num_layers", self.num_layers, lay.pp * (lay.vpp or 1), "PP x VPP"),
            ("num_attention_heads", self.num_attention_heads, self.num_query_groups,
             "num_query_groups"),
        ]
        if getattr(self, "num_moe_experts", None):
            checks += [("num_moe_experts", self.num_moe_experts, lay.ep, "EP"),
                       ("moe_ffn_hidden_size", self.moe_ffn_hidden_size, lay.expert_tp, "expert TP"),
                       ("moe_shared_expert_intermediate_size",
                        getattr(self, "moe_shared_expert_intermediate_size", None) or 0, lay.tp, "TP")]
        elif lay.ep > 1 or lay.grouped:
            raise ConfigError(f"layout {lay.name}: expert parallelism / grouped experts need a "
                              f"mixture-of-experts model (num_moe_experts is not set)")
        if getattr(self, "multi_latent_attention", False):  # MLA down projections: rows split by TP
            checks += [("q_lora_rank", getattr(self, "q_lora_rank", None) or 0, lay.tp, "TP"),
                       ("kv_lora_rank + qk_pos_emb_head_dim", self.kv_lora_rank + self.qk_pos_emb_head_dim,
                        lay.tp, "TP")]
        for fld, value, by, what in checks:
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
        """One GPTModel chunk (parallel state must be initialised)."""
        from megatron.core.models.gpt import GPTModel

        model = GPTModel(
            config=self.transformer_config(),
            transformer_layer_spec=self._layer_spec(self, vp_stage),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=self.max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=self.parallel_output,
            share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
            position_embedding_type=self.position_embedding_type,
            rotary_percent=self.rotary_percent,
            rotary_base=self.rotary_base,
            rope_scaling=self.rope_scaling,
            rope_scaling_factor=self.rope_scaling_factor,
            seq_len_interpolation_factor=self.seq_len_interpolation_factor,
            mtp_block_spec=self._mtp_block_spec(self, vp_stage) if self._mtp_block_spec else None,
            vp_stage=vp_stage,
        )
        for hook in self._post_build:
            hook(self, model)
        return model

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
