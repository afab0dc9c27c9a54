"""Megatron-Core's Mamba-2 mixer without its kernels (the local hybrid stack spec is
``bridges/core/hybrid.py``).

Megatron-Core's ``MambaMixer`` calls ``mamba_ssm``'s Triton kernels (the chunked SSD scan and the
gated RMSNorm) and falls back to nothing without them. Where ``mamba_ssm`` is not installed (this
CPU machine; a GPU without it) ``torch_mamba()`` puts torch equivalents in their place:

- ``ssd_scan``: the selective state-space recurrence itself, token by token, per head:
  ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t``, ``y_t = C_t h_t + D x_t`` with
  ``dt = softplus(dt + dt_bias)``: the chunked SSD algorithm computes exactly this (its chunks
  are a reordering of the same sums), as HF's own torch fallback does;
- ``GatedRMSNorm``: RMSNorm of ``y * silu(z)`` within each group of ``group_size`` channels
  (``norm_before_gate=False``), as ``mamba_ssm``'s ``RMSNormGated`` and HF's
  ``MambaRMSNormGated``.

``torch_mamba()`` says which path runs (``"torch"`` or ``"mamba_ssm"``); the suite reports it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
             seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
             return_final_states=False, **_):
    """``mamba_chunk_scan_combined``'s result by the plain recurrence. x: (b, l, h, p);
    dt: (b, l, h); A: (h,); B, C: (b, l, g, n); D: (h,) or (h, p); z: (b, l, h, p) or None."""
    if seq_idx is not None or cu_seqlens is not None:
        raise NotImplementedError("packed sequences in the torch Mamba-2 scan")
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    out_dtype = x.dtype
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    heads_per_group = h // g
    B = B.repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
    C = C.repeat_interleave(heads_per_group, dim=2)
    decay = torch.exp(dt * A.float().view(1, 1, h))  # (b, l, h)
    state = (initial_states.float() if initial_states is not None
             else torch.zeros(b, h, p, n, dtype=torch.float32, device=x.device))
    ys = []
    for t in range(length):
        state = state * decay[:, t, :, None, None] + \
            (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        d = D.float()
        y = y + x * (d.view(1, 1, h, p) if d.dim() == 2 else d.view(1, 1, h, 1))
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(out_dtype)
    return (y, state) if return_final_states else y


class GatedRMSNorm(torch.nn.Module):
    """RMSNorm of ``x * silu(z)`` within groups of ``group_size`` channels, then the weight."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=False, device=None,
                 dtype=None, **_):
        super().__init__()
        if norm_before_gate:
            raise NotImplementedError("the torch gated RMSNorm gates before the norm (norm_before_gate=False)")
        self.eps, self.group_size = eps, group_size or hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, z=None):
        dtype = x.dtype
        x = x.float()
        if z is not None:
            x = x * F.silu(z.float())
        shape = x.shape
        x = x.view(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.view(shape) * self.weight.float()).to(dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Sharded along its channels, as Megatron-Core's ``ExtendedRMSNorm``."""
        from megatron.core import parallel_state
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        tp_group = getattr(self, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0},
                                                   sharded_offsets, tp_group=tp_group,
                                                   dp_cp_group=metadata["dp_cp_group"])


def mamba_path() -> str:
    """Which Mamba-2 kernels run: ``mamba_ssm``'s when installed, else the torch ones here."""
    import importlib.util

    return "mamba_ssm" if importlib.util.find_spec("mamba_ssm") else "torch"


_REPLACED = ("mamba_chunk_scan_combined", "ExtendedRMSNorm", "HAVE_MAMBA_SSM")


@contextlib.contextmanager
def torch_mamba():
    """The torch scan and gated norm in place of ``mamba_ssm``'s while building and running a
    MambaMixer (nothing replaced where ``mamba_ssm`` is installed)."""
    from megatron.core.ssm import mamba_mixer

    saved = {k: getattr(mamba_mixer, k) for k in _REPLACED}
    path = install_torch_mamba()
    try:
        yield path
    finally:
        for k, v in saved.items():
            setattr(mamba_mixer, k, v)


def install_torch_mamba() -> str:
    """``torch_mamba()`` for the rest of the process (a converted model is built, then run)."""
    from megatron.core.ssm import mamba_mixer

    if mamba_path() == "mamba_ssm":
        return "mamba_ssm"
    mamba_mixer.mamba_chunk_scan_combined, mamba_mixer.ExtendedRMSNorm = ssd_scan, GatedRMSNorm
    mamba_mixer.HAVE_MAMBA_SSM = True  # the mixer refuses to build without it
    return "torch"
