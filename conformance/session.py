"""A conformance session: toy checkpoints, the rank pool, and every check for a model x layout.

Used by the pytest plugin, the self-tests and the benchmark; it has no pytest dependency.
Results are cached per (model, layout, bridge), so the separate test items of one case cost
one conversion.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from bridges.core.parallel import Layout
from conformance import checks
from conformance.adapters import adapter_for
from conformance.checks import CheckResult
from conformance.localize import describe as describe_divergence, localize
from conformance.models import ModelSpec
from conformance.runner import RankError, RankPool

CASE_CHECKS = ("coverage", "roundtrip", "logits", "generation")
DEFAULT_LAYOUTS = ("tp1pp1", "tp2", "pp2", "tp2pp2", "vpp2")
# Mixture-of-experts models: EP 1/2/4, expert TP (= TP, and 1 under TP2), both Megatron
# expert layouts (sequential; grouped GEMM), pipeline with EP.
MOE_LAYOUTS = ("tp1pp1", "ep2", "tp2ep2", "pp2ep2", "ep4grouped", "tp2ep2etp1grouped")


def _text_bridge(config: dict) -> type | None:
    """The registered bridge class for this config (a VLM's: its language bridge), or None."""
    from bridges.core.registry import UnknownModelError, lookup

    try:
        cls = lookup(config)
    except UnknownModelError:
        return None
    return getattr(cls, "language_bridge", cls)


def is_moe(config: dict) -> bool:
    """Whether the registered bridge for this config is a mixture-of-experts bridge (a VLM's:
    its language bridge)."""
    cls = _text_bridge(config)
    return cls is not None and cls.has_experts(config)


def whole_experts(config: dict) -> bool:
    """Whether Megatron-Core keeps this model's experts whole (no expert TP: biased experts)."""
    cls = _text_bridge(config)
    return cls is not None and not getattr(cls, "expert_tensor_parallel", True)


def _etp1(layout: str) -> str:
    """The layout with its experts whole (expert TP 1)."""
    import dataclasses

    from bridges.core.parallel import Layout

    return dataclasses.replace(Layout.parse(layout), etp=1).name


def fit_layout(config: dict, layout: str) -> str:
    """``layout`` as this model runs it: with whole experts where Megatron-Core needs them."""
    return _etp1(layout) if whole_experts(config) else layout


def layouts_for(config: dict, layouts: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The layouts a model runs: the given ones that apply to it (expert layouts only for MoE
    models), or its defaults (with whole experts where the model needs them)."""
    from bridges.core.parallel import Layout

    moe = is_moe(config)
    if layouts is None:
        out = list(MOE_LAYOUTS if moe else DEFAULT_LAYOUTS)
        return list(dict.fromkeys(fit_layout(config, x) for x in out))
    return [x for x in layouts if moe or (Layout.parse(x).ep == 1 and not Layout.parse(x).grouped)]


# quantized toy layouts other than FP8 (by kind) and MXFP4: (conformance.toy maker, its arguments)
QUANT_TOYS = {"nvfp4": ("make_nvfp4_checkpoint", {}),  # NVIDIA ModelOpt
              "ct-nvfp4": ("make_nvfp4_checkpoint", {"compressed": True}),  # compressed-tensors' NVFP4
              "w4a16": ("make_w4a16_checkpoint", {}),  # compressed-tensors' packed int4
              "w4a16-asym": ("make_w4a16_checkpoint", {"symmetric": False}),  # with zero points (AWQ-style)
              "w4a16-actorder": ("make_w4a16_checkpoint", {"symmetric": False, "act_order": True}),  # with g_idx
              "gptq": ("make_gptq_checkpoint", {}),  # AutoGPTQ's v1 layout, symmetric int4
              "gptq-actorder": ("make_gptq_checkpoint", {"act_order": True}),  # desc_act: g_idx a permutation
              "awq": ("make_gptq_checkpoint", {"method": "awq"}),  # AutoAWQ's gemm layout
              "bnb-nf4": ("make_bnb_checkpoint", {}),  # bitsandbytes NF4, double quantization
              "bnb-nf4-plain": ("make_bnb_checkpoint", {"double_quant": False}),  # fp32 absmax
              "bnb-int8": ("make_bnb8_checkpoint", {})}  # bitsandbytes LLM.int8: int8 rows, SCB


class Conformance:
    def __init__(self, workdir: str | Path, layouts: list[str] | tuple[str, ...] = DEFAULT_LAYOUTS,
                 world: int = 4, dtype: str = "float32", weights: str = "toy",
                 seq_len: int = 32, steps: int = 16, batch: int = 4, timeout: float = 300.0):
        self.workdir = Path(workdir)
        self.layouts = [Layout.parse(x) for x in layouts]
        self.world, self.dtype, self.weights = world, dtype, weights
        self.steps, self.timeout = steps, timeout
        self.max_tp = max([2] + [lay.tp for lay in self.layouts])
        self.min_layers = max([4] + [lay.pp * (lay.vpp or 1) for lay in self.layouts])
        self.ids = torch.randint(0, 503, (batch, seq_len), generator=torch.Generator().manual_seed(0))
        self.pool = RankPool(world)
        self._cache: dict[tuple, Any] = {}

    def close(self) -> None:
        self.pool.close()

    def _memo(self, key: tuple, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    # -- inputs ---------------------------------------------------------------------------
    def toy_config(self, spec: ModelSpec, dtype: str = "float32") -> dict:
        ad = adapter_for(spec.config)
        return {**ad.toy_config(spec.config, max_tp=self.max_tp, min_layers=self.min_layers), "dtype": dtype}

    def checkpoint(self, spec: ModelSpec, dtype: str = "float32") -> str:
        """The checkpoint under test: a toy made from the config, or the user's own weights."""
        if self.weights == "real":
            if not spec.checkpoint:
                raise ValueError(f"--mbridge-weights=real needs a local checkpoint directory; "
                                 f"{spec.name} resolved to a {spec.source} config without weights")
            return spec.checkpoint
        # The toy is saved in the dtype under test, so the roundtrip compares like with like.
        return self._memo(("toy", spec.name, dtype), lambda: str(self.pool.run(
            "conformance.toy:make_toy_checkpoint", ranks=[0], timeout=self.timeout,
            config=self.toy_config(spec, dtype), root=str(self.workdir / "toys"))[0]))

    def _ids(self, ckpt: str) -> torch.Tensor:
        import json

        config = json.loads((Path(ckpt) / "config.json").read_text())
        return adapter_for(config).inputs(config, self.ids)

    def reference(self, spec: ModelSpec, dtype: str | None = None) -> dict:
        dtype = dtype or self.dtype
        ckpt = self.checkpoint(spec, dtype)
        return self._memo(("ref", spec.name, dtype), lambda: self.pool.run(
            "conformance.job:hf_reference", ranks=[0], timeout=self.timeout, toy_dir=ckpt,
            ids=self._ids(ckpt), steps=self.steps, dtype=dtype)[0])

    # -- checks ---------------------------------------------------------------------------
    def case(self, spec: ModelSpec, layout: str, bridge_ref: str | None = None,
             dtype: str | None = None) -> dict[str, CheckResult]:
        """Every per-layout check for one model: coverage, roundtrip, logits, generation."""
        dtype = dtype or self.dtype
        return self._memo(("case", spec.name, layout, bridge_ref, dtype),
                          lambda: self._run_case(spec, layout, bridge_ref, dtype))

    def stacked_layout(self, spec: ModelSpec | None = None) -> str:
        layout = "tp2ep2grouped" if self.world >= 4 else "ep2grouped" if self.world >= 2 else "tp1pp1grouped"
        return fit_layout(spec.config, layout) if spec is not None else layout

    def stacked_case(self, spec: ModelSpec, layout: str | None = None, bridge_ref: str | None = None,
                     dtype: str | None = None) -> dict[str, CheckResult]:
        """The case checks on the MoE toy with its experts stacked (``[E, 2I, H]`` tensors):
        imported, run against HF, and exported back stacked (default layout: TP2 x EP2 with
        grouped-GEMM experts, less on a smaller pool). The stacked copy is made from the toy of
        the dtype it runs in, so the roundtrip compares like with like."""
        layout, dtype = layout or self.stacked_layout(spec), dtype or self.dtype

        def run():
            toy = self.checkpoint(spec, dtype)
            stacked = self.pool.run("conformance.toy:make_stacked_checkpoint", ranks=[0],
                                    timeout=self.timeout, src=toy, root=str(self.workdir / "toys"))[0]
            return self._run_case(spec, layout, bridge_ref, dtype, ckpt=stacked)

        return self._memo(("stacked", spec.name, layout, bridge_ref, dtype), run)

    def _run_case(self, spec, layout, bridge_ref, dtype, ckpt: str | None = None) -> dict[str, CheckResult]:
        lay = Layout.parse(layout)
        if self.world % lay.world_size:
            raise ValueError(f"layout {layout} needs {lay.world_size} ranks; the pool has {self.world}")
        ref = self.reference(spec, dtype)  # of the default toy: the same weights as ``ckpt``
        ckpt = ckpt or self.checkpoint(spec, dtype)
        ranks = self._ranks(CASE_CHECKS, "conformance.job:megatron_case", toy_dir=ckpt, layout=layout,
                            ids=self._ids(ckpt), steps=self.steps, dtype=dtype, bridge_ref=bridge_ref,
                            draft=ref["generation"][:, self.ids.shape[1]:])
        if isinstance(ranks, dict):
            return ranks
        r0 = ranks[0]
        source = self._source(ckpt)
        if r0["import_error"]:
            return {"coverage": checks.check_coverage(r0["import_error"], [], []),
                    **_unrun(CASE_CHECKS[1:], "not run: import failed (see coverage)", blocked=True)}
        exported = r0["exported"]
        logits = next(r["logits"] for r in ranks if r.get("logits") is not None)
        acts: dict = {}
        for r in ranks:
            acts.update(r["acts"])
        out = {
            "coverage": checks.check_coverage(r0["export_error"], [n for n, _ in exported], sorted(source)),
            "roundtrip": checks.check_roundtrip(source, exported),
            "logits": checks.check_logits(ref["logits"], logits, ref["baseline"], dtype, ref.get("decisive"),
                                         ref.get("fp32_logits")),
            "generation": checks.check_generation(ref["generation"], r0["generation"], self.ids.shape[1],
                                                  ref.get("gen_decisive"), ref.get("fp32_generation")),
        }
        tol = checks.FP32_REL_ERR if dtype == "float32" else 1e-2
        first, trail = localize(ref["acts"], acts, tol)
        out["logits"].data["divergence"] = first
        if not out["logits"].passed or not out["generation"].passed:
            for c in ("logits", "generation"):
                out[c].details = (out[c].details + "\n" + describe_divergence(first, trail)).strip()
        return out

    def _ranks(self, names: tuple[str, ...], fn: str, **kwargs) -> list | dict[str, CheckResult]:
        """Every rank's result of ``fn``; or, when a rank crashed, the checks ``names`` failed
        with the crash (the one place a crashed conversion becomes results)."""
        try:
            return self.pool.run(fn, timeout=self.timeout, **kwargs)
        except RankError as e:
            return _unrun(names, f"conversion crashed:\n{e}")

    def _source(self, ckpt: str) -> dict[str, torch.Tensor]:
        def read():
            files = sorted(Path(ckpt).glob("*.safetensors"))
            return {k: v for f in files for k, v in load_file(str(f)).items()}

        return self._memo(("source", ckpt), read)

    def describe(self, spec: ModelSpec, bridge_ref: str | None = None) -> dict:
        """Config translation (published config), mapping table (toy) and config roundtrip."""
        def run():
            toy = self.checkpoint(spec) if self.weights == "toy" else spec.checkpoint
            d = self.pool.run("conformance.job:describe", ranks=[0], timeout=self.timeout,
                              source=spec.config, toy_dir=toy, bridge_ref=bridge_ref)[0]
            d["config_check"] = checks.check_config_roundtrip(d["source_config"], d["exported_config"],
                                                              d["fields"])
            return d

        return self._memo(("describe", spec.name, bridge_ref), run)

    def quantized_checkpoint(self, spec: ModelSpec, kind: str) -> tuple[str, str, str]:
        """(a toy in the published quantized layout ``kind``: block / tensor / static / modelopt /
        compressed FP8, MXFP4 experts, or one of ``QUANT_TOYS``, its dequantized twin, the toy it
        was made from), made once per session."""
        def make():
            toy, root = self.checkpoint(spec), str(self.workdir / "toys")
            if kind == "mxfp4":  # experts of a stacked MoE toy, as gpt-oss ships them
                toy = self.pool.run("conformance.toy:make_stacked_checkpoint", ranks=[0],
                                    timeout=self.timeout, src=toy, root=root)[0]
                return (*self.pool.run("conformance.toy:make_mxfp4_checkpoint", ranks=[0],
                                       timeout=self.timeout, src=toy, root=root)[0], toy)
            maker, kwargs = QUANT_TOYS.get(kind, ("make_fp8_checkpoint", {"kind": kind}))  # FP8: by kind
            return (*self.pool.run(f"conformance.toy:{maker}", ranks=[0], timeout=self.timeout,
                                   src=toy, root=root, **kwargs)[0], toy)

        return self._memo(("quantized", spec.name, kind), make)

    def quant_case(self, spec: ModelSpec, kind: str, bridge_ref: str | None = None,
                   layout: str = "tp1pp1") -> dict[str, CheckResult]:
        """Quant sanity: an FP8 toy checkpoint imports to its dequantized values, runs like HF
        on them, and re-exports bit-exactly."""
        def run():
            fp8, deq, toy = self.quantized_checkpoint(spec, kind)
            ref = self._memo(("ref-deq", deq), lambda: self.pool.run(
                "conformance.job:hf_reference", ranks=[0], timeout=self.timeout, toy_dir=deq,
                ids=self._ids(deq), steps=1, dtype="float32")[0])
            ranks = self._ranks(("quant", "logits"), "conformance.job:megatron_case", toy_dir=fp8,
                                layout=layout, ids=self._ids(fp8), steps=1, bridge_ref=bridge_ref)
            if isinstance(ranks, dict):
                return ranks
            r0 = ranks[0]
            if r0["import_error"]:
                return {**_unrun(("quant",), r0["import_error"]),
                        **_unrun(("logits",), "not run: import failed (see quant)", blocked=True)}
            logits = next(r["logits"] for r in ranks if r.get("logits") is not None)
            return {
                "quant": checks.check_quant(self._source(deq), r0["exported"], self._source(toy),
                                            self._source(fp8), r0["requantized"]),
                "logits": checks.check_logits(ref["logits"], logits, ref["baseline"]),
            }

        return self._memo(("quant", spec.name, kind, bridge_ref, layout), run)

    def mtp_case(self, spec: ModelSpec, layout: str, bridge_ref: str | None = None) -> CheckResult:
        """Multi-token prediction: the converted model's first MTP layer (``layout``) against
        the registered bridge's reference MTP head (``mtp_reference_logits``) on the same toy, in
        fp32. The last position has no next token (Megatron rolls one in) and is not compared."""
        def run():
            import json

            ckpt = self.checkpoint(spec, "float32")
            config = json.loads((Path(ckpt) / "config.json").read_text())
            ids = adapter_for(config).text_inputs(config, self.ids)
            ref = self._memo(("mtp-ref", ckpt), lambda: self.pool.run(
                "conformance.job:hf_mtp_reference", ranks=[0], timeout=self.timeout, toy_dir=ckpt,
                ids=ids)[0])
            ranks = self._ranks(("mtp",), "conformance.job:megatron_mtp", toy_dir=ckpt, layout=layout,
                                ids=ids, bridge_ref=bridge_ref)
            if isinstance(ranks, dict):
                return ranks["mtp"]
            error = next((r["error"] for r in ranks if r["error"]), None)
            if error:
                return _unrun(("mtp",), f"not run: import failed:\n{error}", blocked=True)["mtp"]
            got = next((r["mtp"] for r in ranks if r["mtp"] is not None), None)
            if got is None:
                return CheckResult("mtp", False, "", "the converted model has no MTP block")
            result = checks.check_logits(ref["logits"], got[:, :-1], ref["baseline"])
            result.check = "mtp"
            return result

        return self._memo(("mtp", spec.name, layout, bridge_ref), run)


def _unrun(names, why: str, blocked: bool = False) -> dict[str, CheckResult]:
    """Failed results for checks that could not give a verdict: the conversion crashed, or
    (``blocked``) an earlier step failed and the check's own failure is reported there."""
    return {c: CheckResult(c, False, "", why, {"blocked": True} if blocked else {}) for c in names}
