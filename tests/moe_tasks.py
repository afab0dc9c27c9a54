"""Rank tasks for tests/test_moe.py."""


def expert_params(toy_dir: str, layout: str) -> dict:
    """This rank's expert parameter names (global) and shapes under ``layout``."""
    from bridges.core.bridge import _global_name, unwrap
    from conformance.job import layout_provider, make_bridge

    import torch

    bridge = make_bridge(toy_dir)
    chunks = layout_provider(bridge, layout, torch.float32).provide_distributed_model()
    return {_global_name(unwrap(c), n): tuple(p.shape) for c in chunks for n, p in unwrap(c).named_parameters()
            if ".mlp.experts." in n}
