"""Divergence localisation: stages in running order, hybrid stacks paired with HF's layers."""
import torch

from conformance.localize import localize, pair_hybrid


def _acts(labels, bad=None):
    return {k: torch.full((1, 2, 3), 5.0 if k == bad else 1.0) for k in labels}


def test_hybrid_blocks_come_before_the_final_norm():
    """Nemotron-H: one block per layer on both sides; a bad layer 2 is named, not the final norm."""
    names = ["embedding", "layer 0 block", "layer 1 block", "layer 2 block", "layer 3 block", "final norm"]
    first, trail = localize(_acts(names), _acts(names, bad="layer 2 block"))
    assert first == "layer 2 block" and [n for n, _ in trail][-1] == "layer 2 block"


def test_two_megatron_layers_per_hf_layer_are_paired():
    """Qwen3-Next: Megatron's block 2i is HF layer i's mixer, 2i + 1 its MLP."""
    hf = ["embedding", "layer 0 attention", "layer 0 mlp", "layer 1 attention", "layer 1 mlp", "final norm"]
    meg = ["embedding", "layer 0 block", "layer 1 block", "layer 2 block", "layer 3 block", "final norm"]
    paired = pair_hybrid(_acts(hf), _acts(meg, bad="layer 3 block"))
    assert set(paired) == set(hf)
    assert localize(_acts(hf), _acts(meg, bad="layer 2 block"))[0] == "layer 1 attention"
    assert localize(_acts(hf), _acts(meg, bad="layer 3 block"))[0] == "layer 1 mlp"


def test_one_to_one_stacks_are_left_alone():
    hf = ["layer 0 attention", "layer 0 mlp", "layer 1 attention", "layer 1 mlp"]
    assert set(pair_hybrid(_acts(hf), _acts(hf))) == set(hf)
    blocks = ["layer 0 block", "layer 1 block"]  # as many blocks as HF layers: not a 2:1 stack
    assert set(pair_hybrid(_acts(hf), _acts(blocks))) == set(blocks)
