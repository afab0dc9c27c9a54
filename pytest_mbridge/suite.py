"""The conformance suite the plugin collects: one item per model x check (x layout).

Items are parametrised by the plugin (``pytest_generate_tests``); each asserts one
``conformance`` check and records its figure for the summary and the JSON report.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pytest_mbridge.snapshots import MbridgeSnapshot, ShippedSnapshot


def _verdict(request, result, layout: str = "-") -> None:
    request.node.user_properties.append(
        ("mbridge", {"model": request.node.callspec.params["mbridge_model"], "layout": layout,
                     "check": result.check, "passed": result.passed, "figure": result.figure,
                     "data": {k: v for k, v in result.data.items() if isinstance(v, (int, float, str, type(None)))}}))
    if not result.passed:
        pytest.fail(str(result), pytrace=False)


def _case(request, mbridge_layout, dtype, check):
    conf, spec = request.getfixturevalue("mbridge_conformance"), request.getfixturevalue("mbridge_spec")
    label = mbridge_layout if dtype == conf.dtype else f"{mbridge_layout}/{dtype}"
    result = conf.case(spec, mbridge_layout, request.config.getoption("mbridge_bridge"), dtype)[check]
    _verdict(request, result, label)


def test_coverage(request, mbridge_model, mbridge_layout, mbridge_dtype):
    """Every HF tensor used once, every Megatron parameter written once, export names exact."""
    _case(request, mbridge_layout, mbridge_dtype, "coverage")


def test_roundtrip(request, mbridge_model, mbridge_layout, mbridge_dtype):
    """HF -> Megatron -> HF is bit-exact (torch.equal, same dtype)."""
    _case(request, mbridge_layout, mbridge_dtype, "roundtrip")


def test_logits(request, mbridge_model, mbridge_layout, mbridge_dtype):
    """Megatron logits match HF's (fp32: rel err <= 1e-5, all finite; bf16, only beside fp32:
    per-position error at most 3x HF's own bf16 noise, routing flips counted apart, and top-1 on
    decisive positions; conformance.checks.check_logits)."""
    _case(request, mbridge_layout, mbridge_dtype, "logits")


def test_generation(request, mbridge_model, mbridge_layout, mbridge_dtype):
    """Greedy decoding gives the same tokens as HF (bf16: up to the first near-tie when that
    judges a quarter of the tokens, else following HF's fp32 run as far as HF bf16 does, halved)."""
    _case(request, mbridge_layout, mbridge_dtype, "generation")


def test_config_roundtrip(request, mbridge_model, mbridge_conformance, mbridge_spec):
    """HF config -> Megatron -> HF config keeps every mapped field."""
    d = mbridge_conformance.describe(mbridge_spec, request.config.getoption("mbridge_bridge"))
    _verdict(request, d["config_check"])


def _snapshot(request, snapshot, value, what: str) -> None:
    """Against the run's snapshot directory; where it has none for this model (and the run does
    not record), against the snapshot shipped with pytest-mbridge, if any; else skipped."""
    snap = snapshot.use_extension(MbridgeSnapshot)
    if request.config.option.update_snapshots or MbridgeSnapshot.exists(snap):
        assert value == snap
        return
    shipped = snapshot.use_extension(ShippedSnapshot)
    if Path(ShippedSnapshot.directory).resolve() == Path(MbridgeSnapshot.directory).resolve() \
            or not ShippedSnapshot.exists(shipped):
        pytest.skip(f"no {what} snapshot recorded yet in {MbridgeSnapshot.directory}: "
                    f"run with --snapshot-update to record one")
    try:
        assert value == shipped
    except AssertionError as e:
        raise AssertionError(f"{what} differs from the snapshot shipped with pytest-mbridge in "
                             f"{ShippedSnapshot.directory} (none recorded in "
                             f"{MbridgeSnapshot.directory}; --snapshot-update records this "
                             f"bridge's own there)\n{e}") from None


def test_mapping_snapshot(request, mbridge_model, mbridge_conformance, mbridge_spec, snapshot):
    """The mapping table (names, kind, TP split dim, shapes) matches the recorded snapshot."""
    d = mbridge_conformance.describe(mbridge_spec, request.config.getoption("mbridge_bridge"))
    _snapshot(request, snapshot, d["table"], "mapping table")


def test_config_snapshot(request, mbridge_model, mbridge_conformance, mbridge_spec, snapshot):
    """The config translation of the published config matches the recorded snapshot."""
    d = mbridge_conformance.describe(mbridge_spec, request.config.getoption("mbridge_bridge"))
    _snapshot(request, snapshot, d["attrs"], "config translation")


def test_flops_snapshot(request, mbridge_model, mbridge_conformance, mbridge_spec, snapshot):
    """FLOPs of one training step (seq 4096, batch 1) and the parameter counts of the published
    config, per component, match the recorded snapshot (conventions: docs/flops.md)."""
    from bridges.flops import training_flops
    from conformance.job import make_bridge

    bridge = make_bridge(mbridge_spec.config, request.config.getoption("mbridge_bridge"))
    _snapshot(request, snapshot, training_flops(bridge, seq_len=4096, batch_size=1).as_dict(), "FLOPs")


def test_stacked_experts(request, mbridge_model, mbridge_expert_layout, mbridge_conformance, mbridge_spec):
    """MoE: a checkpoint with stacked experts (transformers' in-memory layout) imports, runs
    like HF and exports back stacked, bit-exactly (TP2 x EP2, grouped-GEMM Megatron experts)."""
    results = mbridge_conformance.stacked_case(mbridge_spec, bridge_ref=request.config.getoption("mbridge_bridge"))
    for r in results.values():
        r.check = f"{r.check} (stacked experts)"
    bad = [r for r in results.values() if not r.passed]
    for r in results.values():
        if r.passed or r is bad[0]:
            _verdict(request, r, mbridge_conformance.stacked_layout(mbridge_spec))


def test_quant_sanity(request, mbridge_model, mbridge_format, mbridge_conformance, mbridge_spec):
    """A quantized (FP8, MXFP4 or NVFP4) toy checkpoint imports to its dequantized values (never raw
    codes), runs like HF on those values, and re-exports to the source's quantized tensors and
    scales bit-exactly."""
    results = mbridge_conformance.quant_case(mbridge_spec, mbridge_format, request.config.getoption("mbridge_bridge"))
    for r in results.values():
        r.check = f"{r.check} ({mbridge_format}{'' if mbridge_format in ('mxfp4', 'nvfp4') else ' fp8'})"
    bad = [r for r in results.values() if not r.passed]
    for r in results.values():
        if r.passed or r is bad[0]:
            _verdict(request, r, "tp1pp1")


def test_mtp(request, mbridge_model, mbridge_layout, mbridge_dtype, mbridge_conformance, mbridge_spec):
    """Models with multi-token-prediction layers: the converted MTP head's logits match the
    family's reference MTP head on the same toy (fp32: rel err <= 1e-5)."""
    from conformance.job import make_bridge

    bridge_ref = request.config.getoption("mbridge_bridge")
    if not make_bridge(mbridge_spec.config, bridge_ref).megatron_attrs().get("mtp_num_layers"):
        pytest.skip("no multi-token-prediction layers")
    if mbridge_dtype != "float32":
        pytest.skip("the MTP check runs in float32 only")
    _verdict(request, mbridge_conformance.mtp_case(mbridge_spec, mbridge_layout, bridge_ref), mbridge_layout)
