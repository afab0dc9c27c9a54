"""``--spec bridges.models.deepseek.megatron_lm_spec layer`` for Megatron-LM's pretrain_gpt.py:
DeepSeek-V2/V3 and Kimi-K2 layers with the local MLA modules (modeling_deepseek.py), dense or MoE
as ``--moe-layer-freq`` says. Imported before parallel state exists: builds nothing here. With
``--mtp-num-layers`` (DeepSeek-V3) the MTP layer gpt_builders.py builds from Megatron's own local
MLA spec gets the same local modules (``trainer_mtp_layer``), and its TE check is answered
(``mtp_without_te``).

No flag reaches the MLA config's YaRN ``original_max_position_embeddings``, ``beta_fast`` and
``beta_slow`` (Kimi-K2: 4096, 1.0, 1.0; the trainer keeps 4096, 32, 1): the name
``layer_yarn_<original_max_position_embeddings>_<beta_fast>_<beta_slow>`` (``spec_name``) is the
layer with those values set on its own config (its attention builds its rotary embedding from
them), resolved on first use by the module's ``__getattr__``, and defined at import when the
command line's ``--spec`` names it (Megatron-LM looks it up in the module's dict)."""
from megatron.core.transformer.multi_latent_attention import MLASelfAttention

from bridges.core.megatron_lm_spec import define_requested_spec, mtp_without_te, trainer_layer_spec, trainer_mtp_layer
from bridges.models.deepseek.modeling_deepseek import localize_mla_layer

YARN = ("original_max_position_embeddings", "beta_fast", "beta_slow")  # in the name's order


def _local(spec, is_moe):
    return localize_mla_layer(spec)


def spec_name(yarn: dict) -> str:
    """The ``--spec`` name of the layer with these YaRN values (all three; repr round-trips)."""
    return "layer_yarn_" + "_".join(repr(v) for v in (int(yarn[YARN[0]]), float(yarn[YARN[1]]), float(yarn[YARN[2]])))


layer = trainer_layer_spec(_local)
MTP_HOOK = trainer_mtp_layer(_local, MLASelfAttention)
MTP_STAND_IN = mtp_without_te()


def __getattr__(name: str):
    if name.startswith("layer_yarn_"):
        try:
            orig, fast, slow = name[len("layer_yarn_"):].split("_")
            values = (int(orig), float(fast), float(slow))
        except ValueError:
            raise AttributeError(f"{name}: expected layer_yarn_<original_max_position_embeddings>_<beta_fast>_"
                                 "<beta_slow>, e.g. layer_yarn_4096_1.0_1.0") from None
        return trainer_layer_spec(_local, dict(zip(YARN, values)))
    raise AttributeError(name)


define_requested_spec(__name__, __getattr__)
