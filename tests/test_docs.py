"""The docs' supported-models table is the registry's."""
from pathlib import Path

from bridges.commands.list import markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_supported_models_table_is_in_sync():
    text = DOC.read_text()
    table = text.split("<!-- models:begin -->\n", 1)[1].split("<!-- models:end -->", 1)[0]
    assert table == markdown(), "docs/models.md is stale: regenerate with `mbridge list --markdown`"


def test_mutant_count_and_table_match_tests_mutants():
    """docs/conformance.md's mutant count and table (one row per mutant) follow tests/mutants.py,
    and every mutant there is used by a test."""
    import inspect
    import re

    import tests.mutants as m
    from bridges.core.bridge import Bridge

    names = sorted(n for n, c in vars(m).items() if inspect.isclass(c) and issubclass(c, Bridge)
                   and not n.startswith("_") and c.__module__ == m.__name__)
    text = (DOC.parent / "conformance.md").read_text()
    said = re.search(r"`tests/mutants.py` holds (\d+) deliberately broken bridges", text)
    assert said and int(said.group(1)) == len(names), f"docs/conformance.md: say {len(names)} mutants"
    section = text.split("## Mutation self-tests", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| injected")]
    assert len(rows) == len(names), f"docs/conformance.md: {len(rows)} table rows for {len(names)} mutants"
    tests = "\n".join(p.read_text() for p in (DOC.parents[1] / "tests").glob("test_*.py"))
    unused = [n for n in names if f'"{n}"' not in tests and f":{n}" not in tests]
    assert not unused, f"mutants no test uses: {unused}"
