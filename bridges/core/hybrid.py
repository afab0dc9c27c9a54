"""Megatron-Core's HybridModel built from local modules (no TransformerEngine): the stack spec
the hybrid families share (Mamba-2, gated delta net, attention, MLP and MoE layers)."""
from __future__ import annotations


def _local_stack(final_norm):
    """Megatron-Core's HybridStack, its final norm built with ``final_norm`` (the layers' own):
    HybridStack names TransformerEngine's ``TENorm`` for it whatever the spec says."""
    from megatron.core.models.hybrid import hybrid_block

    class LocalHybridStack(hybrid_block.HybridStack):
        def __init__(self, *args, **kwargs):
            saved, hybrid_block.TENorm = hybrid_block.TENorm, final_norm
            try:
                super().__init__(*args, **kwargs)
            finally:
                hybrid_block.TENorm = saved

    return LocalHybridStack


def local_hybrid_stack_spec(norm, d_conv: int = 4, chunk_size: int = 128, qk_norm=None, gdn_norm=None,
                            num_experts: int | None = None, grouped: bool = False, mtp: bool = False):
    """HybridStack of Mamba-2, gated-delta-net, attention, MLP and MoE layers from Megatron-Core's
    local modules (column / row parallel linears, DotProductAttention), each layer behind
    ``norm`` (the final norm too); the Mamba-2 mixer's conv kernel and SSD chunk length as given; ``qk_norm``: the
    attention's q/k norm (None: none); ``gdn_norm``: the gated delta net's output norm;
    ``num_experts``: MoE layers' experts (sequential, or grouped GEMM); ``mtp``: with the
    multi-token-prediction block the pattern's "/" depths need (its norms ``norm``)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    extra = {}
    if gdn_norm is not None:
        from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules

        extra["gdn_layer"] = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(module=GatedDeltaNet, submodules=GatedDeltaNetSubmodules(
                in_proj=ColumnParallelLinear, out_norm=gdn_norm, out_proj=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add))
    if num_experts:
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
        from megatron.core.transformer.transformer_layer import MoETransformerLayer

        extra["moe_layer"] = ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm, mlp=get_moe_module_spec(use_te=False, num_experts=num_experts,
                                                            moe_grouped_gemm=grouped),
            mlp_bda=get_bias_dropout_add))
    if mtp:
        extra["mtp_block_spec"] = _mtp_block_spec(norm)

    return ModuleSpec(module=_local_stack(norm), submodules=HybridStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=norm,
            mixer=ModuleSpec(module=MambaMixer, params={"d_conv": d_conv, "chunk_size": chunk_size},
                             submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear,
                                                             out_proj=RowParallelLinear)),
            mamba_bda=get_bias_dropout_add)),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(
                                          linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
                                          linear_proj=RowParallelLinear, q_layernorm=qk_norm,
                                          k_layernorm=qk_norm)),
            self_attn_bda=get_bias_dropout_add)),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add)),
        **extra,
    ))


def _mtp_block_spec(norm):
    """Megatron-Core's MTP block for a hybrid stack: per depth, ``norm`` on the embedding
    (enorm) and on the hidden state (hnorm), the column-parallel projection of both (eh_proj),
    and the final norm; the depth's layers are a HybridStack of the pattern's MTP part, built by
    HybridModel from the stack's own layer specs."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.multi_token_prediction import (
        MultiTokenPredictionBlock, MultiTokenPredictionBlockSubmodules, MultiTokenPredictionLayer,
        MultiTokenPredictionLayerSubmodules)
    from megatron.core.transformer.spec_utils import ModuleSpec

    layer = ModuleSpec(module=MultiTokenPredictionLayer, submodules=MultiTokenPredictionLayerSubmodules(
        enorm=norm, hnorm=norm, layer_norm=norm, eh_proj=ColumnParallelLinear))
    return ModuleSpec(module=MultiTokenPredictionBlock,
                      submodules=MultiTokenPredictionBlockSubmodules(layer_specs=[layer]))


def split_pattern(pattern: str) -> tuple[str, str, int]:
    """(the main layers, one MTP depth's layers, MTP depths) of a unified hybrid pattern, as
    Megatron-Core writes it: ``"G*GE/*E"`` is four main layers and one MTP depth of two."""
    main, *mtp = pattern.split("/")
    if len(set(mtp)) > 1 or "" in mtp:
        raise ValueError(f"hybrid pattern {pattern!r}: every MTP depth after '/' must be the same, non-empty")
    return main, (mtp[0] if mtp else ""), len(mtp)


def stage_pattern(pattern: str, pp: int, vpp: int | None = None) -> str:
    """The layer pattern's main layers cut into equal "|"-separated segments, one per pipeline
    (and virtual pipeline) stage, its MTP depths after them: how Megatron-Core's HybridModel,
    and Megatron-LM's --hybrid-layer-pattern, give the stage layout (MTP on the last stage)."""
    main, mtp, depths = split_pattern(pattern)
    stages = pp * (vpp or 1)
    n = len(main) // stages
    return "|".join(main[i * n:(i + 1) * n] for i in range(stages)) + f"/{mtp}" * depths


def mtp_mappings(table: list, pattern: str, decoder: tuple[str, str], mtp_hf: str = "mtp.layers.*.") -> list:
    """The MTP depths' layer mappings of a hybrid model, moved from its decoder's: MTP layer
    ``j`` of every depth (symbol ``x`` of the pattern's MTP part) takes the decoder mappings of
    the main layers of that symbol (the ones whose ``layers`` include such a layer, or all),
    under Megatron's ``mtp.layers.<depth>.mtp_model_layer.layers.<j>.`` and HF's ``mtp_hf``
    (its ``*``: the depth) in place of ``decoder`` = (Megatron, HF) layer prefixes."""
    import copy

    main, inner, depths = split_pattern(pattern)
    meg, hf = decoder
    out = []
    for j, sym in enumerate(inner):
        kind = {i for i, x in enumerate(main) if x == sym}
        if not kind:
            raise ValueError(f"hybrid pattern {pattern!r}: MTP layer symbol {sym!r} is in no main layer")
        for m in table:
            if not m.megatron.startswith(meg) or (m.layers is not None and not kind & set(m.layers)):
                continue
            m = copy.copy(m)
            move = lambda n: mtp_hf + n[len(hf):] if n.startswith(hf) else n  # noqa: E731
            object.__setattr__(m, "megatron", f"mtp.layers.*.mtp_model_layer.layers.{j}." + m.megatron[len(meg):])
            object.__setattr__(m, "hf", {r: move(n) for r, n in m.hf.items()} if isinstance(m.hf, dict) else move(m.hf))
            object.__setattr__(m, "layers", tuple(range(depths)))
            object.__setattr__(m, "layer_stride", 1)
            out.append(m)
    return out


def hybrid_model(provider, spec, pre_process: bool, post_process: bool, vp_stage: int | None = None, **extra):
    """One HybridModel chunk of ``provider``'s ``hybrid_layer_pattern``, split into equal
    "|"-separated segments per pipeline (and virtual pipeline) stage, as Megatron-Core asks;
    ``extra``: the position embedding and rotary arguments of the family."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    p = provider
    pattern = stage_pattern(p.hybrid_layer_pattern, p.pipeline_model_parallel_size,
                            p.virtual_pipeline_model_parallel_size)
    return HybridModel(config=p.transformer_config(), hybrid_stack_spec=spec, vocab_size=p.padded_vocab_size,
                       max_sequence_length=p.max_sequence_length, hybrid_layer_pattern=pattern,
                       pre_process=pre_process, post_process=post_process, parallel_output=p.parallel_output,
                       share_embeddings_and_output_weights=p.share_embeddings_and_output_weights,
                       vp_stage=vp_stage, **extra)
