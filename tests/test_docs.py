"""The docs' supported-models table is the registry's."""
from pathlib import Path

from bridges.commands.list import markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_supported_models_table_is_in_sync():
    text = DOC.read_text()
    table = text.split("<!-- models:begin -->\n", 1)[1].split("<!-- models:end -->", 1)[0]
    assert table == markdown(), "docs/models.md is stale: regenerate with `mbridge list --markdown`"
