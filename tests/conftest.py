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
