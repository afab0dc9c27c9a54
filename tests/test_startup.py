"""Start-up cost (#20): ``import bridges``, ``mbridge --help``, ``mbridge inspect`` and a pytest run
that does not ask for the plugin import neither torch, megatron-core nor transformers. Checked
on sys.modules in a fresh process, not on timing (benchmarks/startup.py measures the time)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "megatron", "transformers")
SHOW_HEAVY = f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"

PROBE = """
import contextlib, io, sys
import bridges
from bridges.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    for argv in (["--help"], ["convert", "--help"], ["convert", "import", "--help"]):
        try:
            main(argv)
        except SystemExit:
            pass
""" + SHOW_HEAVY


def _run(code: str, cwd: Path = ROOT, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_help_imports_nothing_heavy():
    assert _run(PROBE) == "[]"


def test_inspect_imports_nothing_heavy(tmp_path):
    """Shipped configs (dense, MoE, MLA, VLM, hybrid), a directory holding one, a checkpoint
    directory (safetensors headers) and a model type no one knows; text and JSON."""
    (tmp_path / "dir").mkdir()
    shutil.copy(ROOT / "fixtures/configs/Qwen/Qwen3-8B/config.json", tmp_path / "dir")
    (tmp_path / "ckpt").mkdir()
    shutil.copy(ROOT / "fixtures/configs/Qwen/Qwen3-30B-A3B/config.json", tmp_path / "ckpt")
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}})
    (tmp_path / "ckpt/model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(8))
    novel = {"model_type": "brand_new", "architectures": ["BrandNewForCausalLM"], "hidden_size": 64,
             "lightning_heads": 4}
    (tmp_path / "novel.json").write_text(json.dumps(novel))
    models = ["Qwen/Qwen3-8B", "Qwen/Qwen3-30B-A3B", "deepseek-ai/DeepSeek-V3", "google/gemma-3-4b-it",
              "nvidia/Nemotron-H-56B-Base-8K", str(tmp_path / "dir"), str(tmp_path / "ckpt"), str(tmp_path / "novel.json")]
    code = """
import contextlib, io, sys
from bridges.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    for m in sys.argv[1:]:
        for extra in ([], ["--json"]):
            assert main(["inspect", m, *extra]) == 0, m
assert "lightning_heads" in out.getvalue() and "Qwen3MoeBridge" in out.getvalue()
""" + SHOW_HEAVY
    assert _run(code, ROOT, *models) == "[]"


def test_pytest_without_the_plugins_options_imports_nothing_heavy(tmp_path):
    """A run that does not use the plugin: its module imported (pytest11 entry point), its
    pytest_addoption and pytest_configure run (the option and the marker exist), nothing heavy."""
    (tmp_path / "test_trivial.py").write_text("def test_one():\n    assert True\n")
    (tmp_path / "conftest.py").write_text(
        "def pytest_unconfigure(config):\n"
        "    assert config.getoption('mbridge_model') == []\n"
        "    assert any(m.startswith('mbridge:') for m in config.getini('markers'))\n")
    code = """
import sys, pytest
assert pytest.main(["-q", "-p", "no:cacheprovider", "test_trivial.py"]) == 0
assert "pytest_mbridge.plugin" in sys.modules
""" + SHOW_HEAVY
    assert _run(code, tmp_path) == "[]"


def test_the_inspect_index_is_current():
    """bridges/inspect_index.json is what the code gives now; else: python -m bridges.inspect_index"""
    from bridges import inspect_index

    assert inspect_index.PATH.read_text() == inspect_index.dumps(inspect_index.build()), \
        "bridges/inspect_index.json is stale: rebuild it with `python -m bridges.inspect_index`"


def test_the_index_gives_way_to_the_live_registry(monkeypatch):
    """Other bridges registered in this process, or a family the index does not list: the live code."""
    from bridges import inspect_index
    from bridges.core import registry

    registry.load_families()
    assert inspect_index.load() is not None  # the registry holds the index's bridges
    monkeypatch.delitem(registry._BY_TYPE, "phi3")
    assert inspect_index.load() is None
    monkeypatch.setattr(registry, "_BY_TYPE", {})
    assert inspect_index.load() is not None
    monkeypatch.setattr(registry, "_BY_TYPE", {"x": object})
    assert inspect_index.load() is None
    monkeypatch.setattr(registry, "_BY_TYPE", {})
    monkeypatch.setattr(inspect_index, "families", lambda: ["brand_new"])
    assert inspect_index.load() is None
