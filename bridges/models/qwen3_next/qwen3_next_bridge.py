"""Qwen3-Next (``qwen3_next``) on Megatron-Core's HybridModel: each HF decoder layer is two
Megatron layers, its token mixer (``G`` gated delta net, or ``*`` gated attention every
``full_attention_interval``-th layer) and its MoE layer (``E``: routed experts, a shared expert
behind a sigmoid gate), so Megatron layer ``j`` reads HF layer ``j // 2`` (``layer_stride=2``).

Attention: an output gate (HF q_proj's second half per head), q/k RMSNorm, partial rotary.
Norms are zero-centred ((1 + w), as Gemma's) except the gated delta net's output norm.

The published checkpoints' multi-token-prediction block (``mtp.*``: two pre-projection norms,
``fc``, one full-attention decoder layer, a final norm; ``mtp.py``) is Megatron's MTP depth on
the pattern's ``/*E`` part (``/*-`` without experts). Its depth count: ``mtp_num_hidden_layers``
where the config has it (Qwen3.5's do), else what the checkpoint holds (Qwen3-Next's config
says nothing; its published checkpoints hold one, and a config alone is read as theirs);
transformers-saved checkpoints hold none.
"""
from __future__ import annotations

from typing import Any

import warnings

import torch
import torch.nn.functional as F

from bridges.core.bridge import Bridge
from bridges.core.config import (ConfigError, Field, get_path, params_dtype, rope_parameters, rope_to_megatron,
                                 translate)
from bridges.core.hybrid import mtp_mappings, split_pattern
from bridges.core.mappings import (ColumnParallel, GatedMLP, Mapping, Replicated, RowParallel, Segmented,
                                   StackedGatedMLP, TiedOutput, VocabParallel)
from bridges.core.moe import MOE_PORTABLE, moe_fields
from bridges.core.registry import register_bridge
from bridges.models.qwen3_next.modeling_qwen3_next import GatedQKV, GDNInProj

L, H = "decoder.layers.*.", "model.layers.*."
PREFIX = "mtp."  # the checkpoints' multi-token-prediction block (mtp.py)

FIELDS = (
    Field("hidden_size", "hidden_size"),
    Field("intermediate_size", "ffn_hidden_size"),
    Field("num_attention_heads", "num_attention_heads"),
    Field("num_key_value_heads", "num_query_groups"),
    Field("head_dim", "kv_channels"),
    Field("rms_norm_eps", "layernorm_epsilon", 1e-6),
    Field("vocab_size", "vocab_size"),
    Field("max_position_embeddings", "max_sequence_length"),
    Field("tie_word_embeddings", "share_embeddings_and_output_weights", False),
    Field("initializer_range", "init_method_std", 0.02),
    Field("linear_num_key_heads", "linear_num_key_heads"),
    Field("linear_num_value_heads", "linear_num_value_heads"),
    Field("linear_key_head_dim", "linear_key_head_dim"),
    Field("linear_value_head_dim", "linear_value_head_dim"),
    Field("linear_conv_kernel_dim", "linear_conv_kernel_dim", 4),
    Field("shared_expert_intermediate_size", "moe_shared_expert_intermediate_size"),
    Field("mtp_num_hidden_layers", "mtp_num_layers", None, None, lambda v: v or 0),
) + moe_fields()


def layer_kinds(cfg: Any) -> list[tuple[str, str]]:
    """(mixer, MLP) symbols per HF layer: full attention every ``full_attention_interval``-th
    layer (or as ``layer_types`` says), MoE unless in ``mlp_only_layers`` / off the sparse step
    (a config without experts: every MLP dense, as Qwen3.5's)."""
    n = get_path(cfg, "num_hidden_layers")
    types = get_path(cfg, "layer_types", None)
    every = get_path(cfg, "full_attention_interval", 4)
    step = get_path(cfg, "decoder_sparse_step", 1)
    dense = set(get_path(cfg, "mlp_only_layers", None) or ())
    out = []
    for i in range(n):
        full = types[i] == "full_attention" if types else (i + 1) % every == 0
        moe = bool(get_path(cfg, "num_experts", None)) and i not in dense and (i + 1) % step == 0
        out.append(("*" if full else "G", "E" if moe else "-"))
    return out


def mtp_kinds(cfg: Any) -> str:
    """The symbols of one MTP depth: full attention, and the MLP HF builds for a layer 0."""
    moe = bool(get_path(cfg, "num_experts", None)) and 0 not in set(get_path(cfg, "mlp_only_layers", None) or ())
    return "*" + ("E" if moe and get_path(cfg, "decoder_sparse_step", 1) == 1 else "-")


@register_bridge(model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"])
class Qwen3NextBridge(Bridge):
    config_fields = FIELDS
    mixture_of_experts = True
    hf_modeling = "qwen3_next"  # transformers' module whose decoder layer the MTP block reuses
    megatron_lm_script = "pretrain_hybrid.py"  # HybridModel; the stack through --spec
    megatron_lm_spec = ("bridges.models.qwen3_next.megatron_lm_spec", "stack")

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        c = dict(config)
        c.pop("layer_types", None)
        c.update(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
        return c

    @classmethod
    def toy_model(cls, model, randomize) -> None:
        """The published checkpoints' MTP block (``mtp.py``); zero-centred norms (``toy_norms``)."""
        from bridges.models.qwen3_next.mtp import add_toy_mtp

        add_toy_mtp(model, model.config, cls.hf_modeling, randomize)
        cls.toy_norms(model)

    @staticmethod
    def toy_norms(model) -> None:
        """Zero-centred norms at the generator's realistic scale: (1 + w) in [0.5, 1.5] (w drawn
        in [-0.5, 0.5]), not 1 + [0.5, 1.5], which doubles every layer's scale and makes the toy's
        delta rule amplify float noise past the logits bar."""
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                if p.dim() == 1 and name.endswith("norm.weight") and "linear_attn" not in name:
                    p.copy_(torch.rand(p.shape, generator=g) - 0.5)

    def _mtp_depths(self, declared: int | None) -> int:
        """MTP depths: the config's ``mtp_num_hidden_layers``, else the checkpoint's, else (a
        config alone) the published checkpoints' one; a declared block the checkpoint lacks is
        dropped with a warning."""
        ckpt = self.checkpoint
        stored = ckpt is not None and f"{PREFIX}fc.weight" in ckpt
        if declared is None:
            declared = 1 if stored or ckpt is None else 0
        elif declared and ckpt is not None and not stored:
            warnings.warn(f"{ckpt.path}: mtp_num_hidden_layers={declared}, but the checkpoint holds no MTP "
                          f"block ({PREFIX}fc.weight): converting without it", stacklevel=3)
            return 0
        if declared > 1:
            raise ConfigError(f"mtp_num_hidden_layers={declared}: the checkpoints share one mtp.fc and its "
                              f"norms across depths, Megatron-Core's MTP depths each have their own; one supported")
        return declared

    def megatron_attrs(self) -> dict[str, Any]:
        cfg = self.hf_config
        attrs = translate(cfg, self.config_fields)
        attrs.update(rope_to_megatron(rope_parameters(cfg)))
        main = "".join(m + f for m, f in layer_kinds(cfg))
        depths = self._mtp_depths(attrs.get("mtp_num_layers"))
        pattern = main + f"/{mtp_kinds(cfg)}" * depths
        attrs.update(MOE_PORTABLE, num_layers=len(main), hybrid_layer_pattern=pattern, is_hybrid_model=True,
                     position_embedding_type="rope", gated_linear_unit=True, activation_func=F.silu,
                     add_bias_linear=False, add_qkv_bias=False, qk_layernorm=True, attention_output_gate=True,
                     layernorm_zero_centered_gamma=True, normalization="RMSNorm", deterministic_mode=True,
                     moe_shared_expert_gate=True, params_dtype=params_dtype(cfg), mtp_num_layers=depths or None)
        if attrs.get("moe_aux_loss_coeff", 0.0) == 0.0:
            attrs["moe_router_load_balancing_type"] = "none"
        return attrs

    # -- the Megatron model ---------------------------------------------------------------
    def build_model(self, provider, pre_process: bool, post_process: bool, vp_stage: int | None = None):
        from bridges.core.hybrid import hybrid_model, local_hybrid_stack_spec
        from bridges.models.gemma.modeling_gemma import ZeroCenteredRMSNorm
        from bridges.models.qwen3_next.modeling_qwen3_next import PlainRMSNorm, install_torch_gdn

        install_torch_gdn()
        p = provider
        spec = local_hybrid_stack_spec(ZeroCenteredRMSNorm, qk_norm=ZeroCenteredRMSNorm, gdn_norm=PlainRMSNorm,
                                       num_experts=p.num_moe_experts if self.mixture_of_experts else None,
                                       grouped=self.mixture_of_experts and bool(p.moe_grouped_gemm),
                                       mtp=bool(p.mtp_num_layers))
        return hybrid_model(p, spec, pre_process, post_process, vp_stage, position_embedding_type="rope",
                            rotary_percent=p.rotary_percent, rotary_base=p.rotary_base)

    def layout_constraints(self, provider) -> list[tuple[str, int, int, str]]:
        p, lay = provider, provider.layout
        out = [("num_attention_heads", p.num_attention_heads, lay.tp, "TP"),
               ("num_query_groups", p.num_query_groups, lay.tp, "TP"),
               ("linear_num_key_heads", p.linear_num_key_heads, lay.tp, "TP"),
               ("linear_num_value_heads", p.linear_num_value_heads, p.linear_num_key_heads, "linear_num_key_heads"),
               ("num_layers", p.num_layers, 2 * lay.pp * (lay.vpp or 1), "2 x PP x VPP (whole HF layers per stage)")]
        if self.mixture_of_experts:  # a subclass without experts (Qwen3.5) has no MoE fields
            out += [("num_moe_experts", p.num_moe_experts, lay.ep, "EP"),
                    ("moe_ffn_hidden_size", p.moe_ffn_hidden_size, lay.expert_tp, "expert TP"),
                    ("moe_shared_expert_intermediate_size", p.moe_shared_expert_intermediate_size, lay.tp, "TP")]
        else:
            out.append(("ffn_hidden_size", p.ffn_hidden_size, lay.tp, "TP"))
        return out

    # -- weights --------------------------------------------------------------------------
    def _stacked_experts(self, attrs: dict[str, Any], mtp: bool = False) -> bool:
        """Whether the checkpoint stores the experts stacked (the MTP block's may differ)."""
        ckpt = self.checkpoint
        if mtp:
            return ckpt is not None and f"{PREFIX}layers.0.mlp.experts.gate_up_proj" in ckpt
        return ckpt is not None and any(f"model.layers.{i // 2}.mlp.experts.gate_up_proj" in ckpt
                                        for i, x in enumerate(attrs["hybrid_layer_pattern"]) if x == "E")

    def mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        table = self._decoder_table(attrs, self._stacked_experts(attrs))
        if attrs.get("mtp_num_layers"):
            stacked = self._stacked_experts(attrs, mtp=True)
            table += self.mtp_mappings(self._decoder_table(attrs, stacked), attrs)
        return table

    def _decoder_table(self, attrs: dict[str, Any], stacked: bool) -> list[Mapping]:
        """The main model's mappings, experts stacked or per expert."""
        pattern = split_pattern(attrs["hybrid_layer_pattern"])[0]
        at = {k: tuple(i for i, x in enumerate(pattern) if x == k) for k in "G*E-"}
        nk, nv = attrs["linear_num_key_heads"], attrs["linear_num_value_heads"]
        dk, dv = attrs["linear_key_head_dim"], attrs["linear_value_head_dim"]
        s = dict(layer_stride=2)
        g, a, e, d = at["G"], at["*"], at["E"], at["-"]
        table: list[Mapping] = [VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
        mixers = tuple(sorted(g + a))
        table.append(Replicated(L + "input_layernorm.weight", H + "input_layernorm.weight", layers=mixers, **s))
        if g:
            A = H + "linear_attn."
            table += [
                GDNInProj(L + "self_attention.in_proj.weight", {"qkvz": A + "in_proj_qkvz.weight",
                          "ba": A + "in_proj_ba.weight"}, dims=(nk, nv, dk, dv), layers=g, **s),
                Segmented(L + "self_attention.conv1d.weight", A + "conv1d.weight",
                          sizes=(nk * dk, nk * dk, nv * dv), layers=g, **s),
                ColumnParallel(L + "self_attention.dt_bias", A + "dt_bias", layers=g, **s),
                ColumnParallel(L + "self_attention.A_log", A + "A_log", layers=g, **s),
                Replicated(L + "self_attention.out_norm.weight", A + "norm.weight", layers=g, **s),
                RowParallel(L + "self_attention.out_proj.weight", A + "out_proj.weight", layers=g, **s),
            ]
        if a:
            A = H + "self_attn."
            table += [
                GatedQKV(L + "self_attention.linear_qkv.weight", {"q": A + "q_proj.weight", "k": A + "k_proj.weight",
                         "v": A + "v_proj.weight"}, layers=a, **s),
                RowParallel(L + "self_attention.linear_proj.weight", A + "o_proj.weight", layers=a, **s),
                Replicated(L + "self_attention.q_layernorm.weight", A + "q_norm.weight", layers=a, **s),
                Replicated(L + "self_attention.k_layernorm.weight", A + "k_norm.weight", layers=a, **s),
            ]
        mlps = tuple(sorted(e + d))
        table.append(Replicated(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight", layers=mlps, **s))
        if d:
            table += [GatedMLP(L + "mlp.linear_fc1.weight", {"gate": H + "mlp.gate_proj.weight",
                                                             "up": H + "mlp.up_proj.weight"}, layers=d, **s),
                      RowParallel(L + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight", layers=d, **s)]
        if e:
            X = H + "mlp."
            if stacked:  # transformers' in-memory layout, in some checkpoints
                fc1 = lambda meg, alt: StackedGatedMLP(meg, {"gate_up": X + "experts.gate_up_proj[*]"},  # noqa: E731
                                                       layers=e, alternate=alt, **s)
                fc2 = lambda meg, alt: RowParallel(meg, X + "experts.down_proj[*]", layers=e, alternate=alt, **s)  # noqa: E731
            else:
                fc1 = lambda meg, alt: GatedMLP(meg, {"gate": X + "experts.*.gate_proj.weight",  # noqa: E731
                                                      "up": X + "experts.*.up_proj.weight"}, layers=e, alternate=alt, **s)
                fc2 = lambda meg, alt: RowParallel(meg, X + "experts.*.down_proj.weight", layers=e,  # noqa: E731
                                                   alternate=alt, **s)
            table += [
                Replicated(L + "mlp.router.weight", X + "gate.weight", layers=e, **s),
                fc1(L + "mlp.experts.local_experts.*.linear_fc1.weight", False),
                fc2(L + "mlp.experts.local_experts.*.linear_fc2.weight", False),
                fc1(L + "mlp.experts.linear_fc1.weight*", True),
                fc2(L + "mlp.experts.linear_fc2.weight*", True),
                GatedMLP(L + "mlp.shared_experts.linear_fc1.weight", {"gate": X + "shared_expert.gate_proj.weight",
                         "up": X + "shared_expert.up_proj.weight"}, layers=e, **s),
                RowParallel(L + "mlp.shared_experts.linear_fc2.weight", X + "shared_expert.down_proj.weight",
                            layers=e, **s),
                Replicated(L + "mlp.shared_experts.gate_weight", X + "shared_expert_gate.weight", layers=e, **s),
            ]
        table.append(Replicated("decoder.final_norm.weight", "model.norm.weight"))
        if attrs["share_embeddings_and_output_weights"]:
            table.append(TiedOutput("output_layer.weight", "model.embed_tokens.weight"))
        else:
            table.append(VocabParallel("output_layer.weight", "lm_head.weight"))
        return table

    def mtp_mappings(self, table: list[Mapping], attrs: dict[str, Any]) -> list[Mapping]:
        """The MTP depth: its layers as the decoder's of the same kind, under ``mtp.layers.0.``;
        its two norms, projection and final norm (one copy in the checkpoint)."""
        M, one = "mtp.layers.*.", dict(layers=(0,))
        return mtp_mappings(table, attrs["hybrid_layer_pattern"], (L, H)) + [
            Replicated(M + "enorm.weight", PREFIX + "pre_fc_norm_embedding.weight", **one),
            Replicated(M + "hnorm.weight", PREFIX + "pre_fc_norm_hidden.weight", **one),
            ColumnParallel(M + "eh_proj.weight", PREFIX + "fc.weight", **one),
            Replicated(M + "final_layernorm.weight", PREFIX + "norm.weight", **one)]

    # -- the suite's MTP check ---------------------------------------------------------------
    def mtp_reference_logits(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """HF-side logits of the MTP depth (``mtp.mtp_reference_logits``) from this bridge's
        checkpoint, on the main model's final hidden state ``hidden``."""
        return mtp_reference(self.hf_config, self.hf_modeling, self.checkpoint, ids, hidden,
                             "model.embed_tokens.weight", "lm_head.weight")


def mtp_reference(text_config, model_type: str, ckpt, ids, hidden, embed: str, head: str) -> torch.Tensor:
    """``mtp.mtp_reference_logits`` from ``ckpt``'s ``mtp.*``, main embedding ``embed`` and
    output head ``head`` (the embedding where the head is tied or absent)."""
    from bridges.models.qwen3_next.mtp import load_hf_mtp_module, mtp_reference_logits

    tensors = {n: ckpt.get(n) for n in ckpt.names() if n.startswith(PREFIX)}
    mtp = load_hf_mtp_module(text_config, model_type, tensors)
    out_w = ckpt.get(head) if head in ckpt else ckpt.get(embed)
    with torch.no_grad():
        return mtp_reference_logits(mtp, text_config, model_type, ckpt.get(embed), out_w, ids, hidden.float())
