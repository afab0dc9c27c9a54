"""Options that leave a model nothing to check are usage errors, never a quiet exit 0."""
import pytest


def test_expert_layouts_on_a_dense_model_are_a_usage_error(run):
    res = run("--mbridge-model=Qwen/Qwen3-8B", "--mbridge-layouts=ep2")
    assert res.ret == pytest.ExitCode.USAGE_ERROR, res.stdout.str()
    res.stderr.fnmatch_lines(["*--mbridge-layouts=ep2 leaves no layout*dense model(s) Qwen/Qwen3-8B "
                              "(its layouts: tp1pp1,tp2,pp2,tp2pp2,vpp2)*mixture-of-experts models only*"])


def test_only_the_models_left_without_a_layout_are_named(run):
    res = run("--mbridge-model=Qwen/Qwen3-30B-A3B", "--mbridge-model=meta-llama/Llama-3.2-1B",
              "--mbridge-layouts=ep2,tp2ep2")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    err = res.stderr.str()
    assert "meta-llama/Llama-3.2-1B" in err and "Qwen3-30B-A3B" not in err


def test_expert_layouts_on_a_moe_model_are_collected(run):
    res = run("--mbridge-model=Qwen/Qwen3-30B-A3B", "--mbridge-layouts=ep2", "--collect-only", "-q")
    assert res.ret == pytest.ExitCode.OK, res.stdout.str() + res.stderr.str()
    res.stdout.fnmatch_lines(["*test_roundtrip[[]Qwen/Qwen3-30B-A3B-ep2[]]*"])
