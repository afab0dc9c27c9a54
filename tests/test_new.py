"""mbridge new: a renamed Llama passes the suite as generated; new blocks are marked."""
import json
import shutil
from pathlib import Path

import pytest

from bridges.commands.new import scaffold

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures" / "configs"
SHARED = ROOT.parent / "shared" / "hf-configs"


def test_new_blocks_are_marked_left_to_write(tmp_path):
    cfg = json.loads((FIXTURES / "Qwen/Qwen3-8B/config.json").read_text())
    cfg.update(model_type="qwen3_xmoe", architectures=["Qwen3XMoeForCausalLM"], num_experts=8,
               num_experts_per_tok=2, moe_intermediate_size=64)
    files = scaffold(cfg, "qwen3_xmoe", "acme/Qwen3-XMoE", tmp_path)
    bridge = (tmp_path / "bridges/models/qwen3_xmoe/qwen3_xmoe_bridge.py").read_text()
    assert "class Qwen3XmoeBridge(Qwen3Bridge)" in bridge
    assert "'moe_intermediate_size', 'num_experts', 'num_experts_per_tok'" in bridge
    assert "hf_model_type = 'qwen3'" in bridge  # transformers does not know qwen3_xmoe
    assert "Left to write: moe_intermediate_size, num_experts" in (tmp_path / "docs/models/qwen3_xmoe.md").read_text()
    assert len(files) == 5 and all(p.exists() for p in files)
    with pytest.raises(FileExistsError):
        scaffold(cfg, "qwen3_xmoe", "acme/Qwen3-XMoE", tmp_path)


def test_renamed_llama_passes_the_suite_as_generated(pytester, monkeypatch):
    family, name = "llamarenamedtest", "acme/LlamaRenamed-8B"
    cfg = json.loads((FIXTURES / "meta-llama/Llama-3.1-8B/config.json").read_text())
    cfg.update(model_type="llama_renamed", architectures=["LlamaRenamedForCausalLM"])
    written = scaffold(cfg, family, name, ROOT)  # into this repository, removed below
    try:
        bridge = (ROOT / f"bridges/models/{family}/{family}_bridge.py").read_text()
        assert "UNHANDLED: tuple[str, ...] = ()" in bridge and "hf_model_type = 'llama'" in bridge
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore", f"--mbridge-model={name}",
                                            "--mbridge-layouts=tp1pp1,tp2pp2", "-k", "not snapshot and not quant",
                                            timeout=600)
        assert res.ret == 0, res.stdout.str()
        res.assert_outcomes(passed=9)
    finally:
        shutil.rmtree(ROOT / "bridges/models" / family, ignore_errors=True)
        shutil.rmtree(ROOT / "fixtures/configs/acme", ignore_errors=True)
        for p in written:
            p.unlink(missing_ok=True)
