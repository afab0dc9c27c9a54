"""Toy models from real configs: same architecture and quirks, tiny sizes, random weights
that make every mapping bug visible.

Shrinking keeps: the GQA ratio (up to 8 query heads per KV head), rope type and parameters, tied/untied embeddings, biases,
QK norm, activation. It decouples head_dim from hidden/heads (hidden stays a multiple of the
heads: transformers requires it), makes the vocab odd (so TP
padding is exercised), keeps at least ``min_layers`` layers (>= pp * vpp), and re-randomises
every tensor, norms and biases included (at their init values of 1 and 0 swaps are invisible).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

TOY = dict(hidden_size=64, intermediate_size=96, head_dim=16, vocab_size=503, kv_heads=4,
           max_heads=16, max_per_group=8, sliding_window=8, experts=8, max_topk=4, moe_intermediate_size=32,
           shared_expert_intermediate_size=48)
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts")


def _read_config(path) -> dict:
    """config.json as transformers reads it (its tagged infinities decoded)."""
    from bridges.core.hf_io import HFCheckpoint

    return HFCheckpoint.read_config(path)


def shrink_config(config: dict[str, Any], max_tp: int = 4, min_layers: int = 4,
                  tie: bool | None = None) -> dict[str, Any]:
    """Toy config dict from a published config dict (pure function of its inputs)."""
    c = copy.deepcopy(config)
    heads = int(c["num_attention_heads"])
    kv = int(c.get("num_key_value_heads") or heads)
    # query heads per KV head: kept up to max_per_group (MQA models reach 71; 8 exercises the
    # grouped interleave the same way, and keeps the toy small)
    per = max(1, min(heads // max(kv, 1), TOY["max_per_group"]))
    toy_kv = max(max_tp, 2)
    if toy_kv * per > TOY["max_heads"]:  # keep the ratio, but no more heads than needed
        toy_kv = max(max_tp, 1)
    toy_heads = toy_kv * per
    if c.get("rotary_dim"):  # a rotary width in dims (MiniMax-M2's legacy field): the same share of the toy head
        head = int(c.get("head_dim") or int(c["hidden_size"]) // heads)
        c["rotary_dim"] = max(2, 2 * round(TOY["head_dim"] * int(c["rotary_dim"]) / head / 2))
    # transformers' grouped-GEMM experts need 16-byte row strides: an MoE toy's hidden size a
    # multiple of 8 (bf16 toys too)
    align = 8 if any(c.get(k) for k in EXPERT_COUNTS) else 1
    c.update(num_hidden_layers=min_layers, hidden_size=toy_hidden_size(toy_heads, TOY["head_dim"], align),
             intermediate_size=TOY["intermediate_size"], head_dim=TOY["head_dim"],
             num_attention_heads=toy_heads, num_key_value_heads=toy_kv,
             vocab_size=TOY["vocab_size"], dtype="float32")
    c.pop("torch_dtype", None)
    if c.get("sliding_window"):
        c["sliding_window"] = TOY["sliding_window"]
    if isinstance(c.get("layer_types"), list):  # per-layer list: keep the first layers'
        c["layer_types"] = c["layer_types"][:min_layers]
    _shrink_moe(c, min_layers)
    from bridges.core.registry import UnknownModelError, lookup

    try:
        c = lookup(c).toy_config(c)
    except UnknownModelError:
        pass
    if "head_dim" not in c:  # the family's HF code derives it: hidden / heads
        c["hidden_size"] = toy_hidden_size(c["num_attention_heads"], None, align)
    if tie is not None:
        c["tie_word_embeddings"] = tie
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = c.get(k)
        if isinstance(v, int) and v >= c["vocab_size"]:
            c[k] = c["vocab_size"] - 1 - ("bos eos pad".split().index(k[:3]))
        elif isinstance(v, list):
            c[k] = [min(x, c["vocab_size"] - 1) for x in v]
    return c


def toy_hidden_size(heads: int, head_dim: int | None, align: int = 1) -> int:
    """The toy's hidden size: the smallest multiple of ``heads`` from TOY's 64 up (transformers
    refuses a hidden size that heads do not divide, whatever head_dim says) whose share per
    head is not ``head_dim`` (a bridge that derives head_dim from hidden / heads must fail).
    Without a free head_dim (``None``): an even share per head (rotary halves it). ``align``: a
    multiple of it too."""
    step = math.lcm(heads, align)
    h = -(-TOY["hidden_size"] // step) * step
    while (h // heads == head_dim) if head_dim else (h // heads) % 2:
        h += step
    return h


def _shrink_moe(c: dict[str, Any], layers: int) -> None:
    """Experts: 8 (EP up to 4 divides them), top-k at most 4 (and group-limited routing kept
    consistent), small expert sizes, dense-first layers kept (one) but never all layers."""
    key = next((k for k in EXPERT_COUNTS if c.get(k)), None)
    if key is None:
        return
    groups = int(c.get("n_group") or 1)
    c[key] = TOY["experts"]
    if groups > 1:  # keep "experts per group" and "top-k within the chosen groups" sane
        c["n_group"] = min(groups, 4)
        c["topk_group"] = max(1, min(int(c.get("topk_group") or 1), c["n_group"] // 2))
    c["num_experts_per_tok"] = min(int(c.get("num_experts_per_tok") or 2), TOY["max_topk"])
    if c.get("moe_intermediate_size"):
        c["moe_intermediate_size"] = TOY["moe_intermediate_size"]
    if c.get("shared_expert_intermediate_size"):
        c["shared_expert_intermediate_size"] = TOY["shared_expert_intermediate_size"]
    if c.get("first_k_dense_replace"):
        c["first_k_dense_replace"] = min(int(c["first_k_dense_replace"]), 1, layers - 1)
    if c.get("mlp_only_layers"):
        c["mlp_only_layers"] = [i for i in c["mlp_only_layers"] if i < layers - 1][:1]


# Toy scales (DESIGN.md "Toy scales"): a real model's residual stream is small (embeddings at
# initializer_range, ~0.02), so a norm's eps matters there by percents; at unit scale a one-decade
# eps error moves toy logits by ~5e-6, under the 1e-5 bound. So the residual stream and every
# norm's input sit at ``initializer_range`` scale: embeddings ~ N(0, s); the projections that
# write into the residual stream (WRITERS) and those that feed a norm of their own (FEEDS: QK
# norms, MLA's latent norms) ~ N(0, s^2 / fan_in); every other matrix (the ones read after a
# norm: v, gate/up, up-projections, routers, lm_head) ~ N(0, 1 / fan_in), so attention scores,
# gating and logits keep unit scale and mapping bugs stay as visible as before.
WRITERS = re.compile(r"(^|\.)(o_proj|down_proj|w2|eh_proj)(\.weight|\.bias)?$")
# projection -> (its norm, a sibling of the projection; the rows it normalises: all, or the
# first norm-size rows: MLA's kv_a_proj_with_mqa also carries the un-normed rope key)
FEEDS = {"q_proj": ("q_norm", "all"), "k_proj": ("k_norm", "all"),
         "q_a_proj": ("q_a_layernorm", "all"), "kv_a_proj_with_mqa": ("kv_a_layernorm", "lead")}


def _scale(name: str, params: dict[str, torch.Tensor], s: float) -> tuple[float, int | None]:
    """(factor on a unit-scale draw, rows it applies to: None for all) for parameter ``name``."""
    if WRITERS.search(name):
        return s, None
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in FEEDS:
        norm, rows = FEEDS[parts[-2]]
        sibling = ".".join(parts[:-2] + [norm, "weight"])
        if sibling in params:
            return s, (params[sibling].numel() if rows == "lead" else None)
    return 1.0, None


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Re-randomise every parameter at realistic scale (see WRITERS above): embeddings ~
    N(0, initializer_range), matrices ~ N(0, 1/fan_in) or, where they write the residual stream
    or feed a norm, initializer_range times that; biases ~ N(0, 0.2) times their matrix's
    factor; norm weights uniform in [0.5, 1.5] (well away from 0 and 1: swaps must show); and
    the float buffers saved with the model (e.g. a router's score-correction bias)."""
    g = torch.Generator().manual_seed(seed)
    s = float(getattr(getattr(model, "config", None), "initializer_range", None) or 0.02)
    with torch.no_grad():
        saved = set(model.state_dict())
        for name, b in sorted(model.named_buffers()):
            if name in saved and b.is_floating_point() and "inv_freq" not in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
        params = dict(model.named_parameters())
        for name, p in sorted(params.items()):
            factor, rows = _scale(name, params, s)
            if p.dim() >= 2:
                std = s if "embed" in name else 1.0 / p.shape[-1] ** 0.5
                draw = torch.randn(p.shape, generator=g) * std
            elif name.endswith("bias"):
                draw = torch.randn(p.shape, generator=g) * 0.2
            else:  # norm weights
                draw = torch.rand(p.shape, generator=g) + 0.5
            if factor != 1.0:
                draw[(slice(None),) * (p.dim() - 2) + (slice(rows),)] *= factor
            p.copy_(draw)


def hf_model_type(config: dict[str, Any]) -> str:
    """The transformers model type for a config: the bridge's ``hf_model_type`` if it sets one."""
    from bridges.core.registry import UnknownModelError, lookup

    try:
        return lookup(config).hf_model_type or config["model_type"]
    except UnknownModelError:
        return config["model_type"]


def _family(config: dict[str, Any]):
    """The registered bridge class for a config (the base Bridge, whose hooks do nothing, if none)."""
    from bridges.core.bridge import Bridge
    from bridges.core.registry import UnknownModelError, lookup

    try:
        return lookup(config)
    except UnknownModelError:
        return Bridge


def hf_config(config: dict[str, Any]):
    from transformers import AutoConfig

    kw = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    return AutoConfig.for_model(hf_model_type(config), **kw)


def _auto_class(config: dict[str, Any]):
    """transformers' auto class for the family's kind of model (conformance/adapters.py)."""
    import transformers

    vision = getattr(_family(config), "modality", "text") == "vision"
    return transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM


def _eager(cfg) -> None:
    """Eager attention everywhere (sub-configs too): the reference the checks compare with."""
    cfg._attn_implementation = "eager"
    for sub in ("text_config", "vision_config"):
        if getattr(cfg, sub, None) is not None:
            getattr(cfg, sub)._attn_implementation = "eager"


def load_hf_model(path: str | os.PathLike, dtype: torch.dtype):
    """Load an HF checkpoint with transformers, through the bridge's hf_model_type if needed."""
    config = _read_config(Path(path))
    cfg = hf_config(config)
    _eager(cfg)
    return _auto_class(config).from_pretrained(path, config=cfg, dtype=dtype)


def build_hf_model(config: dict[str, Any], seed: int = 0):
    """A transformers model for the toy config dict, with randomised weights, eval mode."""
    cfg = hf_config(config)
    _eager(cfg)
    torch.manual_seed(seed)
    model = _auto_class(config).from_config(cfg, dtype=torch.float32)
    randomize_(model, seed)  # in fp32, then cast: the same values, rounded, in every dtype
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return model.to(getattr(torch, str(config.get("dtype") or "float32"))).eval()


def make_toy_checkpoint(config: dict[str, Any], root: str | os.PathLike, seed: int = 0) -> Path:
    """Save the toy model once under ``root`` (keyed by config + seed); safe to call from many
    processes at once: the directory appears by an atomic rename, and a loser reuses it."""
    key = hashlib.sha256(json.dumps([config, seed], sort_keys=True).encode()).hexdigest()[:12]
    out = Path(root) / f"{config.get('model_type', 'model')}-{key}"
    if (out / "config.json").exists():
        return out
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".toy-", dir=root))
    try:
        model = build_hf_model(config, seed)
        _family(config).toy_model(model, lambda m: randomize_(m, seed + 1))
        model.save_pretrained(tmp)
        _family(config).toy_saved(tmp)
        saved = _read_config(tmp)
        if saved.get("model_type") != config.get("model_type"):  # built as its hf_model_type
            saved.update(model_type=config["model_type"], architectures=config.get("architectures"))
            (tmp / "config.json").write_text(json.dumps(saved, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # another process won the race: use its copy
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def make_fp8_checkpoint(src: str | os.PathLike, root: str | os.PathLike, kind: str = "block",
                        block: tuple[int, int] = (32, 32)) -> tuple[str, str]:
    """FP8 copy of a toy checkpoint (every 2-D weight but embeddings / lm_head quantized, in
    ``kind`` 'block', 'tensor', 'static' or 'modelopt' layout) and its dequantized fp32 twin,
    the HF reference. Small blocks so that toy weights span several tiles, ragged edges included.
    'modelopt' is NVIDIA ModelOpt's FP8: per-tensor ``weight_scale``, a static ``input_scale`` and
    FP8 KV-cache scales beside the k / v projections.
    'static' is transformers' fine-grained FP8 without blocks, as Ministral-3 / Devstral-2 ship:
    a per-tensor ``weight_scale_inv`` and a static ``activation_scale`` per weight, the vision
    side and lm_head left unquantized (``modules_to_not_convert``).
    'compressed' is compressed-tensors' FP8 as llm-compressor writes it: a per-channel
    ``weight_scale`` [rows, 1] and a static ``input_scale`` [1] in bf16, MoE routers left
    unquantized (``ignore``), and the ``kv_cache_scheme``'s ``k_scale`` / ``v_scale`` [1] on each
    attention module."""

    from bridges.core import quant
    from bridges.core.hf_io import HFCheckpoint

    src, (out, deq, made) = Path(src), _pair_dirs(src, root, f"fp8{kind}")
    if made:
        return str(out), str(deq)
    ckpt = HFCheckpoint(src)
    config = _read_config(src)
    vocab = (config.get("text_config") or config).get("vocab_size")
    tensors = {n: ckpt.get(n) for n in ckpt.names()}
    vlm = any("language_model." in n for n in tensors)
    qkind = "tensor" if kind in ("static", "modelopt", "compressed") else kind  # static: per-tensor, named _scale_inv
    qt, dt, kept = {}, {}, {"lm_head"}
    for name, w in tensors.items():
        # embeddings and output heads (vocab rows, whatever their name: DeepSeek-V3's MTP
        # shared_head.head too) stay unquantized, as in published FP8 checkpoints; so does a
        # VLM's vision side in the static layout
        vision = kind == "static" and vlm and "language_model." not in name
        if vision:  # the module's in-memory name (model.vision_tower), whichever layout is stored
            parts = name.split(".")
            kept.add(".".join(parts[:2]) if parts[0] == "model" else f"model.{parts[0]}")
        router = kind == "compressed" and name.endswith("mlp.gate.weight")
        if w.dim() == 2 and "embed" not in name and "lm_head" not in name and w.shape[0] != vocab and not vision \
                and not router:
            if kind == "compressed":  # per channel, scales in bf16, input scale [1]
                q, s = _per_channel_fp8(w)
                qt[name], qt[f"{name}_scale"] = q, s
                qt[f"{name[:-len('weight')]}input_scale"] = torch.tensor([0.01 * (1 + len(qt) % 7)], dtype=torch.bfloat16)
            else:
                q, s = quant.quantize(w, None, qkind, block)
                qt[name] = q
                qt[f"{name}_scale" if kind in ("tensor", "modelopt") else f"{name}_scale_inv"] = s.float()
            if kind in ("static", "modelopt"):  # a calibrated input amax / 448, as published files store
                act = "input_scale" if kind == "modelopt" else "activation_scale"
                qt[f"{name[:-len('weight')]}{act}"] = torch.tensor(0.01 * (1 + len(qt) % 7))
            dt[name] = quant.dequantize(q, s, qkind, block)
        else:
            qt[name] = dt[name] = w
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if kind == "block":
        qc["weight_block_size"] = list(block)
    if kind == "static":
        qc = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
              "dequantize": False, "modules_to_not_convert": sorted(kept)}
    if kind == "modelopt":
        qc = {"quant_method": "modelopt", "quant_algo": "FP8", "exclude_modules": ["lm_head"],
              **_kv_cache_scales(qt)}
    if kind == "compressed":
        qc = _compressed_tensors_fp8(qt)
    _save_pair(out, qt, {**config, "quantization_config": qc}, deq, dt, config, root)
    return str(out), str(deq)


def make_stacked_checkpoint(src: str | os.PathLike, root: str | os.PathLike) -> str:
    """Copy of a MoE toy checkpoint in transformers' in-memory layout: experts stacked
    (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``) instead of one tensor per expert, as some
    checkpoints store them. The same weights: the per-expert toy's HF reference applies."""
    from safetensors.torch import save_file

    src = Path(src)
    out = Path(root) / f"{src.name}-stacked"
    if (out / "config.json").exists():
        return str(out)
    dtype = _read_config(src).get("dtype") or "float32"
    model = load_hf_model(src, getattr(torch, dtype))
    state = {n: t.detach().contiguous() for n, t in model.state_dict().items()
             if "rotary_emb" not in n and not (getattr(model.config, "tie_word_embeddings", False)
                                                and n == "lm_head.weight")}
    tmp = Path(tempfile.mkdtemp(prefix=".toy-", dir=root))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(src / "config.json", tmp / "config.json")
        try:
            tmp.rename(out)
        except OSError:  # another process made it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def make_mxfp4_checkpoint(src: str | os.PathLike, root: str | os.PathLike) -> tuple[str, str]:
    """MXFP4 copy of a stacked-expert MoE toy (every stacked expert tensor as gpt-oss-style
    ``_blocks`` / ``_scales``: one E8M0 scale per 32 values along dim 1, values rounded to the
    nearest FP4) and its dequantized twin, the HF reference."""

    from bridges.core import quant
    from bridges.core.hf_io import HFCheckpoint

    src, (out, deq, made) = Path(src), _pair_dirs(src, root, "mxfp4")
    if made:
        return str(out), str(deq)
    ckpt = HFCheckpoint(src)
    qt, dt = {}, {}
    for name in ckpt.names():
        w = ckpt.get(name)
        if w.dim() != 3 or ".experts." not in name:
            qt[name] = dt[name] = w
            continue
        values, scales = _round_mxfp4(w.float())
        qt[f"{name}_blocks"], qt[f"{name}_scales"] = quant.mxfp4_quantize(values, scales), scales
        dt[name] = values.to(w.dtype)
    config = _read_config(src)
    qc = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                          "model.embed_tokens", "lm_head"]}
    _save_pair(out, qt, {**config, "quantization_config": qc}, deq, dt, config, root)
    return str(out), str(deq)


def make_nvfp4_checkpoint(src: str | os.PathLike, root: str | os.PathLike,
                          compressed: bool = False) -> tuple[str, str]:
    """NVFP4 copy of a toy checkpoint as NVIDIA ModelOpt writes one (every linear weight whose
    rows split into 16-value blocks; embeddings, output heads, routers and norms stay as they
    are) and its dequantized twin, the HF reference. Per tensor ``weight_scale_2`` = amax / (6 x
    448); per 16 values a float8 ``weight_scale`` = block amax / 6 / weight_scale_2; values to the
    nearest FP4 code; a calibrated ``input_scale`` beside each weight; FP8 KV-cache scales beside
    the k / v projections. ``compressed``: as compressed-tensors writes NVFP4 (RedHat's NVFP4
    releases): codes as ``weight_packed``, ``weight_global_scale`` = 1 / weight_scale_2 (a
    divisor), ``input_global_scale``, no KV-cache scales."""
    from bridges.core import quant
    from bridges.core.hf_io import HFCheckpoint

    src, (out, deq, made) = Path(src), _pair_dirs(src, root, "ct-nvfp4" if compressed else "nvfp4")
    if made:
        return str(out), str(deq)
    ckpt = HFCheckpoint(src)
    config = _read_config(src)
    vocab = (config.get("text_config") or config).get("vocab_size")
    qt, dt, kept = {}, {}, set()
    for name in ckpt.names():
        w = ckpt.get(name)
        linear = (w.dim() == 2 and name.endswith(".weight") and w.shape[1] % quant.NV_BLOCK == 0
                  and "embed" not in name and "lm_head" not in name and w.shape[0] != vocab
                  and not name.endswith((".gate.weight", ".router.weight")))
        if not linear:
            qt[name] = dt[name] = w
            kept.add(name.rsplit(".", 1)[0])
            continue
        codes, scale, scale2 = _round_nvfp4(w.float())
        if compressed:
            glob = (1 / scale2).reshape(1)
            qt[f"{name}_packed"], qt[f"{name}_scale"], qt[f"{name}_global_scale"] = codes, scale, glob
            qt[name[:-len("weight")] + "input_global_scale"] = torch.tensor([100.0 * (1 + len(qt) % 7)])
            dt[name] = quant.nvfp4_dequantize(codes, scale, glob, torch.float32, divisor=True).to(w.dtype)
            continue
        qt[name], qt[f"{name}_scale"], qt[f"{name}_scale_2"] = codes, scale, scale2
        qt[name[:-len("weight")] + "input_scale"] = torch.tensor(0.01 * (1 + len(qt) % 7))
        dt[name] = quant.nvfp4_dequantize(codes, scale, scale2, torch.float32).to(w.dtype)
    if compressed:
        nv = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
              "block_structure": None, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
        qc = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
              "quantization_status": "compressed", "ignore": ["lm_head", "re:.*mlp.gate$"], "kv_cache_scheme": None,
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**nv, "dynamic": False},
                                            "input_activations": {**nv, "dynamic": "local"},
                                            "output_activations": None}}}
        _save_pair(out, qt, {**config, "quantization_config": qc}, deq, dt, config, root)
        return str(out), str(deq)
    qc = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": quant.NV_BLOCK,
          "exclude_modules": sorted(kept), **_kv_cache_scales(qt)}
    _save_pair(out, qt, {**config, "quantization_config": qc}, deq, dt, config, root)
    return str(out), str(deq)


def _per_channel_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' FP8 'channel' weights: codes and a bf16 scale [rows, 1] (amax / 448)."""
    from bridges.core import quant

    scale = (w.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12).to(torch.bfloat16)
    return quant.quantize(w, scale, "tensor", None)


def _compressed_tensors_fp8(qt: dict[str, torch.Tensor]) -> dict[str, Any]:
    """compressed-tensors' KV-cache scales added to ``qt`` (``k_scale`` / ``v_scale`` [1], bf16, on
    every attention module with a k_proj / v_proj or qkv_proj) and the quantization_config that
    llm-compressor writes for FP8 weights per channel with static per-tensor activations."""
    attn = sorted({n.rsplit(".", 2)[0] for n in qt if n.endswith(("k_proj.weight", "qkv_proj.weight"))})
    for i, a in enumerate(attn):
        qt[f"{a}.k_scale"] = torch.tensor([0.02 * (1 + i % 5)], dtype=torch.bfloat16)
        qt[f"{a}.v_scale"] = torch.tensor([0.03 * (1 + i % 3)], dtype=torch.bfloat16)
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "group_size": None,
           "block_structure": None, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "quantization_status": "compressed", "ignore": ["lm_head", "re:.*mlp.gate$"],
            "config_groups": {"group_0": {"targets": ["Linear"], "format": "float-quantized",
                                          "weights": {**fp8, "strategy": "channel"},
                                          "input_activations": {**fp8, "strategy": "tensor"},
                                          "output_activations": None}},
            "kv_cache_scheme": {**fp8, "strategy": "tensor"} if attn else None,
            "sparsity_config": {}, "transform_config": {}, "global_compression_ratio": None}


def _kv_cache_scales(qt: dict[str, torch.Tensor]) -> dict[str, str]:
    """ModelOpt's FP8 KV-cache calibration added to the quantized tensors ``qt``: a float32 scalar
    ``k_proj.k_scale`` / ``v_proj.v_scale`` beside each k / v projection (quantized or not);
    the quantization_config entry saying so (none where the model has no such projections)."""
    import torch

    added = 0
    for name in [n for n in qt if n.endswith(("k_proj.weight", "v_proj.weight"))]:
        kind = "k_scale" if name.endswith("k_proj.weight") else "v_scale"
        qt[name[:-len("weight")] + kind] = torch.tensor(0.02 * (1 + added % 5), dtype=torch.float32)
        added += 1
    return {"kv_cache_quant_algo": "FP8"} if added else {}


def make_w4a16_checkpoint(src: str | os.PathLike, root: str | os.PathLike,
                          symmetric: bool = True, act_order: bool = False) -> tuple[str, str]:
    """compressed-tensors pack-quantized W4A16 copy of a toy checkpoint and its dequantized twin:
    a MoE model's routed experts only (Kimi-K2-Thinking's published layout: attention, shared
    experts, dense MLPs, routers and lm_head in bf16), a dense model's every linear weight
    (RedHat's w4a16 releases). Symmetric int4 codes, a bf16 scale per group of 32 columns (16,
    or the whole row, where a toy width does not divide), ``weight_packed`` int32 /
    ``weight_scale`` / ``weight_shape``. Not ``symmetric`` (AWQ-style, as llm-compressor converts
    AutoAWQ checkpoints): a per-group ``weight_zero_point`` too, int32 codes packed down the rows.
    ``act_order`` (``actorder: group``): each column's group from a permutation, ``weight_g_idx``."""
    from bridges.core import quant
    from bridges.core.hf_io import HFCheckpoint

    tag = ("w4a16" if symmetric else "w4a16-asym") + ("-actorder" if act_order else "")
    src, (out, deq, made) = Path(src), _pair_dirs(src, root, tag)
    gen = torch.Generator().manual_seed(0)
    if made:
        return str(out), str(deq)
    ckpt = HFCheckpoint(src)
    config = _read_config(src)
    vocab = (config.get("text_config") or config).get("vocab_size")
    moe = any(".experts." in n for n in ckpt.names())
    qt, dt = {}, {}
    for name in ckpt.names():
        w = ckpt.get(name)
        linear = _projection(name, w, vocab)
        if not linear or (moe and ".experts." not in name) or "shared_expert" in name:
            qt[name] = dt[name] = w
            continue
        rows, cols = w.shape
        group = next((g for g in (32, 16) if cols % g == 0), cols)
        g_idx = None
        if act_order:  # the columns in order of a permutation fill the groups
            g_idx = (torch.arange(cols, dtype=torch.int32) // group)[torch.argsort(torch.randperm(cols, generator=gen))]
            qt[f"{name}_g_idx"] = g_idx
        g = w.float()[:, torch.argsort(g_idx, stable=True)] if act_order else w.float()
        g = g.reshape(rows, cols // group, group)
        zero = None
        if symmetric:
            scale = (g.abs().amax(-1) / 7).clamp_min(1e-8).to(torch.bfloat16)
        else:  # the group's [min, max] onto the 16 codes
            lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
            scale = ((hi - lo) / 15).clamp_min(1e-8).to(torch.bfloat16)
            zp = (torch.round(-lo / scale.float()) - 8).clamp(-8, 7).to(torch.int32)
            zero = qt[f"{name}_zero_point"] = quant.int_pack(zp.T.contiguous(), 4).T.contiguous()
        words = quant.int_quantize(w, scale, math.ceil(cols / 8), name, zero, g_idx)
        qt[f"{name}_packed"], qt[f"{name}_scale"] = words, scale
        qt[f"{name}_shape"] = torch.tensor([rows, cols])
        dt[name] = quant.int_dequantize(words, scale, qt[f"{name}_shape"], name, w.dtype, zero, g_idx)
    ignore = ["lm_head"] + (["re:.*self_attn.*", "re:.*shared_expert.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"]
                            if moe else ["re:.*mlp.gate$"])
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
          "ignore": ignore, "kv_cache_scheme": None,
          "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                        "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group",
                                                    "group_size": 32, "dynamic": False,
                                                    "actorder": "group" if act_order else None,
                                                    "block_structure": None, "observer": "minmax", "observer_kwargs": {}}}}}
    _save_pair(out, qt, {**config, "quantization_config": qc}, deq, dt, config, root)
    return str(out), str(deq)


def make_gptq_checkpoint(src: str | os.PathLike, root: str | os.PathLike, method: str = "gptq",
                         act_order: bool = False) -> tuple[str, str]:
    """GPTQ (``method`` 'gptq': AutoGPTQ's v1 layout, symmetric 4-bit, zero points stored minus one,
    ``g_idx`` stored; ``act_order``: desc_act, each input row's group from a permutation) or AWQ
    ('awq': AutoAWQ's gemm layout, asymmetric 4-bit, nibbles in AWQ's order) copy of a toy
    checkpoint and its dequantized twin: every linear ``*proj.weight`` whose widths pack (routers,
    embeddings and lm_head stay as they are, as the quantizers leave them); fp16 scales per group
    of 32 input rows (16, or the whole column, where a toy width does not divide)."""
    from bridges.core import gptq
    from bridges.core.hf_io import HFCheckpoint

    tag = method + ("-actorder" if act_order else "")
    src, (out, deq, made) = Path(src), _pair_dirs(src, root, tag)
    if made:
        return str(out), str(deq)
    ckpt = HFCheckpoint(src)
    config = _read_config(src)
    vocab = (config.get("text_config") or config).get("vocab_size")
    qc = {"quant_method": method, "bits": 4, "group_size": 32}
    qc.update({"version": "gemm", "zero_point": True} if method == "awq" else
              {"desc_act": act_order, "sym": True, "checkpoint_format": "gptq", "static_groups": False})
    gen = torch.Generator().manual_seed(0)
    qt, dt, kept = {}, {}, set()
    for name in ckpt.names():
        w = ckpt.get(name)
        linear = _projection(name, w, vocab)
        if not linear or w.shape[0] % 8 or w.shape[1] % 8:
            qt[name] = dt[name] = w
            kept.add(name.rsplit(".", 1)[0])
            continue
        out_f, in_f = w.shape
        group = next((g for g in (32, 16) if in_f % g == 0), in_f)
        g_idx = torch.arange(in_f, dtype=torch.int32) // group
        if act_order:  # the rows in order of a permutation fill the groups
            g_idx = g_idx[torch.argsort(torch.randperm(in_f, generator=gen))]
        wt = w.float().T  # [in, out]
        grouped = [wt[g_idx == k] for k in range(in_f // group)]
        if method == "awq":  # the group's [min, max] onto the 16 codes
            lo = torch.stack([x.amin(0) for x in grouped]).clamp(max=0)
            hi = torch.stack([x.amax(0) for x in grouped]).clamp(min=0)
            scales = ((hi - lo) / 15).clamp_min(1e-6).half()
            zeros = (torch.round(-lo / scales.float())).clamp(0, 15).to(torch.int32)
        else:  # symmetric: zero point 8 (stored as 7), step 2 amax / 15
            amax = torch.stack([x.abs().amax(0) for x in grouped])
            scales = (2 * amax / 15).clamp_min(1e-6).half()
            zeros = torch.full_like(scales, 8, dtype=torch.int32)
        stored = zeros - (1 if method == "gptq" else 0)
        qzeros = gptq._pack(gptq._awq_columns(stored, inverse=True) if method == "awq" else stored, 4, 1)
        cfg = {"quantization_config": qc}
        p = name[:-len("weight")]
        gi = g_idx if method == "gptq" else None
        qt[p + "qweight"] = gptq.quantize(w, qzeros, scales, gi, cfg, name)
        qt[p + "qzeros"], qt[p + "scales"] = qzeros, scales
        if gi is not None:
            qt[p + "g_idx"] = gi
        dt[name] = gptq.dequantize(qt[p + "qweight"], qzeros, scales, gi, cfg, name, torch.float32).to(w.dtype)
    key = "modules_to_not_convert"
    qc[key] = sorted(k for k in kept if k.endswith("proj")) or None
    _save_pair(out, qt, {**config, "quantization_config": qc}, deq, dt, config, root)
    return str(out), str(deq)


NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)  # bitsandbytes' NF4 code values


def make_bnb8_checkpoint(src: str | os.PathLike, root: str | os.PathLike) -> tuple[str, str]:
    """bitsandbytes 8-bit (LLM.int8, ``load_in_8bit``) copy of a toy checkpoint as ``save_pretrained``
    writes it (every linear ``*proj.weight`` int8 with its row absmax ``SCB`` and a ``weight_format``
    0, row-major) and its dequantized twin."""
    from bridges.core import bnb
    from bridges.core.hf_io import HFCheckpoint

    src, (out, deq, made) = Path(src), _pair_dirs(src, root, "bnb-int8")
    if made:
        return str(out), str(deq)
    ckpt = HFCheckpoint(src)
    config = _read_config(src)
    vocab = (config.get("text_config") or config).get("vocab_size")
    qt, dt = {}, {}
    for name in ckpt.names():
        w = ckpt.get(name)
        if not _projection(name, w, vocab):
            qt[name] = dt[name] = w
            continue
        scb = w.float().abs().amax(1).clamp_min(1e-8)
        p = name[:-len("weight")]
        qt[name], qt[p + "SCB"] = bnb.quantize8(w, scb, name), scb
        qt[p + "weight_format"] = torch.tensor(0, dtype=torch.uint8)
        dt[name] = bnb.dequantize8(qt[name], scb, name, torch.float32).to(w.dtype)
    qc = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False, "llm_int8_threshold": 6.0,
          "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None}
    _save_pair(out, qt, {**config, "quantization_config": qc}, deq, dt, config, root)
    return str(out), str(deq)


def make_bnb_checkpoint(src: str | os.PathLike, root: str | os.PathLike, double_quant: bool = True) -> tuple[str, str]:
    """bitsandbytes NF4 copy of a toy checkpoint (as ``save_pretrained`` of a ``load_in_4bit`` model
    writes it: every linear ``*proj.weight``; embeddings, routers, norms and lm_head as they are)
    and its dequantized twin. Blocks of 64 values; codes from the exact block absmax; with
    ``double_quant`` the absmax itself stored as uint8 codes into a 256-value map with one fp32
    scale per 256 of them and their mean as offset (bitsandbytes' compress_statistics)."""
    from bridges.core import bnb
    from bridges.core.hf_io import HFCheckpoint

    src, (out, deq, made) = Path(src), _pair_dirs(src, root, "bnb-nf4" + ("" if double_quant else "-plain"))
    if made:
        return str(out), str(deq)
    ckpt = HFCheckpoint(src)
    config = _read_config(src)
    vocab = (config.get("text_config") or config).get("vocab_size")
    table = torch.tensor(NF4)
    nested_map = torch.linspace(-1, 1, 256)  # the format carries its own map; any sorted one will do
    qt, dt, kept = {}, {}, []
    for name in ckpt.names():
        w = ckpt.get(name)
        if not _projection(name, w, vocab):
            qt[name] = dt[name] = w
            kept.append(name.rsplit(".", 2)[-2])
            continue
        flat = w.reshape(-1).float()
        n, bs = flat.numel(), 64
        amax = torch.stack([flat[i:i + bs].abs().max() for i in range(0, n, bs)]).clamp_min(1e-8)
        codes = (flat[:, None] / amax.repeat_interleave(bs)[:n, None] - table).abs().argmin(-1).to(torch.uint8)
        codes = torch.cat([codes, codes.new_zeros(n % 2)])
        qt[name] = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
        st = {"quant_type": "nf4", "blocksize": bs, "dtype": str(w.dtype).split(".")[-1], "shape": list(w.shape)}
        tensors = {"quant_map": table.clone()}
        if double_quant:
            offset = float(amax.mean())
            a = amax - offset
            nested = torch.stack([a[i:i + 256].abs().max() for i in range(0, a.numel(), 256)]).clamp_min(1e-12)
            tensors["absmax"] = (a[:, None] / nested.repeat_interleave(256)[:a.numel(), None]
                                 - nested_map).abs().argmin(-1).to(torch.uint8)
            tensors.update(nested_absmax=nested, nested_quant_map=nested_map.clone())
            st.update(nested_blocksize=256, nested_offset=offset, nested_dtype="float32")
        else:
            tensors["absmax"] = amax
        for k, v in tensors.items():
            qt[f"{name}.{k}"] = v
        qt[f"{name}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(st).encode()), dtype=torch.uint8)
        dt[name] = bnb.dequantize(qt[name], tensors, st, name, torch.float32).to(w.dtype)
    qc = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
          "bnb_4bit_use_double_quant": double_quant, "bnb_4bit_compute_dtype": "bfloat16",
          "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None}
    _save_pair(out, qt, {**config, "quantization_config": qc}, deq, dt, config, root)
    return str(out), str(deq)


def _round_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` [R, C] as NVFP4: (codes uint8 [R, C/2], float8 block scales [R, C/16], float32
    tensor scale), values to the nearest FP4 code of their block (ties to the smaller)."""
    from bridges.core import quant

    R, C = w.shape
    scale2 = (w.abs().max() / (6 * 448)).clamp(min=torch.finfo(torch.float32).tiny).reshape(())
    blocks = w.reshape(R, C // quant.NV_BLOCK, quant.NV_BLOCK)
    scale = (blocks.abs().amax(-1) / 6 / scale2).to(torch.float8_e4m3fn)
    step = (scale.float() * scale2)[..., None]
    mags = torch.tensor(quant.FP4_VALUES[:8])
    q = torch.where(step > 0, blocks.abs() / step.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    idx = torch.bucketize(q, (mags[1:] + mags[:-1]) / 2)  # the nearest magnitude
    code = (idx | (blocks.signbit().long() << 3)).to(torch.uint8).reshape(R, C)
    return code[:, 0::2] | (code[:, 1::2] << 4), scale, scale2.float()


def _projection(name: str, w: torch.Tensor, vocab: int | None) -> bool:
    """A linear projection the int quantizers convert (``*proj.weight``): not an embedding or an
    output head (``vocab`` rows), routers and norms not being ``proj`` weights."""
    return w.dim() == 2 and name.endswith("proj.weight") and w.shape[0] != vocab and "embed" not in name


def _pair_dirs(src, root, tag: str) -> tuple[Path, Path, bool]:
    """(the ``tag`` copy of toy ``src`` under ``root``, its dequantized twin, whether both are
    made already); ``root`` created."""
    name = Path(src).name
    Path(root).mkdir(parents=True, exist_ok=True)
    out, deq = Path(root) / f"{name}-{tag}", Path(root) / f"{name}-{tag}-dequantized"
    return out, deq, (out / "config.json").exists() and (deq / "config.json").exists()


def _save_pair(out: Path, qt: dict, qcfg: dict, deq: Path, dt: dict, cfg: dict, root) -> None:
    """Write a quantized toy and its dequantized twin, each by atomic rename (a loser of a race
    between processes drops its copy). A ModelOpt toy also gets ModelOpt's own
    ``hf_quant_config.json`` (the same settings under ``quantization``)."""
    from safetensors.torch import save_file

    for d, ts, c in ((out, qt, qcfg), (deq, dt, cfg)):
        tmp = Path(tempfile.mkdtemp(prefix=".toy-", dir=root))
        save_file(ts, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(c, indent=2))
        qc = c.get("quantization_config") or {}
        if qc.get("quant_method") == "modelopt":
            settings = {k: v for k, v in qc.items() if k != "quant_method"}
            (tmp / "hf_quant_config.json").write_text(json.dumps(
                {"producer": {"name": "modelopt"}, "quantization": settings}, indent=2))
        try:
            tmp.rename(d)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)


def _round_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [E, C, R] (C a multiple of 32) rounded to MXFP4: per (e, r, group of 32 along C)
    the smallest power-of-two scale that keeps the group within FP4's +-6, values to the
    nearest FP4 code. Returns the representable values and the uint8 E8M0 scales [E, R, C/32]."""
    from bridges.core import quant

    E, C, R = w.shape
    g = w.permute(0, 2, 1).reshape(E, R, C // quant.MX_BLOCK, quant.MX_BLOCK)
    amax = g.abs().amax(-1).clamp_min(2.0 ** -126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    mags = torch.tensor(quant.FP4_VALUES[:8])
    q = torch.ldexp(g.abs(), -exp[..., None].int())
    nearest = mags[(q[..., None] - mags).abs().argmin(-1)]
    v = torch.ldexp(nearest * g.sign(), exp[..., None].int())
    values = v.reshape(E, R, C).permute(0, 2, 1).contiguous()
    return values, (exp + quant.E8M0_BIAS).to(torch.uint8)
