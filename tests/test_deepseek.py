"""DeepSeek-V2 / V3 and Kimi-K2 bridges: config translation and refusals (in process), and
mutants the conformance suite must catch, with the checks that catch each (rank pool).

A mutant is consistent in both directions (import and export agree), so a roundtrip alone
cannot see it, unless the bug itself is a coverage bug.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bridges import AutoBridge
from bridges.core.auto import RemoteCodeError
from bridges.core.config import ConfigError
from bridges.models.deepseek.deepseek_bridge import DeepseekV3Bridge
from bridges.models.kimi_k2.kimi_k2_bridge import KimiK2Bridge

ROOT = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
V2, V3, KIMI = "deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V3", "moonshotai/Kimi-K2-Instruct"


def _config(name: str, **changes) -> dict:
    c = json.loads((ROOT / name / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    return c


def _attrs(name: str, **changes) -> dict:
    return AutoBridge.from_hf_config(_config(name, **changes)).megatron_attrs()


# -- config ------------------------------------------------------------------------------------
def test_published_configs_translate():
    v2, v3, kimi = _attrs(V2), _attrs(V3), _attrs(KIMI)
    assert (v2["q_lora_rank"], v2["kv_lora_rank"], v2["qk_head_dim"], v2["qk_pos_emb_head_dim"],
            v2["v_head_dim"]) == (None, 512, 128, 64, 128)
    assert (v2["moe_router_score_function"], v2["moe_router_pre_softmax"], v2["moe_router_num_groups"],
            v2["moe_layer_freq"][:3], v2["moe_shared_expert_intermediate_size"]) == \
        ("softmax", True, None, [0, 1, 1], 2816)
    assert (v3["q_lora_rank"], v3["moe_router_score_function"], v3["moe_router_enable_expert_bias"],
            v3["moe_router_num_groups"], v3["moe_router_group_topk"], v3["moe_router_topk_scaling_factor"],
            v3["mtp_num_layers"], v3["moe_layer_freq"][:4]) == \
        (1536, "sigmoid", True, 8, 4, 2.5, 1, [0, 0, 0, 1])
    assert (v3["rope_type"], v3["rotary_scaling_factor"], v3["mscale"], v3["mscale_all_dim"],
            v3["original_max_position_embeddings"], v3["position_embedding_type"]) == \
        ("yarn", 40.0, 1.0, 1.0, 4096, "rope")
    assert (kimi["num_moe_experts"], kimi["moe_router_num_groups"], kimi["mtp_num_layers"], kimi["rotary_base"],
            kimi["beta_fast"]) == (384, None, None, 50000.0, 1.0)


@pytest.mark.parametrize("name", [V2, V3, KIMI])
def test_config_roundtrip(name):
    from conformance.checks import check_config_roundtrip
    from conformance.job import describe

    d = describe(_config(name))
    r = check_config_roundtrip(d["source_config"], d["exported_config"], d["fields"])
    assert r.passed, r.details
    assert {"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "n_group", "rope_parameters"} <= set(d["fields"]) \
        or name == V2


def test_kimi_loads_as_deepseek_v3_without_remote_code():
    bridge = AutoBridge.from_hf_config(_config(KIMI))  # auto_map, no trust_remote_code
    assert type(bridge) is KimiK2Bridge and type(bridge.hf_config).__name__ == "DeepseekV3Config"
    out = bridge.hf_config_dict()
    assert out["model_type"] == "kimi_k2" and out["architectures"] == ["DeepseekV3ForCausalLM"]


def test_auto_map_outside_the_ported_code_still_needs_trust():
    c = _config(V3)
    c["auto_map"] = {**c["auto_map"], "AutoModelForCausalLM": "modeling_custom.MyDeepseekForCausalLM"}
    with pytest.raises(RemoteCodeError, match="auto_map"):
        AutoBridge.from_hf_config(c)
    assert type(AutoBridge.from_hf_config(c, trust_remote_code=True)) is DeepseekV3Bridge


@pytest.mark.parametrize("name,changes,field", [
    (V3, {"attention_bias": True}, "attention_bias"),
    (V3, {"rope_interleave": False}, "rope_interleave"),
    (V3, {"norm_topk_prob": False}, "norm_topk_prob"),
    (V3, {"scoring_func": "softmax"}, "scoring_func"),
    (V3, {"topk_method": "greedy"}, "topk_method"),
    (V3, {"topk_group": 2}, "topk_group"),  # top-8 over 2 groups: 4 per group, HF sums 2
    (V3, {"num_key_value_heads": 64}, "num_key_value_heads"),
    (V3, {"moe_layer_freq": 2}, "moe_layer_freq"),
    (V3, {"n_shared_experts": 0}, "n_shared_experts"),
    (V2, {"norm_topk_prob": True}, "norm_topk_prob"),
    (V2, {"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 3}, "group_limited_greedy"),
    (V2, {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type"),
    (KIMI, {"rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                             "mscale": 0.7}}, "mscale"),
])
def test_unsupported_configs_are_refused_naming_the_field(name, changes, field):
    with pytest.raises(ConfigError, match=field):
        _attrs(name, **changes)


@pytest.mark.parametrize("changes,field", [({"q_lora_rank": 1534}, "q_lora_rank=1534"),
                                           ({"kv_lora_rank": 510, "qk_rope_head_dim": 64},
                                            "kv_lora_rank \\+ qk_pos_emb_head_dim=574")])
def test_mla_tp_split_constraints_are_named(changes, field):
    provider = AutoBridge.from_hf_config(_config(V3, **changes)).to_megatron_provider()
    provider.tensor_model_parallel_size = 4
    with pytest.raises(ConfigError, match=f"layout tp4: {field} does not divide by TP=4"):
        provider.finalize()


# -- toy checkpoint and MTP copies ---------------------------------------------------------------
@pytest.fixture(scope="module")
def v3_toy(tmp_path_factory) -> Path:
    from conformance.toy import make_toy_checkpoint, shrink_config

    return make_toy_checkpoint(shrink_config(_config(V3)), tmp_path_factory.mktemp("ds-toys"))


def test_toy_holds_the_mtp_layer_with_copies_of_the_main_tensors(v3_toy):
    from safetensors.torch import load_file

    sd = load_file(str(v3_toy / "model.safetensors"))
    n = json.loads((v3_toy / "config.json").read_text())["num_hidden_layers"]
    assert torch.equal(sd[f"model.layers.{n}.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    assert torch.equal(sd[f"model.layers.{n}.shared_head.head.weight"], sd["lm_head.weight"])
    assert f"model.layers.{n}.mlp.gate.e_score_correction_bias" in sd
    bridge = AutoBridge.from_hf_pretrained(v3_toy)
    assert set(bridge.expected_hf_names()) == set(sd)  # every tensor, the MTP layer's included


def test_save_hf_pretrained_writes_the_mtp_layer_and_its_copies(v3_toy, tmp_path):
    from safetensors.torch import load_file

    bridge = AutoBridge.from_hf_pretrained(v3_toy)
    chunks = bridge.to_megatron_provider().provide_distributed_model()
    bridge.load_hf_weights(chunks)
    bridge.save_hf_pretrained(chunks, str(tmp_path / "out"))
    src, out = (load_file(str(d / "model.safetensors")) for d in (v3_toy, tmp_path / "out"))
    assert sorted(out) == sorted(src) and all(torch.equal(out[n], src[n]) for n in src)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["auto_map"]["AutoConfig"].endswith("DeepseekV3Config")


def test_grouped_experts_reach_the_mtp_layer(v3_toy):
    bridge = AutoBridge.from_hf_pretrained(v3_toy)
    provider = bridge.to_megatron_provider()
    provider.moe_grouped_gemm = True
    chunks = provider.provide_distributed_model()
    names = {n for n, _ in chunks[0].named_parameters()}
    assert "mtp.layers.0.mtp_model_layer.mlp.experts.linear_fc1.weight7" in names
    assert not any("local_experts" in n for n in names)
    bridge.load_hf_weights(chunks)  # every HF tensor used, every parameter written


def test_mtp_copy_that_differs_is_a_named_import_error(v3_toy, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from bridges.core.ledger import CoverageError

    d = tmp_path / "toy"
    shutil.copytree(v3_toy, d)
    sd = load_file(str(d / "model.safetensors"))
    n = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    sd[f"model.layers.{n}.shared_head.head.weight"] = sd[f"model.layers.{n}.shared_head.head.weight"] + 1
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    bridge = AutoBridge.from_hf_pretrained(d)
    chunks = bridge.to_megatron_provider().provide_distributed_model()
    with pytest.raises(CoverageError, match=f"model.layers.{n}.shared_head.head.weight differs from lm_head.weight"):
        bridge.load_hf_weights(chunks)


def test_checkpoint_without_its_mtp_layer_converts_without_mtp(v3_toy, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "no-mtp"
    shutil.copytree(v3_toy, d)
    n = json.loads((d / "config.json").read_text())["num_hidden_layers"]
    sd = {k: v for k, v in load_file(str(d / "model.safetensors")).items() if not k.startswith(f"model.layers.{n}.")}
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    bridge = AutoBridge.from_hf_pretrained(d)
    with pytest.warns(UserWarning, match="holds no MTP layer"):
        attrs = bridge.megatron_attrs()
    assert attrs["mtp_num_layers"] is None and bridge.hf_config_dict(attrs)["num_nextn_predict_layers"] == 0


# -- mutants -----------------------------------------------------------------------------------
def _per_head_rows_swapped(m, head_rows: int, first: int):
    """``m`` reading each head's rows [a | b] (a: the first ``first`` rows) as [b | a]."""
    class Swapped(type(m)):
        def _merge(self, hf, shapes):
            w = super()._merge(hf, shapes)
            x = w.reshape(-1, head_rows, *w.shape[1:])
            return torch.cat((x[:, first:], x[:, :first]), 1).reshape(w.shape)

        def _unmerge(self, full, shapes):
            x = full.reshape(-1, head_rows, *full.shape[1:])
            back = torch.cat((x[:, head_rows - first:], x[:, :head_rows - first]), 1).reshape(full.shape)
            return super()._unmerge(back, shapes)

    return Swapped(m.megatron, m.hf, layers=m.layers, alternate=m.alternate)


class KvSplitSwapped(DeepseekV3Bridge):
    """kv_b_proj read per head as [v | k_nope] instead of [k_nope | v]."""

    def mappings(self, attrs):
        rows = attrs["qk_head_dim"] + attrs["v_head_dim"]
        return [_per_head_rows_swapped(m, rows, attrs["qk_head_dim"]) if m.megatron.endswith("linear_kv_up_proj.weight")
                else m for m in super().mappings(attrs)]


class QueryRopeNopeSwapped(DeepseekV3Bridge):
    """The query read per head as [rope | nope] instead of [nope | rope]."""

    def mappings(self, attrs):
        rows = attrs["qk_head_dim"] + attrs["qk_pos_emb_head_dim"]
        return [_per_head_rows_swapped(m, rows, attrs["qk_head_dim"]) if m.megatron.endswith("linear_q_up_proj.weight")
                else m for m in super().mappings(attrs)]


class ScoreBiasDropped(DeepseekV3Bridge):
    """Routing without the score-correction bias; its HF tensor put on the ignore list."""

    ignored_hf = DeepseekV3Bridge.ignored_hf + (r".*e_score_correction_bias",)
    router_bias_hf = None

    def megatron_attrs(self):
        return {**super().megatron_attrs(), "moe_router_enable_expert_bias": False}


class MTPWrongIndex(DeepseekV3Bridge):
    """The MTP block's transformer layer read from HF layer N-1 (the last decoder layer), and
    the last decoder layer from HF layer N (the MTP layer): every tensor still used once."""

    def mappings(self, attrs):
        n = attrs["num_layers"]
        out = []
        for m in super().mappings(attrs):
            base = type(m)
            if m.megatron.startswith("mtp.layers.*.mtp_model_layer."):
                m = type("WrongOffset", (base,), {"offset": n - 1})(m.megatron, m.hf, layers=m.layers,
                                                                     alternate=m.alternate)
            elif m.megatron.startswith("decoder.layers.*.") and (m.layers is None or n - 1 in m.layers):
                class LastIsMTP(base):
                    def hf_names(self, captures):
                        i = str(n) if captures[0] == str(n - 1) else captures[0]
                        return super().hf_names((i, *captures[1:]))

                m = LastIsMTP(m.megatron, m.hf, layers=m.layers, alternate=m.alternate)
            out.append(m)
        return out


class MTPNormsSwapped(DeepseekV3Bridge):
    """The MTP layer's enorm and hnorm exchanged: only the MTP head sees it."""

    def mappings(self, attrs):
        table = super().mappings(attrs)
        e = next(m for m in table if m.megatron.endswith(".enorm.weight"))
        h = next(m for m in table if m.megatron.endswith(".hnorm.weight"))
        return [type(m)(m.megatron, (h if m is e else e).hf, layers=m.layers) if m is e or m is h else m
                for m in table]


MUTANTS = [
    ("KvSplitSwapped", {"tp1pp1": {"logits", "generation", "mtp"}}),
    ("QueryRopeNopeSwapped", {"tp1pp1": {"logits", "generation", "mtp"}}),
    # the bias is a checkpoint tensor: its export is missing too
    ("ScoreBiasDropped", {"tp1pp1": {"coverage", "roundtrip", "logits", "generation", "mtp"}}),
    ("MTPWrongIndex", {"tp1pp1": {"logits", "generation", "mtp"}, "ep2": {"logits", "generation", "mtp"}}),
    ("MTPNormsSwapped", {"tp1pp1": {"mtp"}}),
]


def caught_by(results) -> set[str]:
    return {name for name, r in results.items() if not r.passed and not r.data.get("blocked")}


@pytest.mark.parametrize("mutant,expect", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(conformance, spec, mutant, expect):
    for layout, checks in expect.items():
        ref = f"tests.test_deepseek:{mutant}"
        results = {**conformance.case(spec(V3), layout, bridge_ref=ref),
                   "mtp": conformance.mtp_case(spec(V3), layout, bridge_ref=ref)}
        got = caught_by(results)
        assert got == checks, f"{mutant} at {layout}: caught by {sorted(got)}, expected {sorted(checks)}\n" + \
            "\n".join(str(r) for r in results.values() if not r.passed)


def test_the_registered_bridge_passes_the_same_checks(conformance, spec):
    results = {**conformance.case(spec(V3), "tp1pp1"), "mtp": conformance.mtp_case(spec(V3), "tp1pp1")}
    assert not caught_by(results), "\n".join(str(r) for r in results.values() if not r.passed)
    assert results["logits"].data["divergence"] is None  # the MTP's own embedding call is not captured


@pytest.mark.parametrize("mutant,stage", [("KvSplitSwapped", "layer 0 attention"),
                                          ("ScoreBiasDropped", "layer 1 mlp")])
def test_logit_failure_names_the_first_divergence(conformance, spec, mutant, stage):
    r = conformance.case(spec(V3), "tp1pp1", bridge_ref=f"tests.test_deepseek:{mutant}")["logits"]
    assert r.data["divergence"] == stage, r.details
