"""mbridge inspect: what kind of model is this, and what in its config is new?

Reads config.json (and safetensors headers, never the weights): model type and
architectures; LLM or VLM and where each field lives; dense / MoE / MLA / hybrid markers;
quantization; the registered bridge or the closest one; and every config field no bridge
understands, flagged as a probable new block whose HF modeling code needs reading.
"""
from __future__ import annotations

import json
from pathlib import Path

HELP = "describe a model's config: family, blocks, quantization, bridge, unknown fields"

MARKERS = {
    "moe": ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size",
            "num_experts_per_tok", "n_shared_experts", "shared_expert_intermediate_size"),
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
    from bridges.core.hf_io import read_header

    out: dict = {}
    qc = config.get("quantization_config")
    if qc:
        out["config"] = {k: qc[k] for k in ("quant_method", "fmt", "weight_block_size", "bits")
                         if k in qc}
    if ckpt is not None:
        dtypes, companions = {}, set()
        for f in sorted(ckpt.glob("*.safetensors")):
            for name, info in read_header(f).items():
                dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + 1
                for suffix in ("_scale_inv", "_scale", "_blocks", "_scales"):
                    if name.endswith(suffix):
                        companions.add(suffix)
        out["tensor_dtypes"] = dtypes
        quantized = [d for d in dtypes if d.startswith("F8") or d in ("U8", "I8")]
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


def inspect_config(config: dict, ckpt: Path | None = None) -> dict:
    from bridges.core.registry import UnknownModelError, lookup, registered
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
    try:
        info["bridge"] = lookup(config).__name__
    except UnknownModelError:
        info["bridge"] = None
    # Fields some registered bridge understands: its table, and the fields of its shipped configs.
    by_type: dict[str, set] = {}
    for name in fixture_names():
        c = resolve(name).config
        by_type.setdefault(c["model_type"], set()).update(c)
    handles = {mt: set(NEUTRAL) | {f.hf.split(".")[-1] for f in cls.config_fields} | by_type.get(mt, set())
               for mt, cls in registered().items()}
    known = set().union(*handles.values()) if handles else set(NEUTRAL)
    keys = set(text) - {k for k in text if isinstance(text[k], dict) and k not in ("rope_scaling", "rope_parameters")}
    scores = {mt: len(keys & fields) / len(keys | fields) for mt, fields in by_type.items() if mt in registered()}
    closest = info["closest_bridge"] = max(scores, key=scores.get) if scores else None
    set_ = [k for k in keys if text.get(k) not in (None, False, 0, [], {})]
    info["unknown_fields"] = sorted(k for k in set_ if k not in known)  # no bridge handles them
    # what a bridge starting from the closest one would still have to handle
    info["unhandled_by_closest"] = sorted(k for k in set_ if k not in handles.get(closest, known))
    return info


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
    q = info["quantization"]
    print(f"quantization   {q.get('config') or 'none in config'}" +
          (f"; tensors: {q['quantized_tensors']}" if q.get("quantized_tensors") else ""))
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
