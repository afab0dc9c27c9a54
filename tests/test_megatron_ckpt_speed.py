"""The faster paths of the Megatron checkpoint save and load (issue #20): direct reads, the
in-place SwiGLU merge, the in-process save queue, the launcher that imports no torch."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import bridges.core.dist_read as dist_read
from bridges.core.dist_read import DirectReader, _byte_range, _Saved

ROOT = Path(__file__).resolve().parents[1]


def _writer(path):
    from torch.distributed.checkpoint import FileSystemWriter

    try:  # the format megatron-core writes: one torch.save archive per tensor
        from torch.distributed.checkpoint.filesystem import SerializationFormat

        return FileSystemWriter(str(path), serialization_format=SerializationFormat.TORCH_SAVE)
    except (ImportError, TypeError):
        return FileSystemWriter(str(path))


@pytest.mark.parametrize("staged", [False, True], ids=["into-place", "through-host-buffer"])
def test_direct_reader_loads_the_same_bytes_and_falls_back_where_it_must(tmp_path, monkeypatch, staged):
    g = torch.Generator().manual_seed(0)
    saved = {"a": torch.randn(64, 48, generator=g).to(torch.bfloat16),
             "b": torch.randn(32, 16, generator=g).t(),  # saved with its strides: read the usual way
             "c": torch.arange(10, dtype=torch.int64),
             "n": {"x": 3, "s": "text"}}  # a byte object
    dcp.save(saved, storage_writer=_writer(tmp_path), no_dist=True)
    direct = []
    real = dist_read._pread_into
    monkeypatch.setattr(dist_read, "_pread_into", lambda fd, t, at, n: (direct.append(t.shape), real(fd, t, at, n)))
    into = {"a": torch.zeros(64, 48, dtype=torch.bfloat16), "b": torch.zeros(16, 32),
            "c": torch.zeros(10, dtype=torch.int64), "n": {"x": 0, "s": ""}}
    reader = DirectReader(str(tmp_path))
    reader.stage_cpu = staged  # the path a GPU destination takes
    dcp.load(into, storage_reader=reader, no_dist=True)
    for k in ("a", "b", "c"):
        assert torch.equal(into[k], saved[k]), k
    assert into["n"] == saved["n"]
    assert sorted(direct) == sorted([torch.Size([64, 48]), torch.Size([10])])  # not the transposed one


def test_byte_range_is_one_range_or_none():
    s = _Saved(data_at=1000, dtype=torch.bfloat16, size=(4, 6), stride=(6, 1), offset=0)
    assert _byte_range(s, (0, 0), (4, 6)) == (1000, 48)
    assert _byte_range(s, (2, 0), (2, 6)) == (1000 + 2 * 6 * 2, 24)  # rows: contiguous
    assert _byte_range(s, (0, 3), (4, 3)) is None  # half of every row: not one range
    assert _byte_range(s, (1, 2), (1, 3)) == (1000 + (6 + 2) * 2, 6)  # within one row
    assert _byte_range(_Saved(0, torch.float32, (4, 6), (1, 4), 0), (0, 0), (4, 6)) is None  # strided


def test_swiglu_halves_that_are_the_parameter_merge_into_it():
    from bridges.core.megatron_ckpt import _cat_or_self

    whole = torch.arange(24.0).reshape(6, 4)
    merge = _cat_or_self(whole)
    assert merge(list(torch.chunk(whole, 2, dim=0))) is whole
    other = [torch.ones(3, 4), torch.zeros(3, 4)]  # loaded elsewhere: concatenated
    out = merge(other)
    assert out is not whole and torch.equal(out, torch.cat(other))
    swapped = list(reversed(torch.chunk(whole, 2, dim=0)))  # not in order: concatenated
    assert torch.equal(merge(swapped), torch.cat(swapped))


def test_megatron_swiglu_factories_use_the_merge_it_replaces():
    """If megatron-core renames its SwiGLU merge, the in-place merge silently stops applying:
    this fails first."""
    import inspect

    from megatron.core.transformer import mlp
    from megatron.core.transformer.utils import cat_with_oom_fallback  # noqa: F401

    assert "cat_with_oom_fallback," in inspect.getsource(mlp.apply_swiglu_sharded_factory)


def test_save_strategy_threads_and_in_process_queue(monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    from bridges.core.megatron_ckpt import _results_in_process, _save_strategy

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    monkeypatch.delenv("MBRIDGE_SAVE_THREADS", raising=False)
    assert _save_strategy().thread_count == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _save_strategy().thread_count == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("MBRIDGE_SAVE_THREADS", "2")
    assert _save_strategy().thread_count == 2
    monkeypatch.setattr(fa, "_results_queue", None)
    with _results_in_process():
        import queue

        assert isinstance(fa.get_write_results_queue(), queue.Queue)  # no Manager process
    assert fa._results_queue is None


def test_writer_stages_each_tensor_on_the_host_as_it_writes_it():
    """No tensor goes to host memory before the writer reaches it (a GPU model is not staged
    whole in host memory); megatron-core's own staging is back after the save."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync as W

    from bridges.core.megatron_ckpt import _host_copies_as_written, _OnHost

    moved = []

    class OnDevice:  # stands for a GPU tensor
        def __init__(self, t):
            self.t = t

        def to(self, device):
            moved.append(device)
            return self.t

    bucket = ("f.distcp", "key", ([("bytes", b"x")], [("a", OnDevice(torch.ones(2))), ("b", OnDevice(torch.zeros(3)))]))
    saved = W.__dict__["preload_tensors"]
    with _host_copies_as_written():
        (name, key, (data, tensors)), = W.preload_tensors([bucket], True)
    assert W.__dict__["preload_tensors"] is saved
    assert isinstance(tensors, _OnHost) and moved == [] and data == [("bytes", b"x")]
    for i, (item, t) in enumerate(tensors):
        assert moved == ["cpu"] * (i + 1) and isinstance(t, torch.Tensor)
    assert [item for item, _ in tensors] == ["a", "b"]


def test_save_starts_no_helper_process_and_last_use_saves_the_same(tmp_path):
    """A whole save in a fresh process: no multiprocessing child is left or started; with
    ``last_use`` the fused fc1 gives up its memory and the checkpoint loads the same weights."""
    code = f"""
import multiprocessing, torch
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
from bridges.core.megatron_ckpt import load_megatron
from tests.test_megatron_ckpt_speed import toy_chunks
chunks = toy_chunks()
before = {{k: v.detach().clone() for k, v in chunks[0].named_parameters()}}
save_megatron = __import__("bridges.core.megatron_ckpt", fromlist=["x"]).save_megatron
save_megatron(chunks, {str(tmp_path / 'ckpt')!r}, {{}}, last_use=True)
assert fa._results_queue is None, fa._results_queue
assert not multiprocessing.active_children(), multiprocessing.active_children()
released = [k for k, v in chunks[0].named_parameters() if v.numel() == 0]
assert released == ["decoder.layers.0.mlp.linear_fc1.weight"], released
fresh = toy_chunks()
for p in fresh[0].parameters():
    p.data.fill_(3.0)
load_megatron(fresh, {str(tmp_path / 'ckpt')!r})
for k, v in fresh[0].named_parameters():
    assert torch.equal(v, before[k]), k
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "MBRIDGE_SAVE_THREADS": "2"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "ckpt" / "iter_0000000").glob("*.distcp"))
    assert len(files) == min(2, os.cpu_count() or 1), files


def toy_chunks():
    """A one-layer toy Llama built as one process, random weights (used by the test above)."""
    from bridges import AutoBridge
    from bridges.core.parallel import init_distributed

    init_distributed()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 1, "vocab_size": 256, "max_position_embeddings": 128,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "torch_dtype": "float32"}
    bridge = AutoBridge.from_hf_config(cfg)
    provider = bridge.to_megatron_provider()
    provider.finalize()
    chunks = provider.provide_distributed_model()
    g = torch.Generator().manual_seed(0)
    for p in chunks[0].parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))
    return chunks


def test_launcher_imports_no_torch(tmp_path, monkeypatch):
    """`mbridge convert import --tp 2` started as one process relaunches itself before it
    imports torch (the ranks import it; the launcher would only add its import time)."""
    code = f"""
import sys
import bridges.launch
bridges.launch.relaunch = lambda argv, world, debug=False: print("relaunch", world) or 0
from bridges.cli import main
rc = main(["convert", "import", "--hf", "x", "--out", {str(tmp_path / 'out')!r}, "--tp", "2"])
print("torch imported:", "torch" in sys.modules)
sys.exit(rc)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**env, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "relaunch 2" in r.stdout and "torch imported: False" in r.stdout, r.stdout
