"""GPTBridge: the base for GPT-style decoder families (Llama, Qwen, Mistral, ...).

Families declare what differs with class attributes (``qkv_bias``, ``qk_norm``, extra config
fields) or by overriding ``mappings`` / ``megatron_attrs``; nothing model-specific lives here.
"""
from __future__ import annotations

import functools
from typing import Any, ClassVar

from bridges.core.bridge import Bridge
from bridges.core.config import GPT_FIELDS, ConfigError, Field, get_path, params_dtype, rope_parameters, rope_to_megatron
from bridges.core.mappings import (QKV, GatedMLP, Mapping, Replicated, RowParallel,
                                   TiedOutput, VocabParallel)
from bridges.core.provider import ModelProvider

L = "decoder.layers.*."
H = "model.layers.*."


def local_layer_spec(provider: ModelProvider, vp_stage: int | None = None):
    """Megatron-Core's local (no TransformerEngine) layer spec for a dense decoder."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(qk_layernorm=provider.qk_layernorm,
                                    normalization=provider.normalization)


class GPTBridge(Bridge):
    config_fields: ClassVar[tuple[Field, ...]] = GPT_FIELDS
    # None: read from the HF config field ``attention_bias``; True/False: fixed by the family.
    qkv_bias: ClassVar[bool | None] = None
    qk_norm: ClassVar[bool] = False
    # HF ``attention_bias`` also puts a bias on o_proj (Llama); False where it means q/k/v only.
    attention_bias_on_o: ClassVar[bool] = True
    # Sliding-window attention: None (a config asking for it is refused), "all" (every layer
    # has the config's ``sliding_window``: Mistral, Phi-3, Mixtral) or "per_layer" (the layers
    # ``layer_types()`` calls "sliding_attention": Gemma2, Gemma3).
    sliding_window: ClassVar[str | None] = None

    # -- config ---------------------------------------------------------------------------
    def megatron_attrs(self) -> dict[str, Any]:
        cfg = self.hf_config
        attrs = super().megatron_attrs()
        attrs.update(rope_to_megatron(self.rope()))
        bias = self.qkv_bias if self.qkv_bias is not None else bool(get_path(cfg, "attention_bias", False))
        if self.qkv_bias is None and bias and self.attention_bias_on_o or get_path(cfg, "mlp_bias", False):
            # HF adds the o_proj (and MLP) bias too; Megatron ties them all to add_bias_linear.
            raise ConfigError("attention_bias=True / mlp_bias=True (bias on o_proj and MLP) is "
                              f"not supported by the {self.model_type} bridge")
        attrs.update(self.window_attrs())
        attrs.update(add_qkv_bias=bias, qk_layernorm=self.qk_norm, add_bias_linear=False,
                     params_dtype=params_dtype(cfg))
        return attrs

    @property
    def config_class(self):
        """Megatron-Core's TransformerConfig, with the YaRN fields GPTModel reads where the
        rope is YaRN (only its MLA config has them)."""
        return yarn_transformer_config() if self.rope()["rope_type"] == "yarn" else None

    def rope(self) -> dict[str, Any]:
        """The normalised rope parameters of the model's rotary embedding (``rope_parameters``)."""
        return rope_parameters(self.hf_config)

    def layer_types(self) -> list[str]:
        """Per layer, "full_attention" or "sliding_attention": the config's ``layer_types``, or
        every layer full (a family whose HF code derives them otherwise overrides this)."""
        n = get_path(self.hf_config, "num_hidden_layers")
        return list(get_path(self.hf_config, "layer_types", None) or ["full_attention"] * n)

    def window_attrs(self) -> dict[str, Any]:
        """Megatron's ``window_size`` (and ``window_attn_skip_freq`` per layer), as
        ``sliding_window`` says; what the family cannot represent is refused, naming the field."""
        cfg, mt = self.hf_config, self.model_type
        types = get_path(cfg, "layer_types", None) or ()
        if self.sliding_window == "per_layer":
            types = self.layer_types()
            n = get_path(cfg, "num_hidden_layers")
            if len(types) != n or set(types) - {"full_attention", "sliding_attention"}:
                raise ConfigError(f"layer_types={types}: {n} entries of full_attention / "
                                  f"sliding_attention expected by the {mt} bridge")
            windowed = [int(t == "sliding_attention") for t in types]
            if not any(windowed):
                return {"window_size": None, "window_attn_skip_freq": None}
            return {"window_size": sliding_window_to_megatron(cfg), "window_attn_skip_freq": windowed}
        if "sliding_attention" in types:
            raise ConfigError(f"layer_types has sliding_attention layers (use_sliding_window="
                              f"{get_path(cfg, 'use_sliding_window', None)}): per-layer sliding "
                              f"windows are not supported by the {mt} bridge")
        if set(types) - {"full_attention"}:
            raise ConfigError(f"layer_types={sorted(set(types))}: layers other than full attention "
                              f"are not supported by the {mt} bridge")
        if self.sliding_window == "all":
            return {"window_size": sliding_window_to_megatron(cfg)}
        if get_path(cfg, "use_sliding_window", False):  # every layer windowed (Qwen3-MoE's HF code)
            raise ConfigError(f"use_sliding_window=True (sliding_window={get_path(cfg, 'sliding_window', None)}): "
                              f"sliding windows are not supported by the {mt} bridge")
        return {}

    def hf_config_dict(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        attrs = attrs if attrs is not None else self.megatron_attrs()
        out = super().hf_config_dict(attrs)
        out["rope_parameters"] = rope_to_hf(attrs)
        if self.sliding_window:
            out["sliding_window"] = sliding_window_to_hf(attrs)
        if self.sliding_window == "per_layer":
            skip = attrs.get("window_attn_skip_freq") or [0] * attrs["num_layers"]
            out["layer_types"] = ["sliding_attention" if w else "full_attention" for w in skip]
        if self.qkv_bias is None:
            out["attention_bias"] = attrs["add_qkv_bias"]
        out["dtype"] = str(attrs["params_dtype"]).replace("torch.", "")
        return out

    # -- the Megatron model ---------------------------------------------------------------
    def build_model(self, provider: ModelProvider, pre_process: bool, post_process: bool,
                    vp_stage: int | None = None):
        """One GPTModel chunk: what Megatron-LM's pretrain_gpt.py builds for these families."""
        from megatron.core.models.gpt import GPTModel

        return self.gpt_model(GPTModel, provider, pre_process, post_process, vp_stage)

    def gpt_model(self, cls, provider: ModelProvider, pre_process: bool, post_process: bool,
                  vp_stage: int | None = None, **extra):
        """A ``cls`` (GPTModel or a family's subclass, given ``extra`` arguments) chunk."""
        p = provider
        return cls(
            config=p.transformer_config(), transformer_layer_spec=self.layer_spec(p, vp_stage),
            vocab_size=p.padded_vocab_size, max_sequence_length=p.max_sequence_length,
            pre_process=pre_process, post_process=post_process, parallel_output=p.parallel_output,
            share_embeddings_and_output_weights=p.share_embeddings_and_output_weights,
            position_embedding_type=p.position_embedding_type, rotary_percent=p.rotary_percent,
            rotary_base=p.rotary_base, rope_scaling=p.rope_scaling,
            rope_scaling_factor=p.rope_scaling_factor,
            seq_len_interpolation_factor=p.seq_len_interpolation_factor,
            mtp_block_spec=self.mtp_block_spec(p, vp_stage), vp_stage=vp_stage, **extra)

    def layer_spec(self, provider: ModelProvider, vp_stage: int | None = None):
        """The Megatron layer spec(s) for this family (a seam for families' own modules)."""
        return local_layer_spec(provider, vp_stage)

    def mtp_block_spec(self, provider: ModelProvider, vp_stage: int | None = None):
        """The multi-token-prediction block spec of a stage (None: no MTP, as here)."""
        return None

    def layout_constraints(self, provider: ModelProvider) -> list[tuple[str, int, int, str]]:
        """``(field, value, divisor, what)`` that a layout must divide: heads and groups and
        the MLP by TP, layers by PP x VPP, heads by groups."""
        p, lay = provider, provider.layout
        return [("num_attention_heads", p.num_attention_heads, lay.tp, "TP"),
                ("num_query_groups", p.num_query_groups, lay.tp, "TP"),
                ("ffn_hidden_size", p.ffn_hidden_size, lay.tp, "TP"),
                ("num_layers", p.num_layers, lay.pp * (lay.vpp or 1), "PP x VPP"),
                ("num_attention_heads", p.num_attention_heads, p.num_query_groups, "num_query_groups")]

    # -- weights --------------------------------------------------------------------------
    def mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        table: list[Mapping] = [
            VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
            Replicated(L + "input_layernorm.weight", H + "input_layernorm.weight"),
            QKV(L + "self_attention.linear_qkv.weight",
                {"q": H + "self_attn.q_proj.weight", "k": H + "self_attn.k_proj.weight",
                 "v": H + "self_attn.v_proj.weight"}),
            RowParallel(L + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
            Replicated(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
            GatedMLP(L + "mlp.linear_fc1.weight",
                     {"gate": H + "mlp.gate_proj.weight", "up": H + "mlp.up_proj.weight"}),
            RowParallel(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
            Replicated("decoder.final_layernorm.weight", "model.norm.weight"),
        ]
        if attrs["add_qkv_bias"]:
            table.append(QKV(L + "self_attention.linear_qkv.bias",
                             {"q": H + "self_attn.q_proj.bias", "k": H + "self_attn.k_proj.bias",
                              "v": H + "self_attn.v_proj.bias"}))
        if attrs["qk_layernorm"]:
            table += [Replicated(L + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight"),
                      Replicated(L + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight")]
        if attrs["share_embeddings_and_output_weights"]:
            table.append(TiedOutput("output_layer.weight", "model.embed_tokens.weight"))
        else:
            table.append(VocabParallel("output_layer.weight", "lm_head.weight"))
        return table


@functools.lru_cache(maxsize=1)
def yarn_transformer_config():
    """TransformerConfig plus the ``yarn_*`` fields GPTModel's YaRN rotary embedding reads
    (MLATransformerConfig has them for MLA; a GQA model with YaRN rope needs them too)."""
    import dataclasses

    from megatron.core.transformer import TransformerConfig

    # made with real types, not this module's string annotations: dataclasses resolves those
    # through sys.modules, which a test that re-imports the package may have emptied
    return dataclasses.make_dataclass("YarnTransformerConfig", [
        ("yarn_rotary_scaling_factor", float, 1.0), ("yarn_original_max_position_embeddings", int, 4096),
        ("yarn_beta_fast", float, 32.0), ("yarn_beta_slow", float, 1.0), ("yarn_mscale", float, 1.0),
        ("yarn_mscale_all_dim", float, 0.0), ("yarn_correction_range_round_to_int", bool, True)],
        bases=(TransformerConfig,), module=__name__)


def sliding_window_to_megatron(cfg) -> tuple[int, int] | None:
    """HF ``sliding_window`` (attends to the last w positions, the current one included) ->
    Megatron ``window_size`` (w - 1 before, 0 after)."""
    window = get_path(cfg, "sliding_window", None)
    return (window - 1, 0) if window else None


def sliding_window_to_hf(attrs: dict[str, Any]) -> int | None:
    return attrs["window_size"][0] + 1 if attrs.get("window_size") else None


def rope_to_hf(attrs: dict[str, Any]) -> dict[str, Any]:
    p: dict[str, Any] = {"rope_theta": attrs["rotary_base"]}
    if attrs.get("rotary_percent", 1.0) != 1.0:
        p["partial_rotary_factor"] = attrs["rotary_percent"]
    if attrs["position_embedding_type"] == "yarn":
        p.update(rope_type="yarn", factor=attrs["yarn_rotary_scaling_factor"],
                 original_max_position_embeddings=attrs["yarn_original_max_position_embeddings"],
                 beta_fast=attrs["yarn_beta_fast"], beta_slow=attrs["yarn_beta_slow"],
                 mscale=attrs["yarn_mscale"], mscale_all_dim=attrs["yarn_mscale_all_dim"])
        if (p["mscale"], p["mscale_all_dim"]) == (1.0, 0.0):  # HF without them: the same factor
            del p["mscale"], p["mscale_all_dim"]
        if not attrs.get("yarn_correction_range_round_to_int", True):
            p["truncate"] = False
    elif attrs["rope_scaling"]:
        p.update(rope_type="llama3", factor=attrs["rope_scaling_factor"], low_freq_factor=1.0,
                 high_freq_factor=4.0, original_max_position_embeddings=8192)
    elif attrs["seq_len_interpolation_factor"]:
        p.update(rope_type="linear", factor=attrs["seq_len_interpolation_factor"])
    else:
        p["rope_type"] = "default"
    return p
