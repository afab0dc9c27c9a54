"""bridges.core.cpu_compat: every patch is needed (the CPU forward fails without it) and works.

Each patch is switched off alone with ``cpu_compat.patched(exclude={name})``; the model is a
tiny Megatron GPTModel built in this process (gloo, world size 1), except for the tied-embedding
patch, which only matters at PP > 1 and runs on two ranks of a ``RankPool``.
"""
from __future__ import annotations

import json
import threading
import traceback
from pathlib import Path

import pytest
import torch

from bridges.core import cpu_compat

ROOT = Path(__file__).resolve().parents[1]
QWEN3 = ROOT / "fixtures/configs/Qwen/Qwen3-8B/config.json"
MISTRAL = ROOT / "fixtures/configs/mistralai/Mistral-7B-v0.1/config.json"

# Every patch name must have a "fails without it" test below; a new patch without one fails
# test_every_patch_has_a_failing_without_test.
COVERED = {"current_device", "causal_mask", "window_mask", "rng_fork", "tied_embedding",
           "synchronize"}

needs_cpu = pytest.mark.skipif(torch.cuda.is_available(),
                               reason="the patches exist for machines without CUDA")


def _toy(path: Path, **kw) -> dict:
    from conformance.toy import shrink_config

    return shrink_config(json.loads(path.read_text()), **kw)


def _provider(path: Path, **kw):
    from bridges.core.auto import AutoBridge

    return AutoBridge.from_hf_config(_toy(path, **kw)).to_megatron_provider()


# -- worker for the two-rank test (imported by the pool's ranks as f"{__name__}:...") ---------
def tied_pp2_worker(exclude: list[str]) -> tuple[int, torch.Tensor]:
    """Build a tied-embedding toy at PP=2 with ``exclude`` patches off; return this rank's
    pipeline rank and its copy of the shared embedding / output weight."""
    from megatron.core import parallel_state as ps

    from bridges.core.parallel import init_model_parallel

    provider = _provider(QWEN3, tie=True)
    provider.pipeline_model_parallel_size = 2
    provider.finalize()
    init_model_parallel(provider.layout)
    with cpu_compat.patched(exclude=set(exclude)):
        (chunk,) = provider.provide_distributed_model()
    w = chunk.embedding.word_embeddings.weight if chunk.pre_process else chunk.output_layer.weight
    return ps.get_pipeline_model_parallel_rank(), w.detach().clone()


def dist_ckpt_worker(exclude: list[str], out: str) -> bool:
    """Save a TP=2 toy with megatron.core.dist_checkpointing, ``exclude`` patches off, through
    megatron-core's own staging of the tensors (``preload_tensors``, which synchronises CUDA), as
    a save outside ``save_megatron`` goes (``save_megatron`` stages each tensor as it writes it)."""
    import contextlib

    from bridges.core import megatron_ckpt

    own_staging, megatron_ckpt._host_copies_as_written = megatron_ckpt._host_copies_as_written, contextlib.nullcontext
    try:
        return _save_toy(exclude, out)
    finally:
        megatron_ckpt._host_copies_as_written = own_staging


def _save_toy(exclude: list[str], out: str) -> bool:
    from bridges.core.megatron_ckpt import save_megatron
    from bridges.core.parallel import init_model_parallel

    provider = _provider(QWEN3)
    provider.tensor_model_parallel_size = 2
    provider.finalize()
    init_model_parallel(provider.layout)
    with cpu_compat.patched(exclude=set(exclude)):
        chunks = provider.provide_distributed_model()
        save_megatron(chunks, out, {})
    return True


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool():
    """Two ranks; started in a thread at once so the forkserver's heavy preload overlaps the
    in-process tests (which use the other core)."""
    from conformance.runner import RankPool

    if torch.cuda.is_available():  # the tied-embedding tests are skipped there: start nothing
        yield lambda: pytest.skip("needs a machine without CUDA")
        return
    p = RankPool(2)
    started: list[BaseException] = []

    def start():
        try:
            p.start()
        except BaseException as e:  # surfaced by the first test that uses the pool
            started.append(e)

    t = threading.Thread(target=start, daemon=True)
    t.start()

    def ready():
        t.join()
        if started:
            raise started[0]
        return p

    yield ready
    t.join()
    p.close()


@pytest.fixture(scope="module")
def world1(pool):
    """Parallel state for one process (tp1pp1), whatever earlier test files left behind."""
    from bridges.core.parallel import Layout, current_layout, init_model_parallel
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or current_layout() != Layout():
        init_model_parallel(Layout())
    cpu_compat.ensure()
    yield


@pytest.fixture(scope="module")
def qwen3_provider(world1):
    return _provider(QWEN3)


@pytest.fixture(scope="module")
def mistral_provider(world1):
    p = _provider(MISTRAL)
    assert p.window_size == (7, 0), "the toy Mistral must use a sliding window"
    return p


def _forward(provider, seq: int = 12) -> torch.Tensor:
    # A fresh model each time: RotaryEmbedding.forward is lru_cached per instance, so a reused
    # model would not call torch.cuda.current_device() again.
    model = provider.provide(True, True).eval()
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, provider.vocab_size, (2, seq), generator=g)
    pos = torch.arange(seq).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(ids, pos, attention_mask=None)


def _tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


# -- bookkeeping ------------------------------------------------------------------------------
def test_every_patch_has_a_failing_without_test():
    names = [p.name for p in cpu_compat.PATCHES]
    assert len(names) == len(set(names)), f"duplicate patch names: {names}"
    assert set(names) == COVERED


def test_patch_targets_exist_in_installed_megatron():
    for p in cpu_compat.PATCHES:
        assert hasattr(p.target(), p.attr), f"{p.name}: {p.target()} has no {p.attr}"


def test_patched_switches_exactly_one_off_and_restores(world1):
    outside = sorted(cpu_compat._saved)  # whatever the process had: restored at the end
    with cpu_compat.patched() as everything:
        assert everything == sorted(COVERED)
        originals = {p.name: cpu_compat._saved[p.name][1] for p in cpu_compat.PATCHES}
        for p in cpu_compat.PATCHES:
            with cpu_compat.patched(exclude={p.name}) as active:
                assert active == sorted(COVERED - {p.name})
                assert getattr(p.target(), p.attr) is originals[p.name]
            assert getattr(p.target(), p.attr) is not originals[p.name]
        assert cpu_compat.apply() == everything  # idempotent, and everything is back
    assert sorted(cpu_compat._saved) == outside


def test_remove_restores_the_originals(world1):
    p = next(p for p in cpu_compat.PATCHES if p.name == "causal_mask")
    with cpu_compat.patched():
        original = cpu_compat._saved["causal_mask"][1]
        cpu_compat.remove({"causal_mask"})
        assert getattr(p.target(), p.attr) is original
        assert "causal_mask" not in cpu_compat.apply(exclude={"causal_mask"})
        assert "causal_mask" in cpu_compat.apply()


def test_ensure_is_a_noop_when_cuda_is_available(world1, monkeypatch):
    none = {p.name for p in cpu_compat.PATCHES}
    with cpu_compat.patched(exclude=none) as active:
        assert active == []
        originals = {p.name: getattr(p.target(), p.attr) for p in cpu_compat.PATCHES}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert not cpu_compat.needed()
        cpu_compat.ensure()
        assert cpu_compat._saved == {}
        for p in cpu_compat.PATCHES:
            assert getattr(p.target(), p.attr) is originals[p.name], p.name
        monkeypatch.undo()


def test_ensure_applies_everything_without_cuda(world1, monkeypatch):
    cpu_compat.remove()
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert cpu_compat.needed()
        cpu_compat.ensure()
        assert sorted(cpu_compat._saved) == sorted(COVERED)
    finally:
        monkeypatch.undo()
        cpu_compat.apply()


def test_ensure_keeps_what_patched_switched_off(world1, monkeypatch):
    """The provider calls ensure() at every build: inside ``patched`` (the tests that switch
    one patch off) it must not switch that patch back on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with cpu_compat.patched(exclude={"rng_fork"}) as active:
        cpu_compat.ensure()
        assert sorted(cpu_compat._saved) == active and "rng_fork" not in active
    assert sorted(cpu_compat._saved) == sorted(COVERED)


# -- the CPU replacements compute what Megatron's CUDA versions compute ------------------------
class _TorchWithoutCuda:
    """``torch`` as seen by megatron.core.transformer.utils, with device='cuda' dropped."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def ones(*args, device=None, **kwargs):
        return torch.ones(*args, **kwargs)


def test_masks_equal_megatrons_own(monkeypatch):
    from megatron.core.transformer import utils

    monkeypatch.setattr(utils, "torch", _TorchWithoutCuda())
    causal, window = cpu_compat._causal_mask(None), cpu_compat._window_mask(None)
    for sq in (1, 2, 7, 16):
        assert torch.equal(causal(sq), utils.get_default_causal_mask(sq))
    for sq, skv, ws in [(12, 12, (7, 0)), (5, 9, (2, 0)), (8, 8, (3, 2)), (16, 16, (0, 0))]:
        assert torch.equal(window(sq, skv, ws), utils.get_sliding_window_causal_mask(sq, skv, ws))


# -- each patch: the CPU forward fails without it ---------------------------------------------
@needs_cpu
def test_forward_runs_with_all_patches(qwen3_provider, mistral_provider):
    for provider in (qwen3_provider, mistral_provider):
        out = _forward(provider)
        assert out.shape[:2] == (2, 12) and torch.isfinite(out).all()


@needs_cpu
@pytest.mark.parametrize("name, where", [
    ("current_device", "rotary_pos_embedding"),
    ("causal_mask", "get_default_causal_mask"),
    ("rng_fork", "rng state model-parallel-rng is not added"),
])
def test_forward_fails_without(qwen3_provider, name, where):
    with cpu_compat.patched(exclude={name}):
        with pytest.raises(Exception) as ei:
            _forward(qwen3_provider)
    assert where in _tb(ei.value)
    _forward(qwen3_provider)  # and the patch is back


@needs_cpu
def test_sliding_window_forward_fails_without_window_mask(mistral_provider):
    with cpu_compat.patched(exclude={"window_mask"}):
        with pytest.raises(Exception) as ei:
            _forward(mistral_provider)
    assert "get_sliding_window_causal_mask" in _tb(ei.value)
    with cpu_compat.patched(exclude={"causal_mask"}):  # the windowed model needs only its own
        _forward(mistral_provider)


# -- tied embeddings at PP=2 (two ranks) --------------------------------------------------------
@needs_cpu
def test_tied_embedding_pp2_works_with_all_patches(pool):
    results = pool().run(f"{__name__}:tied_pp2_worker", timeout=180, exclude=[])
    (r0, emb), (r1, out) = results
    assert (r0, r1) == (0, 1)
    # the last stage's zero-filled copy was all-reduced with the first stage's embedding
    assert emb.abs().sum() > 0 and torch.equal(emb, out)


@needs_cpu
def test_tied_embedding_pp2_fails_without_patch(pool):
    from conformance.runner import RankError

    with pytest.raises(RankError) as ei:
        pool().run(f"{__name__}:tied_pp2_worker", timeout=180, exclude=["tied_embedding"])
    msg = str(ei.value)
    assert "cuda" in msg.lower() and "setup_embeddings_and_output_layer" in msg


@needs_cpu
def test_synchronize_patch_lets_dist_checkpointing_save(pool, tmp_path):
    from conformance.runner import RankError

    p = pool()
    with pytest.raises(RankError) as e:
        p.run(f"{__name__}:dist_ckpt_worker", exclude=["synchronize"], out=str(tmp_path / "a"), timeout=120)
    assert "synchronize" in str(e.value)
    assert not (tmp_path / "a").exists()  # the failed save left nothing at the target
    assert p.run(f"{__name__}:dist_ckpt_worker", exclude=[], out=str(tmp_path / "b"), timeout=120) == [True, True]
    assert (tmp_path / "b" / "iter_0000000" / "metadata.json").exists()


# -- the caller initialised Megatron's parallel state itself (as Megatron-LM scripts do) --------
USER_INIT = r'''
import json, sys
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from bridges import AutoBridge
from bridges.core.parallel import free_port
from conformance.toy import shrink_config

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
provider = AutoBridge.from_hf_config(shrink_config(json.load(open(sys.argv[1])))).to_megatron_provider()
provider.finalize()
models = [provider.provide_distributed_model()[0]] if sys.argv[2] == "distributed" else [provider.provide(True, True)]
ids = torch.randint(0, provider.vocab_size, (2, 12))
with torch.no_grad():
    out = models[0].eval()(ids, torch.arange(12).expand_as(ids), attention_mask=None)
print("LOGITS", tuple(out.shape), bool(torch.isfinite(out).all()))
'''


@needs_cpu
@pytest.mark.parametrize("build", ["distributed", "provide"])
def test_patches_apply_when_the_caller_initialised_parallel_state(tmp_path, build):
    """Megatron-LM scripts initialise torch.distributed and the parallel state before the
    bridge builds anything: the provider found the state ready, skipped init_model_parallel,
    and with it the CPU patches; the first forward failed with "Found no NVIDIA driver"."""
    import os
    import subprocess
    import sys

    script = tmp_path / "user_init.py"
    script.write_text(USER_INIT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, str(script), str(QWEN3), build], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LOGITS (2, 12, " in res.stdout and res.stdout.strip().endswith("True"), res.stdout
