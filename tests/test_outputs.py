"""Never destroy a user's data (docs/reliability.md, "Output directories" and "Faults while
writing"): --out must be new or empty, --overwrite replaces only an earlier mbridge output,
errors are one line, damaged Megatron checkpoints are named, and a full disk, a second writer
or Ctrl-C leave the previous output or the complete new one."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bridges.cli import main
from bridges.core.hf_io import save_hf_checkpoint
from bridges.core.outdir import MARKER, OutputBusyError, OutputExistsError, check_target, claim

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
MODEL = "Qwen/Qwen3-0.6B"


def _digest(d: Path) -> dict[str, str]:
    """Every file under ``d`` (hidden ones too) and its content hash."""
    return {str(p.relative_to(d)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _others(out: Path) -> list[str]:
    """What a writer left beside ``out``: temporary siblings, lock files."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _used_dir(d: Path) -> Path:
    (d / "iter_0000100").mkdir(parents=True)
    (d / "iter_0000100" / "weights.distcp").write_bytes(b"training state")
    (d / "precious.txt").write_text("keep me")
    return d


@pytest.fixture(scope="module")
def toy(conformance, spec) -> str:
    return conformance.checkpoint(spec(MODEL))


@pytest.fixture(scope="module")
def megatron(conformance, toy, tmp_path_factory) -> Path:
    """An mbridge import of the toy, saved at TP2."""
    out = tmp_path_factory.mktemp("outputs") / "mc"
    assert conformance.pool.run("tests.convert_tasks:cli",
                                argv=["convert", "import", "--hf", toy, "--out", str(out), "--tp", "2"]) == [0] * 4
    return out


def _cli(conformance, *argv) -> tuple[int, str]:
    """Run ``mbridge`` on every rank of the pool; every rank must agree; rank 0's status and stderr."""
    res = conformance.pool.run("tests.convert_tasks:cli_captured", argv=list(argv))
    assert len({rc for rc, _ in res}) == 1, res
    return res[0]


# -- refusals, before any work ------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["import", "export"])
def test_a_used_directory_is_refused_and_left_as_it_was(tmp_path, capsys, direction):
    out = _used_dir(tmp_path / "out")
    before = _digest(out)
    src = ["--hf", str(tmp_path / "nowhere")] if direction == "import" else ["--megatron", str(tmp_path / "nowhere")]
    for extra in ([], ["--overwrite"]):
        assert main(["convert", direction, *src, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mbridge: error: --out ") and "Traceback" not in err
        assert "iter_0000100/" in err and "precious.txt" in err
        assert ("no readable .mbridge-output.json" in err) == bool(extra)
    assert _digest(out) == before and _others(out) == []


def test_a_file_as_out_is_refused(tmp_path, capsys):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights")
    assert main(["convert", "import", "--hf", "x", "--out", str(f), "--overwrite"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert f.read_bytes() == b"weights"


def test_save_api_follows_the_same_rule(tmp_path):
    t = {"w": torch.arange(4.0)}
    empty = tmp_path / "empty"
    empty.mkdir()
    save_hf_checkpoint(t.items(), {"model_type": "toy"}, empty)  # an empty directory is fine
    out = save_hf_checkpoint(t.items(), {"model_type": "toy"}, tmp_path / "out")
    assert json.loads((out / MARKER).read_text())["entries"] == ["config.json", "model.safetensors"]
    with pytest.raises(OutputExistsError, match="not empty .*config.json.*--overwrite"):
        save_hf_checkpoint(t.items(), {"model_type": "toy"}, out)
    save_hf_checkpoint(t.items(), {"model_type": "again"}, out, overwrite=True)  # our own: replaced
    assert json.loads((out / "config.json").read_text()) == {"model_type": "again"}
    (out / "notes.md").write_text("mine")
    before = _digest(out)
    with pytest.raises(OutputExistsError, match="also holds notes.md"):
        save_hf_checkpoint(t.items(), {"model_type": "toy"}, out, overwrite=True)
    assert _digest(out) == before
    (out / "notes.md").unlink()
    (out / MARKER).write_text("{not json")
    with pytest.raises(OutputExistsError, match="no readable"):
        save_hf_checkpoint(t.items(), {"model_type": "toy"}, out, overwrite=True)


def test_overwrite_never_touches_a_training_runs_iterations(conformance, toy, tmp_path):
    out = tmp_path / "ckpts"
    argv = ["convert", "import", "--hf", toy, "--out", str(out)]
    assert _cli(conformance, *argv)[0] == 0
    assert json.loads((out / MARKER).read_text())["entries"] == [
        "iter_0000000/", "latest_checkpointed_iteration.txt", "mbridge.json"]
    assert _cli(conformance, *argv, "--overwrite")[0] == 0  # our own earlier output: replaced
    # a training run then saves its iteration 100 there (as Megatron-LM with --save ckpts)
    (out / "iter_0000100").mkdir()
    (out / "iter_0000100" / "__0_0.distcp").write_bytes(b"trained")
    (out / "latest_checkpointed_iteration.txt").write_text("100\n")
    before = _digest(out)
    rc, err = _cli(conformance, *argv, "--overwrite")
    assert rc == 2 and "also holds iter_0000100/" in err and err.count("mbridge: error:") == 1
    assert _digest(out) == before and _others(out) == []


def test_export_over_notes_is_refused(conformance, megatron, tmp_path):
    out = tmp_path / "hf"
    assert _cli(conformance, "convert", "export", "--megatron", str(megatron), "--out", str(out))[0] == 0
    (out / "notes.md").write_text("my notes")
    before = _digest(out)
    rc, err = _cli(conformance, "convert", "export", "--megatron", str(megatron), "--out", str(out), "--overwrite")
    assert rc == 2 and "also holds notes.md" in err
    assert _digest(out) == before


# -- damaged Megatron checkpoints --------------------------------------------------------------
def _damage(kind: str, ckpt: Path) -> str:
    """Break ``ckpt`` one way; return what the error must name."""
    it = ckpt / "iter_0000000"
    if kind == "missing shard":
        (it / "__0_0.distcp").unlink()
        return f"{it / '__0_0.distcp'}: missing"
    if kind == "truncated shard":
        os.truncate(it / "__1_0.distcp", 1000)
        return f"{it / '__1_0.distcp'}: truncated (1000 bytes"
    if kind == "missing .metadata":
        (it / ".metadata").unlink()
        return f"{it / '.metadata'}: not found"
    if kind == "corrupt .metadata":
        (it / ".metadata").write_bytes((it / ".metadata").read_bytes()[:300])
        return f"{it / '.metadata'}: unreadable"
    if kind == "tracker names an absent iteration":
        (ckpt / "latest_checkpointed_iteration.txt").write_text("7\n")
        return "names iteration 7, but"
    if kind == "garbage tracker":
        (ckpt / "latest_checkpointed_iteration.txt").write_text("<html>\n")
        return "expected an iteration number"
    if kind == "no tracker":
        (ckpt / "latest_checkpointed_iteration.txt").unlink()
        return "is not a Megatron checkpoint root"
    raise ValueError(kind)


KINDS = ["missing shard", "truncated shard", "missing .metadata", "corrupt .metadata",
         "tracker names an absent iteration", "garbage tracker", "no tracker"]


def test_damaged_checkpoints_are_named_and_nothing_is_written(conformance, megatron, tmp_path):
    for kind in KINDS:
        ckpt = tmp_path / kind.replace(" ", "_")
        shutil.copytree(megatron, ckpt)
        named = _damage(kind, ckpt)
        out = tmp_path / f"out_{ckpt.name}"
        rc, err = _cli(conformance, "convert", "export", "--megatron", str(ckpt), "--out", str(out), "--tp", "2")
        assert rc == 2, (kind, err)
        assert named in err and err.count("mbridge: error:") == 1 and "Traceback" not in err, (kind, err)
        assert not out.exists() and _others(out) == [], kind


def test_a_checkpoint_of_another_model_is_refused(conformance, spec, toy, megatron, tmp_path):
    # shapes differ: Llama-3.2-1B's toy read from the Qwen3 checkpoint
    other = conformance.checkpoint(spec("meta-llama/Llama-3.2-1B"))
    rc, err = _cli(conformance, "convert", "export", "--megatron", str(megatron), "--hf-source", other,
                   "--out", str(tmp_path / "hf"))
    assert rc == 2 and "saved for another model: " in err, err
    assert re.search(r"final_layernorm\.weight is \(\d+,\) there, this model has \(\d+,\)", err), err
    # same shapes, one block fewer: the Qwen3 toy declared a Llama (no QK norm) would load
    # every tensor it asks for, and drop the QK norms without a word
    llama = tmp_path / "llama"
    shutil.copytree(toy, llama)
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "model_type": "llama",
                                                   "architectures": ["LlamaForCausalLM"]}))
    from safetensors.torch import load_file, save_file

    t = load_file(str(llama / "model.safetensors"))
    save_file({k: v for k, v in t.items() if "_norm." not in k or "layernorm" in k},
              str(llama / "model.safetensors"), metadata={"format": "pt"})
    rc, err = _cli(conformance, "convert", "export", "--megatron", str(megatron), "--hf-source", str(llama),
                   "--out", str(tmp_path / "hf"))
    assert rc == 2 and "it holds tensors this model does not have" in err and "q_layernorm" in err, err
    assert not (tmp_path / "hf").exists()


# -- one line, once, under the relaunch ---------------------------------------------------------
def _run(argv, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bridges.cli", *argv], capture_output=True, text=True,
                          env=ENV, timeout=timeout, **kw)


def test_bad_config_is_one_line_once_across_ranks(toy, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(toy, bad)
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["num_attention_heads"]
    (bad / "config.json").write_text(json.dumps(cfg))
    r = _run(["convert", "import", "--hf", str(bad), "--out", str(tmp_path / "mc"), "--tp", "2"])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mbridge:")]
    assert lines == [f"mbridge: error: {bad / 'config.json'}: config field 'num_attention_heads' is "
                     f"required but missing"], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "mc").exists()
    r = _run(["--debug", "convert", "import", "--hf", str(bad), "--out", str(tmp_path / "mc")])
    assert r.returncode == 2 and "Traceback" in r.stderr and "ConfigError" in r.stderr


# -- faults while writing ----------------------------------------------------------------------
def _limit_file_size(nbytes: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


@pytest.mark.parametrize("direction", ["import", "export"])
def test_full_disk_keeps_the_previous_output(conformance, toy, megatron, tmp_path, direction):
    out = tmp_path / "out"
    argv = (["convert", "import", "--hf", toy] if direction == "import"
            else ["convert", "export", "--megatron", str(megatron)]) + ["--out", str(out)]
    assert _cli(conformance, *argv)[0] == 0  # the previous output
    before = _digest(out)
    r = _run([*argv, "--overwrite"], preexec_fn=_limit_file_size(200_000))  # shards are larger
    assert r.returncode == 1, r.stderr[-2000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("mbridge:")]
    assert len(err) == 1 and err[0].startswith(f"mbridge: error: ") and f"writing {out} failed" in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert _digest(out) == before and _others(out) == []


def _wait_for(path_glob: Path, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not list(path_glob.parent.glob(path_glob.name)):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_two_conversions_to_one_out_one_wins(toy, tmp_path, capsys):
    out = tmp_path / "mc"
    first = subprocess.Popen([sys.executable, "-m", "bridges.cli", "convert", "import", "--hf", toy,
                              "--out", str(out)], env=ENV, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / ".mc.lock", first)  # the first holds the lock: it is reading the model
    assert main(["convert", "import", "--hf", toy, "--out", str(out), "--overwrite"]) == 2
    assert "another mbridge process (pid " in capsys.readouterr().err
    assert first.wait(timeout=300) == 0, first.communicate()[1][-2000:]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "iter_0000000", "latest_checkpointed_iteration.txt",
                                                     "mbridge.json"]
    assert _others(out) == []  # the lock file is gone too


# The interrupted process stalls at a known point (an audit hook, loaded by sitecustomize from the
# environment) until the signal comes: on a loaded machine a toy conversion may otherwise finish
# before the test gets to send it.
_STALL = """
import os, sys, time
_at = os.environ.get("MBRIDGE_TEST_STALL")
_seen = []
def _stall():
    open(os.environ["MBRIDGE_TEST_STALL_FLAG"], "w").close()
    while True:
        time.sleep(0.05)
def _hook(event, args):
    if _seen == ["done"]:
        return
    if _at == "writing" and event == "os.rename":  # the publishing rename: the output is complete
        _seen[:] = ["done"]
        _stall()
    if _at == "reading" and event == "open" and isinstance(args[0], str):
        if args[0].endswith(".lock"):  # the lock is being taken; stall at the next file opened
            _seen[:] = ["lock"]
        elif _seen == ["lock"]:
            _seen[:] = ["done"]
            _stall()
if _at:
    sys.addaudithook(_hook)
"""


@pytest.mark.parametrize("when,tp", [("writing", "1"), ("reading", "2")])
def test_ctrl_c_keeps_the_previous_output(conformance, toy, tmp_path, when, tp):
    out = tmp_path / "mc"
    argv = ["convert", "import", "--hf", toy, "--out", str(out)]
    assert _cli(conformance, *argv)[0] == 0
    before = _digest(out)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(_STALL)
    flag = tmp_path / "stalled"
    env = {**ENV, "MBRIDGE_TEST_STALL": when, "MBRIDGE_TEST_STALL_FLAG": str(flag),
           "PYTHONPATH": os.pathsep.join([str(shim), *filter(None, [ENV.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, "-m", "bridges.cli", *argv, "--overwrite", "--tp", tp],
                            env=env, stderr=subprocess.PIPE, text=True)
    _wait_for(flag, proc, timeout=300)
    assert list(tmp_path.glob(".mc.tmp-*" if when == "writing" else ".mc.lock"))
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-2000:]
    assert "mbridge: interrupted" in err and "Traceback" not in err
    assert _digest(out) == before and _others(out) == []


# -- the lock ----------------------------------------------------------------------------------
def test_a_live_holder_blocks_and_a_dead_ones_lock_file_does_not(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / '.out.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid %d' % os.getpid()); print('held', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusyError, match=f"another mbridge process \\(pid {holder.pid}\\)"):
            with claim(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's file stays, its lock does not: the next writer proceeds and removes it
    assert (tmp_path / ".out.lock").exists()
    save_hf_checkpoint({"w": torch.ones(2)}.items(), {"model_type": "toy"}, out)
    assert _others(out) == []


def test_claim_is_reentrant_in_one_process(tmp_path):
    out = tmp_path / "out"
    with claim(out):
        with claim(out):
            check_target(out)
        assert (tmp_path / ".out.lock").exists()
        fd = os.open(tmp_path / ".out.lock", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # still held after the inner release
        finally:
            os.close(fd)
    assert not (tmp_path / ".out.lock").exists()


# -- the plugin's own writes -------------------------------------------------------------------
def test_plugin_report_path_that_is_a_directory_is_a_usage_error(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    (pytester.path / "reports").mkdir()
    (pytester.path / "reports" / "old.json").write_text("{}")
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--mbridge-model=Qwen/Qwen3-8B",
                                        "--mbridge-report=reports", "--co", timeout=300)
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--mbridge-report=reports: is a directory*"])
    assert [p.name for p in (pytester.path / "reports").iterdir()] == ["old.json"]


def test_plugin_writes_files_by_rename(tmp_path):
    from pytest_mbridge.plugin import _write_atomically

    out = tmp_path / "sub" / "report.json"
    _write_atomically(out, "one")
    _write_atomically(out, "two")
    assert out.read_text() == "two" and sorted(p.name for p in out.parent.iterdir()) == ["report.json"]
    from pytest_mbridge.snapshots import MbridgeSnapshot, _AtomicAmber

    assert MbridgeSnapshot.serializer_class is _AtomicAmber


# -- other bad input: one line, exit 2, nothing written ----------------------------------------
def _variant(toy: str, d: Path, config=None, drop: str | None = None) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copytree(toy, d)
    if config:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **config}))
    if drop:
        t = load_file(str(d / "model.safetensors"))
        save_file({k: v for k, v in t.items() if k != drop}, str(d / "model.safetensors"), metadata={"format": "pt"})
    return str(d)


@pytest.mark.parametrize("case", ["remote code", "bad layout", "missing tensor", "wrong shape"])
def test_bad_input_is_one_line_and_exit_2(conformance, toy, tmp_path, case):
    layer0 = "model.layers.0.self_attn.k_proj.weight"
    make, extra, named = {
        "remote code": (lambda: _variant(toy, tmp_path / "src", {"auto_map": {"AutoModelForCausalLM": "m.X"}}),
                        [], "field 'auto_map' asks for remote code"),
        "bad layout": (lambda: toy, ["--pp", "3"], "layout pp3: num_layers=4 does not divide by PP x VPP=3"),
        "missing tensor": (lambda: _variant(toy, tmp_path / "src", drop=layer0), [],
                           f"needs HF tensor(s) ['{layer0}']"),
        "wrong shape": (lambda: _variant(toy, tmp_path / "src", {"intermediate_size": 8 + json.loads(
            (Path(toy) / "config.json").read_text())["intermediate_size"]}), [], "gives shape"),
    }[case]
    src = make()
    out = tmp_path / "mc"
    rc, err = _cli(conformance, "convert", "import", "--hf", src, "--out", str(out), *extra)
    assert rc == 2 and named in err, err
    assert err.count("mbridge: error:") == 1 and "Traceback" not in err
    assert not out.exists() and _others(out) == []
