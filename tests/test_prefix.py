"""A dense bridge's model held under a prefix (as a VLM holds its language model) converts under
PP2 and VPP2 with global layer numbers: every layer found, roundtrip bit-exact, logits = HF's."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conformance.checks import rel_err
from conformance.forward import hf_logits
from conformance.toy import load_hf_model


@pytest.fixture(scope="module")
def toys(conformance, spec, tmp_path_factory):
    toy = conformance.checkpoint(spec("Qwen/Qwen3-0.6B"))
    held = tmp_path_factory.mktemp("held")
    t = load_file(f"{toy}/model.safetensors")
    save_file({("model.language_model." + n[6:] if n.startswith("model.") else n): v for n, v in t.items()},
              str(held / "model.safetensors"), metadata={"format": "pt"})
    (held / "config.json").write_text(json.dumps(json.loads(open(f"{toy}/config.json").read())))
    return toy, str(held), {("model.language_model." + n[6:] if n.startswith("model.") else n): v
                            for n, v in t.items()}


@pytest.mark.parametrize("layout", ["pp2", "vpp2"])
def test_prefixed_model_converts_with_global_layer_numbers(conformance, toys, layout):
    toy, held, tensors = toys
    res = conformance.pool.run("tests.prefix_tasks:held_case", toy_dir=toy, held_dir=held, layout=layout)
    layers = int(json.loads(open(f"{toy}/config.json").read())["num_hidden_layers"])
    # each stage's layers carry their global numbers: together every layer, once
    seen = {}
    for r in res:
        for n in r["names"]:
            if n.startswith("language_model.decoder.layers.") and n.endswith("input_layernorm.weight"):
                seen.setdefault(int(n.split(".")[3]), set()).add(r["stage"])
    assert sorted(seen) == list(range(layers)) and all(len(s) == 1 for s in seen.values()), seen
    assert all(r["same_as_plain"] for r in res)
    exported = res[0]["exported"]
    assert sorted(exported) == sorted(tensors)
    assert all(torch.equal(exported[n], tensors[n]) and exported[n].dtype == tensors[n].dtype for n in tensors)
    last = [r for r in res if r["logits"] is not None]
    ref = hf_logits(load_hf_model(toy, torch.float32), res[0]["ids"])
    assert last and all(rel_err(ref, r["logits"]) <= 1e-5 for r in last), [rel_err(ref, r["logits"]) for r in last]


def test_renaming_reaches_every_mapping(conformance, toys):
    from bridges import AutoBridge
    from tests.prefix_tasks import held_bridge

    toy, _, tensors = toys
    plain = AutoBridge.from_hf_pretrained(toy)
    bridge = held_bridge(type(plain))(plain.hf_config)
    rows = bridge.table_rows()
    assert all(meg.startswith("language_model.") for meg, _, _ in rows)
    assert {n for _, _, hf in rows for n in hf.values()} == set(tensors)
