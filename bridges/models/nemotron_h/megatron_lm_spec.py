"""``--spec bridges.models.nemotron_h.megatron_lm_spec stack`` for Megatron-LM's pretrain_hybrid.py:
the HybridStack of local modules the bridge builds (bridges/core/hybrid.py), with the torch Mamba-2
scan and gated norm where mamba_ssm is not installed (``PATH`` says which). Built at import,
before parallel state exists: the spec holds classes only. The conv kernel is the published 4
(``mbridge megatron-args`` refuses another); the SSD chunk length only orders the scan's sums.
MoE layers (Nemotron 3) are sequential experts: the spec names the module, not the expert count
(Megatron-Core only asks that one is given), which --num-experts sets; their MoELayer builds the
latent projections without TransformerEngine (``latent_moe.py``; Megatron-Core's own where
--moe-latent-size is not given). The MTP block the pattern's "/" part builds (Nemotron 3 Super),
with the TE check of Megatron-LM's MTP layer answered (``mtp_without_te``)."""
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from bridges.core.hybrid import local_hybrid_stack_spec
from bridges.core.megatron_lm_spec import mtp_without_te
from bridges.models.nemotron_h.latent_moe import with_latent_moe
from bridges.models.nemotron_h.modeling_nemotron_h import install_torch_mamba

CONV_KERNEL, CHUNK = 4, 128
PATH = install_torch_mamba()
MTP_STAND_IN = mtp_without_te()  # Megatron-LM's core, without TE, cannot build an MTP layer otherwise
stack = with_latent_moe(local_hybrid_stack_spec(WrappedTorchNorm, d_conv=CONV_KERNEL, chunk_size=CHUNK,
                                                num_experts=1, mtp=True))
