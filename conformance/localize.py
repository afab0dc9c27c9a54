"""Divergence localisation: where do HF and Megatron activations part?"""
from __future__ import annotations

import re

import torch

from conformance.checks import rel_err

# a VLM's vision stages (its bridge's vision_parts), in the order they run: before the text
VISION = ("vision embedding", "vision block", "vision tower", "merger", "projector")


def _order(name: str):
    m = re.match(r"(vision block) (\d+)$", name)
    if name in VISION or m:
        return (-1, VISION.index(m.group(1) if m else name), int(m.group(2)) if m else 0)
    if name == "embedding":
        return (0, 0, 0)
    m = re.match(r"layer (\d+) (block|attention|mlp)$", name)
    if m:
        return (1, int(m.group(1)), 1 if m.group(2) == "mlp" else 0)
    return (2, 0, 0) if name == "final norm" else (3, 0, 0)


_BLOCK = re.compile(r"layer (\d+) block$")
_SUBLAYER = re.compile(r"layer (\d+) (attention|mlp)$")


def pair_hybrid(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``got`` under ``ref``'s labels where a hybrid stack splits each HF layer in two (Qwen3-Next,
    Qwen3.5: Megatron's layer 2i is HF layer i's token mixer, 2i + 1 its MLP): Megatron labels
    one block per layer, HF a mixer and an MLP per layer. Otherwise ``got`` as it is."""
    blocks = {int(m.group(1)): k for k in got if (m := _BLOCK.match(k))}
    hf_layers = {int(m.group(1)) for k in ref if (m := _SUBLAYER.match(k))}
    if not blocks or not hf_layers or any(_SUBLAYER.match(k) for k in got) or \
            max(blocks) + 1 != 2 * (max(hf_layers) + 1):
        return got
    out = {k: v for k, v in got.items() if not _BLOCK.match(k)}
    for j, k in blocks.items():
        out[f"layer {j // 2} {'mlp' if j % 2 else 'attention'}"] = got[k]
    return out


def localize(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
             tol: float = 1e-5) -> tuple[str | None, list[tuple[str, float]]]:
    """(first stage whose relative error exceeds ``tol``, [(stage, error) up to and including it]).

    Stages missing on either side are listed with error NaN and not judged.
    """
    got = pair_hybrid(ref, got)
    trail: list[tuple[str, float]] = []
    for name in sorted(set(ref) | set(got), key=_order):
        if name not in ref or name not in got or ref[name].shape != got[name].shape:
            trail.append((name, float("nan")))
            if name in ref and name in got:
                return name, trail
            continue
        err = rel_err(ref[name], got[name])
        trail.append((name, err))
        if err > tol:
            return name, trail
    return None, trail


def describe(first: str | None, trail: list[tuple[str, float]]) -> str:
    if first is None:
        return "activations agree at every stage"
    lines = [f"first divergence: {first}"] + [f"  {n:<24} rel err {e:.3g}" for n, e in trail]
    return "\n".join(lines)
