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

Extending: the model is described per layer (``_layer_plan``: which token mixer and which MLP
each layer has); ``_layer_forward`` gives one layer's FLOPs per component and ``_params`` the
parameters. MoE, MLA, MTP and linear-attention / SSM blocks are further layer kinds with their
own terms (MTP and MoE routers as new components); until they are written, the
config fields that turn them on are listed in ``UNSUPPORTED`` and raise ``FlopsError`` naming
the field, so nothing is silently counted as a dense layer.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bridges.core.config import ConfigError

__all__ = ["COMPONENTS", "FlopsError", "FlopsReport", "Params", "Term", "UNSUPPORTED",
           "attention_pairs", "model_attrs", "parameter_counts", "training_flops"]

COMPONENTS = ("embedding", "qkv_projection", "core_attention", "attention_output_projection",
              "mlp", "logits")
RECOMPUTE = (None, "selective", "full")


class FlopsError(ConfigError):
    """The configuration has a feature the calculator does not count (yet), or lacks a field."""


# Config fields that switch on blocks this calculator does not count yet: (field, what it
# means). A field trips when its value is set (not None / False / 0 / empty), except where a
# predicate says otherwise. Megatron-Core names first, then HF spellings a bridge may pass.
def _set(v: Any) -> bool:
    return v not in (None, False, 0, "", (), [])


UNSUPPORTED: tuple[tuple[str, str, Any], ...] = (
    ("num_moe_experts", "mixture of experts (routed experts, router)", _set),
    ("moe_ffn_hidden_size", "mixture of experts (expert FFN size)", _set),
    ("moe_shared_expert_intermediate_size", "mixture of experts (shared experts)", _set),
    ("num_experts", "mixture of experts", _set),
    ("num_local_experts", "mixture of experts", _set),
    ("n_routed_experts", "mixture of experts", _set),
    ("multi_latent_attention", "multi-latent attention (MLA)", _set),
    ("q_lora_rank", "multi-latent attention (MLA, q LoRA)", _set),
    ("kv_lora_rank", "multi-latent attention (MLA)", _set),
    ("mtp_num_layers", "multi-token prediction heads (MTP)", _set),
    ("num_nextn_predict_layers", "multi-token prediction heads (MTP)", _set),
    ("experimental_attention_variant", "linear / sparse attention (e.g. gated delta net, DSA)", _set),
    ("linear_attention_freq", "linear attention layers (e.g. gated delta net)", _set),
    ("is_hybrid_model", "hybrid SSM model (Mamba-2 layers)", _set),
    ("hybrid_override_pattern", "hybrid layer pattern (Mamba / attention / MLP / MoE layers)", _set),
    ("hybrid_layer_pattern", "hybrid layer pattern (Mamba / attention / MLP / MoE layers)", _set),
    ("mamba_num_heads", "Mamba-2 layers", _set),
    ("heterogeneous_block_specs", "heterogeneous per-layer block specs", _set),
    ("attention_output_gate", "gated attention output (extra gate projection)", _set),
    ("softmax_type", "learnable softmax sinks", lambda v: v not in (None, "vanilla", "off-by-one")),
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
        except (NotImplementedError, AttributeError):
            return model.megatron_attrs()
    raise TypeError(f"expected a bridge, a provider or a dict of Megatron attributes, got "
                    f"{type(model).__name__}")


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
    position_embedding_type: str
    max_sequence_length: int | None
    window_size: tuple[int, int] | None
    window_attn_skip_freq: int | list | None


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
    return _Arch(num_layers=int(a["num_layers"]), hidden=h, ffn=int(a.get("ffn_hidden_size") or 4 * h),
                 heads=heads, groups=groups, qk_head_dim=kv, v_head_dim=kv,
                 vocab=int(a["vocab_size"]), tied=bool(a["share_embeddings_and_output_weights"]),
                 gated=bool(a["gated_linear_unit"]), qkv_bias=bool(a["add_qkv_bias"]),
                 linear_bias=bool(a["add_bias_linear"]), qk_norm=bool(a["qk_layernorm"]),
                 norm_params=norm, position_embedding_type=str(a["position_embedding_type"]),
                 max_sequence_length=a["max_sequence_length"], window_size=window,
                 window_attn_skip_freq=a["window_attn_skip_freq"])


@dataclass(frozen=True)
class _Layer:
    """What one transformer layer holds. New kinds (MoE MLP, MLA, Mamba, gated delta net) are
    new values here, decided per layer from the config in ``_layer_plan``."""
    mixer: str = "attention"
    window: tuple[int, int] | None = None
    mlp: str = "dense"


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
    plan = []
    for number in range(1, arch.num_layers + 1):
        windowed = arch.window_size is not None and (
            skip is None or (number % skip != 0 if isinstance(skip, int) else bool(skip[number - 1])))
        plan.append(_Layer(window=arch.window_size if windowed else None))
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


def _layer_forward(a: _Arch, layer: _Layer, b: _Batch) -> dict[str, int]:
    """Forward FLOPs of one layer, per component (2 per multiply-add)."""
    if layer.mixer != "attention" or layer.mlp != "dense":
        raise FlopsError(f"layer kind {layer} has no FLOPs term")
    t = b.tokens
    pairs = b.batch_size * sum(attention_pairs(s, b.causal, layer.window) for s in b.seq_lens)
    mlp_in = a.ffn * (2 if a.gated else 1)  # gated: gate and up projections, fused in fc1
    return {
        "qkv_projection": 2 * t * a.hidden * _qkv_width(a),
        # QK^T (qk_head_dim per pair) and softmax x V (v_head_dim per pair), every query head
        "core_attention": 2 * pairs * a.heads * (a.qk_head_dim + a.v_head_dim),
        "attention_output_projection": 2 * t * a.heads * a.v_head_dim * a.hidden,
        "mlp": 2 * t * a.hidden * mlp_in + 2 * t * a.ffn * a.hidden,
    }


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
    input embedding counts, as published counts do). ``non_embedding``: without the input
    embedding and the untied output projection (the figure Qwen's model cards publish).
    """
    total: int
    active: int
    embedding: int
    output: int
    by_component: dict[str, int] = field(default_factory=dict)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.output


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
                           "by_component": dict(self.params.by_component)}}


# -- entry points --------------------------------------------------------------------------
def training_flops(model: Any, seq_len: int | Sequence[int] = 4096, batch_size: int = 1, *,
                   causal: bool = True, recompute: str | None = None) -> FlopsReport:
    """FLOPs of one training step on ``batch_size`` rows of ``seq_len`` tokens.

    ``seq_len`` may be a list of lengths: one row packing those sequences (varlen / THD);
    attention is counted per sequence, the rest per token. ``recompute``: None (model FLOPs),
    "selective" (core attention recomputed) or "full" (every transformer layer recomputed).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r}: use one of {RECOMPUTE}")
    seqs = (int(seq_len),) if isinstance(seq_len, int) else tuple(int(s) for s in seq_len)
    if not seqs or any(s < 1 for s in seqs) or batch_size < 1:
        raise ValueError(f"sequence lengths {seqs} and batch size {batch_size} must be >= 1")
    attrs = model_attrs(model)
    a = _arch(attrs)
    batch = _Batch(seqs, int(batch_size), bool(causal))
    layer_fwd = {n: 0 for n in COMPONENTS}
    for layer in _layer_plan(a):
        for name, flops in _layer_forward(a, layer, batch).items():
            layer_fwd[name] += flops
    layer_fwd["logits"] = 2 * batch.tokens * a.hidden * a.vocab
    terms = []
    for name in COMPONENTS:
        fwd = layer_fwd[name]
        again = (recompute == "full" and name not in ("embedding", "logits")
                 or recompute == "selective" and name == "core_attention")
        terms.append(Term(name, fwd, 2 * fwd, fwd if again else 0))
    return FlopsReport(tuple(terms), _params(a), seqs, batch.batch_size, batch.causal, recompute)


def parameter_counts(model: Any) -> Params:
    """Total and active parameter counts of the model the attributes describe."""
    return _params(_arch(model_attrs(model)))


def _params(a: _Arch) -> Params:
    h, n = a.hidden, a.num_layers
    bias = a.qkv_bias or a.linear_bias
    attn = h * _qkv_width(a) + (_qkv_width(a) if bias else 0) \
        + a.heads * a.v_head_dim * h + (h if a.linear_bias else 0)
    mlp_in = a.ffn * (2 if a.gated else 1)
    mlp = h * mlp_in + a.ffn * h + ((mlp_in + h) if a.linear_bias else 0)
    norms = 2 * a.norm_params * h + (2 * a.norm_params * a.qk_head_dim if a.qk_norm else 0)
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
    by = {"embedding": embedding, "position_embedding": positions, "attention": n * attn,
          "mlp": n * mlp, "norms": n * norms + a.norm_params * h, "output": output}
    total = sum(by.values())
    return Params(total=total, active=total, embedding=embedding, output=output, by_component=by)
