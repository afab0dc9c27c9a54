"""``--spec bridges.models.gpt_oss.megatron_lm_spec layer`` for Megatron-LM's pretrain_gpt.py:
GPT-OSS layers whose biased experts can be trained on the local spec (modeling_gpt_oss.py).
Imported before parallel state exists: builds nothing here."""
from bridges.core.megatron_lm_spec import trainer_layer_spec
from bridges.models.gpt_oss.modeling_gpt_oss import expert_output_copy

layer = trainer_layer_spec(expert_output_copy)
