"""HuggingFace <-> Megatron-Core bridges.

    from bridges import AutoBridge
    bridge = AutoBridge.from_hf_pretrained("path/or/org/model")

The names below are imported on first use: ``import bridges`` (and so ``mbridge --help``)
does not pay for torch and megatron-core.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "AutoBridge": "bridges.core.auto", "RemoteCodeError": "bridges.core.auto",
    "Bridge": "bridges.core.bridge", "NonFiniteWeightWarning": "bridges.core.bridge",
    "ConfigError": "bridges.core.config", "GPTBridge": "bridges.core.gpt",
    "CheckpointError": "bridges.core.hf_io", "PickleRefusedError": "bridges.core.hf_io",
    "CoverageError": "bridges.core.ledger", "MappingError": "bridges.core.mappings",
    "UnknownModelError": "bridges.core.registry", "list_supported": "bridges.core.registry",
    "register_bridge": "bridges.core.registry", "MBridgeError": "bridges.core.errors",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'bridges' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
