"""Config translation on the published configs in fixtures/configs/: HF -> Megatron fields, the
reverse direction through transformers, the parameter count of the GPTModel Megatron-Core builds
from the provider (on the meta device: nothing is allocated), and the errors.
"""
from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
import torch

from bridges import AutoBridge, ConfigError, UnknownModelError
from bridges.core.parallel import Layout
from bridges.core.registry import lookup

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"

LLAMA31_8B = "meta-llama/Llama-3.1-8B"
LLAMA32_1B = "meta-llama/Llama-3.2-1B"
QWEN25_7B = "Qwen/Qwen2.5-7B-Instruct"
QWEN25_05B = "Qwen/Qwen2.5-0.5B"
QWEN3_8B = "Qwen/Qwen3-8B"
QWEN3_06B = "Qwen/Qwen3-0.6B"
MISTRAL_7B = "mistralai/Mistral-7B-v0.1"
ALL = [LLAMA31_8B, LLAMA32_1B, QWEN25_7B, QWEN25_05B, QWEN3_8B, QWEN3_06B, MISTRAL_7B]


def config_path(model: str) -> str:
    return str(CONFIGS / model / "config.json")


def raw_config(model: str) -> dict:
    return json.loads(Path(config_path(model)).read_text())


def bridge_for(model: str):
    return AutoBridge.from_hf_config(config_path(model))


# -- HF -> Megatron -----------------------------------------------------------------------------
_COMMON = dict(add_bias_linear=False, position_embedding_type="rope",
               params_dtype=torch.bfloat16, attention_dropout=0.0)
EXPECTED = {
    LLAMA31_8B: dict(bridge="LlamaBridge", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                     num_attention_heads=32, num_query_groups=8, kv_channels=128,
                     vocab_size=128256, max_sequence_length=131072, layernorm_epsilon=1e-5,
                     add_qkv_bias=False, qk_layernorm=False,
                     share_embeddings_and_output_weights=False,
                     rope_scaling=True, rope_scaling_factor=8.0, rotary_base=500000.0,
                     seq_len_interpolation_factor=None),
    LLAMA32_1B: dict(bridge="LlamaBridge", num_layers=16, hidden_size=2048, ffn_hidden_size=8192,
                     num_attention_heads=32, num_query_groups=8, kv_channels=64,
                     vocab_size=128256, layernorm_epsilon=1e-5,
                     add_qkv_bias=False, qk_layernorm=False,
                     share_embeddings_and_output_weights=True,
                     rope_scaling=True, rope_scaling_factor=32.0, rotary_base=500000.0),
    QWEN25_7B: dict(bridge="Qwen2Bridge", num_layers=28, hidden_size=3584, ffn_hidden_size=18944,
                    num_attention_heads=28, num_query_groups=4, kv_channels=128,  # 3584 / 28
                    vocab_size=152064, max_sequence_length=32768, layernorm_epsilon=1e-6,
                    add_qkv_bias=True, qk_layernorm=False,
                    share_embeddings_and_output_weights=False,
                    rope_scaling=False, rotary_base=1e6, seq_len_interpolation_factor=None),
    QWEN25_05B: dict(bridge="Qwen2Bridge", num_layers=24, hidden_size=896, ffn_hidden_size=4864,
                     num_attention_heads=14, num_query_groups=2, kv_channels=64,
                     vocab_size=151936, add_qkv_bias=True, qk_layernorm=False,
                     share_embeddings_and_output_weights=True, rope_scaling=False,
                     rotary_base=1e6),
    # Qwen3-8B: head_dim 128 happens to equal 4096 / 32; Qwen3-0.6B: head_dim 128 != 1024 / 16.
    QWEN3_8B: dict(bridge="Qwen3Bridge", num_layers=36, hidden_size=4096, ffn_hidden_size=12288,
                   num_attention_heads=32, num_query_groups=8, kv_channels=128,
                   vocab_size=151936, max_sequence_length=40960, layernorm_epsilon=1e-6,
                   add_qkv_bias=False, qk_layernorm=True,
                   share_embeddings_and_output_weights=False, rope_scaling=False,
                   rotary_base=1e6),
    QWEN3_06B: dict(bridge="Qwen3Bridge", num_layers=28, hidden_size=1024, ffn_hidden_size=3072,
                    num_attention_heads=16, num_query_groups=8, kv_channels=128,
                    vocab_size=151936, add_qkv_bias=False, qk_layernorm=True,
                    share_embeddings_and_output_weights=True, rope_scaling=False,
                    rotary_base=1e6),
    MISTRAL_7B: dict(bridge="MistralBridge", num_layers=32, hidden_size=4096,
                     ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
                     kv_channels=128, vocab_size=32000, layernorm_epsilon=1e-6,
                     add_qkv_bias=False, qk_layernorm=False,
                     share_embeddings_and_output_weights=False, rope_scaling=False,
                     rotary_base=10000.0,
                     # HF attends to the last 4096 positions including the current one;
                     # Megatron's window is (positions to the left, to the right).
                     window_size=(4095, 0)),
}


@pytest.mark.parametrize("model", ALL)
def test_translated_fields(model):
    b = bridge_for(model)
    want = dict(_COMMON, **EXPECTED[model])
    assert type(b).__name__ == want.pop("bridge")
    attrs = b.megatron_attrs()
    got = {k: attrs.get(k, "<absent>") for k in want}
    assert got == want
    assert attrs["activation_func"] is torch.nn.functional.silu
    if model != MISTRAL_7B:
        assert attrs.get("window_size") is None


def test_head_dim_is_decoupled_from_hidden_over_heads():
    a = bridge_for(QWEN3_06B).megatron_attrs()
    assert a["kv_channels"] == 128 != a["hidden_size"] // a["num_attention_heads"]
    # Without head_dim the default is hidden / heads.
    raw = raw_config(QWEN25_7B)
    assert "head_dim" not in raw
    assert bridge_for(QWEN25_7B).megatron_attrs()["kv_channels"] == 3584 // 28


@pytest.mark.parametrize("model", ALL)
def test_only_qwen2_has_qkv_bias_and_only_qwen3_has_qk_norm(model):
    a = bridge_for(model).megatron_attrs()
    assert a["add_qkv_bias"] is (raw_config(model)["model_type"] == "qwen2")
    assert a["qk_layernorm"] is (raw_config(model)["model_type"] == "qwen3")


@pytest.mark.parametrize("model", ALL)
def test_bridge_from_dict_object_and_path_agree(model):
    from transformers import AutoConfig

    raw = raw_config(model)
    kw = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    obj = AutoConfig.for_model(raw["model_type"], **kw)
    a = bridge_for(model).megatron_attrs()
    assert AutoBridge.from_hf_config(raw).megatron_attrs() == a
    assert AutoBridge.from_hf_config(obj).megatron_attrs() == a
    assert AutoBridge.from_hf_config(str(CONFIGS / model)).megatron_attrs() == a  # a directory


def test_rope_variants():
    raw = raw_config(LLAMA31_8B)
    linear = dict(raw, rope_scaling={"rope_type": "linear", "factor": 2.0})
    a = AutoBridge.from_hf_config(linear).megatron_attrs()
    assert (a["rope_scaling"], a["seq_len_interpolation_factor"]) == (False, 2.0)
    legacy = dict(raw, rope_scaling={"type": "linear", "factor": 4.0})  # pre-rope_type spelling
    assert AutoBridge.from_hf_config(legacy).megatron_attrs()["seq_len_interpolation_factor"] == 4.0
    yarn = dict(raw, rope_scaling=None, max_position_embeddings=32768,
                rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                 "original_max_position_embeddings": 8192})
    a = AutoBridge.from_hf_config(yarn).megatron_attrs()
    assert a["position_embedding_type"] == "yarn" and a["yarn_rotary_scaling_factor"] == 4.0
    assert a["yarn_original_max_position_embeddings"] == 8192 and a["rotary_base"] == 1e6
    default = dict(raw, rope_scaling=None)
    a = AutoBridge.from_hf_config(default).megatron_attrs()
    assert (a["rope_scaling"], a["seq_len_interpolation_factor"], a["rotary_base"]) == \
        (False, None, 500000.0)


# -- Megatron -> HF -----------------------------------------------------------------------------
def _norm(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v


# Fields some config classes do not define, with the value the HF modeling code then uses
# (Qwen2Attention: getattr(config, "head_dim", hidden // heads); Mistral has no attention bias).
_IMPLICIT = {"head_dim": lambda c: c.hidden_size // c.num_attention_heads,
             "attention_bias": lambda c: False}


def _effective(cfg, key):
    if key in _IMPLICIT and not hasattr(cfg, key):
        return _IMPLICIT[key](cfg)
    return _norm(getattr(cfg, key))


@pytest.mark.parametrize("model", ALL)
def test_hf_config_dict_loads_back_into_transformers(model):
    from transformers import AutoConfig

    b = bridge_for(model)
    d = b.hf_config_dict()
    rest = {k: v for k, v in d.items() if k != "model_type"}
    back = AutoConfig.for_model(d["model_type"], **rest)
    assert type(back) is type(b.hf_config)
    assert back.architectures == raw_config(model)["architectures"]
    mapped = [k for k in d if k not in ("model_type", "architectures")]
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps",
                "tie_word_embeddings", "rope_parameters", "hidden_act", "dtype"):
        assert key in mapped
    for key in mapped:
        assert _norm(getattr(back, key)) == _effective(b.hf_config, key), key
    # And the reloaded config translates to the same Megatron attributes.
    assert AutoBridge.from_hf_config(back).megatron_attrs() == b.megatron_attrs()


def test_mistral_sliding_window_roundtrip():
    d = bridge_for(MISTRAL_7B).hf_config_dict()
    assert d["sliding_window"] == 4096
    raw = dict(raw_config(MISTRAL_7B), sliding_window=None)
    b = AutoBridge.from_hf_config(raw)
    assert b.megatron_attrs()["window_size"] is None
    assert b.hf_config_dict()["sliding_window"] is None


# -- parameter count of the real Megatron-Core model ---------------------------------------------
@pytest.fixture(scope="module")
def megatron_world():
    """torch.distributed (world size 1, gloo) + Megatron model-parallel state at tp1pp1, set up
    once for the module (importing megatron.core costs seconds). The process group is left up
    for later modules; a model-parallel layout another module had set is restored."""
    from megatron.core import parallel_state as ps

    from bridges.core.parallel import current_layout, init_model_parallel

    before = current_layout() if ps.model_parallel_is_initialized() else None
    if before != Layout():
        init_model_parallel(Layout())
    yield
    if before is not None and before != Layout():
        init_model_parallel(before)


# Published sizes (model cards). For the tied models the embedding counts once.
PUBLISHED = {
    LLAMA31_8B: 8.03e9,
    LLAMA32_1B: 1.24e9,
    QWEN25_7B: 7.62e9,
    QWEN3_8B: 8.19e9,
    MISTRAL_7B: 7.24e9,
    QWEN25_05B: 0.49e9,
    QWEN3_06B: 0.6e9,
}
# Qwen model cards also publish the non-embedding size.
PUBLISHED_NON_EMBEDDING = {QWEN25_7B: 6.53e9, QWEN3_8B: 6.95e9, QWEN25_05B: 0.36e9,
                           QWEN3_06B: 0.44e9}


def build_on_meta(provider):
    """GPTModel built under the meta device: shapes only, no storage. Asserts nothing was
    materialised (every parameter is on meta, the process grew by far less than the model)."""
    rss = psutil.Process().memory_info().rss
    with torch.device("meta"):
        model = provider.provide(pre_process=True, post_process=True)
    grown = psutil.Process().memory_info().rss - rss
    params = list(model.parameters())
    assert params and all(p.is_meta for p in params), \
        "the model was materialised despite the meta device"
    assert grown < 128 * 2**20, f"building on meta grew the process by {grown / 2**20:.0f} MiB"
    return model


def count_params(model, provider) -> tuple[int, int]:
    """(total, embedding) unique parameters, with Megatron's vocab padding taken out.

    Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by * TP; the padding
    rows are not part of the published model, so they are subtracted here, once per vocab-sized
    matrix (the input embedding, and the output layer when it is not tied). Tied weights are one
    parameter and count once (unique by identity).
    """
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    vocab_mats = {id(p): p for p in (model.embedding.word_embeddings.weight,
                                     getattr(model.output_layer, "weight", None))
                  if p is not None}
    padding = provider.padded_vocab_size - provider.vocab_size
    for p in vocab_mats.values():
        assert p.shape == (provider.padded_vocab_size, provider.hidden_size)
    total -= padding * provider.hidden_size * len(vocab_mats)
    embedding = sum(p.numel() for p in vocab_mats.values()) \
        - padding * provider.hidden_size * len(vocab_mats)
    return total, embedding


@pytest.mark.parametrize("model", ALL)
def test_megatron_parameter_count_matches_published_size(model, megatron_world):
    b = bridge_for(model)
    provider = b.to_megatron_provider()
    provider.finalize()
    m = build_on_meta(provider)
    total, embedding = count_params(m, provider)
    assert total == pytest.approx(PUBLISHED[model], rel=0.01)
    tied = provider.share_embeddings_and_output_weights
    assert embedding == provider.vocab_size * provider.hidden_size * (1 if tied else 2)
    if model in PUBLISHED_NON_EMBEDDING:
        assert total - embedding == pytest.approx(PUBLISHED_NON_EMBEDDING[model], rel=0.01)


@pytest.mark.parametrize("model,multiple", [(LLAMA32_1B, 1000), (MISTRAL_7B, 384)])
def test_parameter_count_with_padded_vocab(model, multiple, megatron_world):
    # The published configs' vocabularies all divide by 128; force padding to see that the
    # built model really carries the padded rows and that the count takes them out again.
    provider = bridge_for(model).to_megatron_provider()
    baseline, _ = count_params(build_on_meta(provider), provider)
    provider.make_vocab_size_divisible_by = multiple
    assert provider.padded_vocab_size > provider.vocab_size
    m = build_on_meta(provider)
    assert m.embedding.word_embeddings.weight.shape[0] == provider.padded_vocab_size
    assert count_params(m, provider)[0] == baseline


def test_layer_structure_of_built_model(megatron_world):
    provider = bridge_for(QWEN3_06B).to_megatron_provider()
    m = build_on_meta(provider)
    names = dict(m.named_parameters())
    qkv = names["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == ((16 + 2 * 8) * 128, 1024)  # head_dim 128, not 1024 / 16
    assert names["decoder.layers.0.self_attention.linear_proj.weight"].shape == (1024, 16 * 128)
    assert names["decoder.layers.0.self_attention.q_layernorm.weight"].shape == (128,)
    assert names["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 3072, 1024)
    assert "output_layer.weight" not in names  # tied: one parameter
    assert len([n for n in names if n.endswith("input_layernorm.weight")]) == 28
    provider = bridge_for(QWEN25_05B).to_megatron_provider()
    names = dict(build_on_meta(provider).named_parameters())
    assert names["decoder.layers.0.self_attention.linear_qkv.bias"].shape == ((14 + 2 * 2) * 64,)


# -- errors ---------------------------------------------------------------------------------------
def test_unknown_model_type_lists_supported():
    with pytest.raises(UnknownModelError) as e:
        AutoBridge.from_hf_config({"model_type": "no-such-model", "architectures": ["NoSuchLM"]})
    msg = str(e.value)
    assert "no-such-model" in msg
    for t in ("llama", "mistral", "qwen2", "qwen3"):
        assert t in msg


def test_unknown_model_type_but_known_architecture_uses_that_bridge():
    raw = dict(raw_config(LLAMA31_8B), model_type="my-llama")
    b = AutoBridge.from_hf_config(raw)
    assert type(b).__name__ == "LlamaBridge"
    assert b.megatron_attrs() == bridge_for(LLAMA31_8B).megatron_attrs()


def test_missing_model_type():
    raw = raw_config(LLAMA31_8B)
    del raw["model_type"]
    with pytest.raises(ConfigError, match="model_type"):
        AutoBridge.from_hf_config(raw)


@pytest.mark.parametrize("field", ["num_hidden_layers", "hidden_size", "intermediate_size",
                                   "num_attention_heads", "vocab_size",
                                   "max_position_embeddings"])
def test_missing_required_field_names_it(field):
    # A model type transformers does not know: the bridge reads the dict itself.
    raw = dict(raw_config(LLAMA31_8B), model_type="my-llama")
    del raw[field]
    with pytest.raises(ConfigError, match=repr(field)):
        AutoBridge.from_hf_config(raw).megatron_attrs()
    # The same straight on a bridge over the raw dict.
    raw = raw_config(QWEN3_8B)
    del raw[field]
    with pytest.raises(ConfigError, match=repr(field)):
        lookup(raw)(raw).megatron_attrs()


def test_null_required_field_names_it():
    raw = dict(raw_config(LLAMA31_8B), num_hidden_layers=None)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        AutoBridge.from_hf_config(raw).megatron_attrs()


def test_missing_field_in_known_model_type_is_not_silently_defaulted():
    raw = raw_config(LLAMA31_8B)
    del raw["vocab_size"]
    with pytest.raises(ConfigError, match="vocab_size"):
        AutoBridge.from_hf_config(raw).megatron_attrs()


@pytest.mark.parametrize("rope", [
    {"rope_type": "dynamic", "factor": 2.0},
    {"type": "dynamic", "factor": 2.0},  # legacy spelling
    {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 64,
     "long_factor": [1.0] * 64, "original_max_position_embeddings": 8192},
], ids=["dynamic", "dynamic-legacy", "longrope"])
def test_unsupported_rope_type(rope):
    raw = dict(raw_config(LLAMA31_8B), rope_scaling=rope)
    kind = rope.get("rope_type", rope.get("type"))
    with pytest.raises(ConfigError) as e:
        AutoBridge.from_hf_config(raw).megatron_attrs()
    assert "rope_type" in str(e.value) and repr(kind) in str(e.value)


@pytest.mark.parametrize("key,value", [("low_freq_factor", 2.0), ("high_freq_factor", 2.0),
                                       ("original_max_position_embeddings", 4096)])
def test_llama3_rope_constants_megatron_cannot_express(key, value):
    raw = raw_config(LLAMA31_8B)
    raw["rope_scaling"] = dict(raw["rope_scaling"], **{key: value})
    with pytest.raises(ConfigError, match=key):
        AutoBridge.from_hf_config(raw).megatron_attrs()


def test_unsupported_activation_and_biases():
    raw = dict(raw_config(LLAMA31_8B), hidden_act="tanh")
    with pytest.raises(ConfigError, match="hidden_act"):
        AutoBridge.from_hf_config(raw).megatron_attrs()
    for field in ("attention_bias", "mlp_bias"):
        raw = dict(raw_config(LLAMA31_8B), **{field: True})
        with pytest.raises(ConfigError, match=field):
            AutoBridge.from_hf_config(raw).megatron_attrs()


@pytest.mark.parametrize("model,family", [(QWEN25_7B, "qwen2"), (QWEN3_8B, "qwen3")])
def test_qwen_sliding_window_is_refused_not_silently_dropped(model, family):
    raw = dict(raw_config(model), use_sliding_window=True, sliding_window=4096,
               max_window_layers=4)
    b = AutoBridge.from_hf_config(raw)
    with pytest.raises(ConfigError, match=r"layer_types has sliding_attention layers "
                       r"\(use_sliding_window=True\): per-layer sliding windows are not supported "
                       rf"by the {family} bridge"):
        b.megatron_attrs()


def test_unsupported_dtype():
    raw = dict(raw_config(LLAMA31_8B), torch_dtype="float8_e4m3fn")
    raw.pop("dtype", None)
    with pytest.raises(ConfigError, match="dtype"):
        AutoBridge.from_hf_config(raw).megatron_attrs()


# -- provider.finalize(): layouts that do not divide the model -------------------------------------
@pytest.mark.parametrize("model,layout,expect", [
    (LLAMA31_8B, Layout(tp=3), "num_attention_heads=32 does not divide by TP=3"),
    (QWEN25_05B, Layout(tp=4), "num_attention_heads=14 does not divide by TP=4"),
    (LLAMA31_8B, Layout(tp=16), "num_query_groups=8 does not divide by TP=16"),
    (QWEN25_7B, Layout(tp=7), "num_query_groups=4 does not divide by TP=7"),
    (QWEN3_06B, Layout(tp=16), "num_query_groups=8 does not divide by TP=16"),
    (LLAMA31_8B, Layout(pp=3), "num_layers=32 does not divide by PP x VPP=3"),
    (QWEN25_7B, Layout(pp=8), "num_layers=28 does not divide by PP x VPP=8"),
    (LLAMA31_8B, Layout(pp=4, vpp=3), "num_layers=32 does not divide by PP x VPP=12"),
    (QWEN3_8B, Layout(tp=2, pp=4, vpp=2), "num_layers=36 does not divide by PP x VPP=8"),
])
def test_finalize_rejects_layouts_that_do_not_divide(model, layout, expect):
    p = bridge_for(model).to_megatron_provider()
    p.tensor_model_parallel_size = layout.tp
    p.pipeline_model_parallel_size = layout.pp
    p.virtual_pipeline_model_parallel_size = layout.vpp
    with pytest.raises(ConfigError) as e:
        p.finalize()
    assert str(e.value) == f"layout {layout.name}: {expect}"


def test_finalize_rejects_ffn_and_group_mismatch():
    # No published config trips these at a sensible TP, so edit the provider.
    p = bridge_for(LLAMA31_8B).to_megatron_provider()
    p.tensor_model_parallel_size = 2
    p.ffn_hidden_size = 14337
    with pytest.raises(ConfigError, match="layout tp2: ffn_hidden_size=14337 does not divide by TP=2"):
        p.finalize()
    p = bridge_for(LLAMA31_8B).to_megatron_provider()
    p.num_query_groups = 6
    p.tensor_model_parallel_size = 2
    with pytest.raises(ConfigError, match="num_attention_heads=32 does not divide by "
                                          "num_query_groups=6"):
        p.finalize()


@pytest.mark.parametrize("model,layout", [
    (LLAMA31_8B, Layout(tp=8, pp=4, vpp=2)),
    (LLAMA32_1B, Layout(tp=2, pp=2, vpp=4)),
    (QWEN25_7B, Layout(tp=4, pp=7)),
    (QWEN25_05B, Layout(tp=2, pp=3)),
    (QWEN3_8B, Layout(tp=8, pp=4, vpp=3)),
    (MISTRAL_7B, Layout(tp=8, pp=8)),
])
def test_finalize_accepts_layouts_that_divide(model, layout):
    p = bridge_for(model).to_megatron_provider()
    p.tensor_model_parallel_size = layout.tp
    p.pipeline_model_parallel_size = layout.pp
    p.virtual_pipeline_model_parallel_size = layout.vpp
    assert p.finalize() is p and p.layout == layout
    assert p.padded_vocab_size % (128 * layout.tp) == 0


def test_finalize_rejects_other_bad_layouts():
    p = bridge_for(LLAMA31_8B).to_megatron_provider()
    p.virtual_pipeline_model_parallel_size = 2  # PP stays 1
    with pytest.raises(ConfigError, match="virtual pipeline needs PP >= 2"):
        p.finalize()
    p = bridge_for(LLAMA31_8B).to_megatron_provider()
    p.tensor_model_parallel_size = 2
    p.make_vocab_size_divisible_by = None  # padding off, vocab odd
    p.vocab_size = 128257
    with pytest.raises(ConfigError) as e:
        p.finalize()
    assert "vocab_size=128257" in str(e.value) and "layout tp2" in str(e.value)
    p.vocab_size = 128256  # even: fine without padding
    p.finalize()


def test_a_config_path_with_transformers_tagged_infinity_reads(tmp_path):
    """transformers 5 writes an infinite float as {"__float__": "Infinity"} (Nemotron-H's
    time_step_limit); a directory's config.json is read as such, as a checkpoint's is."""
    import json

    from bridges.core.auto import AutoBridge
    from conformance.models import resolve

    cfg = {**resolve("nvidia/Nemotron-H-56B-Base-8K").config, "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    bridge = AutoBridge.from_hf_config(tmp_path)
    assert bridge.megatron_attrs()["hybrid_layer_pattern"]


def test_registry_refuses_a_second_class_and_takes_back_a_reimported_one():
    """A key registered to another class is a conflict; the same class imported again (pytester's
    in-process runs drop modules from sys.modules, a later import makes the class anew) is not."""
    import types

    from bridges.core import registry
    from bridges.core.bridge import Bridge

    def make(name: str):
        return types.new_class(name, (Bridge,), exec_body=lambda ns: ns.update(__module__="tests.fake_family"))

    saved = dict(registry._BY_TYPE), dict(registry._BY_ARCH)
    try:
        first = registry.register_bridge("fake_family_xyz", ["FakeForCausalLM"])(make("FakeBridge"))
        again = registry.register_bridge("fake_family_xyz", ["FakeForCausalLM"])(make("FakeBridge"))
        assert again is not first and registry._BY_TYPE["fake_family_xyz"] is again
        with pytest.raises(ValueError, match="'fake_family_xyz' is already registered to FakeBridge"):
            registry.register_bridge("fake_family_xyz")(make("OtherBridge"))
    finally:
        registry._BY_TYPE.clear(); registry._BY_TYPE.update(saved[0])
        registry._BY_ARCH.clear(); registry._BY_ARCH.update(saved[1])


def test_yarn_config_class_needs_no_module_in_sys_modules(monkeypatch):
    """GPT-OSS's YaRN TransformerConfig subclass is made without looking up its module (a lookup
    that failed once bridges.core.gpt had left sys.modules, and the FLOPs calculator then counted
    LayerNorm norms from defaults)."""
    import sys

    from bridges.core import gpt

    gpt.yarn_transformer_config.cache_clear()
    monkeypatch.delitem(sys.modules, "bridges.core.gpt")
    cls = gpt.yarn_transformer_config()
    assert cls.__dataclass_fields__["yarn_beta_fast"].default == 32.0
    gpt.yarn_transformer_config.cache_clear()
