"""mbridge megatron-args: every model field the provider sets reaches Megatron-LM's
pretrain_gpt.py through a flag (read back the way Megatron-LM's argument code reads it), the
traps are handled, and models its local GPT layers cannot build are refused with the reason."""
import ast
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bridges.core.auto import AutoBridge
from bridges.core.config import ConfigError
from bridges.megatron_lm import ARG_NAMES, NO_FLAG, RUN_FIELDS, megatron_lm_args
from conformance.models import fixture_names, resolve


def _read_back(flags: list[str], fields: dict) -> dict:
    """TransformerConfig kwargs from the flags: a field's flag is --<field> (dashes), a default-
    True bool's is --no-<field>, ARG_NAMES rename a few; --swiglu, --group-query-attention and
    --num-experts are read as core_transformer_config_from_args reads them."""
    names = {v: k for k, v in ARG_NAMES.items()}
    out, i = {}, 0
    while i < len(flags):
        flag = flags[i]
        value = flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else None
        i += 1 if value is None else 2
        if flag == "--swiglu":
            out.update(activation_func=F.silu, gated_linear_unit=True)
            continue
        if flag == "--squared-relu":
            from megatron.core.activations import squared_relu

            out.update(activation_func=squared_relu)
            continue
        if flag == "--quick-geglu":
            from megatron.core.fusions.fused_bias_geglu import quick_gelu

            out.update(activation_func=quick_gelu, gated_linear_unit=True)
            continue
        name = names.get(flag) or flag[2:].replace("-", "_")
        assert name not in NO_FLAG, f"Megatron-LM has no flag {flag}"
        if name.startswith("no_") and name[3:] in fields:
            out[name[3:]] = False
        elif name in fields:
            f = fields[name]
            default = f.default if f.default is not dataclasses.MISSING else None
            if value is None:
                out[name] = (not default) if flag in names else True  # --disable-bias-linear: False
            else:
                out[name] = ast.literal_eval(value) if value[:1] in "[(" or value[:1].isdigit() or value[:1] == "-" \
                    else value
    if out.get("use_mup") and "softmax_scale" in fields:  # TransformerConfig.__post_init__ derives it
        kv = out.get("kv_channels") or out["hidden_size"] // out["num_attention_heads"]
        base = out.get("mup_base_head_dim")
        out["softmax_scale"] = (1.0 if base is None else base ** 0.5) / kv ** out.get("mup_attn_scale_power", 1.0)
    return out


# Refused with the reason's words; every other fixture model must give flags
REFUSED = {"google/gemma-2b": "zero-centred norms", "google/gemma-3-4b-it": "vision-language"}


def _buildable():
    out = []
    for name in fixture_names():
        bridge = AutoBridge.from_hf_config(resolve(name).config)
        if not bridge.megatron_lm and name not in REFUSED:
            out.append(name)
    return out


def _absent(name: str, fields: dict, mla: bool):
    """What the trainer's config holds for a field whose flag is absent: the parser's default
    (TransformerConfig's, or MLA_ARG_DEFAULTS'), else (no flag) the config class's default."""
    from megatron.core.transformer import TransformerConfig

    from bridges.megatron_lm import MLA_ARG_DEFAULTS

    base = {f.name for f in dataclasses.fields(TransformerConfig)}
    if mla and name not in base and name in MLA_ARG_DEFAULTS and name != "rope_type":  # rope_type None: popped
        return MLA_ARG_DEFAULTS[name]
    f = fields[name]
    return f.default if f.default is not dataclasses.MISSING else \
        (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)


@pytest.mark.parametrize("model", _buildable())
def test_every_model_field_reaches_megatron_lm(model):
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    bridge = AutoBridge.from_hf_config(resolve(model).config)
    layout = dict(tp=2, ep=2) if bridge.megatron_attrs().get("num_moe_experts") else dict(tp=2)
    if not getattr(bridge, "expert_tensor_parallel", True):  # biased experts: kept whole
        layout["etp"] = 1
    flags = megatron_lm_args(bridge, **layout)
    mla = "--multi-latent-attention" in flags  # the trainer's config is then MLATransformerConfig
    fields = {f.name: f for f in dataclasses.fields(MLATransformerConfig if mla else TransformerConfig) if f.init}
    back = _read_back(flags, fields)
    provider = bridge.to_megatron_provider()
    carried = bridge.megatron_lm_spec_fields  # no flag: the --spec name carries them (test_megatron_lm_spec.py)
    assert not carried or flags[flags.index("--spec") + 2] != "layer"
    for name, want in provider.as_dict().items():
        if name not in fields or name in RUN_FIELDS or name in carried:
            continue
        got = back.get(name, _absent(name, fields, mla))
        if name == "num_query_groups" and got is None:
            got = provider.num_attention_heads
        if name == "moe_layer_freq" and isinstance(want, int):
            want = [1] * provider.num_layers
        if name == "moe_router_load_balancing_type" and not provider.as_dict().get("moe_aux_loss_coeff"):
            want = "none"
        got = list(got) if isinstance(got, tuple) else got
        want = list(want) if isinstance(want, tuple) else want
        if name == "activation_func" and got is not want:  # the trainer's own function: same values
            x = torch.linspace(-8, 8, 101)
            got, want = got(x).tolist(), want(x).tolist()
        assert got == want, f"{model}: {name} = {want!r} in the provider, {got!r} from the flags"
    # GPTModel's own arguments
    a = provider.as_dict()
    assert flags[flags.index("--vocab-size") + 1] == str(a["vocab_size"])
    if a["position_embedding_type"] in ("rope", "yarn"):
        assert int(flags[flags.index("--rotary-base") + 1]) == a["rotary_base"]
    if a.get("hybrid_layer_pattern"):  # pretrain_hybrid.py's layers
        assert flags[flags.index("--hybrid-layer-pattern") + 1] == a["hybrid_layer_pattern"]
    assert ("--untie-embeddings-and-output-weights" in flags) == (not a["share_embeddings_and_output_weights"])
    assert flags[flags.index("--tensor-model-parallel-size") + 1] == "2"
    if a.get("num_moe_experts"):  # the list form: the integer form lays the MoE keys out differently
        assert flags[flags.index("--moe-layer-freq") + 1].startswith("[")


def test_qwen2_flags_are_the_ones_megatron_lm_loaded():
    """The Qwen2 toy that Megatron-LM's trainer loaded strictly (../shared/DESIGN.md): the flags
    typed by hand then are all generated now."""
    cfg = {**resolve("Qwen/Qwen2.5-7B-Instruct").config, "hidden_size": 80, "intermediate_size": 144,
           "num_attention_heads": 10, "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 313,
           "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False}
    flags = " ".join(megatron_lm_args(AutoBridge.from_hf_config(cfg)))
    typed = ("--num-layers 4 --hidden-size 80 --ffn-hidden-size 144 --num-attention-heads 10 "
             "--group-query-attention --num-query-groups 2 --kv-channels 8 --norm-epsilon 1e-06 "
             "--rotary-base 1000000 --add-qkv-bias --untie-embeddings-and-output-weights --swiglu "
             "--normalization RMSNorm --position-embedding-type rope --disable-bias-linear "
             "--make-vocab-size-divisible-by 128 --transformer-impl local --ckpt-format torch_dist")
    pairs = typed.split(" --")
    assert all(("--" + p.lstrip("-")) in flags for p in pairs), flags


@pytest.mark.parametrize("model,why", sorted(REFUSED.items()))
def test_models_megatron_lm_cannot_build_are_refused(model, why):
    with pytest.raises(ConfigError, match=why):
        megatron_lm_args(AutoBridge.from_hf_config(resolve(model).config))


def test_a_fractional_rotary_base_is_refused():
    cfg = {**resolve("Qwen/Qwen3-8B").config, "rope_theta": 10000.5}
    with pytest.raises(ConfigError, match="--rotary-base takes integers only"):
        megatron_lm_args(AutoBridge.from_hf_config(cfg))


def test_cli_prints_one_flag_a_line(capsys):
    from bridges.cli import main

    assert main(["megatron-args", "Qwen/Qwen3-8B", "--tp", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "--qk-layernorm" in lines and "--tensor-model-parallel-size 2" in lines
    # Megatron-LM fuses by default and stops without TransformerEngine: the provider's portable
    # settings go with the flags
    assert "--no-rope-fusion" in lines and "--attention-softmax-in-fp32" in lines
    assert main(["megatron-args", "google/gemma-2-9b"]) == 2


def test_run_fields_are_only_layout_dtype_and_kernels():
    """The fields left out of the flags describe the run, not the model's math: pinned here, so a
    model field cannot be dropped from the flags by listing it there."""
    assert RUN_FIELDS == {
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
        "expert_model_parallel_size", "expert_tensor_parallel_size", "moe_grouped_gemm", "sequence_parallel",
        "params_dtype", "pipeline_dtype", "bf16", "fp16", "use_cpu_initialization", "perform_initialization",
        "bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm", "bias_dropout_fusion",
        "apply_rope_fusion", "gradient_accumulation_fusion", "attention_softmax_in_fp32"}


def test_args_namespace_is_what_megatron_lm_parses():
    from bridges.megatron_lm import args_namespace

    ns = args_namespace(["--num-layers", "4", "--swiglu", "--no-gradient-accumulation-fusion", "--disable-bias-linear",
                         "--moe-layer-freq", "[1,0,1]", "--norm-epsilon", "1e-06", "--position-embedding-type",
                         "rope", "--num-virtual-stages-per-pipeline-rank", "2"], padded_vocab_size=512)
    assert (ns.num_layers, ns.swiglu, ns.gradient_accumulation_fusion, ns.add_bias_linear) == (4, True, False, False)
    assert (ns.moe_layer_freq, ns.norm_epsilon, ns.position_embedding_type) == ([1, 0, 1], 1e-06, "rope")
    assert (ns.virtual_pipeline_model_parallel_size, ns.padded_vocab_size) == (2, 512)
    assert ns.group_query_attention is False and ns.untie_embeddings_and_output_weights is False  # parser defaults


def test_converted_checkpoint_carries_megatron_lm_args(conformance, tmp_path):
    """`convert import` saves the args namespace as Megatron-LM's trainer does (the common state
    Megatron-LM reads with load_common_state_dict): the fields --use-checkpoint-args takes, equal
    to the model flags `mbridge megatron-args` prints (the kernel switches are the run's)."""
    from megatron.core import dist_checkpointing

    from bridges.core.auto import AutoBridge
    from bridges.megatron_lm import _typed, megatron_lm_args

    toy = conformance.checkpoint(resolve("Qwen/Qwen3-8B"))
    out = tmp_path / "m"
    assert conformance.pool.run("tests.convert_tasks:cli", argv=["convert", "import", "--hf", toy, "--out", str(out),
                                                                 "--tp", "2"]) == [0] * 4
    common = dist_checkpointing.load_common_state_dict(str(out / "iter_0000000"))
    ns, it = common["args"], common["iteration"]
    bridge = AutoBridge.from_hf_pretrained(toy)
    flags = megatron_lm_args(bridge, tp=2)
    flags = flags[:flags.index("--no-rope-fusion")]  # the portable kernel switches follow the model's flags
    for i, f in enumerate(flags):
        if f.startswith("--") and i + 1 < len(flags) and not flags[i + 1].startswith("--"):
            assert getattr(ns, f[2:].replace("-", "_")) == _typed(flags[i + 1]), f
    a = bridge.megatron_attrs()
    assert (ns.num_layers, ns.hidden_size, ns.num_attention_heads, ns.kv_channels, it) == \
        (a["num_layers"], a["hidden_size"], a["num_attention_heads"], a["kv_channels"], 0)
    assert ns.swiglu and ns.group_query_attention and ns.untie_embeddings_and_output_weights is not None
    assert ns.padded_vocab_size == 512 and ns.tensor_model_parallel_size == 2  # 503 padded to 128 x TP2
    assert ns.ckpt_format == "torch_dist" and not hasattr(ns, "apply_rope_fusion")


def test_beside_checkpoint_args_are_the_flags_megatron_lm_does_not_restore():
    """--use-checkpoint-args restores FROM_CHECKPOINT (Megatron-LM's load_args_from_checkpoint);
    the rest of the flags, and only they, are printed beside it: for Qwen3, QK norm and the
    norm epsilon (a model flag the trainer would otherwise build wrong), the vocabulary, layout."""
    from bridges.core.auto import AutoBridge
    from bridges.megatron_lm import FROM_CHECKPOINT, _dest, _pairs, beside_checkpoint_args, megatron_lm_args

    flags = megatron_lm_args(AutoBridge.from_hf_config(resolve("Qwen/Qwen3-8B").config))
    beside = beside_checkpoint_args(flags)
    assert {"--qk-layernorm", "--norm-epsilon", "--vocab-size", "--tensor-model-parallel-size"} <= set(beside)
    assert not {"--num-layers", "--hidden-size", "--swiglu", "--rotary-base"} & set(beside)
    kept = {f for f, _ in _pairs(beside)}
    assert all((_dest(f) in FROM_CHECKPOINT) != (f in kept) for f, _ in _pairs(flags))


def test_spec_flag_travels_in_the_checkpoint_args():
    """`--spec module name` (two values) is kept whole: in the args namespace as the list Megatron-LM
    parses (nargs='*'), restored by --use-checkpoint-args, so not printed beside it."""
    from bridges.megatron_lm import _flags, _pairs, args_namespace, beside_checkpoint_args, checkpoint_args

    bridge = AutoBridge.from_hf_config(resolve("deepseek-ai/DeepSeek-V2-Lite").config)
    flags = megatron_lm_args(bridge)
    assert flags[-3:] == ["--spec", "bridges.models.deepseek.megatron_lm_spec", "layer"]
    assert _flags(_pairs(flags)) == flags
    assert args_namespace(flags).spec == ["bridges.models.deepseek.megatron_lm_spec", "layer"]
    assert "--spec" not in beside_checkpoint_args(flags) and "layer" not in beside_checkpoint_args(flags)
    ns = checkpoint_args(bridge, bridge.to_megatron_provider().finalize())
    assert ns.spec == ["bridges.models.deepseek.megatron_lm_spec", "layer"] and ns.multi_latent_attention
    kimi = AutoBridge.from_hf_config(resolve("moonshotai/Kimi-K2-Instruct").config)  # YaRN: the spec name
    assert checkpoint_args(kimi, kimi.to_megatron_provider().finalize()).spec == [
        "bridges.models.deepseek.megatron_lm_spec", "layer_yarn_4096_1.0_1.0"]


def test_yarn_fields_without_a_flag_refused_beside_an_mtp_layer():
    """The spec's name reaches the decoder layers, not the MTP layer pretrain_gpt.py builds."""
    cfg = {**resolve("deepseek-ai/DeepSeek-V3").config}
    cfg["rope_scaling"] = {**cfg["rope_scaling"], "beta_fast": 1.0}
    with pytest.raises(ConfigError, match="MTP layer with YaRN values no flag reaches"):
        megatron_lm_args(AutoBridge.from_hf_config(cfg))


def test_hybrid_pattern_carries_the_pipeline_stages():
    """pretrain_hybrid.py takes the stage layout from '|' in --hybrid-layer-pattern (the virtual
    stages too, and refuses --num-virtual-stages-per-pipeline-rank beside it): the same cut as the
    bridge's HybridModel (bridges/core/hybrid.stage_pattern)."""
    cfg = {**resolve("nvidia/Nemotron-H-56B-Base-8K").config, "hybrid_override_pattern": "M*M-M*M-"}
    cfg["num_hidden_layers"] = 8
    bridge = AutoBridge.from_hf_config(cfg)
    flags = megatron_lm_args(bridge, pp=2, vpp=2)
    assert flags[flags.index("--hybrid-layer-pattern") + 1] == "M*|M-|M*|M-"
    assert "--num-virtual-stages-per-pipeline-rank" not in flags
    assert megatron_lm_args(bridge)[megatron_lm_args(bridge).index("--hybrid-layer-pattern") + 1] == "M*M-M*M-"
    qwen = megatron_lm_args(AutoBridge.from_hf_config(resolve("Qwen/Qwen3-8B").config), pp=2, vpp=2)
    assert qwen[qwen.index("--num-virtual-stages-per-pipeline-rank") + 1] == "2"


def test_a_list_field_is_one_flag_with_its_items_as_words():
    """Megatron-LM parses a list field (--mrope-section) as nargs='+' ints: a text-only Qwen3.5's
    trainer run stopped at '[4,2,2]' (invalid int value) before the items went as words."""
    from bridges.megatron_lm import args_namespace

    cfg = resolve("Qwen/Qwen3.5-9B-transformers-defaults").config
    text = {**cfg["text_config"], "model_type": "qwen3_5_text", "architectures": ["Qwen3_5ForCausalLM"]}
    flags = megatron_lm_args(AutoBridge.from_hf_config(text))
    i = flags.index("--mrope-section")
    assert flags[i + 1:i + 4] == ["11", "11", "10"] and flags[i + 4].startswith("--")
    assert args_namespace(flags).mrope_section == [11, 11, 10]
