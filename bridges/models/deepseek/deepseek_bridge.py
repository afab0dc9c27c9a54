"""DeepSeek-V2 / V2-Lite (deepseek_v2) and DeepSeek-V3 (deepseek_v3): multi-latent attention
(q LoRA or a plain q projection, a compressed KV latent with a shared rope key, YaRN rope with
mscale), the first ``first_k_dense_replace`` layers dense, then routed experts plus
``n_shared_experts`` always-on experts. V2: softmax over all experts, top-k kept as is (not
renormalised). V3: sigmoid scores, a score-correction bias for the choice
(``e_score_correction_bias``), group-limited top-k (``n_group`` / ``topk_group``),
renormalised; both scaled by ``routed_scaling_factor``. V3's multi-token-prediction layers
(``model.layers.<num_hidden_layers + k>``) map to Megatron's MTP block. See docs/deepseek.md."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from bridges.core.config import GPT_FIELDS, ConfigError, Field, get_path, rope_parameters
from bridges.core.gpt import H, L
from bridges.core.mappings import (ColumnParallel, Mapping, MappingError, Replicated, RowParallel,
                                   VocabParallel)
from bridges.core.moe import MoEBridge, sigmoid_bias_routing
from bridges.core.provider import ModelProvider
from bridges.core.registry import register_bridge
from bridges.models.deepseek.modeling_deepseek import localize_mla_layer

MTP = "mtp.layers.*."  # Megatron's MTP block; HF stores MTP layer k as model.layers.{N + k}

_FIELDS = tuple(f for f in GPT_FIELDS if f.hf != "head_dim") + (  # MLA: no head_dim
    Field("q_lora_rank", "q_lora_rank", None),
    Field("kv_lora_rank", "kv_lora_rank"),
    Field("qk_nope_head_dim", "qk_head_dim"),
    Field("qk_rope_head_dim", "qk_pos_emb_head_dim"),
    Field("v_head_dim", "v_head_dim"),
    Field("n_routed_experts", "num_moe_experts"),
    Field("num_experts_per_tok", "moe_router_topk"),
    Field("moe_intermediate_size", "moe_ffn_hidden_size"),
    Field("n_shared_experts", "n_shared_experts"),
    Field("first_k_dense_replace", "first_k_dense_replace"),
    Field("routed_scaling_factor", "moe_router_topk_scaling_factor", 1.0),
    # kept as HF has them; the Megatron routing fields are derived in megatron_attrs
    Field("n_group", "n_group", 1),
    Field("topk_group", "topk_group", 1),
)


def mla_mappings(q_lora: bool, meg: str = L, hf: str = H) -> list[Mapping]:
    """MLA attention (local spec). Every copy is verbatim: q is per head [nope | rope],
    kv_a_proj_with_mqa [latent | shared rope key], kv_b_proj per head [k_nope | v]. The down
    projections are column-parallel (rows split by TP, output gathered): q_lora_rank and
    kv_lora_rank + qk_rope_head_dim must divide by TP."""
    a, h = meg + "self_attention.", hf + "self_attn."
    q = ([ColumnParallel(a + "linear_q_down_proj.weight", h + "q_a_proj.weight"),
          Replicated(a + "q_layernorm.weight", h + "q_a_layernorm.weight"),
          ColumnParallel(a + "linear_q_up_proj.weight", h + "q_b_proj.weight")] if q_lora
         else [ColumnParallel(a + "linear_q_proj.weight", h + "q_proj.weight")])
    return q + [ColumnParallel(a + "linear_kv_down_proj.weight", h + "kv_a_proj_with_mqa.weight"),
                Replicated(a + "kv_layernorm.weight", h + "kv_a_layernorm.weight"),
                ColumnParallel(a + "linear_kv_up_proj.weight", h + "kv_b_proj.weight"),
                RowParallel(a + "linear_proj.weight", h + "o_proj.weight")]


class _Offset:
    """Mixin: the HF layer index is the Megatron one plus ``offset`` (MTP layer k is HF layer
    num_hidden_layers + k)."""

    offset: ClassVar[int] = 0

    def hf_names(self, captures):
        return super().hf_names((str(int(captures[0]) + self.offset), *captures[1:]))

    def describe(self):
        return {**super().describe(), "hf_layer_offset": self.offset}


_OFFSET_TYPES: dict[tuple[type, int], type] = {}


def offset(m: Mapping, megatron: str, hf_offset: int, layers: tuple[int, ...]) -> Mapping:
    """``m`` for another Megatron name, its HF layer index shifted by ``hf_offset``."""
    key = (type(m), hf_offset)
    if key not in _OFFSET_TYPES:
        _OFFSET_TYPES[key] = type(f"Offset{type(m).__name__}", (_Offset, type(m)), {"offset": hf_offset})
    return _OFFSET_TYPES[key](megatron, m.hf, layers=layers, alternate=m.alternate)


@dataclass(frozen=True)
class SharedCopies(VocabParallel):
    """One Megatron tensor that HF also stores as copies (each MTP layer's ``embed_tokens`` and
    ``shared_head.head`` equal the main embedding / lm_head; Megatron's MTP uses the main
    ones). Import checks every copy equals the main tensor (one that differs is a named error:
    Megatron cannot hold two); export writes the main tensor under every name."""

    kind = "vocab_copies"

    def _main(self, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for role, t in hf.items():
            if role and not torch.equal(t, hf[""]):
                raise MappingError(f"{self.hf[role]} differs from {self.hf['']}: Megatron's "
                                   f"{self.megatron} serves both, so they must be equal")
        return {"": hf[""]}

    def _merge(self, hf, shapes):
        return super()._merge(self._main(hf), shapes)

    def shard_view(self, hf, tp_rank, tp_size, shapes):
        return super().shard_view(self._main(hf), tp_rank, tp_size, shapes)

    def _unmerge(self, full, shapes):
        t = super()._unmerge(full, shapes)[""]
        return {role: t if not role else t.clone() for role in self.hf}


@register_bridge(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"])
class DeepseekV2Bridge(MoEBridge):
    qkv_bias = False
    config_fields = _FIELDS + (
        Field("norm_topk_prob", "norm_topk_prob", False),
        Field("scoring_func", "moe_router_score_function", "softmax"),
        Field("topk_method", "topk_method", "greedy"),
    )
    shared_hf = {"gate": "mlp.shared_experts.gate_proj.weight", "up": "mlp.shared_experts.up_proj.weight",
                 "down": "mlp.shared_experts.down_proj.weight"}
    ported_remote_code = ("configuration_deepseek.DeepseekV2Config", "modeling_deepseek.DeepseekV2Model",
                          "modeling_deepseek.DeepseekV2ForCausalLM")

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Small MLA dims (q_lora_rank and kv_lora_rank + rope divide by TP up to 4); rope
        (yarn, mscale) kept. Group-limited routing: HF scores a group by its top-2 experts,
        Megatron by its top (top-k / topk_group): keep top-k = 2 x topk_group."""
        # no head_dim (MLA), and the toy is not quantized (the published FP8 config says it is)
        c = {k: v for k, v in config.items() if k not in ("head_dim", "quantization_config")}
        c.update(kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
        if c.get("q_lora_rank"):
            c["q_lora_rank"] = 24
        if int(c.get("n_group") or 1) > 1:
            c["num_experts_per_tok"] = 2 * int(c["topk_group"])
        return c

    # -- config ---------------------------------------------------------------------------
    def moe_layers(self) -> list[int]:
        k = get_path(self.hf_config, "first_k_dense_replace")
        return [int(i >= k) for i in range(self._num_layers())]

    def megatron_attrs(self) -> dict[str, Any]:
        cfg = self.hf_config
        self._refuse_common(cfg)
        attrs = super().megatron_attrs()
        for k in [k for k in attrs if k.startswith("yarn_")]:  # MLA has its own rope fields
            del attrs[k]
        attrs.update(_mla_rope(rope_parameters(cfg)))
        attrs.update(multi_latent_attention=True, qk_layernorm=True, transformer_impl="local",
                     kv_channels=attrs["qk_head_dim"] + attrs["qk_pos_emb_head_dim"],
                     moe_shared_expert_intermediate_size=attrs["moe_ffn_hidden_size"] * attrs["n_shared_experts"])
        attrs.update(self._routing(attrs))
        return attrs

    def _refuse_common(self, cfg) -> None:
        """Config values the HF model and Megatron-Core's MLA / MoE cannot agree on."""
        def refuse(field: str, why: str):
            raise ConfigError(f"{field}={get_path(cfg, field, None)!r}: {why} ({self.model_type} bridge)")

        if get_path(cfg, "attention_bias", False):
            refuse("attention_bias", "MLA with biases (q_a/kv_a/o_proj) is not supported")
        for field in ("index_n_heads", "index_topk", "index_head_dim"):
            if get_path(cfg, field, None):
                refuse(field, "DeepSeek-V3.2's sparse-attention indexer is not supported")
        if get_path(cfg, "num_key_value_heads", None) not in (None, get_path(cfg, "num_attention_heads")):
            refuse("num_key_value_heads", "MLA expands keys and values to every head: it must equal "
                   "num_attention_heads")
        if int(get_path(cfg, "moe_layer_freq", 1)) != 1:
            refuse("moe_layer_freq", "transformers ignores it (every layer past "
                   "first_k_dense_replace is MoE) while DeepSeek's own code does not")
        if int(get_path(cfg, "n_shared_experts")) < 1:
            refuse("n_shared_experts", "transformers builds a shared expert of "
                   "n_shared_experts x moe_intermediate_size: at least 1 is needed")
        if get_path(cfg, "first_k_dense_replace") >= get_path(cfg, "num_hidden_layers"):
            refuse("first_k_dense_replace", "every layer would be dense (no experts)")

    def _routing(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """V2: softmax over all experts, then top-k (Megatron pre-softmax), not renormalised."""
        if attrs["moe_router_score_function"] != "softmax":
            raise ConfigError(f"scoring_func={attrs['moe_router_score_function']!r}: transformers' "
                              f"DeepSeek-V2 always uses softmax scores")
        if attrs["norm_topk_prob"]:
            raise ConfigError("norm_topk_prob=True: transformers' DeepSeek-V2 never renormalises "
                              "the top-k weights (DeepSeek's own code does): ambiguous, not supported")
        groups, gtopk, k = attrs["n_group"], attrs["topk_group"], attrs["moe_router_topk"]
        method = attrs["topk_method"]
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method={method!r} is not supported for deepseek_v2 "
                              f"(greedy, group_limited_greedy)")
        grouped = method == "group_limited_greedy" and groups > 1
        if grouped and (k // gtopk != 1 or k > gtopk * attrs["num_moe_experts"] // groups):
            # HF scores a group by its best expert, Megatron by the sum of its top k // topk_group
            raise ConfigError(f"topk_method=group_limited_greedy with num_experts_per_tok={k}, "
                              f"topk_group={gtopk}: Megatron-Core scores a group by its top "
                              f"num_experts_per_tok // topk_group experts, HF by its best one; "
                              f"they agree only when num_experts_per_tok <= topk_group")
        return dict(moe_router_score_function="softmax", moe_router_pre_softmax=True,
                    moe_router_num_groups=groups if grouped else None,
                    moe_router_group_topk=gtopk if grouped else None)

    def hf_config_dict(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        attrs = attrs if attrs is not None else self.megatron_attrs()
        out = super().hf_config_dict(attrs)
        out["rope_parameters"] = _mla_rope_to_hf(attrs, get_path(self.hf_config, "rope_parameters", None) or {})
        return out

    @property
    def config_class(self):
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig

    def layout_constraints(self, provider: ModelProvider) -> list[tuple[str, int, int, str]]:
        """As MoE, and MLA's down projections, whose rows TP splits."""
        p, lay = provider, provider.layout
        return super().layout_constraints(provider) + [
            ("q_lora_rank", p.q_lora_rank or 0, lay.tp, "TP"),
            ("kv_lora_rank + qk_pos_emb_head_dim", p.kv_lora_rank + p.qk_pos_emb_head_dim, lay.tp, "TP")]

    @property
    def megatron_lm_spec(self) -> tuple[str, str]:
        """The local MLA layers; with YaRN values no flag reaches (Kimi-K2), the layer carrying
        them in its name (megatron_lm_spec.py)."""
        from bridges.models.deepseek.megatron_lm_spec import spec_name

        yarn = self.megatron_lm_spec_fields
        return ("bridges.models.deepseek.megatron_lm_spec",
                spec_name(self.megatron_attrs()) if yarn else "layer")

    @property
    def megatron_lm_spec_fields(self) -> tuple[str, ...]:
        """The MLA config's YaRN fields no Megatron-LM flag reaches, where the model's differ from
        the trainer's defaults (the spec's name carries them)."""
        from bridges.megatron_lm import MLA_NO_FLAG, mla_no_flag_default

        attrs = self.megatron_attrs()
        if attrs.get("rope_type") != "yarn" or all(attrs.get(n) == mla_no_flag_default(n) for n in MLA_NO_FLAG):
            return ()
        return MLA_NO_FLAG

    def customize_layer(self, layer_spec, is_moe: bool):
        return localize_mla_layer(layer_spec)  # MLA on the local spec (modeling_deepseek)

    def mtp_block_spec(self, provider: ModelProvider, vp_stage: int | None = None):
        """Megatron's MTP block: one copy of the model's last (MoE) layer spec per MTP layer, on
        the last pipeline stage (None elsewhere, and without MTP layers)."""
        if not getattr(provider, "mtp_num_layers", None):
            return None
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        return get_gpt_mtp_block_spec(provider.transformer_config(), self.layer_spec(provider, vp_stage),
                                      use_transformer_engine=False, vp_stage=vp_stage)

    # -- weights --------------------------------------------------------------------------
    def mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        table = [m for m in super().mappings(attrs) if ".self_attention." not in m.megatron]
        table[1:1] = mla_mappings(attrs["q_lora_rank"] is not None)
        n_mtp = attrs.get("mtp_num_layers") or 0
        if not n_mtp:
            return table
        if attrs["share_embeddings_and_output_weights"]:
            raise ConfigError("tie_word_embeddings=True with MTP layers is not supported")
        n, last = attrs["num_layers"], attrs["num_layers"] - 1
        mtp = tuple(range(n_mtp))
        copies = {"embedding.word_embeddings.weight": "embed_tokens.weight",
                  "output_layer.weight": "shared_head.head.weight"}
        out = []
        for m in table:
            if m.megatron in copies:
                m = SharedCopies(m.megatron, {"": m.hf, **{f"mtp{k}": f"model.layers.{n + k}.{copies[m.megatron]}"
                                                          for k in mtp}})
            out.append(m)
        # the MTP layer's transformer layer: the decoder's MoE-layer mappings, moved
        for m in table:
            if m.megatron.startswith(L) and (m.layers is None or last in m.layers):
                out.append(offset(m, MTP + "mtp_model_layer." + m.megatron[len(L):], n, mtp))
        for meg, hf, cls in (("enorm.weight", "enorm.weight", Replicated),
                             ("hnorm.weight", "hnorm.weight", Replicated),
                             ("eh_proj.weight", "eh_proj.weight", ColumnParallel),
                             ("final_layernorm.weight", "shared_head.norm.weight", Replicated)):
            out.append(offset(cls(MTP + meg, H + hf), MTP + meg, n, mtp))
        return out


@register_bridge(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"])
class DeepseekV3Bridge(DeepseekV2Bridge):
    config_fields = _FIELDS + (
        Field("norm_topk_prob", "norm_topk_prob", True),
        Field("scoring_func", "moe_router_score_function", "sigmoid"),
        Field("topk_method", "topk_method", "noaux_tc"),
        Field("num_nextn_predict_layers", "mtp_num_layers", 0, lambda v: v or None, lambda v: v or 0),
    )
    router_bias_hf = "mlp.gate.e_score_correction_bias"
    # published FP8: 128 x 128 blocks with weight_scale_inv; NVIDIA's ModelOpt FP4 (DeepSeek-R1-FP4);
    # compressed-tensors int4 routed experts (Kimi-K2-Thinking, this architecture)
    quantized_formats = ("block", "nvfp4", "w4a16")
    ported_remote_code = ("configuration_deepseek.DeepseekV3Config", "modeling_deepseek.DeepseekV3Model",
                          "modeling_deepseek.DeepseekV3ForCausalLM")

    @property
    def megatron_lm(self) -> str | None:
        if self.megatron_attrs().get("mtp_num_layers") and self.megatron_lm_spec_fields:
            return ("its MTP layer with YaRN values no flag reaches: the spec's name gives them to the decoder "
                    "layers, but the MTP layer pretrain_gpt.py builds takes the trainer's config")
        return None

    @classmethod
    def toy_model(cls, model, randomize) -> None:
        from bridges.models.deepseek.modeling_deepseek import add_toy_mtp_layers

        add_toy_mtp_layers(model, randomize)  # transformers does not build the MTP layers

    def _refuse_common(self, cfg) -> None:
        super()._refuse_common(cfg)
        if not get_path(cfg, "rope_interleave", True):
            raise ConfigError("rope_interleave=False: Megatron-Core's MLA always de-interleaves the "
                              "rope dims (no flag); not supported by the deepseek_v3 bridge")

    def _routing(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """V3: sigmoid scores, score-correction bias for the choice, group-limited top-k,
        renormalised (Megatron always renormalises sigmoid scores)."""
        for field, attr, want in (("scoring_func", "moe_router_score_function", "sigmoid"),
                                  ("topk_method", "topk_method", "noaux_tc"),
                                  ("norm_topk_prob", "norm_topk_prob", True)):
            if attrs[attr] != want:
                raise ConfigError(f"{field}={attrs[attr]!r}: transformers' DeepSeek-V3 model and "
                                  f"Megatron-Core agree only on {field}={want!r}")
        return sigmoid_bias_routing(attrs["n_group"], attrs["topk_group"], attrs["moe_router_topk"],
                                    attrs["num_moe_experts"])

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        ckpt, n = self.checkpoint, self._num_layers()
        if attrs["mtp_num_layers"] and ckpt is not None and f"model.layers.{n}.eh_proj.weight" not in ckpt:
            # transformers ignores MTP layers, and many derived checkpoints drop them
            warnings.warn(f"{ckpt.path}: num_nextn_predict_layers={attrs['mtp_num_layers']}, but the "
                          f"checkpoint holds no MTP layer (model.layers.{n}.*): converting without "
                          f"the MTP head (exported config: num_nextn_predict_layers=0)", stacklevel=2)
            attrs["mtp_num_layers"] = None
        return attrs

    # -- the suite's MTP check ---------------------------------------------------------------
    def mtp_reference_logits(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """HF-side logits of the first MTP layer (``modeling_deepseek.mtp_reference_logits``)
        from this bridge's checkpoint, on the main model's last hidden state ``hidden``."""
        from bridges.models.deepseek.modeling_deepseek import load_hf_mtp_layer, mtp_reference_logits

        n = self._num_layers()
        tensors = {x: self.checkpoint.get(x) for x in self.checkpoint.names() if x.startswith(f"model.layers.{n}.")}
        layer = load_hf_mtp_layer(self.hf_config, tensors, n)
        with torch.no_grad():
            return mtp_reference_logits(layer, ids, hidden.float())



# -- rope ------------------------------------------------------------------------------------
def _mla_rope(p: dict) -> dict[str, Any]:
    """HF rope parameters -> MLATransformerConfig fields (GPTModel itself builds no rotary
    embedding for MLA: position_embedding_type stays "rope")."""
    kind = p["rope_type"]
    out: dict[str, Any] = dict(position_embedding_type="rope", rotary_base=float(p["rope_theta"]),
                               rotary_percent=1.0)
    if float(p.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("rope_parameters.partial_rotary_factor: MLA ropes qk_rope_head_dim whole")
    if kind == "default":
        # no yarn: MLA's softmax scale still reads rotary_scaling_factor (1: no mscale)
        return {**out, "rope_type": "rope", "rotary_scaling_factor": 1.0}
    if kind != "yarn":
        raise ConfigError(f"rope_parameters.rope_type={kind!r}: MLA supports default and yarn rope")
    for k in ("attention_factor",):
        if p.get(k) is not None:
            raise ConfigError(f"rope_parameters.{k}={p[k]}: Megatron-Core derives it from mscale / "
                              f"mscale_all_dim; an explicit value is not supported")
    if p.get("truncate") is False:
        raise ConfigError("rope_parameters.truncate=False: Megatron-Core's yarn always rounds the "
                          "correction range")
    mscale, all_dim = float(p.get("mscale") or 1.0), float(p.get("mscale_all_dim") or 0.0)
    if not all_dim and mscale != 1.0:
        raise ConfigError(f"rope_parameters.mscale={mscale} without mscale_all_dim: HF then ignores "
                          f"mscale, Megatron-Core does not")
    return {**out, "rope_type": "yarn", "rotary_scaling_factor": float(p["factor"]),
            "original_max_position_embeddings": int(p["original_max_position_embeddings"]),
            "beta_fast": float(p.get("beta_fast", 32.0)), "beta_slow": float(p.get("beta_slow", 1.0)),
            "mscale": mscale, "mscale_all_dim": all_dim}


def _mla_rope_to_hf(attrs: dict[str, Any], source: dict) -> dict[str, Any]:
    """MLA rope fields -> HF rope_parameters (with the legacy "type" key if the source has it)."""
    p: dict[str, Any] = {"rope_theta": attrs["rotary_base"]}
    if attrs["rope_type"] == "yarn":
        p.update(rope_type="yarn", factor=attrs["rotary_scaling_factor"],
                 original_max_position_embeddings=attrs["original_max_position_embeddings"],
                 beta_fast=attrs["beta_fast"], beta_slow=attrs["beta_slow"], mscale=attrs["mscale"],
                 mscale_all_dim=attrs["mscale_all_dim"])
    else:
        p["rope_type"] = "default"
    if "type" in source:
        p["type"] = p["rope_type"]
    return p
