"""The public API contract from the foundation issue, under TP2 x PP2 on 4 gloo ranks."""
import json

from bridges.core.hf_io import HFCheckpoint


def test_smoke_contract_tp2pp2(conformance, spec, tmp_path):
    toy = conformance.checkpoint(spec("meta-llama/Llama-3.2-1B"))  # tied embeddings
    out = tmp_path / "exported"
    results = conformance.pool.run("tests.smoke_task:smoke", checkpoint=toy, tp=2, pp=2, out=str(out))
    names = HFCheckpoint(toy).names()
    assert all(r["names"] == names for r in results)  # every rank yields every tensor
    assert results[0]["bit_exact"] and results[0]["same_class"] and results[0]["same_logits"]
    assert HFCheckpoint(out).names() == names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
