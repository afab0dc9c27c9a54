"""Parameter mappings: one HF tensor group <-> one Megatron parameter, both directions, TP-aware.

A mapping converts full HF tensors into *this TP rank's shard* of a Megatron parameter
(``to_megatron``), and the list of *all TP shards* back into full HF tensors (``to_hf``).
For every mapping, ``to_hf([to_megatron(x, r) for r in ranks]) == x`` exactly.

Names are patterns: ``*`` stands for a layer or expert index (Megatron-side global index; the
same value on the HF side). ``hf`` is one pattern, or a dict role -> pattern for fused
parameters. An HF pattern ending in ``[*]`` names one row (dim 0) of a stacked tensor, as
transformers stores experts (``mlp.experts.gate_up_proj[*]``: expert ``*`` of ``[E, 2I, H]``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from bridges.core.errors import MBridgeError


class MappingError(MBridgeError, ValueError):
    """A tensor does not fit its mapping (shape, divisibility); the message names it."""


@dataclass(frozen=True)
class Shapes:
    """Model dimensions the fused mappings need."""

    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int = 0
    padded_vocab_size: int = 0


@dataclass(frozen=True)
class Mapping:
    megatron: str
    hf: str | dict[str, str]
    # The global layer indices this mapping applies to (None: all); e.g. dense-first layers.
    layers: tuple[int, ...] | None = None
    # Another Megatron layout of HF tensors an earlier mapping names (e.g. grouped-GEMM
    # experts): used where the model has it, skipped when listing the model's tensors.
    alternate: bool = False
    # Megatron layers per HF layer (a hybrid stack that splits each HF layer into a mixer layer
    # and an MLP layer: 2); the HF layer index is the Megatron one divided by it.
    layer_stride: int = 1
    kind: ClassVar[str] = "direct"
    tp_dim: ClassVar[int | None] = None

    # -- naming --------------------------------------------------------------------------
    @property
    def roles(self) -> dict[str, str]:
        return self.hf if isinstance(self.hf, dict) else {"": self.hf}

    def regex(self) -> re.Pattern:
        return _compile(self.megatron)

    def hf_names(self, captures: tuple[str, ...]) -> dict[str, str]:
        if self.layer_stride != 1 and captures:
            captures = (str(int(captures[0]) // self.layer_stride), *captures[1:])
        return {role: _fill(pat, captures) for role, pat in self.roles.items()}

    # -- conversion ----------------------------------------------------------------------
    def to_megatron(self, hf: dict[str, torch.Tensor], tp_rank: int, tp_size: int,
                    shapes: Shapes) -> torch.Tensor:
        return self._split(self._merge(hf, shapes), tp_rank, tp_size, shapes)

    def shard_view(self, hf: dict[str, torch.Tensor], tp_rank: int, tp_size: int,
                   shapes: Shapes) -> torch.Tensor:
        """``to_megatron``, except that the result may be a view of the HF tensors: for a
        caller that copies it into the parameter at once (``load_hf_weights``), one copy less.
        A subclass with its own ``to_megatron`` or ``_split`` gets ``to_megatron``."""
        cls = type(self)
        if cls.to_megatron is not Mapping.to_megatron or cls._split is not Mapping._split:
            return self.to_megatron(hf, tp_rank, tp_size, shapes)
        return self._split_view(self._merge(hf, shapes), tp_rank, tp_size, shapes)

    def copy_into(self, param: torch.Tensor, hf: dict[str, torch.Tensor], tp_rank: int,
                  tp_size: int, shapes: Shapes) -> None:
        """Write this rank's shard into ``param`` (``load_hf_weights``): ``to_megatron`` without
        a tensor of its own, each part copied straight from the HF tensors (converting the
        dtype as it goes). A shard that is not the parameter's shape is a MappingError, and
        then ``param`` is left as it was."""
        shard = self.shard_view(hf, tp_rank, tp_size, shapes)
        _fits(param, shard.shape, tp_rank, tp_size)
        param.copy_(shard)

    def to_hf(self, shards: list[torch.Tensor], shapes: Shapes) -> dict[str, torch.Tensor]:
        return self._unmerge(self._gather(shards, shapes), shapes)

    # full-tensor fuse / unfuse (identity unless fused)
    def _merge(self, hf: dict[str, torch.Tensor], shapes: Shapes) -> torch.Tensor:
        return hf[""]

    def _unmerge(self, full: torch.Tensor, shapes: Shapes) -> dict[str, torch.Tensor]:
        return {"": full}

    # TP split / gather (replicated unless tp_dim is set)
    def _split(self, full, tp_rank, tp_size, shapes):
        part = self._split_view(full, tp_rank, tp_size, shapes)
        return part if self.tp_dim is None else part.clone()  # a shard of its own

    def _split_view(self, full, tp_rank, tp_size, shapes):
        if self.tp_dim is None:
            return full
        n = full.shape[self.tp_dim]
        if n % tp_size:
            raise MappingError(f"{self.megatron}: dimension {self.tp_dim} of size {n} does not "
                               f"divide by TP={tp_size}")
        return full.chunk(tp_size, dim=self.tp_dim)[tp_rank]

    def _gather(self, shards, shapes):
        if self.tp_dim is None or len(shards) == 1:
            return shards[0]
        joined = _joined(shards, self.tp_dim)
        return joined if joined is not None else torch.cat(shards, dim=self.tp_dim)

    def describe(self) -> dict:
        d = {"megatron": self.megatron, "hf": self.hf, "kind": self.kind, "tp_dim": self.tp_dim}
        if self.layers is not None:
            d["layers"] = list(self.layers)
        if self.layer_stride != 1:
            d["layer_stride"] = self.layer_stride
        return {**d, "alternate": True} if self.alternate else d


class Replicated(Mapping):
    """Same full tensor on every TP rank (norms, row-parallel biases)."""

    kind = "replicated"


class ColumnParallel(Mapping):
    """Split along the output dimension (dim 0)."""

    kind = "column"
    tp_dim = 0


class RowParallel(Mapping):
    """Split along the input dimension (dim 1)."""

    kind = "row"
    tp_dim = 1


class VocabParallel(Mapping):
    """Embedding / output layer: pad vocab rows to a TP-divisible size, split dim 0.

    Padding rows are zeros on import and dropped on export.
    """

    kind = "vocab"
    tp_dim = 0

    def _merge(self, hf, shapes):
        w = hf[""]
        if w.shape[0] != shapes.vocab_size:
            raise MappingError(f"{self.hf}: {w.shape[0]} rows, config vocab_size is "
                               f"{shapes.vocab_size}")
        pad = shapes.padded_vocab_size - w.shape[0]
        return torch.cat([w, w.new_zeros((pad, *w.shape[1:]))]) if pad > 0 else w

    def _unmerge(self, full, shapes):
        return {"": full[: shapes.vocab_size]}

    def shard_view(self, hf, tp_rank, tp_size, shapes):
        """The rank's rows without padding the whole tensor first: a view of the HF rows, with
        zero rows appended only on the rank that holds padding."""
        w = hf[""]
        if w.shape[0] != shapes.vocab_size:
            return self.to_megatron(hf, tp_rank, tp_size, shapes)  # raises, naming the tensor
        n = shapes.padded_vocab_size
        if n % tp_size or n < w.shape[0]:
            return self.to_megatron(hf, tp_rank, tp_size, shapes)
        lo, hi = tp_rank * (n // tp_size), (tp_rank + 1) * (n // tp_size)
        part = w[min(lo, w.shape[0]):min(hi, w.shape[0])]
        if hi <= w.shape[0]:
            return part
        return torch.cat([part, w.new_zeros((hi - max(lo, w.shape[0]), *w.shape[1:]))])

    def copy_into(self, param, hf, tp_rank, tp_size, shapes):
        """The rank's rows, then zeros for its padding rows: no padded copy of the shard."""
        w, n = hf[""], shapes.padded_vocab_size
        if (type(self).shard_view is not VocabParallel.shard_view or w.shape[0] != shapes.vocab_size
                or n % tp_size or n < w.shape[0]):
            return super().copy_into(param, hf, tp_rank, tp_size, shapes)
        lo, hi = tp_rank * (n // tp_size), (tp_rank + 1) * (n // tp_size)
        part = w[min(lo, w.shape[0]):min(hi, w.shape[0])]
        _fits(param, (hi - lo, *w.shape[1:]), tp_rank, tp_size)
        param[:part.shape[0]].copy_(part)
        param[part.shape[0]:].zero_()


class QKV(Mapping):
    """Fused QKV, grouped-query interleave: per query group [q heads..., k, v] along dim 0.

    TP splits whole query groups. Works for weights ([out, in]) and biases ([out]).
    """

    kind = "qkv"
    tp_dim = 0

    def _merge(self, hf, shapes):
        q, k, v, g, per, d = self._checked(hf, shapes)
        rest = q.shape[1:]
        return torch.cat([q.reshape(g, per * d, *rest), k.reshape(g, d, *rest),
                          v.reshape(g, d, *rest)], dim=1).reshape(-1, *rest)

    def _checked(self, hf, shapes):
        """(q, k, v, groups, heads per group, head dim), shapes checked against the config."""
        q, k, v = hf["q"], hf["k"], hf["v"]
        g, d = shapes.num_query_groups, shapes.kv_channels
        if shapes.num_attention_heads % g:
            raise MappingError(f"{self.megatron}: {shapes.num_attention_heads} heads do not "
                               f"divide into {g} KV groups")
        per = shapes.num_attention_heads // g
        for role, t in (("k", k), ("v", v)):
            if t.shape[1:] != q.shape[1:]:
                raise MappingError(f"{self.hf[role]}: shape {tuple(t.shape)} does not match "
                                   f"{self.hf['q']} {tuple(q.shape)} beyond dim 0")
        for role, t, rows in (("q", q, g * per * d), ("k", k, g * d), ("v", v, g * d)):
            if t.shape[0] != rows:
                raise MappingError(f"{self.hf[role]}: dim 0 is {t.shape[0]}, expected {rows} "
                                   f"({shapes.num_attention_heads} heads, {g} KV groups, "
                                   f"head_dim {d})")
        return q, k, v, g, per, d

    def copy_into(self, param, hf, tp_rank, tp_size, shapes):
        """The rank's query groups, q / k / v rows copied into place: no fused copy."""
        if type(self)._merge is not QKV._merge or type(self)._split_view is not QKV._split_view:
            return super().copy_into(param, hf, tp_rank, tp_size, shapes)
        q, k, v, g, per, d = self._checked(hf, shapes)
        if g % tp_size:
            raise MappingError(f"{self.megatron}: {g} KV groups do not divide by TP={tp_size}")
        lo, hi, rest = tp_rank * g // tp_size, (tp_rank + 1) * g // tp_size, q.shape[1:]
        _fits(param, ((hi - lo) * (per + 2) * d, *rest), tp_rank, tp_size)
        dst = param.view(hi - lo, (per + 2) * d, *rest)
        dst[:, :per * d].copy_(q.reshape(g, per * d, *rest)[lo:hi])
        dst[:, per * d:(per + 1) * d].copy_(k.reshape(g, d, *rest)[lo:hi])
        dst[:, (per + 1) * d:].copy_(v.reshape(g, d, *rest)[lo:hi])

    def _split_view(self, full, tp_rank, tp_size, shapes):
        if shapes.num_query_groups % tp_size:
            raise MappingError(f"{self.megatron}: {shapes.num_query_groups} KV groups do not "
                               f"divide by TP={tp_size}")
        return super()._split_view(full, tp_rank, tp_size, shapes)

    def _unmerge(self, full, shapes):
        g, d = shapes.num_query_groups, shapes.kv_channels
        per = shapes.num_attention_heads // g
        rest = full.shape[1:]
        q, k, v = full.reshape(g, (per + 2) * d, *rest).split([per * d, d, d], dim=1)
        return {"q": q.reshape(-1, *rest), "k": k.reshape(-1, *rest), "v": v.reshape(-1, *rest)}


class FusedQKV(QKV):
    """QKV that HF stores as one tensor ``qkv``: all query heads, then all key heads, then all
    value heads along dim 0 ([q; k; v], not interleaved per group: Phi-3's ``qkv_proj``).
    Split by the config's sizes, then interleaved per query group as ``QKV`` does."""

    kind = "qkv_fused"

    def _checked(self, hf, shapes):
        qkv = hf["qkv"]
        heads, g, d = shapes.num_attention_heads, shapes.num_query_groups, shapes.kv_channels
        if heads % g:
            raise MappingError(f"{self.megatron}: {heads} heads do not divide into {g} KV groups")
        rows = (heads + 2 * g) * d
        if qkv.shape[0] != rows:
            raise MappingError(f"{self.hf['qkv']}: dim 0 is {qkv.shape[0]}, expected {rows} "
                               f"([q; k; v]: {heads} query heads + 2 x {g} KV heads, head_dim {d})")
        q, k, v = qkv.split([heads * d, g * d, g * d])
        return q, k, v, g, heads // g, d

    def _unmerge(self, full, shapes):
        parts = super()._unmerge(full, shapes)
        return {"qkv": torch.cat([parts["q"], parts["k"], parts["v"]])}


class GatedMLP(Mapping):
    """Fused gate/up (linear_fc1): each TP shard is [gate_shard; up_shard].

    So the full fused tensor's layout depends on TP; the split is done per role.
    """

    kind = "gated_mlp"
    tp_dim = 0

    def to_megatron(self, hf, tp_rank, tp_size, shapes):
        return torch.cat(self._parts(hf, tp_rank, tp_size))

    def _gate_up(self, hf):
        return hf["gate"], hf["up"]

    def _parts(self, hf, tp_rank, tp_size):
        """The rank's (gate, up) rows, as views of the HF tensors."""
        gate, up = self._gate_up(hf)
        if gate.shape != up.shape:
            raise MappingError(f"{self.hf['gate']} {tuple(gate.shape)} and {self.hf['up']} "
                               f"{tuple(up.shape)} differ in shape")
        if gate.shape[0] % tp_size:
            raise MappingError(f"{self.roles.get('gate', self.roles.get('gate_up'))}: "
                               f"{gate.shape[0]} rows do not divide by TP={tp_size}")
        return gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]

    def copy_into(self, param, hf, tp_rank, tp_size, shapes):
        """Gate rows, then up rows, copied into place: no fused copy."""
        if type(self).to_megatron is not GatedMLP.to_megatron:
            return super().copy_into(param, hf, tp_rank, tp_size, shapes)
        gate, up = self._parts(hf, tp_rank, tp_size)
        _fits(param, (2 * gate.shape[0], *gate.shape[1:]), tp_rank, tp_size)
        param[:gate.shape[0]].copy_(gate)
        param[gate.shape[0]:].copy_(up)

    def to_hf(self, shards, shapes):
        if any(s.shape[0] % 2 for s in shards):
            raise MappingError(f"{self.megatron}: a TP shard has an odd row count "
                               f"{[s.shape[0] for s in shards]}; expected [gate; up] halves")
        halves = [s.chunk(2) for s in shards]
        if len(halves) == 1:  # TP1: views of the parameter, no copy
            return {"gate": halves[0][0], "up": halves[0][1]}
        return {"gate": torch.cat([h[0] for h in halves]), "up": torch.cat([h[1] for h in halves])}


class FusedGatedMLP(GatedMLP):
    """linear_fc1 from one HF tensor ``gate_up`` holding [gate; up] halves along dim 0 (Phi-3's
    ``mlp.gate_up_proj``; as a row of stacked experts, ``StackedGatedMLP``). TP shards are
    [gate_shard; up_shard], as for ``GatedMLP``."""

    kind = "gated_mlp_fused"

    def _gate_up(self, hf):
        gate_up = hf["gate_up"]
        if gate_up.shape[0] % 2:
            raise MappingError(f"{self.hf['gate_up']}: {gate_up.shape[0]} rows, expected "
                               f"[gate; up] halves")
        return gate_up.chunk(2)

    def to_hf(self, shards, shapes):
        out = super().to_hf(shards, shapes)
        return {"gate_up": torch.cat([out["gate"], out["up"]])}


class StackedGatedMLP(FusedGatedMLP):
    """linear_fc1 of one expert from a stacked HF ``gate_up_proj`` row ([gate; up] halves)."""

    kind = "gated_mlp_stacked"


class Segmented(ColumnParallel):
    """One HF tensor of consecutive segments along dim 0 (``sizes`` rows each: Mamba-2's in_proj
    z, x, B, C, dt; its conv over x, B, C), each split over TP on its own: a rank holds its
    slice of every segment, in order. Megatron-Core's fused hybrid projections are laid out so."""

    kind = "segmented"

    def __init__(self, megatron: str, hf: str, sizes: tuple[int, ...], **kwargs):
        super().__init__(megatron, hf, **kwargs)
        object.__setattr__(self, "sizes", tuple(int(n) for n in sizes))

    def _check(self, rows: int, tp_size: int) -> None:
        if sum(self.sizes) != rows:
            raise MappingError(f"{self.hf}: {rows} rows, the segments {list(self.sizes)} add up to "
                               f"{sum(self.sizes)}")
        if any(n % tp_size for n in self.sizes):
            raise MappingError(f"{self.megatron}: segments {list(self.sizes)} do not all divide by TP={tp_size}")

    def to_megatron(self, hf, tp_rank, tp_size, shapes):
        full = hf[""]
        self._check(full.shape[0], tp_size)
        return torch.cat([seg.chunk(tp_size)[tp_rank] for seg in full.split(list(self.sizes))])

    def to_hf(self, shards, shapes):
        tp = len(shards)
        for s in shards:
            self._check(s.shape[0] * tp, tp)
        per_rank = [s.split([n // tp for n in self.sizes]) for s in shards]
        return {"": torch.cat([torch.cat([r[i] for r in per_rank]) for i in range(len(self.sizes))])}

    def describe(self) -> dict:
        return {**super().describe(), "segments": list(self.sizes)}


@dataclass(frozen=True)
class TiedOutput(VocabParallel):
    """Output layer that shares the embedding's HF tensor (tie_word_embeddings, PP > 1 keeps a
    copy on the last stage). Not exported: the embedding already writes the HF tensor."""

    kind = "tied_vocab"
    export: bool = field(default=False)


def _fits(param: torch.Tensor, shape, tp_rank: int, tp_size: int) -> None:
    if tuple(shape) != tuple(param.shape):
        raise MappingError(f"gives shape {tuple(shape)}, parameter is {tuple(param.shape)} "
                           f"(TP rank {tp_rank}/{tp_size})")


def _joined(shards: list[torch.Tensor], dim: int = 0) -> torch.Tensor | None:
    """``torch.cat(shards, dim)`` without a copy when the shards already are consecutive parts
    along ``dim`` of one contiguous tensor (an exporter that gathers into one tensor's chunks);
    else None."""
    first = shards[0]
    shape = list(first.shape)
    shape[dim] *= len(shards)
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    step = first.shape[dim] * strides[dim] * first.element_size()
    ptr = first.untyped_storage().data_ptr()
    for i, s in enumerate(shards):
        if (s.shape != first.shape or s.dtype != first.dtype or s.stride() != tuple(strides)
                or s.untyped_storage().data_ptr() != ptr or s.data_ptr() != first.data_ptr() + i * step):
            return None
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), shape)


# -- name patterns --------------------------------------------------------------------------
_cache: dict[str, re.Pattern] = {}


def _compile(pattern: str) -> re.Pattern:
    if pattern not in _cache:
        _cache[pattern] = re.compile("^" + re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
    return _cache[pattern]


ROW = re.compile(r"^(.*)\[(\d+)\]$")


def split_row(name: str) -> tuple[str, int | None]:
    """``'a.b[3]'`` -> ``('a.b', 3)``; a plain name -> ``(name, None)``."""
    m = ROW.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


def _fill(pattern: str, captures: tuple[str, ...]) -> str:
    it = iter(captures)
    return re.sub(r"\*", lambda _: next(it), pattern)


def match(mappings: list[Mapping], name: str) -> tuple[Mapping, tuple[str, ...]] | None:
    """The mapping whose Megatron pattern matches ``name``, with the wildcard captures."""
    for m in mappings:
        hit = m.regex().match(name)
        if hit and (m.layers is None or int(hit.group(1)) in m.layers):
            return m, hit.groups()
    return None
