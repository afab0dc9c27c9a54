"""HuggingFace <-> Megatron-Core bridges.

    from bridges import AutoBridge
    bridge = AutoBridge.from_hf_pretrained("path/or/org/model")
"""
from bridges.core.auto import AutoBridge, RemoteCodeError
from bridges.core.bridge import Bridge, NonFiniteWeightWarning
from bridges.core.config import ConfigError
from bridges.core.gpt import GPTBridge
from bridges.core.hf_io import CheckpointError, PickleRefusedError
from bridges.core.ledger import CoverageError
from bridges.core.mappings import MappingError
from bridges.core.registry import UnknownModelError, list_supported, register_bridge

__all__ = ["AutoBridge", "Bridge", "GPTBridge", "register_bridge", "list_supported",
           "ConfigError", "CheckpointError", "CoverageError", "MappingError", "UnknownModelError",
           "RemoteCodeError", "PickleRefusedError", "NonFiniteWeightWarning"]
