"""Qwen3-VL (the Megatron vision encoder pattern, Qwen3 text): its config, its pieces against
transformers' own (the resampled position table, interleaved M-RoPE), FLOPs and parameters,
and the suite catching each bug in what it adds to Qwen2.5-VL, where the bug is."""
import json
from pathlib import Path

import pytest
import torch

from bridges.core.auto import AutoBridge
from tests.mutant_case import assert_caught

MODEL = "Qwen/Qwen3-VL-8B-Instruct"
PUBLISHED = json.loads((Path(__file__).resolve().parents[1] / f"fixtures/configs/{MODEL}/config.json").read_text())


def test_published_config():
    b = AutoBridge.from_hf_config(PUBLISHED)
    a = b.megatron_attrs()
    assert (a["num_layers"], a["hidden_size"], a["ffn_hidden_size"], a["vocab_size"]) == (36, 4096, 12288, 151936)
    assert (a["num_attention_heads"], a["num_query_groups"], a["kv_channels"]) == (32, 8, 128)
    assert a["qk_layernorm"] and not a["add_qkv_bias"] and not a["share_embeddings_and_output_weights"]
    assert (a["position_embedding_type"], a["mrope_section"], a["rotary_base"]) == ("mrope", [24, 20, 20], 5e6)
    v = a["vision_config"]
    assert (v["depth"], v["hidden_size"], v["num_position_embeddings"], v["deepstack_visual_indexes"]) == \
        (27, 1152, 2304, [8, 16, 24])
    rope = b.hf_config_dict()["text_config"]["rope_parameters"]
    assert rope["mrope_interleaved"] and rope["mrope_section"] == [24, 20, 20]


def test_learned_positions_match_transformers():
    """The 4 x 4 table resampled to ragged grids (one of two frames), in the processor's order."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from bridges.models.qwen3_vl.modeling_qwen3_vl import learned_positions

    grids = torch.tensor([[1, 4, 8], [2, 6, 4], [1, 10, 6]])
    table = torch.randn(16, 8, dtype=torch.float64)
    idx, w = get_vision_interpolation_indices_and_weights(grids, num_grid_per_side=4, mode="bilinear",
                                                          align_corners=True, spatial_merge_size=2)
    ref = (table[idx] * w[:, :, None].double()).sum(1)
    torch.testing.assert_close(learned_positions(table, grids, 2).double(), ref, rtol=1e-6, atol=1e-6)


def test_interleaved_mrope_matches_transformers():
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from bridges.models.qwen3_vl.modeling_qwen3_vl import InterleavedMRoPE

    cfg = Qwen3VLConfig(text_config={"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                                         "mrope_section": [4, 2, 2]}}).text_config
    pos = torch.randint(0, 50, (3, 2, 7))
    cos, _ = Qwen3VLTextRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), pos)  # [b, s, d]
    angles = InterleavedMRoPE(16, 1e4)(pos, [4, 2, 2])  # [s, b, 1, d]
    torch.testing.assert_close(angles[:, :, 0].transpose(0, 1).cos(), cos)


def test_mrope_sections_that_cannot_interleave_are_refused():
    from bridges.core.config import ConfigError

    text = {**PUBLISHED["text_config"], "rope_scaling": {"rope_type": "default", "mrope_section": [4, 30, 30],
                                                         "mrope_interleaved": True}}
    with pytest.raises(ConfigError, match="mrope_section"):
        AutoBridge.from_hf_config({**PUBLISHED, "text_config": text}).megatron_attrs()


def test_parameter_count_is_the_published_models():
    """8,767,123,696: every tensor of transformers' own model for the published config; the
    table names exactly its tensors."""
    from bridges.core.vlm import meta_model
    from bridges.flops import parameter_counts

    hf = meta_model(PUBLISHED)
    b = AutoBridge.from_hf_config(PUBLISHED)
    assert parameter_counts(b).total == sum(p.numel() for p in hf.parameters()) == 8_767_123_696
    assert set(b.expected_hf_names()) == {n for n, _ in hf.named_parameters()}


def assert_tower_flops(model_type: str, tower_cls, **vision) -> None:
    """The FLOPs calculator's vision tower and projector (flops, parameters) equal torch's flop
    counter and parameter count on transformers' own tower built from ``vision``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig

    from bridges.flops import _vision

    cfg = AutoConfig.for_model(model_type, vision_config=dict(
        hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, num_position_embeddings=16, out_hidden_size=40, **vision))
    cfg.vision_config._attn_implementation = "eager"
    tower = tower_cls._from_config(cfg.vision_config)
    gh, gw = 6, 10
    with FlopCounterMode(display=False) as counter:
        tower(torch.randn(gh * gw, 3 * 2 * 16), grid_thw=torch.tensor([[1, gh, gw]]))
    v = _vision({"vision_config": cfg.vision_config.to_dict()}, (gh * 4, gw * 4))
    assert counter.get_total_flops() == v["vision_tower"][1] + v["projector"][1]
    assert sum(p.numel() for p in tower.parameters()) == v["vision_tower"][0] + v["projector"][0]


def test_vision_flops_equal_torch_flop_counter_on_the_hf_tower():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    assert_tower_flops("qwen3_vl", Qwen3VLVisionModel, depth=3, deepstack_visual_indexes=[0, 2])


# -- the suite catches each bug ------------------------------------------------------------------
MUTANTS = [
    ("DeepstackDropped", {"logits", "generation"}, "layer 1 attention"),
    ("DeepstackOneLayerLate", {"logits", "generation"}, "layer 1 attention"),
    ("DeepstackMergersSwapped", {"logits", "generation"}, "layer 1 attention"),
    ("MRopeNotInterleaved", {"logits", "generation"}, "layer 0 attention"),
    ("PositionGridTransposed", {"logits", "generation"}, "vision block 0"),
]


@pytest.mark.parametrize("mutant,expect,where", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_vlm_mutant_is_caught(conformance, mutant, expect, where):
    assert_caught(conformance, MODEL, f"tests.qwen3_vl_mutants:{mutant}", expect, where)
