"""Qwen3-Next: the published config as a HybridModel pattern, parameters against transformers'
model, and the suite catching each bug of the family."""
import pytest
import torch

from bridges.core.auto import AutoBridge
from conformance.models import resolve
from tests.mutant_case import assert_caught

MODEL = "Qwen/Qwen3-Next-80B-A3B-Instruct"
PUBLISHED = resolve(MODEL).config


def test_published_config():
    b = AutoBridge.from_hf_config(PUBLISHED)
    a = b.megatron_attrs()
    assert a["num_layers"] == 96 and a["hybrid_layer_pattern"] == "".join(
        ("*" if (i + 1) % 4 == 0 else "G") + "E" for i in range(48)) + "/*E"  # the published MTP depth
    assert a["mtp_num_layers"] == 1
    assert (a["attention_output_gate"], a["qk_layernorm"], a["layernorm_zero_centered_gamma"]) == (True, True, True)
    assert (a["rotary_percent"], a["kv_channels"], a["num_query_groups"]) == (0.25, 256, 2)
    assert (a["linear_num_key_heads"], a["linear_num_value_heads"], a["linear_key_head_dim"]) == (16, 32, 128)
    assert (a["num_moe_experts"], a["moe_router_topk"], a["moe_shared_expert_gate"], a["moe_router_pre_softmax"]) == \
        (512, 10, True, False)
    assert not b.megatron_lm and b.megatron_lm_script == "pretrain_hybrid.py"  # with its --spec stack


def test_parameters_match_transformers():
    from transformers import AutoConfig, AutoModelForCausalLM

    from bridges.flops import training_flops

    cfg = dict(PUBLISHED)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    params = training_flops(AutoBridge.from_hf_config(PUBLISHED), seq_len=1).params
    assert params.main == sum(p.numel() for p in model.parameters()) == 79_674_391_296  # transformers: no MTP
    h = PUBLISHED["hidden_size"]
    assert params.total - params.main == params.by_component["mtp"] > 2 * h * h  # fc, layer, norms


def test_gdn_in_proj_regrouping_round_trips_at_tp2():
    """HF's per-key-head grouping to Megatron's per-section TP shards and back, exactly."""
    from bridges.core.mappings import Shapes
    from bridges.models.qwen3_next.modeling_qwen3_next import GDNInProj

    m = GDNInProj("x", {"qkvz": "a", "ba": "b"}, dims=(4, 8, 3, 2))
    hf = {"qkvz": torch.randn(4 * (6 + 8), 5), "ba": torch.randn(16, 5)}
    sh = Shapes(1, 1, 1)
    shards = [m.to_megatron(hf, r, 2, sh) for r in range(2)]
    assert shards[0].shape[0] == 6 + 6 + 8 + 8 + 4 + 4
    back = m.to_hf(shards, sh)
    assert torch.equal(back["qkvz"], hf["qkvz"]) and torch.equal(back["ba"], hf["ba"])


# -- the multi-token-prediction block -------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from conformance.toy import make_toy_checkpoint, shrink_config

    return make_toy_checkpoint(shrink_config(dict(PUBLISHED)), tmp_path_factory.mktemp("qwen3-next"))


def _names(d) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_toy_holds_the_published_mtp_block_and_every_tensor_is_mapped(toy):
    names = _names(toy)
    assert {"mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
            "mtp.layers.0.self_attn.q_proj.weight", "mtp.layers.0.mlp.experts.0.gate_proj.weight",
            "mtp.layers.0.mlp.shared_expert_gate.weight"} <= names
    bridge = AutoBridge.from_hf_pretrained(toy)
    assert bridge.megatron_attrs()["hybrid_layer_pattern"].endswith("/*E")
    assert set(bridge.expected_hf_names()) == names
    megatron = {r[0] for r in bridge.table_rows()}
    assert "mtp.layers.0.mtp_model_layer.layers.0.self_attention.linear_qkv.weight" in megatron
    assert "mtp.layers.0.mtp_model_layer.layers.1.mlp.experts.local_experts.0.linear_fc1.weight" in megatron


def test_checkpoint_without_the_mtp_block_converts_without_it(toy, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "no-mtp"
    shutil.copytree(toy, d)
    sd = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if not k.startswith("mtp.")}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    a = AutoBridge.from_hf_pretrained(d).megatron_attrs()  # the config says nothing: no warning
    assert a["mtp_num_layers"] is None and "/" not in a["hybrid_layer_pattern"]
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "mtp_num_hidden_layers": 1}))
    bridge = AutoBridge.from_hf_pretrained(d)
    with pytest.warns(UserWarning, match="holds no MTP block"):
        a = bridge.megatron_attrs()
    assert a["mtp_num_layers"] is None and bridge.hf_config_dict(a)["mtp_num_hidden_layers"] == 0


def test_more_than_one_mtp_depth_is_refused_by_name():
    from bridges.core.config import ConfigError

    with pytest.raises(ConfigError, match="mtp_num_hidden_layers=2"):
        AutoBridge.from_hf_config({**PUBLISHED, "mtp_num_hidden_layers": 2}).megatron_attrs()


MUTANTS = [
    ("GDNQKSwapped", {"logits", "generation", "mtp"}),
    ("OutputGateHalvesSwapped", {"logits", "mtp"}),  # one attention layer of four: greedy tokens hold
    ("AttentionIntervalOffByOne", {"coverage"}),
    # the multi-token-prediction block: the MTP check, and the main logits where the main model reads it
    ("MTPReadsLastLayer", {"logits", "generation", "mtp"}),
    ("MTPNormsSwapped", {"mtp"}),
    ("MTPProjectionInputsSwapped", {"mtp"}),
]


# the logits check's first divergence: HF layer i pairs with Megatron's mixer 2i and MoE 2i + 1
WHERE = {"GDNQKSwapped": "layer 0 attention", "OutputGateHalvesSwapped": "layer 3 attention",
         "MTPReadsLastLayer": "layer 3 attention"}


@pytest.mark.parametrize("mutant,expect", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(conformance, mutant, expect):
    assert_caught(conformance, MODEL, f"tests.qwen3_next_mutants:{mutant}", expect, WHERE.get(mutant), mtp=True)
