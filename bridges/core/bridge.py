"""The Bridge base class: config translation, weight import and export for one model family.

A family subclasses a base (``GPTBridge`` for GPT-style decoders) and declares its config table,
its mapping table and, where Megatron-Core lacks a block, its own modules. Import and export
walk the model chunks of this rank and apply the mapping table; the layer renumbering for PP and
VPP happens here, in ``_global_name``.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from typing import Any, ClassVar, Iterator

import torch
import torch.distributed as dist

from bridges.core.config import ConfigError, Field, get_path, translate, untranslate
from bridges.core.codecs import CheckpointView
from bridges.core.hf_io import QUANT_FILES, CheckpointError, HFCheckpoint, save_hf_checkpoint
from bridges.core.outdir import claim_checked
from bridges.core.ledger import CoverageError, Ledger
from bridges.core.mappings import (Mapping, MappingError, Shapes, TiedOutput, _compile, _fill, match,
                                   split_row)


def unwrap(chunk):
    """Strip the training wrappers (Megatron's DDP and Float16Module, torch's DDP); a model of
    any shape inside them (a GPTModel, a VLM holding ``language_model``) is returned as it is."""
    while hasattr(chunk, "module") and type(chunk).__name__ in _WRAPPERS:
        chunk = chunk.module
    return chunk


_WRAPPERS = ("DistributedDataParallel", "Float16Module", "FullyShardedDataParallel")


class NonFiniteWeightWarning(UserWarning):
    """``load_hf_weights(strict=False)`` read HF tensors holding NaN or Inf; names them."""


def _nonfinite(t: torch.Tensor) -> str | None:
    """None when every value of ``t`` is finite, else a short count ("2 NaN, 1 Inf of 96").

    The common path is one ``torch.isfinite(t.sum())``: a finite sum proves every value finite
    (NaN and Inf propagate through addition), costs one read of the tensor and, unlike
    ``torch.isfinite(t).all()``, no boolean copy: 1.6 ms instead of 57 ms for a 4096x4096 fp32
    tensor on one CPU thread. Only when the sum is not finite (a NaN/Inf, or a sum that
    overflows) is the exact element-wise check run, and the values counted.
    """
    if not (t.is_floating_point() or t.is_complex()):
        return None
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # no isfinite / sum kernels
        t = t.to(torch.float16)  # exact for both formats
    if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
        return None
    nan = int(torch.isnan(t).sum())
    return f"{nan} NaN, {int(torch.isinf(t).sum())} Inf of {t.numel()} values"


# the first "<prefix>layers.<i>." of a name: decoder, vision tower, MTP block, under any prefix
_LAYER = re.compile(r"^((?:\w+\.)*?layers\.)(\d+)(\..*)$")
# an expert's local index: sequential (local_experts.<e>.) and grouped GEMM (weight<e>) layouts
_EXPERT = re.compile(r"^(.*\.mlp\.experts)(\.(?:local_experts\.|linear_fc[12]\.(?:weight|bias)))(\d+)(.*)$")


def _global_name(chunk, local_name: str) -> str:
    """Local parameter name in a chunk -> the name with global layer and expert indices.

    Layers of a ``TransformerBlock`` or ``HybridStack`` (a decoder, a vision encoder, under any prefix) are
    renumbered from their ``layer_number`` (global under PP / VPP); other layer lists (the MTP
    block, which lives whole on the last stage) keep their index. An EP rank's local experts
    are renumbered from its expert-parallel rank, wherever the experts sit (decoder or MTP)."""
    name = local_name
    m = _LAYER.match(name)
    if m:
        owner = chunk.get_submodule(m.group(1)[:-len("layers.")].rstrip("."))
        layer = owner.layers[int(m.group(2))]
        if {"TransformerBlock", "HybridStack"} & {c.__name__ for c in type(owner).__mro__}:
            name = f"{m.group(1)}{layer.layer_number - 1}{m.group(3)}"
    e = _EXPERT.match(local_name)
    if e:
        from megatron.core import parallel_state as ps

        experts = chunk.get_submodule(e.group(1))
        first = ps.get_expert_model_parallel_rank() * experts.num_local_experts
        ge = _EXPERT.match(name)
        name = f"{ge.group(1)}{ge.group(2)}{first + int(ge.group(3))}{ge.group(4)}"
    return name


def prefixed(table: list[Mapping], megatron: str = "", hf=None) -> list[Mapping]:
    """``table`` for a model held under a prefix: ``megatron`` before every Megatron name,
    ``hf(name)`` for every HF name (e.g. a VLM's language table is its text table, prefixed).
    A copy of each mapping, renamed: the attributes a mapping sets beside its fields (a
    segmented or gated-delta-net projection's sizes) stay."""
    import copy

    rename = hf or (lambda n: n)
    out = []
    for m in table:
        m = copy.copy(m)
        object.__setattr__(m, "megatron", megatron + m.megatron)
        object.__setattr__(m, "hf", {r: rename(n) for r, n in m.hf.items()} if isinstance(m.hf, dict)
                           else rename(m.hf))
        out.append(m)
    return out


def is_expert(name: str) -> bool:
    """Routed-expert parameters: split over the expert TP group, spread over EP ranks."""
    return ".mlp.experts." in name


class Bridge:
    """Base class. Subclasses set ``config_fields`` and implement ``mappings`` and
    ``build_model``."""

    model_type: ClassVar[str] = ""
    architectures: ClassVar[tuple[str, ...]] = ()
    config_fields: ClassVar[tuple[Field, ...]] = ()
    # The transformers model type that reads this family's config and builds its HF model,
    # when transformers does not know ``model_type`` itself (None: ``model_type``).
    hf_model_type: ClassVar[str | None] = None
    # ``auto_map`` entries of this family's published configs (e.g.
    # "modeling_deepseek.DeepseekV3ForCausalLM") whose code transformers implements natively
    # (as ``hf_model_type``): such a config needs no trust_remote_code, as nothing of the
    # repository's code is used. Any other auto_map entry still does.
    ported_remote_code: ClassVar[tuple[str, ...]] = ()
    # FP8 layouts this family ships ("block": *_scale_inv tiles, "tensor": *_scale), checked by
    # the suite's quant-sanity item. Import dequantizes any of them for every family.
    quantized_formats: ClassVar[tuple[str, ...]] = ()
    # The kind of model, for the conformance suite's adapter (conformance/adapters.py): "text"
    # for a causal language model (token ids in, logits out); a VLM family says "vision".
    modality: ClassVar[str] = "text"
    # Routed experts: the suite's expert layouts (EP, grouped GEMM) apply (MoEBridge sets it; a
    # family with experts on another base, e.g. a hybrid stack, too)
    mixture_of_experts: ClassVar[bool] = False
    # HF config fields the family checks outside its table (field, the one value it maps): what
    # ``refuse_other_values`` enforces and ``mbridge inspect`` counts as read.
    checked_fields: ClassVar[tuple[tuple[str, Any], ...]] = ()

    def refuse_other_values(self, maps: str, why: str = "") -> None:
        """Each of ``checked_fields`` absent or at the one value the family maps; another is a
        ConfigError naming the field: "<field>=<value>: <maps> (<field>=<mapped>)<why>"."""
        for field, want in self.checked_fields:
            have = get_path(self.hf_config, field, want)
            if have != want:
                raise ConfigError(f"{field}={have!r}: {maps} ({field}={want!r}){why}")

    @classmethod
    def has_experts(cls, config: Any) -> bool:
        """Whether the model of this HF config has routed experts (the suite's expert layouts
        apply): ``mixture_of_experts``, unless the family has experts in some models only."""
        return cls.mixture_of_experts
    # Export dtype of tensors that were quantized in the source (unless re-quantized).
    dequantized_dtype: ClassVar[torch.dtype] = torch.bfloat16
    # Export dtype of every floating-point tensor, instead of the source's (None: the source's);
    # `mbridge convert export` sets it to the dtype the Megatron weights are stored in
    export_dtype: torch.dtype | None = None
    # Why Megatron-LM's pretrain_gpt.py (its local GPT layers) cannot build this model, or None
    # when it can: `mbridge megatron-args` refuses with this reason (bridges/megatron_lm.py).
    megatron_lm: ClassVar[str | None] = None
    # (module, name) of the layer spec Megatron-LM takes with `--spec` where its own local layers
    # are not this family's (bridges/core/megatron_lm_spec.py); None: its local GPT spec
    megatron_lm_spec: ClassVar[tuple[str, str] | None] = None
    # Config fields no Megatron-LM flag reaches that the spec's name carries instead
    megatron_lm_spec_fields: ClassVar[tuple[str, ...]] = ()
    # The Megatron-LM script that builds this model with those flags
    megatron_lm_script: ClassVar[str] = "pretrain_gpt.py"
    # HF tensors that exist in some checkpoints but carry no weights (regex, full match).
    ignored_hf: ClassVar[tuple[str, ...]] = (r".*rotary_emb\.inv_freq",)

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Hook for the conformance toy generator: fix up a shrunk config dict where this
        family's HF code ties sizes together (e.g. no free head_dim)."""
        return config

    @classmethod
    def toy_model(cls, model, randomize) -> None:
        """Hook for the conformance toy generator: add to the randomised HF ``model``, before it
        is saved, the tensors this family's published checkpoints hold but transformers does not
        build (e.g. DeepSeek-V3's MTP layer); ``randomize(module)`` re-draws a module's tensors."""

    @classmethod
    def toy_saved(cls, path) -> None:
        """Hook for the conformance toy generator: rewrite the toy checkpoint transformers just
        saved in ``path`` into the layout this family's published files use, where transformers
        saves another (e.g. Qwen3-VL-MoE's transposed stacked experts)."""

    def __init__(self, hf_config: Any, checkpoint: HFCheckpoint | None = None):
        self.hf_config = hf_config
        self.checkpoint = checkpoint

    # -- config ---------------------------------------------------------------------------
    def megatron_attrs(self) -> dict[str, Any]:
        """HF config -> provider attributes (table + family overrides)."""
        return translate(self.hf_config, self.config_fields)

    def hf_config_dict(self, attrs: dict[str, Any] | None = None) -> dict[str, Any]:
        """Provider attributes -> HF config dict that transformers loads."""
        attrs = attrs if attrs is not None else self.megatron_attrs()
        out = untranslate(attrs, self.config_fields)
        out["model_type"] = self.model_type
        out["architectures"] = list(self.architectures[:1])
        return out

    def mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        raise NotImplementedError

    # Where this family's model sits inside a larger one: Megatron names get ``megatron_prefix``
    # (e.g. "language_model." in a VLM) and HF names go through ``hf_name`` (e.g. "model." ->
    # "model.language_model."). The family's ``mappings`` are written without either.
    megatron_prefix: ClassVar[str] = ""

    def hf_name(self, name: str) -> str:
        """This family's HF tensor name as the checkpoint spells it (identity by default)."""
        return name

    def table(self, attrs: dict[str, Any]) -> list[Mapping]:
        """The mapping table with this bridge's prefixes applied: what import/export use."""
        table = self.mappings(attrs)
        if self.megatron_prefix or type(self).hf_name is not Bridge.hf_name:
            table = prefixed(table, self.megatron_prefix, self.hf_name)
        return table

    # -- the Megatron model ---------------------------------------------------------------
    # A TransformerConfig subclass whose extra fields the attributes set (e.g. MLA's); None: plain.
    config_class: ClassVar[type | None] = None

    def to_megatron_provider(self):
        """The provider that builds this family's model (``build_model``), with the layout
        checks of ``layout_constraints``."""
        from bridges.core.provider import ModelProvider

        attrs = self.megatron_attrs()
        if self.checkpoint is not None:
            # load_hf_weights writes every parameter (and fails on any it leaves unwritten), so
            # Megatron's random init would be thrown away: it costs a full-size fp32 master
            # tensor per weight on every rank and most of the build time on CPU.
            attrs["perform_initialization"] = False
        return ModelProvider(attrs, build=self.build_model, constraints=self.layout_constraints,
                             config_class=self.config_class)

    def build_model(self, provider, pre_process: bool, post_process: bool, vp_stage: int | None = None):
        """One chunk of this family's Megatron model (parallel state is initialised)."""
        raise NotImplementedError

    def layout_constraints(self, provider) -> list[tuple[str, int, int, str]]:
        """``(field, value, divisor, what)`` that a layout must divide, beyond the provider's own."""
        return []

    def hf_weight(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Hook applied to each HF tensor as it is read (dequantisation goes here)."""
        return tensor

    def capabilities(self) -> frozenset[str]:
        """What this model has that some conformance checks need: ``mtp`` (multi-token
        prediction layers), ``experts`` (routed experts: expert layouts, the stacked-experts
        item), ``quant:<format>`` per quantised format the family ships. Each check of the suite
        applies where its capability is present."""
        attrs = self.megatron_attrs()
        caps = {f"quant:{f}" for f in self.quantized_formats}
        if attrs.get("mtp_num_layers"):
            caps.add("mtp")
        if attrs.get("num_moe_experts"):
            caps.add("experts")
        return frozenset(caps)

    # -- helpers --------------------------------------------------------------------------
    def _shapes(self, chunk, attrs: dict[str, Any] | None = None, name: str = "") -> Shapes:
        """The dimensions of the module that owns parameter ``name``: the innermost module on
        its path with a ``config`` (a VLM's vision tower and language model differ)."""
        owner = _owner(chunk, name)
        c = owner.config
        attrs = attrs if attrs is not None else self.megatron_attrs()
        heads = c.num_attention_heads  # an HF module's config (a VLM's tower) has no groups
        return Shapes(num_attention_heads=heads,
                      num_query_groups=getattr(c, "num_query_groups", None) or heads,
                      kv_channels=getattr(c, "kv_channels", None) or 0, vocab_size=attrs["vocab_size"],
                      padded_vocab_size=getattr(owner, "vocab_size", 0))

    def _ignored(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignored_hf)

    def _params(self, model_chunks, table: list[Mapping]) -> Iterator[tuple[Any, str, torch.Tensor]]:
        """(chunk, global name, tensor) for every parameter on this rank, and every buffer the
        mapping table names (e.g. a router's expert bias)."""
        for chunk in map(unwrap, model_chunks):
            for local, p in chunk.named_parameters():
                yield chunk, _global_name(chunk, local), p
            for local, b in chunk.named_buffers():
                name = _global_name(chunk, local)
                if b is not None and match(table, name) is not None:
                    yield chunk, name, b

    def table_rows(self, attrs: dict[str, Any] | None = None) -> list[tuple[str, Mapping, dict[str, str]]]:
        """Every (Megatron name, mapping, HF names) of the whole model, in export order:
        wildcards expanded over layers (``mapping.layers``) and experts."""
        attrs = attrs if attrs is not None else self.megatron_attrs()
        rows = []
        for m in self.table(attrs):
            if m.alternate:
                continue
            stars = m.megatron.count("*")
            layers = m.layers if m.layers is not None else range(attrs["num_layers"])
            combos = [()] if stars == 0 else [(str(i),) for i in layers] if stars == 1 else \
                [(str(i), str(e)) for i in layers for e in range(attrs["num_moe_experts"])]
            for caps in combos:
                rows.append((_fill(m.megatron, caps), m, m.hf_names(caps)))
        return sorted(rows, key=lambda r: _sort_key(r[0]))

    def expected_hf_names(self) -> list[str]:
        """HF tensor names the mapping table reads/writes for this config (stacked tensors by
        their own name, not per row)."""
        return sorted({split_row(n)[0] for _, m, hf in self.table_rows() if not isinstance(m, TiedOutput)
                       for n in hf.values()})

    # -- import ---------------------------------------------------------------------------
    def load_hf_weights(self, model_chunks: list, checkpoint: HFCheckpoint | str | None = None,
                        *, strict: bool = False) -> None:
        """Load HF weights into this rank's chunks. Reads only the tensors this rank needs.

        Raises CoverageError (same message on every rank) on any unused HF tensor, unwritten
        Megatron parameter, wrong shape or missing tensor.

        Every value loaded is checked for NaN / Inf: one ``torch.isfinite(param.sum())`` per
        parameter, right after the copy (the rank's part only, often still in cache; see
        ``_nonfinite``); where that fails, the HF tensors it came from (after the ``hf_weight``
        hook) are checked exactly. Non-finite tensors are loaded and named in a
        NonFiniteWeightWarning (on every rank, the same list), or, with ``strict=True``, named in
        the CoverageError instead. A path given as ``checkpoint`` is opened without pickle
        support; pass ``HFCheckpoint(path, allow_pickle=True)`` to load a pickle checkpoint.
        """
        from bridges.core import cpu_compat

        cpu_compat.ensure()  # chunks the caller built itself run on CPU after this, too
        ckpt = (HFCheckpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike))
                else checkpoint or self.checkpoint)
        if ckpt is None:
            raise ValueError("load_hf_weights needs a checkpoint: build the bridge with "
                             "AutoBridge.from_hf_pretrained(dir) or pass checkpoint=")
        attrs = self.megatron_attrs()
        table = self.table(attrs)
        ranks = _tp_ranks()
        ledger = Ledger()
        nonfinite: dict[str, str] = {}  # HF tensor -> what is wrong with it
        for chunk, name, param in self._params(model_chunks, table):
            hit = match(table, name)
            if hit is None:
                ledger.problem(f"Megatron parameter {name} has no mapping (left unwritten)")
                continue
            mapping, caps = hit
            tp_rank, tp_size = ranks[is_expert(name)]
            hf_names = mapping.hf_names(caps)
            missing = [n for n in hf_names.values() if not self._has(ckpt, n)]
            if missing:
                ledger.problem(f"Megatron parameter {name} needs HF tensor(s) {missing}, absent "
                               f"from {ckpt.path}")
                continue
            try:
                hf = {role: self.hf_weight(n, self._read(ckpt, n)) for role, n in hf_names.items()}
                with torch.no_grad():  # straight from the (memory-mapped) HF tensors
                    mapping.copy_into(param, hf, tp_rank, tp_size, self._shapes(chunk, attrs, name))
            except (MappingError, CheckpointError) as e:
                ledger.problem(f"{name} <- {list(hf_names.values())}: {e}")
                continue
            if _nonfinite(param.detach()):  # then name the HF tensors, counted exactly
                for role, n in hf_names.items():
                    bad = _nonfinite(hf[role])
                    if bad:
                        nonfinite[n] = bad
            for n in hf_names.values():
                for used in self._used(ckpt, n):
                    ledger.use(used, name, shared=isinstance(mapping, TiedOutput))
        gathered = _all_gather((ledger, nonfinite))
        ledgers = [lg for lg, _ in gathered]
        bad = {n: why for _, nf in gathered for n, why in nf.items()}
        problems = Ledger.verdict(ledgers, self._hf_units(ckpt, table), f"layout {_layout_name()}")
        lines = [f"HF tensor {n} is not finite ({bad[n]})" for n in sorted(bad)]
        if strict:
            problems += lines
        elif lines:
            warnings.warn(f"{ckpt.path}: {len(lines)} HF tensor(s) hold NaN/Inf and were loaded "
                          f"as they are (strict=True makes this an error):\n  "
                          + "\n  ".join(lines), NonFiniteWeightWarning, stacklevel=2)
        if problems:
            raise CoverageError(f"import of {ckpt.path} failed:\n  " + "\n  ".join(problems))

    @staticmethod
    def _stacked(table: list[Mapping]) -> list[re.Pattern]:
        """Name patterns of the HF tensors the table reads row by row (``...[*]``)."""
        return [_compile(p[:-3]) for m in table for p in m.roles.values() if p.endswith("[*]")]

    def _hf_units(self, ckpt: HFCheckpoint, table: list[Mapping]) -> set[str]:
        """What an import must use exactly once: each tensor, or each row of a stacked one."""
        stacked = self._stacked(table)
        out = set()
        for n in ckpt.names():
            if self._ignored(n):
                continue
            logical = n[: -len("_blocks")] if n.endswith("_blocks") else \
                n[: -len("_scales")] if n.endswith("_scales") else n
            if any(p.match(n) or p.match(logical) for p in stacked):
                out |= {f"{n}[{k}]" for k in range(ckpt.shape(n)[0])}
            else:
                out.add(n)
        return out

    def _view(self, ckpt: HFCheckpoint) -> CheckpointView:
        """The codec view of ``ckpt`` (kept while the checkpoint and dequantized dtype are)."""
        view = self.__dict__.get("_mbridge_view")
        if view is None or view.ckpt is not ckpt or view.dequantized_dtype != self.dequantized_dtype:
            view = self.__dict__["_mbridge_view"] = CheckpointView(ckpt, self.dequantized_dtype)
        return view

    def _has(self, ckpt: HFCheckpoint, name: str) -> bool:
        return self._view(ckpt).has(name)

    def _read(self, ckpt: HFCheckpoint, name: str) -> torch.Tensor:
        """An HF tensor (or one row of a stacked one: ``name[k]``) as values, through its codec
        (``codecs.py``); a quantized tensor with no dequantization path is an error naming it."""
        return self._view(ckpt).read(name)

    def _used(self, ckpt: HFCheckpoint, name: str) -> list[str]:
        """The stored tensors (or rows) reading ``name`` consumes (with an FP8 scale, MXFP4 parts)."""
        return self._view(ckpt).used(name)

    # -- export ---------------------------------------------------------------------------
    def export_hf_weights(self, model_chunks: list, cpu: bool = True, strict: bool = True,
                          quantized: bool = False, *, tp_rank0_only: bool = False
                          ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(hf_name, full tensor)`` on every rank, in a fixed order.

        A pipeline per Megatron parameter: gather it to its one owner rank (``_gather``), split it
        into its HF tensors (the mapping), assemble the rows of a stacked HF tensor until it is
        whole, encode it as the source stores it (``CheckpointView.encode``: the source's dtype,
        or with ``quantized`` its FP8 / MXFP4 format and scales, bit-exactly). With ``strict``,
        the exported names must equal the source checkpoint's (or, without one, the mapping
        table's) names exactly. With ``tp_rank0_only``, TP shards are gathered to TP rank 0 only
        (point to point), and the other ranks yield nothing (they must still run the generator
        to its end).
        """
        attrs = self.megatron_attrs()
        local, owner = self._export_owners(model_chunks, self.table(attrs))
        me = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        silent = tp_rank0_only and me != 0
        view = CheckpointView(self.checkpoint, self.dequantized_dtype, self.export_dtype) \
            if self.checkpoint is not None else None
        rows: dict[str, dict[int, torch.Tensor]] = {}  # stacked HF tensor -> rows so far
        seen: list[str] = []
        for name in sorted(owner, key=_sort_key):
            out = self._gather(local.get(name), name, owner[name] == me, tp_rank0_only, attrs)
            out = _deliver(out, owner[name], me, world, to_all=not tp_rank0_only)
            if silent:
                continue
            for hf_name, t in out.items():
                whole = self._assemble(rows, hf_name, t, seen, attrs)
                if whole is None:
                    continue
                hf_name, t = whole
                for n, enc in view.encode(hf_name, t.cpu() if cpu else t, quantized) if view else [(hf_name, t.cpu() if cpu else t)]:
                    seen.append(n)
                    yield n, enc
        if strict and not silent:
            incomplete = [f"{b} (rows {sorted(r)} of {self._rows(b, attrs)})" for b, r in rows.items()]
            if incomplete:
                raise CoverageError(f"export left stacked tensor(s) incomplete: {incomplete}")
            self._check_export_names(seen, quantized)

    def _export_owners(self, model_chunks, table) -> tuple[dict, dict[str, int]]:
        """This rank's exported parameters (one data-parallel replica, expert-DP for experts),
        and the owner of each tensor: the TP rank 0 (expert TP for experts) holding it."""
        from megatron.core import parallel_state as ps

        ranks = _tp_ranks()
        replica0 = {False: ps.get_data_parallel_rank() == 0, True: ps.get_expert_data_parallel_rank() == 0}
        local: dict[str, tuple[Any, torch.Tensor, Mapping, tuple]] = {}
        for chunk, name, param in self._params(model_chunks, table):
            hit = match(table, name)
            if hit is None:
                raise CoverageError(f"Megatron parameter {name} has no mapping; cannot export")
            if getattr(hit[0], "export", True) and replica0[is_expert(name)]:
                local.setdefault(name, (chunk, param, *hit))
        owner: dict[str, int] = {}
        for r, names in enumerate(_all_gather(sorted(n for n in local if ranks[is_expert(n)][0] == 0))):
            for n in names:
                owner.setdefault(n, r)
        return local, owner

    def _gather(self, entry, name: str, mine: bool, tp_rank0_only: bool, attrs) -> dict | None:
        """Gather parameter ``name`` over its TP group; on its owner, return its HF tensors."""
        from megatron.core import parallel_state as ps

        if entry is None:
            return None
        chunk, param, mapping, caps = entry
        expert = is_expert(name)
        tp_rank, tp_size = _tp_ranks()[expert]
        group = ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()
        shards = [param.detach()]
        if tp_size > 1 and mapping.tp_dim is not None and tp_rank0_only:
            # point to point into the parts of one tensor joined along the TP dimension (no
            # flat buffer as gloo's gather makes; to_hf then joins the parts without a copy)
            if tp_rank:
                dist.send(param.detach().contiguous(), dst=dist.get_global_rank(group, 0), group=group)
            else:
                shape = list(param.shape)
                shape[mapping.tp_dim] *= tp_size
                shards = list(param.new_empty(shape).chunk(tp_size, dim=mapping.tp_dim))
                # a part that is not contiguous (a column block) is received apart
                bufs = [s if s.is_contiguous() else torch.empty_like(s, memory_format=torch.contiguous_format)
                        for s in shards]
                reqs = [dist.irecv(bufs[r], src=dist.get_global_rank(group, r), group=group)
                        for r in range(1, tp_size)]
                shards[0].copy_(param.detach())  # while the others arrive
                for r, req in enumerate(reqs, 1):
                    req.wait()
                    if bufs[r] is not shards[r]:
                        shards[r].copy_(bufs[r])
        elif tp_size > 1 and mapping.tp_dim is not None:
            shards = [torch.empty_like(param) for _ in range(tp_size)]
            dist.all_gather(shards, param.detach().contiguous(), group=group)
        if not mine:
            return None
        hf_names = mapping.hf_names(caps)
        return {hf_names[role]: t for role, t in mapping.to_hf(shards, self._shapes(chunk, attrs, name)).items()}

    def _assemble(self, rows: dict, hf_name: str, t: torch.Tensor, seen: list[str], attrs):
        """``(name, tensor)`` once complete: a plain tensor at once, a stacked one when its last
        row arrives (a row delivered twice is recorded, and reported as unexpected)."""
        base, row = split_row(hf_name)
        if row is None:
            return hf_name, t
        got = rows.setdefault(base, {})
        if row in got:
            seen.append(hf_name)
        got[row] = t
        if len(got) < self._rows(base, attrs):
            return None
        del rows[base]
        return base, torch.stack([got[k] for k in sorted(got)])

    def _rows(self, base: str, attrs: dict[str, Any]) -> int:
        """Rows of a stacked HF tensor: as in the source checkpoint, else one per expert."""
        if self.checkpoint is not None and base in self.checkpoint:
            return self.checkpoint.shape(base)[0]
        return attrs["num_moe_experts"]

    def _check_export_names(self, seen: list[str], quantized: bool = False) -> None:
        if self.checkpoint is not None:
            stored = {n for n in self.checkpoint.names() if not self._ignored(n)}
            expected = self._view(self.checkpoint).output_names(stored, quantized)
        else:
            expected = set(self.expected_hf_names())
        dup = sorted({n for n in seen if seen.count(n) > 1})
        missing, extra = sorted(expected - set(seen)), sorted(set(seen) - expected)
        if dup or missing or extra:
            raise CoverageError(f"export does not reproduce the source layout: missing {missing}, "
                                f"unexpected {extra}, duplicated {dup}")

    def save_hf_pretrained(self, model_chunks: list, out_dir: str, max_shard_bytes: int = 5 * 2**30,
                           progress: bool = False, quantized: bool = False, overwrite: bool = False) -> None:
        """Export and write an HF checkpoint (rank 0 writes, atomically; ``progress`` shows a
        progress bar there; ``quantized`` re-quantizes to the source's FP8 layout). ``out_dir``
        must be new or empty, or with ``overwrite`` an earlier output of this project holding
        nothing else; otherwise every rank raises ``OutputExistsError`` before any work."""
        with claim_checked(out_dir, overwrite):
            self._save_hf(model_chunks, out_dir, max_shard_bytes, progress, quantized, overwrite)

    def _save_hf(self, model_chunks, out_dir, max_shard_bytes, progress, quantized, overwrite) -> None:
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        tensors = self.export_hf_weights(model_chunks, cpu=True, quantized=quantized,
                                         tp_rank0_only=True)
        if rank0:
            with contextlib.ExitStack() as stack:
                if progress:  # closed (its line ended) before an error is printed
                    from tqdm import tqdm

                    total = len(self.checkpoint.names()) if self.checkpoint is not None else None
                    tensors = stack.enter_context(tqdm(tensors, total=total, unit="tensor", desc="export"))
                source = self.checkpoint.path if self.checkpoint is not None else None
                save_hf_checkpoint(tensors, self.export_config(quantized), out_dir, source, max_shard_bytes,
                                   plan=self._export_plan(), overwrite=overwrite,
                                   extra_files=QUANT_FILES if quantized else ())
        else:
            for _ in tensors:
                pass
        if dist.is_initialized():
            dist.barrier()

    def _export_plan(self) -> list[tuple[str, tuple[int, ...], torch.dtype]] | None:
        """What ``export_hf_weights`` yields when it reproduces the source checkpoint: ``(HF
        name, shape, dtype)`` in its order, so that ``save_hf_checkpoint`` can write each tensor
        as it comes. None when that cannot be told up front (no source checkpoint, float8
        tensors, names that differ from the source's): the writer then collects each shard
        before writing it."""
        ckpt = self.checkpoint
        if ckpt is None:
            return None
        attrs = self.megatron_attrs()
        names, pending = [], {}
        for _, m, hf in self.table_rows(attrs):
            if not getattr(m, "export", True):
                continue
            for n in hf.values():  # a stacked tensor comes when its last row does
                base, row = split_row(n)
                if row is None:
                    names.append(n)
                else:
                    got = pending.setdefault(base, set())
                    got.add(row)
                    if len(got) == self._rows(base, attrs):
                        names.append(base)
        expected = {n for n in ckpt.names() if not self._ignored(n)}
        if len(names) != len(expected) or set(names) != expected \
                or any(str(ckpt.dtype(n)).startswith("torch.float8") for n in names):
            return None
        view = CheckpointView(ckpt, self.dequantized_dtype, self.export_dtype)
        return [(n, ckpt.shape(n), view.output_dtype(n)) for n in names]

    def export_config(self, quantized: bool = False) -> dict[str, Any]:
        """config.json for export: the source's own fields, with every mapped field rewritten;
        a dequantized export drops the source's quantization_config; an ``export_dtype`` is the
        config's dtype."""
        base = self.checkpoint.config() if self.checkpoint is not None else {}
        if not quantized:
            base.pop("quantization_config", None)
        out = {**base, **self.hf_config_dict()}
        if self.export_dtype is not None:
            name = str(self.export_dtype).replace("torch.", "")
            for d in (out, out.get("text_config")):
                if isinstance(d, dict):
                    d.update({k: name for k in ("dtype", "torch_dtype") if k in d} or {"dtype": name})
        return out


def _owner(chunk, name: str):
    """The model that owns parameter ``name``: the innermost module on its path (above its
    layer index: indices may be global) that brings a model config of its own (one with attention
    heads), e.g. a VLM's language model or vision tower, not a projector holding the whole VLM's
    config; ``chunk`` itself for a plain model. Memoised per chunk and path."""
    memo = chunk.__dict__.setdefault("_mbridge_owners", {})
    path = name.rsplit(".", 1)[0] if "." in name else ""
    if path not in memo:
        owner, mod = chunk, chunk
        for part in path.split(".") if path else ():
            mod = None if part.isdigit() else getattr(mod, part, None)
            if mod is None:
                break
            c = getattr(mod, "config", None)
            if getattr(c, "num_attention_heads", None) is not None and c is not getattr(owner, "config", None):
                owner = mod
        memo[path] = owner
    return memo[path]


def _sort_key(name: str):
    """Export order: embedding, layers by index (experts by index within), the rest."""
    m = re.search(r"\.(\d+)\.", name)
    stage = 0 if "embedding." in name.split("layers.")[0] and m is None else 2 if m is None else 1
    e = re.search(r"\.experts\.(?:local_experts\.|linear_fc[12]\.\w*?)(\d+)", name)
    return (stage, int(m.group(1)) if m else 0, int(e.group(1)) if e else -1, name)


def _tp_ranks() -> dict[bool, tuple[int, int]]:
    """(rank, size) of this rank's TP group, for dense (False) and expert (True) parameters."""
    from megatron.core import parallel_state as ps

    return {False: (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
            True: (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())}


def _deliver(out, src: int, me: int, world: int, to_all: bool):
    """The owner's ``out`` on every rank (``to_all``) or on rank 0 only (others get {}).

    Only a small header (names, shapes, dtypes) is pickled; the tensors go as tensors (a
    pickled tensor costs a serialisation copy on the sender and a deserialisation copy, plus
    a byte-string round trip, on the receiver)."""
    if world == 1 or (not to_all and src == 0):
        return out if me == 0 or to_all else {}
    if not to_all and me not in (0, src):
        return {}
    header = [[(n, tuple(t.shape), t.dtype) for n, t in out.items()] if me == src else None]
    if to_all:
        dist.broadcast_object_list(header, src=src)
    elif me == src:
        dist.send_object_list(header, dst=0)
    else:
        dist.recv_object_list(header, src=src)
    if me == src:
        tensors = {n: t.contiguous() for n, t in out.items()}
    else:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
        tensors = {n: torch.empty(shape, dtype=dtype, device=device) for n, shape, dtype in header[0]}
    for t in tensors.values():
        if to_all:
            dist.broadcast(t, src=src)
        elif me == src:
            dist.send(t, dst=0)
        else:
            dist.recv(t, src=src)
    return out if me == src else tensors


def _layout_name() -> str:
    from bridges.core.parallel import current_layout

    return current_layout().name


def _all_gather(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
