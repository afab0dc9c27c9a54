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
  bias), top-k renormalised and scaled by ``routed_scaling_factor``.
- Latent MoE (Nemotron 3 Super, ``moe_latent_size``): ``fc1_latent_proj`` / ``fc2_latent_proj``
  around the routed experts, which work at the latent width (``latent_moe.py``: Megatron-Core's
  MoELayer without TransformerEngine).
- MTP (``num_nextn_predict_layers`` depths of ``mtp_hybrid_override_pattern``): Megatron's MTP
  block on the pattern's ``/...`` part; HF's ``mtp.layers.<i>`` index is flattened over depths
  (``mtp.py``).
- Names: the published ``backbone.`` ones, or transformers 5's in-memory ``model.`` ones where the
  checkpoint has those.
- Without ``mamba_ssm`` (CPU; a GPU without it) the torch scan and gated norm of
  ``modeling_nemotron_h`` run in its place.
"""
from __future__ import annotations

import warnings
from typing import Any

from bridges.core.bridge import Bridge
from bridges.core.config import ConfigError, Field, get_path, params_dtype, translate
from bridges.core.hybrid import mtp_mappings, split_pattern
from bridges.core.mappings import (QKV, ColumnParallel, Mapping, Replicated, RowParallel, Segmented, TiedOutput,
                                   VocabParallel)
from bridges.core.moe import MOE_PORTABLE, sigmoid_bias_routing
from bridges.core.registry import register_bridge
from bridges.models.nemotron_h import mtp

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


def pattern_of(cfg: Any, mtp_part: bool = False) -> str:
    """The layer pattern, from either spelling (``mtp_part``: one MTP depth's, from
    ``mtp_hybrid_override_pattern`` or ``mtp_layers_block_type``); an unknown block type is named."""
    text_name, list_name = (("mtp_hybrid_override_pattern", "mtp_layers_block_type") if mtp_part
                            else ("hybrid_override_pattern", "layers_block_type"))
    text = get_path(cfg, text_name, None)
    if text is not None:
        bad = sorted(set(text) - set(NAMES))
    else:
        kinds = get_path(cfg, list_name, None)
        if kinds is None:
            raise ConfigError(f"config field {text_name!r} (or {list_name!r}) is required")
        bad = sorted({k for k in kinds if k not in KINDS})
        text = "".join(KINDS.get(k, "?") for k in kinds)
    if bad:
        raise ConfigError(f"{text_name}: block type(s) {bad} are not mapped by the nemotron_h bridge "
                          f"(Mamba-2, attention, MLP and MoE layers are)")
    return text


@register_bridge(model_type="nemotron_h", architectures=["NemotronHForCausalLM"])
class NemotronHBridge(Bridge):
    config_fields = FIELDS + MOE_FIELDS
    quantized_formats = ("nvfp4",)  # Nemotron 3 Super's NVFP4 release (ModelOpt)
    ported_remote_code = ("configuration_nemotron_h.NemotronHConfig", "modeling_nemotron_h.NemotronHForCausalLM")
    megatron_lm_script = "pretrain_hybrid.py"  # HybridModel; the stack through --spec
    megatron_lm_spec = ("bridges.models.nemotron_h.megatron_lm_spec", "stack")

    @property
    def megatron_lm(self) -> str | None:
        kernel = self.megatron_attrs().get("mamba_conv_kernel", 4)
        return None if kernel == 4 else (f"conv_kernel={kernel}: the spec module builds the published "
                                         "Mamba-2 conv kernel of 4")

    @classmethod
    def has_experts(cls, config: Any) -> bool:
        """Nemotron 3's MoE layers (``E``); Nemotron-H's MLP layers are dense."""
        return "E" in pattern_of(config)

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Four layers with every kind (Mamba, attention, Mamba, MLP: each PP2 stage holds a Mamba
        layer; a MoE model's MLP layers MoE, six layers where it has both), Mamba-2 heads and groups
        that TP 2 divides, chunks shorter than the sequence; a latent width of its own (40: no other
        dimension of the toy has it)."""
        kinds = set(pattern_of(config))
        c = dict(config)
        for k in ("hybrid_override_pattern", "layers_block_type", "num_hidden_layers", "attention_head_dim"):
            c.pop(k, None)
        toy = "M*M-" if "E" not in kinds else "M*ME" if "-" not in kinds else "M*M-ME"
        c.update(hybrid_override_pattern=toy, mamba_num_heads=8, mamba_head_dim=8, n_groups=2,
                 ssm_state_size=8, chunk_size=8, conv_kernel=4)
        if "E" in kinds:
            c.update(moe_shared_expert_intermediate_size=64)
        if c.get("moe_latent_size"):
            c.update(moe_latent_size=40)
        return c

    @classmethod
    def toy_model(cls, model, randomize) -> None:
        """The published checkpoints' MTP depth (``mtp.py``), where the config declares one."""
        cfg = model.config
        if getattr(cfg, "num_nextn_predict_layers", 0):
            mtp.add_toy_mtp(model, pattern_of(cfg, mtp_part=True), randomize)

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
        depths = self._mtp_depths(cfg)
        attrs.update(num_layers=len(pattern), hybrid_layer_pattern=pattern + f"/{pattern_of(cfg, True)}" * depths,
                     **({"mtp_num_layers": depths} if depths else {}), is_hybrid_model=True,
                     position_embedding_type="none", gated_linear_unit=False, activation_func=squared_relu,
                     add_bias_linear=False, add_qkv_bias=False, normalization="RMSNorm",
                     use_mamba_mem_eff_path=False, params_dtype=params_dtype(cfg))
        if "E" in attrs["hybrid_layer_pattern"]:
            attrs.update(self._moe_attrs(cfg))
        return attrs

    def _mtp_depths(self, cfg) -> int:
        """MTP depths: ``num_nextn_predict_layers``; a declared depth the checkpoint lacks (a
        transformers-saved fine-tune: transformers drops ``mtp.*``) is left out with a warning."""
        depths = int(get_path(cfg, "num_nextn_predict_layers", 0))
        if depths > 1:
            raise ConfigError(f"num_nextn_predict_layers={depths}: one MTP depth is mapped (the published "
                              f"checkpoints hold one; whether more would repeat it or hold their own is unknown)")
        ckpt = self.checkpoint
        if depths and ckpt is not None and not any(n.startswith(mtp.PREFIX) for n in ckpt.names()):
            warnings.warn(f"{ckpt.path}: num_nextn_predict_layers={depths}, but the checkpoint holds no "
                          f"{mtp.PREFIX}* tensors: converting without the MTP layers", stacklevel=3)
            return 0
        return depths

    def _moe_attrs(self, cfg) -> dict[str, Any]:
        """The MoE layers' Megatron fields; what HF's MoE block and Megatron-Core's disagree on
        is refused by name."""
        if not get_path(cfg, "norm_topk_prob", True):
            raise ConfigError("norm_topk_prob=False: Megatron-Core renormalises a sigmoid router's top-k always")
        attrs = translate(cfg, MOE_FIELDS)
        for f in MOE_FIELDS:
            if attrs[f.megatron] is None:
                raise ConfigError(f"config field {f.hf!r} is required for MoE layers (the pattern's 'E')")
        latent = get_path(cfg, "moe_latent_size", None)
        if latent is not None:
            attrs["moe_latent_size"] = int(latent)
        attrs.update(MOE_PORTABLE, moe_router_load_balancing_type="none", moe_grouped_gemm=False)
        attrs.update(sigmoid_bias_routing(attrs["n_group"], attrs["topk_group"], attrs["moe_router_topk"],
                                          attrs["num_moe_experts"]))
        return attrs

    def hf_config_dict(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        attrs = attrs if attrs is not None else self.megatron_attrs()
        out = super().hf_config_dict(attrs)
        source = self.checkpoint.config() if self.checkpoint is not None else (
            self.hf_config if isinstance(self.hf_config, dict) else {})
        main, inner, depths = split_pattern(attrs["hybrid_layer_pattern"])
        if "layers_block_type" in source:
            out["layers_block_type"] = [NAMES[x] for x in main]
            if depths:
                out["mtp_layers_block_type"] = [NAMES[x] for x in inner]
        else:
            out["hybrid_override_pattern"] = main
            out["num_hidden_layers"] = len(main)
            if depths:
                out["mtp_hybrid_override_pattern"] = inner
        if depths or "num_nextn_predict_layers" in source:
            out["num_nextn_predict_layers"] = depths
        if attrs.get("moe_latent_size"):
            out["moe_latent_size"] = attrs["moe_latent_size"]
        out.update(mlp_hidden_act="relu2", use_conv_bias=True, use_bias=False, mlp_bias=False, attention_bias=False)
        return out

    # -- the Megatron model ---------------------------------------------------------------
    def build_model(self, provider, pre_process: bool, post_process: bool, vp_stage: int | None = None):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        from bridges.core.hybrid import hybrid_model, local_hybrid_stack_spec
        from bridges.models.nemotron_h.latent_moe import with_latent_moe
        from bridges.models.nemotron_h.modeling_nemotron_h import install_torch_mamba

        install_torch_mamba()
        p = provider
        moe = bool(getattr(p, "num_moe_experts", None))
        spec = local_hybrid_stack_spec(WrappedTorchNorm, d_conv=p.mamba_conv_kernel, chunk_size=p.mamba_chunk_size,
                                       num_experts=p.num_moe_experts if moe else None,
                                       grouped=moe and bool(p.moe_grouped_gemm), mtp=bool(getattr(p, "mtp_num_layers", None)))
        if getattr(p, "moe_latent_size", None):
            spec = with_latent_moe(spec)
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
        table = self._decoder_table(attrs, self._stacked_experts(attrs))
        if attrs.get("mtp_num_layers"):
            table += self.mtp_mappings(self._decoder_table(attrs, self._stacked_experts(attrs, in_mtp=True)), attrs)
        return table

    def _stacked_experts(self, attrs: dict[str, Any], in_mtp: bool = False) -> bool:
        """Whether the checkpoint stores the experts stacked (the MTP layers' may differ: a
        transformers save writes the main layers' per expert and the MTP's stacked)."""
        ckpt = self.checkpoint
        if ckpt is None:
            return False
        main, inner, _ = split_pattern(attrs["hybrid_layer_pattern"])
        if in_mtp:
            return any(f"{mtp.PREFIX}{j}.mixer.experts.up_proj" in ckpt for j, x in enumerate(inner) if x == "E")
        return any(self.hf_name(f"backbone.layers.{i}.mixer.experts.up_proj") in ckpt
                   for i, x in enumerate(main) if x == "E")

    def mtp_mappings(self, table: list[Mapping], attrs: dict[str, Any]) -> list[Mapping]:
        """The MTP depths: each block as the decoder's of its kind, the depth's norms and
        projection on its first block, its final norm on its last, HF's block index flattened."""
        inner = split_pattern(attrs["hybrid_layer_pattern"])[1]
        depths, n = tuple(range(attrs["mtp_num_layers"])), len(inner)
        out = [mtp.flattened(m, n, int(m.megatron.split("mtp_model_layer.layers.")[1].split(".")[0]))
               for m in mtp_mappings(table, attrs["hybrid_layer_pattern"], (L, H), mtp_hf=mtp.PREFIX + "*.")]
        M = "mtp.layers.*."
        return out + [mtp.flattened(m, n, j) for m, j in (
            (Replicated(M + "enorm.weight", M + "enorm.weight", layers=depths), 0),
            (Replicated(M + "hnorm.weight", M + "hnorm.weight", layers=depths), 0),
            (ColumnParallel(M + "eh_proj.weight", M + "eh_proj.weight", layers=depths), 0),
            (Replicated(M + "final_layernorm.weight", M + "final_layernorm.weight", layers=depths), n - 1))]

    def _decoder_table(self, attrs: dict[str, Any], stacked: bool) -> list[Mapping]:
        """The main model's mappings, experts stacked or per expert."""
        pattern = split_pattern(attrs["hybrid_layer_pattern"])[0]
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
            table += self._moe_mappings(where["E"], stacked, bool(attrs.get("moe_latent_size")))
        table.append(Replicated("decoder.final_norm.weight", "backbone.norm_f.weight"))
        if attrs["share_embeddings_and_output_weights"]:
            table.append(TiedOutput("output_layer.weight", "backbone.embeddings.weight"))
        else:
            table.append(VocabParallel("output_layer.weight", "lm_head.weight"))
        return table

    def _moe_mappings(self, e: tuple[int, ...], stacked: bool, latent: bool) -> list[Mapping]:
        """MoE layers: router and its bias, experts without a gate (per expert as published, or
        stacked [E, out, in] as transformers holds them; grouped GEMM as the alternate), the
        shared expert, the latent projections (the same on every rank)."""
        X = H + "mixer."
        up, down = ((X + "experts.up_proj[*]", X + "experts.down_proj[*]") if stacked else
                    (X + "experts.*.up_proj.weight", X + "experts.*.down_proj.weight"))
        out: list[Mapping] = [Replicated(L + "pre_mlp_layernorm.weight", H + "norm.weight", layers=e),
                              Replicated(L + "mlp.router.weight", X + "gate.weight", layers=e),
                              Replicated(L + "mlp.router.expert_bias", X + "gate.e_score_correction_bias", layers=e)]
        for meg, alt in (("mlp.experts.local_experts.*.linear_fc{}.weight", False), ("mlp.experts.linear_fc{}.weight*", True)):
            out += [ColumnParallel(L + meg.format(1), up, layers=e, alternate=alt),
                    RowParallel(L + meg.format(2), down, layers=e, alternate=alt)]
        out += [ColumnParallel(L + "mlp.shared_experts.linear_fc1.weight", X + "shared_experts.up_proj.weight", layers=e),
                RowParallel(L + "mlp.shared_experts.linear_fc2.weight", X + "shared_experts.down_proj.weight", layers=e)]
        if latent:
            out += [Replicated(L + f"mlp.fc{k}_latent_proj.weight", X + f"fc{k}_latent_proj.weight", layers=e)
                    for k in (1, 2)]
        return out

    # -- the suite's MTP check ---------------------------------------------------------------
    def mtp_reference_logits(self, ids, hidden):
        """HF-side logits of the first MTP depth (``mtp.mtp_reference_logits``) from this bridge's
        checkpoint, on the main model's final hidden state ``hidden``."""
        import torch

        ckpt, cfg = self.checkpoint, self.hf_config
        embed = self.hf_name("backbone.embeddings.weight")
        head = ckpt.get("lm_head.weight") if "lm_head.weight" in ckpt else ckpt.get(embed)
        module = mtp.load_hf_mtp_module(cfg, pattern_of(cfg, True),
                                        {n: ckpt.get(n) for n in ckpt.names() if n.startswith(mtp.PREFIX)})
        with torch.no_grad():
            return mtp.mtp_reference_logits(module, ckpt.get(embed), head, ids, hidden.float())
