"""The built wheel carries the data the plugin reads (fixture configs, snapshots), and the code
finds them there, away from this checkout (.ci/installed-plugin runs the whole suite so)."""
import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "bridges", "conformance", "pytest_mbridge", "fixtures")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (so no build output lands in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, src / name)
    # the venv's setuptools (torch requires it) when there: no index needed
    offline = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *offline,
                          str(src), "-w", str(tmp / "dist")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    (whl,) = (tmp / "dist").glob("pytest_mbridge-*.whl")
    return whl


def _shipped(kind: str, pattern: str) -> list[Path]:
    files = sorted((ROOT / "fixtures" / kind).glob(pattern))
    assert files, f"no fixtures/{kind}/{pattern} in the checkout"
    return files


def test_the_wheel_holds_every_fixture_config_and_snapshot(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for f in _shipped("configs", "*/*/config.json") + _shipped("snapshots", "*.ambr"):
            inside = f"conformance/fixtures/{f.relative_to(ROOT / 'fixtures')}"
            assert inside in names, f"{inside} missing from {wheel.name}"
            assert z.read(inside) == f.read_bytes(), f"{inside} differs from {f}"
    assert not [n for n in names if n.startswith("fixtures/")]  # no top-level package named fixtures


def _from_wheel(wheel, tmp_path, probe: str):
    """``probe`` run in a fresh interpreter on the unpacked wheel alone: (its stdout, the site)."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    return res.stdout, site


def test_code_from_the_wheel_finds_its_fixtures(wheel, tmp_path):
    out, site = _from_wheel(wheel, tmp_path, (
        "import json, conformance.models as m, pytest_mbridge.snapshots as s; "
        "print(json.dumps([m.__file__, m.fixture_names(), m.resolve('Qwen/Qwen3-8B').source, "
        "s.ShippedSnapshot.directory]))"))

    module, names, source, snapshots = json.loads(out.splitlines()[-1])
    assert Path(module).is_relative_to(site), module  # the wheel's code, not the checkout's
    assert names == [str(f.parent.relative_to(ROOT / "fixtures/configs"))
                     for f in _shipped("configs", "*/*/config.json")]
    assert source == "fixture"
    assert Path(snapshots) == site / "conformance" / "fixtures" / "snapshots"
    assert sorted(p.name for p in Path(snapshots).glob("*.ambr")) == \
        [f.name for f in _shipped("snapshots", "*.ambr")]


def test_inspect_from_the_wheel_reads_its_index(wheel, tmp_path):
    """The wheel ships bridges/inspect_index.json and inspect there stays off torch (#20)."""
    out, _ = _from_wheel(wheel, tmp_path, (
        "import contextlib, io, sys; from bridges.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['inspect', 'Qwen/Qwen3-8B']) == 0\n"
        "print(sorted(m for m in ('torch', 'megatron', 'transformers') if m in sys.modules))"))
    assert out.strip() == "[]"
