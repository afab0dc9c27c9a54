"""Mixture-of-experts building blocks: layouts, provider checks, mapping tables, stacked rows."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bridges import AutoBridge
from bridges.core.config import ConfigError
from bridges.core.hf_io import HFCheckpoint
from bridges.core.mappings import Shapes, StackedGatedMLP, split_row
from bridges.core.parallel import Layout
from conformance.toy import shrink_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"


def _cfg(name: str) -> dict:
    return shrink_config(json.loads((FIXTURES / name / "config.json").read_text()))


@pytest.mark.parametrize("text,world", [("ep2", 2), ("tp2ep2", 4), ("pp2ep2", 4), ("ep4grouped", 4),
                                        ("tp2ep2etp1grouped", 2), ("tp2etp1", 2)])
def test_layout_names_round_trip_and_size_the_world(text, world):
    lay = Layout.parse(text)
    assert lay.name == text and lay.world_size == world
    assert Layout.parse("tp2ep2etp2") == Layout.parse("tp2ep2etp2") and Layout.parse("tp2ep2etp2").name == "tp2ep2"


def test_bad_layout_is_named():
    with pytest.raises(ValueError, match="tp2xx"):
        Layout.parse("tp2xx")


def test_provider_names_the_field_that_does_not_divide():
    bridge = AutoBridge.from_hf_config(_cfg("Qwen/Qwen3-30B-A3B"))
    p = bridge.to_megatron_provider()
    p.expert_model_parallel_size = 3
    with pytest.raises(ConfigError, match="num_moe_experts=8 does not divide by EP=3"):
        p.finalize()
    p.expert_model_parallel_size, p.expert_tensor_parallel_size = 1, 3
    with pytest.raises(ConfigError, match="moe_ffn_hidden_size=32 does not divide by expert TP=3"):
        p.finalize()
    dense = AutoBridge.from_hf_config(_cfg("Qwen/Qwen3-8B")).to_megatron_provider()
    dense.expert_model_parallel_size = 2
    with pytest.raises(ConfigError, match="need a mixture-of-experts model"):
        dense.finalize()


def test_dense_first_layers_keep_the_dense_mlp_only():
    cfg = _cfg("zai-org/GLM-4.5")
    bridge = AutoBridge.from_hf_config(cfg)
    assert bridge.megatron_attrs()["moe_layer_freq"] == [0, 1, 1, 1]
    names = bridge.expected_hf_names()
    assert "model.layers.0.mlp.gate_proj.weight" in names
    assert "model.layers.1.mlp.gate_proj.weight" not in names
    assert "model.layers.0.mlp.gate.weight" not in names
    for i in (1, 2, 3):
        assert f"model.layers.{i}.mlp.gate.e_score_correction_bias" in names
        assert all(f"model.layers.{i}.mlp.experts.{e}.down_proj.weight" in names for e in range(8))
        assert f"model.layers.{i}.mlp.shared_experts.up_proj.weight" in names


def test_grouped_experts_are_an_alternate_not_counted_twice():
    bridge = AutoBridge.from_hf_config(_cfg("Qwen/Qwen3-30B-A3B"))
    rows = bridge.table_rows()
    experts = [r for r in rows if ".mlp.experts." in r[0]]
    assert len(experts) == 4 * 8 * 2  # layers x experts x (fc1, fc2), sequential layout only
    assert all("local_experts" in r[0] for r in experts)


def test_stacked_row_mapping_round_trips_under_expert_tp():
    gate_up = torch.randn(2 * 6, 5)
    m = StackedGatedMLP("x", {"gate_up": "y[*]"})
    shapes = Shapes(1, 1, 1)
    shards = [m.to_megatron({"gate_up": gate_up}, r, 2, shapes) for r in range(2)]
    assert torch.equal(shards[0][:3], gate_up[:3]) and torch.equal(shards[0][3:], gate_up[6:9])
    assert torch.equal(m.to_hf(shards, shapes)["gate_up"], gate_up)
    assert split_row("a.b[3]") == ("a.b", 3) and split_row("a.b") == ("a.b", None)


def test_get_row_reads_one_row(tmp_path):
    t = torch.arange(24.0).reshape(4, 3, 2)
    save_file({"w": t}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    ckpt = HFCheckpoint(tmp_path)
    assert torch.equal(ckpt.get_row("w", 2), t[2])
    with pytest.raises(Exception, match="row 4"):
        ckpt.get_row("w", 4)


def test_sigmoid_routing_without_renormalisation_is_refused():
    cfg = {**_cfg("zai-org/GLM-4.5"), "norm_topk_prob": False}
    with pytest.raises(ConfigError, match="norm_topk_prob=False"):
        AutoBridge.from_hf_config(cfg).megatron_attrs()


def test_v5_spelling_of_the_expert_count_is_accepted():
    cfg = _cfg("Qwen/Qwen3-30B-A3B")
    cfg["num_local_experts"] = cfg.pop("num_experts")  # what transformers 5 writes
    assert AutoBridge.from_hf_config(cfg).megatron_attrs()["num_moe_experts"] == 8


def test_layouts_build_the_expert_layout_and_split_they_name(conformance, spec):
    """ep2grouped: grouped-GEMM weights, 4 experts per EP rank, renumbered globally;
    tp2ep2etp1: sequential experts, not split by TP (expert TP 1)."""
    toy = conformance.checkpoint(spec("Qwen/Qwen3-30B-A3B"))
    ranks = conformance.pool.run("tests.moe_tasks:expert_params", toy_dir=toy, layout="ep2grouped")
    layer0 = [sorted(n for n in r if n.startswith("decoder.layers.0.") and "fc1" in n) for r in ranks]
    assert layer0[0] == [f"decoder.layers.0.mlp.experts.linear_fc1.weight{e}" for e in range(4)]
    assert layer0[1] == [f"decoder.layers.0.mlp.experts.linear_fc1.weight{e}" for e in range(4, 8)]
    assert ranks[0]["decoder.layers.0.mlp.experts.linear_fc1.weight0"] == (64, 64)  # [2I, H]
    ranks = conformance.pool.run("tests.moe_tasks:expert_params", toy_dir=toy, layout="tp2ep2etp1")
    assert ranks[0]["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"] == (64, 64)
    assert ranks[0]["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight"] == (64, 32)
    ranks = conformance.pool.run("tests.moe_tasks:expert_params", toy_dir=toy, layout="tp2ep2")
    assert ranks[0]["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"] == (32, 64)


def test_an_ep_rank_reads_only_its_experts(conformance, spec):
    toy = conformance.checkpoint(spec("Qwen/Qwen3-30B-A3B"))
    reads = conformance.pool.run("tests.moe_tasks:expert_reads", toy_dir=toy, layout="ep2")
    experts = [{int(n.split(".experts.")[1].split(".")[0]) for n in r} for r in reads]
    assert experts[0] == {0, 1, 2, 3} and experts[1] == {4, 5, 6, 7}  # EP ranks 0 and 1
    assert all(len(r) == len(set(r)) for r in reads)  # each tensor read once
