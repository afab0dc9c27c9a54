"""Config translation: HF config <-> flat Megatron provider fields, as a declarative table.

Each ``Field`` maps one HF config path (dotted, so nested VLM configs like
``text_config.hidden_size`` work) to one provider attribute, with optional value converters.
Fields whose value cannot be represented raise ``ConfigError`` naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from bridges.core.errors import MBridgeError


class ConfigError(MBridgeError, ValueError):
    """An HF config field is missing, contradictory, or not supported by the bridge."""


_MISSING = object()


@dataclass(frozen=True)
class Field:
    hf: str
    megatron: str
    default: Any = _MISSING  # used when the HF field is absent or None
    to_megatron: Callable[[Any], Any] | None = None
    to_hf: Callable[[Any], Any] | None = None


def get_path(cfg: Any, path: str, default: Any = _MISSING) -> Any:
    obj = cfg
    for part in path.split("."):
        obj = obj.get(part, _MISSING) if isinstance(obj, dict) else getattr(obj, part, _MISSING)
        if obj is _MISSING:
            break
    if obj is _MISSING or obj is None:
        if default is _MISSING:
            raise ConfigError(f"config field {path!r} is required but missing")
        return default
    return obj


def set_path(d: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
_ACT_NAMES = {id(fn): name for name, fn in ACTIVATIONS.items() if name != "swish"}


def activation_to_megatron(name: str):
    if name not in ACTIVATIONS:
        raise ConfigError(f"hidden_act={name!r} is not supported (known: {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def activation_to_hf(fn) -> str:
    return _ACT_NAMES[id(fn)]


_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Fields every GPT-style decoder shares. Families extend or override this table.
GPT_FIELDS: tuple[Field, ...] = (
    Field("num_hidden_layers", "num_layers"),
    Field("hidden_size", "hidden_size"),
    Field("intermediate_size", "ffn_hidden_size"),
    Field("num_attention_heads", "num_attention_heads"),
    Field("num_key_value_heads", "num_query_groups"),  # default filled from heads below
    Field("head_dim", "kv_channels"),  # default filled from hidden/heads below
    Field("rms_norm_eps", "layernorm_epsilon", 1e-6),
    Field("vocab_size", "vocab_size"),
    Field("max_position_embeddings", "max_sequence_length"),
    Field("tie_word_embeddings", "share_embeddings_and_output_weights", False),
    Field("hidden_act", "activation_func", "silu", activation_to_megatron, activation_to_hf),
    Field("initializer_range", "init_method_std", 0.02),
    Field("attention_dropout", "attention_dropout", 0.0),
)


def translate(cfg: Any, fields: tuple[Field, ...]) -> dict[str, Any]:
    """HF config (object or dict) -> provider attributes, per the table."""
    out: dict[str, Any] = {}
    for f in fields:
        default = f.default
        if f.megatron == "num_query_groups":
            default = get_path(cfg, _sibling(f.hf, "num_attention_heads"))
        elif f.megatron == "kv_channels":
            default = (get_path(cfg, _sibling(f.hf, "hidden_size"))
                       // get_path(cfg, _sibling(f.hf, "num_attention_heads")))
        value = get_path(cfg, f.hf, default)
        out[f.megatron] = f.to_megatron(value) if f.to_megatron else value
    return out


def untranslate(attrs: dict[str, Any], fields: tuple[Field, ...]) -> dict[str, Any]:
    """Provider attributes -> HF config dict (nested where the paths are dotted)."""
    out: dict[str, Any] = {}
    for f in fields:
        if f.megatron in attrs:
            v = attrs[f.megatron]
            set_path(out, f.hf, f.to_hf(v) if f.to_hf else v)
    return out


def _sibling(path: str, name: str) -> str:
    return path.rsplit(".", 1)[0] + "." + name if "." in path else name


# -- rope ---------------------------------------------------------------------------------
def rope_parameters(cfg: Any, prefix: str = "") -> dict:
    """Normalised rope parameters: transformers-5 ``rope_parameters`` or legacy
    ``rope_theta`` + ``rope_scaling`` (either ``rope_type`` or ``type`` spelling)."""
    p = dict(get_path(cfg, prefix + "rope_parameters", None) or {})
    legacy = get_path(cfg, prefix + "rope_scaling", None) or {}
    p = {**legacy, **p}
    if "type" in p and "rope_type" not in p:
        p["rope_type"] = p.pop("type")
    p.setdefault("rope_type", "default")
    p.setdefault("rope_theta", get_path(cfg, prefix + "rope_theta", 10000.0))
    p.setdefault("partial_rotary_factor", get_path(cfg, prefix + "partial_rotary_factor", 1.0))
    return p


# Megatron's RotaryEmbedding hard-codes these llama3 scaling constants.
_MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


def rope_to_megatron(p: dict) -> dict[str, Any]:
    kind = p["rope_type"]
    out: dict[str, Any] = {"position_embedding_type": "rope", "rotary_base": float(p["rope_theta"]),
                           "rope_scaling": False, "rope_scaling_factor": 8.0,
                           "seq_len_interpolation_factor": None,
                           "rotary_percent": float(p.get("partial_rotary_factor", 1.0))}
    if kind == "default":
        pass
    elif kind == "linear":
        out["seq_len_interpolation_factor"] = float(p["factor"])
    elif kind == "llama3":
        for k, v in _MEGATRON_LLAMA3.items():
            if float(p.get(k, v)) != v:
                raise ConfigError(f"rope_parameters.{k}={p[k]} differs from Megatron-Core's fixed "
                                  f"llama3 value {v}")
        out.update(rope_scaling=True, rope_scaling_factor=float(p["factor"]))
    elif kind == "yarn":
        out.update(position_embedding_type="yarn",
                   yarn_rotary_scaling_factor=float(p["factor"]),
                   yarn_original_max_position_embeddings=int(p["original_max_position_embeddings"]),
                   yarn_beta_fast=float(p.get("beta_fast", 32.0)),
                   yarn_beta_slow=float(p.get("beta_slow", 1.0)),
                   yarn_mscale=float(p.get("mscale", 1.0)),
                   yarn_mscale_all_dim=float(p.get("mscale_all_dim", 0.0)))
        if p.get("truncate", True) is False:  # HF's default (true): the correction range in whole dims
            out["yarn_correction_range_round_to_int"] = False
    else:
        raise ConfigError(f"rope_parameters.rope_type={kind!r} is not supported "
                          f"(supported: default, linear, llama3, yarn)")
    return out


def params_dtype(cfg: Any) -> torch.dtype:
    name = get_path(cfg, "dtype", None) or get_path(cfg, "torch_dtype", None) or "float32"
    name = str(name).replace("torch.", "")
    if name not in _TORCH_DTYPES:
        raise ConfigError(f"dtype={name!r} is not supported (known: {sorted(_TORCH_DTYPES)})")
    return _TORCH_DTYPES[name]
