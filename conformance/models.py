"""Model resolution: a local directory, else a published config shipped in ``fixtures/``, else
the config alone from the HF hub (honours HF_HUB_OFFLINE). Never downloads weights."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bridges.core.errors import MBridgeError

# conformance/fixtures: in a checkout a symlink to the repository's fixtures/, in an installed
# wheel the copy shipped as package data (pyproject.toml); the same path either way.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "configs"


class ModelNotFound(MBridgeError, LookupError):
    """The model could be resolved neither locally, nor from fixtures, nor from the hub."""


@dataclass(frozen=True)
class ModelSpec:
    name: str  # as given by the user, e.g. Qwen/Qwen3-8B
    config: dict
    source: str  # "local", "fixture" or "hub"
    checkpoint: str | None = None  # local directory holding weights, if any

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "?")


def fixture_names() -> list[str]:
    """Published configs shipped with the suite, as org/model names."""
    return sorted(str(p.parent.relative_to(FIXTURES)) for p in FIXTURES.glob("*/*/config.json"))


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"{path}: cannot read config ({e})") from None


def resolve(name: str) -> ModelSpec:
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelNotFound(f"{p}: directory has no config.json")
        has_weights = any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists()
        return ModelSpec(name, _read(p / "config.json"), "local", str(p) if has_weights else None)
    fixture = FIXTURES / name / "config.json"
    if fixture.exists():
        return ModelSpec(name, _read(fixture), "fixture")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    known = ", ".join(fixture_names())
    if offline:
        raise ModelNotFound(f"{name!r} is not a local directory nor a shipped fixture, and "
                            f"HF_HUB_OFFLINE is set (shipped: {known})")
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name, "config.json")
    except Exception as e:
        raise ModelNotFound(f"{name!r}: not a local directory nor a shipped fixture, and its "
                            f"config.json could not be fetched from the hub ({type(e).__name__}: "
                            f"{e}); shipped fixtures: {known}") from None
    return ModelSpec(name, _read(Path(path)), "hub")


def covered_model_types(spec: ModelSpec) -> set[str]:
    """The registered model types a model's suite checks: its own, and for a VLM its language
    model's (Ministral-3 runs inside Devstral-2), and the text-only registrations of that language
    model: subclasses that only add toy hooks (Qwen3.5's ``Qwen3_5ForCausalLM``, run through the
    checks by its family's tests)."""
    from bridges.core.auto import AutoBridge
    from bridges.core.registry import lookup, registered

    out = {spec.model_type}
    if getattr(lookup(spec.config), "modality", "text") == "vision":
        lang = type(AutoBridge.from_hf_config(spec.config).language)
        out.add(lang.model_type)
        out |= {t for t, cls in registered().items() if issubclass(cls, lang) and _toy_hooks_only(cls, lang)}
    return out


def _toy_hooks_only(cls: type, base: type) -> bool:
    """``cls`` differs from ``base`` in its toy hooks alone (and its registration)."""
    own = {k for c in cls.__mro__[:cls.__mro__.index(base)] for k in vars(c)}
    return own <= {"toy_config", "toy_model", "model_type", "architectures", "__module__", "__doc__",
                   "__qualname__", "__firstlineno__", "__static_attributes__", "__dict__", "__weakref__"}
