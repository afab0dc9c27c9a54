"""Nemotron 3's multi-token-prediction layers (``mtp.*``), which transformers neither builds nor
loads (``_keys_to_ignore_on_load_unexpected``): here as HF modules, for the toys that carry them and
for the suite's reference, and the flattened layer index of their names.

Layout (Super's published checkpoint; vLLM's and Megatron-Bridge's readers agree): one MTP depth is
``mtp_hybrid_override_pattern`` (``"*E"``: an attention block, then a MoE block), each symbol a
Nemotron-H block (``norm`` + ``mixer``) at ``mtp.layers.<i>``, the index *flattened* over depths:
``i = depth * len(pattern) + j``. The depth's first block also holds ``enorm`` (on the embedding of
token t + 1), ``hnorm`` (on the main model's final hidden state at t) and ``eh_proj`` [h, 2h] over
[enorm | hnorm]; its last block holds ``final_layernorm``. The embedding and the output head are the
main model's. Megatron-Core nests the same tensors: ``mtp.layers.<depth>.{enorm,hnorm,eh_proj,
final_layernorm}`` and the blocks at ``mtp.layers.<depth>.mtp_model_layer.layers.<j>``.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

PREFIX = "mtp.layers."
# the pattern's symbols <-> transformers' block types
KINDS = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def flattened(m, per_depth: int, inner: int):
    """Mapping ``m`` of MTP block ``inner`` (or of a depth's own tensors, which sit on its block
    ``inner``), its HF index flattened: Megatron's depth ``d`` reads HF's ``mtp.layers.<d *
    per_depth + inner>``. A copy of ``m`` (its kind, sizes and TP split kept)."""
    cls = _FLAT.get(type(m))
    if cls is None:
        cls = _FLAT[type(m)] = type("Flat" + type(m).__name__, (_Flat, type(m)), {})
    out = copy.copy(m)
    object.__setattr__(out, "__class__", cls)
    object.__setattr__(out, "flat", (per_depth, inner))
    return out


class _Flat:
    """A mapping whose first capture (the MTP depth) becomes the flattened HF block index."""

    def hf_names(self, captures):
        per_depth, inner = self.flat
        return super().hf_names((str(int(captures[0]) * per_depth + inner), *captures[1:]))

    def describe(self):
        per_depth, inner = self.flat
        return {**super().describe(), "hf_index": f"depth * {per_depth} + {inner}"}


_FLAT: dict[type, type] = {}


def _block_config(config, pattern: str):
    """The text config whose ``layers_block_type`` is one MTP depth's blocks (eager attention)."""
    cfg = copy.deepcopy(config)
    cfg.layers_block_type = [KINDS[x] for x in pattern]
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def hf_mtp_module(config, pattern: str) -> nn.Module:
    """One MTP depth as HF modules: ``state_dict`` keys are the checkpoint's without ``mtp.``
    (``layers.<j>.norm.weight``, ``layers.0.enorm.weight``, ...)."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHBlock, NemotronHRMSNorm

    cfg = _block_config(config, pattern)
    h, eps = cfg.hidden_size, cfg.layer_norm_epsilon
    layers = nn.ModuleList([NemotronHBlock(cfg, j) for j in range(len(pattern))])
    layers[0].enorm = NemotronHRMSNorm(h, eps=eps)
    layers[0].hnorm = NemotronHRMSNorm(h, eps=eps)
    layers[0].eh_proj = nn.Linear(2 * h, h, bias=False)
    layers[-1].final_layernorm = NemotronHRMSNorm(h, eps=eps)
    mtp = nn.Module()
    mtp.layers = layers
    return mtp


def load_hf_mtp_module(config, pattern: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """``hf_mtp_module`` holding the checkpoint's first depth (``mtp.*`` tensors; per-expert
    tensors stacked as transformers holds them); every tensor of that depth must be used."""
    mtp = hf_mtp_module(config, pattern)
    sd = {k[len("mtp."):]: v for k, v in tensors.items()
          if k.startswith(PREFIX) and int(k[len(PREFIX):].split(".")[0]) < len(pattern)}
    for j, block in enumerate(mtp.layers):
        experts = getattr(block.mixer, "experts", None)
        if experts is None:
            continue
        at = f"layers.{j}.mixer.experts."
        for part in ("up_proj", "down_proj"):
            if at + part not in sd:
                sd[at + part] = torch.stack([sd.pop(f"{at}{e}.{part}.weight") for e in range(experts.num_experts)])
    mtp.load_state_dict(sd, strict=True)
    return mtp.float().eval()


def mtp_reference_logits(mtp: nn.Module, embed: torch.Tensor, head: torch.Tensor, input_ids: torch.Tensor,
                         main_hidden: torch.Tensor) -> torch.Tensor:
    """The first MTP depth on top of the main model: ``main_hidden`` is its final hidden state
    after ``norm_f``, [b, s, h]; ``embed`` / ``head`` the main embedding and output head. Returns
    [b, s - 1, vocab]: the logits predicting token t + 2 at position t (no rotary: Nemotron-H's
    attention has no position embedding)."""
    s = input_ids.shape[1]
    first, last = mtp.layers[0], mtp.layers[-1]
    e = torch.nn.functional.embedding(input_ids[:, 1:], embed.float())
    x = first.eh_proj(torch.cat((first.enorm(e), first.hnorm(main_hidden[:, :-1])), dim=-1))
    causal = torch.ones(s - 1, s - 1, dtype=torch.bool).triu(1)
    mask = torch.zeros(s - 1, s - 1).masked_fill(causal, torch.finfo(x.dtype).min)[None, None]
    for block in mtp.layers:
        x = block(x, attention_mask=mask if block.block_type == "full_attention" else None)
    return last.final_layernorm(x) @ head.float().t()


def add_toy_mtp(model, pattern: str, randomize) -> None:
    """Give a toy HF model the published checkpoints' MTP depth (``model.mtp``, which its forward
    ignores), re-drawn by ``randomize``, so that ``save_pretrained`` writes ``mtp.layers.*``."""
    dtype = next(model.parameters()).dtype
    mtp = hf_mtp_module(model.config, pattern).float()
    randomize(mtp)
    model.mtp = mtp.to(dtype).eval()
