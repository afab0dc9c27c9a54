"""mbridge inspect on published configs (shipped fixtures) and a toy checkpoint."""
import json
from pathlib import Path

import pytest

from bridges.commands.inspect import inspect_config
from bridges.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"


def _cfg(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("model", ["Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B", "mistralai/Mistral-7B-v0.1",
                                   "Qwen/Qwen2.5-7B-Instruct"])
def test_registered_dense_models_have_a_bridge_and_nothing_unknown(model):
    info = inspect_config(_cfg(FIXTURES / model / "config.json"))
    assert info["bridge"] and info["blocks"] == ["dense"] and info["unknown_fields"] == []
    assert info["kind"] == "llm"


def test_new_blocks_are_flagged(tmp_path):
    cfg = _cfg(FIXTURES / "Qwen/Qwen3-8B/config.json")
    cfg.update(model_type="qwen3_moe_like", architectures=["X"], num_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=64, kv_lora_rank=32, lightning_heads=4,
               quantization_config={"quant_method": "fp8"})
    info = inspect_config(cfg)
    assert info["bridge"] is None and info["closest_bridge"] == "qwen3"
    assert set(info["blocks"]) == {"moe", "mla"}
    # no registered bridge reads lightning_heads; the dense qwen3 bridge does not read MoE fields
    assert "lightning_heads" in info["unknown_fields"] and "num_experts" not in info["unknown_fields"]
    assert {"num_experts", "kv_lora_rank", "moe_intermediate_size", "lightning_heads"} <= \
        set(info["unhandled_by_closest"])
    assert info["quantization"]["config"] == {"quant_method": "fp8"}


def test_vlm_fields_are_located():
    cfg = {"model_type": "toy_vl", "architectures": ["ToyVL"], "tie_word_embeddings": False,
           "text_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
           "vision_config": {"depth": 2, "hidden_size": 32}}
    info = inspect_config(cfg)
    assert info["kind"] == "vlm"
    assert "tie_word_embeddings" in info["fields_at"]["top"]
    assert info["fields_at"]["vision_config"] == ["depth", "hidden_size"]


def test_quantized_tensors_from_headers_only(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4, 4, dtype=torch.float8_e4m3fn), "w_scale_inv": torch.ones(1)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(_cfg(FIXTURES / "Qwen/Qwen3-8B/config.json")))
    info = inspect_config(_cfg(tmp_path / "config.json"), tmp_path)
    assert info["quantization"]["quantized_tensors"] == {"dtypes": ["F8_E4M3"], "companions": ["_scale_inv"]}


def test_cli_text_and_json(capsys):
    assert main(["inspect", "Qwen/Qwen3-8B"]) == 0
    assert "Qwen3Bridge" in capsys.readouterr().out
    path = FIXTURES / "deepseek-ai/DeepSeek-V3/config.json"
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"moe", "mla", "mtp"} <= set(info["blocks"]) and info["bridge"] == "DeepseekV3Bridge"
    assert "kv_lora_rank" not in info["unknown_fields"]  # read by the deepseek_v3 bridge
    assert info["quantization"]["config"]["weight_block_size"] == [128, 128]


def test_a_vlm_is_told_its_vision_encoder_pattern():
    """The registered VLM bridge's pattern; for a VLM without a bridge, what its vision config
    calls for (a Qwen-VL style tower, or one transformers ships as plain modules)."""
    import json
    from pathlib import Path

    from bridges.commands.inspect import inspect_config

    gemma3 = json.loads((Path(__file__).resolve().parents[1] / "fixtures/configs/google/gemma-3-4b-it/config.json").read_text())
    assert inspect_config(gemma3)["vision_encoder"].startswith("HF vision encoder")
    qwen_vl = {"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_size": 3584,
               "vision_config": {"depth": 32, "fullatt_block_indexes": [7, 15, 23, 31], "spatial_merge_size": 2}}
    assert inspect_config(qwen_vl)["vision_encoder"].startswith("Megatron vision encoder")
    pixtral = {"model_type": "mistral3", "text_config": {"hidden_size": 5120}, "vision_config": {"model_type": "pixtral"}}
    assert inspect_config(pixtral)["vision_encoder"].startswith("HF vision encoder")
    odd = {"model_type": "x_vl", "vision_config": {"model_type": "x_vision"}}
    assert inspect_config(odd)["vision_encoder"].startswith("unknown (vision_config.model_type='x_vision')")
    assert "vision_encoder" not in inspect_config({"model_type": "llama", "hidden_size": 64})


def test_hybrid_layer_patterns_are_read_and_unknown_block_types_named(capsys):
    """Nemotron-H's pattern string, Qwen3-Next's attention interval, a layer_types list and a
    layers_block_type list give per-kind counts and the HybridModel pattern; a block name with
    no Megatron-Core symbol is named with its layers."""
    from bridges.cli import main
    from bridges.commands.inspect import hybrid_layers
    from tests.test_flops_hybrid import NEMOTRON_PATTERN, QWEN3_NEXT_80B

    data = Path(__file__).parent / "data"
    nemo_cfg = Path(__file__).parents[1] / "fixtures/configs/nvidia/Nemotron-H-56B-Base-8K/config.json"
    nemo = hybrid_layers(json.loads(nemo_cfg.read_text()))
    assert nemo["counts"] == {"Mamba-2": 54, "MLP": 54, "attention": 10} and nemo["pattern"] == NEMOTRON_PATTERN
    nxt = hybrid_layers(json.loads((Path(__file__).parents[1] / "fixtures/configs/Qwen/Qwen3-Next-80B-A3B-Instruct/config.json").read_text()))
    assert nxt["pattern"] == QWEN3_NEXT_80B["hybrid_layer_pattern"] and nxt["from"] == "full_attention_interval"
    listed = hybrid_layers({"num_hidden_layers": 4, "layer_types": ["linear_attention"] * 3 + ["full_attention"]})
    assert listed["pattern"] == "G-G-G-*-" and listed["counts"] == {"gated delta net": 3, "MLP": 4, "attention": 1}
    odd = hybrid_layers({"layers_block_type": ["linear_attention", "attention", "conv", "moe", "conv"]})
    assert odd["unknown"] == {"conv": [2, 4]} and odd["pattern"] == "M*?E?"  # Nemotron-H's: Mamba-2
    assert hybrid_layers({"num_hidden_layers": 2}) is None
    assert main(["inspect", str(nemo_cfg)]) == 0
    assert "118 HF layers (hybrid_override_pattern): 54 Mamba-2, 54 MLP, 10 attention" in capsys.readouterr().out


def test_latent_moe_and_mtp_are_named(capsys):
    """Nemotron 3 Super: latent MoE, MTP and the hybrid pattern, every field read by its bridge."""
    assert main(["inspect", "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"moe", "latent_moe", "mtp", "hybrid"} <= set(info["blocks"]) and info["bridge"] == "NemotronHBridge"
    assert info["unknown_fields"] == []


def test_compressed_tensors_packed_int4_is_named(tmp_path):
    """compressed-tensors' W4A16 (int32 ``weight_packed``, group scales, zero points): inspect
    names the format and its parts, from the headers alone."""
    import torch
    from safetensors.torch import save_file

    save_file({"w.weight_packed": torch.zeros(4, 1, dtype=torch.int32), "w.weight_scale": torch.ones(4, 1),
               "w.weight_zero_point": torch.zeros(4, 1, dtype=torch.int32), "a.k_scale": torch.ones(1)},
              str(tmp_path / "model.safetensors"))
    cfg = {**_cfg(FIXTURES / "Qwen/Qwen3-8B/config.json"), "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "kv_cache_scheme": {"type": "float"}}}
    info = inspect_config(cfg, tmp_path)["quantization"]
    assert info["config"] == {"quant_method": "compressed-tensors", "format": "pack-quantized", "kv_cache_scheme": "float"}
    assert info["quantized_tensors"] == {"dtypes": ["I32"], "companions": ["_packed", "_scale", "_zero_point", "k_scale"]}
