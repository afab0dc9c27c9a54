"""Synthetic full-size HF checkpoints: published shapes, random bf16 values, sharded safetensors.

No transformers model is instantiated: the tensor names come from the bridge's mapping table
(``AutoBridge.from_hf_config(cfg).expected_hf_names()``), the shapes from the config, and the
tensors are allocated and written shard by shard, so memory stays near one shard.

    .venv/bin/python benchmarks/make_checkpoint.py meta-llama/Llama-3.2-1B OUT_DIR [--layers N]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "fixtures" / "configs"
INDEX = "model.safetensors.index.json"


def load_config(model: str, layers: int | None = None) -> dict:
    cfg = json.loads((CONFIGS / model / "config.json").read_text())
    if layers is not None:
        cfg["num_hidden_layers"] = layers
        if "max_window_layers" in cfg:
            cfg["max_window_layers"] = min(cfg["max_window_layers"], layers)
    return cfg


def hf_shape(name: str, cfg: dict) -> tuple[int, ...]:
    """Published shape of one HF tensor of a GPT-style decoder, from the config."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    d = cfg.get("head_dim") or h // heads
    table = {
        "model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h),
        "model.norm.weight": (h,),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (heads * d, h), "self_attn.k_proj.weight": (kv * d, h),
        "self_attn.v_proj.weight": (kv * d, h), "self_attn.o_proj.weight": (h, heads * d),
        "self_attn.q_proj.bias": (heads * d,), "self_attn.k_proj.bias": (kv * d,),
        "self_attn.v_proj.bias": (kv * d,),
        "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }
    if "num_experts" in cfg:  # MoE (Qwen-MoE names): per-expert 2-D tensors, router [E, h]
        e_inter = cfg["moe_intermediate_size"]
        table.update({"mlp.gate.weight": (cfg["num_experts"], h),
                      "mlp.experts.gate_proj.weight": (e_inter, h),
                      "mlp.experts.up_proj.weight": (e_inter, h),
                      "mlp.experts.down_proj.weight": (h, e_inter)})
    key = re.sub(r"^model\.layers\.\d+\.", "", name)
    key = re.sub(r"^mlp\.experts\.\d+\.", "mlp.experts.", key)
    if key not in table:
        raise KeyError(f"no shape rule for HF tensor {name}")
    return table[key]


def _order(name: str):
    """HF checkpoint order: embedding, layers in order, final norm, lm_head."""
    m = re.match(r"model\.layers\.(\d+)\.(?:mlp\.experts\.(\d+)\.)?", name)
    if m:  # experts by number, as transformers saves them
        return (1, int(m.group(1)), int(m.group(2) or -1), name)
    return (0 if "embed" in name else 2 if name.startswith("model.") else 3, 0, 0, name)


def tensor_plan(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    from bridges import AutoBridge

    names = AutoBridge.from_hf_config(dict(cfg)).expected_hf_names()
    return [(n, hf_shape(n, cfg)) for n in sorted(names, key=_order)]


def make_checkpoint(cfg: dict, out: Path, shard_bytes: int = 2 * 2**30, seed: int = 0) -> dict:
    """Write ``out``/config.json + sharded model-XXXXX-of-YYYYY.safetensors + index.
    Returns a summary (tensors, bytes, largest tensor, seconds)."""
    import torch
    from safetensors.torch import save_file

    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(cfg)
    itemsize = 2  # bf16
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in plan:
        nbytes = itemsize
        for s in shape:
            nbytes *= s
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    # Weights are cut from a 64 MiB block of N(0, 0.02) values at a random offset per tensor:
    # random-looking, distinct per tensor, and several times faster than drawing every value
    # (torch's normal_ on CPU runs at about 0.2 GB/s; a copy at memory speed).
    block = torch.empty(2**25, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            x = torch.empty(shape, dtype=torch.bfloat16)
            if name.endswith("norm.weight"):  # RMSNorm gains near 1, as trained models have
                x.normal_(1.0, 0.05, generator=gen)
            else:
                _fill(x.view(-1), block, int(torch.randint(len(block), (), generator=gen)))
            tensors[name] = x
            weight_map[name] = fname
            total += x.numel() * itemsize
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    largest = max(plan, key=lambda p: _numel(p[1]))
    return {"tensors": len(plan), "bytes": total, "shards": len(shards),
            "largest_tensor": largest[0], "largest_bytes": _numel(largest[1]) * itemsize,
            "seconds": time.perf_counter() - t}


def _fill(flat, block, start: int) -> None:
    """``flat`` <- ``block`` repeated, starting at ``start``."""
    pos = 0
    while pos < flat.numel():
        take = min(flat.numel() - pos, len(block) - start)
        flat[pos:pos + take] = block[start:start + take]
        pos, start = pos + take, 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a config under fixtures/configs, e.g. Qwen/Qwen3-8B")
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    ap.add_argument("--shard-gib", type=float, default=2.0)
    a = ap.parse_args()
    info = make_checkpoint(load_config(a.model, a.layers), Path(a.out), int(a.shard_gib * 2**30))
    json.dump(info, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
