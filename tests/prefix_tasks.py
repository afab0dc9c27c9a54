"""Rank tasks for test_prefix.py: a dense bridge's model held under a prefix, as a VLM holds its
language model (Megatron ``language_model.``, HF ``model.language_model.``)."""
from __future__ import annotations

import torch


class Held(torch.nn.Module):
    """A model that holds a GPTModel as ``language_model`` (no wrapper of Megatron's)."""

    def __init__(self, lm):
        super().__init__()
        self.language_model = lm

    def forward(self, *args, **kwargs):
        return self.language_model(*args, **kwargs)


def held_bridge(base):
    """``base`` (a bridge class) with its table under the VLM prefixes."""

    class HeldBridge(base):
        megatron_prefix = "language_model."

        def hf_name(self, name: str) -> str:
            return "model.language_model." + name[len("model."):] if name.startswith("model.") else name

    return HeldBridge


def held_case(toy_dir: str, held_dir: str, layout: str) -> dict:
    """Import the prefixed checkpoint into held models under ``layout``; return what rank 0
    sees: the global Megatron names, the export (bit-exact check), and the logits of the held
    language model (compared with HF's by the test), plus whether the held parameters equal a
    plain import's."""
    from megatron.core import parallel_state as ps

    from bridges import AutoBridge
    from bridges.core.bridge import _global_name
    from bridges.core.hf_io import HFCheckpoint
    from conformance.forward import megatron_logits
    from conformance.job import layout_provider

    plain = AutoBridge.from_hf_pretrained(toy_dir)
    bridge = held_bridge(type(plain))(plain.hf_config, HFCheckpoint(held_dir))
    chunks = [Held(c) for c in layout_provider(bridge, layout, torch.float32).provide_distributed_model()]
    bridge.load_hf_weights(chunks)
    names = sorted(_global_name(c, n) for c in chunks for n, _ in c.named_parameters())
    exported = {n: t.clone() for n, t in bridge.export_hf_weights(chunks, cpu=True)}
    ref = layout_provider(plain, layout, torch.float32).provide_distributed_model()
    plain.load_hf_weights(ref)
    same = all(torch.equal(a, b) for h, r in zip(chunks, ref)
               for (_, a), (_, b) in zip(h.language_model.named_parameters(), r.named_parameters()))
    ids = torch.randint(0, plain.megatron_attrs()["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    logits = megatron_logits([h.language_model for h in chunks], ids, plain.megatron_attrs()["vocab_size"])
    return {"names": names, "exported": exported if torch.distributed.get_rank() == 0 else None,
            "same_as_plain": same, "logits": logits, "ids": ids,
            "stage": ps.get_pipeline_model_parallel_rank()}
