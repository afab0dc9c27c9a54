"""MiniMax-M2: the config (partial rotary from ``rotary_dim``, sigmoid routing with a correction
bias, the full-projection q/k norm), the refusal of unmapped MTP modules, and the suite catching
each bug of the family, the TP-only ones at TP2."""
import json
from pathlib import Path

import pytest

from bridges.core.auto import AutoBridge
from tests.mutant_case import assert_caught

MODEL = "MiniMaxAI/MiniMax-M2"
PUBLISHED = json.loads((Path(__file__).resolve().parents[1] / f"fixtures/configs/{MODEL}/config.json").read_text())


def test_config():
    from transformers import MiniMaxM2Config

    b = AutoBridge.from_hf_config(PUBLISHED)
    a = b.megatron_attrs()
    assert (a["num_layers"], a["hidden_size"], a["num_attention_heads"], a["num_query_groups"], a["kv_channels"]) == \
        (62, 3072, 48, 8, 128)
    assert (a["num_moe_experts"], a["moe_router_topk"], a["moe_ffn_hidden_size"]) == (256, 8, 1536)
    assert (a["rotary_percent"], a["rotary_base"], a["qk_layernorm"]) == (0.5, 5e6, True)
    assert (a["moe_router_score_function"], a["moe_router_enable_expert_bias"], a["moe_router_pre_softmax"]) == \
        ("sigmoid", True, False)
    back = MiniMaxM2Config(**{k: v for k, v in b.hf_config_dict().items() if k != "model_type"})
    assert back.rope_parameters["partial_rotary_factor"] == 0.5 and back.num_local_experts == 256
    assert "block_sparse_moe.experts.*.w1.weight" in b.experts_hf["gate"]
    assert not b.megatron_lm and b.megatron_lm_spec == ("bridges.models.olmoe.megatron_lm_spec", "layer")  # its q/k norm


def test_mtp_modules_are_refused_by_name():
    from bridges.core.config import ConfigError

    with pytest.raises(ConfigError, match="num_mtp_modules=3: MiniMax-M2's multi-token prediction modules"):
        AutoBridge.from_hf_config({**PUBLISHED, "num_mtp_modules": 3}).megatron_attrs()


def test_declared_mtp_without_its_tensors_converts_the_main_model(conformance, tmp_path):
    """The published config declares MTP modules: a checkpoint holding none of their tensors
    converts (with a warning), one holding them is refused, naming a tensor."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from bridges.core.config import ConfigError
    from conformance.models import resolve

    toy = tmp_path / "toy"
    shutil.copytree(conformance.checkpoint(resolve(MODEL)), toy)
    cfg = json.loads((toy / "config.json").read_text())
    (toy / "config.json").write_text(json.dumps({**cfg, "use_mtp": True, "num_mtp_modules": 3}))
    n = cfg["num_hidden_layers"]
    with pytest.warns(UserWarning, match=f"holds no layer past model.layers.{n - 1}: converting the main model"):
        attrs = AutoBridge.from_hf_pretrained(toy).megatron_attrs()
    assert not attrs.get("mtp_num_layers")
    (shard,) = toy.glob("*.safetensors")
    save_file({**load_file(str(shard)), f"model.layers.{n}.eh_proj.weight": torch.zeros(2, 2)}, str(shard))
    with pytest.raises(ConfigError, match=f"holds 1 such tensors .model.layers.{n}.eh_proj.weight"):
        AutoBridge.from_hf_pretrained(toy).megatron_attrs()


@pytest.mark.parametrize("field,value", [("scoring_func", "softmax"), ("use_routing_bias", False),
                                         ("qk_norm_type", "per_head"), ("shared_intermediate_size", 512),
                                         ("attn_type_list", [0, 1] * 31)])
def test_published_fields_outside_the_release_are_refused(field, value):
    """The published config's own fields (not in transformers' class): the released values pass
    (all 1 attention types included), any other is refused by name."""
    from bridges.core.config import ConfigError

    released = {"scoring_func": "sigmoid", "use_routing_bias": True, "use_qk_norm": True,
                "qk_norm_type": "per_layer", "shared_intermediate_size": 0, "attn_type_list": [1] * 62}
    AutoBridge.from_hf_config({**PUBLISHED, **released}).megatron_attrs()
    with pytest.raises(ConfigError, match=f"^{field}="):
        AutoBridge.from_hf_config({**PUBLISHED, **released, field: value}).megatron_attrs()


MUTANTS = [
    ("QKNormPerHead", {"logits", "generation"}),
    ("PartialRotaryIgnored", {"logits", "generation"}),
    ("ScoreCorrectionBiasIgnored", {"coverage", "roundtrip", "logits", "generation"}),
]


@pytest.mark.parametrize("mutant,expect", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(conformance, mutant, expect):
    assert_caught(conformance, MODEL, f"tests.minimax_m2_mutants:{mutant}", expect, None)


def test_qk_norm_shard_order_is_caught_at_tp2(conformance, spec):
    """Invisible at TP1 (one shard); at TP2 each rank normalises with the other's weight slice:
    logits part from HF's, while the roundtrip (same order both ways) stays bit-exact."""
    ref = "tests.minimax_m2_mutants:QKNormShardsReversed"
    assert all(r.passed for r in conformance.case(spec(MODEL), "tp1pp1", bridge_ref=ref).values())
    bad = conformance.case(spec(MODEL), "tp2ep2", bridge_ref=ref)
    assert not bad["logits"].passed and bad["roundtrip"].passed, bad["logits"].details
