"""Deliberately broken bridges: each injects one class of real-world conversion bug.

The mutation self-tests (test_mutations.py) run the conformance checks on each and assert
which check catches it. Every mutant is consistent in both directions where the real bug
would be (so a roundtrip alone cannot see it) unless the bug is an export bug.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from bridges.core import mappings as M
from bridges.models.llama.llama_bridge import LlamaBridge
from bridges.models.qwen2.qwen2_bridge import Qwen2Bridge
from bridges.models.qwen3.qwen3_bridge import Qwen3Bridge


def _swap_mapping(table, megatron_suffix, new_cls=None, **changes):
    out = []
    for m in table:
        if m.megatron.endswith(megatron_suffix):
            m = (new_cls or type(m))(m.megatron, changes.get("hf", m.hf))
        out.append(m)
    return out


# 1. q and k swapped inside each query group of the fused QKV ------------------------------
class _KQV(M.QKV):
    def _merge(self, hf, shapes):
        g, d = shapes.num_query_groups, shapes.kv_channels
        per = shapes.num_attention_heads // g
        q, k, v = hf["q"], hf["k"], hf["v"]
        rest = q.shape[1:]
        # k first, then the query heads: the layout Megatron reads as [q..., k, v] is scrambled
        return torch.cat([k.reshape(g, d, *rest), q.reshape(g, per * d, *rest),
                          v.reshape(g, d, *rest)], dim=1).reshape(-1, *rest)

    def _unmerge(self, full, shapes):
        g, d = shapes.num_query_groups, shapes.kv_channels
        per = shapes.num_attention_heads // g
        rest = full.shape[1:]
        k, q, v = full.reshape(g, (per + 2) * d, *rest).split([d, per * d, d], dim=1)
        return {"q": q.reshape(-1, *rest), "k": k.reshape(-1, *rest), "v": v.reshape(-1, *rest)}


class QKSwapped(Qwen3Bridge):
    def mappings(self, attrs):
        return _swap_mapping(super().mappings(attrs), "linear_qkv.weight", _KQV)


# 2. query heads assigned to the wrong KV group (head-major instead of group-major) --------
class _WrongGroups(M.QKV):
    def _merge(self, hf, shapes):
        g, d = shapes.num_query_groups, shapes.kv_channels
        per = shapes.num_attention_heads // g
        q = hf["q"]
        rest = q.shape[1:]
        q = q.reshape(per, g, d, *rest).transpose(0, 1).reshape(-1, *rest)
        return super()._merge({**hf, "q": q}, shapes)

    def _unmerge(self, full, shapes):
        out = super()._unmerge(full, shapes)
        g, d = shapes.num_query_groups, shapes.kv_channels
        per = shapes.num_attention_heads // g
        rest = out["q"].shape[1:]
        out["q"] = out["q"].reshape(g, per, d, *rest).transpose(0, 1).reshape(-1, *rest)
        return out


class WrongGQAGroups(Qwen3Bridge):
    def mappings(self, attrs):
        return _swap_mapping(super().mappings(attrs), "linear_qkv.weight", _WrongGroups)


# 3. gate and up swapped -------------------------------------------------------------------
class GateUpSwapped(Qwen3Bridge):
    def mappings(self, attrs):
        table = super().mappings(attrs)
        fc1 = next(m for m in table if m.megatron.endswith("linear_fc1.weight"))
        return _swap_mapping(table, "linear_fc1.weight", hf={"gate": fc1.hf["up"], "up": fc1.hf["gate"]})


# 4. row-parallel weight split on the wrong dimension -------------------------------------
class RowSplitWrongDim(Qwen3Bridge):
    def mappings(self, attrs):
        return _swap_mapping(super().mappings(attrs), "linear_proj.weight", M.ColumnParallel)


# 5. a norm mapping dropped ------------------------------------------------------------------
class NormDropped(Qwen3Bridge):
    def mappings(self, attrs):
        return [m for m in super().mappings(attrs) if not m.megatron.endswith("pre_mlp_layernorm.weight")]


# 6. layer index off by one (wrapping, so every tensor is still used) ---------------------
class _Shifted:
    def hf_names(self, captures):
        n = self.num_layers
        shifted = tuple(str((int(c) + 1) % n) for c in captures)
        return super().hf_names(shifted)


class LayerOffByOne(Qwen3Bridge):
    def mappings(self, attrs):
        out = []
        for m in super().mappings(attrs):
            if "*" in m.megatron:
                cls = type(f"Shifted{type(m).__name__}", (_Shifted, type(m)), {"num_layers": attrs["num_layers"]})
                m = cls(m.megatron, m.hf)
            out.append(m)
        return out


# 7. wrong rope theta ------------------------------------------------------------------------
class WrongRopeTheta(LlamaBridge):
    def megatron_attrs(self):
        attrs = super().megatron_attrs()
        attrs["rotary_base"] = 10000.0  # the Llama-2 default instead of the config's 500000
        return attrs


# 8. tied / untied confusion: output layer always read from the embedding ----------------
class TiedConfusion(Qwen3Bridge):
    def megatron_attrs(self):
        attrs = super().megatron_attrs()
        attrs["share_embeddings_and_output_weights"] = True
        return attrs


# 9. vocab padding not truncated on export -----------------------------------------------
class _NoTruncate(M.VocabParallel):
    def _unmerge(self, full, shapes):
        return {"": full}


class PaddingNotTruncated(Qwen3Bridge):
    def mappings(self, attrs):
        return _swap_mapping(super().mappings(attrs), "word_embeddings.weight", _NoTruncate)


# 10. a tensor silently skipped: no mapping, and the HF name put on the ignore list --------
class TensorSkipped(Qwen3Bridge):
    ignored_hf = Qwen3Bridge.ignored_hf + (r".*self_attn\.k_norm\.weight",)

    def mappings(self, attrs):
        return [m for m in super().mappings(attrs) if not m.megatron.endswith("k_layernorm.weight")]


# 11. QKV bias dropped -------------------------------------------------------------------------
class BiasDropped(Qwen2Bridge):
    def megatron_attrs(self):
        attrs = super().megatron_attrs()
        attrs["add_qkv_bias"] = False
        return attrs


# 12. TP-only bug: gate/up fused as [gate; up] on the full tensor, then split like a plain
#     column-parallel weight (right at TP=1, wrong at TP>1) ------------------------------
class _NaiveFC1(M.Mapping):
    kind = "gated_mlp"
    tp_dim = 0

    def _merge(self, hf, shapes):
        return torch.cat([hf["gate"], hf["up"]])

    def _unmerge(self, full, shapes):
        gate, up = full.chunk(2)
        return {"gate": gate, "up": up}


class NaiveGatedMLP(Qwen3Bridge):
    def mappings(self, attrs):
        return _swap_mapping(super().mappings(attrs), "linear_fc1.weight", _NaiveFC1)


# 13. TP shards gathered in the wrong order on export ------------------------------------
class _ReversedGather(M.RowParallel):
    def _gather(self, shards, shapes):
        return super()._gather(shards[::-1], shapes)


class ExportShardOrder(Qwen3Bridge):
    def mappings(self, attrs):
        return _swap_mapping(super().mappings(attrs), "mlp.linear_fc2.weight", _ReversedGather)


# 14. QKV bias interleaved as if it were [q; k; v] concatenated (weights right) -----------
class _ConcatBias(M.QKV):
    def _merge(self, hf, shapes):
        return torch.cat([hf["q"], hf["k"], hf["v"]])

    def _unmerge(self, full, shapes):
        g, d = shapes.num_query_groups, shapes.kv_channels
        q, k, v = full.split([shapes.num_attention_heads * d, g * d, g * d])
        return {"q": q, "k": k, "v": v}


class BiasInterleave(Qwen2Bridge):
    def mappings(self, attrs):
        return _swap_mapping(super().mappings(attrs), "linear_qkv.bias", _ConcatBias)


# 15. QK-norm weights of queries and keys exchanged ----------------------------------------
class QKNormSwapped(Qwen3Bridge):
    def mappings(self, attrs):
        table = super().mappings(attrs)
        q = next(m for m in table if m.megatron.endswith("q_layernorm.weight"))
        k = next(m for m in table if m.megatron.endswith("k_layernorm.weight"))
        return [replace(m, hf=k.hf) if m is q else replace(m, hf=q.hf) if m is k else m for m in table]


# 16. quantized weights loaded without their scales (raw FP8 codes) ----------------------
class SkipDequant(Qwen3Bridge):
    def _read(self, ckpt, name):
        return ckpt.get(name).float()  # the scale companion is still "used": a silent bug


# -- mixture of experts ----------------------------------------------------------------------
from bridges.models.glm4_moe.glm4_moe_bridge import Glm4MoeBridge  # noqa: E402
from bridges.models.qwen2_moe.qwen2_moe_bridge import Qwen2MoeBridge  # noqa: E402
from bridges.models.qwen3_moe.qwen3_moe_bridge import Qwen3MoeBridge  # noqa: E402


def _expert_hf(table, rename):
    """Routed-expert mappings whose HF expert index is ``rename(layer, e)`` (both directions)."""
    out = []
    for m in table:
        if ".mlp.experts." in m.megatron:
            cls = type(m)

            class Renamed(cls):
                def hf_names(self, captures):
                    layer, e = captures
                    return super().hf_names((layer, str(rename(int(e)))))

            m = Renamed(m.megatron, m.hf, layers=m.layers, alternate=m.alternate)
        out.append(m)
    return out


# 16. experts permuted: Megatron expert e holds HF expert e+1 (import and export agree) -----
class ExpertsPermuted(Qwen3MoeBridge):
    def mappings(self, attrs):
        n = attrs["num_moe_experts"]
        return _expert_hf(super().mappings(attrs), lambda e: (e + 1) % n)


# 17. one expert written twice: Megatron expert 1 also reads HF expert 0 ------------------
class ExpertWrittenTwice(Qwen3MoeBridge):
    def mappings(self, attrs):
        return _expert_hf(super().mappings(attrs), lambda e: 0 if e == 1 else e)


# 18. shared-expert gate dropped: the model is built without it, its HF tensor skipped ----
class SharedGateDropped(Qwen2MoeBridge):
    ignored_hf = Qwen2MoeBridge.ignored_hf + (r".*shared_expert_gate\.weight",)
    shared_gate_hf = None

    def megatron_attrs(self):
        return {**super().megatron_attrs(), "moe_shared_expert_gate": False}


# 19. router score-correction bias dropped: routing without it, the HF tensor skipped -----
class RouterBiasDropped(Glm4MoeBridge):
    ignored_hf = Glm4MoeBridge.ignored_hf + (r".*e_score_correction_bias",)
    router_bias_hf = None

    def megatron_attrs(self):
        return {**super().megatron_attrs(), "moe_router_enable_expert_bias": False}


# 20. EP export gathers experts strided (local * EP + rank) instead of in rank blocks ------
class EPExportOrder(Qwen3MoeBridge):
    def export_hf_weights(self, *args, **kwargs):
        self._exporting = True
        try:
            yield from super().export_hf_weights(*args, **kwargs)
        finally:
            self._exporting = False

    def _params(self, model_chunks, table):
        import re

        from megatron.core import parallel_state as ps

        ep, rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        n_local = self.megatron_attrs()["num_moe_experts"] // ep
        for chunk, name, p in super()._params(model_chunks, table):
            if getattr(self, "_exporting", False):
                name = re.sub(r"(local_experts\.)(\d+)",
                              lambda m: f"{m.group(1)}{(int(m.group(2)) - rank * n_local) * ep + rank}", name)
            yield chunk, name, p


# 21. MXFP4 blocks read as values: the nibbles as numbers, no scale -----------------------
class MXFP4Raw(Qwen3MoeBridge):
    def _read(self, ckpt, name):
        base, row = M.split_row(name)
        packed = self._packed(ckpt, base)
        if packed:  # the codes, reshaped to the value layout: what a naive converter does
            b = ckpt.get_row(packed[0], row) if row is not None else ckpt.get(packed[0])
            codes = torch.stack((b & 15, b >> 4), -1).flatten(-3).to(self.dequantized_dtype)
            return codes.transpose(-1, -2).contiguous()
        return super()._read(ckpt, name)


# -- subtle config and module bugs (#22): small numeric effects the toy scales must expose ----
from bridges.models.deepseek.deepseek_bridge import DeepseekV2Bridge  # noqa: E402


class _EpsOff:
    """The built Megatron model's norms named in ``norms`` use 10x the config's epsilon: a
    module that hard-codes its own eps (1e-6 -> 1e-5), config and mappings right."""
    norms: tuple[str, ...] = ()

    def build_model(self, provider, pre_process, post_process, vp_stage=None):
        model = super().build_model(provider, pre_process, post_process, vp_stage)
        hit = 0
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in self.norms:
                module.eps *= 10
                hit += 1
        assert hit or not (pre_process or post_process), f"no {self.norms} in the model"
        return model


class _BuiltWith:
    """The Megatron model is built with ``changes`` to the provider's attributes, while the
    config translation (and so the config roundtrip) stays right: a module-level bug."""
    changes: dict = {}

    def build_model(self, provider, pre_process, post_process, vp_stage=None):
        attrs = provider._attrs
        saved = dict(attrs)
        attrs.update({k: f(attrs[k]) for k, f in self.changes.items()})
        try:
            return super().build_model(provider, pre_process, post_process, vp_stage)
        finally:
            attrs.clear()
            attrs.update(saved)


# 22. input layer norm's eps 10x off ------------------------------------------------------
class EpsInputNorm(_EpsOff, Qwen3Bridge):
    norms = ("input_layernorm",)


# 23. final norm's eps 10x off ------------------------------------------------------------
class EpsFinalNorm(_EpsOff, Qwen2Bridge):
    norms = ("final_layernorm",)


# 24. QK norms' eps 10x off ---------------------------------------------------------------
class EpsQKNorm(_EpsOff, Qwen3Bridge):
    norms = ("q_layernorm", "k_layernorm")


# 25. MLA's kv latent norm eps 10x off (DeepSeek's kv_a_layernorm) ------------------------
class EpsLatentNorm(_EpsOff, DeepseekV2Bridge):
    norms = ("kv_layernorm",)


# 26. rope base doubled in the built model (500000 -> 1000000) -----------------------------
class RopeBaseDoubled(_BuiltWith, LlamaBridge):
    changes = {"rotary_base": lambda b: 2 * b}


# 27. llama3 rope scaling dropped in the built model ---------------------------------------
class Llama3ScalingDropped(_BuiltWith, LlamaBridge):
    changes = {"rope_scaling": lambda s: False}


# 28. routing: top-k probabilities not renormalised (norm_topk_prob=True read as False) ----
class NormTopkFlipped(_BuiltWith, Qwen3MoeBridge):
    changes = {"moe_router_pre_softmax": lambda s: not s}


# -- export-side and output bugs that only one check clause can see --------------------------
# 29. tied model exports lm_head.weight as well (a tensor the source does not have) --------
class TiedHeadExported(Qwen3Bridge):
    def export_hf_weights(self, *args, **kwargs):
        for name, t in super().export_hf_weights(*args, **kwargs):
            yield name, t
            if name == "model.embed_tokens.weight" and self.megatron_attrs()["share_embeddings_and_output_weights"]:
                yield "lm_head.weight", t.clone()


# 29b. tied model at PP > 1: the last stage's copy of the embedding exported as well, under
#      the same name (values right: only coverage's "written twice" can see it) ------------
class TiedEmbeddingExportedTwice(Qwen3Bridge):
    def export_hf_weights(self, *args, **kwargs):
        for name, t in super().export_hf_weights(*args, **kwargs):
            yield name, t
            if name == "model.embed_tokens.weight" and self.megatron_attrs()["share_embeddings_and_output_weights"]:
                yield name, t.clone()


# 30. EP export names experts by their local index (every rank writes experts 0..E/EP-1) ---
class ExpertLocalIndexExport(EPExportOrder):
    def _params(self, model_chunks, table):
        import re

        from megatron.core import parallel_state as ps

        rank = ps.get_expert_model_parallel_rank()
        n_local = self.megatron_attrs()["num_moe_experts"] // ps.get_expert_model_parallel_world_size()
        for chunk, name, p in Qwen3MoeBridge._params(self, model_chunks, table):
            if getattr(self, "_exporting", False):
                name = re.sub(r"(local_experts\.)(\d+)", lambda m: f"{m.group(1)}{int(m.group(2)) - rank * n_local}", name)
            yield chunk, name, p


# 31. FP8 re-export writes the block scales in bf16 (the source stores fp32) ---------------
class ScalesExportedBf16(Qwen3Bridge):
    def export_hf_weights(self, *args, quantized=False, **kwargs):
        for name, t in super().export_hf_weights(*args, quantized=quantized, **kwargs):
            yield name, t.to(torch.bfloat16) if quantized and name.endswith("_scale_inv") else t


# 32. the final norm's eps with the wrong sign and size (-1): rsqrt of a negative mean
#     square, NaN logits -------------------------------------------------------------------
class NonFiniteLogits(Qwen3Bridge):
    def build_model(self, provider, pre_process, post_process, vp_stage=None):
        model = super().build_model(provider, pre_process, post_process, vp_stage)
        for name, module in model.named_modules():
            if name.endswith("final_layernorm"):
                module.eps = -1.0
        return model


# 33. head_dim taken as hidden / heads (Qwen3-0.6B: 64 instead of 128) --------------------
class HeadDimFromHidden(Qwen3Bridge):
    def megatron_attrs(self):
        attrs = super().megatron_attrs()
        attrs["kv_channels"] = attrs["hidden_size"] // attrs["num_attention_heads"]
        return attrs


# 22. NVFP4 (ModelOpt) read wrongly: each a converter bug with a plausible story ---------------
from bridges.models.llama.llama_bridge import LlamaBridge  # noqa: E402


class _NVFP4Misread(LlamaBridge):
    """NVFP4 weights decoded by ``decode(codes, scale, scale_2)`` instead of the codec's."""

    def _read(self, ckpt, name):
        from bridges.core import quant

        parts = quant.nvfp4_parts(name, ckpt)
        if not parts:
            return super()._read(ckpt, name)
        return self.decode(*(ckpt.get(p) for p in parts[:3])).to(self.dequantized_dtype)


class NVFP4HighNibbleFirst(_NVFP4Misread):
    """The two codes of a byte taken high nibble first (the other packing convention)."""

    @staticmethod
    def decode(codes, scale, scale2):
        from bridges.core import quant

        return quant.nvfp4_dequantize((codes >> 4) | (codes << 4), scale, scale2, torch.float32)


class NVFP4TensorScaleDropped(_NVFP4Misread):
    """``weight_scale_2`` ignored: the block scales alone (values off by the per-tensor factor)."""

    @staticmethod
    def decode(codes, scale, scale2):
        from bridges.core import quant

        return quant.nvfp4_dequantize(codes, scale, torch.ones(()), torch.float32)


# 38. ModelOpt's FP8 KV-cache scales lost or misplaced on a quantized re-export ---------------
class _KVCacheScalesExported(LlamaBridge):
    """The quantized export's KV-cache scales (``k_proj.k_scale`` / ``v_proj.v_scale``, or
    ``self_attn.k_scale`` / ``v_scale``) passed through ``kv(name, tensor)``: None drops one."""

    def export_hf_weights(self, *args, **kwargs):
        for n, t in super().export_hf_weights(*args, **kwargs):
            if n.endswith((".k_scale", ".v_scale")):
                t = self.kv(n, t)
                if t is None:
                    continue
            yield n, t


class KVCacheScalesDropped(_KVCacheScalesExported):
    """Read and counted on import, never written back (a converter that treats them as
    inference-only): the engine that loads the re-export runs its FP8 cache uncalibrated."""

    def kv(self, name, t):
        return None


class KVCacheScalesSwapped(_KVCacheScalesExported):
    """Each layer's k_scale written with its v_scale's value and back (the pair split in the
    wrong order, as a fused-QKV converter might)."""

    def kv(self, name, t):  # ModelOpt's (beside the projections) or compressed-tensors' (on the module)
        for a, b in (("k_proj.k_scale", "v_proj.v_scale"), (".k_scale", ".v_scale")):
            for x, y in ((a, b), (b, a)):
                if name.endswith(x):
                    return self.checkpoint.get(name[:-len(x)] + y)


# 40-41. compressed-tensors pack-quantized int4 read with the other convention ---------------
class _PackedIntMisread(Qwen3Bridge):
    """Pack-quantized weights decoded by ``decode(words, scale, shape)`` instead of the codec's."""

    def _read(self, ckpt, name):
        from bridges.core import quant

        parts = quant.int_packed_parts(name, ckpt)
        if not parts:
            return super()._read(ckpt, name)
        return self.decode(*(ckpt.get(p) for p in parts)).to(self.dequantized_dtype)


class Int4TwosComplement(_PackedIntMisread):
    """Each 4-bit code read as a two's-complement nibble instead of offset by 8 (the other
    packing contract: a kernel's, not compressed-tensors')."""

    @staticmethod
    def decode(words, scale, shape):
        from bridges.core import quant

        rows, cols = (int(x) for x in shape.tolist())
        u = quant.int_unpack(words, cols, 4) + 8
        return (torch.where(u >= 8, u - 16, u).float() * scale.float().repeat_interleave(cols // scale.shape[1], 1))


class Int4GroupScalesTiled(_PackedIntMisread):
    """Group scales tiled across the row (column c takes group c mod G's scale) instead of
    spread over their 32 consecutive columns."""

    @staticmethod
    def decode(words, scale, shape):
        from bridges.core import quant

        rows, cols = (int(x) for x in shape.tolist())
        return quant.int_unpack(words, cols, 4).float() * scale.float().repeat(1, cols // scale.shape[1])


# 42. compressed-tensors NVFP4's global scale read with ModelOpt's convention -----------------
class CTNVFP4GlobalScaleMultiplied(LlamaBridge):
    """``weight_global_scale`` multiplied in, as ModelOpt's ``weight_scale_2`` is, instead of
    divided by (the two NVFP4 namings' one real difference)."""

    def _read(self, ckpt, name):
        from bridges.core import quant

        parts = quant.ct_nvfp4_parts(name, ckpt)
        if not parts:
            return super()._read(ckpt, name)
        return quant.nvfp4_dequantize(*(ckpt.get(p) for p in parts[:3]), torch.float32).to(self.dequantized_dtype)


# 43-45. GPTQ / AWQ read with another tool's convention ---------------------------------------
class _GPTQMisread(Qwen3Bridge):
    """GPTQ / AWQ weights decoded by ``decode(qweight, qzeros, scales, g_idx, settings)`` [in, out]."""

    def _read(self, ckpt, name):
        from bridges.core import gptq

        parts = gptq.parts(name, ckpt)
        if not parts:
            return super()._read(ckpt, name)
        g_idx = ckpt.get(parts[3]) if len(parts) > 3 else None
        w = self.decode(*(ckpt.get(p) for p in parts[:3]), g_idx, gptq.settings(ckpt.config()))
        return w.T.to(self.dequantized_dtype)

    @staticmethod
    def _values(codes, zeros, scales, group):
        return (codes - zeros[group]).float() * scales.float()[group]


class AWQNaturalNibbleOrder(_GPTQMisread):
    """AWQ's qweight and qzeros unpacked with the columns in nibble order (GPTQ's packing) instead
    of AWQ's interleaved (0, 2, 4, 6, 1, 3, 5, 7)."""

    def decode(self, qweight, qzeros, scales, g_idx, s):
        from bridges.core import gptq

        codes, zeros = gptq._unpack(qweight, 4, 1), gptq._unpack(qzeros, 4, 1)
        return self._values(codes, zeros, scales, torch.arange(codes.shape[0]) // (codes.shape[0] // scales.shape[0]))


class GPTQZeroPointNotOffset(_GPTQMisread):
    """GPTQ v1 zero points taken as stored (AutoGPTQ writes each minus one): every value one step off."""

    def decode(self, qweight, qzeros, scales, g_idx, s):
        from bridges.core import gptq

        codes, zeros = gptq._unpack(qweight, s["bits"], 0), gptq._unpack(qzeros, s["bits"], 1)
        return self._values(codes, zeros, scales, g_idx.long())


class GPTQGroupsByPosition(_GPTQMisread):
    """Activation-ordered GPTQ read with groups of consecutive input rows, g_idx ignored."""

    def decode(self, qweight, qzeros, scales, g_idx, s):
        from bridges.core import gptq

        codes, zeros = gptq._unpack(qweight, s["bits"], 0), gptq._unpack(qzeros, s["bits"], 1) + 1
        return self._values(codes, zeros, scales, torch.arange(codes.shape[0]) // (codes.shape[0] // scales.shape[0]))


# 46-47. bitsandbytes 4-bit read with another convention ----------------------------------------
class _BnbMisread(LlamaBridge):
    """bitsandbytes 4-bit weights decoded by ``decode(codes, tensors, state)``."""

    def _read(self, ckpt, name):
        from bridges.core import bnb

        parts = bnb.parts(name, ckpt)
        if not parts:
            return super()._read(ckpt, name)
        tensors = {p.rsplit(".", 1)[1]: ckpt.get(p) for p in parts[1:-1]}
        return self.decode(ckpt.get(name), tensors, bnb.state(ckpt.get(parts[-1]), name)).to(self.dequantized_dtype)


class BnbLowNibbleFirst(_BnbMisread):
    """Each byte's low nibble taken as the first code (bitsandbytes puts the first in the high one)."""

    @staticmethod
    def decode(codes, tensors, s):
        from bridges.core import bnb

        swapped = ((codes & 0xF) << 4) | (codes >> 4)
        return bnb.dequantize(swapped, tensors, s, dtype=torch.float32)


class BnbNestedOffsetDropped(_BnbMisread):
    """Double-quantized absmax read without its nested_offset (the codes' map x scale alone)."""

    @staticmethod
    def decode(codes, tensors, s):
        from bridges.core import bnb

        return bnb.dequantize(codes, tensors, {**s, "nested_offset": 0.0}, dtype=torch.float32)


# 48. bitsandbytes 8-bit rows read without the 1 / 127 ------------------------------------------
class BnbInt8ScaleNotOver127(LlamaBridge):
    """LLM.int8 weights read as code x SCB (the row absmax taken as the step, not absmax / 127)."""

    def _read(self, ckpt, name):
        from bridges.core import bnb

        parts = bnb.parts8(name, ckpt)
        if not parts:
            return super()._read(ckpt, name)
        return (ckpt.get(name).float() * ckpt.get(parts[1]).float().view(-1, 1)).to(self.dequantized_dtype)
