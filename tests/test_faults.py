"""Faults: a failing rank never hangs the job, and non-finite weights never pass silently.

Distributed faults, two ways:
- in the conformance rank pool (RankPool(2), forkserver ranks over gloo): a rank whose
  ``hf_weight`` hook raises in the middle of ``load_hf_weights`` fails the task with that rank's
  traceback, within the grace period, while the other rank waits in the ledger gather;
- as a real multi-process job (plain processes with RANK / WORLD_SIZE / MASTER_ADDR /
  MASTER_PORT, as torchrun sets them, gloo): a rank that raises before a collective makes every
  rank exit non-zero in about a second (gloo sees the closed connection); a rank that stalls
  makes the others exit non-zero after ``init_distributed(timeout_s)``.

NaN / Inf weights: ``load_hf_weights`` checks every tensor it reads (one isfinite of its sum),
warns naming them by default, and fails naming them with ``strict=True``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bridges.core.auto import AutoBridge
from bridges.core.bridge import NonFiniteWeightWarning, _nonfinite
from bridges.core.hf_io import SINGLE, HFCheckpoint
from bridges.core.ledger import CoverageError
from bridges.core.parallel import free_port
from conformance.runner import RankError, RankPool
from tests.fault_tasks import INJECTED

ROOT = Path(__file__).resolve().parents[1]

# plain-process scenarios: name -> (failing rank, mode, init_distributed timeout_s)
SCENARIOS = {"rank 1 raises": (1, "raise", 60.0), "rank 0 raises": (0, "raise", 60.0),
             "rank 1 stalls": (1, "stall", 3.0)}
# every rank of a raising job exits by itself within this, counted from launch: six processes
# importing torch at once on a loaded 2-core CI machine take most of it (alone: about 5 s); that
# the survivor saw its peer go rather than waiting out its timeout is checked on the
# collective's own clock ("collective ended after")
EXIT_BOUND_S = 150.0


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def pool():
    """Two pool ranks; started at once, so their imports overlap the tests that come first."""
    p = RankPool(2)
    p.start()
    yield p
    p.close()


@pytest.fixture(scope="module")
def chunks(toy):
    bridge = AutoBridge.from_hf_pretrained(toy)
    return bridge.to_megatron_provider().provide_distributed_model()


def _variant(toy: Path, dest: Path, tensors: dict) -> Path:
    shutil.copytree(toy, dest)
    save_file(tensors, str(dest / SINGLE), metadata={"format": "pt"})
    return dest


def _poison(toy_tensors: dict, changes: dict[str, tuple[tuple, float]],
            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Copy of the toy tensors with ``changes[name] = (index, value)`` applied."""
    t = dict(toy_tensors)
    for name, (idx, value) in changes.items():
        x = t[name].clone().to(dtype or t[name].dtype)
        x[idx] = value
        t[name] = x
    return t


# -- a real multi-process job -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jobs() -> dict[str, dict]:
    """Run every plain-process scenario at once (2 ranks each); per scenario and rank: exit
    code, seconds from launch to exit, output. A rank still alive when the others are out (or
    after EXIT_BOUND_S) is killed, as a launcher would, and reported with exit code None."""
    started = time.monotonic()
    procs = {}
    for name, (failing, mode, timeout_s) in SCENARIOS.items():
        port = free_port()
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), PYTHONPATH=str(ROOT))
            procs[name, rank] = subprocess.Popen(
                [sys.executable, str(ROOT / "tests/fault_tasks.py"), "collective", str(failing),
                 str(timeout_s), mode],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # every rank should exit by itself, except a stalled one (it never returns: it is killed
    # once the others are out)
    waited = {key for key in procs if not (SCENARIOS[key[0]][1] == "stall"
                                           and SCENARIOS[key[0]][0] == key[1])}
    done: dict[tuple, float] = {}
    while not waited <= set(done) and time.monotonic() - started < EXIT_BOUND_S:
        for key, p in procs.items():
            if key not in done and p.poll() is not None:
                done[key] = time.monotonic() - started
        time.sleep(0.02)
    out: dict[str, dict] = {name: {} for name in SCENARIOS}
    for (name, rank), p in procs.items():
        if (name, rank) not in done:
            p.kill()
        text = p.communicate(timeout=10)[0]
        out[name][rank] = dict(rc=p.returncode if (name, rank) in done else None,
                               seconds=done.get((name, rank)), output=text)
    return out


@pytest.mark.parametrize("scenario", ["rank 1 raises", "rank 0 raises"])
def test_plain_processes_a_raising_rank_fails_every_rank(jobs, scenario):
    failing = SCENARIOS[scenario][0]
    ranks = jobs[scenario]
    for rank, r in ranks.items():
        assert r["rc"] not in (None, 0), f"rank {rank}: {r}"
        assert r["seconds"] < EXIT_BOUND_S
    assert f"RuntimeError: injected failure on rank {failing} before the collective" \
        in ranks[failing]["output"]
    survivor = ranks[1 - failing]["output"]
    assert "Connection closed by peer" in survivor or "Connection reset" in survivor, survivor
    # the survivor did not wait for its timeout: it saw the failing rank go (how soon depends on
    # how fast the failing process exits: up to 15 s on a loaded 2-core machine)
    waited = float(re.search(r"collective ended after ([\d.]+) s", survivor).group(1))
    assert waited < SCENARIOS[scenario][2] - 1, survivor


def test_plain_processes_a_stalled_rank_times_the_others_out(jobs):
    failing, _, timeout_s = SCENARIOS["rank 1 stalls"]
    ranks = jobs["rank 1 stalls"]
    survivor = ranks[1 - failing]
    assert survivor["rc"] not in (None, 0), survivor
    assert "Timed out" in survivor["output"], survivor["output"]
    waited = float(re.search(r"collective ended after ([\d.]+) s", survivor["output"]).group(1))
    assert timeout_s - 0.5 <= waited <= timeout_s + 5, survivor["output"]
    assert ranks[failing]["rc"] is None  # still sleeping: the launcher (here, the test) kills it


# -- the rank pool --------------------------------------------------------------------------------------
def test_pool_rank_raising_mid_load_fails_the_task_naming_it(pool, toy):
    assert pool.run("tests.fault_tasks:rank_and_world", timeout=120) == [(0, 2), (1, 2)]
    tensor = "model.layers.2.mlp.down_proj.weight"
    t = time.monotonic()
    with pytest.raises(RankError) as ei:
        pool.run("tests.fault_tasks:load_raising_on", checkpoint=str(toy), rank=1, tensor=tensor,
                 timeout=60)
    took = time.monotonic() - t
    msg = str(ei.value)
    assert "--- rank 1 ---" in msg and INJECTED.format(rank=1, name=tensor) in msg
    assert "in load_hf_weights" in msg and "in hf_weight" in msg  # the traceback
    assert "ranks [0] did not finish after another rank failed" in msg  # stuck in the gather
    assert "--- rank 0 ---" not in msg
    assert took < 30, took
    # the pool was restarted: the next task runs
    assert pool.run("tests.fault_tasks:rank_and_world", timeout=120) == [(0, 2), (1, 2)]


def test_pool_nonfinite_tensor_on_one_rank_reported_on_every_rank(pool, toy, toy_tensors, tmp_path):
    """PP2: only rank 1 reads layer 3. Both ranks warn about it (the lists are gathered);
    with strict=True both raise the same CoverageError: no rank is left waiting."""
    name = "model.layers.3.mlp.up_proj.weight"
    d = _variant(toy, tmp_path / "nan", _poison(toy_tensors, {name: ((0, 0), float("nan"))}))
    seen = pool.run("tests.fault_tasks:load_collecting_warnings", checkpoint=str(d), pp=2,
                    timeout=120)
    assert len(seen) == 2
    for rank_warnings in seen:
        assert len(rank_warnings) == 1 and f"HF tensor {name} is not finite (1 NaN" in rank_warnings[0]
    t = time.monotonic()
    with pytest.raises(RankError) as ei:
        pool.run("tests.fault_tasks:load_collecting_warnings", checkpoint=str(d), pp=2,
                 strict=True, timeout=60)
    msg = str(ei.value)
    assert "--- rank 0 ---" in msg and "--- rank 1 ---" in msg and "did not finish" not in msg
    assert msg.count(f"HF tensor {name} is not finite") == 2 and msg.count("CoverageError") >= 2
    assert time.monotonic() - t < 30


# -- NaN / Inf, one process -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16],
                         ids=["float32", "bfloat16", "float16"])
def test_nonfinite_warns_by_default_and_fails_when_strict(toy, toy_tensors, chunks, tmp_path, dtype):
    bad = {"model.layers.1.self_attn.k_proj.weight": ((slice(0, 3), 0), float("nan")),  # fused QKV
           "model.norm.weight": ((5,), float("inf")),
           "model.embed_tokens.weight": ((7, 1), float("-inf"))}
    d = _variant(toy, tmp_path / "nonfinite", _poison(toy_tensors, bad, dtype))
    bridge = AutoBridge.from_hf_pretrained(d)
    with pytest.warns(NonFiniteWeightWarning) as rec:
        bridge.load_hf_weights(chunks)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert msg.startswith(f"{d}: 3 HF tensor(s) hold NaN/Inf") and "strict=True" in msg
    numel = {n: toy_tensors[n].numel() for n in bad}
    assert f"model.layers.1.self_attn.k_proj.weight is not finite (3 NaN, 0 Inf of " \
           f"{numel['model.layers.1.self_attn.k_proj.weight']} values)" in msg
    assert "model.norm.weight is not finite (0 NaN, 1 Inf of 64 values)" in msg
    assert "model.embed_tokens.weight is not finite (0 NaN, 1 Inf" in msg
    # loaded as they are
    assert torch.isnan(chunks[0].decoder.layers[1].self_attention.linear_qkv.weight).sum() == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWeightWarning)  # strict: an error, no warning
        with pytest.raises(CoverageError) as ei:
            bridge.load_hf_weights(chunks, strict=True)
    msg = str(ei.value)
    assert msg.startswith(f"import of {d} failed")
    for n in bad:
        assert f"HF tensor {n} is not finite" in msg
    AutoBridge.from_hf_pretrained(toy).load_hf_weights(chunks)  # restore for the other tests


def test_finite_checkpoint_is_silent(toy, chunks):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWeightWarning)
        AutoBridge.from_hf_pretrained(toy).load_hf_weights(chunks)
        AutoBridge.from_hf_pretrained(toy).load_hf_weights(chunks, strict=True)


def test_nonfinite_from_the_hf_weight_hook_is_caught(toy, chunks):
    """The check runs on what the hook returns (e.g. a dequantisation that overflows)."""
    base = AutoBridge.from_hf_pretrained(toy)

    class Overflowing(type(base)):
        def hf_weight(self, name, t):
            return t * float("inf") if name == "model.layers.0.mlp.gate_proj.weight" else t

    with pytest.raises(CoverageError, match=r"HF tensor model.layers.0.mlp.gate_proj.weight is "
                                            r"not finite \(\d+ NaN, \d+ Inf"):
        Overflowing(base.hf_config, base.checkpoint).load_hf_weights(chunks, strict=True)
    base.load_hf_weights(chunks)


def test_one_isfinite_per_parameter_loaded(toy, chunks, monkeypatch):
    """The check is cheap: one isfinite, on a scalar (the parameter's sum, right after the
    copy), per parameter loaded; never more than one per tensor read."""
    reads, checks = [], []
    real_get, real_isfinite = HFCheckpoint.get, torch.isfinite
    monkeypatch.setattr(HFCheckpoint, "get", lambda self, n: reads.append(n) or real_get(self, n))
    monkeypatch.setattr(torch, "isfinite", lambda t: checks.append(t.shape) or real_isfinite(t))
    AutoBridge.from_hf_pretrained(toy).load_hf_weights(chunks)
    assert len(checks) == sum(1 for c in chunks for _ in c.parameters()) > 30
    assert len(checks) <= len(reads)
    assert set(checks) == {torch.Size([])}


@pytest.mark.parametrize("t, says", [
    (torch.tensor([1.0, float("nan"), float("inf"), float("-inf")]), "1 NaN, 2 Inf of 4 values"),
    (torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn), "1 NaN, 0 Inf of 2 values"),
    (torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2), "0 NaN, 1 Inf of 2 values"),
    (torch.tensor([1 + 1j, complex("nan")]), "1 NaN, 0 Inf of 2 values"),
    (torch.tensor([1.0, 2.0]).to(torch.float8_e4m3fn), None),
    (torch.tensor([3, -1], dtype=torch.int8), None),
    (torch.tensor([True]), None),
    (torch.zeros(0), None),
    # finite values whose sum overflows: the exact check clears them
    (torch.tensor([60000.0, 60000.0]).half(), None),
    (torch.tensor([3e38, 3e38]).bfloat16(), None),
    (torch.tensor([3e38, 3e38, float("nan")]), "1 NaN, 0 Inf of 3 values"),
], ids=["f32_nan_inf", "f8e4m3_nan", "f8e5m2_inf", "complex_nan", "f8_finite", "int8", "bool",
        "empty", "f16_sum_overflows", "bf16_sum_overflows", "f32_sum_overflows_and_nan"])
def test_nonfinite_counts(t, says):
    assert _nonfinite(t) == says
