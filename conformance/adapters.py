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

    # -- forwards -------------------------------------------------------------------------
    def hf_logits(self, model, ids: torch.Tensor) -> torch.Tensor:
        return forward.hf_logits(model, ids)

    def megatron_logits(self, chunks, ids: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        return forward.megatron_logits(chunks, ids, vocab_size)

    def hf_generate(self, model, ids: torch.Tensor, steps: int, margins: list | None = None) -> torch.Tensor:
        return forward.hf_generate(model, ids, steps, margins)

    def megatron_generate(self, chunks, ids: torch.Tensor, steps: int, vocab_size: int) -> torch.Tensor:
        return forward.megatron_generate(chunks, ids, steps, vocab_size)

    # -- activations ------------------------------------------------------------------------
    def capture_hf(self, model, store: dict) -> contextlib.AbstractContextManager:
        return forward.capture_hf(model, store)

    def capture_megatron(self, chunks, store: dict) -> contextlib.AbstractContextManager:
        return forward.capture_megatron(chunks, store)


ADAPTERS: dict[str, Any] = {"text": TextCausalLM()}


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
