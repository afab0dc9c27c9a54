"""mbridge new: a renamed Llama passes the suite as generated; new blocks are marked."""
import json
import shutil
from pathlib import Path

import pytest

from bridges.commands.new import scaffold

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures" / "configs"
SHARED = ROOT.parent / "shared" / "hf-configs"


def test_new_blocks_are_marked_left_to_write(tmp_path):
    cfg = json.loads((FIXTURES / "Qwen/Qwen3-8B/config.json").read_text())
    cfg.update(model_type="qwen3_xmoe", architectures=["Qwen3XMoeForCausalLM"], num_experts=8,
               num_experts_per_tok=2, moe_intermediate_size=64)
    files = scaffold(cfg, "qwen3_xmoe", "acme/Qwen3-XMoE", tmp_path)
    bridge = (tmp_path / "bridges/models/qwen3_xmoe/qwen3_xmoe_bridge.py").read_text()
    assert "class Qwen3XmoeBridge(Qwen3Bridge)" in bridge
    assert "'moe_intermediate_size', 'num_experts', 'num_experts_per_tok'" in bridge
    assert "hf_model_type = 'qwen3'" in bridge  # transformers does not know qwen3_xmoe
    assert "Left to write: moe_intermediate_size, num_experts" in (tmp_path / "docs/models/qwen3_xmoe.md").read_text()
    assert len(files) == 5 and all(p.exists() for p in files)
    with pytest.raises(FileExistsError):
        scaffold(cfg, "qwen3_xmoe", "acme/Qwen3-XMoE", tmp_path)


def test_new_declares_auto_map_classes_transformers_implements(tmp_path):
    """Phi-3's auto_map names transformers' own phi3 classes: the scaffold declares them (to be
    confirmed by its author), so the suite needs no trust_remote_code; unknown classes are not."""
    cfg = json.loads((ROOT / "fixtures/configs/microsoft/Phi-3-mini-4k-instruct/config.json").read_text())
    scaffold(cfg, "phithree", "acme/Phi", tmp_path)
    bridge = (tmp_path / "bridges/models/phithree/phithree_bridge.py").read_text()
    assert "ported_remote_code = ('configuration_phi3.Phi3Config', 'modeling_phi3.Phi3ForCausalLM')" in bridge
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"}
    scaffold(cfg, "acme", "acme/Acme", tmp_path)
    assert "ported_remote_code" not in (tmp_path / "bridges/models/acme/acme_bridge.py").read_text()


def _clone(root: Path) -> Path:
    """A clone of this bridges repository (its packages and fixtures) at ``root``."""
    for d in ("bridges", "conformance", "pytest_mbridge", "fixtures"):
        shutil.copytree(ROOT / d, root / d, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_new_writes_into_the_current_project_or_out(tmp_path, monkeypatch, capsys):
    from bridges.cli import main

    before = sorted(p.name for p in (ROOT / "bridges/models").iterdir())
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    path = FIXTURES / "meta-llama/Llama-3.1-8B/config.json"
    assert main(["new", str(path), "--family", "llamacwd"]) == 0
    assert (project / "bridges/models/llamacwd/llamacwd_bridge.py").exists()
    assert (project / "tests/test_llamacwd_bridge.py").exists()
    assert main(["new", str(path), "--family", "llamaout", "--out", str(tmp_path / "other")]) == 0
    assert (tmp_path / "other/bridges/models/llamaout/llamaout_bridge.py").exists()
    assert sorted(p.name for p in (ROOT / "bridges/models").iterdir()) == before  # nothing here


def test_new_refuses_the_installed_package_directory(tmp_path, monkeypatch, capsys):
    from bridges.cli import main
    from bridges.commands import new

    site = tmp_path / "lib" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(new, "INSTALLED", site)
    monkeypatch.chdir(site)
    path = FIXTURES / "meta-llama/Llama-3.1-8B/config.json"
    assert main(["new", str(path), "--family", "llamasite"]) == 2
    err = capsys.readouterr().err
    assert "is where the bridges package is installed" in err and "--out" in err
    assert not (site / "bridges").exists()


def test_renamed_llama_passes_the_suite_as_generated(pytester, monkeypatch):
    """In a clone of a bridges repository (a temporary one), `mbridge new` writes the scaffold
    there and the suite, run from there, checks it."""
    from bridges.cli import main

    family, name = "llamarenamedtest", "acme/LlamaRenamed-8B"
    cfg = json.loads((FIXTURES / "meta-llama/Llama-3.1-8B/config.json").read_text())
    cfg.update(model_type="llama_renamed", architectures=["LlamaRenamedForCausalLM"])
    clone = _clone(pytester.path)
    (clone / "renamed.json").write_text(json.dumps(cfg))
    monkeypatch.chdir(clone)
    assert main(["new", "renamed.json", "--family", family, "--name", name]) == 0
    bridge = (clone / f"bridges/models/{family}/{family}_bridge.py").read_text()
    assert "UNHANDLED: tuple[str, ...] = ()" in bridge and "hf_model_type = 'llama'" in bridge
    assert not (ROOT / "bridges/models" / family).exists()
    monkeypatch.setenv("PYTHONPATH", str(clone))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore", f"--mbridge-model={name}",
                                        "--mbridge-layouts=tp1pp1,tp2pp2", "-k", "not snapshot and not quant",
                                        timeout=900)
    assert res.ret == 0, res.stdout.str()
    res.assert_outcomes(passed=9)


def test_new_scaffolds_a_vlm_as_a_vlm_bridge(tmp_path):
    """A VLM config gets a VLMBridge: the language bridge closest to its text_config, the vision
    table from transformers' own modules (here every one of the toy tower's and projector's
    tensors), and the chunk and the toy's images left to write, refused until written."""
    import importlib.util

    from bridges.core.auto import AutoBridge
    from bridges.core.config import ConfigError

    cfg = json.loads((Path(__file__).resolve().parents[1] / "fixtures/configs/google/gemma-3-4b-it/config.json").read_text())
    cfg = {**cfg, "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
           "vision_config": {**cfg["vision_config"], "num_hidden_layers": 2}}
    written = scaffold(cfg, "myvlm", "local/myvlm", tmp_path)
    path = next(p for p in written if p.name == "myvlm_bridge.py")
    text = path.read_text()
    assert "class MyvlmBridge(VLMBridge)" in text and "language_bridge = Gemma3TextBridge" in text
    assert "wrap: the Megatron chunk" in text and "Field('image_token_index', 'image_token_id')" in text
    spec = importlib.util.spec_from_file_location("scaffolded_myvlm", path)
    mod = importlib.util.module_from_spec(spec)
    from bridges.core import registry

    registry.load_families()
    saved = dict(registry._BY_TYPE), dict(registry._BY_ARCH)  # the scaffold registers for gemma3
    registry._BY_TYPE.pop("gemma3")
    registry._BY_ARCH.pop("Gemma3ForConditionalGeneration")
    try:
        spec.loader.exec_module(mod)
        bridge = mod.MyvlmBridge(AutoBridge.from_hf_config(cfg).hf_config)
        hf = {m.hf for m in bridge.vision_mappings({})}
        assert "model.vision_tower.embeddings.patch_embedding.weight" in hf
        assert "model.vision_tower.encoder.layers.*.self_attn.q_proj.weight" in hf
        assert "model.multi_modal_projector.mm_input_projection_weight" in hf
        with pytest.raises(ConfigError, match="not written yet"):
            bridge.megatron_attrs()
    finally:
        for table, before in zip((registry._BY_TYPE, registry._BY_ARCH), saved):
            table.clear()
            table.update(before)
