"""Deliberately broken Phi-3 bridges: one bug each in the fused mappings (test_phi3.py checks
that the suite catches every one). Each is consistent both ways, so a roundtrip cannot see it."""
from __future__ import annotations

import torch

from bridges.core import mappings as M
from bridges.models.phi3.phi3_bridge import Phi3Bridge


def _swap(table, suffix, cls, role=None):
    """``table`` with the mapping of Megatron ``suffix`` made a ``cls`` (of the HF ``role`` alone:
    a plain, unfused mapping of the fused tensor)."""
    return [cls(m.megatron, m.hf[role] if role else m.hf) if m.megatron.endswith(suffix) else m
            for m in table]


class _KQVFused(M.FusedQKV):
    """Reads qkv_proj as [k; q; v]: the key rows taken for the queries and back."""

    def _checked(self, hf, shapes):
        q, k, v, g, per, d = super()._checked(hf, shapes)
        fused = hf["qkv"]
        k2, q2 = fused[:g * d], fused[g * d:g * d + g * per * d]
        return q2, k2, v, g, per, d

    def _unmerge(self, full, shapes):
        parts = M.QKV._unmerge(self, full, shapes)
        return {"qkv": torch.cat([parts["k"], parts["q"], parts["v"]])}


class Phi3QKSwapped(Phi3Bridge):
    """qkv_proj read as [k; q; v]: the query rows taken from the keys and back."""

    def mappings(self, attrs):
        return _swap(super().mappings(attrs), "linear_qkv.weight", _KQVFused)


class _AsInterleaved(M.ColumnParallel):
    """Takes qkv_proj for Megatron's per-group interleaved layout as it is (no regrouping)."""


class Phi3QKVNotRegrouped(Phi3Bridge):
    """qkv_proj ([q; k; v] blocks) copied as it is into Megatron's per-group interleaved layout."""

    def mappings(self, attrs):
        return _swap(super().mappings(attrs), "linear_qkv.weight", _AsInterleaved, "qkv")


class _UpGate(M.FusedGatedMLP):
    def _gate_up(self, hf):
        gate, up = super()._gate_up(hf)
        return up, gate

    def to_hf(self, shards, shapes):
        out = super().to_hf(shards, shapes)
        up, gate = out["gate_up"].chunk(2)
        return {"gate_up": torch.cat([gate, up])}


class Phi3GateUpSwapped(Phi3Bridge):
    """gate_up_proj's halves taken as [up; gate]."""

    def mappings(self, attrs):
        return _swap(super().mappings(attrs), "linear_fc1.weight", _UpGate)


class _FusedFC1Unsplit(M.ColumnParallel):
    """Splits gate_up_proj by TP as one tensor: rank 0 gets all the gate rows (right only at TP1)."""


class Phi3GateUpNaiveTP(Phi3Bridge):
    """gate_up_proj split over TP as one tensor (each rank a contiguous block, not its share of
    gate and of up)."""

    def mappings(self, attrs):
        return _swap(super().mappings(attrs), "linear_fc1.weight", _FusedFC1Unsplit, "gate_up")
