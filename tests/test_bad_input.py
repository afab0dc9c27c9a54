"""Bad input, end to end on a tiny toy checkpoint: each error names the file, tensor or field
(and the layout where there is one), and nothing is left behind.

One module-scoped toy Qwen3 checkpoint and one set of Megatron model chunks (world size 1, in
this process) are shared by all tests; each test copies the checkpoint and breaks the copy.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridges.core.auto import AutoBridge
from bridges.core.config import ConfigError
from bridges.core.hf_io import SINGLE, CheckpointError, HFCheckpoint
from bridges.core.ledger import CoverageError
from bridges.core.parallel import Layout
from bridges.core.registry import UnknownModelError, list_supported

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = ROOT / "fixtures/configs/Qwen/Qwen3-8B/config.json"


@pytest.fixture(scope="module")
def toy_config() -> dict:
    from conformance.toy import shrink_config

    c = shrink_config(json.loads(QWEN3.read_text()))
    # what the tests below rely on
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["num_hidden_layers"]) == (16, 4, 4)
    assert (c["hidden_size"], c["intermediate_size"], c["vocab_size"]) == (64, 96, 503)
    return c


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_config) -> Path:
    from conformance.toy import make_toy_checkpoint

    return make_toy_checkpoint(toy_config, tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def toy_tensors(toy) -> dict[str, torch.Tensor]:
    return load_file(str(toy / SINGLE))


@pytest.fixture(scope="module")
def chunks(toy):
    """Model chunks for tp1pp1 at world size 1; the untouched toy loads into them cleanly."""
    bridge = AutoBridge.from_hf_pretrained(toy)
    chunks = bridge.to_megatron_provider().provide_distributed_model()
    bridge.load_hf_weights(chunks)
    return chunks


def _variant(toy: Path, dest: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    """A copy of the toy checkpoint with its tensors and/or config replaced."""
    shutil.copytree(toy, dest)
    if tensors is not None:
        save_file(tensors, str(dest / SINGLE), metadata={"format": "pt"})
    if config is not None:
        (dest / "config.json").write_text(json.dumps(config))
    return dest


def _listing(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*"))}


def _load_error(ckpt: Path, chunks) -> str:
    before = _listing(ckpt)
    with pytest.raises(CoverageError) as ei:
        AutoBridge.from_hf_pretrained(ckpt).load_hf_weights(chunks)
    assert _listing(ckpt) == before  # a failed import writes nothing
    msg = str(ei.value)
    assert f"import of {ckpt} failed" in msg
    return msg


# -- model type ---------------------------------------------------------------------------------
def test_unknown_model_type(toy, tmp_path):
    cfg = json.loads((toy / "config.json").read_text())
    cfg.update(model_type="nonexistent", architectures=["NonexistentForCausalLM"])
    d = _variant(toy, tmp_path / "unknown", config=cfg)
    for make in (lambda: AutoBridge.from_hf_pretrained(d), lambda: AutoBridge.from_hf_config(cfg),
                 lambda: AutoBridge.from_hf_config(d / "config.json")):
        with pytest.raises(UnknownModelError) as ei:
            make()
        msg = str(ei.value)
        assert "'nonexistent'" in msg and "NonexistentForCausalLM" in msg
        assert list_supported() and all(t in msg for t in list_supported())
        assert "qwen3" in list_supported()


def test_missing_model_type_names_field_and_file(toy, tmp_path):
    cfg = json.loads((toy / "config.json").read_text())
    del cfg["model_type"]
    d = _variant(toy, tmp_path / "no_type", config=cfg)
    with pytest.raises(ConfigError) as ei:
        AutoBridge.from_hf_pretrained(d)
    assert str(d / "config.json") in str(ei.value) and "'model_type'" in str(ei.value)


def test_invalid_config_json_names_file(toy, tmp_path):
    d = _variant(toy, tmp_path / "bad_json")
    (d / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=re.escape(str(d / "config.json"))):
        AutoBridge.from_hf_pretrained(d)
    with pytest.raises(ConfigError, match=re.escape(str(d / "config.json"))):
        AutoBridge.from_hf_config(d)


def test_missing_local_directory(tmp_path):
    missing = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises(CheckpointError, match=re.escape(str(missing))):
        AutoBridge.from_hf_pretrained(missing)


# -- tensors --------------------------------------------------------------------------------------
def test_missing_tensor(toy, toy_tensors, chunks, tmp_path):
    t = dict(toy_tensors)
    del t["model.layers.2.mlp.down_proj.weight"]
    msg = _load_error(_variant(toy, tmp_path / "missing", t), chunks)
    assert "model.layers.2.mlp.down_proj.weight" in msg
    assert "decoder.layers.2.mlp.linear_fc2.weight" in msg  # the parameter left unwritten


def test_missing_tensor_of_a_fused_parameter(toy, toy_tensors, chunks, tmp_path):
    t = dict(toy_tensors)
    del t["model.layers.3.self_attn.k_proj.weight"]
    msg = _load_error(_variant(toy, tmp_path / "missing_k", t), chunks)
    assert "model.layers.3.self_attn.k_proj.weight" in msg
    assert "decoder.layers.3.self_attention.linear_qkv.weight" in msg


def test_unexpected_extra_tensor(toy, toy_tensors, chunks, tmp_path):
    t = dict(toy_tensors, **{"model.layers.1.mlp.extra_proj.weight": torch.zeros(3, 4)})
    msg = _load_error(_variant(toy, tmp_path / "extra", t), chunks)
    assert "model.layers.1.mlp.extra_proj.weight" in msg and "not used" in msg
    assert "tp1pp1" in msg  # the layout


def test_ignored_tensor_is_not_extra(toy, toy_tensors, chunks, tmp_path):
    """Tensors the bridge declares as carrying no weights (rotary inv_freq) are fine."""
    t = dict(toy_tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    AutoBridge.from_hf_pretrained(_variant(toy, tmp_path / "inv_freq", t)).load_hf_weights(chunks)


@pytest.mark.parametrize("name, shape, param, got, expected", [
    ("model.layers.0.mlp.down_proj.weight", (64, 97), "decoder.layers.0.mlp.linear_fc2.weight",
     "(64, 97)", "(64, 96)"),
    ("model.norm.weight", (65,), "decoder.final_layernorm.weight", "(65,)", "(64,)"),
    ("model.layers.1.self_attn.q_norm.weight", (17,),
     "decoder.layers.1.self_attention.q_layernorm.weight", "(17,)", "(16,)"),
    # vocab rows are padded to 512 before the comparison
    ("model.embed_tokens.weight", (503, 65), "embedding.word_embeddings.weight", "(512, 65)",
     "(512, 64)"),
])
def test_wrong_shape(toy, toy_tensors, chunks, tmp_path, name, shape, param, got, expected):
    t = dict(toy_tensors, **{name: torch.zeros(shape)})
    msg = _load_error(_variant(toy, tmp_path / "shape", t), chunks)
    line = next(line for line in msg.splitlines() if param in line)
    assert name in line and got in line and expected in line


@pytest.mark.parametrize("name, shape, says", [
    ("model.layers.0.self_attn.q_proj.weight", (250, 64), ["250", "256"]),
    ("model.embed_tokens.weight", (500, 64), ["500", "503"]),
    ("model.layers.0.mlp.gate_proj.weight", (96, 65), ["(96, 65)", "(96, 64)"]),
])
def test_wrong_shape_in_fused_or_padded_mapping(toy, toy_tensors, chunks, tmp_path, name, shape, says):
    t = dict(toy_tensors, **{name: torch.zeros(shape)})
    msg = _load_error(_variant(toy, tmp_path / "shape", t), chunks)
    assert any(name in line and all(s in line for s in says) for line in msg.splitlines()), msg


def test_fused_mapping_error_names_the_layer(toy, toy_tensors, chunks, tmp_path):
    """The mapping's own message names the pattern (model.layers.*...); the import's line
    must name the tensor of the failing layer and the parameter."""
    name = "model.layers.2.self_attn.q_proj.weight"
    t = dict(toy_tensors, **{name: torch.zeros(250, 64)})
    msg = _load_error(_variant(toy, tmp_path / "shape", t), chunks)
    line = next(line for line in msg.splitlines() if "250" in line)
    assert name in line and "decoder.layers.2.self_attention.linear_qkv.weight" in line


def test_wrong_columns_in_qkv(toy, toy_tensors, chunks, tmp_path):
    """q/k/v that disagree beyond dim 0: a named error, not a bare torch reshape error."""
    name = "model.layers.0.self_attn.q_proj.weight"
    t = dict(toy_tensors, **{name: torch.zeros(256, 65)})
    msg = _load_error(_variant(toy, tmp_path / "qcols", t), chunks)
    line = next(line for line in msg.splitlines() if "(256, 65)" in line)
    assert name in line and "decoder.layers.0.self_attention.linear_qkv.weight" in line


def test_truncated_safetensors(toy, chunks, tmp_path):
    d = _variant(toy, tmp_path / "truncated")
    f = d / SINGLE
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as ei:
        AutoBridge.from_hf_pretrained(d)
    assert str(f) in str(ei.value) and "truncated" in str(ei.value)
    bridge = AutoBridge.from_hf_pretrained(toy)
    with pytest.raises(CheckpointError, match=re.escape(str(f))):
        bridge.load_hf_weights(chunks, checkpoint=str(d))


# -- layouts ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout, changes, says", [
    (Layout(tp=3), {}, ["tp3", "num_attention_heads=16", "TP=3"]),
    (Layout(tp=8), {}, ["tp8", "num_query_groups=4", "TP=8"]),
    (Layout(pp=3), {}, ["pp3", "num_layers=4", "PP x VPP=3"]),
    (Layout(pp=2, vpp=4), {}, ["pp2vpp4", "num_layers=4", "PP x VPP=8"]),
    (Layout(tp=4), {"ffn_hidden_size": 98}, ["tp4", "ffn_hidden_size=98", "TP=4"]),
    (Layout(), {"num_query_groups": 3}, ["num_attention_heads=16", "num_query_groups=3"]),
    (Layout(tp=2), {"make_vocab_size_divisible_by": None}, ["tp2", "vocab_size=503", "TP=2"]),
    (Layout(pp=1, vpp=2), {}, ["vpp2", "PP >= 2"]),
])
def test_layout_does_not_divide(toy_config, layout, changes, says):
    provider = AutoBridge.from_hf_config(toy_config).to_megatron_provider().set_layout(layout)
    for k, v in changes.items():
        setattr(provider, k, v)
    with pytest.raises(ConfigError) as ei:
        provider.finalize()
    assert all(s in str(ei.value) for s in says), str(ei.value)
    with pytest.raises(ConfigError):  # provide_distributed_model finalizes first
        provider.provide_distributed_model()


@pytest.mark.parametrize("layout", [Layout(tp=4), Layout(tp=2, pp=2), Layout(pp=2, vpp=2), Layout(tp=4, pp=4)])
def test_layout_that_divides(toy_config, layout):
    provider = AutoBridge.from_hf_config(toy_config).to_megatron_provider().set_layout(layout)
    assert provider.finalize().layout == layout


def test_layout_larger_than_world(toy_config, chunks):
    """A valid layout that needs more ranks than the world has: named, and the current
    parallel state is left as it was."""
    from bridges.core.parallel import current_layout

    before = current_layout()
    provider = AutoBridge.from_hf_config(toy_config).to_megatron_provider()
    provider.tensor_model_parallel_size = 2
    with pytest.raises(ValueError, match="layout tp2 needs a multiple of 2 ranks"):
        provider.provide_distributed_model()
    assert current_layout() == before


# -- export -----------------------------------------------------------------------------------------
def test_save_roundtrip(toy, toy_tensors, chunks, tmp_path):
    """The control for the failure below: a good export writes the source back exactly."""
    out = tmp_path / "export"
    AutoBridge.from_hf_pretrained(toy).save_hf_pretrained(chunks, str(out), max_shard_bytes=20_000)
    ckpt = HFCheckpoint(out)
    assert ckpt.names() == sorted(toy_tensors)
    for name, t in toy_tensors.items():
        assert torch.equal(ckpt.get(name), t), name
    assert (out / "generation_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_failed_export_leaves_nothing(toy, toy_tensors, chunks, tmp_path):
    # the source has a tensor the model cannot produce: the export's strict check fails after
    # every tensor was written (into the temporary directory, several shards)
    t = dict(toy_tensors, **{"model.layers.1.mlp.extra_proj.weight": torch.zeros(3, 4)})
    src = _variant(toy, tmp_path / "src", t)
    bridge = AutoBridge.from_hf_pretrained(src)
    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "new"
    with pytest.raises(CoverageError, match="missing .*model.layers.1.mlp.extra_proj.weight"):
        bridge.save_hf_pretrained(chunks, str(out), max_shard_bytes=20_000)
    assert list(parent.iterdir()) == []
    # an existing export at the target survives a failed one untouched
    good = parent / "good"
    AutoBridge.from_hf_pretrained(toy).save_hf_pretrained(chunks, str(good))
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(CoverageError):
        bridge.save_hf_pretrained(chunks, str(good), max_shard_bytes=20_000, overwrite=True)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert [p.name for p in parent.iterdir()] == ["good"]
