"""End to end, per bridge and fixture config: toy HF checkpoint -> Megatron on TP1PP1, TP2,
PP2, TP2PP2 and PP2 x VPP2 (4 gloo ranks) -> fp32 logits within 1e-5 of HF's -> greedy
generation -> export -> every tensor torch.equal to the source."""
import pytest

from conformance.models import fixture_names
from conformance.session import CASE_CHECKS, DEFAULT_LAYOUTS

MODELS = fixture_names()


def _matrix():
    """Every model x layout. Without MBRIDGE_FULL, model i runs layout i mod 5 (each layout is
    run by four or five families) and the rest of its row is the full tier."""
    out = []
    for i, model in enumerate(MODELS):
        for j, layout in enumerate(DEFAULT_LAYOUTS):
            marks = () if j == i % len(DEFAULT_LAYOUTS) else (pytest.mark.full,)
            out.append(pytest.param(model, layout, marks=marks, id=f"{model}-{layout}"))
    return out


@pytest.mark.parametrize("model,layout", _matrix())
def test_case(conformance, spec, model, layout):
    from conformance.session import fit_layout

    results = conformance.case(spec(model), fit_layout(spec(model).config, layout))
    assert set(results) == set(CASE_CHECKS)
    failed = [str(r) for r in results.values() if not r.passed]
    assert not failed, "\n".join(failed)
    assert results["logits"].data["rel_err"] <= 1e-5
    assert results["logits"].data["baseline_rel_err"] > 0.5  # the comparison can see a wrong model


@pytest.mark.parametrize("model", MODELS)
def test_config_roundtrip(conformance, spec, model):
    d = conformance.describe(spec(model))
    assert d["config_check"].passed, str(d["config_check"])


def test_every_bridge_has_a_fixture():
    """Every registered bridge is checked through a fixture: its own, or a VLM's whose language
    model it is."""
    from bridges import list_supported
    from conformance.models import covered_model_types, resolve

    assert set(list_supported()) <= set().union(*(covered_model_types(resolve(m)) for m in MODELS))
