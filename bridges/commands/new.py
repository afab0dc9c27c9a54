"""mbridge new: scaffold a bridge for a model from its config.

    mbridge new <org/model|dir|config.json> --family <name> [--name org/model] [--out <project>]

Writes into the current project (the working directory, or ``--out``; never into the installed
``bridges`` package): bridges/models/<family>/<family>_bridge.py (a subclass of the closest registered
bridge, registered for the config's model_type and architectures), the config as a fixture,
a test that runs the conformance suite on it, and a docs page. For a standard GPT-style model
the bridge passes the suite as generated; config fields no bridge understands are listed in
the bridge as UNHANDLED, and the bridge refuses to convert until each is handled.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HELP = "scaffold a bridge, its fixture, test and docs page from a config"
# The directory that holds the imported ``bridges`` package: in a pip install, site-packages.
INSTALLED = Path(__file__).resolve().parents[2]


def add_arguments(parser) -> None:
    parser.add_argument("model", help="org/model (shipped fixture or hub config), a directory or a config.json")
    parser.add_argument("--family", required=True, help="family folder name, e.g. mymodel")
    parser.add_argument("--name", help="fixture name org/model (default: the model argument, or local/<family>)")
    parser.add_argument("--out", "--dest", dest="out", default=None,
                        help="project root to write into (default: the current directory)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files")


BRIDGE = '''"""{title}: scaffolded by `mbridge new` from {source}, starting from the {base} bridge.

{todo}"""
from bridges.core.config import ConfigError
from {base_module} import {base}
from bridges.core.registry import register_bridge

# Config fields no registered bridge understands: read the HF modeling code for each, map it
# (config table, mappings, or a modeling_{family}/ block), then remove it from this list.
UNHANDLED: tuple[str, ...] = {unhandled!r}


@register_bridge(model_type={model_type!r}, architectures={architectures!r})
class {cls}({base}):
{hf_type}{ported}
    def megatron_attrs(self):
        if UNHANDLED:
            raise ConfigError(f"{{self.model_type}} bridge: config fields not handled yet: {{list(UNHANDLED)}}")
        return super().megatron_attrs()
'''

VLM_BRIDGE = '''"""{title}: scaffolded by `mbridge new` from {source}: a vision-language model.

Vision encoder: {pattern}.
The language model starts from the {base} bridge (read from text_config); the vision table
is every tensor of transformers' own {vision_parts}, kept as transformers' modules (the HF
vision encoder pattern). A complete example: bridges/models/gemma3_vl/ and docs/gemma3-vl.md.
{todo}"""
from bridges.core.config import ConfigError, Field
from bridges.core.registry import register_bridge
from bridges.core.vlm import VLMBridge, hf_module_mappings, meta_model
from {base_module} import {base}

# What is left to write; the bridge refuses to convert until the list is empty.
UNHANDLED: tuple[str, ...] = {unhandled!r}


@register_bridge(model_type={model_type!r}, architectures={architectures!r})
class {cls}(VLMBridge):
    language_bridge = {base}
    vlm_fields = {vlm_fields}

    def megatron_attrs(self):
        if UNHANDLED:
            raise ConfigError(f"{{self.model_type}} bridge: not written yet: {{list(UNHANDLED)}}")
        return super().megatron_attrs()

    def vision_mappings(self, attrs):
        cfg = self.hf_config.to_dict() if hasattr(self.hf_config, "to_dict") else dict(self.hf_config)
        model = meta_model(cfg).model  # transformers' own, on the meta device
        return [m for part in {vision_parts_list!r}
                for m in hf_module_mappings(getattr(model, part), f"{{part}}.", f"model.{{part}}.", strip="vision_model.")]

    def wrap(self, language_model, provider, pre_process, post_process, vp_stage):
        """The Megatron chunk: the language model chunk, with the vision side on the first
        stage and the image features written over the image tokens (see Gemma3VLModel)."""
        raise NotImplementedError("{family}: write the Megatron chunk holding the vision side")

    @classmethod
    def image_inputs(cls, config, ids, seed=0):
        """The toy's inputs: ids with the image tokens in the middle of the text, and pixels."""
        raise NotImplementedError("{family}: write the toy's image inputs")
'''

TEST = '''"""Conformance suite for the {family} bridge on its fixture config (scaffolded by `mbridge new`)."""
import pytest

from conformance.session import CASE_CHECKS, DEFAULT_LAYOUTS

MODEL = {name!r}


@pytest.mark.parametrize("layout", DEFAULT_LAYOUTS)
def test_{family}_case(conformance, spec, layout):
    results = conformance.case(spec(MODEL), layout)
    assert set(results) == set(CASE_CHECKS)
    assert all(r.passed for r in results.values()), "\\n".join(str(r) for r in results.values() if not r.passed)


def test_{family}_config_roundtrip(conformance, spec):
    assert conformance.describe(spec(MODEL))["config_check"].passed
'''

DOC = '''# {title}

Bridge: `bridges/models/{family}/{family}_bridge.py` (`{cls}`, from `{base}`), registered for
`model_type={model_type}`, architectures {architectures}. Fixture config: `fixtures/configs/{name}/config.json`.

{todo}

```bash
mbridge inspect {name}
mbridge check {name}
mbridge convert import --hf <dir> --out <megatron_dir> --tp 2 --pp 2
mbridge convert export --megatron <megatron_dir> --out <hf_dir>
```
'''


def _write(path: Path, text: str, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (use --force to overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class ScaffoldError(ValueError):
    """The scaffold cannot be written where asked; the message names the place."""


def _check_dest(dest: Path) -> None:
    """Refuse the directory of an installed (not editable) ``bridges`` package: files written
    there vanish with the next upgrade and belong to no project."""
    dest = dest.resolve()
    if dest == INSTALLED and any(p in ("site-packages", "dist-packages") for p in dest.parts):
        raise ScaffoldError(f"{dest}: is where the bridges package is installed, not a project; "
                            f"run mbridge new from your project's root, or pass --out <project>")


def scaffold(config: dict, family: str, name: str, dest: Path, force: bool = False) -> list[Path]:
    from bridges.commands.inspect import inspect_config
    from bridges.core.registry import registered

    if not re.fullmatch(r"[a-z][a-z0-9_]*", family):
        raise ValueError(f"--family {family!r}: use lower-case letters, digits and _")
    _check_dest(Path(dest))
    if isinstance(config.get("vision_config"), dict):
        return _scaffold_vlm(config, family, name, dest, force)
    info = inspect_config(config)
    base_type = info["closest_bridge"]
    base_cls = registered()[base_type]
    cls = "".join(p.capitalize() for p in family.split("_")) + "Bridge"
    unhandled = tuple(info["unhandled_by_closest"])
    todo = ("Left to write: " + ", ".join(unhandled) + "." if unhandled
            else "Nothing left to write: every config field is understood.")
    try:
        from transformers import AutoConfig

        AutoConfig.for_model(config["model_type"])
        hf_type = ""
    except (ValueError, KeyError):
        hf_type = (f"    # transformers does not know {config['model_type']!r}: read and build it as\n"
                   f"    hf_model_type = {base_type!r}\n")
    entries = _ported(config)
    ported = ("" if not entries else
              "    # The config's auto_map names classes transformers implements itself for this model\n"
              "    # type (matched by name): read the repository's code, and keep this only if it is that\n"
              "    # model; then no trust_remote_code is needed (the code is never run either way).\n"
              f"    ported_remote_code = {entries!r}\n")
    fields = dict(ported=ported, title=f"{family} ({config['model_type']})", family=family, cls=cls,
                  base=base_cls.__name__, base_module=base_cls.__module__, model_type=config["model_type"],
                  architectures=list(config.get("architectures") or []), unhandled=unhandled,
                  todo=todo, hf_type=hf_type, source=name, name=name)
    return _write_all(config, fields, BRIDGE, dest, force)


def _write_all(config: dict, fields: dict, bridge_template: str, dest: Path, force: bool) -> list[Path]:
    """The scaffold's files: the family folder, the fixture, the test, the docs page."""
    family, name = fields["family"], fields["name"]
    files = {
        dest / "bridges" / "models" / family / "__init__.py": "",
        dest / "bridges" / "models" / family / f"{family}_bridge.py": bridge_template.format(**fields),
        dest / "fixtures" / "configs" / name / "config.json": json.dumps(config, indent=2) + "\n",
        dest / "tests" / f"test_{family}_bridge.py": TEST.format(**fields),
        dest / "docs" / "models" / f"{family}.md": DOC.format(**fields),
    }
    for path, text in files.items():
        _write(path, text, force)
    return list(files)


def _scaffold_vlm(config: dict, family: str, name: str, dest: Path, force: bool) -> list[Path]:
    """A VLMBridge subclass: the language bridge closest to ``text_config`` (or, in the flat
    legacy layout, the top level's text fields), the vision table from transformers' own
    modules, and what is left (the chunk, the toy's images, unknown fields) in UNHANDLED."""
    from bridges.commands.inspect import inspect_config, vision_pattern
    from bridges.core.registry import registered

    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else \
        {k: v for k, v in config.items() if k != "vision_config"}
    info = inspect_config({"model_type": text.get("model_type", config["model_type"]), **text}, modality="text")
    # the text model's own bridge where one is registered (gemma3_text), else the closest
    base_cls = registered().get(text.get("model_type")) or registered()[info["closest_bridge"]]
    if info["bridge"]:
        info["unhandled_by_closest"] = []
    parts = _vision_parts(config)
    top = [k for k in config if k.endswith(("token_id", "token_index")) and "image" in k]
    vlm_fields = "(" + "".join(f"Field({k!r}, {k.replace('_index', '_id')!r}), " for k in top) + ")"
    unhandled = tuple([f"text_config.{k}" for k in info["unhandled_by_closest"]]
                      + ["wrap: the Megatron chunk holding the vision side",
                         "image_inputs: the toy's image inputs"]
                      + (["the vision tower as Megatron-Core blocks (Megatron vision encoder pattern)"]
                         if vision_pattern(config).startswith("Megatron") else []))
    cls = "".join(p.capitalize() for p in family.split("_")) + "Bridge"
    fields = dict(title=f"{family} ({config['model_type']})", family=family, cls=cls, base=base_cls.__name__,
                  base_module=base_cls.__module__, model_type=config["model_type"],
                  architectures=list(config.get("architectures") or []), unhandled=unhandled,
                  todo="Left to write: " + "; ".join(unhandled) + ".", source=name, name=name,
                  pattern=vision_pattern(config), vision_parts=" and ".join(parts) or "vision modules",
                  vision_parts_list=parts, vlm_fields=vlm_fields)
    return _write_all(config, fields, VLM_BRIDGE, dest, force)


def _vision_parts(config: dict) -> list[str]:
    """The modules of transformers' own model for this VLM besides its language model (e.g.
    vision_tower, multi_modal_projector), built on the meta device; none if transformers
    cannot build it."""
    from bridges.core.vlm import meta_model

    try:
        model = meta_model(config).model
    except Exception:  # noqa: BLE001 - an unknown model type: the user names the parts
        return []
    return [n for n, _ in model.named_children() if n != "language_model"]


def _ported(config: dict) -> tuple[str, ...]:
    """The config's ``auto_map`` entries when transformers knows its model type and has a class
    of each entry's name (e.g. Phi-3's modeling_phi3.Phi3ForCausalLM); else none."""
    auto_map = config.get("auto_map")
    entries = tuple(auto_map.values()) if isinstance(auto_map, dict) else ((auto_map,) if auto_map else ())
    try:
        import transformers
        from transformers import CONFIG_MAPPING

        CONFIG_MAPPING[config["model_type"]]
    except (ImportError, KeyError):
        return ()
    if entries and all(isinstance(e, str) and hasattr(transformers, e.rsplit(".", 1)[-1]) for e in entries):
        return entries
    return ()


def run(args) -> int:
    from bridges.commands.inspect import _load

    config, _ = _load(args.model)
    name = args.name or (args.model if re.fullmatch(r"[\w.-]+/[\w.-]+", args.model) else f"local/{args.family}")
    dest = Path(args.out) if args.out else Path.cwd()
    try:
        written = scaffold(config, args.family, name, dest, args.force)
    except (ScaffoldError, FileExistsError) as e:
        print(f"mbridge: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0
