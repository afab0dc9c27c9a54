import pytest
@pytest.mark.parametrize("m,layout", [("Qwen/Qwen3-8B", "tp2"), ("deepseek-ai/DeepSeek-V3", "tp2ep2"), ("moonshotai/Kimi-K2-Instruct", "tp1pp1")])
def test_show(conformance, spec, m, layout):
    from bridges.core.hf_io import HFCheckpoint
    q = HFCheckpoint(conformance.quantized_checkpoint(spec(m), "w4a16")[0])
    print(len([n for n in q.names() if n.endswith("_packed")]), [n for n in q.names() if "layers.1." in n][:12])
    for lay in ("tp1pp1", layout):
        res = conformance.quant_case(spec(m), "w4a16", layout=lay)
        for k, r in res.items(): print(lay, k, r.passed, str(r)[:600])
