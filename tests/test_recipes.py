"""Training recipes: every stored layout divides its model and fits its card; the memory estimate
equals a hand count on a small model; broken recipes are refused naming the size; derived layouts
take the least model parallelism; `mbridge recipe` prints flags Megatron-LM reads back."""
import dataclasses
import json

import pytest

from bridges import recipes as R
from bridges.core.auto import AutoBridge
from conformance.models import fixture_names, resolve


def _bridge(model):
    return AutoBridge.from_hf_config(resolve(model).config)


def _trainable():
    """Fixture models Megatron-LM's pretrain_gpt.py can build (the others are refused by name)."""
    from bridges.core.config import ConfigError
    from bridges.megatron_lm import megatron_lm_args

    out = []
    for m in fixture_names():
        try:
            megatron_lm_args(_bridge(m))
            out.append(m)
        except ConfigError:
            pass
    return out


def test_every_trainable_fixture_has_a_recipe_per_mode_and_every_recipe_a_fixture():
    trainable = _trainable()
    assert len(trainable) >= 15
    for m in trainable:
        have = {r.mode for r in R.recipes(_bridge(m), m)}
        assert have == set(R.MODES), f"{m}: recipes for {sorted(have)} only"
    named = {e["model"] for m in trainable for e in R.stored(_bridge(m))}
    assert named <= set(fixture_names()), f"recipes for models without a fixture: {sorted(named - set(fixture_names()))}"


@pytest.mark.parametrize("model", ["Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B", "Qwen/Qwen3-30B-A3B",
                                   "Qwen/Qwen3-235B-A22B", "mistralai/Mixtral-8x7B-v0.1", "openai/gpt-oss-120b",
                                   "zai-org/GLM-4.5", "microsoft/Phi-3-mini-4k-instruct", "Qwen/Qwen1.5-MoE-A2.7B",
                                   "Qwen/Qwen2.5-0.5B", "mistralai/Mistral-7B-v0.1", "openai/gpt-oss-20b",
                                   "Qwen/Qwen3-0.6B", "meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-7B-Instruct",
                                   "allenai/OLMoE-1B-7B-0924", "deepseek-ai/DeepSeek-V2-Lite", "MiniMaxAI/MiniMax-M2",
                                   "nvidia/Nemotron-H-56B-Base-8K", "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B",
                                   "Qwen/Qwen3-Next-80B-A3B-Instruct", "deepseek-ai/DeepSeek-V3", "moonshotai/Kimi-K2-Instruct"])
def test_every_stored_layout_divides_the_model_and_fits_the_card(model):
    b = _bridge(model)
    rs = R.recipes(b, model)
    assert rs
    for r in rs:
        assert R.problems(b, r) == [], (r.mode, r.gpus, r.gpu_memory, r.layout_name)
        # the lookup gives back the stored layout for its own cluster
        got = R.recipe(b, model, r.mode, r.gpus, r.gpu_memory)
        assert (got.tp, got.pp, got.ep, got.etp, got.recompute) == (r.tp, r.pp, r.ep, r.etp, r.recompute)
        assert not got.source.startswith("derived")


def _small():
    """A dense GQA model small enough to count by hand: 4 layers, hidden 256, 8 heads / 2 groups
    of 32, gated FFN 512, vocab 1024, untied."""
    cfg = dict(resolve("Qwen/Qwen3-8B").config)
    cfg.update(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, head_dim=32, vocab_size=1024, tie_word_embeddings=False)
    return AutoBridge.from_hf_config(cfg)


def test_memory_estimate_equals_a_hand_count():
    b = _small()
    r = R.Recipe(model="small", mode="sft", gpus=4, gpu_memory=80, tp=2, micro_batch=2, seq_len=128,
                 recompute="selective")
    h, f, layers, vocab = 256, 512, 4, 1024
    q, kv = 8 * 32, 2 * 32
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * f + f * h + 2 * h + 2 * 32  # linears, 2 norms, q/k norms
    emb = out = vocab * h  # padded vocab 1024 divides by 128 x TP
    sharded = layers * (h * (q + 2 * kv) + q * h + h * 2 * f + f * h)
    replicated = layers * (2 * h + 2 * 32) + h  # layer norms, q/k norms, the final norm
    assert sharded + replicated + emb + out == layers * per_layer + h + emb + out
    n = sharded / 2 + replicated + (emb + out) / 2  # TP2, one stage: embedding and output there
    dp = 2
    m = R.memory(b, r)
    assert m["weights"] == pytest.approx(2 * n)
    assert m["grads"] == pytest.approx(4 * n)
    assert m["optimizer"] == pytest.approx(12 * n / dp)
    tokens = 128 * 2
    per_token = (4 * h + (8 + 2 * 2) * 32 + 8 * 32 + 3 * f) / 2
    assert m["activations"] == pytest.approx(2 * tokens * layers * per_token + 2 * tokens * h)
    assert m["logits"] == pytest.approx(8 * tokens * vocab / 2)
    # no recomputation adds the attention scores and probabilities; full keeps layer inputs only
    none = R.memory(b, dataclasses.replace(r, recompute="none"))["activations"]
    assert none - m["activations"] == pytest.approx(2 * tokens * layers * 2 * 8 * 128 / 2)
    full = R.memory(b, dataclasses.replace(r, recompute="full"))["activations"]
    assert full == pytest.approx(2 * tokens * (layers * h / 2 + per_token) + 2 * tokens * h)
    # LoRA: frozen bf16 weights, adapters with their gradients and optimizer only
    peft = dataclasses.replace(r, mode="peft", lora=dict(rank=4, alpha=8, dropout=0.0, targets=["linear_qkv"]))
    assert R.lora_params(b, peft) == 4 * (h + q + 2 * kv) * layers
    mp = R.memory(b, peft)
    adapters = R.lora_params(b, peft) / 2
    assert mp["grads"] == pytest.approx(4 * adapters) and mp["weights"] == pytest.approx(2 * n + 2 * adapters)


def test_expert_parameters_spread_over_the_expert_layout():
    b = _bridge("Qwen/Qwen3-30B-A3B")
    base = R.Recipe(model="m", mode="sft", gpus=16, gpu_memory=80, tp=1, ep=8, etp=1)
    wide = dataclasses.replace(base, ep=16)
    m8, m16 = R.memory(b, base), R.memory(b, wide)
    experts = R._params(b)["routed_experts"]
    assert m8["weights"] - m16["weights"] == pytest.approx(2 * (experts / 8 - experts / 16))
    # expert-data-parallel 2 at EP8 halves the experts' optimizer state; 1 at EP16 keeps it whole
    assert m8["optimizer"] - m16["optimizer"] == pytest.approx(12 * (experts / 8 / 2 - experts / 16))


@pytest.mark.parametrize("change,says", [
    (dict(tp=3), "num_attention_heads=32 does not divide by TP=3"),
    (dict(tp=8), "num_query_groups=8"),  # Qwen3-8B: 8 groups divide; 16 would not
    (dict(pp=5), "num_layers=36 does not divide by PP x VPP=5"),
    (dict(pp=2, vpp=4), "num_layers=36 does not divide by PP x VPP=8"),
    (dict(global_batch=102), "global_batch=102 does not divide by micro_batch x DP=4"),
    (dict(gpu_memory=16), "does not fit 16 GiB"),
    (dict(recompute="some"), "recompute='some'"),
])
def test_a_broken_recipe_is_refused_naming_the_size(change, says):
    b = _bridge("Qwen/Qwen3-8B")
    r = dataclasses.replace(R.Recipe(model="Qwen/Qwen3-8B", mode="sft", gpus=8, gpu_memory=80, tp=2), **change)
    found = R.problems(b, r)
    if change == dict(tp=8):
        assert found == [], found  # 32 heads and 8 groups divide by TP 8
        found = R.problems(b, dataclasses.replace(r, tp=16, gpus=16))
        says = "num_query_groups=8 does not divide by TP=16"
    assert any(says in p for p in found), found


def test_experts_must_divide_by_ep():
    b = _bridge("Qwen/Qwen1.5-MoE-A2.7B")  # 60 experts
    r = R.Recipe(model="m", mode="sft", gpus=8, gpu_memory=80, ep=8, etp=1)
    assert any("num_moe_experts=60" in p and "EP" in p for p in R.problems(b, r)), R.problems(b, r)


def test_a_derived_layout_is_the_least_parallel_that_fits():
    b = _bridge("Qwen/Qwen3-8B")
    r = R.recipe(b, "Qwen/Qwen3-8B", "sft", 4, 80)  # no stored layout for 4 cards
    assert r.source.startswith("derived") and R.problems(b, r) == []
    smaller = [dataclasses.replace(r, tp=t) for t in (1, 2, 4) if t < r.tp]
    assert all(R.problems(b, s) for s in smaller)
    with pytest.raises(R.ConfigError, match="no layout of 1 GPUs with 24 GiB fits the pretrain recipe"):
        R.recipe(b, "Qwen/Qwen3-8B", "pretrain", 1, 24)


def test_cli_prints_flags_megatron_lm_reads_back(capsys):
    from bridges.cli import main
    from bridges.megatron_lm import args_namespace

    assert main(["recipe", "Qwen/Qwen3-30B-A3B", "--mode", "sft", "--gpus", "16", "--gpu-memory", "80"]) == 0
    out, err = capsys.readouterr()
    ns = args_namespace(out.split())
    r = R.recipe(_bridge("Qwen/Qwen3-30B-A3B"), "Qwen/Qwen3-30B-A3B", "sft", 16, 80)
    assert (ns.tensor_model_parallel_size, ns.expert_model_parallel_size, ns.num_experts) == (r.tp, r.ep, 128)
    assert (ns.global_batch_size, ns.lr, ns.recompute_granularity, ns.sft) == (128, 1e-5, "selective", True)
    assert ns.use_distributed_optimizer and "estimated per GPU" in err and "qwen3_moe/recipes.toml" in err
    assert main(["recipe", "Qwen/Qwen3-8B", "--mode", "peft", "--gpus", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recipe"]["lora"]["rank"] == 16 and data["memory_gib"]["total"] <= data["usable_gib"]
    assert main(["recipe", "google/gemma-2b", "--gpus", "8"]) == 2
    assert "pretrain_gpt.py cannot build this model" in capsys.readouterr().err
