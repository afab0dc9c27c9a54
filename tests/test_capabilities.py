"""Bridges declare what the suite can check beyond the common checks; the plugin's items follow."""
import pytest

from bridges import AutoBridge
from conformance.models import resolve


@pytest.mark.parametrize("model,caps", [
    ("microsoft/Phi-3-mini-4k-instruct", set()),
    ("meta-llama/Llama-3.2-1B", {"quant:nvfp4", "quant:modelopt", "quant:compressed", "quant:ct-nvfp4", "quant:bnb-nf4", "quant:bnb-int8"}),
    ("nvidia/NVIDIA-Nemotron-3-Super-120B-A12B", {"experts", "mtp", "quant:nvfp4"}),
    ("nvidia/Nemotron-H-56B-Base-8K", {"quant:nvfp4"}),
    ("Qwen/Qwen3-8B", {"quant:block", "quant:nvfp4", "quant:compressed", "quant:w4a16", "quant:ct-nvfp4", "quant:awq"}),
    ("mistralai/Mistral-7B-v0.1", {"quant:tensor"}),
    ("Qwen/Qwen3-30B-A3B", {"experts", "quant:nvfp4", "quant:compressed", "quant:gptq"}),
    ("deepseek-ai/DeepSeek-V2-Lite", {"experts"}),
    ("deepseek-ai/DeepSeek-V3", {"experts", "mtp", "quant:block", "quant:nvfp4", "quant:w4a16"}),
])
def test_capabilities(model, caps):
    assert AutoBridge.from_hf_config(resolve(model).config).capabilities() == caps


def test_mtp_capability_follows_the_config():
    cfg = dict(resolve("deepseek-ai/DeepSeek-V3").config, num_nextn_predict_layers=0)
    assert "mtp" not in AutoBridge.from_hf_config(cfg).capabilities()
