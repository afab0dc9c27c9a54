"""Qwen3-VL-MoE (``qwen3_vl_moe``: Qwen/Qwen3-VL-30B-A3B and 235B-A22B-Instruct): Qwen3-VL (its
tower, deepstack, interleaved M-RoPE: ``bridges/models/qwen3_vl/``) over Qwen3-MoE's text
layers. What is its own:

- the published checkpoints store each layer's experts stacked and transposed against
  transformers' in-memory layout: ``mlp.experts.gate_up_proj`` ``[E, H, 2I]`` (gate and up
  halves along the last dim), ``mlp.experts.down_proj`` ``[E, I, H]``. transformers transposes
  a stored tensor whose shape is not its in-memory one ([E, 2I, H], [E, H, I]) on load, and
  saves the in-memory layout. The bridge reads the stored shape the same way (a square one is
  in-memory, as for transformers) and writes back the layout it read;
- HF's router renormalises the top-k probabilities whatever ``norm_topk_prob`` says.
"""
from __future__ import annotations

from typing import Any

from bridges.core.config import get_path
from bridges.core.gpt import H, L
from bridges.core.mappings import Mapping, RowParallel, StackedGatedMLP
from bridges.core.registry import register_bridge
from bridges.models.qwen3_moe.qwen3_moe_bridge import Qwen3MoeBridge
from bridges.models.qwen3_vl.qwen3_vl_bridge import InterleavedMRoPEText, Qwen3VLBridge


class TransposedStackedGatedMLP(StackedGatedMLP):
    """linear_fc1 of one expert from a stacked ``gate_up_proj`` row stored ``[H, 2I]`` (input
    first; the [gate; up] halves along the stored last dim)."""

    kind = "gated_mlp_stacked_transposed"

    def _gate_up(self, hf):
        return super()._gate_up({"gate_up": hf["gate_up"].transpose(0, 1)})

    def to_hf(self, shards, shapes):
        return {"gate_up": super().to_hf(shards, shapes)["gate_up"].transpose(0, 1).contiguous()}


class TransposedRowParallel(RowParallel):
    """linear_fc2 of one expert from a stacked ``down_proj`` row stored ``[I, H]`` (input first)."""

    kind = "row_parallel_transposed"

    def _merge(self, hf, shapes):
        return hf[""].transpose(0, 1)

    def _unmerge(self, full, shapes):
        return {"": full.transpose(0, 1).contiguous()}


class Qwen3VLMoeLanguageBridge(InterleavedMRoPEText, Qwen3MoeBridge):
    """Qwen3-VL-MoE's text model: Qwen3-MoE's layers, interleaved M-RoPE, the published
    transposed stacked experts."""

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        attrs["moe_router_pre_softmax"] = False  # HF renormalises the top-k, norm_topk_prob or not
        return attrs

    def stacked_experts(self) -> bool:
        return True  # the only layout transformers and the published files have

    def transposed(self, part: str, moe: tuple[int, ...]) -> bool:
        """Whether the source stores ``part`` ("gate_up" or "down") transposed (the published
        layout), read from the first MoE layer's stored shape as transformers reads it: not
        the in-memory [E, 2I, H] / [E, H, I] and its transpose. Without a checkpoint: the
        published layout."""
        if self.checkpoint is None or not moe:
            return True
        name = H.replace("*", str(moe[0])) + self.stacked_hf[part]
        if name not in self.checkpoint:
            return True
        shape = tuple(self.checkpoint.shape(name))[1:]
        h, i = get_path(self.hf_config, "hidden_size"), get_path(self.hf_config, "moe_intermediate_size")
        memory = (2 * i, h) if part == "gate_up" else (h, i)
        return shape != memory and shape == memory[::-1]

    def expert_mappings(self, moe: tuple[int, ...]) -> list[Mapping]:
        up = TransposedStackedGatedMLP if self.transposed("gate_up", moe) else StackedGatedMLP
        down = TransposedRowParallel if self.transposed("down", moe) else RowParallel
        fc1 = lambda meg: up(meg, {"gate_up": H + self.stacked_hf["gate_up"] + "[*]"},
                             layers=moe, alternate="weight*" in meg)
        fc2 = lambda meg: down(meg, H + self.stacked_hf["down"] + "[*]", layers=moe, alternate="weight*" in meg)
        return [fc1(L + "mlp.experts.local_experts.*.linear_fc1.weight"),
                fc2(L + "mlp.experts.local_experts.*.linear_fc2.weight"),
                fc1(L + "mlp.experts.linear_fc1.weight*"),
                fc2(L + "mlp.experts.linear_fc2.weight*")]


@register_bridge(model_type="qwen3_vl_moe", architectures=["Qwen3VLMoeForConditionalGeneration"])
class Qwen3VLMoeBridge(Qwen3VLBridge):
    language_bridge = Qwen3VLMoeLanguageBridge

    @classmethod
    def toy_config(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Qwen3-VL's toy, with an expert width whose stacked tensors are not square (2I != H:
        the stored layout is then readable from the shape, as for the published sizes)."""
        config = super().toy_config(config)
        text = config["text_config"]
        if 2 * int(text["moe_intermediate_size"]) == int(text["hidden_size"]):
            text["moe_intermediate_size"] = int(text["moe_intermediate_size"]) * 3 // 4
        return config

    @classmethod
    def toy_saved(cls, path) -> None:
        """The experts as published: transformers saves its in-memory layout, transposed here."""
        from pathlib import Path

        from safetensors.torch import load_file, save_file

        for f in Path(path).glob("*.safetensors"):
            tensors = load_file(str(f))
            if any(n.endswith(EXPERTS) for n in tensors):
                save_file({n: t.transpose(1, 2).contiguous() if n.endswith(EXPERTS) else t
                           for n, t in tensors.items()}, str(f), metadata={"format": "pt"})


EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
