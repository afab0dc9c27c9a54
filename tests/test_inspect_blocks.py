"""mbridge inspect: the closest bridge weighs the blocks the tensor names show (QK norm, fused
projections, biases, experts, MLA), read from an index / safetensors headers or, for a model
type transformers knows, from its own class on the meta device; config fields alone otherwise."""
import json
from pathlib import Path

import pytest

from bridges.commands.inspect import inspect_config
from bridges.core import registry

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
PHI3 = FIXTURES / "microsoft/Phi-3-mini-4k-instruct/config.json"
PHI3_NAMES = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
    f"model.layers.{i}.{n}" for i in range(2) for n in (
        "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.qkv_proj.weight",
        "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight")]


@pytest.fixture
def without_phi3(monkeypatch):
    """As before the Phi-3 bridge existed: the closest of the others."""
    registry.load_families()
    monkeypatch.delitem(registry._BY_TYPE, "phi3")


def _index_dir(tmp_path, config: dict, names: list[str]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    return tmp_path


def test_phi3_config_is_not_matched_to_qwen3(without_phi3):
    """Phi-3's config spells the same fields as Qwen3's; its tensors (transformers' phi3 class)
    have no QK norm and fuse q/k/v and gate/up."""
    info = inspect_config(json.loads(PHI3.read_text()))
    assert info["tensor_names_from"] == "transformers Phi3ForCausalLM"
    assert info["tensor_blocks"] == ["fused_gate_up", "fused_qkv", "untied_head"]
    assert info["closest_bridge"] in ("llama", "mistral"), info["closest_bridge"]


def test_phi3_index_names_pick_the_phi3_bridge(tmp_path):
    cfg = {**json.loads(PHI3.read_text()), "model_type": "phi3_like", "architectures": ["Phi3LikeForCausalLM"]}
    info = inspect_config(cfg, _index_dir(tmp_path, cfg, PHI3_NAMES))
    assert info["bridge"] is None and info["tensor_names_from"] == "model.safetensors.index.json"
    assert info["closest_bridge"] == "phi3"


def test_index_names_outweigh_config_fields(tmp_path, without_phi3):
    """The same config with Phi-3's tensors or with Qwen3's (q_norm / k_norm): the tensors decide."""
    cfg = {**json.loads(PHI3.read_text()), "model_type": "phi3_like", "architectures": ["Phi3LikeForCausalLM"]}
    assert inspect_config(cfg, _index_dir(tmp_path / "a", cfg, PHI3_NAMES))["closest_bridge"] != "qwen3"
    qwen3 = [n.replace("self_attn.qkv_proj", "self_attn.q_proj") for n in PHI3_NAMES] + [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in
        ("k_proj.weight", "v_proj.weight", "q_norm.weight", "k_norm.weight")]
    qwen3 = [n.replace("mlp.gate_up_proj", "mlp.gate_proj") for n in qwen3] + [
        f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)]
    assert inspect_config(cfg, _index_dir(tmp_path / "b", cfg, qwen3))["closest_bridge"] == "qwen3"


def test_unknown_model_type_without_weights_falls_back_to_config_fields():
    cfg = {**json.loads(PHI3.read_text()), "model_type": "phi3_like"}
    info = inspect_config(cfg)
    assert info["tensor_names_from"] is None and "tensor_blocks" not in info
