"""``--spec bridges.models.olmoe.megatron_lm_spec layer`` for Megatron-LM's pretrain_gpt.py: OLMoE
and MiniMax-M2 layers with the q/k RMSNorm over the whole projection (modeling_olmoe.py), with
``--qk-layernorm``. Imported before parallel state exists: builds nothing here."""
from bridges.core.megatron_lm_spec import trainer_layer_spec
from bridges.models.olmoe.modeling_olmoe import full_projection_qk_norm

layer = trainer_layer_spec(lambda spec, is_moe: full_projection_qk_norm(spec))
