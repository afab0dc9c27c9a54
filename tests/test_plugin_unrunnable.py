"""A model the bridge cannot even read is one clear error at collection, not the same rank
traceback in every item; --mbridge-trust-remote-code (or the ini's mbridge_trust_remote_code)
lets a config with auto_map through (its code is never run)."""
import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"


def _model(pytester, name: str, **changes) -> str:
    cfg = json.loads((FIXTURES / "meta-llama/Llama-3.2-1B/config.json").read_text())
    cfg.update(changes)
    d = pytester.path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_unrunnable_models_are_one_collection_error(pytester, run):
    remote = _model(pytester, "remote", auto_map={"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"})
    unknown = _model(pytester, "unknown", model_type="acme_lm", architectures=["AcmeForCausalLM"])
    res = run(f"--mbridge-model={remote}", f"--mbridge-model={unknown}")
    out = res.stdout.str()
    assert res.ret == 2, out  # interrupted: errors during collection, nothing ran
    assert out.count("ERROR collecting") == 1 and "pytest-mbridge cannot check:" in out, out
    assert f"--mbridge-model={remote}: RemoteCodeError" in out and "--mbridge-trust-remote-code" in out, out
    assert f"--mbridge-model={unknown}: UnknownModelError" in out and "'acme_lm'" in out, out
    assert "Traceback" not in out and "rank" not in out.lower().replace("ranks", ""), out
    assert " passed" not in out and " failed" not in out, out


def test_trust_remote_code_option_and_ini(pytester, run):
    remote = _model(pytester, "remote", auto_map={"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"})
    res = run(f"--mbridge-model={remote}", "--mbridge-trust-remote-code", "-k", "config_roundtrip")
    assert res.ret == 0, res.stdout.str()
    res.assert_outcomes(passed=1)
    pytester.makeini("[pytest]\nmbridge_trust_remote_code = true\n")
    res = run(f"--mbridge-model={remote}", "-k", "config_roundtrip")
    assert res.ret == 0, res.stdout.str()
    res.assert_outcomes(passed=1)
