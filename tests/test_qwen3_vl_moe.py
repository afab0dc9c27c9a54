"""Qwen3-VL-MoE: Qwen3-VL over Qwen3-MoE layers, the published transposed stacked experts read
as transformers reads them (and transformers' own in-memory layout too: the suite's stacked
item), the router's renormalised top-k, and the suite catching the bugs of both."""
import json
from pathlib import Path

import pytest

from bridges.core.auto import AutoBridge
from conformance.models import resolve
from tests.mutant_case import assert_caught

MODEL = "Qwen/Qwen3-VL-30B-A3B-Instruct"
PUBLISHED = json.loads((Path(__file__).resolve().parents[1] / f"fixtures/configs/{MODEL}/config.json").read_text())


def test_published_config_and_size():
    from bridges.core.vlm import meta_model
    from bridges.flops import parameter_counts

    b = AutoBridge.from_hf_config(PUBLISHED)
    a = b.megatron_attrs()
    assert (a["num_layers"], a["hidden_size"], a["num_moe_experts"], a["moe_router_topk"]) == (48, 2048, 128, 8)
    assert (a["moe_ffn_hidden_size"], a["kv_channels"], a["mrope_section"]) == (768, 128, [24, 20, 20])
    assert a["moe_router_pre_softmax"] is False and a["qk_layernorm"]
    hf = meta_model(PUBLISHED)
    counts = parameter_counts(b)
    assert counts.total == sum(p.numel() for p in hf.parameters()) == 31_070_754_032
    assert round(counts.active / 1e9, 2) == 3.89
    assert set(b.expected_hf_names()) == {n for n, _ in hf.named_parameters()}


def test_toy_is_written_in_the_published_layout(conformance):
    """transformers saves [E, 2I, H] / [E, H, I]; the toy holds the published [E, H, 2I] / [E, I, H]."""
    from bridges.core.hf_io import HFCheckpoint

    toy = conformance.checkpoint(resolve(MODEL))
    text = json.loads(Path(f"{toy}/config.json").read_text())["text_config"]
    h, i = text["hidden_size"], text["moe_intermediate_size"]
    e = text.get("num_experts") or text["num_local_experts"]  # transformers 5 saves the latter
    ckpt = HFCheckpoint(toy)
    assert tuple(ckpt.shape("model.language_model.layers.0.mlp.experts.gate_up_proj")) == (e, h, 2 * i)
    assert tuple(ckpt.shape("model.language_model.layers.0.mlp.experts.down_proj")) == (e, i, h)
    assert 2 * i != h  # readable from the shape, as the published sizes are


# a layout misread fails the import (the other checks are then blocked), naming the tensor
MUTANTS = [("ExpertsReadInMemoryLayout", {"coverage"}, None),
           ("TopKNotRenormalised", {"logits", "generation"}, "layer 0 mlp")]


@pytest.mark.parametrize("mutant,expect,where", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(conformance, mutant, expect, where):
    results = assert_caught(conformance, MODEL, f"tests.qwen3_vl_moe_mutants:{mutant}", expect, where)
    if not where:  # the import names the expert tensor whose shape does not fit
        assert "mlp.experts.down_proj[0]" in results["coverage"].details, results["coverage"].details
