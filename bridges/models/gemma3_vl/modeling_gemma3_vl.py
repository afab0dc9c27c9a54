"""Gemma3's vision-language model on Megatron-Core: the HF vision encoder pattern.

- ``Gemma3VLModel``: the SigLIP tower and the projector (transformers' own modules, replicated
  over TP, built on the first pipeline stage only) beside the Gemma3 language model (a Megatron
  GPTModel under ``language_model``). On the first stage the text embeddings (scaled, as
  Gemma's) get the projected image features written over the image-token positions, in HF's
  order (batch, then position); every stage gets the attention mask Gemma3 uses with images.
- The mask (``image_block_mask``): causal, except that the tokens of one image see each other
  both ways (HF: ``token_type_ids`` == 1, one block per run of image tokens).
- ``BlockMaskAttention``: sliding-window layers apply their window on top of that mask (HF:
  window AND (causal OR same image)); Megatron's own softmax drops a given mask on windowed
  layers and builds a causal window instead.
"""
from __future__ import annotations

import torch

from bridges.core.vlm import VLMChunk
from bridges.models.gemma2.modeling_gemma2 import SoftCapAttention


def image_block_mask(token_type_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where attention is masked: causal, with each run of image tokens
    (``token_type_ids == 1``) attending to itself bidirectionally."""
    img = token_type_ids == 1
    start = img & ~torch.nn.functional.pad(img, (1, 0))[:, :-1]
    block = torch.where(img, torch.cumsum(start.int(), 1) - 1, -1)
    s = token_type_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=img.device).tril()
    same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    return ~(causal | same).unsqueeze(1)


class _WindowOnMask(torch.nn.Module):
    """Wraps a layer's softmax so that a given mask is kept and the window added to it."""

    def __init__(self, softmax: torch.nn.Module, window: int):
        super().__init__()
        self.softmax, self.window = softmax, window

    def forward(self, scores, mask, *args):
        sq, sk = scores.shape[-2:]
        q = torch.arange(sk - sq, sk, device=scores.device)[:, None]
        far = (q - torch.arange(sk, device=scores.device)[None, :]) >= self.window
        if mask is None:
            mask = torch.ones(sq, sk, dtype=torch.bool, device=scores.device).tril(sk - sq).logical_not()
        return self.softmax(scores, mask | far, *args)


class BlockMaskAttention(SoftCapAttention):
    """Gemma2/3's core attention (soft-cap when set) honouring a given mask on windowed layers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        sm = self.scale_mask_softmax
        inner = getattr(sm, "softmax", sm)  # under the soft-cap wrapper, if any
        if inner.window_size is not None:
            window, inner.window_size = inner.window_size[0] + 1, None
            self.scale_mask_softmax = _WindowOnMask(sm, window)


class Gemma3VLModel(VLMChunk):
    """One pipeline chunk of Gemma3 with images: ``vision_tower`` and ``multi_modal_projector``
    (first stage), ``language_model`` (a GPTModel chunk)."""

    def __init__(self, language_model, hf_config, image_token_id: int, with_vision: bool):
        super().__init__(language_model, image_token_id)
        self.vision_tower = self.multi_modal_projector = None
        if with_vision:
            from transformers import AutoModel
            from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

            vision = hf_config.vision_config
            vision._attn_implementation = "eager"
            self.vision_tower = AutoModel.from_config(vision)
            self.multi_modal_projector = Gemma3MultiModalProjector(hf_config)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images x tokens per image, hidden] in the language model's space."""
        hidden = self.vision_tower(pixel_values=pixel_values).last_hidden_state
        feats = self.multi_modal_projector(hidden)
        return feats.reshape(-1, feats.shape[-1])

    def forward(self, input_ids, position_ids, attention_mask=None, pixel_values=None,
                token_type_ids=None, **kwargs):
        if token_type_ids is not None and attention_mask is None:
            attention_mask = image_block_mask(token_type_ids)
        decoder_input = None
        if self.pre_process:
            dtype = self.language_model.embedding.word_embeddings.weight.dtype
            feats = self.image_features(pixel_values.to(dtype)) if pixel_values is not None else None
            decoder_input = self.embed(input_ids, position_ids, feats)
        return self.language_model(input_ids, position_ids, attention_mask,
                                   decoder_input=decoder_input, **kwargs)


def block_mask_layer_spec(layer_spec):
    """A TransformerLayer spec whose core attention is ``BlockMaskAttention`` (its params kept)."""
    import dataclasses

    attn = layer_spec.submodules.self_attention
    core = dataclasses.replace(attn.submodules.core_attention, module=BlockMaskAttention)
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules, core_attention=core))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        layer_spec.submodules, self_attention=attn))
