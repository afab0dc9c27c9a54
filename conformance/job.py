"""Work done inside the runner's rank processes. Each function runs on every rank it is sent
to and returns plain data (tensors, dicts, strings) for the checks in ``checks.py``.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from conformance.adapters import adapter_for
from conformance.forward import margin

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _read_config(path) -> dict:
    """config.json as transformers reads it (its tagged infinities decoded)."""
    from bridges.core.hf_io import HFCheckpoint

    return HFCheckpoint.read_config(path)


# Set (to 1) by the plugin's --mbridge-trust-remote-code before any rank starts, so that every
# process of the run reads configs with ``auto_map`` the same way.
TRUST_ENV = "MBRIDGE_TRUST_REMOTE_CODE"


def trust_remote_code() -> bool:
    """Whether this run trusts configs that ask for remote code (``TRUST_ENV``)."""
    import os

    return os.environ.get(TRUST_ENV, "").lower() in ("1", "true", "yes")


def make_bridge(source: str | dict, bridge_ref: str | None = None):
    """The registered bridge for a checkpoint dir (or config dict), or the class named by
    ``bridge_ref`` ('module:Class', e.g. a deliberately broken bridge in the self-tests).
    A config with ``auto_map`` needs ``TRUST_ENV`` (the code itself is never run)."""
    from bridges import AutoBridge

    trust = trust_remote_code()
    bridge = (AutoBridge.from_hf_pretrained(source, trust_remote_code=trust) if isinstance(source, str)
              else AutoBridge.from_hf_config(source, trust_remote_code=trust))
    if bridge_ref:
        mod, name = bridge_ref.split(":")
        cls = getattr(importlib.import_module(mod), name)
        bridge = cls(bridge.hf_config, bridge.checkpoint)
    return bridge


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def hf_reference(toy_dir: str, ids: torch.Tensor, steps: int, dtype: str = "float32",
                 baseline_seed: int = 12345) -> dict[str, Any]:
    """HF logits, activations and greedy tokens; and logits of a re-initialised model."""
    config = _read_config(Path(toy_dir))
    ad = adapter_for(config)
    model = ad.load_hf(toy_dir, DTYPES[dtype]).to(_device()).eval()
    acts: dict = {}
    with ad.capture_hf(model, acts):
        logits = ad.hf_logits(model, ids)
    margins: list = []
    gen = ad.hf_generate(model, ids, steps, margins)
    noise = {}
    if dtype != "float32":
        # HF's own fp32 run on the same weights measures the bf16 rounding noise of the logits:
        # a position is decisive when HF's top-1 margin clears 4x the typical noise.
        model32 = ad.load_hf(toy_dir, torch.float32).to(_device()).eval()
        fp32 = ad.hf_logits(model32, ids)
        gen32 = ad.hf_generate(model32, ids, steps)
        err = (logits - fp32).abs().amax(-1)
        del model32
        tau = 4 * float(err.median())
        noise = {"decisive": margin(logits) > tau, "gen_decisive": torch.stack(margins, 1) > tau,
                 "noise_tau": tau, "fp32_logits": fp32, "fp32_generation": gen32}
    other = ad.build_hf(config, seed=baseline_seed).to(DTYPES[dtype]).to(_device())
    return {"logits": logits, "acts": acts, "generation": gen, "baseline": ad.hf_logits(other, ids), **noise}


def layout_provider(bridge, layout: str, dtype: torch.dtype):
    """The bridge's provider set to ``layout`` (TP, PP, VPP, EP, expert TP, grouped experts)
    and ``dtype``, finalized."""
    from bridges.core.parallel import Layout

    provider = bridge.to_megatron_provider().set_layout(Layout.parse(layout))
    provider.params_dtype = dtype
    return provider.finalize()


def megatron_case(toy_dir: str, layout: str, ids: torch.Tensor, steps: int,
                  dtype: str = "float32", bridge_ref: str | None = None,
                  draft: torch.Tensor | None = None) -> dict[str, Any]:
    """Import the toy checkpoint under ``layout``, run it, export it. Every rank returns a
    dict; data that exists on one rank only is None elsewhere. ``draft``: HF's greedy
    continuation, which decoding verifies in one forward where it can
    (``forward.megatron_generate``)."""
    from megatron.core import parallel_state as ps

    from bridges.core.ledger import CoverageError

    bridge = make_bridge(toy_dir, bridge_ref)
    bridge.dequantized_dtype = DTYPES[dtype]  # compare dequantized values in the dtype under test
    provider = layout_provider(bridge, layout, DTYPES[dtype])
    chunks = provider.provide_distributed_model()
    for c in chunks:
        c.eval()
    out: dict[str, Any] = {"rank": dist.get_rank(), "import_error": None, "export_error": None}
    try:
        bridge.load_hf_weights(chunks)
    except CoverageError as e:
        out["import_error"] = str(e)
        return out
    primary = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    acts: dict = {}
    vocab = provider.vocab_size
    ad = adapter_for(bridge=bridge)
    with ad.capture_megatron(chunks, acts):
        logits = ad.megatron_logits(chunks, ids, vocab)
    out["logits"] = logits.cpu() if logits is not None and primary else None
    out["acts"] = acts if primary else {}
    gen = ad.megatron_generate(chunks, ids, steps, vocab, draft=draft)
    out["generation"] = gen if dist.get_rank() == 0 else None
    try:
        # gathered to rank 0 alone, as save_hf_pretrained exports
        exported = list(bridge.export_hf_weights(chunks, cpu=True, strict=False, tp_rank0_only=True))
    except CoverageError as e:
        out["export_error"] = str(e)
        exported = []
    out["exported"] = exported if dist.get_rank() == 0 else None
    from bridges.core import quant
    from bridges.core.codecs import quantized_name

    ckpt = bridge.checkpoint
    if any(ckpt.dtype(n) in quant.FP8 or quantized_name(n) for n in ckpt.names()):
        requant = list(bridge.export_hf_weights(chunks, cpu=True, quantized=True, tp_rank0_only=True))
        out["requantized"] = requant if dist.get_rank() == 0 else None
    return out


def describe(source: str | dict, toy_dir: str | None = None,
             bridge_ref: str | None = None) -> dict[str, Any]:
    """Config translation, config roundtrip and mapping table for a model (one rank)."""
    from bridges.core.config import get_path
    from bridges.core.hf_io import HFCheckpoint
    from bridges.core.mappings import Shapes

    bridge = make_bridge(source, bridge_ref)
    attrs = bridge.megatron_attrs()
    exported = bridge.hf_config_dict(attrs)
    raw = source if isinstance(source, dict) else HFCheckpoint(source).config()
    flat = "text_config" not in raw  # a flat VLM config sets the text fields at the top level
    fields = [f.hf for f in bridge.config_fields if get_path(raw, f.hf, None) is not None
              or flat and f.hf.startswith("text_config.") and get_path(raw, f.hf[12:], None) is not None]
    if flat and "text_config.tie_word_embeddings" in fields:  # the VLM's own, at the top level
        fields[fields.index("text_config.tie_word_embeddings")] = "tie_word_embeddings"
    # the rope and the per-layer pattern are compared even where the source only implies them
    # (legacy rope_theta, Gemma3's sliding_window_pattern): transformers derives them alike;
    # a VLM's in its text_config
    text, src = (exported["text_config"], raw if flat else raw.get("text_config") or {}) \
        if isinstance(exported.get("text_config"), dict) else (exported, raw)
    pre = "text_config." if text is not exported else ""
    fields += [pre + k for k in ("rope_parameters", "attention_bias", "sliding_window", "layer_types")
               if k in text and (k in src or k in ("rope_parameters", "layer_types"))]
    # Both sides read through transformers' config class, so that spellings it treats as one
    # (attribute_map: num_experts / num_local_experts) compare as one field.
    from bridges.core.auto import _hf_config_object
    from bridges.core.config import set_path

    back = _hf_config_object(exported, "exported config", type(bridge).hf_model_type)
    source_cfg, exported_cfg = {}, {}
    for f in fields:
        set_path(source_cfg, f, _plain(get_path(bridge.hf_config, f, None)))
        set_path(exported_cfg, f, _plain(get_path(back, f, None)))
    table = []
    if toy_dir is not None:
        toy = make_bridge(toy_dir, bridge_ref)
        tattrs = toy.megatron_attrs()
        shapes = Shapes(tattrs["num_attention_heads"], tattrs["num_query_groups"],
                        tattrs["kv_channels"], tattrs["vocab_size"], tattrs["vocab_size"])
        ckpt = toy.checkpoint
        for m in toy.table(tattrs):
            # shapes shown for the first layer the mapping applies to, expert 0
            caps = ((str(m.layers[0]) if m.layers else "0",) + ("0",) * (m.megatron.count("*") - 1)
                    if "*" in m.megatron else ())
            names = m.hf_names(caps)
            row = {**m.describe(),
                   "hf_shapes": {r: _shape(ckpt, n) for r, n in names.items()}}
            try:
                t = m.to_megatron({r: toy._read(ckpt, n) for r, n in names.items()}, 0, 1, shapes)
                row["megatron_shape"] = list(t.shape)
            except Exception as e:  # reported in the table, judged by the other checks
                row["megatron_shape"] = f"error: {e}"
            table.append(row)
    return {"attrs": {k: _plain(v) for k, v in sorted(attrs.items())},
            "source_config": source_cfg, "exported_config": exported_cfg, "fields": fields,
            "table": table}


def _shape(ckpt, name: str) -> list[int] | None:
    """Shape of an HF tensor, or of one row of a stacked one (``name[k]``)."""
    from bridges.core.mappings import split_row

    base, row = split_row(name)
    if base not in ckpt:
        return None
    return list(ckpt.shape(base))[1:] if row is not None else list(ckpt.shape(base))


def _plain(v):
    if callable(v):
        return getattr(v, "__name__", repr(v))
    if isinstance(v, torch.dtype):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, dict) and v.get("type") == v.get("rope_type") is not None:
        return {k: x for k, x in v.items() if k != "type"}  # rope's legacy spelling, said twice
    return v


def megatron_mtp(toy_dir: str, layout: str, ids: torch.Tensor,
                 bridge_ref: str | None = None) -> dict[str, Any]:
    """Logits of the converted model's first multi-token-prediction layer under ``layout``
    ([b, s, vocab], fp32, gathered over TP) on one rank of the last pipeline stage. The MTP
    block's output is caught by a forward hook during a plain forward (GPTModel returns only the
    main logits without labels) and put through the shared output layer."""
    from megatron.core import parallel_state as ps

    from bridges.core.bridge import unwrap
    from bridges.core.ledger import CoverageError

    bridge = make_bridge(toy_dir, bridge_ref)
    provider = layout_provider(bridge, layout, torch.float32)
    chunks = provider.provide_distributed_model()
    for c in chunks:
        c.eval()
    out: dict[str, Any] = {"rank": dist.get_rank(), "error": None, "mtp": None}
    try:
        bridge.load_hf_weights(chunks)
    except CoverageError as e:
        out["error"] = str(e)
        return out
    last = unwrap(chunks[-1])
    last = getattr(last, "language_model", last) if getattr(last, "mtp", None) is None else last  # a VLM's
    caught: list = []
    mtp = getattr(last, "mtp", None)
    handle = mtp.register_forward_hook(lambda _m, _i, o: caught.append(o)) if mtp is not None else None
    try:
        adapter_for(bridge=bridge).megatron_logits(chunks, ids, provider.vocab_size)
    finally:
        if handle is not None:
            handle.remove()
    if caught:
        h = torch.chunk(caught[0], 1 + last.config.mtp_num_layers, dim=0)[1]
        weight = last.shared_embedding_or_output_weight() if last.share_embeddings_and_output_weights else None
        with torch.no_grad():
            logits, _ = last.output_layer(h, weight=weight, runtime_gather_output=True)
        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            out["mtp"] = logits.transpose(0, 1)[..., :provider.vocab_size].float().cpu()
    return out


def hf_mtp_reference(toy_dir: str, ids: torch.Tensor, baseline_seed: int = 12345) -> dict[str, Any]:
    """The registered bridge's reference logits of the first MTP layer (``bridge.
    mtp_reference_logits``: [b, s - 1, vocab], fp32) on HF's main hidden state; and the same head
    on the hidden state of a re-initialised main model, as the "wrong" baseline."""
    bridge = make_bridge(toy_dir)
    ad = adapter_for(bridge=bridge)
    config = _read_config(Path(toy_dir))
    ids = ids["input_ids"] if isinstance(ids, dict) else ids  # a VLM's text-only inputs
    out = {}
    for key, model in (("logits", ad.load_hf(toy_dir, torch.float32)),
                       ("baseline", ad.build_hf({**config, "dtype": "float32"}, seed=baseline_seed))):
        with torch.no_grad():
            hidden = model.eval().model(input_ids=ids).last_hidden_state
        out[key] = bridge.mtp_reference_logits(ids, hidden).float()
    return out
