"""The stacked-experts case runs a stacked copy made in the dtype under test."""
from pathlib import Path

import torch
from safetensors import safe_open


def test_stacked_experts_in_bfloat16_roundtrip_bit_exactly(conformance, spec):
    """A bf16 run of the stacked case used an fp32 stacked copy: the export (bf16) then differed
    from the source in every tensor (0/47 bit-exact on Qwen3-30B-A3B), a false failure."""
    moe = spec("Qwen/Qwen3-30B-A3B")
    results = conformance.stacked_case(moe, dtype="bfloat16")
    assert results["roundtrip"].passed, results["roundtrip"]
    assert results["coverage"].passed and results["logits"].passed, results
    stacked = Path(conformance.checkpoint(moe, "bfloat16") + "-stacked")
    with safe_open(str(stacked / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert any(n.endswith("mlp.experts.gate_up_proj") for n in names), names
        assert {f.get_tensor(n).dtype for n in names} == {torch.bfloat16}
