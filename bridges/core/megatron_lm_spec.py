"""Layer specs for Megatron-LM's ``--spec <module> <name>``, for families whose layers need their
own modules (multi-latent attention on the local backend, a q/k norm over the whole projection).

Megatron-LM imports the named object before parallel state exists and hands it to ``GPTModel`` as
the spec of every decoder layer (``[spec] * layers of the stage``), so it cannot know which layer
is dense and which MoE. ``trainer_layer_spec`` returns a spec whose layer class decides when it is
built: it takes the submodules of its own position from the same block spec the bridge builds
(``bridges.core.experts.block_spec`` with the family's ``customize(layer_spec, is_moe)`` hook),
so the trainer's model has the bridge's parameter names and shapes at any PP / VPP layout.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable


def trainer_layer_spec(customize: Callable, config_fields: dict | None = None):
    """A ModuleSpec for Megatron-LM's ``--spec``; building nothing until a layer is built.
    ``config_fields``: config values no flag reaches (the spec's name carries them), set on the
    layer's own copy of the trainer's config."""
    import copy

    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    class BridgeLayer(TransformerLayer):
        def __init__(self, config, submodules=None, layer_number: int = 1, vp_stage=None, **kw):
            from bridges.core.experts import block_spec

            if config_fields:
                config = copy.copy(config)
                for k, v in config_fields.items():
                    setattr(config, k, v)

            provider = SimpleNamespace(transformer_config=lambda: config, normalization=config.normalization,
                                       moe_grouped_gemm=config.moe_grouped_gemm)
            own = block_spec(provider, vp_stage, customize).layer_specs[layer_number - 1]  # stage-local
            super().__init__(config=config, submodules=own.submodules, layer_number=layer_number,
                             vp_stage=vp_stage, **kw)

    return ModuleSpec(module=BridgeLayer, submodules=TransformerLayerSubmodules())


def mtp_without_te() -> bool:
    """Let Megatron-LM's own core build MTP layers without TransformerEngine: at d98e8a64dd its
    MultiTokenPredictionLayer asks ``is_inference_column_parallel_linear(eh_proj)``, an isinstance
    over TE-derived classes that are not types without TE (a TypeError at build). Without TE no
    layer is such a linear: the answer is False. Returns whether the stand-in was installed (a
    core without the check, e.g. the 0.19.2 wheel, or one with TE, is left as it is)."""
    import importlib.util

    from megatron.core.transformer import multi_token_prediction as mtp

    if importlib.util.find_spec("transformer_engine") or not hasattr(mtp, "is_inference_column_parallel_linear"):
        return False
    mtp.is_inference_column_parallel_linear = lambda module: False
    return True


def trainer_mtp_layer(customize: Callable, needs: type) -> bool:
    """Let the MTP layers pretrain_gpt.py builds take the family's own modules. gpt_builders.py
    builds them from Megatron's own local spec (``get_gpt_decoder_layer_specs(...)[-1]``, whatever
    ``--spec`` says), which for some families cannot be built (multi-latent attention: the local
    core attention takes no separate key / value head dims, the q-norm resolver wants a fused
    norm). The MTP layer's inner layer spec goes through the same
    ``customize(layer_spec, is_moe)`` as the decoder's where its self-attention module is exactly
    ``needs`` (Megatron's own class: the bridges' own specs, already customised, are left alone).
    Returns whether the hook was installed now (once per process)."""
    import dataclasses
    import functools

    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer

    if getattr(MultiTokenPredictionLayer.__init__, "_bridge_mtp", False):
        return False
    init = MultiTokenPredictionLayer.__init__

    @functools.wraps(init)
    def __init__(self, config, submodules, *args, **kw):
        inner = getattr(submodules, "mtp_model_layer", None)
        attn = getattr(getattr(inner, "submodules", None), "self_attention", None)
        if getattr(attn, "module", None) is needs:
            submodules = dataclasses.replace(
                submodules, mtp_model_layer=customize(inner, config.num_moe_experts is not None))
        init(self, config, submodules, *args, **kw)

    __init__._bridge_mtp = True
    MultiTokenPredictionLayer.__init__ = __init__
    return True


def define_requested_spec(module_name: str, resolve: Callable[[str], object], argv: list[str] | None = None) -> None:
    """Define in module ``module_name`` the spec this process's command line names for it
    (``--spec <module_name> <name>``), built by ``resolve(name)``. Megatron-LM's import_module
    looks the name up in the module's ``__dict__`` (``vars(module)[name]``), so a module-level
    ``__getattr__`` is never asked: a family whose spec names carry values (Granite's residual
    multiplier, Kimi-K2's YaRN fields) defines the one asked for at import. A name ``resolve``
    refuses (AttributeError) is left for the trainer to report."""
    import sys

    argv = sys.argv if argv is None else argv
    module = sys.modules[module_name]
    for i in range(len(argv) - 2):
        if argv[i] == "--spec" and argv[i + 1] == module_name and argv[i + 2] not in vars(module):
            try:
                setattr(module, argv[i + 2], resolve(argv[i + 2]))
            except AttributeError:
                pass
