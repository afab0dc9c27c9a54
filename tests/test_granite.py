"""Granite (dense) and GraniteMoe: the four multipliers translated both ways and to Megatron's
own fields, the residual multiplier's bias-dropout-add against HF's residual, the expert layout
transformers saves, the dense bridge with Granite's multipliers at TP2 and PP2 x VPP2, the
trainer's --spec model, and the suite catching each Granite bug by the check expected."""
import json
from pathlib import Path

import pytest
import torch

from bridges.core.auto import AutoBridge
from conformance.models import ModelSpec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures/configs/ibm-granite"
MOE = "ibm-granite/granite-3.1-3b-a800m-instruct"
SCALARS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


def _cfg(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


# the dense defaults with the published MoE model's multipliers (the defaults are all 1.0)
DENSE = {**_cfg("granite-transformers-defaults"), **{k: _cfg("granite-3.1-3b-a800m-instruct")[k] for k in SCALARS},
         "tie_word_embeddings": True}


def test_granitemoe_config_both_ways():
    b = AutoBridge.from_hf_config(_cfg("granite-3.1-3b-a800m-instruct"))
    a = b.megatron_attrs()
    assert a["use_mup"] is True and a["mup_embedding_mult"] == 12.0
    assert a["softmax_scale"] == 0.015625  # attention_multiplier, not 1/sqrt(head_dim)
    assert a["mup_output_mult"] == 1 / 6.0 and a["logits_scaling"] == 6.0 and a["residual_multiplier"] == 0.22
    assert (a["num_moe_experts"], a["moe_router_topk"], a["moe_ffn_hidden_size"]) == (40, 8, 512)
    assert not a.get("moe_router_pre_softmax")  # top-k, then softmax over the k (renormalised)
    assert a["share_embeddings_and_output_weights"] is True and a["rotary_base"] == 1e7
    out = b.hf_config_dict()
    assert {k: out[k] for k in SCALARS} == {k: _cfg("granite-3.1-3b-a800m-instruct")[k] for k in SCALARS}
    # use_mup adds nothing else: the TransformerConfig keeps the bridge's scale and output multiplier
    from megatron.core.transformer import TransformerConfig

    names = {f.name for f in __import__("dataclasses").fields(TransformerConfig)}
    tc = TransformerConfig(**{k: v for k, v in a.items() if k in names})
    assert (tc.softmax_scale, tc.mup_output_mult, tc.mup_width_mult) == (0.015625, 1 / 6.0, 1.0)


def test_transformers_defaults_are_the_bridges():
    """Fields left out take GraniteConfig's defaults (all four 1.0: a scale of 1, not 1/sqrt(d))."""
    cfg = {k: v for k, v in _cfg("granite-transformers-defaults").items() if k not in SCALARS}
    a = AutoBridge.from_hf_config(cfg).megatron_attrs()
    assert (a["mup_embedding_mult"], a["softmax_scale"], a["residual_multiplier"], a["mup_output_mult"]) == (1.0,) * 4


def test_scaled_bda_is_hf_residual():
    from bridges.models.granite.modeling_granite import scaled_bda

    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(5, 2, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    for training in (False, True):
        out = scaled_bda(0.22)(training, False)((x.clone(), None), res.clone(), 0.0)
        assert torch.equal(out, res + x * 0.22)  # bit-equal: HF's order of operations


def test_saved_expert_layout_is_what_the_bridge_reads(tmp_path):
    """transformers' save_pretrained writes input_linear [E, 2I, H] (gate half first: the model
    chunks gate, up), output_linear [E, H, I], router.layer [E, H]: the names the table maps."""
    from safetensors import safe_open
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM

    c = GraniteMoeConfig(hidden_size=32, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=64)
    m = GraniteMoeForCausalLM(c)
    m.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if "block_sparse_moe" in k}
        stored = f.get_tensor("model.layers.0.block_sparse_moe.input_linear.weight")
    assert shapes == {"model.layers.0.block_sparse_moe.input_linear.weight": (4, 16, 32),
                      "model.layers.0.block_sparse_moe.output_linear.weight": (4, 32, 8),
                      "model.layers.0.block_sparse_moe.router.layer.weight": (4, 32)}
    # the gate half is the activated one in transformers' expert
    x = torch.randn(3, 32)
    gate, up = torch.nn.functional.linear(x, stored[0]).chunk(2, dim=-1)
    assert torch.equal(stored, m.model.layers[0].block_sparse_moe.experts.gate_up_proj.detach())
    names = {mp.hf[k] if isinstance(mp.hf, dict) else mp.hf for mp in AutoBridge.from_hf_config(c.to_dict()).mappings(
        AutoBridge.from_hf_config(c.to_dict()).megatron_attrs()) for k in (mp.hf if isinstance(mp.hf, dict) else [0])}
    assert {"model.layers.*.block_sparse_moe.input_linear.weight[*]",
            "model.layers.*.block_sparse_moe.output_linear.weight[*]",
            "model.layers.*.block_sparse_moe.router.layer.weight"} <= names


def test_dense_granite_multipliers_convert(conformance):
    """The dense bridge with Granite's multipliers (the defaults fixture has none): TP2, PP2 x VPP2."""
    spec = ModelSpec("test/granite-dense-multipliers", DENSE, "fixture")
    for layout in ("tp1pp1", "tp2", "pp2vpp2"):
        results = conformance.case(spec, layout)
        assert all(r.passed for r in results.values()), "\n".join(str(r) for r in results.values())
    results = conformance.case(spec, "tp2", bridge_ref="tests.granite_mutants:DenseResidualMultiplierDropped")
    assert {n for n, r in results.items() if not r.passed} == {"logits"}


def test_trainer_model_is_the_bridges(conformance, spec):
    """Megatron-LM's --spec layer_<m> builds the bridge's model (names, values, logits)."""
    b = AutoBridge.from_hf_config(_cfg("granite-3.1-3b-a800m-instruct"))
    assert b.megatron_lm_spec == ("bridges.models.granite.megatron_lm_spec", "layer_0.22")
    toy = conformance.checkpoint(spec(MOE))
    for layout in ("tp1pp1", "tp2ep2", "pp2"):
        for r in conformance.pool.run("tests.spec_tasks:trainer_spec_model", toy_dir=toy, layout=layout):
            assert r["names"] and r["shapes"] and r["values"], (layout, r)
            assert r.get("max_diff", 0.0) == 0.0, (layout, r)


def test_spec_module_imports_before_parallel_state():
    import subprocess
    import sys

    code = ("import bridges.models.granite.megatron_lm_spec as m; import torch.distributed as dist; "
            "assert not dist.is_initialized(); print(type(getattr(m, 'layer_0.22')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ModuleSpec", out.stderr[-2000:]


# Each Granite bug is caught, by the check expected (the HF side and the tensors stay right). The
# toy's greedy tokens survive every one of them (logits rel err 1e-2 to 0.2: docs/granite.md), and a
# positive factor on the logits moves no argmax at all: the logits check is what catches them.
MUTANTS = [
    ("ResidualMultiplierDropped", {"tp1pp1": {"logits"}, "pp2ep2": {"logits"}}),
    ("EmbeddingMultiplierDropped", {"tp1pp1": {"logits"}}),
    ("LogitsScalingMultiplied", {"tp1pp1": {"logits"}}),
    ("AttentionMultiplierIgnored", {"tp1pp1": {"logits"}}),
    ("GateUpSwapped", {"tp1pp1": {"logits"}, "tp2ep2": {"logits"}}),
]


@pytest.mark.parametrize("mutant,expect", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_granite_mutant_is_caught(conformance, spec, mutant, expect):
    for layout, checks in expect.items():
        results = conformance.case(spec(MOE), layout, bridge_ref=f"tests.granite_mutants:{mutant}")
        got = {n for n, r in results.items() if not r.passed and not r.data.get("blocked")}
        assert got == checks, f"{mutant} at {layout}: caught by {sorted(got)}, expected {sorted(checks)}\n" + \
            "\n".join(str(r) for r in results.values() if not r.passed)


def test_divergence_is_located_past_the_scaled_embedding(conformance, spec):
    """The HF side's embedding stage is what its first layer receives (after Granite's embedding
    multiplier, as Megatron's embedding returns it): a swapped gate / up is located at layer 0's
    MLP, not reported at an embedding that is right."""
    res = conformance.case(spec(MOE), "tp1pp1", bridge_ref="tests.granite_mutants:GateUpSwapped")
    assert "first divergence: layer 0 mlp" in str(res["logits"]), str(res["logits"])
