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


def expert_reads(toy_dir: str, layout: str) -> list[str]:
    """The HF expert tensors this rank reads while importing under ``layout``."""
    import torch

    from conformance.job import layout_provider, make_bridge

    bridge = make_bridge(toy_dir)
    read: list[str] = []
    ckpt = bridge.checkpoint
    get, get_row = ckpt.get, ckpt.get_row
    ckpt.get = lambda n: (read.append(n), get(n))[1]
    ckpt.get_row = lambda n, r: (read.append(f"{n}[{r}]"), get_row(n, r))[1]
    chunks = layout_provider(bridge, layout, torch.float32).provide_distributed_model()
    bridge.load_hf_weights(chunks)
    return sorted(n for n in read if ".experts." in n)
