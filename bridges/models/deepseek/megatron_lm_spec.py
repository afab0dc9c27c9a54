"""``--spec bridges.models.deepseek.megatron_lm_spec layer`` for Megatron-LM's pretrain_gpt.py:
DeepSeek-V2/V3 and Kimi-K2 layers with the local MLA modules (modeling_deepseek.py), dense or MoE
as ``--moe-layer-freq`` says. Imported before parallel state exists: builds nothing here. With
``--mtp-num-layers`` (DeepSeek-V3, Kimi-K2) the MTP layer gpt_builders.py builds from Megatron's
own local MLA spec gets the same local modules (``trainer_mtp_layer``), and its TE check is
answered (``mtp_without_te``)."""
from megatron.core.transformer.multi_latent_attention import MLASelfAttention

from bridges.core.megatron_lm_spec import mtp_without_te, trainer_layer_spec, trainer_mtp_layer
from bridges.models.deepseek.modeling_deepseek import localize_mla_layer


def _local(spec, is_moe):
    return localize_mla_layer(spec)


layer = trainer_layer_spec(_local)
MTP_HOOK = trainer_mtp_layer(_local, MLASelfAttention)
MTP_STAND_IN = mtp_without_te()
