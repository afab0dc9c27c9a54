"""Deliberately broken Nemotron-H bridges (tests/test_nemotron_h.py): each injects one bug of the
kind hybrid conversions get wrong (the HF config and tensors stay right)."""
from __future__ import annotations

import torch

from bridges.core.mappings import ColumnParallel, Segmented
from bridges.models.nemotron_h.nemotron_h_bridge import NemotronHBridge


class _Permuted(Segmented):
    """The segments read in another order (the same wrong order both ways: the roundtrip holds)."""

    def __init__(self, m: Segmented, order: tuple[int, ...]):
        super().__init__(m.megatron, m.hf, sizes=tuple(m.sizes[i] for i in order), layers=m.layers)
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "true_sizes", m.sizes)

    def to_megatron(self, hf, tp_rank, tp_size, shapes):
        segs = hf[""].split(list(self.true_sizes))
        return super().to_megatron({"": torch.cat([segs[i] for i in self.order])}, tp_rank, tp_size, shapes)

    def to_hf(self, shards, shapes):
        segs = super().to_hf(shards, shapes)[""].split(list(self.sizes))
        back = [None] * len(segs)
        for pos, i in enumerate(self.order):
            back[i] = segs[pos]
        return {"": torch.cat(back)}


def _swap(bridge_mappings, name: str, order: tuple[int, ...]):
    return [_Permuted(m, order) if m.megatron.endswith(name) else m for m in bridge_mappings]


class InProjZXSwapped(NemotronHBridge):
    """in_proj read as x, z, B, C, dt: the gate and the SSM input exchanged."""

    def mappings(self, attrs):
        return _swap(super().mappings(attrs), "mixer.in_proj.weight", (1, 0, 2, 3, 4))


class InProjBCSwapped(NemotronHBridge):
    """in_proj's B and C exchanged (and the conv's, consistently)."""

    def mappings(self, attrs):
        table = _swap(super().mappings(attrs), "mixer.in_proj.weight", (0, 1, 3, 2, 4))
        table = _swap(table, "mixer.conv1d_weight", (0, 2, 1))
        return _swap(table, "mixer.conv1d_bias", (0, 2, 1))


class ConvSplitWhole(NemotronHBridge):
    """The conv over x, B, C split over TP as one tensor, not segment by segment: right at TP1,
    rank 0 gets all of x at TP2 and rank 1 B and C."""

    def mappings(self, attrs):
        return [ColumnParallel(m.megatron, m.hf, layers=m.layers) if "conv1d" in m.megatron else m
                for m in super().mappings(attrs)]


class _AExported(ColumnParallel):
    def to_hf(self, shards, shapes):
        return {"": -torch.exp(super().to_hf(shards, shapes)[""].float()).to(shards[0].dtype)}


class ALogExportedAsA(NemotronHBridge):
    """Export writes A = -exp(A_log) under A_log's name (import right: the logits hold)."""

    def mappings(self, attrs):
        return [_AExported(m.megatron, m.hf, layers=m.layers) if m.megatron.endswith("mixer.A_log") else m
                for m in super().mappings(attrs)]


class DtBiasDropped(NemotronHBridge):
    """dt_bias left out of the table (and its HF tensor ignored): the parameter stays unwritten."""
    ignored_hf = NemotronHBridge.ignored_hf + (r".*mixer\.dt_bias",)

    def mappings(self, attrs):
        return [m for m in super().mappings(attrs) if not m.megatron.endswith("dt_bias")]


class PatternShifted(NemotronHBridge):
    """The layer pattern read one layer late (rotated): every layer of the wrong kind."""

    def megatron_attrs(self):
        a = super().megatron_attrs()
        p = a["hybrid_layer_pattern"]
        return {**a, "hybrid_layer_pattern": p[-1] + p[:-1]}


# -- MoE layers (Nemotron 3: tests/test_nemotron_h.py, on NVIDIA-Nemotron-3-Nano-30B-A3B) ----------
class RoutedScalingDropped(NemotronHBridge):
    """routed_scaling_factor not carried over: the routed experts' weights at 1.0, not 2.5."""

    def megatron_attrs(self):
        a = super().megatron_attrs()
        return {**a, "moe_router_topk_scaling_factor": 1.0}


class ExpertBiasIgnored(NemotronHBridge):
    """The router's score-correction bias skipped (its tensor ignored, Megatron routing without
    an expert bias): the experts are chosen by the bare scores."""

    ignored_hf = NemotronHBridge.ignored_hf + (r".*\.gate\.e_score_correction_bias",)

    def megatron_attrs(self):
        return {**super().megatron_attrs(), "moe_router_enable_expert_bias": False}

    def mappings(self, attrs):
        return [m for m in super().mappings(attrs) if not m.megatron.endswith("router.expert_bias")]


class ExpertsRotated(NemotronHBridge):
    """Megatron's expert e reads HF's expert e + 1 (and is written back there): every tensor used
    once, every shape right."""

    def mappings(self, attrs):
        n = attrs["num_moe_experts"]
        out = []
        for m in super().mappings(attrs):
            if ".experts." in m.megatron and ".shared_experts." not in m.megatron:
                class Rotated(type(m)):
                    def hf_names(self, captures):
                        return super().hf_names((captures[0], str((int(captures[1]) + 1) % n), *captures[2:]))

                m = Rotated(m.megatron, m.hf, layers=m.layers, alternate=m.alternate)
            out.append(m)
        return out


# -- Nemotron 3 Super: latent MoE and MTP (tests/test_nemotron_h.py) -----------------------------
class MtpIndexNotFlattened(NemotronHBridge):
    """The MTP blocks read HF's ``mtp.layers.<depth>`` (the nested index), not the flattened
    ``<depth * len(pattern) + j>``: every block of the depth reads block 0."""

    def mtp_mappings(self, table, attrs):
        out = super().mtp_mappings(table, attrs)
        for m in out:
            object.__setattr__(m, "flat", (1, 0))
        return out


class MtpNormsSwapped(NemotronHBridge):
    """The MTP's enorm reads HF's hnorm and the other way round (both [h]; the same swap on
    export: the roundtrip holds, the main model is untouched)."""

    def mtp_mappings(self, table, attrs):
        out = super().mtp_mappings(table, attrs)
        swap = {"enorm.weight": "hnorm.weight", "hnorm.weight": "enorm.weight"}
        for m in out:
            for a, b in swap.items():
                if m.megatron.endswith("." + a):
                    object.__setattr__(m, "hf", m.hf[:-len(a)] + b)
        return out


class LatentFromMtp(NemotronHBridge):
    """The first MoE layer's latent projections read from the MTP's MoE block, and the MTP's from
    that layer's: every tensor used once, every shape right."""

    def mappings(self, attrs):
        out = super().mappings(attrs)
        latent = [m for m in out if "latent_proj" in m.megatron]
        for a in (m for m in latent if m.megatron.startswith("decoder.")):
            b = next(m for m in latent if m.megatron.startswith("mtp.") and m.megatron[-20:] == a.megatron[-20:])
            here, there = a.hf.replace("*", str(a.layers[0]), 1), b.hf_names(("0",))[""]
            object.__setattr__(a, "hf", there)
            object.__setattr__(a, "layers", a.layers[:1])
            object.__setattr__(b, "hf", here)
        return out
