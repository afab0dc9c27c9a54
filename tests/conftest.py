import json
from pathlib import Path

import pytest

from conformance.models import resolve
from conformance.session import Conformance

pytest_plugins = ["pytester"]


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
