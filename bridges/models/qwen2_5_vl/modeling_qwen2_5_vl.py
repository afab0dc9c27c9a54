"""Qwen2.5-VL on Megatron-Core: the Megatron vision encoder pattern.

- ``VisionEncoder``: the vision tower built from Megatron-Core modules, TP-sharded like the
  language model. A Conv3d patch embedding (replicated); ``decoder``, a TransformerBlock of
  pre-norm layers (fused qkv with biases, SwiGLU MLP with biases, RMSNorm), run layer by layer
  with the mask each layer needs (full attention: one block per image frame; windowed: one block
  per window of ``window_size`` pixels); the 2-D rotary (the first half of each head's rotary
  pairs turn with the patch row, the second with its column); the patch merger (RMSNorm, then a
  two-layer GELU MLP over each ``spatial_merge_size``² block of patches). Patches are reordered
  window by window before the layers and the merged tokens put back afterwards, as HF does.
- ``mrope_positions``: the language model's 3-D positions (t, h, w) from the image grids: text
  counts on, an image's tokens take their grid coordinates from where the text stopped.
- ``Qwen25VLModel``: the chunk: the vision encoder (first stage) and the language model, whose
  GPTModel applies M-RoPE (``position_embedding_type="mrope"``) to the 3-D positions.

The helpers below compute what HF's processor and model compute (patch order, windows,
positions) from the image grids alone; they are this project's own, so that a bug in either
side shows as a difference.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.module import MegatronModule

from bridges.core.vlm import VLMChunk


# -- image geometry -----------------------------------------------------------------------------
def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[patches, 2] (row, column) of every patch, in the processor's order: frame by frame,
    ``merge`` x ``merge`` blocks row-major, row-major within a block."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = [x.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).reshape(-1)
                  for x in (rows, cols)]
        out.append(torch.stack(blocks, -1).repeat(t, 1))
    return torch.cat(out)


def windows(grid_thw: torch.Tensor, merge: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, window): the merged units (``merge``² patch blocks) in window order (image, frame,
    window row, window column, then row-major inside a window of ``side`` x ``side`` units), and
    the window number of each unit in that order."""
    order, window, base, n = [], [], 0, 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw) + base
        for f in range(t):
            for y in range(0, gh, side):
                for x in range(0, gw, side):
                    unit = idx[f, y:y + side, x:x + side].reshape(-1)
                    order.append(unit)
                    window.append(torch.full_like(unit, n))
                    n += 1
        base += t * gh * gw
    return torch.cat(order), torch.cat(window)


def frames(grid_thw: torch.Tensor) -> torch.Tensor:
    """The frame number (an image is one frame) of every patch: full attention stays inside it."""
    out, n = [], 0
    for t, h, w in grid_thw.tolist():
        out.append(torch.arange(n, n + t).repeat_interleave(h * w))
        n += t
    return torch.cat(out)


def mrope_positions(input_ids: torch.Tensor, image_token_id: int, grid_thw: torch.Tensor | None,
                    merge: int) -> torch.Tensor:
    """[3, batch, seq] (t, h, w) positions. Text tokens: one position on all three axes,
    counting on; the tokens of an image (a run of ``image_token_id``, consumed image by image
    from ``grid_thw`` in batch order): the frame, row and column of each merged patch, offset by
    the position reached, which then moves on by the larger side of the merged grid."""
    b, s = input_ids.shape
    out = torch.arange(s, device=input_ids.device).expand(3, b, s).clone()
    if grid_thw is None:
        return out
    grids = iter(grid_thw.tolist())
    for i in range(b):
        is_image = (input_ids[i] == image_token_id).tolist()
        parts, pos, j = [], 0, 0
        while j < s:
            if not is_image[j]:
                k = j
                while k < s and not is_image[k]:
                    k += 1
                parts.append(torch.arange(pos, pos + k - j).expand(3, -1))
                pos, j = pos + k - j, k
                continue
            grid = next(grids, None)
            if grid is None:
                raise ValueError(f"row {i}: image tokens (id {image_token_id}) at position {j} "
                                 f"but only {len(grid_thw)} image grids")
            t, gh, gw = grid[0], grid[1] // merge, grid[2] // merge
            n = t * gh * gw
            if j + n > s or not all(is_image[j:j + n]):
                raise ValueError(f"row {i}: the image at position {j} has {n} tokens (grid {grid}, "
                                 f"merge {merge}); the run of image tokens (id {image_token_id}) is shorter")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
            pos, j = pos + max(gh, gw), j + n
        out[:, i] = torch.cat(parts, 1).to(out.device)
    return out


# -- the vision encoder ---------------------------------------------------------------------------
def vision_configs(provider, vision, normalization: str = "RMSNorm", gated: bool = True) -> tuple:
    """(the vision layers' TransformerConfig, the merger MLP's) from the HF ``vision`` config,
    with the language model's dtype, TP size and portable settings; no pipeline split (the
    tower lives on the first stage). ``normalization``, ``gated``: the blocks' norm and MLP
    (Qwen2.5-VL: RMSNorm, SwiGLU; Qwen3-VL: LayerNorm, a plain MLP)."""
    from bridges.core.config import activation_to_megatron
    from bridges.core.provider import ModelProvider

    heads, hidden = vision.num_heads, vision.hidden_size
    common = dict(params_dtype=provider.params_dtype, tensor_model_parallel_size=provider.tensor_model_parallel_size,
                  perform_initialization=getattr(provider, "perform_initialization", True),
                  num_attention_heads=heads, add_bias_linear=True, layernorm_epsilon=1e-6,
                  normalization=normalization)
    layers = ModelProvider(dict(common, num_layers=vision.depth, hidden_size=hidden,
                                ffn_hidden_size=vision.intermediate_size, num_query_groups=heads,
                                kv_channels=hidden // heads, add_qkv_bias=True, gated_linear_unit=gated,
                                activation_func=activation_to_megatron(vision.hidden_act)),
                           build=None).transformer_config()
    units = hidden * vision.spatial_merge_size ** 2
    merger = ModelProvider(dict(common, num_layers=1, hidden_size=vision.out_hidden_size, ffn_hidden_size=units,
                                gated_linear_unit=False, activation_func=torch.nn.functional.gelu),
                           build=None).transformer_config()
    return layers, merger


def vision_layer_spec(normalization: str = "RMSNorm"):
    """Megatron-Core's local layer (as the language model's), attending without a causal mask:
    the mask given is the only one."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    spec = get_gpt_layer_local_spec(normalization=normalization)
    attn = dataclasses.replace(spec.submodules.self_attention, params={"attn_mask_type": AttnMaskType.no_mask})
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))


def axial_inv_freq(head_dim: int, vision) -> torch.Tensor:
    """The 2-D rotary's frequencies: a quarter of a head's rotary pairs each for rows and columns."""
    rope = getattr(vision, "rope_parameters", None) or {}
    half, theta = head_dim // 2, float(rope.get("rope_theta", 10000.0))
    return 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float) / half)


def axial_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[patches, head_dim] rotary angles: rows' then columns' frequencies, repeated over both halves."""
    angles = (positions[:, :, None].float() * inv_freq.to(positions.device)).flatten(1)
    return torch.cat([angles, angles], -1)


class PatchEmbed(torch.nn.Module):
    """Each patch (channels x temporal x height x width values) -> one hidden vector."""

    def __init__(self, vision, bias: bool = False):
        super().__init__()
        self.shape = (vision.in_channels, vision.temporal_patch_size, vision.patch_size, vision.patch_size)
        self.proj = torch.nn.Conv3d(vision.in_channels, vision.hidden_size, kernel_size=self.shape[1:],
                                    stride=self.shape[1:], bias=bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.reshape(-1, *self.shape).to(self.proj.weight.dtype)
        return self.proj(x).reshape(x.shape[0], -1)


class PatchMerger(MegatronModule):
    """A norm per patch (the config's kind; ``postshuffle``: over each block of ``units``
    patches concatenated instead), then each block through a two-layer GELU MLP (column- then
    row-parallel) into the language model's hidden size."""

    def __init__(self, config, context: int, units: int, postshuffle: bool = False):
        super().__init__(config=config)
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLP, MLPSubmodules
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        self.size, self.postshuffle = context * units, postshuffle
        self.norm = WrappedTorchNorm(config, self.size if postshuffle else context, eps=1e-6)
        self.mlp = MLP(config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                       input_size=self.size, ffn_hidden_size=self.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.reshape(-1, self.size)) if self.postshuffle else self.norm(x)
        out, bias = self.mlp(x.reshape(-1, 1, self.size))
        return (out if bias is None else out + bias).squeeze(1)


class VisionEncoder(MegatronModule):
    """Pixels of every image (patches in the processor's order) and their grids -> one
    language-model vector per merged patch block, in the processor's order. A MegatronModule
    (as the merger): a distributed checkpoint stores its TP-sharded tensors as shards."""

    def __init__(self, provider, vision):
        from megatron.core.transformer.transformer_block import TransformerBlock

        layers, merger = vision_configs(provider, vision)
        super().__init__(config=layers)
        self.merge = vision.spatial_merge_size
        self.side = vision.window_size // vision.spatial_merge_size // vision.patch_size
        self.full = frozenset(vision.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(vision)
        self.decoder = TransformerBlock(config=layers, spec=vision_layer_spec(), post_layer_norm=False)
        self.merger = PatchMerger(merger, vision.hidden_size, self.merge ** 2)
        self.register_buffer("inv_freq", axial_inv_freq(layers.kv_channels, vision), persistent=False)

    def positions(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(row, column) of each patch, for the 2-D rotary."""
        return patch_positions(grid_thw, self.merge)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        dev, units = pixel_values.device, self.merge ** 2
        x = self.patch_embed(pixel_values)
        grid = grid_thw.cpu()
        if x.shape[0] != int(grid.prod(-1).sum()):
            raise ValueError(f"pixel_values has {x.shape[0]} patches; image_grid_thw {grid.tolist()} "
                             f"says {int(grid.prod(-1).sum())}")
        angles = axial_angles(self.positions(grid).to(dev), self.inv_freq)
        order, window = windows(grid, self.merge, self.side)
        perm = (order[:, None] * units + torch.arange(units)).reshape(-1).to(dev)
        x, angles = x[perm], angles[perm]
        frame = frames(grid).to(dev)[perm]
        window = window.repeat_interleave(units).to(dev)
        masks = {True: (frame[:, None] != frame[None, :])[None, None],
                 False: (window[:, None] != window[None, :])[None, None]}
        h, rope = x.unsqueeze(1), angles[:, None, None, :]
        for i, layer in enumerate(self.decoder.layers):
            out = layer(hidden_states=h, attention_mask=masks[i in self.full], rotary_pos_emb=rope)
            h = out[0] if isinstance(out, tuple) else out
        merged = self.merger(h.squeeze(1))
        return merged[torch.argsort(order).to(dev)]


# -- the chunk ------------------------------------------------------------------------------------
class Qwen25VLModel(VLMChunk):
    """One pipeline chunk of Qwen2.5-VL: ``vision_model`` (first stage) and ``language_model``
    (a GPTModel chunk with M-RoPE); every stage computes the 3-D positions from the ids and grids."""

    def __init__(self, language_model, provider, vision, image_token_id: int, with_vision: bool):
        super().__init__(language_model, image_token_id)
        self.merge = vision.spatial_merge_size
        self.vision_model = VisionEncoder(provider, vision) if with_vision else None

    def forward(self, input_ids, position_ids, attention_mask=None, pixel_values=None,
                image_grid_thw=None, mm_token_type_ids=None, **kwargs):
        # the image tokens are found by id (mm_token_type_ids, HF's marker of them, is not needed)
        positions = mrope_positions(input_ids, self.image_token_id, image_grid_thw, self.merge)
        decoder_input = None
        if self.pre_process:
            feats = self.vision_model(pixel_values, image_grid_thw) if pixel_values is not None else None
            decoder_input = self.embed(input_ids, None, feats)
        return self.language_model(input_ids, positions, attention_mask,
                                   decoder_input=decoder_input, **kwargs)
