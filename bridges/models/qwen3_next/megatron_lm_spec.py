"""``--spec bridges.models.qwen3_next.megatron_lm_spec stack`` for Megatron-LM's pretrain_hybrid.py
(Qwen3-Next; a text-only Qwen3.5): the HybridStack of local modules the bridge builds
(bridges/core/hybrid.py): zero-centred norms, gated attention with q/k norms, the gated delta net
with its plain output norm, MoE layers (sequential experts: the spec names the module, --num-experts
the count), and the MTP block the pattern's "/" part builds. Megatron-Core's torch delta rule (the
generated flags carry --deterministic-mode) with the fla stand-ins of ``install_torch_gdn``, and the
TE check of Megatron-LM's MTP layer answered (``mtp_without_te``). Built
at import, before parallel state exists: the spec holds classes only."""
from bridges.core.hybrid import local_hybrid_stack_spec
from bridges.core.megatron_lm_spec import mtp_without_te
from bridges.models.gemma.modeling_gemma import ZeroCenteredRMSNorm
from bridges.models.qwen3_next.modeling_qwen3_next import PlainRMSNorm, install_torch_gdn

PATH = install_torch_gdn()
MTP_STAND_IN = mtp_without_te()  # Megatron-LM's core, without TE, cannot build an MTP layer otherwise
stack = local_hybrid_stack_spec(ZeroCenteredRMSNorm, qk_norm=ZeroCenteredRMSNorm, gdn_norm=PlainRMSNorm,
                                num_experts=1, mtp=True)
