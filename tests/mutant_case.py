"""The family tests' mutant check: one broken bridge through the suite at tp1pp1, caught by
exactly the checks expected, and localised where expected."""
from __future__ import annotations


def assert_caught(conformance, model: str, bridge_ref: str, expect: set[str], where: str | None,
                  mtp: bool = False):
    """``where``: the logits check's first divergence (None: not judged here); ``mtp``: the
    multi-token-prediction check joins the others. Returns the results for further checks."""
    from conformance.models import resolve

    results = dict(conformance.case(resolve(model), "tp1pp1", bridge_ref=bridge_ref))
    if mtp:
        results["mtp"] = conformance.mtp_case(resolve(model), "tp1pp1", bridge_ref=bridge_ref)
    got = {n for n, r in results.items() if not r.passed and not r.data.get("blocked")}
    assert got == expect, f"{bridge_ref}: caught by {sorted(got)}, expected {sorted(expect)}\n" + \
        "\n".join(str(r) for r in results.values() if not r.passed)
    if where:
        assert results["logits"].data["divergence"] == where, results["logits"].details
    return results
