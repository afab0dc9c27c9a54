"""``--spec bridges.models.deepseek.megatron_lm_spec layer`` for Megatron-LM's pretrain_gpt.py:
DeepSeek-V2/V3 and Kimi-K2 layers with the local MLA modules (modeling_deepseek.py), dense or MoE
as ``--moe-layer-freq`` says. Imported before parallel state exists: builds nothing here."""
from bridges.core.megatron_lm_spec import trainer_layer_spec
from bridges.models.deepseek.modeling_deepseek import localize_mla_layer

layer = trainer_layer_spec(lambda spec, is_moe: localize_mla_layer(spec))
