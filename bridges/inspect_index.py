"""What ``mbridge inspect`` reads from torch-side code, recorded so that inspect runs without
importing torch, megatron-core or transformers: per registered bridge its class name, modality,
vision pattern and config fields; the HF tensor names of its tables on the shipped configs; and
the tensor names transformers' own classes give the shipped configs.

Rebuild after changing a bridge, a fixture config or transformers::

    python -m bridges.inspect_index

tests/test_startup.py fails while the file differs from what the code gives. Where the index does
not stand for the code at hand (a family or fixture it does not list, other bridges registered in
this process, another transformers version), inspect asks the live code instead: slower, same
answer.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

PATH = Path(__file__).with_name("inspect_index.json")
_MODELS = Path(__file__).with_name("models")
_cache: dict = {}


def _read() -> dict | None:
    if "index" not in _cache:
        try:
            _cache["index"] = json.loads(PATH.read_text())
        except (OSError, ValueError):
            _cache["index"] = None
    return _cache["index"]


def families() -> list[str]:
    """Folders of bridges/models holding a ``<family>_bridge.py``."""
    return sorted(p.parent.name for p in _MODELS.glob("*/*_bridge.py") if p.stem == f"{p.parent.name}_bridge")


def load() -> dict | None:
    """The index, when it stands for the bridges and fixtures here: the families and fixtures it
    lists, and in this process either no bridge registered yet or exactly the index's (else the
    live registry answers: a user's bridge, a test that patches the registry)."""
    from bridges.core import registry
    from conformance.models import fixture_names

    index = _read()
    if index is None or index["families"] != families() or index["fixtures"] != fixture_names():
        return None
    live = {mt: cls.__name__ for mt, cls in registry._BY_TYPE.items()}
    if live and live != {mt: b["class"] for mt, b in index["bridges"].items()}:
        return None
    return index


def config_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _transformers_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def tensor_names(config: dict) -> tuple[set[str] | None, str | None] | None:
    """transformers' tensor names for a config, as inspect normalises them, and where they come
    from; None when the index cannot say (a config it does not hold, another transformers)."""
    t = (_read() or {}).get("transformers")
    if not t or t["version"] != _transformers_version():
        return None
    if config.get("model_type") not in t["causal_lm_types"]:  # transformers has no class for it
        return None, None
    hit = t["tensor_names"].get(config_key(config))
    if hit is None:
        return None
    return (set(hit["names"]) if hit["names"] is not None else None), hit["from"]


def build() -> dict:
    """The index from the live code (imports torch, megatron-core and transformers)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from bridges.commands import inspect
    from bridges.core import registry
    from conformance.models import fixture_names, resolve

    registry.load_families()
    bridges, _ = inspect._live_registry()
    causal = []
    for mt in CONFIG_MAPPING_NAMES:
        try:
            if CONFIG_MAPPING[mt] in MODEL_FOR_CAUSAL_LM_MAPPING:
                causal.append(mt)
        except Exception:  # noqa: BLE001 - a config class that does not import here
            pass
    names = {}
    for n in fixture_names():
        config = resolve(n).config
        found, source = inspect._transformers_names(config)
        names[config_key(config)] = {"model": n, "names": sorted(found) if found is not None else None,
                                     "from": source}
    return {
        "families": families(), "fixtures": fixture_names(), "bridges": bridges,
        "architectures": {a: cls.model_type for a, cls in sorted(registry._BY_ARCH.items())},
        "reference_names": {mt: sorted(sorted(s) for s in sets)
                            for mt, sets in sorted(inspect._live_reference_names().items())},
        "transformers": {"version": _transformers_version(), "causal_lm_types": sorted(causal),
                         "tensor_names": names},
    }


def dumps(index: dict) -> str:
    return json.dumps(index, indent=1, sort_keys=True) + "\n"


if __name__ == "__main__":
    PATH.write_text(dumps(build()))
    print(f"wrote {PATH}")
