"""Qwen3-Next's pieces on Megatron-Core: the gated delta net without flash-linear-attention, its
plain output norm, and the two fused projections whose HF layout groups rows by head.

- ``install_torch_gdn()``: Megatron-Core's GatedDeltaNet with ``deterministic_mode`` runs torch's
  conv and its own torch chunked delta rule; only fla's ``l2norm`` (and the import check) stand
  in here. ``gdn_path()`` says whether fla is installed; the bridge keeps deterministic mode
  (the torch delta rule) either way: on an H200 with fla 0.6.0 its Triton kernels did not get
  through one toy case of the suite in 240 s (compiling), and the torch path is the checked one.
- ``GDNInProj``: HF ``in_proj_qkvz`` holds, per key head, [q, k, v x ratio, z x ratio] rows and
  ``in_proj_ba`` [b x ratio, a x ratio]; Megatron's in_proj is the sections q, k, v, z, beta,
  alpha, each split over TP on its own.
- ``GatedQKV``: HF ``q_proj`` holds per head [query, gate]; Megatron's gated attention holds per
  query group [queries, gates, key, value].
"""
from __future__ import annotations

import torch

from bridges.core.mappings import Mapping, MappingError
from bridges.models.gemma.modeling_gemma import ZeroCenteredRMSNorm


def gdn_path() -> str:
    import importlib.util

    return "fla" if importlib.util.find_spec("fla") else "torch"


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim, in fp32 (fla's and HF's l2norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(dim, keepdim=True) + eps)).to(x.dtype)


def install_torch_gdn() -> str:
    from megatron.core.ssm.gated_delta_net import common

    if gdn_path() == "fla":
        return "fla"
    common.l2norm, common.HAVE_FLA = l2norm, True  # the module refuses to build without it
    return "torch"


class PlainRMSNorm(ZeroCenteredRMSNorm):
    """RMSNorm with its weight as is (the gated delta net's output norm), in a model whose other
    norms are zero-centred."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kw):
        super().__init__(config, hidden_size, eps, **kw)
        self.offset = 0.0


class GDNInProj(Mapping):
    """``in_proj_qkvz`` + ``in_proj_ba`` (rows grouped per key head) <-> Megatron's in_proj
    sections q, k, v, z, beta, alpha, each split over TP on its own."""

    kind = "gdn_in_proj"
    tp_dim = 0

    def __init__(self, megatron: str, hf: dict[str, str], dims: tuple[int, int, int, int], **kwargs):
        super().__init__(megatron, hf, **kwargs)
        object.__setattr__(self, "dims", tuple(dims))  # key heads, value heads, key dim, value dim

    def _sections(self, hf):
        nk, nv, dk, dv = self.dims
        r = nv // nk
        qkvz, ba = hf["qkvz"], hf["ba"]
        h = qkvz.shape[-1]
        if qkvz.shape[0] != nk * (2 * dk + 2 * r * dv) or ba.shape[0] != 2 * nv:
            raise MappingError(f"{self.hf['qkvz']} {tuple(qkvz.shape)} / {self.hf['ba']} {tuple(ba.shape)} do not "
                               f"fit {nk} key heads of {dk}, {nv} value heads of {dv}")
        q, k, v, z = qkvz.view(nk, -1, h).split([dk, dk, r * dv, r * dv], dim=1)
        b, a = ba.view(nk, 2 * r, h).split([r, r], dim=1)
        return [t.reshape(-1, h) for t in (q, k, v, z, b, a)]

    def to_megatron(self, hf, tp_rank, tp_size, shapes):
        secs = self._sections(hf)
        if any(s.shape[0] % tp_size for s in secs):
            raise MappingError(f"{self.megatron}: sections {[s.shape[0] for s in secs]} do not divide by TP={tp_size}")
        return torch.cat([s.chunk(tp_size)[tp_rank] for s in secs])

    def _unshard(self, shards) -> list[torch.Tensor]:
        """The whole sections q, k, v, z, beta, alpha from the TP shards of in_proj."""
        nk, nv, dk, dv = self.dims
        tp = len(shards)
        sizes = [nk * dk // tp, nk * dk // tp, nv * dv // tp, nv * dv // tp, nv // tp, nv // tp]
        parts = [s.split(sizes) for s in shards]
        return [torch.cat([p[i] for p in parts]) for i in range(6)]

    def to_hf(self, shards, shapes):
        nk, nv, dk, dv = self.dims
        r = nv // nk
        q, k, v, z, b, a = self._unshard(shards)
        h = q.shape[-1]
        qkvz = torch.cat([q.view(nk, dk, h), k.view(nk, dk, h), v.view(nk, r * dv, h), z.view(nk, r * dv, h)], 1)
        ba = torch.cat([b.view(nk, r, h), a.view(nk, r, h)], 1)
        return {"qkvz": qkvz.reshape(-1, h), "ba": ba.reshape(-1, h)}

    def describe(self) -> dict:
        return {**super().describe(), "dims": list(self.dims)}


class GatedQKV(Mapping):
    """``q_proj`` ([query, gate] per head), ``k_proj``, ``v_proj`` <-> Megatron's gated
    ``linear_qkv``: per query group [queries, gates, key, value], groups split over TP."""

    kind = "gated_qkv"
    tp_dim = 0

    def _merge(self, hf, shapes):
        n, g, d = shapes.num_attention_heads, shapes.num_query_groups, shapes.kv_channels
        qg, k, v = hf["q"], hf["k"], hf["v"]
        h = qg.shape[-1]
        if qg.shape[0] != 2 * n * d or k.shape[0] != g * d or v.shape[0] != g * d:
            raise MappingError(f"{self.hf['q']} {tuple(qg.shape)}: expected {2 * n * d} rows ([query, gate] x {n} "
                               f"heads of {d}); k/v {g * d}")
        q, gate = qg.view(n, 2, d, h).unbind(1)
        per = n // g
        rows = [torch.cat([q.reshape(g, per * d, h)[i], gate.reshape(g, per * d, h)[i], k.view(g, d, h)[i],
                           v.view(g, d, h)[i]]) for i in range(g)]
        return torch.cat(rows)

    def _unmerge(self, full, shapes):
        n, g, d = shapes.num_attention_heads, shapes.num_query_groups, shapes.kv_channels
        per, h = n // g, full.shape[-1]
        q, gate, k, v = full.view(g, (2 * per + 2) * d, h).split([per * d, per * d, d, d], dim=1)
        qg = torch.stack([q.reshape(n, d, h), gate.reshape(n, d, h)], dim=1).reshape(2 * n * d, h)
        return {"q": qg, "k": k.reshape(g * d, h), "v": v.reshape(g * d, h)}
