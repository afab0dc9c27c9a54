"""AutoBridge: pick the registered bridge for a checkpoint or config."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bridges.core.bridge import Bridge
from bridges.core.config import ConfigError
from bridges.core.hf_io import CheckpointError, HFCheckpoint
from bridges.core.registry import lookup


def _hf_config_object(config: dict[str, Any], source: str) -> Any:
    """A transformers config object for the dict (normalises legacy fields, e.g. rope)."""
    from transformers import AutoConfig

    kw = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    try:
        return AutoConfig.for_model(config["model_type"], **kw)
    except (ValueError, KeyError):
        return config  # a model type transformers does not know: the bridge reads the dict
    except Exception as e:  # transformers validates fields: surface which file was bad
        raise ConfigError(f"{source}: transformers rejects this config ({e})") from e


def _require_fields(cls, raw: dict[str, Any], source: str) -> None:
    """Required table fields must be in the file itself: transformers would fill its class
    defaults in (a missing vocab_size silently becoming 32000)."""
    from bridges.core.config import _MISSING, get_path

    for f in cls.config_fields:
        if f.default is _MISSING and f.megatron not in ("num_query_groups", "kv_channels") \
                and get_path(raw, f.hf, None) is None:
            raise ConfigError(f"{source}: config field {f.hf!r} is required but missing")


class AutoBridge:
    """Entry points. Every constructor returns an instance of the registered bridge."""

    @staticmethod
    def from_hf_pretrained(path_or_hub_id: str | os.PathLike) -> Bridge:
        """From a local checkpoint directory, or a hub id (downloaded with huggingface_hub)."""
        path = Path(path_or_hub_id).expanduser()
        if not path.is_dir():
            s = str(path_or_hub_id)
            if path.exists() or path.is_absolute() or s.startswith((".", "~")) or s.count("/") > 1:
                raise CheckpointError(f"{path}: no such checkpoint directory")
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(path_or_hub_id),
                                          allow_patterns=["*.json", "*.safetensors", "*.model",
                                                          "*.txt", "*.jinja"]))
        raw = HFCheckpoint.read_config(path)
        if "model_type" not in raw:
            raise ConfigError(f"{path / 'config.json'}: field 'model_type' is missing")
        cls = lookup(raw)  # an unsupported model is reported before any weight file is read
        ckpt = HFCheckpoint(path)
        _require_fields(cls, raw, str(path / "config.json"))
        return cls(_hf_config_object(raw, str(path / "config.json")), ckpt)

    @staticmethod
    def from_hf_config(config: Any) -> Bridge:
        """From a transformers config object, a config dict, or a path to config.json."""
        if isinstance(config, (str, os.PathLike)):
            p = Path(config)
            p = p / "config.json" if p.is_dir() else p
            try:
                config = json.loads(p.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{p}: cannot read config ({e})") from None
            source = str(p)
        else:
            source = "config"
        if isinstance(config, dict):
            if "model_type" not in config:
                raise ConfigError(f"{source}: field 'model_type' is missing")
            cls = lookup(config)
            _require_fields(cls, config, source)
            config = _hf_config_object(config, source)
        else:
            cls = lookup(config)
        return cls(config)
