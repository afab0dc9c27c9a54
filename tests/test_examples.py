"""examples/models/: one folder per supported family's flagship, equal to what
scripts/examples.py writes, each layout valid for the published config, and every script run
against a toy of that config: the conversion round trip bit-exact, generation, the training
launch (as a dry run: no Megatron-LM here) and the LoRA refusal. The scripts' `mbridge` is the
same CLI served from the session's warm rank pool (tests/example_client.py)."""
import importlib.util
import json
import os
import shlex
import socketserver
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.toy_tokenizer import save_with_tokenizer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("examples_gen", ROOT / "scripts" / "examples.py")
EX = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(EX)


def test_examples_are_current():
    want = EX.tree()
    have = {str(p.relative_to(EX.EXAMPLES)): p.read_text() for p in EX.EXAMPLES.rglob("*")
            if p.is_file() and p.parts[len(EX.EXAMPLES.parts)] != "common"}
    assert set(have) == set(want), f"to add {sorted(set(want) - set(have))}, to remove {sorted(set(have) - set(want))}: " \
                                   "regenerate with `python scripts/examples.py`"
    stale = [p for p in want if have[p] != want[p]]
    assert not stale, f"stale {stale}: regenerate with `python scripts/examples.py`"
    assert all(os.access(EX.EXAMPLES / p, os.X_OK) for p in want if p.endswith(".sh"))


def test_every_family_has_a_flagship_or_a_reason():
    from bridges.core.registry import registered
    from conformance.models import fixture_names, resolve

    shipped = {resolve(n).model_type for n in fixture_names()} & set(registered())
    covered = {resolve(m).model_type for m in EX.FLAGSHIPS}
    # a family's text-only sibling (gemma3_text, ministral3) counts through its flagship's family folder
    missing = shipped - covered - set(EX.WITHOUT) - {"gemma3_text", "ministral3", "qwen2_moe", "deepseek_v2"}
    assert not missing, f"no example for {sorted(missing)}: add a flagship to scripts/examples.py or say why not"


@pytest.mark.parametrize("model", sorted(EX.FLAGSHIPS))
def test_example_layout_divides_the_published_model(model):
    from bridges.core.auto import AutoBridge
    from bridges.core.parallel import Layout
    from conformance.models import resolve

    b = AutoBridge.from_hf_config(resolve(model).config)
    b.to_megatron_provider().set_layout(Layout(**EX.layout(model))).finalize()


@pytest.fixture(scope="module")
def pool_socket(conformance, tmp_path_factory):
    """A Unix socket serving `mbridge <argv>` from the warm pool (rank 0's output)."""
    path = str(tmp_path_factory.mktemp("sock") / "mbridge.sock")

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            argv = json.loads(self.rfile.readline())["argv"]
            res = conformance.pool.run("tests.convert_tasks:cli_output", argv=argv)
            rc = next((r[0] for r in res if r[0]), 0)
            self.wfile.write(json.dumps({"rc": rc, "out": res[0][1], "err": res[0][2]}).encode() + b"\n")

    server = socketserver.UnixStreamServer(path, Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield path
    server.shutdown()
    server.server_close()


def _toy_layout(config: dict) -> dict[str, str]:
    from bridges.core.parallel import Layout
    from conformance.session import fit_layout, is_moe

    lay = Layout.parse(fit_layout(config, "tp2ep2" if is_moe(config) else "tp2"))
    env = {"TP": lay.tp, "PP": lay.pp, "EP": lay.ep}
    return {k: str(v) for k, v in {**env, **({"ETP": lay.etp} if lay.etp else {})}.items()}


def _run(script: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("model", sorted(EX.FLAGSHIPS))
def test_every_example_script_runs_on_a_toy(model, conformance, pool_socket, tmp_path):
    from bridges.megatron_lm import args_namespace
    from conformance.models import resolve

    spec = resolve(model)
    quant = EX.FLAGSHIPS[model].get("quantized")
    src = conformance.quantized_checkpoint(spec, quant)[0] if quant else conformance.checkpoint(spec)
    toy = save_with_tokenizer(src, tmp_path / "toy")
    client = f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'tests' / 'example_client.py'))}"
    env = {"MBRIDGE_EXAMPLE_MODEL": str(toy), "MBRIDGE": client, "MBRIDGE_POOL_SOCKET": pool_socket,
           "WORK": str(tmp_path / "work"), "PROMPT": "c d e", "MAX_NEW_TOKENS": "4",
           **_toy_layout(json.loads((toy / "config.json").read_text()))}
    here = EX.EXAMPLES / model
    conv = _run(here / "conversion.sh", env)
    assert conv.returncode == 0, conv.stderr[-3000:]
    assert "all bit-exact" in conv.stdout, conv.stdout
    if quant:  # re-encoded in the published layout, not merely dequantized
        assert "--fp8" in conv.stderr
    gen = _run(here / "inference.sh", env)
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-3000:]
    if not (here / "slurm_sft.sh").exists():
        assert "No training scripts" in (here / "README.md").read_text()
        return
    sft = _run(here / "slurm_sft.sh", {**env, "MBRIDGE_EXAMPLE_DRY_RUN": "1"})
    assert sft.returncode == 0, sft.stderr[-3000:]
    cmd = shlex.split(sft.stdout)
    assert cmd[0] == "torchrun" and cmd[cmd.index("--nproc-per-node") + 1] == str(min(EX.training(model).gpus, 8)) \
        or EX.training(model).gpus > 8
    script = f"/path/to/Megatron-LM/{EX._bridge(model).megatron_lm_script}"  # pretrain_hybrid.py for a hybrid
    ns = args_namespace([a for a in cmd[cmd.index(script) + 1:]])
    r = EX.training(model)
    assert (ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size, ns.sft) == (r.tp, r.pp, True)
    assert ns.load == "/path/to/ckpt" and ns.tokenizer_model == str(toy) and ns.tokenizer_type == "SFTTokenizer"
    peft = _run(here / "slurm_peft.sh", env)
    assert peft.returncode == 3 and "no LoRA (PEFT) path" in peft.stderr
    assert json.loads(peft.stdout)["recipe"]["lora"]["rank"] > 0
