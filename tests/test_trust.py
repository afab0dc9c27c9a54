"""Trust: what the bridges refuse to run or unpickle unless the caller says so.

- A config with ``auto_map`` (the model ships remote code) is refused by AutoBridge unless
  ``trust_remote_code=True``; with it, the bridge proceeds, and the remote code is never run.
- Pickle checkpoints are refused by HFCheckpoint / AutoBridge unless ``allow_pickle=True``; then
  they are read with ``torch.load(weights_only=True, map_location="cpu", mmap=True)``, which
  refuses any object that is not a tensor: a malicious pickle never runs.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bridges.core.auto import AutoBridge, RemoteCodeError
from bridges.core.config import ConfigError
from bridges.core.hf_io import (INDEX, PT_INDEX, PT_SINGLE, SINGLE, CheckpointError, HFCheckpoint,
                                PickleRefusedError)

ROOT = Path(__file__).resolve().parents[1]
AUTO_MAP = {"AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}


class Evil:
    """Unpickling this runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chunks(toy):
    bridge = AutoBridge.from_hf_pretrained(toy)
    return bridge.to_megatron_provider().provide_distributed_model()


def _state(chunks) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in chunks[0].state_dict().items()
            if isinstance(v, torch.Tensor)}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(11, 8, generator=g),
            "model.norm.weight": torch.randn(8, generator=g).bfloat16(),
            "model.layers.0.mlp.down_proj.weight": torch.randn(8, 12, generator=g),
            "counts": torch.arange(5)}


def _pickle_dir(d: Path, tensors: dict, name: str = PT_SINGLE, **save_kw) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, d / name, **save_kw)
    return d


def _sharded_pickle_dir(d: Path, tensors: dict) -> Path:
    """pytorch_model-0000k-of-0000n.bin shards + pytorch_model.bin.index.json."""
    d.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    wm = {}
    for i, part in enumerate(shards, 1):
        f = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save({n: tensors[n] for n in part}, d / f)
        wm.update({n: f for n in part})
    (d / PT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return d


def _same(ckpt: HFCheckpoint, tensors: dict) -> None:
    assert ckpt.names() == sorted(tensors)
    for n, t in tensors.items():
        assert ckpt.shape(n) == tuple(t.shape) and ckpt.dtype(n) == t.dtype
        got = ckpt.get(n)
        assert got.dtype == t.dtype and torch.equal(got, t), n


def _with_auto_map(toy: Path, dest: Path) -> Path:
    """The toy with ``auto_map`` and remote-code files that would leave a marker if imported."""
    shutil.copytree(toy, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, "auto_map": AUTO_MAP}))
    for mod in ("configuration_evil", "modeling_evil"):
        (dest / f"{mod}.py").write_text(
            f"open({str(dest / 'REMOTE_CODE_RAN')!r}, 'w').write({mod!r})\n")
    return dest


# -- remote code ----------------------------------------------------------------------------------
def test_auto_map_refused_by_from_hf_pretrained(toy, tmp_path):
    d = _with_auto_map(toy, tmp_path / "remote")
    with pytest.raises(RemoteCodeError) as ei:
        AutoBridge.from_hf_pretrained(d)
    msg = str(ei.value)
    assert str(d / "config.json") in msg and "'auto_map'" in msg and "trust_remote_code=True" in msg
    assert "modeling_evil.EvilForCausalLM" in msg
    assert isinstance(ei.value, ConfigError)
    assert not (d / "REMOTE_CODE_RAN").exists()


def test_auto_map_refused_by_from_hf_config(toy, tmp_path):
    d = _with_auto_map(toy, tmp_path / "remote")
    raw = json.loads((d / "config.json").read_text())
    for config, source in [(raw, "config"), (d / "config.json", str(d / "config.json")),
                           (str(d), str(d / "config.json"))]:
        with pytest.raises(RemoteCodeError) as ei:
            AutoBridge.from_hf_config(config)
        assert str(ei.value).startswith(f"{source}: field 'auto_map'"), str(ei.value)
    # a transformers config object that carries auto_map
    obj = AutoBridge.from_hf_config(raw, trust_remote_code=True).hf_config
    assert obj.auto_map == AUTO_MAP
    with pytest.raises(RemoteCodeError, match="field 'auto_map'"):
        AutoBridge.from_hf_config(obj)
    assert not (d / "REMOTE_CODE_RAN").exists()


def test_auto_map_refused_before_anything_else(toy, tmp_path):
    """Refused even when the model type is unknown and the weights are pickle: the first
    thing the caller learns is that the model wants remote code."""
    d = _with_auto_map(toy, tmp_path / "remote")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "evil"}))
    (d / SINGLE).unlink()
    torch.save({"x": torch.ones(1)}, d / PT_SINGLE)
    with pytest.raises(RemoteCodeError):
        AutoBridge.from_hf_pretrained(d)


def test_trust_remote_code_proceeds_and_never_runs_the_code(toy, toy_tensors, chunks, tmp_path):
    d = _with_auto_map(toy, tmp_path / "remote")
    bridge = AutoBridge.from_hf_pretrained(d, trust_remote_code=True)
    plain = AutoBridge.from_hf_pretrained(toy)
    assert type(bridge) is type(plain)
    assert bridge.megatron_attrs() == plain.megatron_attrs()
    bridge.load_hf_weights(chunks)
    out = tmp_path / "export"
    bridge.save_hf_pretrained(chunks, str(out))
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP  # kept as data
    assert not any(p.suffix == ".py" for p in out.iterdir())  # remote code is not copied
    assert AutoBridge.from_hf_config(d, trust_remote_code=True).megatron_attrs() == plain.megatron_attrs()
    assert not (d / "REMOTE_CODE_RAN").exists()


def test_no_auto_map_needs_no_trust(toy):
    AutoBridge.from_hf_pretrained(toy)  # the default stays usable
    AutoBridge.from_hf_config(toy)


# -- pickle: refused by default ---------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["single", "sharded", "other_bin", "pt"])
def test_pickle_refused_by_default(tmp_path, layout):
    d = tmp_path / layout
    if layout == "single":
        _pickle_dir(d, _tensors())
        named = d / PT_SINGLE
    elif layout == "sharded":
        _sharded_pickle_dir(d, _tensors())
        named = d / PT_INDEX
    else:
        name = "consolidated.bin" if layout == "other_bin" else "model.pt"
        _pickle_dir(d, _tensors(), name=name)
        named = d / name
    with pytest.raises(PickleRefusedError) as ei:
        HFCheckpoint(d)
    msg = str(ei.value)
    assert msg.startswith(f"{named}: pickle checkpoint refused") and "allow_pickle=True" in msg
    assert isinstance(ei.value, CheckpointError)


def test_pickle_refused_by_auto_bridge(toy, toy_tensors, chunks, tmp_path):
    d = tmp_path / "bin"
    shutil.copytree(toy, d)
    (d / SINGLE).unlink()
    torch.save(toy_tensors, d / PT_SINGLE)
    with pytest.raises(PickleRefusedError, match=re.escape(f"{d / PT_SINGLE}: pickle checkpoint refused")):
        AutoBridge.from_hf_pretrained(d)
    # a path handed to load_hf_weights is opened without pickle support too
    with pytest.raises(PickleRefusedError, match=re.escape(str(d / PT_SINGLE))):
        AutoBridge.from_hf_pretrained(toy).load_hf_weights(chunks, checkpoint=str(d))


def test_no_weights_at_all_is_still_named(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: no {SINGLE} or {INDEX}")) as ei:
        HFCheckpoint(tmp_path)
    assert not isinstance(ei.value, PickleRefusedError)


# -- pickle: allowed ----------------------------------------------------------------------------------
def test_allowed_single_bin_loads_with_weights_only_and_mmap(tmp_path, monkeypatch):
    calls = []
    real = torch.load

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(torch, "load", spy)
    d = _pickle_dir(tmp_path / "bin", _tensors())
    ckpt = HFCheckpoint(d, allow_pickle=True)
    _same(ckpt, _tensors())
    assert calls == [dict(weights_only=True, map_location="cpu", mmap=True)]
    t = ckpt.get("model.norm.weight")
    t.zero_()  # a caller's in-place change does not leak into the next read
    assert torch.equal(ckpt.get("model.norm.weight"), _tensors()["model.norm.weight"])


def test_allowed_lone_pt_file_and_legacy_format(tmp_path):
    _same(HFCheckpoint(_pickle_dir(tmp_path / "pt", _tensors(), name="model.pt"), allow_pickle=True),
          _tensors())
    legacy = _pickle_dir(tmp_path / "legacy", _tensors(), _use_new_zipfile_serialization=False)
    _same(HFCheckpoint(legacy, allow_pickle=True), _tensors())  # cannot be mmapped: read plainly


def test_allowed_sharded_bin(tmp_path):
    d = _sharded_pickle_dir(tmp_path / "sharded", _tensors())
    ckpt = HFCheckpoint(d, allow_pickle=True)
    _same(ckpt, _tensors())
    assert len(set(ckpt._where.values())) == 2


@pytest.mark.parametrize("shard", ["../x.bin", "sub/../../x.bin", "ABSOLUTE"])
def test_pickle_index_shard_outside_directory(tmp_path, shard):
    d = tmp_path / "ckpt"
    d.mkdir()
    torch.save({"a": torch.ones(2)}, tmp_path / "x.bin")
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "x.bin")
    (d / PT_INDEX).write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(CheckpointError) as ei:
        HFCheckpoint(d, allow_pickle=True)
    msg = str(ei.value)
    assert str(d / PT_INDEX) in msg and shard in msg and "outside" in msg


def test_pickle_index_shard_symlinked_outside(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    torch.save({"a": torch.ones(2)}, tmp_path / "x.bin")
    (d / "pytorch_model-00001.bin").symlink_to(tmp_path / "x.bin")
    (d / PT_INDEX).write_text(json.dumps({"weight_map": {"a": "pytorch_model-00001.bin"}}))
    with pytest.raises(CheckpointError, match="outside"):
        HFCheckpoint(d, allow_pickle=True)


@pytest.mark.parametrize("problem, says", [
    ("missing_shard", "does not exist"), ("ghost_tensor", "absent from their shard"),
    ("bad_json", "not a valid PyTorch index"), ("no_weight_map", "not a valid PyTorch index"),
    ("shard_not_a_string", "not a file name"), ("tensor_in_two_shards", "tensor counts also in"),
])
def test_bad_pickle_index_named(tmp_path, problem, says):
    d = _sharded_pickle_dir(tmp_path / "sharded", _tensors())
    index = json.loads((d / PT_INDEX).read_text())
    wm = index["weight_map"]
    text = None
    if problem == "missing_shard":
        wm["model.norm.weight"] = "pytorch_model-00099-of-00099.bin"
    elif problem == "ghost_tensor":
        wm["model.ghost.weight"] = wm["model.norm.weight"]
    elif problem == "bad_json":
        text = "{oops"
    elif problem == "no_weight_map":
        index = {"metadata": {}}
    elif problem == "tensor_in_two_shards":  # shard 1 holds counts; shard 2 gets a copy
        shard2 = d / wm["model.norm.weight"]
        torch.save({**torch.load(shard2), "counts": torch.zeros(5)}, shard2)
    else:
        wm["model.norm.weight"] = 7
    (d / PT_INDEX).write_text(text if text is not None else json.dumps(index))
    with pytest.raises(CheckpointError) as ei:
        HFCheckpoint(d, allow_pickle=True)
    msg = str(ei.value)
    assert says in msg, msg
    if problem == "tensor_in_two_shards":  # named by both shards, as for safetensors
        assert "pytorch_model-00001-of-00002.bin" in msg and "pytorch_model-00002-of-00002.bin" in msg
    else:
        assert str(d / PT_INDEX) in msg


def test_several_lone_pickles_are_ambiguous(tmp_path):
    d = _pickle_dir(tmp_path / "two", _tensors(), name="a.bin")
    torch.save(_tensors(), d / "b.pt")
    with pytest.raises(CheckpointError, match=r"several pickle files \(a.bin, b.pt\)"):
        HFCheckpoint(d, allow_pickle=True)


@pytest.mark.parametrize("content, says", [
    ([torch.ones(2)], "holds a list, not a state dict"),
    ({"a": torch.ones(2), "step": 7}, "entry 'step' is a int, not a tensor"),
    ({"a": torch.ones(2, dtype=torch.complex64)}, "tensor a has unsupported dtype"),
    (b"garbage, not a checkpoint", "refused by torch.load(weights_only=True)"),
], ids=["list", "non_tensor_entry", "complex_dtype", "garbage_bytes"])
def test_bad_pickle_content_named(tmp_path, content, says):
    d = tmp_path / "bad"
    d.mkdir()
    if isinstance(content, bytes):
        (d / PT_SINGLE).write_bytes(content)
    else:
        torch.save(content, d / PT_SINGLE)
    with pytest.raises(CheckpointError) as ei:
        HFCheckpoint(d, allow_pickle=True)
    assert str(ei.value).startswith(str(d / PT_SINGLE)) and says in str(ei.value), str(ei.value)


# -- malicious pickles ---------------------------------------------------------------------------------
def test_the_malicious_pickle_is_live(tmp_path):
    """Control: the payload below really runs when unpickled without weights_only."""
    marker = tmp_path / "PWNED"
    torch.save({"a": torch.ones(2), "x": Evil(marker)}, tmp_path / "evil.bin")
    torch.load(tmp_path / "evil.bin", weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("how", ["torch_save", "raw_pickle", "sharded", "legacy_format"])
def test_malicious_pickle_refused_and_never_run(tmp_path, how):
    marker = tmp_path / "PWNED"
    d = tmp_path / "ckpt"
    d.mkdir()
    payload = {"model.norm.weight": torch.ones(2), "evil": Evil(marker)}
    if how == "torch_save":
        torch.save(payload, d / PT_SINGLE)
        named = d / PT_SINGLE
    elif how == "legacy_format":
        torch.save(payload, d / PT_SINGLE, _use_new_zipfile_serialization=False)
        named = d / PT_SINGLE
    elif how == "raw_pickle":
        (d / PT_SINGLE).write_bytes(pickle.dumps(Evil(marker)))
        named = d / PT_SINGLE
    else:
        torch.save({"model.embed_tokens.weight": torch.ones(2)}, d / "pytorch_model-00001-of-00002.bin")
        torch.save(payload, d / "pytorch_model-00002-of-00002.bin")
        (d / PT_INDEX).write_text(json.dumps({"weight_map": {
            "model.embed_tokens.weight": "pytorch_model-00001-of-00002.bin",
            "model.norm.weight": "pytorch_model-00002-of-00002.bin",
            "evil": "pytorch_model-00002-of-00002.bin"}}))
        named = d / "pytorch_model-00002-of-00002.bin"
    with pytest.raises(PickleRefusedError):  # by default: not even opened
        HFCheckpoint(d)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as ei:  # allowed: weights_only refuses the object
        HFCheckpoint(d, allow_pickle=True)
    assert str(ei.value).startswith(str(named)), str(ei.value)
    assert "refused by torch.load(weights_only=True)" in str(ei.value), str(ei.value)
    if how in ("torch_save", "sharded"):
        assert "GLOBAL exec was not an allowed global" in str(ei.value), str(ei.value)
        assert "add_safe_globals" not in str(ei.value)
    assert not marker.exists()


def test_malicious_pickle_through_auto_bridge(toy, tmp_path):
    marker = tmp_path / "PWNED"
    d = tmp_path / "ckpt"
    shutil.copytree(toy, d)
    (d / SINGLE).unlink()
    torch.save({"model.norm.weight": torch.ones(64), "evil": Evil(marker)}, d / PT_SINGLE)
    with pytest.raises(PickleRefusedError):
        AutoBridge.from_hf_pretrained(d)
    with pytest.raises(CheckpointError, match=re.escape(str(d / PT_SINGLE)) + ".*weights_only"):
        AutoBridge.from_hf_pretrained(d, allow_pickle=True)
    assert not marker.exists()


# -- safetensors preferred; end to end ------------------------------------------------------------------
def test_safetensors_preferred_over_pickle(tmp_path):
    """A directory with both: safetensors are read, the .bin is never opened (not even
    refused), even when it is malicious."""
    marker = tmp_path / "PWNED"
    d = tmp_path / "both"
    d.mkdir()
    save_file(_tensors(), str(d / SINGLE))
    torch.save({"model.norm.weight": torch.zeros(8), "evil": Evil(marker)}, d / PT_SINGLE)
    (d / "training_args.bin").write_bytes(pickle.dumps(Evil(marker)))
    for allow in (False, True):
        ckpt = HFCheckpoint(d, allow_pickle=allow)
        _same(ckpt, _tensors())
        assert set(ckpt._where.values()) == {d / SINGLE}
    assert not marker.exists()


def test_allowed_pickle_end_to_end(toy, toy_tensors, chunks, tmp_path):
    """The toy as pytorch_model.bin loads into the same parameters as from safetensors, and
    exports back to safetensors exactly."""
    AutoBridge.from_hf_pretrained(toy).load_hf_weights(chunks)
    expected = _state(chunks)
    for p in chunks[0].parameters():
        p.data.zero_()
    d = tmp_path / "bin"
    shutil.copytree(toy, d)
    (d / SINGLE).unlink()
    torch.save(toy_tensors, d / PT_SINGLE)
    bridge = AutoBridge.from_hf_pretrained(d, allow_pickle=True)
    bridge.load_hf_weights(chunks)
    got = _state(chunks)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    out = tmp_path / "export"
    bridge.save_hf_pretrained(chunks, str(out))
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".safetensors")) == [SINGLE]
    back = load_file(str(out / SINGLE))
    assert sorted(back) == sorted(toy_tensors)
    assert all(torch.equal(back[k], toy_tensors[k]) for k in toy_tensors)
