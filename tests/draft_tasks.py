"""Rank tasks for tests/test_draft.py: greedy decoding with and without a draft to verify; process groups kept across layouts."""
import torch
import torch.distributed as dist


def decode(toy_dir: str, layout: str, ids: torch.Tensor, steps: int) -> dict | None:
    """Greedy tokens step by step, and with drafts: the right continuation, one that parts
    from it at token 5 (a wrong token), and one wrong from its first token."""
    from conformance.forward import megatron_generate
    from conformance.job import layout_provider, make_bridge

    bridge = make_bridge(toy_dir)
    provider = layout_provider(bridge, layout, torch.float32)
    chunks = provider.provide_distributed_model()
    bridge.load_hf_weights(chunks)
    for c in chunks:
        c.eval()
    vocab = provider.vocab_size
    plain = megatron_generate(chunks, ids, steps, vocab)
    right = plain[:, ids.shape[1]:]
    late, early = right.clone(), right.clone()
    late[:, 5] = (late[:, 5] + 1) % vocab
    early[:, 0] = (early[:, 0] + 1) % vocab
    out = {name: megatron_generate(chunks, ids, steps, vocab, draft=d)
           for name, d in (("right", right), ("late", late), ("early", early), ("short", right[:, :3]))}
    return {"plain": plain, **out} if dist.get_rank() == 0 else None


def groups_kept() -> list[bool]:
    """Whether a layout met again gets the process groups made for it the first time, working."""
    import torch
    from megatron.core import parallel_state as ps

    from bridges.core.parallel import Layout, init_model_parallel

    init_model_parallel(Layout.parse("tp2"))
    first = ps.get_tensor_model_parallel_group()
    init_model_parallel(Layout.parse("pp2"))
    init_model_parallel(Layout.parse("tp2"))
    again = ps.get_tensor_model_parallel_group()
    t = torch.ones(1)
    torch.distributed.all_reduce(t, group=again)
    return [again is first, float(t) == 2.0]
