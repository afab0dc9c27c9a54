"""MoEBridge: the base for mixture-of-experts decoder families (Qwen-MoE, Mixtral, OLMoE, GLM...).

A family names its HF expert tensors and its config fields; this base builds the mapping table
for both HF expert layouts and both Megatron expert layouts:

- HF per-expert tensors (``mlp.experts.<e>.gate_proj.weight``: what transformers saves) or
  stacked ones (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``: transformers' in-memory layout,
  found in some checkpoints); export writes back the layout the source used;
- Megatron sequential experts (``local_experts.<e>.linear_fc1``) or grouped GEMM weights
  (``linear_fc1.weight<e>``), both in the table; the model built has one of them.

Dense-first layers (``moe_layer_freq``) keep the dense MLP mappings, restricted to their layers.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from bridges.core.config import ConfigError, Field, get_path
from bridges.core.experts import block_spec
from bridges.core.gpt import GPTBridge, H, L
from bridges.core.mappings import GatedMLP, Mapping, Replicated, RowParallel, StackedGatedMLP
from bridges.core.provider import ModelProvider


def qwen_moe_layers(cfg) -> list[int]:
    """Qwen2-MoE / Qwen3-MoE: layer i is sparse unless listed in ``mlp_only_layers``, every
    ``decoder_sparse_step``-th layer."""
    step = get_path(cfg, "decoder_sparse_step", 1)
    dense = set(get_path(cfg, "mlp_only_layers", None) or ())
    return [int(i not in dense and (i + 1) % step == 0) for i in range(get_path(cfg, "num_hidden_layers"))]


def moe_fields(experts: str = "num_experts", ffn: str = "moe_intermediate_size",
               norm_topk: bool = True) -> tuple[Field, ...]:
    """The MoE config fields most HF families share (names of those that vary)."""
    fields = (Field(experts, "num_moe_experts"),
              Field("num_experts_per_tok", "moe_router_topk"),
              Field(ffn, "moe_ffn_hidden_size"),
              Field("router_aux_loss_coef", "moe_aux_loss_coeff", 0.0))
    # HF norm_topk_prob=False: softmax over all experts, then top-k (Megatron pre-softmax)
    return fields + ((Field("norm_topk_prob", "moe_router_pre_softmax", True, lambda v: not v,
                            lambda v: not v),) if norm_topk else ())


def sigmoid_bias_routing(groups: int, group_topk: int, topk: int, experts: int) -> dict[str, Any]:
    """HF's sigmoid router with a score-correction bias for the choice and group-limited top-k,
    renormalised (DeepSeek-V3's ``noaux_tc``, Nemotron-H's MoE) as Megatron-Core router fields.
    HF scores a group by the sum of its top-2 experts, Megatron-Core by its top
    ``topk // group_topk``: grouped configs must make those the same."""
    if groups > 1 and (experts % groups or group_topk > groups or topk // group_topk != 2):
        raise ConfigError(f"n_group={groups}, topk_group={group_topk}, num_experts_per_tok={topk}, "
                          f"n_routed_experts={experts}: group-limited routing needs experts divisible "
                          f"by n_group and num_experts_per_tok // topk_group == 2 (HF scores a "
                          f"group by its top-2 experts, Megatron-Core by its top "
                          f"num_experts_per_tok // topk_group)")
    return dict(moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
                moe_router_enable_expert_bias=True,
                moe_router_num_groups=groups if groups > 1 else None,
                moe_router_group_topk=group_topk if groups > 1 else None)


# Megatron settings a converted MoE needs everywhere: the allgather dispatcher (the alltoall
# one needs CUDA streams), the router in fp32, as HF computes it.
MOE_PORTABLE = dict(moe_token_dispatcher_type="allgather", moe_router_dtype="fp32",
                    moe_permute_fusion=False, moe_router_load_balancing_type="aux_loss")


class MoEBridge(GPTBridge):
    mixture_of_experts = True
    # HF names under "model.layers.<i>.": per-expert (``*`` = expert) and stacked.
    experts_hf: ClassVar[dict[str, str]] = {"gate": "mlp.experts.*.gate_proj.weight",
                                            "up": "mlp.experts.*.up_proj.weight",
                                            "down": "mlp.experts.*.down_proj.weight"}
    stacked_hf: ClassVar[dict[str, str]] = {"gate_up": "mlp.experts.gate_up_proj",
                                            "down": "mlp.experts.down_proj"}
    router_hf: ClassVar[str] = "mlp.gate.weight"
    router_bias_hf: ClassVar[str | None] = None  # score-correction bias (sigmoid routers)
    shared_hf: ClassVar[dict[str, str] | None] = None  # gate / up / down of the shared expert(s)
    shared_gate_hf: ClassVar[str | None] = None  # sigmoid gate on the shared expert output
    # False where Megatron-Core cannot split the experts by expert TP (experts with biases: it
    # asserts ETP 1); layouts then keep the experts whole (the suite's defaults use etp1)
    expert_tensor_parallel: ClassVar[bool] = True

    # -- config ---------------------------------------------------------------------------
    def moe_layers(self) -> list[int]:
        """1 for a MoE layer, 0 for a dense one, per layer (Megatron's moe_layer_freq list);
        families with dense layers override (first_k_dense_replace, mlp_only_layers...)."""
        return [1] * self._num_layers()

    def megatron_attrs(self) -> dict[str, Any]:
        attrs = super().megatron_attrs()
        attrs.update(MOE_PORTABLE, moe_layer_freq=self.moe_layers())
        if attrs.get("moe_aux_loss_coeff", 0.0) == 0.0:
            attrs["moe_router_load_balancing_type"] = "none"
        return attrs

    def layer_spec(self, provider: ModelProvider, vp_stage: int | None = None):
        return block_spec(provider, vp_stage, self.customize_layer)

    def layout_constraints(self, provider: ModelProvider) -> list[tuple[str, int, int, str]]:
        """As a dense decoder, and experts by EP, their MLP by expert TP, the shared expert by TP."""
        p, lay = provider, provider.layout
        return super().layout_constraints(provider) + [
            ("num_moe_experts", p.num_moe_experts, lay.ep, "EP"),
            ("moe_ffn_hidden_size", p.moe_ffn_hidden_size, lay.expert_tp, "expert TP"),
            ("moe_shared_expert_intermediate_size",
             getattr(p, "moe_shared_expert_intermediate_size", None) or 0, lay.tp, "TP")] + (
            [] if self.expert_tensor_parallel else
            [("whole experts (Megatron-Core splits biased experts only at ETP 1)", 1, lay.expert_tp, "expert TP")])

    def customize_layer(self, layer_spec, is_moe: bool):
        """Hook: a family swaps in its own module (e.g. its attention) here."""
        return layer_spec

    # -- weights --------------------------------------------------------------------------
    def stacked_experts(self) -> bool:
        """Whether the source checkpoint stores experts stacked (else per-expert tensors)."""
        return self._in_some_layer(self.stacked_hf["gate_up"], ("", "_blocks"))

    def _in_some_layer(self, rel: str, suffixes: tuple[str, ...] = ("",)) -> bool:
        """Whether the source checkpoint holds decoder-layer tensor ``rel`` (or ``rel`` + a suffix)
        in any layer."""
        ckpt, name = self.checkpoint, H.replace("*", "{}") + rel
        return ckpt is not None and any(name.format(i) + s in ckpt for i in range(self._num_layers())
                                        for s in suffixes)

    def _num_layers(self) -> int:
        return get_path(self.hf_config, "num_hidden_layers")

    def mappings(self, attrs: dict[str, Any]) -> list[Mapping]:
        freq = attrs["moe_layer_freq"]
        dense = tuple(i for i, f in enumerate(freq) if not f)
        moe = tuple(i for i, f in enumerate(freq) if f)
        table = []
        for m in super().mappings(attrs):
            if m.megatron.startswith(L + "mlp."):  # the dense MLP: dense layers only
                if dense:
                    table.append(dataclasses.replace(m, layers=dense))
            else:
                table.append(m)
        table.append(Replicated(L + "mlp.router.weight", H + self.router_hf, layers=moe))
        if self.router_bias_hf:
            table.append(Replicated(L + "mlp.router.expert_bias", H + self.router_bias_hf, layers=moe))
        table += self.expert_mappings(moe)
        if self.shared_hf:
            s = self.shared_hf
            table += [GatedMLP(L + "mlp.shared_experts.linear_fc1.weight",
                               {"gate": H + s["gate"], "up": H + s["up"]}, layers=moe),
                      RowParallel(L + "mlp.shared_experts.linear_fc2.weight", H + s["down"], layers=moe)]
            if self.shared_gate_hf:
                table.append(Replicated(L + "mlp.shared_experts.gate_weight", H + self.shared_gate_hf,
                                        layers=moe))
        return table

    def expert_mappings(self, moe: tuple[int, ...]) -> list[Mapping]:
        """Routed experts, both Megatron layouts (grouped as the alternate), from the HF layout
        of the source checkpoint."""
        if self.stacked_experts():
            fc1 = lambda meg: StackedGatedMLP(meg, {"gate_up": H + self.stacked_hf["gate_up"] + "[*]"},
                                              layers=moe, alternate="weight*" in meg)
            fc2 = lambda meg: RowParallel(meg, H + self.stacked_hf["down"] + "[*]", layers=moe,
                                          alternate="weight*" in meg)
        else:
            e = self.experts_hf
            fc1 = lambda meg: GatedMLP(meg, {"gate": H + e["gate"], "up": H + e["up"]}, layers=moe,
                                       alternate="weight*" in meg)
            fc2 = lambda meg: RowParallel(meg, H + e["down"], layers=moe, alternate="weight*" in meg)
        return [fc1(L + "mlp.experts.local_experts.*.linear_fc1.weight"),
                fc2(L + "mlp.experts.local_experts.*.linear_fc2.weight"),
                fc1(L + "mlp.experts.linear_fc1.weight*"),
                fc2(L + "mlp.experts.linear_fc2.weight*")]
