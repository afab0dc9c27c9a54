"""Qwen2.5-VL (the Megatron vision encoder pattern): the flat published config and the nested
one, export in the source's layout, both checkpoint name layouts, the image geometry (patch
order, windows, 3-D positions) against transformers' own, FLOPs against torch's counter, and
the suite catching each VLM bug by the check expected, localised to the vision stage where it is."""
import json
from pathlib import Path

import pytest
import torch

from bridges.core.auto import AutoBridge
from conformance.models import ModelSpec, resolve
from tests.mutant_case import assert_caught

MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
PUBLISHED = json.loads((Path(__file__).resolve().parents[1] / f"fixtures/configs/{MODEL}/config.json").read_text())


def _nested(flat: dict) -> dict:
    """The same config as transformers 5 writes it (text fields under text_config)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("qwen2_5_vl", **{k: v for k, v in flat.items() if k != "model_type"})
    return cfg.to_dict()


def test_flat_published_config():
    assert "text_config" not in PUBLISHED
    a = AutoBridge.from_hf_config(PUBLISHED).megatron_attrs()
    assert (a["num_layers"], a["hidden_size"], a["ffn_hidden_size"], a["vocab_size"]) == (28, 3584, 18944, 152064)
    assert (a["num_attention_heads"], a["num_query_groups"], a["kv_channels"]) == (28, 4, 128)
    assert (a["position_embedding_type"], a["mrope_section"], a["rotary_base"]) == ("mrope", [16, 24, 24], 1e6)
    assert a["add_qkv_bias"] and not a["share_embeddings_and_output_weights"]
    assert (a["image_token_id"], a["video_token_id"], a["vision_start_token_id"]) == (151655, 151656, 151652)
    v = a["vision_config"]
    assert (v["depth"], v["hidden_size"], v["num_heads"], v["window_size"]) == (32, 1280, 16, 112)
    assert v["fullatt_block_indexes"] == [7, 15, 23, 31] and v["out_hidden_size"] == 3584


def test_nested_config_reads_the_same():
    nested = _nested(PUBLISHED)
    assert "hidden_size" not in nested and nested["text_config"]["hidden_size"] == 3584
    flat, new = (AutoBridge.from_hf_config(c).megatron_attrs() for c in (PUBLISHED, nested))
    assert {k: v for k, v in new.items() if k != "vision_config"} == \
        {k: v for k, v in flat.items() if k != "vision_config"}


def test_head_dim_field_is_not_the_head_size():
    """HF's Qwen2.5-VL text attention derives the head size from hidden / heads, whatever a
    head_dim field says; a head_dim that contradicts it is not read."""
    cfg = {**PUBLISHED, "head_dim": 64}
    assert AutoBridge.from_hf_config(cfg).megatron_attrs()["kv_channels"] == 128


def test_mrope_section_must_fit_the_head():
    from bridges.core.config import ConfigError

    bad = {**PUBLISHED, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}}
    with pytest.raises(ConfigError, match="mrope_section"):
        AutoBridge.from_hf_config(bad).megatron_attrs()


# -- image geometry, against transformers' own helpers ---------------------------------------------
GRIDS = torch.tensor([[1, 4, 8], [1, 10, 6], [2, 6, 12]])


def test_patch_order_and_windows_match_transformers():
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    from bridges.models.qwen2_5_vl.modeling_qwen2_5_vl import patch_positions, windows

    assert torch.equal(patch_positions(GRIDS, 2), get_vision_position_ids(GRIDS, 2))
    order, window = windows(GRIDS, 2, 2)
    ref_order, cu = get_vision_window_index(GRIDS, spatial_merge_size=2, window_size=16, patch_size=4)
    assert torch.equal(order, ref_order)
    sizes = torch.bincount(window) * 4  # patches per window, in order
    assert torch.equal(torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]), cu.long())


def test_mrope_positions_match_transformers():
    """Two images in one row (a wide one, then a video-like two-frame grid is left out: images
    only), text around them, and a row without an image."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    from bridges.models.qwen2_5_vl.modeling_qwen2_5_vl import mrope_positions

    img = 9
    grids = torch.tensor([[1, 4, 8], [1, 6, 4]])
    row = [1, 2, 3] + [img] * 8 + [4, 5] + [img] * 6 + [6, 7, 8]
    ids = torch.tensor([row, list(range(10, 10 + len(row)))])
    cfg = Qwen2_5_VLConfig(image_token_id=img, vision_config={"spatial_merge_size": 2})
    with torch.device("meta"):
        hf = Qwen2_5_VLModel.__new__(Qwen2_5_VLModel)
    hf.config = cfg
    ref, _ = Qwen2_5_VLModel.get_rope_index(hf, ids, mm_token_type_ids=(ids == img).int(), image_grid_thw=grids)
    assert torch.equal(mrope_positions(ids, img, grids, 2), ref)
    with pytest.raises(ValueError, match="image tokens"):  # a grid too big for its run of tokens
        mrope_positions(ids, img, torch.tensor([[1, 8, 8], [1, 6, 4]]), 2)


# -- checkpoints ---------------------------------------------------------------------------------
def _toy(conformance):
    return conformance.checkpoint(resolve(MODEL))


def test_both_checkpoint_layouts_read_and_written_back(conformance, tmp_path):
    """The toy as transformers saves it (the published names: model., visual., lm_head.) and
    the same tensors in transformers' in-memory layout (model.language_model., model.visual.)."""
    from safetensors.torch import load_file, save_file

    toy = _toy(conformance)
    tensors = load_file(f"{toy}/model.safetensors")
    assert any(n.startswith("visual.blocks.") for n in tensors) and any(n.startswith("model.layers.") for n in tensors)
    assert set(AutoBridge.from_hf_pretrained(toy).expected_hf_names()) == set(tensors)

    def new(n):
        return "model.language_model." + n[len("model."):] if n.startswith("model.") else \
            "model." + n if n.startswith("visual.") else n

    save_file({new(n): t for n, t in tensors.items()}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(Path(f"{toy}/config.json").read_text())
    assert set(AutoBridge.from_hf_pretrained(tmp_path).expected_hf_names()) == {new(n) for n in tensors}


def test_flat_source_is_exported_flat_and_transformers_loads_it(conformance, tmp_path):
    """A checkpoint whose config.json is the flat legacy layout (as published) exports a flat
    config.json with the same text fields at the top level; transformers reads it back equal."""
    import shutil

    from transformers import AutoConfig

    toy = _toy(conformance)
    nested = json.loads(Path(f"{toy}/config.json").read_text())
    text = nested.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**nested, **{k: v for k, v in text.items() if k not in ("model_type",)},
            "rope_theta": rope["rope_theta"], "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    shutil.copy(f"{toy}/model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(flat))
    out = AutoBridge.from_hf_pretrained(tmp_path).export_config()
    assert "text_config" not in out and out["hidden_size"] == text["hidden_size"]
    back, src = (AutoConfig.for_model("qwen2_5_vl", **{k: v for k, v in c.items() if k != "model_type"})
                 for c in (out, flat))
    for f in ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size"):
        assert getattr(back.text_config, f) == getattr(src.text_config, f), f
    assert back.text_config.rope_parameters["mrope_section"] == rope["mrope_section"]
    assert back.vision_config.to_dict() == src.vision_config.to_dict()


# -- the suite catches each bug ------------------------------------------------------------------
NUMBERS, ALL = {"logits", "generation"}, {"coverage", "roundtrip", "logits", "generation"}
MUTANTS = [
    ("VisionQKVPerHead", NUMBERS, "vision block 0"),
    ("PatchEmbeddingTransposed", NUMBERS, "vision embedding"),
    ("VisionLayersSwapped", NUMBERS, "vision block 0"),
    ("FullAttentionLayersOffByOne", NUMBERS, "vision block 1"),
    ("VisionRotaryAxesSwapped", NUMBERS, "vision block 0"),
    ("MergerLayersSwapped", NUMBERS, "merger"),
    # the sections move a few rotary pairs of the image tokens only: no greedy token flips
    ("MRopeSectionsSwapped", {"logits"}, "layer 0 attention"),
    ("ImageTokenOffByOne", ALL, None),
]


@pytest.mark.parametrize("mutant,expect,where", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_vlm_mutant_is_caught(conformance, mutant, expect, where):
    results = assert_caught(conformance, MODEL, f"tests.qwen2_5_vl_mutants:{mutant}", expect, where)
    if not where:  # the crash names the image token
        assert "image tokens (id" in results["logits"].details, results["logits"].details


def test_top_level_tie_ignored_is_caught(conformance):
    """A VLM whose text_config says untied but whose top level (what transformers honours) ties."""
    nested = _nested(PUBLISHED)
    cfg = {**nested, "tie_word_embeddings": True, "text_config": {**nested["text_config"], "tie_word_embeddings": False}}
    spec = ModelSpec("test/qwen2.5-vl-top-tied", cfg, "fixture")
    assert all(r.passed for r in conformance.case(spec, "tp1pp1").values())
    bad = conformance.case(spec, "tp1pp1", bridge_ref="tests.qwen2_5_vl_mutants:TopLevelTieIgnored")
    assert not bad["coverage"].passed and "lm_head.weight" in bad["coverage"].details, bad["coverage"].details


# -- FLOPs -----------------------------------------------------------------------------------------
def test_parameter_count_is_the_published_models():
    """8,292,166,656 parameters: every tensor of transformers' own model for the published config."""
    from bridges.core.vlm import meta_model
    from bridges.flops import parameter_counts

    hf = sum(p.numel() for p in meta_model(_nested(PUBLISHED)).parameters())
    assert parameter_counts(AutoBridge.from_hf_config(PUBLISHED)).total == hf == 8_292_166_656


def test_vision_flops_equal_torch_flop_counter_on_the_hf_tower():
    """A ragged image (windows cut at the edges), both attention kinds: the count equals torch's
    FLOP counter on transformers' tower and merger, parameters too; another size, other FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from bridges.flops import _vision

    cfg = AutoConfig.for_model("qwen2_5_vl", vision_config=dict(
        depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=4, spatial_merge_size=2,
        temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1], out_hidden_size=40))
    cfg.vision_config._attn_implementation = "eager"
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg.vision_config)
    gh, gw = 10, 14  # patches: 5 x 7 merged blocks, windows of 2 x 2
    with FlopCounterMode(display=False) as counter:
        tower(torch.randn(gh * gw, 3 * 2 * 16), grid_thw=torch.tensor([[1, gh, gw]]))
    v = _vision({"vision_config": cfg.vision_config.to_dict()}, (gh * 4, gw * 4))
    assert counter.get_total_flops() == v["vision_tower"][1] + v["projector"][1]
    assert sum(p.numel() for p in tower.parameters()) == v["vision_tower"][0] + v["projector"][0]
    assert _vision({"vision_config": cfg.vision_config.to_dict()}, 64)["vision_tower"][1] != v["vision_tower"][1]


def test_config_check_covers_the_flat_text_fields_and_mrope(conformance):
    """The published file is flat: its text fields (and the rope, M-RoPE sections included)
    are compared after HF -> Megatron -> HF; sections in the wrong order fail there too."""
    good = conformance.describe(resolve(MODEL))["config_check"]
    assert good.passed and good.figure == "17/17 fields kept", good
    bad = conformance.describe(resolve(MODEL), bridge_ref="tests.qwen2_5_vl_mutants:MRopeSectionsSwapped")
    assert not bad["config_check"].passed and "text_config.rope_parameters" in bad["config_check"].details
