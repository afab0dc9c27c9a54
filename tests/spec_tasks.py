"""Rank tasks for tests/test_megatron_lm_spec.py."""


def trainer_spec_model(toy_dir: str, layout: str, spec: str | None = None, plain_mtp: bool = False) -> dict:
    """This rank's model built as Megatron-LM builds it with the family's ``--spec`` (the named
    object as every decoder layer's spec; MTP layers from Megatron's own local spec, as
    gpt_builders.py builds them), beside the bridge's own, both loaded from the toy: parameter
    names and shapes, whether the values agree, and (one stage) the largest logit difference.
    ``spec``: 'module:name' instead of the bridge's (a broken one, in the tests); ``plain_mtp``:
    without the spec module's MTP hook (Megatron-Core's own MTP layer constructor)."""
    import importlib

    import torch

    from bridges.megatron_lm import MLA_NO_FLAG, mla_no_flag_default
    from conformance.job import layout_provider, make_bridge

    torch.manual_seed(0)
    bridge = make_bridge(toy_dir)
    module, name = spec.split(":") if spec else bridge.megatron_lm_spec
    layer = getattr(importlib.import_module(module), name)
    ours = layout_provider(bridge, layout, torch.float32).provide_distributed_model()
    bridge.load_hf_weights(ours)
    bridge.layer_spec = lambda provider, vp_stage=None: layer  # what gpt_builders.py passes GPTModel
    bridge.mtp_block_spec = _gpt_builders_mtp
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayer as MTP

    hooked = MTP.__init__
    if plain_mtp:
        MTP.__init__ = getattr(hooked, "__wrapped__", hooked)
    try:
        provider = layout_provider(bridge, layout, torch.float32)
        for n in MLA_NO_FLAG:  # no flag reaches them: the trainer's config holds its defaults
            if getattr(provider, n, None) is not None:
                setattr(provider, n, mla_no_flag_default(n))
        theirs = provider.provide_distributed_model()
    finally:
        MTP.__init__ = hooked
    bridge.load_hf_weights(theirs)

    return _compare(ours, theirs)


def _gpt_builders_mtp(provider, vp_stage=None):
    """gpt_builders.py's MTP block (``--mtp-num-layers``): the last of Megatron's own local
    decoder layer specs, whatever ``--spec`` says."""
    if not getattr(provider, "mtp_num_layers", None):
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs, get_gpt_mtp_block_spec

    cfg = provider.transformer_config()
    last = get_gpt_decoder_layer_specs(cfg, use_transformer_engine=False, normalization=cfg.normalization,
                                       qk_l2_norm=False, vp_stage=vp_stage)[-1]
    return get_gpt_mtp_block_spec(cfg, last, use_transformer_engine=False, vp_stage=vp_stage)


def _compare(ours: list, theirs: list) -> dict:
    """Two models' chunks of this rank: parameter names and shapes equal, values equal, and (a
    model of one stage) the largest logit difference on the same tokens."""
    import torch

    from bridges.core.bridge import _global_name, unwrap

    a, b = ({_global_name(unwrap(c), n): p for c in m for n, p in unwrap(c).named_parameters()} for m in (ours, theirs))
    out = {"names": sorted(a) == sorted(b), "shapes": all(a[n].shape == b[n].shape for n in a if n in b),
           "values": all(torch.equal(a[n], b[n]) for n in a if n in b and a[n].shape == b[n].shape)}
    if len(ours) == 1 and unwrap(ours[0]).pre_process and unwrap(ours[0]).post_process:
        ids = torch.randint(0, 100, (1, 12))
        with torch.no_grad():
            x, y = (unwrap(c[0]).eval()(ids, torch.arange(12)[None], None) for c in (ours, theirs))
        out["max_diff"] = float((x - y).abs().max())
    return out


def __getattr__(name):  # ALL_MOE: a broken spec, built on first use (after parallel state exists)
    if name == "ALL_MOE":
        from bridges.models.deepseek.modeling_deepseek import localize_mla_layer
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return localize_mla_layer(get_gpt_layer_local_spec(num_experts=8, qk_layernorm=True,
                                                           multi_latent_attention=True, normalization="RMSNorm"))
    raise AttributeError(name)


def backward(toy_dir: str, layout: str, plain: bool = False) -> float:
    """A training step's backward pass through the bridge's model (``plain``: the family's layer
    hook left out, Megatron-Core's own modules); the expert down-projection bias's grad norm."""
    import torch

    from bridges.core.bridge import unwrap
    from conformance.job import layout_provider, make_bridge

    bridge = make_bridge(toy_dir)
    if plain:
        bridge.customize_layer = lambda spec, is_moe: spec
    model = unwrap(layout_provider(bridge, layout, torch.float32).provide_distributed_model()[0])
    bridge.load_hf_weights([model])
    ids = torch.randint(0, 100, (2, 12))
    logits = model(ids, torch.arange(12)[None].expand(2, -1), None)
    logits.float().square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "experts" in n and n.endswith("linear_fc2.bias")]
    return float(torch.stack([g.norm() for g in grads if g is not None]).sum()) if grads else -1.0


def trainer_hybrid_model(toy_dir: str, layout: str) -> dict:
    """As ``trainer_spec_model`` for a hybrid family: the HybridModel pretrain_hybrid.py builds
    from the family's ``--spec`` stack beside the bridge's own, both loaded from the toy."""
    import importlib

    import torch

    from bridges.core import hybrid
    from conformance.job import layout_provider, make_bridge

    bridge = make_bridge(toy_dir)
    module, name = bridge.megatron_lm_spec
    stack = getattr(importlib.import_module(module), name)
    ours = layout_provider(bridge, layout, torch.float32).provide_distributed_model()
    bridge.load_hf_weights(ours)
    build = hybrid.local_hybrid_stack_spec
    hybrid.local_hybrid_stack_spec = lambda *a, **k: stack  # what hybrid_builders.py passes HybridModel
    try:
        theirs = layout_provider(bridge, layout, torch.float32).provide_distributed_model()
    finally:
        hybrid.local_hybrid_stack_spec = build
    bridge.load_hf_weights(theirs)
    return _compare(ours, theirs)
