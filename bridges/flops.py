"""Exact FLOPs and parameter counts of a Megatron-Core model, from the bridge's attributes.

    from bridges import AutoBridge
    from bridges.flops import training_flops

    bridge = AutoBridge.from_hf_config("fixtures/configs/meta-llama/Llama-3.1-8B/config.json")
    report = training_flops(bridge, seq_len=4096, batch_size=1)
    report.total            # FLOPs of one training step (forward + backward)
    report.step("mlp")      # one component, whole step
    report.params.total     # parameter count from the same attributes

Conventions (docs/flops.md has the formulas):

- Matmul FLOPs only, **2 FLOPs per multiply-add**. Elementwise work (norms, activations,
  softmax, rotary, bias adds, residuals, the loss) is not counted: it is a fraction of a
  percent at these sizes and no GEMM runs it.
- **Backward = 2 x forward** for every matmul term (one GEMM for the input gradient, one for
  the weight gradient; in core attention one for each operand), so a training step is 3 x
  forward. ``recompute="selective"`` adds one more forward of core attention, ``"full"`` one
  more forward of every transformer layer (Megatron's activation recomputation); the default
  ``None`` gives *model* FLOPs, the ones MFU is defined on.
- **Embedding: 0 FLOPs** (a row lookup; its backward is a scatter-add). The output projection
  (``logits``) is a matmul whether or not it shares the embedding's weight.
- **Core attention counts exactly the unmasked score entries.** Causal, a sequence of length s
  has s(s+1)/2 query-key pairs per head (the diagonal included), not s^2; ``causal=False`` counts
  s^2 (the convention of Narayanan et al. 2021 and of PaLM's MFU). A sliding window
  ``window_size=(left, right)`` (Megatron's convention, -1 = unbounded) counts the pairs inside
  the window exactly; per-layer windows follow ``window_attn_skip_freq`` as Megatron-Core does.
  Packed (varlen) batches: pass a list of sequence lengths; attention is summed per sequence,
  with no attention across sequences. Kernels compute whole tiles, so the FLOPs a GPU executes
  are a little higher than these model FLOPs.
- The vocabulary is the model's ``vocab_size``, not Megatron's padded one.

Model input: a bridge (its provider's attributes: ``megatron_attrs()`` over the provider's
defaults), a provider, or a flat dict of TransformerConfig / GPTModel fields, in which a missing
field takes Megatron-Core's default (``gated_linear_unit=False``, ``add_bias_linear=True``,
``normalization="LayerNorm"``, ``ffn_hidden_size=4*hidden``, ``num_query_groups=heads``,
``kv_channels=hidden/heads``, ``position_embedding_type="learned_absolute"``, untied output).

Mixture of experts, multi-latent attention and multi-token prediction are counted from their
Megatron-Core fields (``num_moe_experts``, ``moe_router_topk``, ``moe_ffn_hidden_size``,
``moe_shared_expert_intermediate_size``, ``moe_shared_expert_gate``, ``moe_layer_freq``;
``multi_latent_attention``, ``q_lora_rank``, ``kv_lora_rank``, ``qk_head_dim``,
``qk_pos_emb_head_dim``, ``v_head_dim``; ``mtp_num_layers``), which the MoE and MLA bridges
give through ``megatron_attrs``; ``attrs_from_hf_config`` takes an HF config through its bridge
(one config translator for conversion and FLOPs). They add the
components ``router`` (router logits H x E, and Qwen2-MoE's H x 1 shared-expert gate),
``routed_experts`` (top-k experts per token; at ``moe_latent_size`` where set),
``latent_projections`` (a latent MoE's H -> latent -> H around its routed experts),
``shared_experts`` and ``mtp`` (per MTP layer:
eh_proj 2H -> H, one transformer layer, the shared output head's logits), each only for models
that have it, so a dense model's report is unchanged.

Hybrid stacks (Megatron-Core's HybridModel) are read from ``hybrid_layer_pattern``: one layer per
symbol, Mamba-2 (``M``: ``mamba_*`` fields, ``mamba_conv_kernel`` and ``mamba_chunk_size`` as
the mixer's), gated delta net (``G``: ``linear_*``), attention (``*``, with
``attention_output_gate``), MLP (``-``) and MoE (``E``), MTP depths after ``/``.

Extending: the model is described per layer (``_layer_plan``: which token mixer and which MLP
each layer has); ``_layer_forward`` gives one layer's FLOPs per component and ``_params`` the
parameters. A block not written yet has its config fields in ``UNSUPPORTED`` (or its pattern
symbol missing from ``HYBRID``) and raises ``FlopsError`` naming it, so nothing is silently
counted as a dense layer.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridges.core.config import ConfigError

__all__ = ["ALL_COMPONENTS", "COMPONENTS", "FlopsError", "FlopsReport",
           "Params", "Term", "UNSUPPORTED", "attention_pairs", "attrs_from_hf_config",
           "model_attrs", "parameter_counts", "training_flops"]

# The components of a dense model; MoE and MTP models have more (ALL_COMPONENTS, in report order).
COMPONENTS = ("embedding", "qkv_projection", "core_attention", "attention_output_projection",
              "mlp", "logits")
ALL_COMPONENTS = ("vision_tower", "projector", "embedding", "qkv_projection", "attention_output_gate", "core_attention",
                  "attention_output_projection", "mamba_in_projection", "mamba_conv", "mamba_scan",
                  "mamba_out_projection", "gdn_in_projection", "gdn_conv", "gdn_recurrence", "gdn_out_projection",
                  "mlp", "router", "latent_projections", "routed_experts", "shared_experts", "logits", "mtp")
_MOE_COMPONENTS = ("router", "latent_projections", "routed_experts", "shared_experts")
RECOMPUTE = (None, "selective", "full")


class FlopsError(ConfigError):
    """The configuration has a feature the calculator does not count (yet), or lacks a field."""


# Config fields that switch on blocks this calculator does not count yet: (field, what it
# means). A field trips when its value is set (not None / False / 0 / empty), except where a
# predicate says otherwise. Megatron-Core names first, then HF spellings a bridge may pass.
def _set(v: Any) -> bool:
    return v not in (None, False, 0, "", (), [])


_HF = " (an HF field: pass the HF config through attrs_from_hf_config)"
UNSUPPORTED: tuple[tuple[str, str, Any], ...] = (
    ("num_experts", "mixture of experts" + _HF, _set),
    ("num_local_experts", "mixture of experts" + _HF, _set),
    ("n_routed_experts", "mixture of experts" + _HF, _set),
    ("num_nextn_predict_layers", "multi-token prediction heads (MTP)" + _HF, _set),
    ("moe_pad_expert_input_to_capacity", "MoE expert inputs padded to capacity", _set),
    ("experimental_attention_variant", "linear / sparse attention (e.g. gated delta net, DSA)", _set),
    ("linear_attention_freq", "linear attention layers (e.g. gated delta net)", _set),
    ("hybrid_override_pattern", "a hybrid layer pattern under Megatron-LM's old name (give it as "
     "hybrid_layer_pattern)", _set),
    ("heterogeneous_block_specs", "heterogeneous per-layer block specs", _set),
    ("softmax_type", "a softmax other than vanilla, off-by-one or learnable sinks",
     lambda v: v not in (None, "vanilla", "off-by-one", "learnable")),
    ("layer_types", "per-layer attention types other than full attention",
     lambda v: _set(v) and any(t != "full_attention" for t in v)),
)

# Megatron-Core defaults for fields a plain dict may leave out (TransformerConfig; GPTModel for
# the last three).
_DEFAULTS: dict[str, Any] = dict(
    gated_linear_unit=False, add_bias_linear=True, add_qkv_bias=False, qk_layernorm=False,
    normalization="LayerNorm", window_size=None, window_attn_skip_freq=None,
    share_embeddings_and_output_weights=False, position_embedding_type="learned_absolute",
    max_sequence_length=None)
_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")


# -- input ---------------------------------------------------------------------------------
def model_attrs(model: Any) -> dict[str, Any]:
    """The flat attributes of a bridge (its provider's, defaults included), a provider, or a dict."""
    if isinstance(model, Mapping):
        return dict(model)
    if hasattr(model, "as_dict"):  # a provider
        return model.as_dict()
    if hasattr(model, "to_megatron_provider"):  # a bridge
        try:
            return model.to_megatron_provider().as_dict()
        except NotImplementedError:  # a bridge without a provider (an AttributeError is a bug)
            return model.megatron_attrs()
    raise TypeError(f"expected a bridge, a provider or a dict of Megatron attributes, got "
                    f"{type(model).__name__}")


# -- HF configs ---------------------------------------------------------------------------------
def attrs_from_hf_config(config: Any) -> dict[str, Any]:
    """The calculator's attributes for an HF config (a dict, a config.json, a directory holding
    one, a transformers config): its registered bridge's translation, the provider's defaults
    included. There is one config translator, the bridge's; what a bridge refuses (a field it
    cannot represent, an unknown model type) is a ``FlopsError`` naming it."""
    from bridges.core.auto import AutoBridge
    from bridges.core.registry import UnknownModelError

    try:
        return model_attrs(AutoBridge.from_hf_config(config))
    except (ConfigError, UnknownModelError) as e:
        raise FlopsError(str(e)) from e


@dataclass(frozen=True)
class _Arch:
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    qk_head_dim: int
    v_head_dim: int
    vocab: int
    tied: bool
    gated: bool
    qkv_bias: bool
    linear_bias: bool
    qk_norm: bool
    norm_params: int  # per hidden_size element: 1 for RMSNorm, 2 for LayerNorm (weight + bias)
    layer_norms: int  # norms of hidden_size per layer: 2, or 4 with post-sublayer norms (Gemma2/3)
    position_embedding_type: str
    max_sequence_length: int | None
    window_size: tuple[int, int] | None
    window_attn_skip_freq: int | list | None
    moe: _MoE | None = None
    moe_layers: tuple[bool, ...] = ()  # per layer: MoE MLP (True) or dense (False)
    mla: _MLA | None = None
    mtp_layers: int = 0
    pattern: tuple[str, ...] = ()  # a hybrid model's layer symbols (HybridModel); () for GPT layers
    mtp_pattern: str = ""  # the symbols of one MTP depth of a hybrid model
    mamba: _Mamba | None = None
    gdn: _GDN | None = None
    output_gate: bool = False  # attention_output_gate: sigmoid(x W_g) scales the attention output
    sinks: bool = False  # softmax_type "learnable": one logit per head (parameters, no matmul)
    qk_norm_full: bool = False  # q/k norms over the whole projection (OLMoE): heads x head_dim weights


@dataclass(frozen=True)
class _MoE:
    experts: int
    topk: int
    ffn: int  # one routed expert's FFN width
    shared_ffn: int  # all shared experts together (0: none)
    shared_gate: bool  # Qwen2-MoE: sigmoid(x W), W of H x 1, scales the shared experts
    latent: int = 0  # Nemotron 3 Super: the routed experts' width in and out (0: the hidden size)


@dataclass(frozen=True)
class _Mamba:
    heads: int
    head_dim: int
    groups: int  # B / C groups (n_groups)
    state: int  # d_state
    conv: int  # causal conv kernel
    chunk: int  # SSD chunk length

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim

    @property
    def conv_dim(self) -> int:  # x, B and C go through the convolution
        return self.inner + 2 * self.groups * self.state


@dataclass(frozen=True)
class _GDN:
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    conv: int

    @property
    def keys(self) -> int:
        return self.k_heads * self.k_dim

    @property
    def values(self) -> int:
        return self.v_heads * self.v_dim


@dataclass(frozen=True)
class _MLA:
    q_lora_rank: int | None  # None: a plain q projection
    kv_lora_rank: int
    nope: int  # qk_head_dim (Megatron) / qk_nope_head_dim (HF)
    rope: int  # qk_pos_emb_head_dim / qk_rope_head_dim
    v: int


def _int(a: Mapping[str, Any], name: str, why: str) -> int:
    if a.get(name) in (None, ""):
        raise FlopsError(f"config field {name} is required for {why} but is missing")
    return int(a[name])


def _moe(a: Mapping[str, Any], num_layers: int, ffn: int) -> tuple[_MoE | None, tuple[bool, ...]]:
    experts = a.get("num_moe_experts")
    if not experts:
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                     "moe_shared_expert_gate", "moe_latent_size"):
            if _set(a.get(name)):
                raise FlopsError(f"config field {name}={a[name]!r} is set but num_moe_experts is "
                                 f"not: no MoE layer would use it")
        return None, (False,) * num_layers
    experts, topk = int(experts), int(a.get("moe_router_topk") or 2)
    if not 1 <= topk <= experts:
        raise FlopsError(f"moe_router_topk={topk} must be in 1..num_moe_experts={experts}")
    shared = int(a.get("moe_shared_expert_intermediate_size") or 0)
    gate = bool(a.get("moe_shared_expert_gate"))
    if gate and not shared:
        raise FlopsError("moe_shared_expert_gate is set without shared experts "
                         "(moe_shared_expert_intermediate_size)")
    freq = a.get("moe_layer_freq", 1)
    if isinstance(freq, int) and not isinstance(freq, bool) and freq >= 1:
        pattern = tuple(i % freq == 0 for i in range(num_layers))  # Megatron: layer 0 is MoE
    elif isinstance(freq, (list, tuple)) and len(freq) == num_layers and set(freq) <= {0, 1}:
        pattern = tuple(bool(x) for x in freq)
    else:
        raise FlopsError(f"moe_layer_freq={freq!r}: expected an int >= 1 or a list of {num_layers} "
                         f"0/1 entries (a string pattern is not evaluated)")
    latent = int(a.get("moe_latent_size") or 0)
    return _MoE(experts, topk, int(a.get("moe_ffn_hidden_size") or ffn), shared, gate, latent), pattern


def _mla(a: Mapping[str, Any], has_q_lora_field: bool) -> _MLA | None:
    if not a.get("multi_latent_attention"):
        for name in ("q_lora_rank", "kv_lora_rank"):
            if _set(a.get(name)):
                raise FlopsError(f"config field {name}={a[name]!r} is set but "
                                 f"multi_latent_attention is not")
        return None
    why = "multi-latent attention"
    if not has_q_lora_field:
        raise FlopsError("config field q_lora_rank is required for multi-latent attention "
                         "(None: no q LoRA) but is missing")
    if a.get("add_qkv_bias") or a.get("add_bias_linear"):
        raise FlopsError("biases in multi-latent attention (add_qkv_bias / add_bias_linear) are "
                         "not counted yet")
    q = a.get("q_lora_rank")
    return _MLA(int(q) if q else None, _int(a, "kv_lora_rank", why), _int(a, "qk_head_dim", why),
                _int(a, "qk_pos_emb_head_dim", why), _int(a, "v_head_dim", why))


HYBRID = {"M": ("mamba", None), "G": ("gdn", None), "*": ("attention", None), "-": (None, "dense"),
          "E": (None, "moe")}  # Megatron-Core's HybridModel symbols this calculator counts


def _pattern(a: Mapping[str, Any], num_layers: int) -> tuple[tuple[str, ...], str, int]:
    """(the main layers' symbols, one MTP depth's symbols, MTP depths) of ``hybrid_layer_pattern``
    (``"M-M*-|M-M*-/*E/*E"``: ``|`` splits pipeline stages, each ``/`` starts an MTP depth)."""
    text = a.get("hybrid_layer_pattern")
    if not text:
        for name in ("is_hybrid_model", "mamba_num_heads"):
            if _set(a.get(name)):
                raise FlopsError(f"config field {name}={a[name]!r} is set but hybrid_layer_pattern is not: "
                                 f"which layers are Mamba, attention or MLP is unknown")
        return (), "", 0
    main, *mtp = str(text).split("/")
    main = main.replace("|", "")
    for sym in set(main + "".join(mtp)) - set(HYBRID):
        raise FlopsError(f"hybrid_layer_pattern symbol {sym!r} has no FLOPs term (counted: "
                         f"{', '.join(f'{k} {v[0] or v[1]}' for k, v in HYBRID.items())})")
    if len(main) != num_layers:
        raise FlopsError(f"hybrid_layer_pattern has {len(main)} layers, num_layers is {num_layers}")
    if len(set(mtp)) > 1:
        raise FlopsError(f"hybrid_layer_pattern: MTP depths differ ({mtp}); Megatron-Core repeats one")
    return tuple(main), (mtp[0] if mtp else ""), len(mtp)


def _mamba(a: Mapping[str, Any], h: int) -> _Mamba:
    head_dim = int(a.get("mamba_head_dim") or 64)
    heads = int(a.get("mamba_num_heads") or 0) or 2 * h // head_dim  # Megatron: expand 2
    return _Mamba(heads, head_dim, int(a.get("mamba_num_groups") or 8), int(a.get("mamba_state_dim") or 128),
                  int(a.get("mamba_conv_kernel") or 4), int(a.get("mamba_chunk_size") or 128))


def _gdn(a: Mapping[str, Any]) -> _GDN:
    g = _GDN(int(a.get("linear_num_key_heads") or 16), int(a.get("linear_num_value_heads") or 32),
             int(a.get("linear_key_head_dim") or 128), int(a.get("linear_value_head_dim") or 128),
             int(a.get("linear_conv_kernel_dim") or 4))
    if g.v_heads % g.k_heads:
        raise FlopsError(f"linear_num_value_heads={g.v_heads} does not divide by linear_num_key_heads={g.k_heads}")
    return g


def _arch(attrs: Mapping[str, Any]) -> _Arch:
    for name, what, trips in UNSUPPORTED:
        if name in attrs and trips(attrs[name]):
            raise FlopsError(f"config field {name}={attrs[name]!r} turns on {what}, which the FLOPs "
                             f"calculator does not count yet (bridges/flops.py: add a term for it)")
    a = {**_DEFAULTS, **{k: v for k, v in attrs.items() if v is not None}}
    for name in _REQUIRED:
        if not a.get(name):
            raise FlopsError(f"config field {name} is required to count FLOPs but is missing")
    h, heads = int(a["hidden_size"]), int(a["num_attention_heads"])
    kv = int(a.get("kv_channels") or 0) or h // heads
    groups = int(a.get("num_query_groups") or heads)
    if heads % groups:
        raise FlopsError(f"num_attention_heads={heads} does not divide by num_query_groups={groups}")
    norm = {"RMSNorm": 1, "LayerNorm": 2}.get(a["normalization"])
    if norm is None:
        raise FlopsError(f"normalization={a['normalization']!r} is not known (RMSNorm, LayerNorm)")
    window = a["window_size"]
    if window is not None:
        window = (int(window[0]), int(window[1]))
        if any(w < -1 for w in window):
            raise FlopsError(f"window_size={window} is not a valid (left, right) window")
    num_layers, ffn = int(a["num_layers"]), int(a.get("ffn_hidden_size") or 4 * h)
    pattern, mtp_pattern, depths = _pattern(a, num_layers)
    moe, moe_layers = _moe({**a, "moe_layer_freq": [int(x == "E") for x in pattern]} if pattern else a,
                           num_layers, ffn)
    mla = _mla(a, "q_lora_rank" in attrs)
    qk_dim, v_dim = (mla.nope + mla.rope, mla.v) if mla else (kv, kv)
    mtp = depths or int(a.get("mtp_num_layers") or 0)
    if mtp < 0:
        raise FlopsError(f"mtp_num_layers={mtp} must be >= 0")
    return _Arch(num_layers=num_layers, hidden=h, ffn=ffn,
                 heads=heads, groups=groups, qk_head_dim=qk_dim, v_head_dim=v_dim,
                 vocab=int(a["vocab_size"]), tied=bool(a["share_embeddings_and_output_weights"]),
                 gated=bool(a["gated_linear_unit"]), qkv_bias=bool(a["add_qkv_bias"]),
                 linear_bias=bool(a["add_bias_linear"]), qk_norm=bool(a["qk_layernorm"]),
                 norm_params=norm, layer_norms=1 if pattern else 4 if a.get("post_sublayer_norms") else 2,
                 position_embedding_type=str(a["position_embedding_type"]),
                 max_sequence_length=a["max_sequence_length"], window_size=window,
                 window_attn_skip_freq=a["window_attn_skip_freq"], moe=moe,
                 moe_layers=moe_layers, mla=mla, mtp_layers=mtp, pattern=pattern, mtp_pattern=mtp_pattern,
                 mamba=_mamba(a, h) if "M" in pattern + tuple(mtp_pattern) else None,
                 gdn=_gdn(a) if "G" in pattern + tuple(mtp_pattern) else None,
                 output_gate=bool(a.get("attention_output_gate")),
                 sinks=a.get("softmax_type") == "learnable", qk_norm_full=bool(a.get("qk_norm_full_projection")))


def architecture(model: Any) -> _Arch:
    """The calculator's view of a model (a bridge, a provider or its attributes): sizes, the
    MoE and MLA shapes, the per-layer MoE pattern. The recipes' memory estimate reads it too."""
    return _arch(model_attrs(model))


@dataclass(frozen=True)
class _Layer:
    """What one transformer layer holds. New kinds (MoE MLP, MLA, Mamba, gated delta net) are
    new values here, decided per layer from the config in ``_layer_plan``."""
    mixer: str | None = "attention"  # attention, mla, mamba, gdn; None: an MLP-only hybrid layer
    mlp: str | None = "dense"  # dense, moe; None: a mixer-only hybrid layer
    window: tuple[int, int] | None = None


def _layer_plan(arch: _Arch) -> list[_Layer]:
    """One entry per layer. Windowed layers follow Megatron-Core's
    ``is_layer_window_attention`` (layer numbers from 1): with an int skip frequency N every N-th
    layer is full attention; with a list, entry 1 marks a sliding-window layer."""
    skip = arch.window_attn_skip_freq
    if isinstance(skip, (list, tuple)) and len(skip) != arch.num_layers:
        raise FlopsError(f"window_attn_skip_freq has {len(skip)} entries, num_layers is "
                         f"{arch.num_layers}")
    if isinstance(skip, int) and skip < 1:
        raise FlopsError(f"window_attn_skip_freq={skip} must be >= 1")
    if arch.pattern:
        return [_Layer(*HYBRID[x]) for x in arch.pattern]
    plan = []
    for number in range(1, arch.num_layers + 1):
        windowed = arch.window_size is not None and (
            skip is None or (number % skip != 0 if isinstance(skip, int) else bool(skip[number - 1])))
        plan.append(_Layer(mixer="mla" if arch.mla else "attention",
                           window=arch.window_size if windowed else None,
                           mlp="moe" if arch.moe_layers[number - 1] else "dense"))
    return plan


# -- attention pairs -----------------------------------------------------------------------
def _sum_min(s: int, cap: int) -> int:
    """sum over i in [0, s) of min(i, cap); cap -1 means unbounded."""
    if cap < 0 or cap >= s - 1:
        return s * (s - 1) // 2
    return cap * (cap + 1) // 2 + (s - 1 - cap) * cap


def attention_pairs(seq_len: int, causal: bool = True, window: tuple[int, int] | None = None) -> int:
    """Query-key pairs one head scores in one sequence: exactly the unmasked entries.

    Query i sees keys j with i - left <= j <= i + right (``window=(left, right)``, -1 unbounded,
    None: no window); causal also requires j <= i. Causal full attention: s(s+1)/2; not causal: s^2.
    """
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    return seq_len + _sum_min(seq_len, left) + _sum_min(seq_len, right)


# -- terms ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Batch:
    seq_lens: tuple[int, ...]  # the sequences of one batch row (one entry unless packed)
    batch_size: int
    causal: bool

    @property
    def tokens(self) -> int:
        return self.batch_size * sum(self.seq_lens)


def _qkv_width(a: _Arch) -> int:
    return a.heads * a.qk_head_dim + a.groups * (a.qk_head_dim + a.v_head_dim)


def _qkv_weights(a: _Arch) -> int:
    """Weights of the projections from the hidden state to Q, K and V (each used once a token)."""
    m = a.mla
    if m is None:
        return a.hidden * _qkv_width(a)
    n, h, qk = a.heads, a.hidden, m.nope + m.rope
    # q: q_a [h -> q_lora] then q_b [q_lora -> n (nope + rope)], or q_proj [h -> n (nope + rope)]
    q = h * m.q_lora_rank + m.q_lora_rank * n * qk if m.q_lora_rank else h * n * qk
    # kv_a [h -> kv_lora + rope] (the rope part is the shared k_pe), kv_b [kv_lora -> n (nope + v)]
    return q + h * (m.kv_lora_rank + m.rope) + m.kv_lora_rank * n * (m.nope + m.v)


def _mlp_weights(h: int, f: int, gated: bool) -> int:
    return h * f * (2 if gated else 1) + f * h  # gated: gate and up projections, fused in fc1


def _chunk_pairs(seq_len: int, chunk: int) -> int:
    """Causal query-key pairs inside the chunks of one sequence (the SSD scan's quadratic part)."""
    full, rest = divmod(seq_len, chunk)
    return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2


def _mamba_forward(m: _Mamba, h: int, b: _Batch) -> dict[str, int]:
    """Mamba-2 (Megatron-Core's MambaMixer, chunked SSD): in_proj to z, x, B, C, dt; the depthwise
    causal conv over x, B, C; the scan: within each chunk the C B^T scores (per group) and their
    product with x (per head), across chunks the states B^T x and their read-out C h (per head);
    out_proj. The gated norm, the decay and D skip are elementwise."""
    t = b.tokens
    pairs = b.batch_size * sum(_chunk_pairs(s, m.chunk) for s in b.seq_lens)
    return {
        "mamba_in_projection": 2 * t * h * (2 * m.inner + 2 * m.groups * m.state + m.heads),
        "mamba_conv": 2 * t * m.conv_dim * m.conv,
        "mamba_scan": 2 * pairs * (m.groups * m.state + m.heads * m.head_dim) + 2 * 2 * t * m.heads * m.state * m.head_dim,
        "mamba_out_projection": 2 * t * m.inner * h,
    }


def _gdn_forward(g: _GDN, h: int, b: _Batch) -> dict[str, int]:
    """Gated delta net (Qwen3-Next's linear attention): in_proj to q, k, v, z and the b, a gates;
    the depthwise causal conv over q, k, v; per token and value head the delta rule on its
    k_dim x v_dim state (read k, write the rank-1 correction, read q: three products); out_proj."""
    t = b.tokens
    return {
        "gdn_in_projection": 2 * t * h * (2 * g.keys + 2 * g.values + 2 * g.v_heads),
        "gdn_conv": 2 * t * (2 * g.keys + g.values) * g.conv,
        "gdn_recurrence": 2 * 3 * t * g.v_heads * g.k_dim * g.v_dim,
        "gdn_out_projection": 2 * t * g.values * h,
    }


def _layer_forward(a: _Arch, layer: _Layer, b: _Batch) -> dict[str, int]:
    """Forward FLOPs of one layer, per component (2 per multiply-add)."""
    if layer.mixer not in ("attention", "mla", "mamba", "gdn", None) or layer.mlp not in ("dense", "moe", None):
        raise FlopsError(f"layer kind {layer} has no FLOPs term")
    t = b.tokens
    out: dict[str, int] = {}
    if layer.mixer == "mamba":
        out.update(_mamba_forward(a.mamba, a.hidden, b))
    elif layer.mixer == "gdn":
        out.update(_gdn_forward(a.gdn, a.hidden, b))
    elif layer.mixer is not None:
        pairs = b.batch_size * sum(attention_pairs(s, b.causal, layer.window) for s in b.seq_lens)
        out.update({
            "qkv_projection": 2 * t * _qkv_weights(a),
            # QK^T (qk_head_dim per pair) and softmax x V (v_head_dim per pair), every query head
            "core_attention": 2 * pairs * a.heads * (a.qk_head_dim + a.v_head_dim),
            "attention_output_projection": 2 * t * a.heads * a.v_head_dim * a.hidden,
        })
        if a.output_gate:  # one gate per output channel, from the hidden state
            out["attention_output_gate"] = 2 * t * a.hidden * a.heads * a.v_head_dim
    if layer.mlp == "dense":
        out["mlp"] = 2 * t * _mlp_weights(a.hidden, a.ffn, a.gated)
    elif layer.mlp == "moe":
        m = a.moe
        # router logits h -> E for every token; Qwen2-MoE's shared-expert gate h -> 1
        out["router"] = 2 * t * a.hidden * (m.experts + (1 if m.shared_gate else 0))
        # every token runs through top-k experts (no token dropped, no padding to capacity), at
        # the latent width behind a latent MoE's down- and up-projection (once per token)
        if m.latent:
            out["latent_projections"] = 2 * t * 2 * a.hidden * m.latent
        out["routed_experts"] = 2 * t * m.topk * _mlp_weights(m.latent or a.hidden, m.ffn, a.gated)
        if m.shared_ffn:
            out["shared_experts"] = 2 * t * _mlp_weights(a.hidden, m.shared_ffn, a.gated)
    return out


@dataclass(frozen=True)
class Term:
    """One component's FLOPs over the whole step (every layer, the whole batch)."""
    name: str
    forward: int
    backward: int
    recompute: int = 0

    @property
    def step(self) -> int:
        return self.forward + self.backward + self.recompute


@dataclass(frozen=True)
class Params:
    """Parameter counts from the same attributes (vocabulary unpadded, tied weights once).

    ``active``: parameters a token passes through; equal to ``total`` for dense models (the
    input embedding counts, as published counts do); in an MoE layer the router, the shared
    experts and top-k of the routed experts. MTP layers count in ``total`` and ``active``
    (sharing the model's embedding and output head, as in Megatron-Core); ``main`` and
    ``main_active`` leave them out. ``non_embedding``: without the input
    embedding and the untied output projection (the figure Qwen's model cards publish).
    """
    total: int
    active: int
    embedding: int
    output: int
    by_component: dict[str, int] = field(default_factory=dict)
    mtp_active: int = 0

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.output

    @property
    def main(self) -> int:
        """Without the MTP layers (DeepSeek-V3's published 671 B)."""
        return self.total - self.by_component.get("mtp", 0)

    @property
    def main_active(self) -> int:
        """Active parameters without the MTP layers (DeepSeek-V3's published 37 B)."""
        return self.active - self.mtp_active


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one training step, per component, and the model's parameter counts."""
    terms: tuple[Term, ...]
    params: Params
    seq_lens: tuple[int, ...]
    batch_size: int
    causal: bool
    recompute: str | None

    @property
    def tokens(self) -> int:
        return self.batch_size * sum(self.seq_lens)

    @property
    def forward(self) -> int:
        return sum(t.forward for t in self.terms)

    @property
    def backward(self) -> int:
        return sum(t.backward for t in self.terms)

    @property
    def total(self) -> int:
        """FLOPs of one training step: forward + backward (+ recomputation if asked for)."""
        return sum(t.step for t in self.terms)

    @property
    def per_token(self) -> float:
        return self.total / self.tokens

    def term(self, name: str) -> Term:
        for t in self.terms:
            if t.name == name:
                return t
        raise KeyError(f"no FLOPs component {name!r} (have: {[t.name for t in self.terms]})")

    def step(self, name: str) -> int:
        return self.term(name).step

    def mfu(self, step_time_s: float, peak_flops_per_s: float) -> float:
        """Model FLOPs utilisation: this step's FLOPs / (step time x peak FLOP/s of the devices)."""
        return self.total / (step_time_s * peak_flops_per_s)

    def as_dict(self) -> dict[str, Any]:
        """Plain ints, for snapshots and JSON."""
        return {"seq_lens": list(self.seq_lens), "batch_size": self.batch_size,
                "tokens": self.tokens, "causal": self.causal, "recompute": self.recompute,
                "forward": {t.name: t.forward for t in self.terms},
                "step": {t.name: t.step for t in self.terms},
                "total": self.total,
                "params": {"total": self.params.total, "active": self.params.active,
                           "embedding": self.params.embedding, "output": self.params.output,
                           "non_embedding": self.params.non_embedding,
                           "by_component": dict(self.params.by_component),
                           **({"main": self.params.main, "main_active": self.params.main_active}
                              if "mtp" in self.params.by_component else {})}}


# -- entry points --------------------------------------------------------------------------
def training_flops(model: Any, seq_len: int | Sequence[int] = 4096, batch_size: int = 1, *,
                   causal: bool = True, recompute: str | None = None, images: int | None = None,
                   image_size: int | tuple[int, int] | None = None) -> FlopsReport:
    """FLOPs of one training step on ``batch_size`` rows of ``seq_len`` tokens.

    ``seq_len`` may be a list of lengths: one row packing those sequences (varlen / THD);
    attention is counted per sequence, the rest per token. ``recompute``: None (model FLOPs),
    "selective" (core attention recomputed) or "full" (every transformer layer recomputed).
    ``images``: images per row for a vision-language model (default 1), each counted through the
    vision tower and the projector (``vision_tower``, ``projector``); their tokens are part of
    ``seq_len``. ``image_size``: pixels (side, or (height, width)) of each image for a tower that
    takes any size (Qwen2.5-VL; default 448 x 448); a fixed-size tower (Gemma3's) refuses another.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: use one of {RECOMPUTE}")
    seqs = (int(seq_len),) if isinstance(seq_len, int) else tuple(int(s) for s in seq_len)
    if not seqs or any(s < 1 for s in seqs) or batch_size < 1:
        raise ValueError(f"sequence lengths {seqs} and batch size {batch_size} must be >= 1")
    attrs = model_attrs(model)
    a = _arch(attrs)
    batch = _Batch(seqs, int(batch_size), bool(causal))
    plan = _layer_plan(a)
    fwd = {n: 0 for n in COMPONENTS}
    for layer in plan:
        for name, flops in _layer_forward(a, layer, batch).items():
            fwd[name] = fwd.get(name, 0) + flops
    if a.moe:
        has = {"shared_experts": a.moe.shared_ffn, "latent_projections": a.moe.latent}
        fwd.update({n: fwd.get(n, 0) for n in _MOE_COMPONENTS if has.get(n, True)})
    if a.mtp_layers:
        fwd["mtp"] = 0  # counted below
    names = [n for n in ALL_COMPONENTS if n in fwd]
    logits = 2 * batch.tokens * a.hidden * a.vocab
    fwd["logits"] = logits
    again = {n: fwd[n] if (recompute == "full" and n not in ("embedding", "logits")
                           or recompute == "selective" and n == "core_attention") else 0
             for n in names}
    if a.mtp_layers:
        # per MTP layer: eh_proj [2h -> h] on the concatenated (normed) hidden state and embedding
        # of the shifted tokens, one transformer layer (the kind of the last decoder layer, as
        # Megatron-Core builds it; a hybrid model's MTP pattern), and the logits of the shared
        # output head
        layer: dict[str, int] = {}
        for one in ([_Layer(*HYBRID[x]) for x in a.mtp_pattern] if a.pattern else [plan[-1]]):
            for k, v in _layer_forward(a, one, batch).items():
                layer[k] = layer.get(k, 0) + v
        body = 2 * batch.tokens * 2 * a.hidden * a.hidden + sum(layer.values())
        fwd["mtp"] = a.mtp_layers * (body + logits)
        again["mtp"] = a.mtp_layers * (body if recompute == "full" else
                                       layer.get("core_attention", 0) if recompute == "selective" else 0)
    vision = _vision(attrs, image_size)
    if vision:
        n_img = batch.batch_size * (1 if images is None else int(images))
        for n, (_, per_image) in vision.items():
            fwd[n], again[n] = n_img * per_image, n_img * per_image if recompute == "full" else 0
        names = [n for n in ALL_COMPONENTS if n in fwd]
    terms = tuple(Term(n, fwd[n], 2 * fwd[n], again[n]) for n in names)
    return FlopsReport(terms, _params(a, vision), seqs, batch.batch_size, batch.causal, recompute)


# vision tower model_type -> its family's function: (attrs, image_size) -> component ->
# (parameters, forward FLOPs per image); a VLM family registers its own (``vision_flops``)
VISION_FLOPS: dict[str, Callable[[Mapping[str, Any], Any], dict[str, tuple[int, int]]]] = {}


def vision_flops(*model_types: str):
    """Register a VLM family's vision-side count for the towers of ``model_types``
    (``vision_config.model_type``): components ``vision_tower`` and ``projector``. Counted:
    the matrix products (convolution included), as torch's FLOP counter counts them."""
    def deco(fn):
        for t in model_types:
            VISION_FLOPS[t] = fn
        return fn
    return deco


def _vision(attrs: Mapping[str, Any], image_size: Any = None) -> dict[str, tuple[int, int]]:
    """A VLM's vision side, by its family's registered count (``vision_flops``)."""
    v = attrs.get("vision_config")
    if not v:
        return {}
    from bridges.core.registry import load_families

    load_families()
    fn = VISION_FLOPS.get(v.get("model_type"))
    if fn is None:
        raise FlopsError(f"vision_config.model_type={v.get('model_type')!r}: no FLOPs count for this "
                         f"vision tower (known: {sorted(VISION_FLOPS)})")
    return fn(attrs, image_size)


def parameter_counts(model: Any) -> Params:
    """Total and active parameter counts of the model the attributes describe."""
    attrs = model_attrs(model)
    return _params(_arch(attrs), _vision(attrs))


def _mamba_params(m: _Mamba, h: int) -> int:
    """in_proj, the conv with its bias, A_log, D and dt_bias per head, the gated norm, out_proj."""
    return h * (2 * m.inner + 2 * m.groups * m.state + m.heads) + m.conv_dim * (m.conv + 1) + 3 * m.heads \
        + m.inner + m.inner * h


def _gdn_params(g: _GDN, h: int) -> int:
    """in_proj (q, k, v, z and the b, a gates), the conv (no bias), A_log and dt_bias per value
    head, the gated norm over one head, out_proj."""
    return h * (2 * g.keys + 2 * g.values + 2 * g.v_heads) + (2 * g.keys + g.values) * g.conv + 2 * g.v_heads \
        + g.v_dim + g.values * h


def _layer_params(a: _Arch, layer: _Layer) -> tuple[dict[str, int], int]:
    """One layer's parameters by component, and how many of them a token does not use."""
    h, npar = a.hidden, a.norm_params
    out = {"norms": a.layer_norms * npar * h}
    if layer.mixer == "mamba":
        out["mamba"] = _mamba_params(a.mamba, h)
    elif layer.mixer == "gdn":
        out["gdn"] = _gdn_params(a.gdn, h)
    elif layer.mixer is not None:
        bias = a.qkv_bias or a.linear_bias
        attn = _qkv_weights(a) + (_qkv_width(a) if bias and not a.mla else 0) \
            + a.heads * a.v_head_dim * h + (h if a.linear_bias else 0) + (a.heads if a.sinks else 0) \
            + (h * a.heads * a.v_head_dim if a.output_gate else 0)
        if a.mla:  # RMSNorms on the latents: q_a's output (with q LoRA) and kv_a's compressed kv
            qk_norms = npar * ((a.mla.q_lora_rank or 0) + a.mla.kv_lora_rank) if a.qk_norm else 0
        else:
            per_head = (a.heads + a.groups) if a.qk_norm_full else 2  # a weight per head, or one shared
            qk_norms = per_head * npar * a.qk_head_dim if a.qk_norm else 0
        out["attention"] = attn
        out["norms"] += qk_norms

    def mlp(f: int, width: int = h) -> int:
        f_in = f * (2 if a.gated else 1)
        return _mlp_weights(width, f, a.gated) + ((f_in + width) if a.linear_bias else 0)

    if layer.mlp == "dense":
        out["mlp"] = mlp(a.ffn)
    if layer.mlp != "moe":
        return out, 0
    m = a.moe
    out["router"] = h * m.experts + (h if m.shared_gate else 0) + (m.experts if a.linear_bias else 0)
    width = m.latent or h
    if m.latent:  # fc1_latent_proj and fc2_latent_proj
        out["latent_projections"] = 2 * h * m.latent + ((m.latent + h) if a.linear_bias else 0)
    out["routed_experts"] = m.experts * mlp(m.ffn, width)
    if m.shared_ffn:
        out["shared_experts"] = mlp(m.shared_ffn)
    return out, (m.experts - m.topk) * mlp(m.ffn, width)


def _params(a: _Arch, vision: dict[str, tuple[int, int]] | None = None) -> Params:
    h = a.hidden
    embedding = a.vocab * h
    output = 0 if a.tied else a.vocab * h
    if a.position_embedding_type == "learned_absolute":
        if not a.max_sequence_length:
            raise FlopsError("config field max_sequence_length is required to count the learned "
                             "absolute position embedding (position_embedding_type="
                             "'learned_absolute')")
        positions = int(a.max_sequence_length) * h
    else:
        positions = 0
    layers: dict[str, int] = {}
    inactive = 0
    for layer in _layer_plan(a):
        counts, unused = _layer_params(a, layer)
        inactive += unused
        for k, v in counts.items():
            layers[k] = layers.get(k, 0) + v
    by = {"embedding": embedding, "position_embedding": positions,
          "attention": layers.get("attention", 0), "mlp": layers.get("mlp", 0)}
    by.update({k: layers[k] for k in ("mamba", "gdn") if k in layers})
    if a.moe:
        by.update({k: layers[k] for k in _MOE_COMPONENTS if k in layers})
    by.update(norms=layers["norms"] + a.norm_params * h, output=output)
    by.update({n: params for n, (params, _) in (vision or {}).items()})
    mtp_total = mtp_active = 0
    if a.mtp_layers:
        # per MTP layer (Megatron-Core's MultiTokenPredictionLayer): enorm, hnorm, eh_proj 2h x h,
        # one transformer layer, a final norm; embedding and output head shared with the model
        counts, unused = {}, 0
        for layer in ([_Layer(*HYBRID[x]) for x in a.mtp_pattern] if a.pattern else [_layer_plan(a)[-1]]):
            c, u = _layer_params(a, layer)
            unused += u
            for k, v in c.items():
                counts[k] = counts.get(k, 0) + v
        one = 3 * a.norm_params * h + 2 * h * h + sum(counts.values())
        mtp_total, mtp_active = a.mtp_layers * one, a.mtp_layers * (one - unused)
        by["mtp"] = mtp_total
    total = sum(by.values())
    active = total - inactive - (mtp_total - mtp_active)
    return Params(total=total, active=active, embedding=embedding, output=output,
                  by_component=by, mtp_active=mtp_active)
