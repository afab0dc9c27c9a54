"""``--spec bridges.models.granite.megatron_lm_spec layer_<m>`` for Megatron-LM's pretrain_gpt.py:
Granite layers whose residual adds are scaled by m (``residual_multiplier``, modeling_granite.py),
dense or MoE by the layer's position (bridges/core/megatron_lm_spec.py). No TransformerConfig field
carries m, so the spec's name does: ``layer_0.22`` is the layer with m = 0.22 (any name
``layer_<float>``, resolved on first use by the module's ``__getattr__``, and defined at import
when the command line's ``--spec`` names it: Megatron-LM looks it up in the module's dict).
Imported before parallel state exists: builds nothing here."""
from bridges.core.megatron_lm_spec import define_requested_spec, trainer_layer_spec


def spec_name(multiplier: float) -> str:
    """The ``--spec`` name of the layer with this residual multiplier (exact: repr round-trips)."""
    return f"layer_{float(multiplier)!r}"


def __getattr__(name: str):
    if name.startswith("layer_"):
        try:
            m = float(name[len("layer_"):])
        except ValueError:
            raise AttributeError(f"{name}: expected layer_<residual_multiplier>, e.g. layer_0.22") from None
        from bridges.models.granite.modeling_granite import residual_scaled

        return trainer_layer_spec(lambda spec, is_moe: residual_scaled(spec, m))
    raise AttributeError(name)


define_requested_spec(__name__, __getattr__)
