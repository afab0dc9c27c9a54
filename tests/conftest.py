import json
import os
from pathlib import Path

import pytest

from conformance.models import resolve
from conformance.session import Conformance

pytest_plugins = ["pytester"]

# `./dev test` runs every check, mutant and family test, with the layout matrix spread over the
# fixture models; MBRIDGE_FULL=1 (`./dev test-full`) adds the rest of the matrix and the slowest
# multi-process CLI runs (about 15 more minutes on 2 cores).
FULL = os.environ.get("MBRIDGE_FULL", "") not in ("", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: only with MBRIDGE_FULL=1 (./dev test-full)")


def pytest_collection_modifyitems(config, items):
    if FULL:
        return
    skip = pytest.mark.skip(reason="full tier: MBRIDGE_FULL=1 (./dev test-full)")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def conformance(tmp_path_factory):
    """One rank pool (4 gloo ranks) for every test that converts toy models."""
    conf = Conformance(tmp_path_factory.mktemp("mbridge"))
    yield conf
    conf.close()


@pytest.fixture(scope="session")
def spec():
    return resolve


@pytest.fixture(scope="session")
def toy(tmp_path_factory) -> Path:
    """A Qwen3 toy checkpoint (fp32, single safetensors file), made once per session."""
    from conformance.toy import make_toy_checkpoint, shrink_config

    cfg = Path(__file__).resolve().parents[1] / "fixtures/configs/Qwen/Qwen3-8B/config.json"
    return make_toy_checkpoint(shrink_config(json.loads(cfg.read_text())),
                               tmp_path_factory.getbasetemp() / "mbridge-toys")


@pytest.fixture(scope="session")
def toy_tensors(toy) -> dict:
    from safetensors.torch import load_file

    return load_file(str(toy / "model.safetensors"))


@pytest.fixture
def run(pytester, monkeypatch):
    """``pytest <args>`` in a subprocess from pytester's empty directory, this checkout importable."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def go(*args):
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore", *args, timeout=600)
    return go
