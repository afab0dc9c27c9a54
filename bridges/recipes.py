"""Training recipes: per family and size, pretrain / SFT / LoRA settings as plain data, a memory
estimate per GPU, and the Megatron-LM flags for them.

    mbridge recipe Qwen/Qwen3-8B --mode sft --gpus 8 --gpu-memory 80

The data lives beside each bridge, ``bridges/models/<family>/recipes.toml``: one ``[[recipe]]``
per model and mode (batch, sequence length, learning-rate schedule, recomputation, LoRA) with
the layouts worked out for named GPU counts and card sizes. A GPU count or card with no stored
layout gets one derived here: the least model parallelism whose estimate fits. Every stored
layout is checked by a test: it divides heads, query groups, layers (with VPP), experts and the
data-parallel batch, and its estimate fits the card (docs/recipes.md has the formula).
"""
from __future__ import annotations

import dataclasses
import itertools
import tomllib
from pathlib import Path
from typing import Any

from bridges.core.config import ConfigError

MODES = ("pretrain", "sft", "peft")
GIB = 1024 ** 3
HEADROOM = 0.9  # of the card for the estimate: the rest is CUDA context, NCCL buffers, fragmentation
RESERVED_GIB = 2.0

# What a mode sets unless the recipe says otherwise (Adam, bf16, distributed optimizer)
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": dict(micro_batch=1, global_batch=1024, seq_len=4096, lr=3e-4, min_lr=3e-5, warmup_iters=2000,
                     train_iters=500_000, decay="cosine", weight_decay=0.1, clip_grad=1.0, beta2=0.95,
                     recompute="selective"),
    "sft": dict(micro_batch=1, global_batch=128, seq_len=4096, lr=1e-5, min_lr=1e-6, warmup_iters=50,
                train_iters=2000, decay="cosine", weight_decay=0.1, clip_grad=1.0, beta2=0.95,
                recompute="selective"),
    "peft": dict(micro_batch=1, global_batch=128, seq_len=4096, lr=1e-4, min_lr=1e-5, warmup_iters=50,
                 train_iters=2000, decay="cosine", weight_decay=0.0, clip_grad=1.0, beta2=0.95,
                 recompute="selective",
                 lora=dict(rank=16, alpha=32, dropout=0.0,
                           targets=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])),
}
RECOMPUTE = ("none", "selective", "full")


@dataclasses.dataclass(frozen=True)
class Recipe:
    model: str
    mode: str
    gpus: int
    gpu_memory: float  # GiB per card
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int | None = None
    micro_batch: int = 1
    global_batch: int = 128
    seq_len: int = 4096
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_iters: int = 0
    train_iters: int = 1000
    decay: str = "cosine"
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    recompute: str = "selective"
    lora: dict | None = None
    source: str = ""  # the recipes.toml it came from, or "derived: ..."

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def layout_name(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"] + ([f"vpp{self.vpp}"] if self.vpp else [])
        parts += [f"ep{self.ep}", f"etp{self.etp or self.tp}"] if self.ep > 1 or self.etp else []
        return "".join(parts)


# -- data -------------------------------------------------------------------------------------
def recipe_file(bridge) -> Path:
    """``recipes.toml`` in the folder of the bridge's family (a VLM's: its own folder)."""
    import sys

    return Path(sys.modules[type(bridge).__module__].__file__).parent / "recipes.toml"


def stored(bridge) -> list[dict[str, Any]]:
    """The ``[[recipe]]`` tables of the bridge's family file, each with its mode defaults
    applied (empty when the family has no file)."""
    path = recipe_file(bridge)
    if not path.is_file():
        return []
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    out = []
    for i, r in enumerate(data.get("recipe", [])):
        where = f"{path}: recipe {i + 1}"
        if r.get("mode") not in MODES or not r.get("model"):
            raise ConfigError(f"{where}: needs model and mode (one of {', '.join(MODES)})")
        unknown = set(r) - {f.name for f in dataclasses.fields(Recipe)} - {"layouts"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        out.append({**MODE_DEFAULTS[r["mode"]], **r, "source": str(path)})
    return out


def _entry(bridge, model: str, mode: str) -> dict[str, Any]:
    for r in stored(bridge):
        if r["model"] == model and r["mode"] == mode:
            return r
    return {**MODE_DEFAULTS[mode], "model": model, "mode": mode, "layouts": [],
            "source": f"derived: no {mode} recipe for {model} in {recipe_file(bridge).parent.name}/recipes.toml"}


def recipes(bridge, model: str) -> list[Recipe]:
    """Every stored (model, mode, layout) recipe of a model."""
    out = []
    for r in stored(bridge):
        if r["model"] == model:
            base = {k: v for k, v in r.items() if k != "layouts"}
            out += [Recipe(**{**base, **lay}) for lay in r.get("layouts", [])]
    return out


def recipe(bridge, model: str, mode: str, gpus: int, gpu_memory: float) -> Recipe:
    """The recipe for ``gpus`` cards of ``gpu_memory`` GiB: the stored layout for that count on
    the largest stored card that is not larger, else a derived one."""
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r}: one of {', '.join(MODES)}")
    r = _entry(bridge, model, mode)
    base = {k: v for k, v in r.items() if k != "layouts"}
    fits = [lay for lay in r.get("layouts", []) if lay["gpus"] == gpus and lay["gpu_memory"] <= gpu_memory]
    if fits:
        lay = max(fits, key=lambda x: x["gpu_memory"])
        return Recipe(**{**base, **lay, "gpu_memory": gpu_memory})
    if r.get("layouts") and not base["source"].startswith("derived"):
        base["source"] = f"derived: {base['source']} has no layout for {gpus} x {gpu_memory:g} GiB"
    return derive(bridge, Recipe(**{**base, "gpus": gpus, "gpu_memory": gpu_memory}))


# -- checks -----------------------------------------------------------------------------------
def problems(bridge, r: Recipe) -> list[str]:
    """What is wrong with a recipe's layout for its model: sizes that do not divide (the bridge's
    own layout constraints, the GPU count, the batch) and an estimate over the card."""
    from bridges.core.parallel import Layout

    out = []
    try:
        bridge.to_megatron_provider().set_layout(
            Layout(tp=r.tp, pp=r.pp, vpp=r.vpp, ep=r.ep, etp=r.etp)).finalize()
    except (ConfigError, ValueError) as e:
        out.append(str(e))
    if r.gpus % (r.tp * r.pp):
        out.append(f"gpus={r.gpus} does not divide by TP x PP={r.tp * r.pp}")
    elif r.global_batch % (r.micro_batch * r.dp):
        out.append(f"global_batch={r.global_batch} does not divide by micro_batch x DP={r.micro_batch * r.dp}")
    if r.gpus % ((r.etp or r.tp) * r.ep * r.pp):
        out.append(f"gpus={r.gpus} does not divide by ETP x EP x PP={(r.etp or r.tp) * r.ep * r.pp}")
    if r.recompute not in RECOMPUTE:
        out.append(f"recompute={r.recompute!r}: one of {', '.join(RECOMPUTE)}")
    if (r.mode == "peft") != bool(r.lora):
        out.append("lora settings belong to (and only to) a peft recipe")
    if not out:
        mem = memory(bridge, r)
        if mem["total"] > usable(r.gpu_memory):
            out.append(f"estimated {mem['total'] / GIB:.1f} GiB per GPU does not fit {r.gpu_memory:g} GiB "
                       f"(usable {usable(r.gpu_memory) / GIB:.1f})")
    return out


def usable(gpu_memory: float) -> float:
    return (HEADROOM * gpu_memory - RESERVED_GIB) * GIB


# -- memory -----------------------------------------------------------------------------------
def _params(bridge) -> dict[str, int]:
    from bridges.flops import training_flops

    return training_flops(bridge, seq_len=1, batch_size=1).as_dict()["params"]["by_component"]


def lora_params(bridge, r: Recipe) -> int:
    """Adapter parameters of the whole model: rank x (in + out) per targeted linear per layer
    (experts' linears for routed experts are not targeted)."""
    from bridges.flops import architecture

    a = architecture(bridge)
    q, kv = a.heads * a.qk_head_dim, a.groups * a.qk_head_dim
    ffn = a.moe.shared_ffn if a.moe else a.ffn
    width = {"linear_qkv": a.hidden + q + 2 * kv, "linear_proj": a.heads * a.v_head_dim + a.hidden,
             "linear_fc1": a.hidden + (2 if a.gated else 1) * ffn, "linear_fc2": ffn + a.hidden}
    unknown = set(r.lora["targets"]) - set(width)
    if unknown:
        raise ConfigError(f"lora targets {sorted(unknown)}: known are {sorted(width)}")
    per_layer = sum(width[t] for t in r.lora["targets"] if not (t.startswith("linear_fc") and ffn == 0))
    return int(r.lora["rank"]) * per_layer * a.num_layers


def memory(bridge, r: Recipe) -> dict[str, float]:
    """Bytes per GPU on the most loaded pipeline stage (docs/recipes.md): bf16 weights; for full
    training fp32 gradients and, with the distributed optimizer, fp32 master weights and Adam's
    two moments spread over the data-parallel ranks (the experts' over the expert-data-parallel
    ranks); for LoRA the frozen bf16 weights and the adapters trained that way; activations of
    the micro-batches in flight with the recipe's recomputation; the fp32 logits."""
    from bridges.flops import architecture

    a, c = architecture(bridge), _params(bridge)
    etp = r.etp or r.tp
    experts = c.get("routed_experts", 0)
    replicated = c.get("norms", 0) + c.get("router", 0)
    head, tail = c.get("embedding", 0) + c.get("position_embedding", 0), c.get("output", 0) + c.get("mtp", 0)
    sharded = sum(c.values()) - experts - replicated - head - tail
    body = (sharded / r.tp + replicated) / r.pp
    exp = experts / (etp * r.ep * r.pp)
    dense = body + max(head, tail if r.pp > 1 else head + tail) / r.tp
    edp = r.gpus // (etp * r.ep * r.pp)
    n = dense + exp
    if r.mode == "peft":
        adapters = lora_params(bridge, r) / (r.tp * r.pp)
        weights, grads, optim = 2 * n + 2 * adapters, 4 * adapters, 12 * adapters / r.dp
    else:
        weights, grads, optim = 2 * n, 4 * n, 12 * dense / r.dp + 12 * exp / edp
    act = activations(a, r)
    logits = 4 * 2 * r.micro_batch * r.seq_len * a.vocab / r.tp  # fp32 logits and their gradient
    total = weights + grads + optim + act + logits
    return dict(weights=weights, grads=grads, optimizer=optim, activations=act, logits=logits, total=total)


def activations(a, r: Recipe) -> float:
    """bf16 activations of the first pipeline stage (the most loaded under 1F1B): one micro-batch
    of s x b tokens per layer, times the layers whose micro-batches are in flight (all L with
    1F1B, x (1 + (PP - 1) / (PP x VPP)) interleaved), sequence parallel over TP.

    Per layer and token (elements of 2 bytes): the two norm inputs and the two linear inputs (4h),
    q, k, v (heads + 2 groups of head_dim), the attention output (heads x v_head_dim), the MLP's
    first output and its activation (gated: 3f; f: the dense width, or top-k x the expert width
    plus the shared experts for an MoE layer); without recomputation the core attention's
    scores and probabilities (2 x heads x s, not split by sequence parallelism). Full recomputation
    keeps one input per layer (h) and one layer's working set."""
    s, b, t = r.seq_len, r.micro_batch, r.tp
    per_token = []
    for i in range(a.num_layers):
        f = a.ffn
        if a.moe and a.moe_layers[i]:
            f = a.moe.topk * a.moe.ffn + a.moe.shared_ffn
        mlp = (3 if a.gated else 2) * f
        attn = (a.heads + 2 * a.groups) * a.qk_head_dim + a.heads * a.v_head_dim
        per_token.append(((4 * a.hidden + attn + mlp) / t) + (2 * a.heads * s / t if r.recompute == "none" else 0))
    tokens = s * b
    if r.recompute == "full":
        total = 2 * tokens * (a.num_layers * a.hidden / t + max(per_token))
    else:
        total = 2 * tokens * sum(per_token)
    if r.pp > 1 and r.vpp:
        total *= 1 + (r.pp - 1) / (r.pp * r.vpp)
    return total + 2 * tokens * a.hidden  # the embedding's output


# -- layouts ----------------------------------------------------------------------------------
def derive(bridge, r: Recipe) -> Recipe:
    """The recipe with the least model parallelism (TP x PP, then PP, then the most EP) whose
    sizes divide and whose estimate fits, trying the recipe's recomputation, then full."""
    from bridges.flops import architecture

    a = architecture(bridge)
    experts = a.moe.experts if a.moe else 1
    divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]  # noqa: E731
    tps = [t for t in (1, 2, 4, 8) if r.gpus % t == 0]
    cands = []
    for tp, pp in itertools.product(tps, divisors(r.gpus)):
        if r.gpus % (tp * pp) == 0:
            for ep in ([e for e in divisors(experts) if (r.gpus // pp) % e == 0] if a.moe else [1]):
                cands.append(((tp * pp, pp, -ep), tp, pp, ep))
    tried = 0
    for rc in dict.fromkeys((r.recompute, "full")):
        for _, tp, pp, ep in sorted(cands):
            step = r.micro_batch * (r.gpus // (tp * pp))
            cand = dataclasses.replace(r, tp=tp, pp=pp, ep=ep, etp=1 if a.moe else None, vpp=None, recompute=rc,
                                       global_batch=-(-r.global_batch // step) * step)
            if not problems(bridge, cand):
                return cand
            tried += 1
    raise ConfigError(f"{r.model}: no layout of {r.gpus} GPUs with {r.gpu_memory:g} GiB fits the {r.mode} "
                      f"recipe (micro batch {r.micro_batch}, sequence {r.seq_len}): tried {tried} layouts "
                      f"(TP 1-8 and PP dividing the GPU count, EP over the experts), {r.recompute} and full "
                      f"recomputation")


# -- flags ------------------------------------------------------------------------------------
def training_flags(r: Recipe) -> list[str]:
    """Megatron-LM ``pretrain_gpt.py`` training flags of a recipe (the layout and ``--bf16`` come
    with the model flags); LoRA has no flag there (docs/recipes.md)."""
    out = ["--micro-batch-size", str(r.micro_batch), "--global-batch-size", str(r.global_batch),
           "--seq-length", str(r.seq_len), "--train-iters", str(r.train_iters), "--lr", f"{r.lr:g}",
           "--min-lr", f"{r.min_lr:g}", "--lr-decay-style", r.decay, "--lr-warmup-iters", str(r.warmup_iters),
           "--weight-decay", f"{r.weight_decay:g}", "--clip-grad", f"{r.clip_grad:g}",
           "--adam-beta1", f"{r.beta1:g}", "--adam-beta2", f"{r.beta2:g}", "--use-distributed-optimizer"]
    if r.tp > 1:
        out.append("--sequence-parallel")
    if r.recompute == "selective":
        out += ["--recompute-granularity", "selective"]
    elif r.recompute == "full":
        out += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    if r.mode == "sft":
        out.append("--sft")
    return out


def flags(bridge, r: Recipe) -> list[str]:
    """The model flags for the recipe's layout (``mbridge megatron-args``) and its training flags."""
    from bridges.megatron_lm import megatron_lm_args

    return megatron_lm_args(bridge, tp=r.tp, pp=r.pp, vpp=r.vpp, ep=r.ep, etp=r.etp) + training_flags(r)
