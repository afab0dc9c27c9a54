"""bridges.core.hf_io: the streaming safetensors reader and the atomic writer.

Every reader error is a CheckpointError that names the file (and the tensor or shard where
there is one); the writer leaves nothing behind (no target, no temporary sibling) on failure.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bridges.core.hf_io import (COPIED_FILES, INDEX, SINGLE, CheckpointError, HFCheckpoint,
                                read_header, save_hf_checkpoint)
from bridges.core.outdir import MARKER

CONFIG = {"model_type": "toy", "hidden_size": 8, "nested": {"a": [1, 2]}}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(11, 8, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 12, generator=g).t(),  # strided
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g).to(torch.bfloat16),
        "model.layers.1.self_attn.q_proj.bias": torch.randn(16, generator=g).half(),
        "model.norm.weight": torch.randn(8, generator=g),
        "counts": torch.arange(5, dtype=torch.int64),
    }


def _leftovers(parent: Path, out: Path) -> list[str]:
    """Hidden temp / old siblings of ``out`` in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}."))


def _assert_same(ckpt: HFCheckpoint, tensors: dict[str, torch.Tensor]) -> None:
    assert ckpt.names() == sorted(tensors)
    for name, t in tensors.items():
        assert name in ckpt
        assert ckpt.shape(name) == tuple(t.shape)
        assert ckpt.dtype(name) == t.dtype
        got = ckpt.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name


def _shard_names(d: Path) -> list[str]:
    return sorted(p.name for p in d.glob("*.safetensors"))


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A checkpoint of several shards (small max_shard_bytes)."""
    out = save_hf_checkpoint(_tensors().items(), CONFIG, tmp_path / "sharded", max_shard_bytes=300)
    assert len(_shard_names(out)) > 2
    return out


def _raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _index(d: Path, weight_map: dict) -> Path:
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d / INDEX


# -- reading -----------------------------------------------------------------------------------
def test_single_file_roundtrip(tmp_path):
    t = _tensors()
    out = save_hf_checkpoint(t.items(), CONFIG, tmp_path / "single")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.json", SINGLE]
    ckpt = HFCheckpoint(out)
    _assert_same(ckpt, t)
    assert ckpt.config() == CONFIG


def test_single_file_written_by_safetensors(tmp_path):
    """Plain safetensors (metadata included) read through the header parser."""
    t = {"a": torch.randn(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)}
    save_file(t, str(tmp_path / SINGLE), metadata={"format": "pt"})
    assert set(read_header(tmp_path / SINGLE)) == {"a", "b"}  # __metadata__ dropped
    _assert_same(HFCheckpoint(tmp_path), t)


def test_sharded_roundtrip(sharded):
    t = _tensors()
    index = json.loads((sharded / INDEX).read_text())
    wm = index["weight_map"]
    assert sorted(wm) == sorted(t) and list(wm) == sorted(wm)
    assert sorted(set(wm.values())) == _shard_names(sharded)
    assert SINGLE not in _shard_names(sharded)
    assert index["metadata"]["total_size"] == sum((sharded / f).stat().st_size for f in set(wm.values()))
    _assert_same(HFCheckpoint(sharded), t)


def test_sharded_reader_opens_only_the_shards_it_reads(sharded):
    ckpt = HFCheckpoint(sharded)
    ckpt.get("model.norm.weight")
    assert len(ckpt._open) == 1


def test_missing_tensor_and_missing_files_are_named(tmp_path, sharded):
    with pytest.raises(CheckpointError, match="model.nope.*not found"):
        HFCheckpoint(sharded).get("model.nope")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}: no {SINGLE} or {INDEX}")):
        HFCheckpoint(tmp_path)
    (sharded / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        HFCheckpoint(sharded).config()
    (sharded / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(sharded / "config.json"))):
        HFCheckpoint(sharded).config()


# -- bad indexes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shard", ["../x.safetensors", "sub/../../x.safetensors", "ABSOLUTE"])
def test_index_shard_outside_directory(tmp_path, shard):
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))  # exists, but outside
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "x.safetensors")
    index = _index(d, {"a": shard})
    with pytest.raises(CheckpointError) as ei:
        HFCheckpoint(d)
    msg = str(ei.value)
    assert str(index) in msg and shard in msg and "outside" in msg


def test_index_shard_symlinked_outside_directory(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    (d / "model-00001.safetensors").symlink_to(tmp_path / "x.safetensors")
    _index(d, {"a": "model-00001.safetensors"})
    with pytest.raises(CheckpointError, match="outside"):
        HFCheckpoint(d)


def test_index_names_missing_shard(sharded):
    wm = json.loads((sharded / INDEX).read_text())["weight_map"]
    wm["model.norm.weight"] = "model-00099-of-00099.safetensors"
    index = _index(sharded, wm)
    with pytest.raises(CheckpointError) as ei:
        HFCheckpoint(sharded)
    msg = str(ei.value)
    assert str(index) in msg and "model-00099-of-00099.safetensors" in msg
    assert "model.norm.weight" in msg and "does not exist" in msg


def test_tensor_in_two_shards(tmp_path):
    save_file({"a": torch.ones(2), "b": torch.ones(3)}, str(tmp_path / "s1.safetensors"))
    save_file({"a": torch.zeros(2), "c": torch.ones(3)}, str(tmp_path / "s2.safetensors"))
    _index(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"})
    with pytest.raises(CheckpointError) as ei:
        HFCheckpoint(tmp_path)
    msg = str(ei.value)
    assert "tensor a " in msg and "s1.safetensors" in msg and "s2.safetensors" in msg


def test_index_lists_tensor_absent_from_its_shard(sharded):
    wm = json.loads((sharded / INDEX).read_text())["weight_map"]
    wm["model.ghost.weight"] = wm["model.norm.weight"]
    index = _index(sharded, wm)
    with pytest.raises(CheckpointError) as ei:
        HFCheckpoint(sharded)
    assert str(index) in str(ei.value) and "model.ghost.weight" in str(ei.value)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"metadata": {}})])
def test_invalid_index(sharded, text):
    (sharded / INDEX).write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(str(sharded / INDEX))):
        HFCheckpoint(sharded)


# -- bad safetensors files -------------------------------------------------------------------------
@pytest.fixture
def single(tmp_path) -> Path:
    save_hf_checkpoint(_tensors().items(), CONFIG, tmp_path / "single")
    return tmp_path / "single" / SINGLE


@pytest.mark.parametrize("keep", ["data", "header", "length"])
def test_truncated_file(single, keep):
    raw = single.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cut = {"data": len(raw) - 7, "header": 8 + n // 2, "length": 5}[keep]
    single.write_bytes(raw[:cut])
    with pytest.raises(CheckpointError) as ei:
        HFCheckpoint(single.parent)
    assert str(single) in str(ei.value) and "truncated" in str(ei.value)


def test_truncated_shard_named(sharded):
    shard = sharded / _shard_names(sharded)[1]
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=re.escape(f"{shard}: truncated")):
        HFCheckpoint(sharded)


def test_empty_file(single):
    single.write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(str(single))):
        HFCheckpoint(single.parent)


@pytest.mark.parametrize("header", [b"{this is not json}", b"\xff\xfe\x00garbage", b'{"a": '])
def test_corrupt_header(tmp_path, header):
    f = _raw_safetensors(tmp_path / SINGLE, header, b"\0" * 64)
    with pytest.raises(CheckpointError) as ei:
        HFCheckpoint(tmp_path)
    assert str(f) in str(ei.value) and "corrupt" in str(ei.value)


def test_unsupported_dtype_named(tmp_path):
    h = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    f = _raw_safetensors(tmp_path / SINGLE, h, b"\0" * 8)
    with pytest.raises(CheckpointError) as ei:
        HFCheckpoint(tmp_path)
    assert str(f) in str(ei.value) and "tensor w " in str(ei.value) and "C64" in str(ei.value)


@pytest.mark.parametrize("header", [b"[1, 2]", b'{"a": 5}', b'{"a": {"dtype": "F32", "shape": [2]}}'])
def test_structurally_invalid_header(tmp_path, header):
    f = _raw_safetensors(tmp_path / SINGLE, header, b"\0" * 8)
    with pytest.raises(CheckpointError, match=re.escape(str(f))):
        HFCheckpoint(tmp_path)


def test_header_sizes_inconsistent_with_shape(tmp_path):
    h = json.dumps({"w": {"dtype": "F32", "shape": [10], "data_offsets": [0, 8]}}).encode()
    f = _raw_safetensors(tmp_path / SINGLE, h, b"\0" * 8)
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + ".*tensor w"):
        HFCheckpoint(tmp_path).get("w")


# -- writing -----------------------------------------------------------------------------------------
def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"

    def tensors():
        for i, (name, t) in enumerate(_tensors().items()):
            if i == 4:  # after some shards were flushed
                raise RuntimeError("export blew up")
            yield name, t

    with pytest.raises(RuntimeError, match="export blew up"):
        save_hf_checkpoint(tensors(), CONFIG, out, max_shard_bytes=100)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_duplicate_tensor_rejected_and_nothing_left(tmp_path):
    out = tmp_path / "out"
    t = list(_tensors().items())
    with pytest.raises(ValueError, match=f"tensor {t[0][0]} twice"):
        save_hf_checkpoint(t + t[:1], CONFIG, out, max_shard_bytes=100)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_existing_output(tmp_path, sharded):
    # the old output is sharded with an index; the new one is one file: no stale shard survives
    t = {"x": torch.arange(6.0)}
    out = save_hf_checkpoint(t.items(), {"model_type": "new"}, sharded, overwrite=True)
    assert out == sharded
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.json", SINGLE]
    _assert_same(HFCheckpoint(out), t)
    assert HFCheckpoint(out).config() == {"model_type": "new"}
    assert _leftovers(tmp_path, out) == []


def test_failed_overwrite_keeps_the_old_output(tmp_path, sharded):
    before = {p.name: p.read_bytes() for p in sharded.iterdir()}

    def tensors():
        yield "x", torch.ones(2)
        raise KeyError("boom")

    with pytest.raises(KeyError):
        save_hf_checkpoint(tensors(), CONFIG, sharded, overwrite=True)
    assert {p.name: p.read_bytes() for p in sharded.iterdir()} == before
    assert _leftovers(tmp_path, sharded) == []


def test_source_files_copied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "special_tokens_map.json", "chat_template.jinja"):
        (src / name).write_text(f"content of {name}")
    (src / "notes.txt").write_text("not copied")
    (src / "config.json").write_text('{"model_type": "old"}')
    out = save_hf_checkpoint(_tensors().items(), CONFIG, tmp_path / "out", source_dir=src)
    for name in COPIED_FILES:
        assert (out / name).exists() == (src / name).exists(), name
        if (src / name).exists():
            assert (out / name).read_text() == f"content of {name}"
    assert not (out / "notes.txt").exists()
    assert json.loads((out / "config.json").read_text()) == CONFIG  # the new config, not the source's


def test_overwrite_source_in_place(tmp_path):
    """Exporting over an earlier export that the tokenizer comes from keeps the tokenizer."""
    src, d = tmp_path / "src", tmp_path / "ckpt"
    src.mkdir()
    (src / "tokenizer.json").write_text("tok")
    save_hf_checkpoint(_tensors().items(), CONFIG, d, source_dir=src)
    save_hf_checkpoint(_tensors().items(), CONFIG, d, source_dir=d, overwrite=True)
    assert (d / "tokenizer.json").read_text() == "tok"
    _assert_same(HFCheckpoint(d), _tensors())
    assert _leftovers(tmp_path, d) == []


def test_creates_missing_parents(tmp_path):
    out = save_hf_checkpoint(_tensors().items(), CONFIG, tmp_path / "a" / "b" / "out")
    _assert_same(HFCheckpoint(out), _tensors())


def test_convert_compare_names_what_differs(tmp_path, capsys):
    """`mbridge convert compare`: 0 for bit-identical checkpoints, 1 naming a changed value, a
    changed dtype and a tensor only one side stores; float8 codes compared as bytes."""
    from bridges.cli import main

    t = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.weight": torch.ones(4).to(torch.float8_e4m3fn),
         "c.bias": torch.zeros(3, dtype=torch.bfloat16)}
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    save_file(t, tmp_path / "x" / SINGLE)
    save_file({k: v.clone() for k, v in t.items()}, tmp_path / "y" / SINGLE)
    assert main(["convert", "compare", str(tmp_path / "x"), str(tmp_path / "y")]) == 0
    assert "3 tensors, all bit-exact" in capsys.readouterr().out
    changed = {**t, "a.weight": t["a.weight"] + torch.tensor([[0, 0, 1e-3], [0, 0, 0]]),
               "c.bias": t["c.bias"].float(), "d.weight": torch.ones(1)}
    (tmp_path / "z").mkdir()
    save_file(changed, tmp_path / "z" / SINGLE)
    assert main(["convert", "compare", str(tmp_path / "x"), str(tmp_path / "z")]) == 1
    err = capsys.readouterr().err
    assert "a.weight: values differ (max abs difference 0.001)" in err
    assert "c.bias: torch.bfloat16 (3,) vs torch.float32 (3,)" in err and "only in" in err and "d.weight" in err
