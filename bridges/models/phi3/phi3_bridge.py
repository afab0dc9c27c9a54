"""Phi-3 (mini / medium, 4k context): the Llama layout with q, k and v fused into one
``qkv_proj`` ([q; k; v] rows, not interleaved per group) and gate and up fused into one
``gate_up_proj`` ([gate; up] rows), no biases, and a sliding attention window (mini-4k: 2047).

The 128k variants' ``longrope`` rope scaling has no Megatron-Core counterpart: refused by the
rope translation, naming the field.
"""
from typing import Any

from bridges.core.gpt import H, L, GPTBridge
from bridges.core.mappings import FusedGatedMLP, FusedQKV, Mapping
from bridges.core.registry import register_bridge


@register_bridge(model_type="phi3", architectures=["Phi3ForCausalLM"])
class Phi3Bridge(GPTBridge):
    sliding_window = "all"
    qkv_bias = False  # transformers' Phi3Attention has none, whatever attention_bias says
    # The published configs' auto_map names the classes transformers implements as its own
    # phi3 model: nothing of the repository's code is needed (docs/adding-a-model.md).
    ported_remote_code = ("configuration_phi3.Phi3Config", "modeling_phi3.Phi3ForCausalLM")


    def mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        fused = {L + "self_attention.linear_qkv.weight": FusedQKV(
                     L + "self_attention.linear_qkv.weight", {"qkv": H + "self_attn.qkv_proj.weight"}),
                 L + "mlp.linear_fc1.weight": FusedGatedMLP(
                     L + "mlp.linear_fc1.weight", {"gate_up": H + "mlp.gate_up_proj.weight"})}
        return [fused.get(m.megatron, m) for m in super().mappings(attrs)]
