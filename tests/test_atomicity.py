"""Atomicity and determinism of the HF export (bridges.core.hf_io.save_hf_checkpoint and
Bridge.save_hf_pretrained).

- A writer killed with SIGKILL mid-write leaves nothing at the target path (and a previous
  output there stays byte-for-byte whole). Its temporary sibling ``.<name>.tmp-<host>-<pid>-*``
  survives the kill (nothing runs in a killed process); the next save to the same target
  removes it, and succeeds.
- The same export twice, in the same or another process, gives byte-identical files.

The writer is ``python tests/fault_tasks.py export``: deterministic tensors, one layer every
50 ms, two layers per shard, so the test can kill it with shards already on disk.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from bridges.core import outdir
from bridges.core.hf_io import INDEX, SINGLE, HFCheckpoint, save_hf_checkpoint
from tests.fault_tasks import EXPORT_CONFIG, export, export_tensors

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = ROOT / "fixtures/configs/Qwen/Qwen3-8B/config.json"
N_SHARDS = 12  # what export() writes: 24 layers, two per shard


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _siblings(out: Path) -> list[str]:
    """Temporary siblings of ``out`` (a killed writer's lock file is not one: its flock died
    with the writer, and the next writer removes the file; test_outputs.py checks that)."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}.") and p.name != f".{out.name}.lock")


def _writer(out: Path, seed: int = 0, delay_s: float = 0.05) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "tests/fault_tasks.py"), "export", str(out),
                             str(seed), str(delay_s)],
                            env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_mid_write(proc: subprocess.Popen, out: Path, shards: int = 2, limit: float = 30) -> Path:
    """SIGKILL the writer once its temporary directory holds ``shards`` shard files."""
    deadline = time.monotonic() + limit
    while True:
        tmps = list(out.parent.glob(f".{out.name}.tmp-*"))
        if tmps and len(list(tmps[0].glob("*.safetensors"))) >= shards:
            break
        if proc.poll() is not None:
            pytest.fail(f"writer exited ({proc.returncode}) before it was killed: "
                        f"{proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("writer wrote no shard in time")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    return tmps[0]


def _assert_export(out: Path, seed: int = 0) -> None:
    ckpt = HFCheckpoint(out)
    expected = dict(export_tensors(seed))
    assert ckpt.names() == sorted(expected)
    assert all(torch.equal(ckpt.get(n), t) for n, t in expected.items())
    assert json.loads((out / "config.json").read_text()) == EXPORT_CONFIG


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _host() -> str:
    return outdir.host()


# -- SIGKILL mid-write -----------------------------------------------------------------------------
def test_sigkill_mid_write_leaves_no_checkpoint_and_rerun_cleans_up(tmp_path):
    out = tmp_path / "export"
    proc = _writer(out)
    tmp = _kill_mid_write(proc, out)
    assert not out.exists()  # nothing at the target
    # the killed writer's temporary sibling survives (a killed process cleans nothing up),
    # holding part of the shards; its name says whose it was
    assert tmp.name.startswith(f".export.tmp-{_host()}-{proc.pid}-")
    assert 2 <= len(list(tmp.glob("*.safetensors"))) < N_SHARDS
    assert _siblings(out) == [tmp.name]
    # the re-run (another process) removes it and succeeds
    rerun = _writer(out, delay_s=0)
    assert rerun.wait(60) == 0, rerun.communicate()[1][-2000:]
    assert _siblings(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    _assert_export(out)
    assert len(json.loads((out / INDEX).read_text())["weight_map"]) == 48
    # ... and is byte-identical to the same export made in this process
    export(str(tmp_path / "again"))
    assert _files(tmp_path / "again") == _files(out)
    assert {"config.json", INDEX} <= set(_files(out)) and len(_files(out)) == N_SHARDS + 3  # + marker


def test_sigkill_during_overwrite_keeps_the_previous_output(tmp_path):
    out = tmp_path / "export"
    export(str(out), seed=1)
    before = _files(out)
    proc = _writer(out, seed=0)
    _kill_mid_write(proc, out, shards=3)
    assert _files(out) == before  # the previous export, whole
    _assert_export(out, seed=1)
    export(str(out), seed=0)  # the re-run, in this process
    assert _siblings(out) == []
    _assert_export(out, seed=0)


# -- stale siblings ----------------------------------------------------------------------------------
def test_stale_siblings_of_dead_writers_are_removed_and_others_kept(tmp_path):
    out = tmp_path / "export"
    dead, host = _dead_pid(), _host()
    stale = [f".export.tmp-{host}-{dead}-abc123_x", f".export.old-{host}-{dead}"]
    kept = [f".export.tmp-{host}-{os.getpid()}-livewrtr",  # a live writer (this process)
            f".export.tmp-{host}-{os.getppid()}-livewrtr",
            f".export.tmp-otherhost-{dead}-abc123_x",  # another host's, on a shared fs
            f".export.tmp-{host}x-{dead}-abc123_x",
            f".export.tmp-{dead}-abc123_x",  # not of our naming scheme
            f".export.old-{host}-{dead}-extra",
            f".exported.tmp-{host}-{dead}-abc123_x",  # another target's
            ".other.tmp-x", "export.tmp-1-2"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model-00001.safetensors").write_bytes(b"partial")
    (tmp_path / f".export.tmp-{host}-{dead}-a_file").write_text("a file, not a dir")
    kept.append(f".export.tmp-{host}-{dead}-a_file")
    export(str(out))
    _assert_export(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["export"])


def test_swap_cut_short_is_undone(tmp_path):
    """A writer killed between its two renames (old output moved aside, new one not yet in
    place) leaves ``.<name>.old-<host>-<pid>`` and no target: the next save puts the old output
    back first (so a failing re-run still leaves the old output), then replaces it."""
    out = tmp_path / "export"
    export(str(out), seed=1)
    before = _files(out)
    moved = tmp_path / f".export.old-{_host()}-{_dead_pid()}"
    out.rename(moved)

    def failing():
        yield "x", torch.ones(2)
        raise RuntimeError("export blew up")

    with pytest.raises(RuntimeError, match="blew up"):
        save_hf_checkpoint(failing(), EXPORT_CONFIG, out, overwrite=True)
    assert _files(out) == before and _siblings(out) == []
    # swap that completed but whose clean-up was cut short: the old copy is just removed
    (tmp_path / moved.name).mkdir()
    export(str(out), seed=0)
    assert _siblings(out) == []
    _assert_export(out, seed=0)


# -- determinism -----------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_same_tensors_same_bytes(tmp_path, data):
    """Any tensors (names, shapes, dtypes, shard size): two exports are byte-identical and
    read back exactly."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8]
    n = data.draw(st.integers(1, 6))
    names = data.draw(st.lists(st.from_regex(r"[a-z]{1,6}(\.[a-z0-9_]{1,6}){0,3}", fullmatch=True),
                               min_size=n, max_size=n, unique=True))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    tensors = {}
    for name in names:
        shape = data.draw(st.lists(st.integers(0, 7), max_size=3))
        dtype = data.draw(st.sampled_from(dtypes))
        tensors[name] = (torch.randn(shape, generator=g) * 50).to(dtype)
    shard = data.draw(st.integers(1, 600))
    case = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    a = save_hf_checkpoint(tensors.items(), {"model_type": "toy", "n": n}, case / "a", max_shard_bytes=shard)
    b = save_hf_checkpoint(tensors.items(), {"n": n, "model_type": "toy"}, case / "b", max_shard_bytes=shard)
    assert _files(a) == _files(b)
    ckpt = HFCheckpoint(a)
    assert ckpt.names() == sorted(tensors)
    assert all(torch.equal(ckpt.get(k), t) and ckpt.get(k).dtype == t.dtype for k, t in tensors.items())
    assert sorted(p.name for p in case.iterdir()) == ["a", "b"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from conformance.toy import make_toy_checkpoint, shrink_config

    root = tmp_path_factory.getbasetemp() / "mbridge-toys"  # shared with the other modules
    return make_toy_checkpoint(shrink_config(json.loads(QWEN3.read_text())), root)


@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 20_000])
def test_bridge_export_twice_is_byte_identical(toy, tmp_path, max_shard_bytes):
    from bridges.core.auto import AutoBridge

    bridge = AutoBridge.from_hf_pretrained(toy)
    chunks = bridge.to_megatron_provider().provide_distributed_model()
    bridge.load_hf_weights(chunks)
    for d in ("a", "b"):
        bridge.save_hf_pretrained(chunks, str(tmp_path / d), max_shard_bytes=max_shard_bytes)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    assert {"config.json", "generation_config.json"} <= set(a)
    assert (INDEX in a) == (max_shard_bytes == 20_000) and (SINGLE in a) != (INDEX in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
