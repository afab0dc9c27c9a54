"""The `--spec` modules Megatron-LM's trainer takes for families whose layers are their own
(bridges/core/megatron_lm_spec.py): importable before parallel state exists, and the model the
trainer builds with them is the bridge's (names, shapes, loaded values, logits) at every layout,
dense and MoE layers where they belong. A spec that ignores the layer's position fails."""
import subprocess
import sys

import pytest

from conformance.models import resolve

MODELS = ["deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V3", "moonshotai/Kimi-K2-Instruct", "allenai/OLMoE-1B-7B-0924", "openai/gpt-oss-20b"]


@pytest.mark.parametrize("module,name", [*((f"bridges.models.{f}.megatron_lm_spec", "layer")
                                           for f in ("deepseek", "olmoe", "gpt_oss")),
                                         ("bridges.models.nemotron_h.megatron_lm_spec", "stack"),
                                         ("bridges.models.qwen3_next.megatron_lm_spec", "stack")])
def test_spec_module_imports_before_parallel_state(module, name):
    code = (f"import {module} as m; from megatron.core import parallel_state as ps; "
            "import torch.distributed as dist; "
            f"assert not dist.is_initialized() and not ps.model_parallel_is_initialized(); print(type(m.{name}).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ModuleSpec", out.stderr[-2000:]


@pytest.mark.parametrize("module,name", [("bridges.models.granite.megatron_lm_spec", "layer_0.22"),
                                         ("bridges.models.deepseek.megatron_lm_spec", "layer_yarn_4096_1.0_1.0")])
def test_a_spec_name_carrying_values_is_found_as_megatron_lm_looks(module, name):
    """Megatron-LM's import_module: ``__import__(module, fromlist=[name])`` then
    ``vars(module)[name]`` (no module ``__getattr__``); the trainer's own argv names the spec."""
    code = (f"import sys; sys.argv = ['pretrain_gpt.py', '--spec', '{module}', '{name}']; "
            f"m = __import__('{module}', globals(), locals(), ['{name}']); print(type(vars(m)['{name}']).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ModuleSpec", out.stderr[-2000:]


@pytest.mark.parametrize("model,layouts", [("nvidia/Nemotron-H-56B-Base-8K", ("tp1pp1", "tp2", "pp2")),
                                           ("nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B", ("tp1pp1", "ep2", "tp2pp2")),
                                           ("nvidia/NVIDIA-Nemotron-3-Super-120B-A12B", ("tp1pp1", "tp2ep2", "pp2")),
                                           ("Qwen/Qwen3-Next-80B-A3B-Instruct", ("tp1pp1", "tp2", "pp2"))])
def test_hybrid_trainer_model_is_the_bridges(conformance, model, layouts):
    """pretrain_hybrid.py's HybridModel from Nemotron-H's --spec stack: the bridge's parameters,
    values and logits (the torch Mamba-2 path: the SSD chunk length does not change the sums);
    Nemotron 3's MoE layers from the same stack (sequential experts, any count; Super's latent
    projections and MTP depth); Qwen3-Next's
    gated delta net, gated attention, MoE and MTP depth from its own."""
    toy = conformance.checkpoint(resolve(model))
    for layout in layouts:
        for r in conformance.pool.run("tests.spec_tasks:trainer_hybrid_model", toy_dir=toy, layout=layout):
            assert r["names"] and r["values"] and r.get("max_diff", 0.0) < 1e-6, (layout, r)


@pytest.mark.parametrize("model", MODELS)
def test_trainer_model_is_the_bridges(conformance, model):
    toy = conformance.checkpoint(resolve(model))
    tp2 = "tp2etp1" if "gpt-oss" in model else "tp2"  # biased experts stay whole under TP
    for layout in ("tp1pp1", tp2, "pp2", "pp2vpp2"):  # every rank of the pool (the rest data-parallel)
        rows = conformance.pool.run("tests.spec_tasks:trainer_spec_model", toy_dir=toy, layout=layout)
        for r in rows:
            assert r["names"] and r["shapes"] and r["values"], (model, layout, r)
            assert r.get("max_diff", 0.0) == 0.0, (model, layout, r)


def test_a_spec_blind_to_the_layer_position_fails(conformance):
    """DeepSeek-V2-Lite's first layer is dense: one MoE MLA spec for every layer does not load."""
    toy = conformance.checkpoint(resolve("deepseek-ai/DeepSeek-V2-Lite"))
    with pytest.raises(Exception, match=r"decoder\.layers\.0\.mlp\.router\.weight has no mapping"):
        rows = conformance.pool.run("tests.spec_tasks:trainer_spec_model", toy_dir=toy, layout="tp1pp1",
                                    spec="tests.spec_tasks:ALL_MOE")
        assert all(r["names"] for r in rows), rows  # reached only if the load accepted it


def test_kimi_k2_yarn_values_reach_the_trainer_only_through_the_spec_name(conformance):
    """Kimi-K2's YaRN beta_fast / beta_slow (1.0, 1.0) have no Megatron-LM flag: the plain MLA layer
    builds its rotary embedding from the trainer's defaults (32, 1) and the logits move."""
    toy = conformance.checkpoint(resolve("moonshotai/Kimi-K2-Instruct"))
    rows = conformance.pool.run("tests.spec_tasks:trainer_spec_model", toy_dir=toy, layout="tp1pp1",
                                spec="bridges.models.deepseek.megatron_lm_spec:layer")
    assert all(r["names"] and r["values"] for r in rows) and rows[0]["max_diff"] > 1e-3, rows


def test_mla_mtp_layer_needs_the_hook(conformance):
    """pretrain_gpt.py builds DeepSeek-V3's MTP layer from Megatron's own local MLA spec, whose
    core attention (DotProductAttention) takes no separate key / value head dims: without the spec
    module's MTP hook it does not build."""
    toy = conformance.checkpoint(resolve("deepseek-ai/DeepSeek-V3"))
    with pytest.raises(Exception, match="k_channels.*DotProductAttention.*MultiTokenPredictionLayer"):
        conformance.pool.run("tests.spec_tasks:trainer_spec_model", toy_dir=toy, layout="tp1pp1", plain_mtp=True)


def test_gpt_oss_biased_experts_train(conformance):
    """Megatron-Core adds a biased expert's down-projection bias in place to the tensor-parallel
    reduction's output, which autograd refuses in a backward pass; the family's expert
    projection returns a copy (modeling_gpt_oss.py), with which the gradients flow."""
    toy = conformance.checkpoint(resolve("openai/gpt-oss-20b"))
    assert all(g > 0 for g in conformance.pool.run("tests.spec_tasks:backward", toy_dir=toy, layout="tp1pp1"))
    with pytest.raises(Exception, match="modified inplace"):
        conformance.pool.run("tests.spec_tasks:backward", toy_dir=toy, layout="tp1pp1", plain=True)
