"""Megatron-LM's `pretrain_gpt.py` model arguments for a bridge's model, from its provider.

Follows NVIDIA/Megatron-LM main at d98e8a64dd (megatron/training/arguments.py and
argument_utils.py; megatron-core 0.20 inside). There most model arguments are generated from
TransformerConfig's fields: ``--<field>`` with dashes, a bool whose default is False a
``store_true`` flag, a bool whose default is True ``--no-<field>``, a few fields under names of
their own (``ARG_NAMES``). The fields the generator leaves out are set through other flags
(``_special``) or belong to the run, not the model (``RUN_FIELDS``). GPTModel's own arguments
(vocabulary, positions, rope, tying) have flags of their own. The traps seen when these flags
were typed by hand (docs/megatron-lm.md) are the rules here: ``--moe-layer-freq`` as a list
(the integer form lays the MoE keys out differently and the strict load fails), an integer
``--rotary-base``, ``--group-query-attention`` only with fewer groups than heads.

A family whose layers are its own modules (local MLA, OLMoE's whole-projection QK norm) gets
``--spec <module> layer`` naming its spec module (``Bridge.megatron_lm_spec``,
bridges/core/megatron_lm_spec.py; the trainer must import ``bridges``). A model pretrain_gpt.py
cannot build even so (Gemma's scaled embeddings and soft-caps live in GPTModel, a vision tower,
a hybrid stack) is refused, naming the reason (``Bridge.megatron_lm``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from bridges.core.config import ConfigError

# TransformerConfig fields whose generated flag has another name
ARG_NAMES = {"layernorm_epsilon": "--norm-epsilon", "layernorm_zero_centered_gamma": "--apply-layernorm-1p",
             "add_bias_linear": "--disable-bias-linear", "num_moe_experts": "--num-experts",
             "use_mamba_mem_eff_path": "--disable-mamba-mem-eff-path"}

# Fields that describe the run, not the model: the layout (its own flags below), dtypes (--bf16),
# fusions and initialisation (the provider sets them for a portable, loaded model)
RUN_FIELDS = {"tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
              "expert_model_parallel_size", "expert_tensor_parallel_size", "moe_grouped_gemm", "sequence_parallel",
              "params_dtype", "pipeline_dtype", "bf16", "fp16", "use_cpu_initialization", "perform_initialization",
              "bias_activation_fusion", "masked_softmax_fusion", "persist_layer_norm", "bias_dropout_fusion",
              "apply_rope_fusion", "gradient_accumulation_fusion", "attention_softmax_in_fp32"}

# Multi-latent attention: MLATransformerConfig's own fields with a flag, at Megatron-LM's argparse
# defaults (they differ from the dataclass's: always given), and those without one, which the
# trainer leaves at the dataclass's defaults (a model with other values is refused)
MLA_ARG_DEFAULTS = dict(q_lora_rank=None, kv_lora_rank=32, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
                        rope_type=None, rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
MLA_NO_FLAG = ("original_max_position_embeddings", "beta_fast", "beta_slow")


def mla_no_flag_default(name: str):
    """What the trainer's MLA config holds for one of ``MLA_NO_FLAG`` (the dataclass's default)."""
    from megatron.core.transformer import MLATransformerConfig

    return _default(_fields(MLATransformerConfig)[name])

# Model fields Megatron-LM's generator leaves out with no flag of their own ("no CLI argument
# exists for these"): a model that sets one is refused, but softmax_scale under use_mup, which
# TransformerConfig derives from the MuP flags (``_mup_softmax_scale``)
NO_FLAG = {"softmax_scale", "memory_efficient_layer_norm", "fused_single_qkv_rope", "moe_token_dropping",
           "heterogeneous_block_specs", "disable_parameter_transpose_cache"}

# Fields set through flags of their own (Megatron-LM's generator leaves them out)
SPECIAL = {"activation_func", "gated_linear_unit", "num_query_groups", "window_size", "window_attn_skip_freq",
           "moe_layer_freq", "moe_router_load_balancing_type", "moe_aux_loss_coeff"}


def _fields(config_class) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_class) if f.init}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(str(x) for x in v) + "]"  # no spaces: one shell word
    return str(v)


def _flag(name: str, value, default) -> list[str]:
    """The generated flag of TransformerConfig field ``name`` set to ``value``."""
    if isinstance(default, bool) or isinstance(value, bool):
        if bool(value) == bool(default):
            return []
        if name in ARG_NAMES:
            return [ARG_NAMES[name]]
        return [f"--{name.replace('_', '-')}"] if value else [f"--no-{name.replace('_', '-')}"]
    if isinstance(value, (list, tuple)):  # a list field is one nargs="+" flag: its items as words
        return [ARG_NAMES.get(name, f"--{name.replace('_', '-')}"), *(str(x) for x in value)]
    return [ARG_NAMES.get(name, f"--{name.replace('_', '-')}"), _value(value)]


def _mup_softmax_scale(kw: dict[str, Any]) -> list[str]:
    """Flags that make the trainer's config derive the model's ``softmax_scale`` (no flag of its
    own). With use_mup TransformerConfig sets it, when unset, to
    ``sqrt(mup_base_head_dim or 1) / kv_channels ** mup_attn_scale_power``; the first of a few
    forms that gives the value back exactly in floating point is used."""
    scale = kw["softmax_scale"]
    if not kw.get("use_mup"):
        raise ConfigError(f"softmax_scale={scale!r}: Megatron-LM has no flag for it (its config derives it "
                          "only under use_mup)")
    kv = kw.get("kv_channels") or kw["hidden_size"] // kw["num_attention_heads"]
    for power, base in ((1.0, None), (0.0, scale * scale), (1.0, (scale * kv) ** 2), (0.5, scale * scale * kv)):
        if (1.0 if base is None else base ** 0.5) / (kv ** power) == scale:
            out = [] if power == 1.0 else ["--mup-attn-scale-power", _value(power)]
            return out + ([] if base is None else ["--mup-base-head-dim", _value(base)])
    raise ConfigError(f"softmax_scale={scale!r}: no MuP flags (--mup-base-head-dim, --mup-attn-scale-power) "
                      f"give it back exactly with kv_channels={kv}")


def _special(kw: dict[str, Any], heads: int) -> list[str]:
    import torch.nn.functional as F

    out: list[str] = []
    act, glu = kw.get("activation_func", F.gelu), kw.get("gated_linear_unit", False)
    if act is F.silu and glu:
        out.append("--swiglu")
    elif glu and getattr(act, "megatron_lm_flag", None):  # a family's function Megatron-LM names
        out.append(act.megatron_lm_flag)
    elif not (act is F.gelu and not glu):
        from megatron.core.activations import squared_relu

        if act is squared_relu and not glu:
            out.append("--squared-relu")
        else:
            raise ConfigError(f"activation {getattr(act, '__name__', act)} (gated={glu}) has no "
                              f"Megatron-LM flag (--swiglu, --squared-relu, --quick-geglu)")
    groups = kw.get("num_query_groups")
    if groups and groups != heads:
        out += ["--group-query-attention", "--num-query-groups", str(groups)]
    if kw.get("window_size"):
        out += ["--window-size", "(" + ",".join(str(w) for w in kw["window_size"]) + ")"]
    if kw.get("window_attn_skip_freq") is not None:
        out += ["--window-attn-skip-freq", _value(kw["window_attn_skip_freq"])]
    if kw.get("num_moe_experts"):
        freq = kw.get("moe_layer_freq", 1)
        if isinstance(freq, int):  # every freq-th layer: written as the list
            freq = [int(i % freq == 0) for i in range(kw["num_layers"])]
        out += ["--moe-layer-freq", _value(freq)]
        coeff = kw.get("moe_aux_loss_coeff", 0.0)
        balance = kw.get("moe_router_load_balancing_type", "aux_loss") if coeff else "none"
        out += ["--moe-router-load-balancing-type", balance]
        if coeff:
            out += ["--moe-aux-loss-coeff", str(coeff)]
    return out


def model_args(provider, carried: tuple[str, ...] = ()) -> list[str]:
    """``pretrain_gpt.py`` flags for the model the provider builds, its layout included.
    ``carried``: fields no flag reaches that the bridge's ``--spec`` name carries."""
    from megatron.core.transformer import TransformerConfig

    attrs = provider.as_dict()
    fields = _fields(TransformerConfig)  # a subclass's own fields: below
    kw = {k: v for k, v in attrs.items() if k in fields}
    out: list[str] = _mla_args(provider._config_class, attrs, carried) if attrs.get("multi_latent_attention") else []
    for name, value in sorted(kw.items()):
        if name in RUN_FIELDS or name in SPECIAL or name == "transformer_impl":  # given last
            continue
        default = _default(fields[name])
        if value == default:
            continue
        if name == "softmax_scale":
            out += _mup_softmax_scale(kw)
        elif name in NO_FLAG:
            raise ConfigError(f"{name}={value!r}: Megatron-LM has no flag for this TransformerConfig field")
        else:
            out += _flag(name, value, default)
    out += _special(kw, attrs["num_attention_heads"])
    out += _gpt_model_args(attrs)
    lay = provider.layout
    out += ["--tensor-model-parallel-size", str(lay.tp), "--pipeline-model-parallel-size", str(lay.pp)]
    if attrs.get("hybrid_layer_pattern"):  # pretrain_hybrid.py: the layers by kind, stages cut by '|'
        from bridges.core.hybrid import stage_pattern

        out += ["--hybrid-layer-pattern", stage_pattern(attrs["hybrid_layer_pattern"], lay.pp, lay.vpp)]
    elif lay.vpp:  # a hybrid pattern's segments give the virtual stages (the flag is refused with it)
        out += ["--num-virtual-stages-per-pipeline-rank", str(lay.vpp)]
    if attrs.get("num_moe_experts"):
        out += ["--expert-model-parallel-size", str(lay.ep),
                "--expert-tensor-parallel-size", str(lay.etp or lay.tp)]
        if lay.grouped:
            out.append("--moe-grouped-gemm")
    import torch

    if attrs["params_dtype"] == torch.bfloat16:
        out.append("--bf16")
    return out + PORTABLE + ["--transformer-impl", "local", "--ckpt-format", "torch_dist"]


def _mla_args(cls, attrs: dict[str, Any], carried: tuple[str, ...] = ()) -> list[str]:
    """MLATransformerConfig's own fields: every one with a flag given, the others checked (or
    carried by the ``--spec`` name)."""
    mla = _fields(cls)
    for name in MLA_NO_FLAG:
        if name not in carried and attrs.get(name) != _default(mla[name]):
            raise ConfigError(f"{name}={attrs.get(name)}: no Megatron-LM flag reaches the MLA config's {name} "
                              f"(the trainer keeps {_default(mla[name])})")
    return [x for name in MLA_ARG_DEFAULTS if attrs.get(name) is not None
            for x in (f"--{name.replace('_', '-')}", _value(attrs[name]))]


# The provider's portable settings (no fused kernels: no TransformerEngine or Apex needed; the
# softmax in fp32, as HF) as Megatron-LM's flags: its defaults fuse, and without TE it stops at
# "apply_rope_fusion is not available"
PORTABLE = ["--no-rope-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-gelu-fusion",
            "--no-bias-dropout-fusion", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
            "--attention-softmax-in-fp32"]


def _gpt_model_args(a: dict[str, Any]) -> list[str]:
    """GPTModel's arguments: vocabulary (NullTokenizer's --vocab-size), positions, rope, tying."""
    out = ["--vocab-size", str(a["vocab_size"]), "--make-vocab-size-divisible-by",
           str(a["make_vocab_size_divisible_by"]), "--max-position-embeddings", str(a["max_sequence_length"]),
           "--position-embedding-type", a["position_embedding_type"]]
    if a["position_embedding_type"] in ("rope", "yarn"):
        base = a["rotary_base"]
        if float(base) != math.floor(float(base)):
            raise ConfigError(f"rotary_base={base}: Megatron-LM's --rotary-base takes integers only")
        out += ["--rotary-base", str(int(base))]
        if a.get("rotary_percent", 1.0) != 1.0:
            out += ["--rotary-percent", str(a["rotary_percent"])]
        if a.get("rope_scaling"):
            out += ["--use-rope-scaling", "--rope-scaling-factor", str(a["rope_scaling_factor"])]
        factor = a.get("seq_len_interpolation_factor")
        if factor:
            if float(factor) != int(factor):
                raise ConfigError(f"seq_len_interpolation_factor={factor}: Megatron-LM's "
                                  f"--rotary-seq-len-interpolation-factor takes integers only")
            out += ["--rotary-seq-len-interpolation-factor", str(int(factor))]
    if not a["share_embeddings_and_output_weights"]:
        out.append("--untie-embeddings-and-output-weights")
    return out


def megatron_lm_args(bridge, tp: int = 1, pp: int = 1, vpp: int | None = None, ep: int = 1,
                     etp: int | None = None) -> list[str]:
    """The flags for a bridge's model under a layout; a model Megatron-LM's local GPT layers
    cannot build is a ConfigError naming why (``bridge.megatron_lm``)."""
    why = getattr(bridge, "megatron_lm", None)
    if why:
        raise ConfigError(f"{bridge.model_type}: Megatron-LM's pretrain_gpt.py cannot build this model: {why}")
    from bridges.core.parallel import Layout

    provider = bridge.to_megatron_provider().set_layout(Layout(tp=tp, pp=pp, vpp=vpp, ep=ep, etp=etp))
    spec = getattr(bridge, "megatron_lm_spec", None)
    carried = getattr(bridge, "megatron_lm_spec_fields", ())
    return model_args(provider.finalize(), carried) + (["--spec", *spec] if spec else [])


# Flags whose destination in Megatron-LM's parser is not the flag's own name
DESTS = {"--disable-bias-linear": ("add_bias_linear", False),
         "--disable-mamba-mem-eff-path": ("use_mamba_mem_eff_path", False),
         "--num-virtual-stages-per-pipeline-rank": ("virtual_pipeline_model_parallel_size", None)}

# The booleans Megatron-LM's load_args_from_checkpoint copies from a checkpoint (forced), at the
# value its parser gives them when the flag is absent
BOOL_DEFAULTS = dict(group_query_attention=False, swiglu=False, squared_relu=False, add_bias_linear=True,
                     add_qkv_bias=False, untie_embeddings_and_output_weights=False, apply_layernorm_1p=False,
                     rotary_interleaved=False, moe_router_pre_softmax=False, moe_grouped_gemm=False,
                     moe_router_enable_expert_bias=False)


# What Megatron-LM's --use-checkpoint-args takes from a checkpoint's args (load_args_from_checkpoint
# at d98e8a64dd); the layout only with --use-mp-args-from-checkpoint-args, so it is not counted here
FROM_CHECKPOINT = frozenset("""
    add_bias_linear add_position_embedding add_qkv_bias apply_query_key_layer_scaling attention_dropout
    ckpt_format ffn_hidden_size group_query_attention hidden_dropout hidden_size kv_channels
    max_position_embeddings moe_ffn_hidden_size moe_grouped_gemm moe_layer_freq moe_router_enable_expert_bias
    moe_router_pre_softmax moe_router_score_function moe_router_topk moe_router_topk_scaling_factor
    moe_shared_expert_intermediate_size moe_token_dispatcher_type mtp_num_layers normalization
    num_attention_heads num_experts num_layers num_query_groups padded_vocab_size position_embedding_type
    rotary_base rotary_interleaved rotary_percent spec squared_relu swiglu untie_embeddings_and_output_weights
    use_rotary_position_embeddings""".split())


def _pairs(flags: list[str]) -> list[tuple[str, Any]]:
    """(flag, its value, its values as a tuple (``--spec module name``), or None) in order."""
    out, i = [], 0
    while i < len(flags):
        j = i + 1
        while j < len(flags) and not flags[j].startswith("--"):
            j += 1
        values = tuple(flags[i + 1:j])
        out.append((flags[i], None if not values else values[0] if len(values) == 1 else values))
        i = j
    return out


def _dest(flag: str) -> str:
    if flag in DESTS:
        return DESTS[flag][0]
    dest = flag[2:].replace("-", "_")
    return dest[3:] if flag.startswith("--no-") else dest


def beside_checkpoint_args(flags: list[str]) -> list[str]:
    """The flags ``--use-checkpoint-args`` does not restore from a converted checkpoint: what
    to give pretrain_gpt.py beside it (e.g. QK norm, the norm epsilon, the vocabulary, the layout)."""
    return _flags([(flag, value) for flag, value in _pairs(flags) if _dest(flag) not in FROM_CHECKPOINT])


def _flags(pairs: list[tuple[str, str | None]]) -> list[str]:
    """``_pairs``' inverse."""
    return [x for flag, value in pairs
            for x in ((flag,) if value is None else (flag, *value) if isinstance(value, tuple) else (flag, value))]


def _typed(text: str):
    if text.startswith("[") and text.endswith("]"):
        return [_typed(x) for x in text[1:-1].split(",") if x]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def args_namespace(flags: list[str], **extra):
    """What Megatron-LM's argument parser makes of ``flags``, as its trainer saves it in a
    checkpoint (``state_dict['args']``): every flag under its destination, typed (a flag alone is
    ``store_true``; ``--no-<x>`` sets ``x`` False; ``--disable-bias-linear`` sets
    ``add_bias_linear`` False), the booleans ``--use-checkpoint-args`` reads at their parser
    defaults when absent, and ``extra`` (e.g. ``padded_vocab_size``). Plain values only: the
    namespace loads under torch's ``weights_only`` (megatron-core allows ``Namespace``)."""
    import argparse

    ns = argparse.Namespace(**BOOL_DEFAULTS)
    for flag, value in _pairs(flags):
        dest = _dest(flag)
        if isinstance(value, tuple):  # nargs (--spec, --mrope-section): a list, each item typed
            setattr(ns, dest, [_typed(x) for x in value])
        elif value is not None:
            setattr(ns, dest, _typed(value))
        else:
            setattr(ns, dest, DESTS[flag][1] if flag in DESTS else not flag.startswith("--no-"))
    for k, v in extra.items():
        setattr(ns, k, v)
    return ns


def checkpoint_args(bridge, provider):
    """The ``args`` a converted checkpoint carries for Megatron-LM (``--use-checkpoint-args``:
    the trainer takes the model from it and checks what it is given), or None for a model its
    local GPT layers cannot build."""
    if getattr(bridge, "megatron_lm", None):
        return None
    try:
        model = model_args(provider, getattr(bridge, "megatron_lm_spec_fields", ()))
    except ConfigError:  # a field no flag reaches: the trainer cannot build this model either
        return None
    run = set(PORTABLE) | {"--transformer-impl", "--ckpt-format"}  # the run's, not the model's
    flags = _flags([(f, v) for f, v in _pairs(model) if f not in run])
    spec = getattr(bridge, "megatron_lm_spec", None)  # --use-checkpoint-args restores it
    return args_namespace(flags, padded_vocab_size=provider.padded_vocab_size, ckpt_format="torch_dist",
                          **({"spec": list(spec)} if spec else {}))
