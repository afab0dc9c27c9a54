"""Gemma3 with images (the HF vision encoder pattern): config rules that bite (text fields from
text_config with transformers' defaults, the top level's tie), both checkpoint name layouts,
the image mask, and the suite catching each VLM bug by the check expected, the localisation
naming the vision side where the bug is there."""
import json
from pathlib import Path

import pytest
import torch

from bridges.core.auto import AutoBridge
from conformance.models import ModelSpec, resolve
from tests.mutant_case import assert_caught

PUBLISHED = json.loads((Path(__file__).resolve().parents[1] / "fixtures/configs/google/gemma-3-4b-it/config.json").read_text())


def test_text_fields_from_text_config_with_class_defaults():
    b = AutoBridge.from_hf_config(PUBLISHED)  # text_config leaves heads, vocab, head_dim out
    a = b.megatron_attrs()
    assert (a["num_layers"], a["hidden_size"], a["ffn_hidden_size"]) == (34, 2560, 10240)
    assert (a["num_attention_heads"], a["num_query_groups"], a["kv_channels"], a["vocab_size"]) == (8, 4, 256, 262208)
    assert (a["image_token_id"], a["mm_tokens_per_image"], a["window_size"]) == (262144, 256, (1023, 0))
    assert a["share_embeddings_and_output_weights"] and a["seq_len_interpolation_factor"] == 8.0
    assert a["vision_config"]["hidden_size"] == 1152 and a["vision_config"]["num_hidden_layers"] == 27
    # what the bridge writes, transformers reads as the published file
    from transformers import Gemma3Config

    out = b.hf_config_dict()
    assert out["model_type"] == "gemma3" and out["text_config"]["model_type"] == "gemma3_text"
    back, src = (Gemma3Config(**{k: v for k, v in c.items() if k != "model_type"}) for c in (out, PUBLISHED))
    for f in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
              "layer_types", "sliding_window", "query_pre_attn_scalar"):
        assert getattr(back.text_config, f) == getattr(src.text_config, f), f
    assert back.text_config.rope_parameters == src.text_config.rope_parameters
    for f in ("hidden_size", "num_hidden_layers", "image_size", "patch_size", "intermediate_size"):
        assert getattr(back.vision_config, f) == getattr(src.vision_config, f), f
    assert (back.image_token_index, back.mm_tokens_per_image, back.tie_word_embeddings) == (262144, 256, True)


@pytest.mark.parametrize("top,text,tied", [(True, False, True), (False, True, False), (None, False, False)])
def test_top_level_tie_wins(top, text, tied):
    cfg = {**PUBLISHED, "text_config": {**PUBLISHED["text_config"], "tie_word_embeddings": text}}
    if top is not None:
        cfg["tie_word_embeddings"] = top
    else:
        cfg.pop("tie_word_embeddings", None)
        tied = AutoBridge.from_hf_config(cfg).hf_config.tie_word_embeddings  # transformers' default
    assert AutoBridge.from_hf_config(cfg).megatron_attrs()["share_embeddings_and_output_weights"] == tied


def test_image_mask_is_causal_plus_each_image_both_ways():
    from bridges.models.gemma3_vl.modeling_gemma3_vl import image_block_mask

    tt = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]])
    masked = image_block_mask(tt)[0, 0]
    block = [-1, 0, 0, -1, 1, 1, 1, -1]
    for i in range(8):
        for j in range(8):
            allowed = j <= i or (block[i] >= 0 and block[i] == block[j])
            assert bool(masked[i, j]) == (not allowed), (i, j)


def _toy(conformance, spec=None):
    return conformance.checkpoint(spec or resolve("google/gemma-3-4b-it"))


def test_both_checkpoint_layouts_read_and_written_back(conformance, tmp_path):
    """The toy as transformers saves it (legacy: language_model.model., vision_tower.) and the
    same tensors renamed to transformers' in-memory layout (model.language_model., ...): the
    table names exactly the stored tensors either way."""
    from safetensors.torch import load_file, save_file

    toy = _toy(conformance)
    tensors = load_file(f"{toy}/model.safetensors")
    assert any(n.startswith("language_model.model.") for n in tensors)
    legacy = AutoBridge.from_hf_pretrained(toy)
    assert set(legacy.expected_hf_names()) == set(tensors)

    def new(n):
        for old, cur in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector."), ("language_model.lm_head.", "lm_head.")):
            if n.startswith(old):
                return cur + n[len(old):]
        return n

    save_file({new(n): t for n, t in tensors.items()}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(Path(f"{toy}/config.json").read_text())
    renamed = AutoBridge.from_hf_pretrained(tmp_path)
    assert set(renamed.expected_hf_names()) == {new(n) for n in tensors}
    # the published files keep the tower's own vision_model level
    assert all(".vision_model." in n for n in AutoBridge.from_hf_config(PUBLISHED).expected_hf_names()
               if n.startswith("vision_tower."))


# Each VLM bug is caught, by the checks expected; a bug on the vision side is localised there.
MUTANTS = [
    ("ImageMaskDropped", {"logits", "generation"}, "layer 0 attention"),
    ("ImageTokenOffByOne", {"coverage", "roundtrip", "logits", "generation"}, None),
    ("PatchEmbeddingTransposed", {"logits", "generation"}, "vision tower"),
    ("VisionLayersSwapped", {"logits", "generation"}, "vision tower"),
    ("ProjectorNormSwapped", {"logits", "generation"}, "vision tower"),
]


@pytest.mark.parametrize("mutant,expect,where", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_vlm_mutant_is_caught(conformance, mutant, expect, where):
    results = assert_caught(conformance, "google/gemma-3-4b-it", f"tests.gemma3_vl_mutants:{mutant}", expect, where)
    if not where:  # the crash names the image token
        assert "image tokens (id" in results["logits"].details, results["logits"].details


def test_top_level_tie_ignored_is_caught(conformance):
    """A VLM whose text_config says untied but whose top level (what transformers honours) ties."""
    cfg = {**PUBLISHED, "tie_word_embeddings": True,
           "text_config": {**PUBLISHED["text_config"], "tie_word_embeddings": False}}
    spec = ModelSpec("test/gemma3-vl-top-tied", cfg, "fixture")
    assert all(r.passed for r in conformance.case(spec, "tp1pp1").values())
    bad = conformance.case(spec, "tp1pp1", bridge_ref="tests.gemma3_vl_mutants:TopLevelTieIgnored")
    assert not bad["coverage"].passed and "lm_head.weight" in bad["coverage"].details, bad["coverage"].details
