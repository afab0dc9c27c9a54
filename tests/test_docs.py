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


def _table_models(text: str, header: str) -> list[str]:
    """The first column of the markdown table whose header row starts with ``header``."""
    rows = text.split(header, 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [r.split("|")[1].strip() for r in rows if r.startswith("| ")]


def test_benchmark_and_results_docs_cover_every_fixture_model():
    """docs/benchmarks.md and docs/conformance-results.md (`./dev bench`) hold a row for every
    fixture model a registered bridge handles, and their counts agree: a model added without
    regenerating them fails here."""
    import re

    from bridges.core.registry import registered
    from conformance.models import fixture_names, resolve

    bridges = registered()
    fixtures = sorted(n for n in fixture_names() if resolve(n).model_type in bridges)
    bench = (DOC.parent / "benchmarks.md").read_text()
    results = (DOC.parent / "conformance-results.md").read_text()
    per_model = _table_models(bench, "| model | checks passed |")
    assert not set(fixtures) - set(per_model), (
        f"docs/benchmarks.md lacks {sorted(set(fixtures) - set(per_model))}: regenerate with `./dev bench`")
    in_results = set(_table_models(results, "| model | layout |"))
    assert not set(fixtures) - in_results, (
        f"docs/conformance-results.md lacks {sorted(set(fixtures) - in_results)}: regenerate with `./dev bench`")
    said = re.search(r"`pytest --mbridge` \(every fixture model, (\d+) models, 4 gloo ranks\): "
                     r"(\d+) passed, (\d+) failed", bench)
    assert said, "docs/benchmarks.md: the `pytest --mbridge` line is missing"
    rows = bench.split("| model | checks passed |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    passed = sum(int(r.split("|")[2]) for r in rows)
    failed = sum(int(r.split("|")[3]) for r in rows)
    assert (int(said.group(1)), int(said.group(2)), int(said.group(3))) == (len(per_model), passed, failed), \
        "docs/benchmarks.md: the totals line disagrees with the per-model table"


def test_model_pages_are_current():
    """docs/models/<model type>/<model>.md: one generated page per shipped config, equal to what
    scripts/model_pages.py writes now (its sources: the bridge, fixtures/README.md, the
    conformance results), and no page for a config that is gone."""
    import importlib.util

    path = DOC.parents[1] / "scripts" / "model_pages.py"
    spec = importlib.util.spec_from_file_location("model_pages", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    want = mod.pages()
    root = DOC.parent / "models"
    have = {str(p.relative_to(root)): p.read_text() for p in root.glob("*/*.md")}
    assert set(have) == set(want), f"pages to add {sorted(set(want) - set(have))}, to remove " \
        f"{sorted(set(have) - set(want))}: regenerate with `python scripts/model_pages.py`"
    stale = [p for p in want if have[p] != want[p]]
    assert not stale, f"stale pages {stale}: regenerate with `python scripts/model_pages.py`"
