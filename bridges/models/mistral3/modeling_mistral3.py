"""Mistral3's vision-language model on Megatron-Core: the HF vision encoder pattern.

``Mistral3VLModel``: the Pixtral tower and the projector (transformers' own modules, replicated
over TP, built on the first pipeline stage only) beside the language model (a Megatron GPTModel
chunk under ``language_model``). On the first stage the images (padded to one size, each cropped
to its ``image_sizes``) go through the tower as one sequence; the hidden states of
``vision_feature_layer`` (one layer, or several concatenated) are merged and projected, and
written over the image-token embeddings in HF's order (batch, then position). The language
model attends causally, image tokens included, as HF's.
"""
from __future__ import annotations

import torch

from bridges.core.vlm import VLMChunk


class Mistral3VLModel(VLMChunk):
    """One pipeline chunk of Mistral3: ``vision_tower`` and ``multi_modal_projector`` (first
    stage), ``language_model`` (a GPTModel chunk)."""

    def __init__(self, language_model, hf_config, image_token_id: int, with_vision: bool):
        super().__init__(language_model, image_token_id)
        self.vision_tower = self.multi_modal_projector = None
        self.feature_layer = hf_config.vision_feature_layer
        if with_vision:
            from transformers import AutoModel
            from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

            vision = hf_config.vision_config
            vision._attn_implementation = "eager"
            self.vision_tower = AutoModel.from_config(vision)
            self.multi_modal_projector = Mistral3MultiModalProjector(hf_config)

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """[image tokens of every image, hidden] in the language model's space."""
        out = self.vision_tower(pixel_values, image_sizes=image_sizes, output_hidden_states=True)
        layer = self.feature_layer
        if isinstance(layer, int):
            hidden = out.hidden_states[layer]
        else:
            hidden = torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        return self.multi_modal_projector(hidden.squeeze(0), image_sizes)

    def forward(self, input_ids, position_ids, attention_mask=None, pixel_values=None,
                image_sizes=None, **kwargs):
        decoder_input = None
        if self.pre_process:
            feats = None
            if pixel_values is not None:
                if image_sizes is None:  # every image the full padded size, as HF assumes
                    image_sizes = torch.tensor([pixel_values.shape[-2:]] * pixel_values.shape[0])
                dtype = self.language_model.embedding.word_embeddings.weight.dtype
                feats = self.image_features(pixel_values.to(dtype), image_sizes)
            decoder_input = self.embed(input_ids, position_ids, feats)
        return self.language_model(input_ids, position_ids, attention_mask,
                                   decoder_input=decoder_input, **kwargs)
