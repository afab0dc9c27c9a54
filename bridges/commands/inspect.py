"""mbridge inspect: what kind of model is this, and what in its config is new?

Reads config.json (and safetensors headers, never the weights): model type and
architectures; LLM or VLM and where each field lives; dense / MoE / MLA / hybrid markers;
quantization; the registered bridge or the closest one; and every config field no bridge
understands, flagged as a probable new block whose HF modeling code needs reading.
"""
from __future__ import annotations

import json
from pathlib import Path

from bridges import inspect_index

HELP = "describe a model's config: family, blocks, quantization, bridge, unknown fields"

MARKERS = {
    "moe": ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size",
            "num_experts_per_tok", "n_shared_experts", "shared_expert_intermediate_size"),
    "latent_moe": ("moe_latent_size",),
    "mla": ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"),
    "mtp": ("num_nextn_predict_layers", "mtp_num_layers"),
    "hybrid": ("hybrid_override_pattern", "mamba_num_heads", "ssm_state_size", "linear_num_key_heads",
               "linear_conv_kernel_dim", "full_attention_interval", "mamba_head_dim"),
}
# Fields that carry no architecture (bookkeeping, tokens, generation, runtime switches).
NEUTRAL = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype",
           "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "_name_or_path",
           "initializer_range", "auto_map", "quantization_config", "tokenizer_class",
           "return_dict", "output_hidden_states", "output_attentions", "attention_dropout",
           "pretraining_tp", "max_window_layers", "use_sliding_window", "layer_types"}


def add_arguments(parser) -> None:
    parser.add_argument("model", help="org/model (shipped fixture or hub config), a directory or a config.json")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _load(model: str) -> tuple[dict, Path | None]:
    p = Path(model).expanduser()
    if p.is_file():
        return json.loads(p.read_text()), None
    from conformance.models import resolve

    spec = resolve(model)
    return spec.config, Path(spec.checkpoint) if spec.checkpoint else None


def _quantization(config: dict, ckpt: Path | None) -> dict:
    from bridges.core.st_header import read_header

    out: dict = {}
    qc = config.get("quantization_config")
    if qc:
        out["config"] = {k: qc[k] for k in ("quant_method", "quant_algo", "format", "fmt", "weight_block_size",
                                            "activation_scheme", "bits", "group_size", "desc_act", "checkpoint_format",
                                            "version", "kv_cache_quant_algo", "load_in_4bit", "bnb_4bit_quant_type",
                                            "bnb_4bit_use_double_quant", "load_in_8bit") if k in qc}
        if qc.get("kv_cache_scheme"):  # compressed-tensors' FP8 KV cache
            out["config"]["kv_cache_scheme"] = qc["kv_cache_scheme"].get("type", True)
    if ckpt is not None:
        dtypes, companions = {}, set()
        for f in sorted(ckpt.glob("*.safetensors")):
            for name, info in read_header(f).items():
                dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + 1
                for suffix in ("_scale_inv", "_scale", "_scale_2", "_blocks", "_scales", "input_scale",
                               "k_scale", "v_scale", "_packed", "_zero_point", ".qweight", ".qzeros", ".g_idx",
                               ".absmax", ".quant_map", ".nested_absmax", ".SCB"):
                    if name.endswith(suffix):
                        companions.add(suffix)
        out["tensor_dtypes"] = dtypes
        # packed integer codes: MXFP4 / NVFP4 bytes, compressed-tensors' int32 weight_packed, GPTQ / AWQ qweight
        quantized = [d for d in dtypes if d.startswith("F8") or d in ("U8", "I8")
                     or (d == "I32" and companions & {"_packed", ".qweight"})]
        if quantized or companions:
            out["quantized_tensors"] = {"dtypes": quantized, "companions": sorted(companions)}
    return out


def _sections(config: dict) -> dict[str, dict]:
    """Top level, and the nested text / vision configs of a VLM."""
    parts = {"top": {k: v for k, v in config.items() if not isinstance(v, dict) or k in ("rope_scaling", "rope_parameters", "quantization_config")}}
    for key in ("text_config", "vision_config", "audio_config"):
        if isinstance(config.get(key), dict):
            parts[key] = config[key]
    return parts


def inspect_config(config: dict, ckpt: Path | None = None, modality: str | None = None) -> dict:
    """What ``mbridge inspect`` prints, as a dict; ``modality``: the closest bridge among the
    bridges of that kind only (``mbridge new`` looks for a VLM's language bridge with "text")."""
    from conformance.models import fixture_names, resolve

    sections = _sections(config)
    text = sections.get("text_config", config)
    kinds = [k for k, fields in MARKERS.items() if any(text.get(f) for f in fields)]
    info: dict = {
        "model_type": config.get("model_type"), "architectures": config.get("architectures"),
        "kind": "vlm" if "vision_config" in sections else "llm",
        "fields_at": {name: sorted(fields) for name, fields in sections.items()},
        "blocks": kinds or ["dense"], "quantization": _quantization(config, ckpt),
    }
    bridges, by_arch = _registry()
    found = bridges.get(config.get("model_type")) or next(
        (by_arch[a] for a in config.get("architectures") or () if a in by_arch), None)
    info["bridge"] = found["class"] if found else None
    if info["kind"] == "vlm":
        info["vision_encoder"] = vision_pattern(config, found and found["vision_pattern"])
    layers = hybrid_layers(text)
    if layers:
        info["layers"] = layers
    # Fields some registered bridge understands: its table, and the fields of its shipped configs.
    by_type: dict[str, set] = {}
    for name in fixture_names():
        c = resolve(name).config
        by_type.setdefault(c["model_type"], set()).update(c)
    handles = {mt: set(NEUTRAL) | set(b["fields"]) | by_type.get(mt, set()) for mt, b in bridges.items()}
    known = set().union(*handles.values()) if handles else set(NEUTRAL)
    keys = set(text) - {k for k in text if isinstance(text[k], dict) and k not in ("rope_scaling", "rope_parameters")}
    scores = {mt: len(keys & fields) / len(keys | fields) for mt, fields in by_type.items() if mt in bridges
              and (modality is None or bridges[mt]["modality"] == modality)}
    names, info["tensor_names_from"] = _tensor_names(config, ckpt)
    if names:  # the blocks as the tensors show them weigh more than the config's spelling
        info["tensor_blocks"] = sorted(k for k, v in _blocks(names).items() if v)
        refs = _reference_names()
        scores = {mt: s / 2 + max((_name_score(names, ref) for ref in refs.get(mt, ())), default=0.0)
                  for mt, s in scores.items()}
    closest = info["closest_bridge"] = max(scores, key=scores.get) if scores else None
    set_ = [k for k in keys if text.get(k) not in (None, False, 0, [], {})]
    info["unknown_fields"] = sorted(k for k in set_ if k not in known)  # no bridge handles them
    # what a bridge starting from the closest one would still have to handle
    info["unhandled_by_closest"] = sorted(k for k in set_ if k not in handles.get(closest, known))
    return info


# Per-layer block names of hybrid configs -> Megatron-Core HybridModel symbols, per field: each HF
# layer is a mixer (M Mamba-2, G gated delta net, * attention) and, where the family pairs it with
# one, an MLP (- dense, E MoE). "linear_attention" is Mamba-2 in Nemotron-H's layers_block_type
# (transformers 5) and the gated delta net in Qwen3-Next / Qwen3.5's layer_types.
HF_KINDS = {
    "hybrid_override_pattern": {"M": "M", "*": "*", "-": "-", "E": "E"},
    "layers_block_type": {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*",
                          "mlp": "-", "moe": "E"},
    "layer_types": {"linear_attention": "G", "full_attention": "*"},
    "full_attention_interval": {"linear_attention": "G", "full_attention": "*"},
}
SYMBOL_NAMES = {"M": "Mamba-2", "G": "gated delta net", "*": "attention", "-": "MLP", "E": "MoE"}


def hybrid_layers(text: dict) -> dict | None:
    """The layer pattern of a hybrid config, from whichever field spells it
    (``hybrid_override_pattern``, ``layers_block_type``, ``layer_types`` with linear attention,
    ``full_attention_interval``): counts per block kind, the HybridModel pattern it maps to
    (a mixer-only family's layers as they are; a family whose layers also hold an MLP or MoE
    gets that after each mixer), and the block names nothing here knows, with their layers."""
    n = text.get("num_hidden_layers")
    if text.get("hybrid_override_pattern"):
        field, kinds = "hybrid_override_pattern", list(text["hybrid_override_pattern"])
    elif isinstance(text.get("layers_block_type"), list):
        field, kinds = "layers_block_type", list(text["layers_block_type"])
    elif isinstance(text.get("layer_types"), list) and "linear_attention" in text["layer_types"]:
        field, kinds = "layer_types", list(text["layer_types"])
    elif text.get("full_attention_interval") and n:
        every = int(text["full_attention_interval"])
        field, kinds = "full_attention_interval", ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                                                   for i in range(int(n))]
    else:
        return None
    known = HF_KINDS[field]
    unknown: dict[str, list[int]] = {}
    for i, k in enumerate(kinds):
        if k not in known:
            unknown.setdefault(str(k), []).append(i)
    symbols = [known.get(k, "?") for k in kinds]
    if field in ("layer_types", "full_attention_interval"):  # each HF layer also holds its MLP
        mlp = "E" if any(text.get(f) for f in ("num_experts", "num_local_experts", "n_routed_experts")) else "-"
        symbols = [x for s in symbols for x in (s, mlp)]
    counts = {SYMBOL_NAMES.get(x, "unknown"): symbols.count(x) for x in dict.fromkeys(symbols)}
    return {"from": field, "hf_layers": len(kinds), "counts": counts, "pattern": "".join(symbols),
            "unknown": unknown}


# The two ways a VLM's vision tower lives in the Megatron model (docs/gemma3-vl.md)
PATTERNS = {"hf": "HF vision encoder: the tower and projector kept as transformers' modules, "
                  "replicated over TP on the first stage (the gemma3 bridge's pattern)",
            "megatron": "Megatron vision encoder: the tower built from Megatron-Core blocks, "
                        "TP-sharded (fused qkv, 2-D vision rotary; the qwen2_5_vl bridge's pattern)"}
HF_TOWERS = ("siglip_vision_model", "siglip2_vision_model", "clip_vision_model", "pixtral")
MEGATRON_TOWER_FIELDS = ("fullatt_block_indexes", "spatial_merge_size", "deepstack_visual_indexes",
                         "temporal_patch_size")


def vision_pattern(config: dict, kind: str | None = None) -> str:
    """Which VLM pattern a config calls for: ``kind``, its registered bridge's ("hf" or
    "megatron"), else from its vision config (towers transformers ships as plain modules vs.
    Qwen-VL style towers)."""
    v = config.get("vision_config") or {}
    if kind is None:
        kind = "megatron" if any(f in v for f in MEGATRON_TOWER_FIELDS) else \
            "hf" if v.get("model_type") in HF_TOWERS else None
    if kind is None:
        return f"unknown (vision_config.model_type={v.get('model_type')!r}): read the HF modeling code"
    return PATTERNS[kind]


# Blocks that tensor names show and a config does not always say (QK norm, fused projections,
# biases); experts and MLA too. Compared between a model and each registered bridge's table.
BLOCKS = {
    "fused_qkv": r"\.(qkv_proj|query_key_value|Wqkv)\.",
    "fused_gate_up": r"^(?!.*experts).*\.gate_up_proj\.",
    "qk_norm": r"\.(q_norm|k_norm|q_layernorm|k_layernorm)\.",
    "qkv_bias": r"\.(q_proj|k_proj|v_proj|qkv_proj)\.bias$",
    "o_bias": r"\.o_proj\.bias$",
    "experts": r"\.experts\.",
    "shared_expert": r"\.shared_experts?\.",
    "mla": r"\.(kv_a_proj_with_mqa|kv_b_proj)\.",
    "untied_head": r"^lm_head\.",
}


def _normalise(names) -> set[str]:
    """Tensor names with layer / expert indices as ``*`` (and no stacked-row suffix)."""
    import re

    return {re.sub(r"\.\d+(?=\.)", ".*", re.sub(r"\[\*\]$", "", n)) for n in names
            if "rotary_emb" not in n and not n.endswith(("_scale_inv", "_scale", "_scales"))}


def _blocks(names: set[str]) -> dict[str, bool]:
    import re

    return {k: any(re.search(rx, n) for n in names) for k, rx in BLOCKS.items()}


def _name_score(names: set[str], ref: set[str]) -> float:
    """Up to 2 for the blocks (each one present in both or absent from both), up to 1 for the
    shared tensor names."""
    a, b = _blocks(names), _blocks(ref)
    return 2 * sum(a[k] == b[k] for k in BLOCKS) / len(BLOCKS) + len(names & ref) / len(names | ref)


def _tensor_names(config: dict, ckpt: Path | None) -> tuple[set[str] | None, str | None]:
    """The model's tensor names: from the checkpoint's index or safetensors headers when there
    are weights; else from transformers' own class for the model type, built on the meta device
    (no memory, no download, never remote code; bridges/inspect_index.json holds the answer for
    the shipped configs, so that inspect of those imports no torch); None when neither is possible."""
    if ckpt is not None:
        index = ckpt / "model.safetensors.index.json"
        if index.exists():
            return _normalise(json.loads(index.read_text()).get("weight_map", {})), index.name
        files = sorted(ckpt.glob("*.safetensors"))
        if files:
            from bridges.core.st_header import read_header

            names = [n for f in files for n in read_header(f) if n != "__metadata__"]
            return _normalise(names), "safetensors headers"
    known = inspect_index.tensor_names(config)
    if known is not None:
        return known
    return _transformers_names(config)


def _transformers_names(config: dict) -> tuple[set[str] | None, str | None]:
    try:
        import torch
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        from conformance.toy import shrink_config

        small = shrink_config(config)
        kw = {k: v for k, v in small.items() if k not in ("model_type", "transformers_version", "auto_map")}
        cfg = AutoConfig.for_model(small["model_type"], **kw)
        with torch.device("meta"):
            model = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)](cfg)
        return _normalise(model.state_dict()), f"transformers {type(model).__name__}"
    except Exception:  # noqa: BLE001 - a model type transformers does not know: config only
        return None, None


def _registry() -> tuple[dict[str, dict], dict[str, dict]]:
    """What inspect reads of the registered bridges, per model type (see ``_bridge_facts``),
    and per registered architecture: from the index (no torch) when it stands for this code,
    else from the live registry."""
    index = inspect_index.load()
    if index is not None:
        bridges = index["bridges"]
        return bridges, {a: bridges[mt] for a, mt in index["architectures"].items()}
    return _live_registry()


def _bridge_facts(cls) -> dict:
    return {"class": cls.__name__, "modality": getattr(cls, "modality", "text"),
            "vision_pattern": getattr(cls, "vision_pattern", None),
            "fields": sorted({f.hf.split(".")[-1] for f in cls.config_fields}
                             | {f for f, _ in getattr(getattr(cls, "language_bridge", cls), "checked_fields", ())})}


def _live_registry() -> tuple[dict[str, dict], dict[str, dict]]:
    from bridges.core import registry

    bridges = {mt: _bridge_facts(cls) for mt, cls in registry.registered().items()}
    return bridges, {a: _bridge_facts(cls) for a, cls in registry._BY_ARCH.items()}


def _reference_names() -> dict[str, list[set[str]]]:
    """HF tensor names of every registered bridge's table, once per shipped config."""
    index = inspect_index.load()
    if index is not None:
        return {mt: [set(n) for n in names] for mt, names in index["reference_names"].items()}
    return _live_reference_names()


def _live_reference_names() -> dict[str, list[set[str]]]:
    from bridges.core.auto import AutoBridge
    from conformance.models import fixture_names, resolve

    out: dict[str, list[set[str]]] = {}
    for name in fixture_names():
        try:
            bridge = AutoBridge.from_hf_config(resolve(name).config, trust_remote_code=True)
            table = bridge.table(bridge.megatron_attrs())
        except Exception:  # noqa: BLE001 - a fixture no registered bridge reads
            continue
        names = [n for m in table if not m.alternate for n in m.roles.values()]
        out.setdefault(bridge.model_type, []).append(_normalise(names))
    return out


def run(args) -> int:
    config, ckpt = _load(args.model)
    info = inspect_config(config, ckpt)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"model type     {info['model_type']}  {', '.join(info['architectures'] or [])}")
    print(f"kind           {info['kind'].upper()}; fields at " +
          "; ".join(f"{k}: {len(v)}" for k, v in info["fields_at"].items()))
    print(f"blocks         {', '.join(info['blocks'])}")
    if info.get("vision_encoder"):
        print(f"vision         {info['vision_encoder']}")
    q = info["quantization"]
    print(f"quantization   {q.get('config') or 'none in config'}" +
          (f"; tensors: {q['quantized_tensors']}" if q.get("quantized_tensors") else ""))
    lay = info.get("layers")
    if lay:
        print(f"layers         {lay['hf_layers']} HF layers ({lay['from']}): " +
              ", ".join(f"{v} {k}" for k, v in lay["counts"].items()) +
              f"; HybridModel pattern {lay['pattern'][:60]}{'...' if len(lay['pattern']) > 60 else ''}")
        for kind, where in lay["unknown"].items():
            print(f"               unknown block type {kind!r} at layers {where[:8]}{' ...' if len(where) > 8 else ''}: "
                  f"read its HF modeling code (no Megatron-Core symbol known for it)")
    if info.get("tensor_blocks") is not None:
        print(f"tensors        {', '.join(info['tensor_blocks']) or 'plain'} (from {info['tensor_names_from']})")
    print(f"bridge         {info['bridge'] or 'none registered'}"
          + ("" if info["bridge"] else f" (closest: {info['closest_bridge']})"))
    if info["unknown_fields"]:
        print("unknown fields (probable new blocks: read the HF modeling code):")
        for k in info["unknown_fields"]:
            print(f"  {k} = {json.dumps(config.get(k, (config.get('text_config') or {}).get(k)))[:80]}")
    else:
        print("unknown fields none")
    if info["unhandled_by_closest"] and not info["bridge"]:
        print(f"not read by the closest bridge ({info['closest_bridge']}): "
              + ", ".join(info["unhandled_by_closest"]))
    return 0
