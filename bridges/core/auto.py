"""AutoBridge: pick the registered bridge for a checkpoint or config."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bridges.core.bridge import Bridge
from bridges.core.config import ConfigError
from bridges.core.hf_io import INDEX, SINGLE, CheckpointError, HFCheckpoint
from bridges.core.registry import lookup


class RemoteCodeError(ConfigError):
    """The config asks for remote code (``auto_map``) and ``trust_remote_code`` was not given."""


def _check_remote_code(config: Any, source: str, trust_remote_code: bool) -> None:
    """Refuse a config whose ``auto_map`` points at code in the model repository, unless the
    caller trusts it. (The bridge never runs that code; a model that needs it is one whose
    author says the stock classes do not describe it, so we want the caller to say so.)"""
    auto_map = (config.get("auto_map") if isinstance(config, dict)
                else getattr(config, "auto_map", None))
    if auto_map and not trust_remote_code and not _ported(config, auto_map):
        raise RemoteCodeError(
            f"{source}: field 'auto_map' asks for remote code ({auto_map!r}). This model's "
            f"repository ships its own modelling code; the bridge never runs it (bridges are "
            f"declarative), but converting such a model means trusting that the registered "
            f"bridge describes it. Pass trust_remote_code=True to proceed")


def _ported(config: Any, auto_map: dict) -> bool:
    """Whether the registered bridge declares every ``auto_map`` entry as code transformers
    implements natively (``Bridge.ported_remote_code``, e.g. DeepSeek-V3's and Kimi-K2's
    modeling_deepseek): the model is then read with transformers' own class and the bridge's
    tables; the repository's code is neither needed nor trusted."""
    from bridges.core.registry import UnknownModelError, lookup

    try:
        cls = lookup(config)
    except UnknownModelError:
        return False
    entries = list(auto_map.values()) if isinstance(auto_map, dict) else [auto_map]
    return all(isinstance(e, str) and e in cls.ported_remote_code for e in entries)


def _hf_config_object(config: dict[str, Any], source: str, hf_type: str | None = None) -> Any:
    """A transformers config object for the dict (normalises legacy fields, e.g. rope).
    ``hf_type``: the transformers model type to read it as, for a bridge whose own model type
    transformers does not know (``Bridge.hf_model_type``)."""
    from transformers import AutoConfig

    kw = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        return AutoConfig.for_model(hf_type or config["model_type"], **kw)
    except (ValueError, KeyError):
        return config  # a model type transformers does not know: the bridge reads the dict
    except Exception as e:  # transformers validates fields: surface which file was bad
        raise ConfigError(f"{source}: transformers rejects this config ({e})") from e


def _require_fields(cls, raw: dict[str, Any], source: str) -> None:
    """Required table fields must be in the file itself: transformers would fill its class
    defaults in (a missing vocab_size silently becoming 32000)."""
    from bridges.core.config import _MISSING, get_path

    aliases = _aliases(cls.hf_model_type or raw.get("model_type"))
    for f in cls.config_fields:
        if "." in f.hf and isinstance(raw.get(f.hf.split(".")[0]), dict):
            continue  # a VLM's text_config: the published files rely on its class defaults
        names = {f.hf} | aliases.get(f.hf, set())
        if f.hf.startswith("text_config.") and "text_config" not in raw:  # a flat (legacy) VLM config
            names.add(f.hf[len("text_config."):])
        if f.default is _MISSING and f.megatron not in ("num_query_groups", "kv_channels") \
                and all(get_path(raw, n, None) is None for n in names):
            raise ConfigError(f"{source}: config field {f.hf!r} is required but missing")


def _aliases(model_type: str | None) -> dict[str, set[str]]:
    """Field spellings transformers treats as one (its config class's ``attribute_map``, e.g.
    Qwen3-MoE's num_experts, saved as num_local_experts by transformers 5)."""
    try:
        from transformers import CONFIG_MAPPING

        amap = CONFIG_MAPPING[model_type].attribute_map
    except (KeyError, ImportError):
        return {}
    out: dict[str, set[str]] = {}
    for a, b in amap.items():
        out.setdefault(a, set()).add(b)
        out.setdefault(b, set()).add(a)
    return out


class AutoBridge:
    """Entry points. Every constructor returns an instance of the registered bridge."""

    @staticmethod
    def from_hf_pretrained(path_or_hub_id: str | os.PathLike, *, trust_remote_code: bool = False,
                           allow_pickle: bool = False) -> Bridge:
        """From a local checkpoint directory, or a hub id (downloaded with huggingface_hub).

        A config with ``auto_map`` (the model needs remote code) is refused with RemoteCodeError
        unless ``trust_remote_code=True``. With it, the bridge proceeds as for any config: the
        remote code is never downloaded, imported or executed (bridges are declarative: the
        registered bridge's tables describe the model, not the repository's Python).

        Pickle weights (``pytorch_model.bin`` and other ``*.bin`` / ``*.pt``) are refused with
        PickleRefusedError unless ``allow_pickle=True``; then they are read with
        ``torch.load(weights_only=True)``. Safetensors, when present, are always preferred.
        """
        path = Path(path_or_hub_id).expanduser()
        if not path.is_dir():
            s = str(path_or_hub_id)
            if path.exists() or path.is_absolute() or s.startswith((".", "~")) or s.count("/") > 1:
                raise CheckpointError(f"{path}: no such checkpoint directory")
            from huggingface_hub import snapshot_download

            patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            path = Path(snapshot_download(str(path_or_hub_id), allow_patterns=patterns))
            if allow_pickle and not ((path / SINGLE).exists() or (path / INDEX).exists()):
                # no safetensors on the hub: fetch the pickle weights too (never *.py)
                path = Path(snapshot_download(str(path_or_hub_id),
                                              allow_patterns=patterns + ["*.bin", "*.pt"]))
        raw = HFCheckpoint.read_config(path)
        _check_remote_code(raw, str(path / "config.json"), trust_remote_code)
        if "model_type" not in raw:
            raise ConfigError(f"{path / 'config.json'}: field 'model_type' is missing")
        cls = lookup(raw)  # an unsupported model is reported before any weight file is read
        ckpt = HFCheckpoint(path, allow_pickle=allow_pickle)
        _require_fields(cls, raw, str(path / "config.json"))
        return cls(_hf_config_object(raw, str(path / "config.json"), cls.hf_model_type), ckpt)

    @staticmethod
    def from_hf_config(config: Any, *, trust_remote_code: bool = False) -> Bridge:
        """From a transformers config object, a config dict, or a path to config.json.

        A config with ``auto_map`` (remote code) is refused with RemoteCodeError unless
        ``trust_remote_code=True``; the remote code itself is never run (bridges are declarative).
        """
        if isinstance(config, (str, os.PathLike)):
            p = Path(config)
            p = p / "config.json" if p.is_dir() else p
            try:
                config = HFCheckpoint.parse_config(p.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{p}: cannot read config ({e})") from None
            source = str(p)
        else:
            source = "config"
        _check_remote_code(config, source, trust_remote_code)
        if isinstance(config, dict):
            if "model_type" not in config:
                raise ConfigError(f"{source}: field 'model_type' is missing")
            cls = lookup(config)
            _require_fields(cls, config, source)
            config = _hf_config_object(config, source, cls.hf_model_type)
        else:
            cls = lookup(config)
        return cls(config)
