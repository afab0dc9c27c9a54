"""Nemotron-H (``nemotron_h``): Megatron-Core's HybridModel, one layer per pattern symbol (Mamba-2
mixer ``M``, attention ``*``, squared-ReLU MLP ``-``, MoE ``E``), each behind its own RMSNorm; no
position embedding.

- The pattern: the published ``hybrid_override_pattern`` string, or transformers 5's
  ``layers_block_type`` list ("linear_attention" is a Mamba-2 layer there); export writes the
  spelling the source used.
- Mamba-2: ``in_proj`` rows are z, x, B, C, dt and the conv runs over x, B, C; Megatron-Core
  splits each segment over TP on its own (``Segmented``); A_log, D, dt_bias and the gated norm
  by heads / channels; ``out_proj`` by rows of the input.
- MoE (Nemotron 3): squared-ReLU experts without a gate (``up_proj`` / ``down_proj``, per expert
  as published or stacked as transformers holds them) and one shared expert; a sigmoid router
  whose score-correction bias picks the experts (``e_score_correction_bias``: Megatron's expert
  bias), top-k renormalised and scaled by ``routed_scaling_factor``. The latent projections of
  ``moe_latent_size`` are refused by name, as are MTP layers (``num_nextn_predict_layers``).
- Names: the published ``backbone.`` ones, or transformers 5's in-memory ``model.`` ones where the
  checkpoint has those.
- Without ``mamba_ssm`` (CPU; a GPU without it) the torch scan and gated norm of
  ``modeling_nemotron_h`` run in its place.
"""
from __future__ import annotations

from typing import Any

from bridges.core.bridge import Bridge
from bridges.core.config import ConfigError, Field, get_path, params_dtype, translate
from bridges.core.mappings import (QKV, ColumnParallel, Mapping, Replicated, RowParallel, Segmented, TiedOutput,
                                   VocabParallel)
from bridges.core.moe import MOE_PORTABLE, sigmoid_bias_routing
from bridges.core.registry import register_bridge

L, H = "decoder.layers.*.", "backbone.layers.*."
# transformers 5's layers_block_type names <-> the pattern's symbols
KINDS = {"linear_attention": "M", "mamba": "M", "full_attention": "*", "attention": "*", "mlp": "-", "moe": "E"}
NAMES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}

FIELDS = (
    Field("hidden_size", "hidden_size"),
    Field("intermediate_size", "ffn_hidden_size"),
    Field("num_attention_heads", "num_attention_heads"),
    Field("num_key_value_heads", "num_query_groups"),
    Field("head_dim", "kv_channels"),
    Field("layer_norm_epsilon", "layernorm_epsilon", 1e-5),
    Field("vocab_size", "vocab_size"),
    Field("max_position_embeddings", "max_sequence_length", 4096),
    Field("tie_word_embeddings", "share_embeddings_and_output_weights", False),
    Field("initializer_range", "init_method_std", 0.02),
    Field("mamba_num_heads", "mamba_num_heads"),
    Field("mamba_head_dim", "mamba_head_dim"),
    Field("n_groups", "mamba_num_groups"),
    Field("ssm_state_size", "mamba_state_dim"),
    Field("conv_kernel", "mamba_conv_kernel", 4),
    Field("chunk_size", "mamba_chunk_size", 128),
)
# the MoE layers' fields: read only where the pattern has an ``E``
MOE_FIELDS = (
    Field("n_routed_experts", "num_moe_experts", None),
    Field("num_experts_per_tok", "moe_router_topk", None),
    Field("moe_intermediate_size", "moe_ffn_hidden_size", None),
    Field("moe_shared_expert_intermediate_size", "moe_shared_expert_intermediate_size", None),
    Field("routed_scaling_factor", "moe_router_topk_scaling_factor", 1.0),
    Field("n_group", "n_group", 1),
    Field("topk_group", "topk_group", 1),
)


def pattern_of(cfg: Any) -> str:
    """The layer pattern, from either spelling; an unknown block type is named."""
    text = get_path(cfg, "hybrid_override_pattern", None)
    if text is not None:
        bad = sorted(set(text) - set(NAMES))
    else:
        kinds = get_path(cfg, "layers_block_type", None)
        if kinds is None:
            raise ConfigError("config field 'hybrid_override_pattern' (or 'layers_block_type') is required")
        bad = sorted({k for k in kinds if k not in KINDS})
        text = "".join(KINDS.get(k, "?") for k in kinds)
    if bad:
        raise ConfigError(f"layer pattern: block type(s) {bad} are not mapped by the nemotron_h bridge "
                          f"(Mamba-2, attention, MLP and MoE layers are)")
    return text


@register_bridge(model_type="nemotron_h", architectures=["NemotronHForCausalLM"])
class NemotronHBridge(Bridge):
    config_fields = FIELDS + MOE_FIELDS
    ported_remote_code = ("configuration_nemotron_h.NemotronHConfig", "modeling_nemotron_h.NemotronHForCausalLM")
    megatron_lm_script = "pretrain_hybrid.py"  # HybridModel; the stack through --spec
    megatron_lm_spec = ("bridges.models.nemotron_h.megatron_lm_spec", "stack")

    @property
    def megatron_lm(self) -> str | None:
        kernel = self.megatron_attrs().get("mamba_conv_kernel", 4)
        return None if kernel == 4 else (f"conv_kernel={kernel}: the spec module builds the published "
                                         "Mamba-2 conv kernel of 4")

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Four layers with every kind (Mamba, attention, Mamba, MLP: each PP2 stage holds a Mamba
        layer; a MoE model's MLP layers MoE, six layers where it has both), Mamba-2 heads and groups
        that TP 2 divides, chunks shorter than the sequence."""
        kinds = set(pattern_of(config))
        c = dict(config)
        for k in ("hybrid_override_pattern", "layers_block_type", "num_hidden_layers", "attention_head_dim"):
            c.pop(k, None)
        toy = "M*M-" if "E" not in kinds else "M*ME" if "-" not in kinds else "M*M-ME"
        c.update(hybrid_override_pattern=toy, mamba_num_heads=8, mamba_head_dim=8, n_groups=2,
                 ssm_state_size=8, chunk_size=8, conv_kernel=4)
        if "E" in kinds:
            c.update(moe_shared_expert_intermediate_size=64)
        return c

    def megatron_attrs(self) -> dict[str, Any]:
        cfg = self.hf_config
        for name in ("use_bias", "mlp_bias", "attention_bias", "residual_in_fp32"):
            if get_path(cfg, name, False):
                raise ConfigError(f"{name}=True is not supported by the nemotron_h bridge (published models: False)")
        if not get_path(cfg, "use_conv_bias", True):
            raise ConfigError("use_conv_bias=False: Megatron-Core's Mamba-2 mixer always has a conv bias")
        act = get_path(cfg, "mlp_hidden_act", "relu2")
        if act != "relu2":
            raise ConfigError(f"mlp_hidden_act={act!r}: the nemotron_h bridge maps squared ReLU ('relu2') MLPs")
        from megatron.core.activations import squared_relu

        pattern = pattern_of(cfg)
        attrs = translate(cfg, FIELDS)
        attrs.update(num_layers=len(pattern), hybrid_layer_pattern=pattern, is_hybrid_model=True,
                     position_embedding_type="none", gated_linear_unit=False, activation_func=squared_relu,
                     add_bias_linear=False, add_qkv_bias=False, normalization="RMSNorm",
                     use_mamba_mem_eff_path=False, params_dtype=params_dtype(cfg))
        if "E" in pattern:
            attrs.update(self._moe_attrs(cfg))
        return attrs

    def _moe_attrs(self, cfg) -> dict[str, Any]:
        """The MoE layers' Megatron fields; what HF's MoE block and Megatron-Core's disagree on
        is refused by name."""
        for name, why in (("moe_latent_size", "the latent projections around the experts are not mapped"),
                          ("num_nextn_predict_layers", "MTP layers are not mapped (transformers builds none)")):
            if get_path(cfg, name, None):
                raise ConfigError(f"{name}={get_path(cfg, name)!r}: {why} by the nemotron_h bridge")
        if not get_path(cfg, "norm_topk_prob", True):
            raise ConfigError("norm_topk_prob=False: Megatron-Core renormalises a sigmoid router's top-k always")
        attrs = translate(cfg, MOE_FIELDS)
        for f in MOE_FIELDS:
            if attrs[f.megatron] is None:
                raise ConfigError(f"config field {f.hf!r} is required for MoE layers (the pattern's 'E')")
        attrs.update(MOE_PORTABLE, moe_router_load_balancing_type="none", moe_grouped_gemm=False)
        attrs.update(sigmoid_bias_routing(attrs["n_group"], attrs["topk_group"], attrs["moe_router_topk"],
                                          attrs["num_moe_experts"]))
        return attrs

    def hf_config_dict(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        attrs = attrs if attrs is not None else self.megatron_attrs()
        out = super().hf_config_dict(attrs)
        source = self.checkpoint.config() if self.checkpoint is not None else (
            self.hf_config if isinstance(self.hf_config, dict) else {})
        if "layers_block_type" in source:
            out["layers_block_type"] = [NAMES[x] for x in attrs["hybrid_layer_pattern"]]
        else:
            out["hybrid_override_pattern"] = attrs["hybrid_layer_pattern"]
            out["num_hidden_layers"] = len(attrs["hybrid_layer_pattern"])
        out.update(mlp_hidden_act="relu2", use_conv_bias=True, use_bias=False, mlp_bias=False, attention_bias=False)
        return out

    # -- the Megatron model ---------------------------------------------------------------
    def build_model(self, provider, pre_process: bool, post_process: bool, vp_stage: int | None = None):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        from bridges.core.hybrid import hybrid_model, local_hybrid_stack_spec
        from bridges.models.nemotron_h.modeling_nemotron_h import install_torch_mamba

        install_torch_mamba()
        p = provider
        moe = bool(getattr(p, "num_moe_experts", None))
        spec = local_hybrid_stack_spec(WrappedTorchNorm, d_conv=p.mamba_conv_kernel, chunk_size=p.mamba_chunk_size,
                                       num_experts=p.num_moe_experts if moe else None,
                                       grouped=moe and bool(p.moe_grouped_gemm))
        return hybrid_model(p, spec, pre_process, post_process, vp_stage, position_embedding_type="none")

    def layout_constraints(self, provider) -> list[tuple[str, int, int, str]]:
        p, lay = provider, provider.layout
        return [("num_attention_heads", p.num_attention_heads, lay.tp, "TP"),
                ("num_query_groups", p.num_query_groups, lay.tp, "TP"),
                ("ffn_hidden_size", p.ffn_hidden_size, lay.tp, "TP"),
                ("mamba_num_heads", p.mamba_num_heads, lay.tp, "TP"),
                ("mamba_num_groups", p.mamba_num_groups, lay.tp, "TP"),
                ("mamba_num_heads", p.mamba_num_heads, p.mamba_num_groups, "mamba_num_groups"),
                ("num_layers", p.num_layers, lay.pp * (lay.vpp or 1), "PP x VPP"),
                ("num_attention_heads", p.num_attention_heads, p.num_query_groups, "num_query_groups")] + (
            [("num_moe_experts", p.num_moe_experts, lay.ep, "EP"),
             ("moe_ffn_hidden_size", p.moe_ffn_hidden_size, lay.expert_tp, "expert TP"),
             ("moe_shared_expert_intermediate_size", p.moe_shared_expert_intermediate_size, lay.tp, "TP")]
            if getattr(p, "num_moe_experts", None) else [])

    # -- weights --------------------------------------------------------------------------
    def hf_name(self, name: str) -> str:
        """The published names (``backbone.``), or transformers 5's in-memory ones (``model.``)
        where the checkpoint uses those (a saved ``state_dict``)."""
        ckpt = self.checkpoint
        if name.startswith("backbone.") and ckpt is not None and "model.embeddings.weight" in ckpt:
            return "model." + name[len("backbone."):]
        return name

    def mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        pattern = attrs["hybrid_layer_pattern"]
        where = {k: tuple(i for i, x in enumerate(pattern) if x == k) for k in "M*-E"}
        inner = attrs["mamba_num_heads"] * attrs["mamba_head_dim"]
        gn = attrs["mamba_num_groups"] * attrs["mamba_state_dim"]
        m, a, f = where["M"], where["*"], where["-"]
        table: list[Mapping] = [VocabParallel("embedding.word_embeddings.weight", "backbone.embeddings.weight")]
        if m:
            table += [
                Replicated(L + "norm.weight", H + "norm.weight", layers=m),
                Segmented(L + "mixer.in_proj.weight", H + "mixer.in_proj.weight", layers=m,
                          sizes=(inner, inner, gn, gn, attrs["mamba_num_heads"])),
                Segmented(L + "mixer.conv1d_weight", H + "mixer.conv1d.weight", layers=m, sizes=(inner, gn, gn)),
                Segmented(L + "mixer.conv1d_bias", H + "mixer.conv1d.bias", layers=m, sizes=(inner, gn, gn)),
                ColumnParallel(L + "mixer.A_log", H + "mixer.A_log", layers=m),
                ColumnParallel(L + "mixer.D", H + "mixer.D", layers=m),
                ColumnParallel(L + "mixer.dt_bias", H + "mixer.dt_bias", layers=m),
                ColumnParallel(L + "mixer.norm.weight", H + "mixer.norm.weight", layers=m),
                RowParallel(L + "mixer.out_proj.weight", H + "mixer.out_proj.weight", layers=m),
            ]
        if a:
            table += [
                Replicated(L + "input_layernorm.weight", H + "norm.weight", layers=a),
                QKV(L + "self_attention.linear_qkv.weight", {"q": H + "mixer.q_proj.weight",
                    "k": H + "mixer.k_proj.weight", "v": H + "mixer.v_proj.weight"}, layers=a),
                RowParallel(L + "self_attention.linear_proj.weight", H + "mixer.o_proj.weight", layers=a),
            ]
        if f:
            table += [
                Replicated(L + "pre_mlp_layernorm.weight", H + "norm.weight", layers=f),
                ColumnParallel(L + "mlp.linear_fc1.weight", H + "mixer.up_proj.weight", layers=f),
                RowParallel(L + "mlp.linear_fc2.weight", H + "mixer.down_proj.weight", layers=f),
            ]
        if where["E"]:
            table += self._moe_mappings(where["E"])
        table.append(Replicated("decoder.final_norm.weight", "backbone.norm_f.weight"))
        if attrs["share_embeddings_and_output_weights"]:
            table.append(TiedOutput("output_layer.weight", "backbone.embeddings.weight"))
        else:
            table.append(VocabParallel("output_layer.weight", "lm_head.weight"))
        return table

    def _moe_mappings(self, e: tuple[int, ...]) -> list[Mapping]:
        """MoE layers: router and its bias, experts without a gate (per expert as published, or
        stacked [E, out, in] as transformers holds them; grouped GEMM as the alternate), the
        shared expert."""
        X = H + "mixer."
        ckpt = self.checkpoint
        stacked = ckpt is not None and any(self.hf_name(f"backbone.layers.{i}.mixer.experts.up_proj") in ckpt
                                           for i in e)
        up, down = ((X + "experts.up_proj[*]", X + "experts.down_proj[*]") if stacked else
                    (X + "experts.*.up_proj.weight", X + "experts.*.down_proj.weight"))
        out: list[Mapping] = [Replicated(L + "pre_mlp_layernorm.weight", H + "norm.weight", layers=e),
                              Replicated(L + "mlp.router.weight", X + "gate.weight", layers=e),
                              Replicated(L + "mlp.router.expert_bias", X + "gate.e_score_correction_bias", layers=e)]
        for meg, alt in (("mlp.experts.local_experts.*.linear_fc{}.weight", False), ("mlp.experts.linear_fc{}.weight*", True)):
            out += [ColumnParallel(L + meg.format(1), up, layers=e, alternate=alt),
                    RowParallel(L + meg.format(2), down, layers=e, alternate=alt)]
        return out + [ColumnParallel(L + "mlp.shared_experts.linear_fc1.weight", X + "shared_experts.up_proj.weight", layers=e),
                      RowParallel(L + "mlp.shared_experts.linear_fc2.weight", X + "shared_experts.down_proj.weight", layers=e)]
