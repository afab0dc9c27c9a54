"""Qwen3.5 (``qwen3_5``: Qwen/Qwen3.5 dense checkpoints, ``Qwen3_5ForConditionalGeneration``): a
vision-language model. The text model is Qwen3-Next's hybrid stack (``bridges/models/qwen3_next/``:
gated delta net layers, gated full attention every ``full_attention_interval``-th layer,
zero-centred norms, partial rotary) with a dense MLP in every layer; the tower is Qwen3-VL's
(``bridges/models/qwen3_vl/``) without deepstack. What is its own:

- the gated delta net's input projection is four HF tensors (``in_proj_qkv``, ``in_proj_z``,
  ``in_proj_b``, ``in_proj_a``), not Qwen3-Next's two per-head-grouped fused ones;
- positions by interleaved M-RoPE over the rotated part of the head (``partial_rotary_factor``;
  ``mrope_section`` defaults to HF's [11, 11, 10]); HybridModel has no M-RoPE, the chunk hands
  its rotary module the positions (``modeling_qwen3_5.py``);
- names: ``model.language_model.``, ``model.visual.``, ``lm_head.`` (transformers' in-memory
  names), and the published checkpoints' multi-token-prediction block ``mtp.*`` (Qwen3-Next's
  layout, ``bridges/models/qwen3_next/mtp.py``; transformers neither builds nor loads it),
  its depth count from ``text_config.mtp_num_hidden_layers`` or the checkpoint.
"""
from __future__ import annotations

from typing import Any

from bridges.core.config import ConfigError, get_path, rope_parameters
from bridges.core.hybrid import split_pattern
from bridges.core.mappings import Mapping
from bridges.core.provider import ModelProvider
from bridges.core.registry import register_bridge
from bridges.flops import vision_flops
from bridges.models.qwen3_next.modeling_qwen3_next import GDNInProj
from bridges.models.qwen3_next.qwen3_next_bridge import FIELDS, Qwen3NextBridge, mtp_reference
from bridges.models.qwen3_vl.qwen3_vl_bridge import Qwen3VLBridge, qwen3_vision_flops

MROPE_SECTION = [11, 11, 10]  # HF's default when rope_parameters has none


class Qwen35TextBridge(Qwen3NextBridge):
    """Qwen3.5's text model: Qwen3-Next's hybrid stack, split GDN input projections,
    interleaved M-RoPE; dense MLPs (the MoE variant adds the experts back)."""

    config_fields = tuple(f for f in FIELDS if not f.megatron.startswith(("moe_", "num_moe")))
    mixture_of_experts = False
    hf_modeling = "qwen3_5"

    def rope(self) -> dict[str, Any]:
        p = rope_parameters(self.hf_config)
        p.setdefault("mrope_section", list(MROPE_SECTION))
        return p

    # The published configs' own switches (transformers reads neither: it always gates the
    # attention output and shares the main embedding with the MTP block): their values as
    # published are accepted, another is refused by name.
    checked_fields = (("attn_output_gate", True), ("mtp_use_dedicated_embeddings", False))

    def megatron_attrs(self) -> dict[str, Any]:
        self.refuse_other_values("the qwen3_5 bridge maps Qwen3.5 as published",
                                 "; transformers' Qwen3.5 implements no other, so there is no reference")
        attrs = super().megatron_attrs()
        if not self.mixture_of_experts:  # Qwen3-Next's MoE settings, for a model without experts
            attrs = {k: v for k, v in attrs.items() if not k.startswith("moe_")}
        section = list(self.rope()["mrope_section"])
        pairs = int(attrs["kv_channels"] * attrs["rotary_percent"]) // 2
        # interleaved: h takes pairs 1, 4, 7, ... and w 2, 5, 8, ... (section[axis] of each)
        if len(section) != 3 or sum(section) != pairs or any(a + 3 * (section[a] - 1) >= pairs for a in (1, 2)):
            raise ConfigError(f"rope_parameters.mrope_section={section!r}: three sizes (t, h, w) summing to the "
                              f"{pairs} rotary pairs of a head (head_dim x partial_rotary_factor / 2) expected, "
                              f"h and w each fitting every third pair (interleaved)")
        attrs.update(mrope_section=section)
        return attrs

    def hf_config_dict(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        attrs = attrs if attrs is not None else self.megatron_attrs()
        out = super().hf_config_dict(attrs)
        rope = {"rope_type": "default", "rope_theta": attrs["rotary_base"],
                "partial_rotary_factor": attrs["rotary_percent"]}
        source = rope_parameters(self.hf_config)  # HF's defaults stay unwritten where the source left them
        if "mrope_section" in source or list(attrs["mrope_section"]) != MROPE_SECTION:
            rope["mrope_section"] = list(attrs["mrope_section"])
        if "mrope_interleaved" in source:  # HF interleaves whatever it says
            rope["mrope_interleaved"] = source["mrope_interleaved"]
        out["rope_parameters"] = rope
        out.update({f: get_path(self.hf_config, f) for f, _ in self.checked_fields
                    if get_path(self.hf_config, f, None) is not None})
        out["layer_types"] = ["full_attention" if m == "*" else "linear_attention"
                              for m in split_pattern(attrs["hybrid_layer_pattern"])[0][::2]]
        return out

    def mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        out = []
        for m in super().mappings(attrs):
            if isinstance(m, GDNInProj):
                from bridges.models.qwen3_5.modeling_qwen3_5 import SplitGDNInProj

                a = m.hf["qkvz"].rsplit(".", 2)[0] + "."
                m = SplitGDNInProj(m.megatron, {k: f"{a}in_proj_{k}.weight" for k in ("qkv", "z", "b", "a")},
                                   dims=m.dims, layers=m.layers, layer_stride=m.layer_stride)
            out.append(m)
        return out


class TextOnlyToy:
    """Toy hooks of a text-only Qwen3.5 checkpoint: Qwen3.5's text toy with its M-RoPE sections,
    the MTP block and zero-centred norms (the text bridge's), the milder decay."""

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        return text_toy_config(super().toy_config(config), sections=True)

    @classmethod
    def toy_model(cls, model, randomize) -> None:
        super().toy_model(model, randomize)
        mild_decay(model)


@register_bridge(model_type="qwen3_5_text", architectures=["Qwen3_5ForCausalLM"])
class Qwen35ForCausalLMBridge(TextOnlyToy, Qwen35TextBridge):
    """A text-only Qwen3.5 checkpoint (``Qwen3_5ForCausalLM``: ``model.``, ``lm_head.``, ``mtp.``):
    the VLM's language model alone. Its text positions are M-RoPE's with t = h = w, which is plain
    rope over the rotated part: HybridModel's own rotary module serves."""


def text_toy_config(text: dict[str, Any], sections: bool = False) -> dict[str, Any]:
    """Qwen3.5's text toy over Qwen3-Next's: head_dim 64 so the published rotary share (0.25)
    is 8 pairs, sectioned (4, 2, 2) as Qwen3-VL's toy; full attention every 4th layer; linear key
    heads of 32, not 8: the delta rule l2-normalises q and k per head, and over 8 channels a
    near-zero vector is common enough that each GDN layer doubled the float noise (HF's own fp32
    logits 1e-5 from its fp64 ones; 3e-6 with 32). ``sections``: the M-RoPE sections set here
    (a text-only model; a VLM's toy sets them with its tower's)."""
    out = {**text, "head_dim": 64, "full_attention_interval": 4, "linear_key_head_dim": 32}
    if sections:
        out["rope_parameters"] = {**rope_parameters(text), "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    return out


def mild_decay(model) -> None:
    """A milder decay in the toy's gated delta net: A = exp(A_log) drawn in [0.05, 0.5], not the
    generator's [1.6, 4.5]. With the strong decay the chunked delta rule subtracts cumulative
    log-decays of a few hundred, and fp32 keeps too few digits of their differences: HF's own fp32
    logits were 1e-4 from its fp64 ones, and Megatron's torch path (another summation order) 3e-4
    from HF's; with the toy's norms and this decay 3.7e-6."""
    import torch

    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("linear_attn.A_log"):
                p.copy_((torch.rand(p.shape, generator=g) * 0.45 + 0.05).log())


@register_bridge(model_type="qwen3_5", architectures=["Qwen3_5ForConditionalGeneration"])
class Qwen35Bridge(Qwen3VLBridge):
    language_bridge = Qwen35TextBridge
    megatron_lm = ("a vision-language model on a hybrid of gated delta net and gated attention layers: "
                   "pretrain_gpt.py builds a GPTModel without either")

    def wrap(self, language_model, provider: ModelProvider, pre_process: bool, post_process: bool,
             vp_stage: int | None):
        from bridges.models.qwen3_5.modeling_qwen3_5 import Qwen35Model

        return Qwen35Model(language_model, provider, self.vision(), provider.image_token_id, with_vision=pre_process)

    def mtp_reference_logits(self, ids, hidden):
        """HF-side logits of the MTP depth (``qwen3_next/mtp.py``) from this checkpoint."""
        return mtp_reference(self.language.hf_config, self.language_bridge.hf_modeling, self.checkpoint, ids, hidden,
                             self.hf_name("model.language_model.embed_tokens.weight"), self.hf_name("lm_head.weight"))

    # -- conformance hooks ----------------------------------------------------------------
    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Qwen3-VL's toy without deepstack; the text part Qwen3.5's text toy (``text_toy_config``)
        over 8 layers."""
        config["text_config"] = text_toy_config(cls.language_bridge.toy_config(config["text_config"]))
        config = super().toy_config(config)
        config["vision_config"].pop("deepstack_visual_indexes", None)
        return config

    @classmethod
    def toy_model(cls, model, randomize) -> None:
        """The published checkpoints' MTP block; Qwen3-Next's zero-centred toy norms, on the
        language model and the MTP only (the tower's LayerNorms keep the generator's draw); the
        milder toy decay (``mild_decay``)."""
        from bridges.models.qwen3_next.mtp import add_toy_mtp

        lm = model.model.language_model
        add_toy_mtp(model, model.config.text_config, cls.language_bridge.hf_modeling, randomize)
        cls.language_bridge.toy_norms(lm)
        cls.language_bridge.toy_norms(model.mtp)
        mild_decay(lm)


vision_flops("qwen3_5_vision", "qwen3_5")(qwen3_vision_flops)
