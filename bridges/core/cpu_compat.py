"""Lets Megatron-Core's GPTModel (local spec) build and run on CPU over gloo.

Megatron-Core assumes CUDA in a few places. Each patch below replaces one such place with a
CPU equivalent. Patches are reversible (tests switch them off one at a time) and are applied
only when CUDA is absent: GPU runs use NCCL and no patches.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch


@dataclass
class _Patch:
    name: str
    why: str
    target: Callable[[], Any]  # returns the object whose attribute is replaced
    attr: str
    make: Callable[[Any], Any]  # original -> replacement


def _current_device(_orig):
    # Rotary embeddings call torch.cuda.current_device() for tensors that live on the CPU.
    return lambda: "cpu"


def _synchronize(_orig):
    # dist_checkpointing's writer copies tensors with non_blocking=True, then synchronises.
    return lambda *args, **kwargs: None


def _causal_mask(_orig):
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    return get_default_causal_mask


def _window_mask(_orig):
    def get_sliding_window_causal_mask(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool)
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

    return get_sliding_window_causal_mask


def _rng_fork(orig):
    # The attention forks the CUDA RNG tracker even in eval; without CUDA no state can be added.
    def fork(self, name=None, *args, **kwargs):
        key = name if name is not None else "model-parallel-rng"
        if key not in self.states_:
            return contextlib.nullcontext()
        return orig(self, name, *args, **kwargs)

    return fork


def _tied_setup(orig):
    # With tied embeddings and PP > 1 the last stage's copy is moved with .cuda() before the
    # all-reduce that syncs it with the first stage: keep it on the CPU for that call only.
    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            return orig(self, *args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    return setup_embeddings_and_output_layer


def _language_module():
    from megatron.core.models.common.language_module.language_module import LanguageModule

    return LanguageModule


def _fused_softmax():
    import megatron.core.fusions.fused_softmax as m

    return m


def _rng_tracker_cls():
    from megatron.core.tensor_parallel import random

    return random.CudaRNGStatesTracker


PATCHES: list[_Patch] = [
    _Patch("current_device", "rotary embedding calls torch.cuda.current_device()",
           lambda: torch.cuda, "current_device", _current_device),
    _Patch("synchronize", "dist_checkpointing's writer calls torch.cuda.synchronize()",
           lambda: torch.cuda, "synchronize", _synchronize),
    _Patch("causal_mask", "default causal mask is built with device='cuda'",
           _fused_softmax, "get_default_causal_mask", _causal_mask),
    _Patch("window_mask", "sliding-window mask is built with device='cuda'",
           _fused_softmax, "get_sliding_window_causal_mask", _window_mask),
    _Patch("rng_fork", "attention forks a CUDA RNG state that cannot exist without CUDA",
           _rng_tracker_cls, "fork", _rng_fork),
    _Patch("tied_embedding", "tied embeddings at PP > 1 move the output copy with .cuda()",
           _language_module, "setup_embeddings_and_output_layer", _tied_setup),
]

_saved: dict[str, tuple[Any, Any]] = {}


def needed() -> bool:
    """True when CUDA is absent, i.e. when the patches must be applied."""
    return not torch.cuda.is_available()


def apply(exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Apply every patch not in ``exclude`` (idempotent). Returns the names now active."""
    for p in PATCHES:
        if p.name in exclude or p.name in _saved:
            continue
        obj = p.target()
        orig = getattr(obj, p.attr)
        _saved[p.name] = (obj, orig)
        setattr(obj, p.attr, p.make(orig))
    return sorted(_saved)


def remove(names: set[str] | None = None) -> None:
    """Undo patches (all by default)."""
    for name in list(_saved):
        if names is None or name in names:
            obj, orig = _saved.pop(name)
            setattr(obj, next(p.attr for p in PATCHES if p.name == name), orig)


@contextlib.contextmanager
def patched(exclude: set[str] | frozenset[str] = frozenset()) -> Iterator[list[str]]:
    """Context manager: exactly the patches not in ``exclude`` are active inside."""
    global _pinned
    before = set(_saved)
    remove()
    _pinned += 1
    try:
        yield apply(exclude)
    finally:
        _pinned -= 1
        remove()
        apply(frozenset(p.name for p in PATCHES) - before)


_pinned = 0  # inside ``patched``: exactly its patches stay active, ``ensure`` adds none


def ensure() -> None:
    """Apply all patches when CUDA is absent; do nothing on a GPU machine (or inside
    ``patched``, which chose the active patches). Called wherever the bridges build or load a
    model (``init_model_parallel``, ``ModelProvider.provide``, ``load_hf_weights``)."""
    if needed() and not _pinned:
        apply()
