"""Bridge registry: ``@register_bridge`` and lookup by ``model_type``, then ``architectures``."""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from typing import Any

from bridges.core.errors import MBridgeError

_BY_TYPE: dict[str, type] = {}
_BY_ARCH: dict[str, type] = {}
_loaded = False


class UnknownModelError(MBridgeError, LookupError):
    """No bridge is registered for a config; the message lists what is supported."""


def register_bridge(model_type: str, architectures: list[str] | tuple[str, ...] = ()):
    """Class decorator: register a Bridge subclass for an HF ``model_type`` and architectures."""

    def deco(cls):
        for key, table in [(model_type, _BY_TYPE)] + [(a, _BY_ARCH) for a in architectures]:
            old = table.get(key)
            # the same class imported again (its module left sys.modules, as pytester's in-process
            # runs do) replaces itself; another class for the key is a conflict
            if old is not None and old is not cls and \
                    (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"{key!r} is already registered to {table[key].__name__}")
            table[key] = cls
        cls.model_type = model_type
        cls.architectures = tuple(architectures)
        return cls

    return deco


def load_families() -> None:
    """Import every ``bridges.models.<family>.<family>_bridge`` module once."""
    global _loaded
    if _loaded:
        return
    import bridges.models as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.ispkg:
            continue
        name = f"bridges.models.{info.name}.{info.name}_bridge"
        if importlib.util.find_spec(name) is not None:  # a folder may hold modeling code only
            importlib.import_module(name)
    _loaded = True


def lookup(config: Any) -> type:
    """The bridge class for an HF config (dict or PretrainedConfig)."""
    load_families()
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    model_type = get("model_type")
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    for arch in get("architectures") or ():
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    raise UnknownModelError(
        f"no bridge for model_type={model_type!r}, architectures={get('architectures')}; "
        f"supported model types: {', '.join(list_supported())}")


def list_supported() -> list[str]:
    """Registered ``model_type`` names, sorted."""
    load_families()
    return sorted(_BY_TYPE)


def registered() -> dict[str, type]:
    load_families()
    return dict(sorted(_BY_TYPE.items()))
