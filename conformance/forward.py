"""Forward passes for checking: Megatron chunks under any TP/PP/VPP layout, and HF models,
with activations captured at the same places on both sides for divergence localisation.

The pipeline forward is a plain send/recv loop (no training schedule): chunk v of stage s
receives from the previous (stage, chunk) in order, so it works over gloo and NCCL alike.
Stage names: ``embedding``, ``layer N attention``, ``layer N mlp``, ``final norm``, ``output``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def _first(x):
    if hasattr(x, "last_hidden_state"):  # an HF module's output
        return x.last_hidden_state
    return x[0] if isinstance(x, (tuple, list)) else x


def vision_modules(root, parts, side: int):
    """(label, module) of a VLM's vision stages found under ``root``: ``parts`` as a VLM
    bridge's ``vision_parts`` declares them, ``side`` 1 for Megatron paths, 2 for HF paths;
    "{}" expands over a layer list."""
    out = []
    for part in parts:
        label, path = part[0], part[side]
        head, each, tail = path.partition("{}")
        mod = _module(root, head.rstrip("."))
        if mod is None:
            continue
        if not each:
            out.append((label, mod))
            continue
        for i, layer in enumerate(mod):
            sub = _module(layer, tail.lstrip("."))
            if sub is not None:
                out.append((label.format(i), sub))
    return out


def _module(root, path: str):
    for part in path.split(".") if path else ():
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A vision stage's output as [tokens, features] (Megatron's [s, 1, h], HF's [s, h] or [b, s, h])."""
    return t.detach().float().cpu().reshape(-1, t.shape[-1]).clone()


@contextlib.contextmanager
def capture_megatron(chunks, store: dict, parts=()):
    """Record activations (as [batch, seq, hidden], float32, CPU) into ``store``; a VLM's
    vision stages (``parts``: its bridge's ``vision_parts``) as [tokens, features]."""
    from bridges.core.bridge import unwrap

    hooks = []

    def save(name, sbh=True):
        def hook(_m, _inp, out):
            if name in store:  # the first call: an MTP layer calls the embedding again
                return
            t = _first(out)
            if isinstance(out, tuple) and len(out) > 1 and torch.is_tensor(out[1]):
                t = t + out[1]  # (output, bias) pairs: the bias is added later by Megatron
            store[name] = (t.transpose(0, 1) if sbh else t).detach().float().cpu().clone()
        return hook

    def save_flat(name):
        def hook(_m, _inp, out):
            store.setdefault(name, _flat(_first(out)))
        return hook

    for chunk in map(unwrap, chunks):
        for label, mod in vision_modules(chunk, parts, 1):
            hooks.append(mod.register_forward_hook(save_flat(label)))
        chunk = getattr(chunk, "language_model", chunk)  # a VLM's
        if getattr(chunk, "embedding", None) is not None and chunk.pre_process:
            hooks.append(chunk.embedding.register_forward_hook(save("embedding")))
        for layer in chunk.decoder.layers:
            n = layer.layer_number - 1
            for label, mod in _blocks(layer, ("mixer", "self_attention", "mlp")):
                hooks.append(mod.register_forward_hook(save(f"layer {n} {label}")))
        final = getattr(chunk.decoder, "final_layernorm", None) or getattr(chunk.decoder, "final_norm", None)
        if chunk.post_process and final is not None:
            hooks.append(final.register_forward_hook(save("final norm")))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def _blocks(layer, names):
    """(label, module) of a Megatron layer's sublayers: attention and MLP of a transformer
    layer; the one block of a hybrid layer (HybridModel: a Mamba mixer, an attention or an MLP,
    the others identity), labelled "block" as the HF side's mixer."""
    from megatron.core.transformer.identity_op import IdentityOp

    present = [(n, getattr(layer, n)) for n in names
               if getattr(layer, n, None) is not None and not isinstance(getattr(layer, n), IdentityOp)]
    if hasattr(layer, "mixer") or len(present) == 1:
        return [("block", present[0][1])]
    return [("attention" if n == "self_attention" else n, m) for n, m in present]


# HF decoder layers' sublayer names by role, first present wins: Qwen3-Next's gated-delta-net
# layers have linear_attn, GraniteMoe's MoE block is block_sparse_moe
HF_SUBLAYERS = {"attention": ("self_attn", "linear_attn"), "mlp": ("mlp", "block_sparse_moe")}


@contextlib.contextmanager
def capture_hf(model, store: dict, parts=()):
    base = getattr(model.model, "language_model", model.model)  # a VLM's text model
    hooks = [mod.register_forward_hook(lambda _m, _i, o, k=label: store.__setitem__(k, _flat(_first(o))))
             for label, mod in vision_modules(model, parts, 2)]
    if parts:  # a VLM: the text embedding, before image features replace tokens (Megatron's too)
        embed = getattr(base, "embed_tokens", None) or base.embeddings
        hooks.append(embed.register_forward_hook(
            lambda _m, _i, o: store.__setitem__("embedding", o.detach().float().cpu().clone())))
    else:  # what the first layer receives: with a model's own scaling (Granite's embedding
        # multiplier, applied after embed_tokens), as Megatron's embedding returns it
        def first_input(_m, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            store["embedding"] = h.detach().float().cpu().clone()
        hooks.append(base.layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
    for n, layer in enumerate(base.layers):
        # sandwich norms (Gemma2/3): Megatron's output projections include the post-norm
        sandwich = hasattr(layer, "pre_feedforward_layernorm") and hasattr(layer, "post_feedforward_layernorm")
        parts = (("post_attention_layernorm", "attention"), ("post_feedforward_layernorm", "mlp")) if sandwich \
            else (("mixer", "block"),) if hasattr(layer, "mixer") else \
            tuple((next(a for a in HF_SUBLAYERS[k] if hasattr(layer, a)), k) for k in ("attention", "mlp"))
        for attr, label in parts:
            hooks.append(getattr(layer, attr).register_forward_hook(
                lambda _m, _i, o, k=f"layer {n} {label}": store.__setitem__(k, _first(o).detach().float().cpu().clone())))
    final = getattr(base, "norm", None) or base.norm_f
    hooks.append(final.register_forward_hook(
        lambda _m, _i, o: store.__setitem__("final norm", o.detach().float().cpu().clone())))
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def megatron_logits(chunks, ids: torch.Tensor, vocab_size: int, extra: dict | None = None) -> torch.Tensor | None:
    """Full logits [b, s, vocab] on the last pipeline stage (every TP rank); None elsewhere.
    ``extra``: more inputs for every chunk (a VLM's images, its token types)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from bridges.core.bridge import unwrap

    dev = next(unwrap(chunks[0]).parameters()).device
    ids = ids.to(dev)
    extra = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in (extra or {}).items()}
    pos = torch.arange(ids.shape[1], device=dev).unsqueeze(0).expand_as(ids)
    pp, first, last = (ps.get_pipeline_model_parallel_world_size(),
                       ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    out = None
    for v, chunk in enumerate(chunks):
        chunk = unwrap(chunk)
        if pp > 1 and not (first and v == 0):
            h = torch.empty((ids.shape[1], ids.shape[0], chunk.config.hidden_size),
                            dtype=chunk.config.params_dtype, device=dev)
            dist.recv(h, src=ps.get_pipeline_model_parallel_prev_rank())
            chunk.set_input_tensor(h)
        with torch.no_grad():
            out = chunk(ids, pos, attention_mask=None, **extra)
        if pp > 1 and not (last and v == len(chunks) - 1):
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    if not last:
        return None
    if ps.get_tensor_model_parallel_world_size() > 1 and unwrap(chunks[-1]).parallel_output:
        out = gather_from_tensor_model_parallel_region(out)
    return out[..., :vocab_size].float()


def megatron_generate(chunks, ids: torch.Tensor, steps: int, vocab_size: int, inputs_for=None,
                      banned: tuple[int, ...] = (), choose=None, stop: tuple[int, ...] = (),
                      draft: torch.Tensor | None = None) -> torch.Tensor:
    """Decoding by repeated full forwards; the tokens are known on every rank.
    ``inputs_for(ids)``: the other inputs for the ids so far; ``banned``: tokens never chosen;
    ``choose(last_logits)``: the next token per row (default greedy; it runs on the last
    pipeline stage, where every TP rank holds the same logits); ``stop``: tokens that end a row
    (decoding ends when every row has ended). ``draft`` ([batch, n], greedy only): a guessed
    continuation (the reference model's), verified in one forward (``_verify_draft``); decoding
    goes on step by step from where the guess parts from the model's own choice."""
    from megatron.core import parallel_state as ps

    ids = ids.clone()
    group = ps.get_pipeline_model_parallel_group()
    src = dist.get_global_rank(group, ps.get_pipeline_model_parallel_world_size() - 1)
    dev = next(chunks[0].parameters()).device
    ended = torch.zeros(ids.shape[0], dtype=torch.bool)
    if draft is not None and choose is None and not stop and steps > 0:
        prompt = ids.shape[1]
        ids = _verify_draft(chunks, ids, draft[:, :steps], vocab_size, inputs_for, banned, group, src, dev)
        steps -= ids.shape[1] - prompt
    for _ in range(steps):
        logits = megatron_logits(chunks, ids, vocab_size, inputs_for(ids) if inputs_for else None)
        if logits is not None:
            last = _ban(logits[:, -1], banned)
            tok = choose(last) if choose else last.argmax(-1)
        else:
            tok = torch.zeros(ids.shape[0], dtype=torch.long, device=dev)
        tok = tok.to(dev)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(tok, src=src, group=group)
        ids = torch.cat([ids, tok.cpu().unsqueeze(1)], dim=1)
        if stop:
            ended |= torch.isin(tok.cpu(), torch.tensor(stop, dtype=torch.long))
            if bool(ended.all()):
                break
    return ids


def _verify_draft(chunks, ids: torch.Tensor, draft: torch.Tensor, vocab_size: int, inputs_for, banned,
                  group, src: int, dev) -> torch.Tensor:
    """``ids`` grown by the greedy tokens one forward over ``ids + draft`` proves: the model's
    top-1 at each draft position, up to and including the first position where it differs from
    the draft in any row. Each accepted token's prefix is the model's own greedy output (every
    earlier draft token was its own choice), and a causal model's logits at a position depend on
    that prefix alone, so these are the tokens step-by-step decoding gives (up to the rounding of
    a longer forward: near-ties are the checks' business, as they are for HF)."""
    from megatron.core import parallel_state as ps

    n = draft.shape[1]
    full = torch.cat([ids, draft.to(ids.dtype)], dim=1)
    logits = megatron_logits(chunks, full, vocab_size, inputs_for(full) if inputs_for else None)
    # [batch, n] proven tokens, then how many of them
    got = torch.zeros(ids.shape[0], n + 1, dtype=torch.long, device=dev)
    if logits is not None:
        pred = _ban(logits[:, ids.shape[1] - 1:-1], banned).argmax(-1).to(dev)
        same = (pred == draft.to(dev)).all(0)
        accepted = n if bool(same.all()) else int((~same).int().argmax()) + 1
        got[:, :n], got[:, n] = pred, accepted
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(got, src=src, group=group)
    accepted = int(got[0, n])
    return torch.cat([ids, got[:, :accepted].cpu()], dim=1)


def hf_logits(model, ids: torch.Tensor, extra: dict | None = None) -> torch.Tensor:
    extra = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in (extra or {}).items()}
    with torch.no_grad():
        return model(ids.to(model.device), **extra).logits.float().cpu()


def _ban(last: torch.Tensor, banned) -> torch.Tensor:
    if banned:
        last = last.clone()
        last[..., list(banned)] = float("-inf")
    return last


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit, per position."""
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def hf_generate(model, ids: torch.Tensor, steps: int, margins: list | None = None, inputs_for=None,
                banned: tuple[int, ...] = ()) -> torch.Tensor:
    """Greedy decoding; appends each step's top-1 margins ([batch]) to ``margins`` if given
    (``inputs_for``, ``banned``: as ``megatron_generate``)."""
    ids = ids.clone()
    for _ in range(steps):
        last = _ban(hf_logits(model, ids, inputs_for(ids) if inputs_for else None)[:, -1], banned)
        if margins is not None:
            margins.append(margin(last))
        ids = torch.cat([ids, last.argmax(-1).unsqueeze(1)], dim=1)
    return ids
