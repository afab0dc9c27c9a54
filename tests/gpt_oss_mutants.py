"""Deliberately broken GPT-OSS bridges (tests/test_gpt_oss.py): each injects one bug of the kind
this family's conversion gets wrong (the HF config and tensors stay right)."""
from __future__ import annotations

import dataclasses

from bridges.core.mappings import StackedGatedMLP
from bridges.models.gpt_oss.gpt_oss_bridge import GptOssBridge, InterleavedGateUp


class SinksDropped(GptOssBridge):
    """Attention sinks ignored: a plain softmax, the HF ``sinks`` put on the ignore list."""
    ignored_hf = GptOssBridge.ignored_hf + (r".*self_attn\.sinks",)

    def megatron_attrs(self):
        return {**super().megatron_attrs(), "softmax_type": "vanilla"}

    def mappings(self, attrs):
        return [m for m in super().mappings(attrs) if not m.megatron.endswith("softmax_offset")]


class _Halves(InterleavedGateUp):
    """gate_up read as [gate | up] halves of the last dim (the layout of other stacked MoEs)."""

    def _gate_up(self, hf):
        t = hf["gate_up"]
        t = t.transpose(0, 1) if t.dim() == 2 else t
        return t.chunk(2)

    def to_hf(self, shards, shapes):
        t = StackedGatedMLP.to_hf(self, shards, shapes)["gate_up"]
        return {"gate_up": t.transpose(0, 1).contiguous() if t.dim() == 2 else t}


class GateUpNotInterleaved(GptOssBridge):
    """Gate and up taken as the two halves of ``gate_up_proj`` instead of its even / odd columns."""

    def expert_mappings(self, moe):
        return [_Halves(m.megatron, m.hf, layers=m.layers, alternate=m.alternate)
                if isinstance(m, InterleavedGateUp) else m for m in super().expert_mappings(moe)]


class ClampDropped(GptOssBridge):
    """The experts' gated activation without ``swiglu_limit``'s clamp."""

    def megatron_attrs(self):
        return {**super().megatron_attrs(), "activation_func_clamp_value": None}


class YarnTruncated(GptOssBridge):
    """YaRN's correction range rounded to whole dimensions (``truncate: false`` ignored)."""

    def megatron_attrs(self):
        attrs = super().megatron_attrs()
        attrs.pop("yarn_correction_range_round_to_int", None)
        return attrs


class WindowsOnTheWrongLayers(GptOssBridge):
    """The sliding-window and full-attention layers exchanged (``layer_types`` read one off)."""

    def megatron_attrs(self):
        attrs = super().megatron_attrs()
        return {**attrs, "window_attn_skip_freq": [1 - w for w in attrs["window_attn_skip_freq"]]}


class _Doubled:
    """A mapping whose values come in x2 and go out /2: what an E8M0 exponent bias of 126 for
    127 does to MXFP4 values, in a codec that decodes and encodes with the same wrong bias
    (a re-export is then bit-exact: only the imported values are wrong)."""

    def to_megatron(self, hf, tp_rank, tp_size, shapes):
        return super().to_megatron(hf, tp_rank, tp_size, shapes) * 2

    def to_hf(self, shards, shapes):
        return {k: v / 2 for k, v in super().to_hf(shards, shapes).items()}


class MXFP4ScaleOffByOne(GptOssBridge):
    """MXFP4 expert weights decoded and encoded with the E8M0 exponent one too high (bias 126)."""

    def expert_mappings(self, moe):
        out = []
        for m in super().expert_mappings(moe):
            if m.megatron.endswith(("weight", "weight*")):
                m = type(f"Doubled{type(m).__name__}", (_Doubled, type(m)), {})(**{
                    f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.init})
            out.append(m)
        return out
