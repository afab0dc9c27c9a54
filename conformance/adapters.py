"""Conformance adapters: what the checks need to know about a *kind* of model, in one place.

The checks (``checks.py``) compare numbers; an adapter says how to get them for its kind of
model: shrink a published config to a toy, build and load the HF reference, make inputs, run
the HF model and the Megatron chunks, generate greedily, and capture per-module activations at
the same places on both sides (for divergence localisation). A bridge names its kind with
``Bridge.modality`` ("text" for the text causal language models shipped today); an
image-and-text adapter registers under "vision" beside this one, and the job and session code
do not change.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from conformance import forward, toy


class TextCausalLM:
    """A decoder-only language model: token ids in, next-token logits out."""

    modality = "text"

    # -- toys ---------------------------------------------------------------------------------
    def toy_config(self, config: dict[str, Any], max_tp: int, min_layers: int) -> dict[str, Any]:
        return toy.shrink_config(config, max_tp=max_tp, min_layers=min_layers)

    def build_hf(self, config: dict[str, Any], seed: int = 0):
        return toy.build_hf_model(config, seed=seed)

    def load_hf(self, path: str, dtype: torch.dtype):
        return toy.load_hf_model(path, dtype)

    # -- inputs ---------------------------------------------------------------------------
    def inputs(self, config: dict[str, Any], base: torch.Tensor) -> torch.Tensor:
        """Token ids for this model: the session's shared ids folded into its vocabulary."""
        return base % int(config["vocab_size"])

    def text_inputs(self, config: dict[str, Any], base: torch.Tensor):
        """``inputs`` without images (a VLM's): what the MTP check feeds, as MTP embeds token ids alone."""
        return self.inputs(config, base)

    # -- forwards -------------------------------------------------------------------------
    def hf_logits(self, model, ids: torch.Tensor) -> torch.Tensor:
        return forward.hf_logits(model, ids)

    def megatron_logits(self, chunks, ids: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        return forward.megatron_logits(chunks, ids, vocab_size)

    def hf_generate(self, model, ids: torch.Tensor, steps: int, margins: list | None = None) -> torch.Tensor:
        return forward.hf_generate(model, ids, steps, margins)

    def megatron_generate(self, chunks, ids: torch.Tensor, steps: int, vocab_size: int,
                          draft: torch.Tensor | None = None) -> torch.Tensor:
        return forward.megatron_generate(chunks, ids, steps, vocab_size, draft=draft)

    # -- activations ------------------------------------------------------------------------
    def capture_hf(self, model, store: dict) -> contextlib.AbstractContextManager:
        return forward.capture_hf(model, store)

    def capture_megatron(self, chunks, store: dict) -> contextlib.AbstractContextManager:
        return forward.capture_megatron(chunks, store)


BANNED = "banned_tokens"  # in a VLM's inputs: the tokens greedy generation never picks


class ImageTextToText(TextCausalLM):
    """A vision-language model: token ids with image placeholders and images in, next-token
    logits out. Inputs are a dict (``input_ids`` and the family's image tensors, from its
    bridge's ``image_inputs``); greedy generation never picks an image placeholder (the
    family's ``banned_tokens``: a placeholder without its image is an error in HF). The vision
    tower's and the projector's outputs are captured on both sides (localisation names them)."""

    modality = "vision"

    def toy_config(self, config: dict[str, Any], max_tp: int, min_layers: int) -> dict[str, Any]:
        fam = toy._family(config)
        text = fam.text_config_dict(config)
        c = {k: v for k, v in config.items() if k != "torch_dtype"}
        if "text_config" not in config:  # flat legacy layout: the toy nests, as transformers does
            from bridges.core.vlm import flat_text_fields

            moved = set(flat_text_fields(config, every=True)) - {"model_type", "tie_word_embeddings"}
            c = {k: v for k, v in c.items() if k not in moved}
        c["text_config"] = toy.shrink_config(text, max_tp=max_tp, min_layers=min_layers)
        return fam.toy_config(c)

    def inputs(self, config: dict[str, Any], base: torch.Tensor) -> dict[str, Any]:
        fam = toy._family(config)
        inputs = fam.image_inputs(config, base % int(config["text_config"]["vocab_size"]))
        return {**inputs, BANNED: tuple(fam.banned_tokens(config))}

    def text_inputs(self, config: dict[str, Any], base: torch.Tensor) -> dict[str, Any]:
        """Text alone: the shared ids, image placeholders replaced by the next free ids."""
        vocab, banned = int(config["text_config"]["vocab_size"]), set(toy._family(config).banned_tokens(config))
        ids = base % vocab
        for b in sorted(banned):
            free = next(x % vocab for x in range(b + 1, b + 1 + vocab) if x % vocab not in banned)
            ids[ids == b] = free
        return {"input_ids": ids, BANNED: tuple(sorted(banned))}

    @staticmethod
    def _rest(inputs: dict[str, Any]):
        """The inputs other than the ids, for ids grown by generation (token types padded with text)."""
        rest = {k: v for k, v in inputs.items() if k not in ("input_ids", BANNED)}

        def inputs_for(ids: torch.Tensor) -> dict[str, Any]:
            out = dict(rest)
            for k, tt in rest.items():
                if k.endswith("token_type_ids"):  # Gemma3's token_type_ids, Qwen-VL's mm_token_type_ids
                    out[k] = torch.nn.functional.pad(tt, (0, ids.shape[1] - tt.shape[1]))
            return out
        return inputs_for

    def hf_logits(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        return forward.hf_logits(model, inputs["input_ids"], self._rest(inputs)(inputs["input_ids"]))

    def megatron_logits(self, chunks, inputs: dict[str, Any], vocab_size: int) -> torch.Tensor | None:
        return forward.megatron_logits(chunks, inputs["input_ids"], vocab_size,
                                       self._rest(inputs)(inputs["input_ids"]))

    def hf_generate(self, model, inputs: dict[str, Any], steps: int, margins: list | None = None) -> torch.Tensor:
        return forward.hf_generate(model, inputs["input_ids"], steps, margins, self._rest(inputs), inputs[BANNED])

    def megatron_generate(self, chunks, inputs: dict[str, Any], steps: int, vocab_size: int,
                          draft: torch.Tensor | None = None) -> torch.Tensor:
        return forward.megatron_generate(chunks, inputs["input_ids"], steps, vocab_size, self._rest(inputs),
                                         inputs[BANNED], draft=draft)

    # the vision stages the family's bridge declares (``vision_parts``), both sides
    def capture_hf(self, model, store: dict) -> contextlib.AbstractContextManager:
        return forward.capture_hf(model, store, toy._family(model.config.to_dict()).vision_parts)

    def capture_megatron(self, chunks, store: dict) -> contextlib.AbstractContextManager:
        from bridges.core.bridge import unwrap

        return forward.capture_megatron(chunks, store, getattr(unwrap(chunks[0]), "vision_parts", ()))


ADAPTERS: dict[str, Any] = {"text": TextCausalLM(), "vision": ImageTextToText()}


def adapter_for(config: dict[str, Any] | None = None, bridge=None):
    """The adapter of a model: by its bridge's ``modality``, or the registered bridge of
    ``config``; a modality without an adapter is an error naming it."""
    if bridge is None:
        from bridges.core.registry import lookup

        try:
            bridge = lookup(config)
        except LookupError:  # no registered bridge (one given by --mbridge-bridge): a text model
            return ADAPTERS["text"]
    modality = getattr(bridge, "modality", "text")
    if modality not in ADAPTERS:
        raise LookupError(f"no conformance adapter for modality {modality!r} (of "
                          f"{getattr(bridge, 'model_type', '?')}); known: {sorted(ADAPTERS)}")
    return ADAPTERS[modality]
