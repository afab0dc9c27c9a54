"""The multi-token-prediction block of the published Qwen3-Next and Qwen3.5 checkpoints
(``mtp.*``), which transformers neither builds nor loads: here as HF modules, for the toys that
carry it and for the suite's reference.

Layout: ``mtp.pre_fc_norm_embedding`` and ``mtp.pre_fc_norm_hidden`` (zero-centred RMSNorms),
``mtp.fc`` ([hidden, 2 x hidden], no bias) over the two normed halves, embedding first;
``mtp.layers.0``: one decoder layer of the family with full attention (and the family's MLP:
MoE for Qwen3-Next and Qwen3.5-MoE, dense for Qwen3.5); ``mtp.norm``. The token embedding and
the output head are the main model's. Position i combines the main model's final hidden state
at i with the embedding of token i + 1, at rotary position i, and predicts token i + 2.
"""
from __future__ import annotations

import copy
import importlib

import torch
from torch import nn

from bridges.core.experts import stack_hf_experts

PREFIX = "mtp."


def _classes(model_type: str):
    """(decoder layer, RMSNorm, rotary embedding) classes of transformers' ``model_type`` model
    (the text model's rotary class where a VLM has one of its own: Qwen3.5's ``...TextRotaryEmbedding``)."""
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    stem = next(n[:-len("DecoderLayer")] for n in dir(mod) if n.endswith("DecoderLayer") and "Vision" not in n)
    rotary = getattr(mod, stem + "TextRotaryEmbedding", None) or getattr(mod, stem + "RotaryEmbedding")
    return getattr(mod, stem + "DecoderLayer"), getattr(mod, stem + "RMSNorm"), rotary


def _layer_config(text_config):
    """The text config for the MTP decoder layer: one layer, full attention."""
    cfg = copy.deepcopy(text_config)
    cfg.layer_types = ["full_attention"]
    cfg._attn_implementation = "eager"
    return cfg


def hf_mtp_module(text_config, model_type: str, depths: int = 1) -> nn.Module:
    """``mtp.*`` as HF modules: its ``state_dict`` keys are the checkpoint's names without ``mtp.``."""
    layer_cls, norm_cls, _ = _classes(model_type)
    h, eps = text_config.hidden_size, text_config.rms_norm_eps
    mtp = nn.Module()
    mtp.pre_fc_norm_embedding = norm_cls(h, eps=eps)
    mtp.pre_fc_norm_hidden = norm_cls(h, eps=eps)
    mtp.fc = nn.Linear(2 * h, h, bias=False)
    mtp.layers = nn.ModuleList([layer_cls(_layer_config(text_config), 0) for _ in range(depths)])
    mtp.norm = norm_cls(h, eps=eps)
    return mtp


def load_hf_mtp_module(text_config, model_type: str, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """``hf_mtp_module`` holding the checkpoint's ``mtp.*`` tensors (per-expert tensors stacked as
    transformers holds them); every tensor must be used."""
    sd = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    mtp = hf_mtp_module(text_config, model_type)
    for i, layer in enumerate(mtp.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            stack_hf_experts(sd, f"layers.{i}.mlp.experts.", experts.gate_up_proj.shape[0])
    mtp.load_state_dict(sd, strict=True)
    return mtp.float().eval()


def mtp_reference_logits(mtp: nn.Module, text_config, model_type: str, embed: torch.Tensor, head: torch.Tensor,
                         input_ids: torch.Tensor, main_hidden: torch.Tensor) -> torch.Tensor:
    """The first MTP depth on top of the main model: ``main_hidden`` is its final hidden state
    after the final norm, [b, s, h]; ``embed`` / ``head`` the main embedding and output head.
    Returns [b, s - 1, vocab]: the logits predicting token i + 2 at position i."""
    _, _, rotary_cls = _classes(model_type)
    b, s = input_ids.shape
    e = torch.nn.functional.embedding(input_ids[:, 1:], embed.float())
    x = mtp.fc(torch.cat((mtp.pre_fc_norm_embedding(e), mtp.pre_fc_norm_hidden(main_hidden[:, :-1])), dim=-1))
    pos = torch.arange(s - 1).unsqueeze(0).expand(b, -1)
    cos_sin = rotary_cls(_layer_config(text_config))(x, pos)
    causal = torch.ones(s - 1, s - 1, dtype=torch.bool).triu(1)
    mask = torch.zeros(s - 1, s - 1).masked_fill(causal, torch.finfo(x.dtype).min)[None, None]
    out = mtp.layers[0](x, position_embeddings=cos_sin, attention_mask=mask, position_ids=pos)
    out = out[0] if isinstance(out, tuple) else out
    return mtp.norm(out) @ head.float().t()


def add_toy_mtp(model, text_config, model_type: str, randomize) -> None:
    """Give a toy HF model the published checkpoints' MTP block (``model.mtp``, which its forward
    ignores), re-drawn by ``randomize``, so that ``save_pretrained`` writes ``mtp.*``."""
    dtype = next(model.parameters()).dtype
    mtp = hf_mtp_module(text_config, model_type).float()
    randomize(mtp)
    model.mtp = mtp.to(dtype).eval()
