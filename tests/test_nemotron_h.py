"""Nemotron-H: the published config (pattern, Mamba-2 fields, refusals), parameters against
transformers' model, the torch Mamba-2 ops against transformers' own torch path, and the suite
catching each bug of the family, the TP-only ones at TP2."""
import json

import pytest
import torch

from bridges.core.auto import AutoBridge
from bridges.core.config import ConfigError
from conformance.models import resolve
from tests.mutant_case import assert_caught

MODEL = "nvidia/Nemotron-H-56B-Base-8K"
PUBLISHED = resolve(MODEL).config


def test_published_config():
    b = AutoBridge.from_hf_config(PUBLISHED)
    a = b.megatron_attrs()
    assert a["hybrid_layer_pattern"] == PUBLISHED["hybrid_override_pattern"] and a["num_layers"] == 118
    assert (a["mamba_num_heads"], a["mamba_head_dim"], a["mamba_num_groups"], a["mamba_state_dim"]) == (256, 64, 8, 256)
    assert (a["kv_channels"], a["num_query_groups"], a["ffn_hidden_size"], a["position_embedding_type"]) == \
        (128, 8, 32768, "none")
    assert a["activation_func"].__name__ == "squared_relu" and not a["gated_linear_unit"]
    back = b.hf_config_dict()
    assert back["hybrid_override_pattern"] == PUBLISHED["hybrid_override_pattern"] and back["n_groups"] == 8
    assert not b.megatron_lm and b.megatron_lm_script == "pretrain_hybrid.py"  # with its --spec stack
    assert "conv kernel of 4" in AutoBridge.from_hf_config({**PUBLISHED, "conv_kernel": 3}).megatron_lm


def test_transformers5_pattern_spelling_and_refusals():
    kinds = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    cfg = {k: v for k, v in PUBLISHED.items() if k not in ("hybrid_override_pattern", "auto_map")}
    cfg["layers_block_type"] = [kinds[x] for x in PUBLISHED["hybrid_override_pattern"]]
    a = AutoBridge.from_hf_config(cfg).megatron_attrs()
    assert a["hybrid_layer_pattern"] == PUBLISHED["hybrid_override_pattern"]
    from bridges.models.nemotron_h.nemotron_h_bridge import pattern_of

    with pytest.raises(ConfigError, match=r"\['D'\] are not mapped .* MLP and MoE layers are"):
        pattern_of({"hybrid_override_pattern": "M*D-"})  # transformers itself refuses unknown layers_block_type
    for change, says in ((dict(mlp_hidden_act="silu"), "mlp_hidden_act='silu'"),
                         (dict(use_bias=True), "use_bias=True")):
        with pytest.raises(ConfigError, match=says):
            AutoBridge.from_hf_config({**cfg, **change}).megatron_attrs()


def _params(config) -> tuple[int, "object"]:
    """(transformers' parameter count, the bridge's FLOPs report at sequence 4096) of a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bridges.flops import training_flops

    cfg = {k: v for k, v in config.items() if k != "auto_map"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return sum(p.numel() for p in model.parameters()), training_flops(AutoBridge.from_hf_config(config), seq_len=4096)


def test_parameters_match_transformers():
    hf, r = _params(PUBLISHED)
    assert r.params.total == hf == 56_324_350_464


def test_torch_mamba_ops_equal_transformers_torch_path():
    """The scan (token by token) and the gated norm against transformers' NemotronH mixer run on
    its own torch path (the chunked SSD in torch), on random inputs and weights."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    from bridges.models.nemotron_h.modeling_nemotron_h import GatedRMSNorm, ssd_scan

    torch.manual_seed(0)
    c = NemotronHConfig(hidden_size=32, mamba_num_heads=8, mamba_head_dim=4, n_groups=2, ssm_state_size=6,
                        conv_kernel=4, chunk_size=5, layer_norm_epsilon=1e-5, hybrid_override_pattern="M")
    mixer = NemotronHMamba2Mixer(c, layer_idx=0).float().eval()
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        ref = mixer(x)  # eval, no cache: its torch path (the kernels only serve training)
        # the same computation with the torch ops here
        zxbcdt = mixer.in_proj(x)
        di, gn, nh = 32, 12, 8
        z, xbc, dt = zxbcdt.split([di, di + 2 * gn, nh], dim=-1)
        xbc = torch.nn.functional.silu(mixer.conv1d(xbc.transpose(1, 2))[..., :13].transpose(1, 2))
        xs, B, C = xbc.split([di, gn, gn], dim=-1)
        y = ssd_scan(xs.view(2, 13, nh, 4), dt, -torch.exp(mixer.A_log.float()), B.view(2, 13, 2, 6),
                     C.view(2, 13, 2, 6), 5, D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True)
        norm = GatedRMSNorm(di, eps=1e-5, group_size=di // 2)
        norm.weight.copy_(mixer.norm.weight)
        ours = mixer.out_proj(norm(y.reshape(2, 13, di), z))
    assert (ours - ref).abs().max() < 1e-5, (ours - ref).abs().max()


# -- MoE layers: Nemotron 3 ------------------------------------------------------------------------
NANO = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B"
NANO_CONFIG = resolve(NANO).config


def test_nano_published_config():
    b = AutoBridge.from_hf_config(NANO_CONFIG)
    a = b.megatron_attrs()
    assert a["hybrid_layer_pattern"] == NANO_CONFIG["hybrid_override_pattern"] and a["num_layers"] == 52
    assert (a["num_moe_experts"], a["moe_router_topk"], a["moe_ffn_hidden_size"], a["moe_shared_expert_intermediate_size"]) \
        == (128, 6, 1856, 3712)
    assert (a["moe_router_score_function"], a["moe_router_enable_expert_bias"], a["moe_router_topk_scaling_factor"],
            a["moe_router_num_groups"]) == ("sigmoid", True, 2.5, None)
    assert not b.megatron_lm and b.megatron_lm_script == "pretrain_hybrid.py"  # its MoE layers from the spec stack
    back = b.hf_config_dict()
    assert (back["n_routed_experts"], back["routed_scaling_factor"]) == (128, 2.5)
    dense = AutoBridge.from_hf_config(PUBLISHED).megatron_attrs()
    assert not any(k.startswith("moe_") or k == "num_moe_experts" for k in dense)  # a dense model has none


@pytest.mark.parametrize("change,says", [
    (dict(num_nextn_predict_layers=2, mtp_hybrid_override_pattern="*E"), "num_nextn_predict_layers=2: one MTP depth"),
    (dict(num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*X"), "mtp_hybrid_override_pattern: block type"),
    (dict(norm_topk_prob=False), "norm_topk_prob=False"),
    (dict(n_group=4, topk_group=2), "n_group=4, topk_group=2"),
])
def test_nano_refusals_name_the_field(change, says):
    with pytest.raises(ConfigError, match=says):
        AutoBridge.from_hf_config({**NANO_CONFIG, **change}).megatron_attrs()


def test_nano_parameters_match_transformers():
    hf, r = _params(NANO_CONFIG)
    assert r.params.total == hf == 31_577_937_344
    assert r.params.active == 3_580_073_408  # "3.5B active"
    assert r.term("routed_experts").forward > r.term("shared_experts").forward > 0


NANO_MUTANTS = [
    ("RoutedScalingDropped", {"logits", "generation"}),
    ("ExpertBiasIgnored", {"coverage", "roundtrip", "logits", "generation"}),  # its tensor is not exported
    ("ExpertsRotated", {"logits", "generation"}),
]


@pytest.mark.parametrize("mutant,expect", NANO_MUTANTS, ids=[m[0] for m in NANO_MUTANTS])
def test_nano_mutant_is_caught(conformance, mutant, expect):
    # the toy's layer 3 is its MoE layer: the first divergence names it
    where = "layer 3 block" if mutant != "ExpertBiasIgnored" else None
    assert_caught(conformance, NANO, f"tests.nemotron_h_mutants:{mutant}", expect, where)


MUTANTS = [
    ("InProjZXSwapped", {"logits", "generation"}),
    ("InProjBCSwapped", {"logits", "generation"}),
    ("ALogExportedAsA", {"roundtrip"}),
    ("DtBiasDropped", {"coverage"}),
    ("PatternShifted", {"coverage"}),
]


@pytest.mark.parametrize("mutant,expect", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(conformance, mutant, expect):
    assert_caught(conformance, MODEL, f"tests.nemotron_h_mutants:{mutant}", expect, None)


def test_conv_split_whole_is_caught_at_tp2(conformance, spec):
    """Invisible at TP1 (one shard); at TP2 rank 0 convolves all of x and rank 1 B and C:
    the logits part from HF's while the roundtrip (the same split both ways) stays bit-exact."""
    ref = "tests.nemotron_h_mutants:ConvSplitWhole"
    assert all(r.passed for r in conformance.case(spec(MODEL), "tp1pp1", bridge_ref=ref).values())
    bad = conformance.case(spec(MODEL), "tp2", bridge_ref=ref)
    assert not bad["logits"].passed and bad["roundtrip"].passed, bad["logits"].details


# -- latent MoE and MTP: Nemotron 3 Super ------------------------------------------------------------
SUPER = "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B"
SUPER_CONFIG = resolve(SUPER).config


def test_super_published_config():
    b = AutoBridge.from_hf_config(SUPER_CONFIG)
    a = b.megatron_attrs()
    assert a["hybrid_layer_pattern"] == SUPER_CONFIG["hybrid_override_pattern"] + "/*E" and a["num_layers"] == 88
    assert (a["mtp_num_layers"], a["moe_latent_size"], a["num_moe_experts"], a["moe_router_topk"]) == (1, 1024, 512, 22)
    assert {"mtp", "experts"} <= b.capabilities()
    back = b.hf_config_dict()
    assert (back["hybrid_override_pattern"], back["mtp_hybrid_override_pattern"], back["num_nextn_predict_layers"],
            back["moe_latent_size"]) == (SUPER_CONFIG["hybrid_override_pattern"], "*E", 1, 1024)
    # transformers 5's spelling of the same config (its lists) is read, and written back as lists
    hf5 = {k: v for k, v in SUPER_CONFIG.items() if k not in ("hybrid_override_pattern", "mtp_hybrid_override_pattern")}
    hf5.update(layers_block_type=["mamba" if x == "M" else "moe" if x == "E" else "attention"
                                  for x in SUPER_CONFIG["hybrid_override_pattern"]],
               mtp_layers_block_type=["attention", "moe"])
    assert AutoBridge.from_hf_config(hf5).megatron_attrs()["hybrid_layer_pattern"] == a["hybrid_layer_pattern"]


def test_super_mtp_index_is_flattened():
    """HF's mtp.layers.<depth * 2 + j>: block j of a depth, its norms and projection on block 0, its
    final norm on the last block (the published layout; vLLM and Megatron-Bridge read it so)."""
    from bridges.core.mappings import match

    b = AutoBridge.from_hf_config(SUPER_CONFIG)
    table = b.table(b.megatron_attrs())
    for name, hf in [("mtp.layers.0.mtp_model_layer.layers.1.mlp.fc2_latent_proj.weight",
                      "mtp.layers.1.mixer.fc2_latent_proj.weight"),
                     ("mtp.layers.0.mtp_model_layer.layers.0.self_attention.linear_proj.weight",
                      "mtp.layers.0.mixer.o_proj.weight"),
                     ("mtp.layers.0.mtp_model_layer.layers.1.mlp.experts.local_experts.5.linear_fc1.weight",
                      "mtp.layers.1.mixer.experts.5.up_proj.weight"),
                     ("mtp.layers.0.eh_proj.weight", "mtp.layers.0.eh_proj.weight"),
                     ("mtp.layers.0.final_layernorm.weight", "mtp.layers.1.final_layernorm.weight")]:
        m, captures = match(table, name)
        assert list(m.hf_names(captures).values())[0] == hf, name
    m, captures = match(table, "mtp.layers.0.enorm.weight")
    assert m.hf_names(("1",))[""] == "mtp.layers.2.enorm.weight"  # a second depth starts at block 2


def test_super_parameters_match_transformers():
    hf, r = _params(SUPER_CONFIG)
    assert r.params.main == hf == 120_668_687_360  # transformers builds no MTP layers
    assert r.params.main_active == 12_770_216_960  # "A12B"
    assert r.params.by_component["mtp"] == 2_942_324_736
    t = 4096
    assert r.term("latent_projections").forward == 40 * 2 * t * 2 * 4096 * 1024
    assert r.term("routed_experts").forward == 40 * 2 * t * 22 * 2 * 1024 * 2688  # at the latent width


def test_latent_width_changes_the_expert_flops():
    from bridges.flops import training_flops

    a = AutoBridge.from_hf_config(SUPER_CONFIG).megatron_attrs()
    wide = training_flops({**a, "moe_latent_size": None}, 4096)
    narrow = training_flops(a, 4096)
    assert wide.term("routed_experts").forward == 4 * narrow.term("routed_experts").forward  # 4096 / 1024
    assert "latent_projections" not in wide.as_dict()["forward"]


SUPER_MUTANTS = [
    ("MtpIndexNotFlattened", {"coverage"}),  # blocks of the wrong kind: the import stops, naming them
    ("MtpNormsSwapped", {"mtp"}),
    ("LatentFromMtp", {"logits", "generation", "mtp"}),
]


@pytest.mark.parametrize("mutant,expect", SUPER_MUTANTS, ids=[m[0] for m in SUPER_MUTANTS])
def test_super_mutant_is_caught(conformance, mutant, expect):
    assert_caught(conformance, SUPER, f"tests.nemotron_h_mutants:{mutant}", expect, None, mtp=True)
