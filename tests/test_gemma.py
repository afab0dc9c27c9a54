"""Gemma, Gemma2, Gemma3 (text): the zero-centred norm against transformers', config rules that
bite (legacy "gelu", tied by default, derived layer patterns, two rope bases, null caps), any
sliding pattern converting, and the suite catching each Gemma bug by the check expected."""
import json
from pathlib import Path

import pytest
import torch

from bridges.core.auto import AutoBridge
from bridges.core.config import ConfigError
from conformance.models import ModelSpec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures/configs/google"


def _cfg(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


# gemma-3-4b-it's language model as a gemma3_text config (the fixture is the whole VLM): the
# published text_config's values with the rest of Gemma3TextConfig's defaults written out
TEXT_4B = json.loads((Path(__file__).parent / "data/gemma-3-4b-it-text.json").read_text())


def _spec(name: str):
    from conformance.models import resolve

    return ModelSpec("test/gemma-3-4b-it-text", TEXT_4B, "fixture") if name == "gemma-3-4b-it-text" \
        else resolve(name)


def _attrs(cfg: dict) -> dict:
    return AutoBridge.from_hf_config(cfg).megatron_attrs()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_centred_norm_is_transformers_gemma_norm(dtype):
    from types import SimpleNamespace

    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    from bridges.models.gemma.modeling_gemma import ZeroCenteredRMSNorm

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, generator=g).to(dtype)
    x = (torch.randn(3, 5, 64, generator=g) * 0.02).to(dtype)
    hf = GemmaRMSNorm(64, eps=1e-6).to(dtype)
    hf.weight.data.copy_(w)
    cfg = SimpleNamespace(params_dtype=dtype, sequence_parallel=False, layernorm_zero_centered_gamma=True)
    ours = ZeroCenteredRMSNorm(cfg, 64, eps=1e-6)
    ours.weight.data.copy_(w)
    assert torch.equal(ours(x), hf(x))  # bit-equal: fp32 inside, cast back, as HF
    plain = ZeroCenteredRMSNorm(SimpleNamespace(**{**vars(cfg), "layernorm_zero_centered_gamma": False}), 64)
    plain.weight.data.copy_(w)
    assert not torch.allclose(plain(x).float(), hf(x).float())  # the flag is what adds the 1


def test_gemma_config_rules():
    a = _attrs(_cfg("gemma-2b"))
    # published "gelu" is transformers' tanh approximation; tied although the file does not say
    assert a["activation_func"](torch.tensor([1.0])) == torch.nn.functional.gelu(torch.tensor([1.0]), approximate="tanh")
    assert a["share_embeddings_and_output_weights"] is True
    assert a["layernorm_zero_centered_gamma"] is True
    assert (a["kv_channels"], a["num_attention_heads"], a["num_query_groups"]) == (256, 8, 1)


def test_gemma2_config_rules():
    a = _attrs(_cfg("gemma-2-9b"))
    assert a["softmax_scale"] == 256 ** -0.5
    assert (a["attn_logit_softcapping"], a["final_logit_softcapping"]) == (50.0, 30.0)
    assert a["window_size"] == (4095, 0) and a["window_attn_skip_freq"][:4] == [1, 0, 1, 0]
    # caps left out take transformers' defaults; an explicit null means none
    cfg = {k: v for k, v in _cfg("gemma-2-9b").items() if not k.endswith("softcapping")}
    assert _attrs(cfg)["attn_logit_softcapping"] == 50.0
    assert _attrs({**cfg, "attn_logit_softcapping": None})["attn_logit_softcapping"] is None


def test_gemma3_layer_pattern_and_rope_bases():
    cfg = TEXT_4B
    b = AutoBridge.from_hf_config(cfg)
    a = b.megatron_attrs()
    assert a["window_attn_skip_freq"][:12] == [1, 1, 1, 1, 1, 0] * 2  # every 6th layer global
    assert (a["rotary_base"], a["local_rotary_base"], a["seq_len_interpolation_factor"]) == (1e6, 1e4, 8.0)
    # what the bridge writes is transformers 5's form, and reads back the same
    out = b.hf_config_dict()
    assert out["rope_parameters"] == {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    back = _attrs({**out, "num_hidden_layers": cfg["num_hidden_layers"]})
    for k in ("window_attn_skip_freq", "window_size", "rotary_base", "local_rotary_base",
              "seq_len_interpolation_factor", "softmax_scale"):
        assert back[k] == a[k], k
    # and transformers reads it as the published file
    from transformers import Gemma3TextConfig

    t = Gemma3TextConfig(**{k: v for k, v in out.items() if k != "model_type"})
    assert t.layer_types == Gemma3TextConfig(**{k: v for k, v in cfg.items() if k != "model_type"}).layer_types
    assert t.rope_parameters["sliding_attention"]["rope_theta"] == 1e4


def test_gemma3_any_pattern_and_refusals():
    cfg = _cfg("gemma-3-1b-it")
    types = ["full_attention", "sliding_attention", "sliding_attention"] * 2
    a = _attrs({**cfg, "num_hidden_layers": 6, "layer_types": types})
    assert a["window_attn_skip_freq"] == [0, 1, 1, 0, 1, 1]
    assert _attrs({**cfg, "num_hidden_layers": 4, "sliding_window_pattern": 2})["window_attn_skip_freq"] == [1, 0, 1, 0]
    assert _attrs({**cfg, "layer_types": ["full_attention"] * 26})["window_size"] is None
    with pytest.raises(ConfigError, match=r"layer_types=.*26 entries of full_attention / sliding_attention"):
        _attrs({**cfg, "layer_types": ["full_attention", "chunked_attention"] * 13})
    scaled = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
              "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}
    with pytest.raises(ConfigError, match=r"rope_parameters\.sliding_attention\.rope_type='linear'"):
        _attrs({**cfg, "rope_parameters": scaled})


def test_gemma3_pattern_starting_global_converts(conformance):
    """A pattern the published configs never have (global first, 1:2) at PP2 x VPP2 (each
    chunk one layer: the local rope follows the global layer number) and TP2."""
    cfg = {**_cfg("gemma-3-1b-it"), "num_hidden_layers": 4,
           "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]}
    spec = ModelSpec("test/gemma3-global-first", cfg, "fixture")
    for layout in ("pp2vpp2", "tp2"):
        results = conformance.case(spec, layout)
        assert all(r.passed for r in results.values()), "\n".join(str(r) for r in results.values())


# Each Gemma bug is caught, by the check expected (the HF side and the tensors stay right).
MUTANTS = [
    # every norm off by the same 1: the logits move by 60 %, the greedy tokens may not
    ("ZeroCentreDropped", "google/gemma-2b", {"tp1pp1": {"logits"}}),
    ("EmbeddingScaleDropped", "google/gemma-2b", {"tp1pp1": {"logits", "generation"}}),
    ("AttnSoftcapDropped", "google/gemma-2-9b", {"tp1pp1": {"logits", "generation"}}),
    ("FinalSoftcapDropped", "google/gemma-2-9b", {"tp1pp1": {"logits"}}),
    ("PostNormsSwapped", "google/gemma-2-9b", {"tp1pp1": {"logits", "generation"}}),
    ("SlidingPatternShifted", "gemma-3-4b-it-text", {"tp1pp1": {"logits", "generation"}}),
    ("RopeBasesSwapped", "gemma-3-4b-it-text", {"tp1pp1": {"logits", "generation"}}),
]


@pytest.mark.parametrize("mutant,model,expect", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_gemma_mutant_is_caught(conformance, spec, mutant, model, expect):
    for layout, checks in expect.items():
        results = conformance.case(_spec(model), layout, bridge_ref=f"tests.gemma_mutants:{mutant}")
        got = {n for n, r in results.items() if not r.passed and not r.data.get("blocked")}
        assert got == checks, f"{mutant} at {layout}: caught by {sorted(got)}, expected {sorted(checks)}\n" + \
            "\n".join(str(r) for r in results.values() if not r.passed)


@pytest.mark.parametrize("mutant", ["SlidingPatternShifted", "RopeBasesSwapped"])
def test_config_level_gemma_bugs_also_break_the_config_roundtrip(conformance, spec, mutant):
    d = conformance.describe(_spec("gemma-3-4b-it-text"), bridge_ref=f"tests.gemma_mutants:{mutant}")
    assert not d["config_check"].passed, d["config_check"]
