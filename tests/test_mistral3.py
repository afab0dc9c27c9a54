"""Mistral3 / Ministral-3 (the HF vision encoder pattern with a Pixtral tower): the published
config (YaRN and the Llama-4 query scale), the query scale against transformers', both language
models a mistral3 config can name, the FP8 'static' layout the published weights use, FLOPs and
parameters, and the suite catching each bug of the family, where the bug is."""
import json
from pathlib import Path

import pytest
import torch

from bridges.core.auto import AutoBridge
from conformance.models import ModelSpec, resolve
from tests.mutant_case import assert_caught

MODEL = "mistralai/Devstral-Small-2-24B-Instruct-2512"
PUBLISHED = resolve(MODEL).config


def test_published_config_and_transformers_reads_it_back():
    from transformers import Mistral3Config

    b = AutoBridge.from_hf_config(PUBLISHED)
    a = b.megatron_attrs()
    assert type(b.language).__name__ == "Ministral3Bridge"
    assert (a["num_layers"], a["hidden_size"], a["ffn_hidden_size"], a["vocab_size"]) == (40, 5120, 32768, 131072)
    assert (a["num_attention_heads"], a["num_query_groups"], a["kv_channels"]) == (32, 8, 128)
    assert (a["position_embedding_type"], a["yarn_rotary_scaling_factor"], a["yarn_original_max_position_embeddings"],
            a["rotary_base"]) == ("yarn", 48.0, 8192, 1e8)
    assert (a["llama_4_scaling_beta"], a["llama_4_scaling_period"], a["image_token_id"]) == (0.1, 8192, 10)
    assert not a["share_embeddings_and_output_weights"] and a["vision_config"]["patch_size"] == 14
    assert b.megatron_lm and "llama_4_scaling_beta" in b.language.megatron_lm
    out = b.hf_config_dict()
    back, src = (Mistral3Config(**{k: v for k, v in c.items() if k != "model_type"}) for c in (out, PUBLISHED))
    assert back.text_config.model_type == "ministral3"
    drop = {"type"}  # the legacy spelling of rope_type, said twice in the published file
    assert {k: v for k, v in back.text_config.rope_parameters.items() if k not in drop} == \
        {k: v for k, v in src.text_config.rope_parameters.items() if k not in drop}
    for f in ("image_token_id", "spatial_merge_size", "vision_feature_layer", "projector_hidden_act"):
        assert getattr(back, f) == getattr(src, f), f


def test_parameters_match_transformers():
    """The FLOPs calculator's parameter count (language, Pixtral tower, projector) equals the
    parameters of transformers' model for the published config."""
    from bridges.core.vlm import meta_model
    from bridges.flops import training_flops

    model = meta_model({k: v for k, v in PUBLISHED.items() if k != "quantization_config"})
    params = training_flops(AutoBridge.from_hf_config(PUBLISHED), seq_len=4096, batch_size=1).as_dict()["params"]
    assert params["total"] == sum(p.numel() for p in model.parameters()) == 24_011_361_280
    assert params["by_component"]["vision_tower"] == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert params["by_component"]["projector"] == sum(p.numel() for p in model.model.multi_modal_projector.parameters())


def test_pixtral_flops_by_hand():
    from bridges.models.mistral3.mistral3_bridge import pixtral_flops

    attrs = {"vision_config": {"model_type": "pixtral", "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "head_dim": 4, "patch_size": 2, "image_size": 16},
             "spatial_merge_size": 2, "hidden_size": 10, "multimodal_projector_bias": False, "vision_feature_layer": -1}
    f = pixtral_flops(attrs, (8, 4))  # 4 x 2 patches -> 2 x 1 merged tokens
    n, d = 8, 8
    assert f["vision_tower"] == (3 * 4 * d + d + 2 * (2 * d + 4 * d * d + 3 * d * 12),
                                 2 * n * 3 * 4 * d + 2 * (2 * n * (4 * d * d + 3 * d * 12) + 4 * n * n * d))
    assert f["projector"] == (d + 4 * d * d + d * 10 + 100, 2 * 2 * (4 * d * d + d * 10 + 100))
    from bridges.flops import FlopsError

    with pytest.raises(FlopsError, match="multiple of patch_size x spatial_merge_size = 4"):
        pixtral_flops(attrs, (6, 4))


def test_query_scale_matches_transformers():
    from transformers.models.ministral3.modeling_ministral3 import get_llama_4_attn_scale

    from bridges.models.ministral3.modeling_ministral3 import attention_scale

    pos = torch.tensor([[0, 7, 8, 9, 63, 64, 1000, 5000]])
    ref = get_llama_4_attn_scale(pos, 0.1, 8)[:, 0, :, 0]
    assert torch.equal(attention_scale(pos, 0.1, 8), ref) and ref[0, 0] == 1 and ref[0, -1] > 1.6


def test_the_query_scale_period_is_required():
    from bridges.core.config import ConfigError

    text = {**PUBLISHED["text_config"], "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                            "llama_4_scaling_beta": 0.1}}
    with pytest.raises(ConfigError, match="llama_4_scaling_beta is set without rope_parameters.original_max_position_embeddings"):
        AutoBridge.from_hf_config(text).megatron_attrs()


def test_unknown_language_model_is_refused():
    from bridges.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"text_config.model_type='llama'.*\['ministral3', 'mistral'\]"):
        AutoBridge.from_hf_config({**PUBLISHED, "text_config": {**PUBLISHED["text_config"], "model_type": "llama"}})


def _case_passes(conformance, spec, layouts=("tp1pp1",)):
    for layout in layouts:
        bad = [str(r) for r in conformance.case(spec, layout).values() if not r.passed]
        assert not bad, f"{spec.name} {layout}:\n" + "\n".join(bad)


def test_mistral_small_language_model(conformance):
    """Mistral-Small-3.1 (transformers' Mistral3Config defaults): a ``mistral`` text model,
    plain rope, tied at the top level; it converts, runs like HF at TP2 and exports a mistral
    text config."""
    from transformers import Mistral3Config

    cfg = {**Mistral3Config().to_diff_dict(), "model_type": "mistral3",
           "architectures": ["Mistral3ForConditionalGeneration"], "dtype": "bfloat16"}
    b = AutoBridge.from_hf_config(cfg)
    assert type(b.language).__name__ == "MistralBridge" and b.hf_config_dict()["text_config"]["model_type"] == "mistral"
    assert b.megatron_attrs()["share_embeddings_and_output_weights"]  # the class's top-level tie
    _case_passes(conformance, ModelSpec("test/mistral-small-3.1", cfg, "fixture"), ("tp1pp1", "tp2"))


def test_ministral3_text_only(conformance):
    """Ministral3ForCausalLM on its own (the text family), its query scale included."""
    cfg = {**PUBLISHED["text_config"], "architectures": ["Ministral3ForCausalLM"], "dtype": "bfloat16"}
    _case_passes(conformance, ModelSpec("test/ministral3-text", cfg, "fixture"), ("tp1pp1", "pp2"))


def test_yarn_on_a_gqa_family(conformance):
    """YaRN rope on a plain GPT family (Qwen3's long-context setting): GPTModel's YaRN
    embedding reads fields only Megatron-Core's MLA config had; the bridge's config has them."""
    cfg = dict(resolve("Qwen/Qwen3-8B").config)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
    b = AutoBridge.from_hf_config(cfg)
    assert b.config_class.__name__ == "YarnTransformerConfig"
    _case_passes(conformance, ModelSpec("test/qwen3-yarn", cfg, "fixture"))


def test_static_fp8_at_tp2(conformance, spec):
    r = conformance.quant_case(spec(MODEL), "static", layout="tp2")
    assert all(x.passed for x in r.values()), [str(x) for x in r.values()]


def test_static_fp8_checkpoint_round_trips_through_megatron(conformance, spec, tmp_path):
    """The published layout (per-tensor weight_scale_inv, static activation_scale, vision side
    and lm_head unquantized) -> Megatron TP2 (dequantized) -> HF FP8 at PP2: every stored
    tensor back bit-exactly; a dequantized export writes values only, without the scales."""
    from bridges.core.hf_io import HFCheckpoint
    from conformance.toy import make_fp8_checkpoint

    toy = conformance.checkpoint(spec(MODEL))
    fp8, _ = make_fp8_checkpoint(toy, tmp_path / "toys", "static")
    src = HFCheckpoint(fp8)
    assert any(n.endswith("activation_scale") for n in src.names())
    assert all(src.shape(n) == () for n in src.names() if n.endswith(("_scale_inv", "activation_scale")))
    assert not [n for n in src.names() if n.startswith(("vision_tower.", "multi_modal_projector.", "language_model.lm_head"))
                and src.dtype(n) == torch.float8_e4m3fn]
    qc = json.loads((Path(fp8) / "config.json").read_text())["quantization_config"]
    assert qc["weight_block_size"] is None and qc["activation_scheme"] == "static"
    mc = tmp_path / "m"
    run = lambda argv: conformance.pool.run("tests.convert_tasks:cli", argv=argv)  # noqa: E731
    assert run(["convert", "import", "--hf", fp8, "--out", str(mc), "--tp", "2", "--dtype", "float32"]) == [0] * 4
    assert run(["convert", "export", "--megatron", str(mc), "--out", str(tmp_path / "q"), "--pp", "2", "--fp8"]) == [0] * 4
    from tests.convert_tasks import assert_same_checkpoint

    assert_same_checkpoint(src, HFCheckpoint(tmp_path / "q"))
    assert run(["convert", "export", "--megatron", str(mc), "--out", str(tmp_path / "d")]) == [0] * 4
    deq = HFCheckpoint(tmp_path / "d")
    assert not [n for n in deq.names() if n.endswith(("_scale_inv", "activation_scale"))]
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())


# Each bug is caught, by the checks expected; a bug on the vision side is localised there.
MUTANTS = [
    ("Llama4ScalingDropped", {"logits", "generation"}, None),
    ("YarnIgnored", {"logits", "generation"}, None),
    ("ImageTokenOffByOne", {"coverage", "roundtrip", "logits", "generation"}, None),
    ("ImageSizesIgnored", {"coverage", "roundtrip", "logits", "generation"}, None),
    ("PatchEmbeddingTransposed", {"logits", "generation"}, "vision tower"),
    ("VisionLayersSwapped", {"logits"}, "vision tower"),
    ("ProjectorNormSwapped", {"logits", "generation"}, "vision tower"),
]


@pytest.mark.parametrize("mutant,expect,where", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(conformance, mutant, expect, where):
    results = assert_caught(conformance, MODEL, f"tests.mistral3_mutants:{mutant}", expect, where)
    if mutant in ("ImageTokenOffByOne", "ImageSizesIgnored"):  # the crash names the image token
        assert "image tokens (id" in results["logits"].details, results["logits"].details
    if mutant == "Llama4ScalingDropped":
        assert results["logits"].data["divergence"].startswith("layer 0"), results["logits"].details


def test_top_level_tie_ignored_is_caught(conformance):
    cfg = {**PUBLISHED, "tie_word_embeddings": True,
           "text_config": {**PUBLISHED["text_config"], "tie_word_embeddings": False}}
    spec = ModelSpec("test/mistral3-top-tied", cfg, "fixture")
    assert all(r.passed for r in conformance.case(spec, "tp1pp1").values())
    bad = conformance.case(spec, "tp1pp1", bridge_ref="tests.mistral3_mutants:TopLevelTieIgnored")
    assert not bad["coverage"].passed and "lm_head.weight" in bad["coverage"].details, bad["coverage"].details


@pytest.mark.parametrize("mutant,message", [
    ("ScaleInvIgnored", "a quantized tensor loaded without its scale?"),
    ("ActivationScalesDropped", "activation_scale: missing from the FP8 re-export"),
])
def test_static_fp8_mutant_is_caught(conformance, spec, mutant, message):
    bad = conformance.quant_case(spec(MODEL), "static", bridge_ref=f"tests.mistral3_mutants:{mutant}")
    assert not bad["quant"].passed and message in bad["quant"].details, bad["quant"].details
