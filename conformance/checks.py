"""The conformance checks: plain functions, no pytest. Each returns a ``CheckResult``.

Verdicts (see DESIGN.md): roundtrip is ``torch.equal`` with the same dtype; coverage is exact;
fp32 logits within 1e-5 relative error of HF's, all finite; fp32 generation token-identical.
bf16 is judged against HF's own bf16 noise, only in addition to fp32 (``BF16_BLIND``): per
position, Megatron's error against HF's fp32 run over HF bf16's; positions that either run moves
wholesale (MoE routing flips) are set apart and counted, the others' error ratio must be at most
BF16_NOISE_RATIO; top-1 and generation judged where HF's margin clears the noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

FP32_REL_ERR = 1e-5
BF16_TOP1 = 0.99
# bf16: on the positions neither run moves wholesale, Megatron's error against HF's fp32 run may
# be at most this many times HF's own bf16 error against that run (root mean square over those
# positions). An honest run sits near 1; a mapping bug near the re-initialised model's error,
# hundreds of times the noise.
BF16_NOISE_RATIO = 3.0
# a position is "moved wholesale" (a routing near-tie that flipped: the whole position changes)
# when its error against fp32 exceeds this many times HF bf16's median per-position error.
# Megatron may have at most BF16_NOISE_RATIO times as many such positions as HF bf16, plus one
# (or 1 %).
BF16_FLIP_FACTOR = 10.0
# bf16 generation: token identity up to the first near-tie counts when it judges at least this
# share of the generated tokens; else the fp32-following rule decides.
BF16_MIN_JUDGED = 0.25
# What a bf16 verdict cannot see, said in every report that has bf16 results.
BF16_BLIND = ("bf16 verdicts are relative to HF's own bf16 noise and only an addition to fp32: "
              "bugs whose effect stays within a few times that noise (a norm eps off by decades, "
              "rope base or rope scaling details, small routing details) pass bf16; the fp32 "
              "verdicts are the strict ones.")


@dataclass
class CheckResult:
    check: str
    passed: bool
    figure: str = ""  # the key figure, shown in the summary
    details: str = ""  # the diagnosis when it fails
    data: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        head = f"{self.check}: {'PASS' if self.passed else 'FAIL'} {self.figure}".rstrip()
        return head + (f"\n{self.details}" if self.details else "")


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def cosine(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(ref.double().flatten(), got.double().flatten(), dim=0))


def top1(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref.argmax(-1) == got.argmax(-1)).double().mean())


def check_roundtrip(source: dict[str, torch.Tensor], exported: list[tuple[str, torch.Tensor]]) -> CheckResult:
    """Every exported tensor bit-exactly equals the source tensor of the same name and dtype."""
    bad = []
    for name, t in exported:
        ref = source.get(name)
        if ref is None:
            bad.append(f"{name}: not in the source checkpoint")
        elif ref.dtype != t.dtype or ref.shape != t.shape:
            bad.append(f"{name}: exported {t.dtype} {tuple(t.shape)}, source {ref.dtype} {tuple(ref.shape)}")
        elif not torch.equal(ref, t):
            diff = (ref.double() - t.double()).abs()
            bad.append(f"{name}: {int((diff > 0).sum())}/{ref.numel()} values differ "
                       f"(max abs diff {float(diff.max()):.3g})")
    missing = sorted(set(source) - {n for n, _ in exported})
    bad += [f"{n}: not exported" for n in missing]
    return CheckResult("roundtrip", not bad, f"{len(exported) - len(bad) + len(missing)}/{len(source)} tensors bit-exact",
                       "\n".join(bad[:20]))


def check_coverage(import_error: str | None, exported: list[str], source: list[str]) -> CheckResult:
    """Import used every HF tensor and wrote every parameter; export wrote exactly the
    source's tensor names, each once."""
    problems = [import_error] if import_error else []
    dup = sorted({n for n in exported if exported.count(n) > 1})
    missing, extra = sorted(set(source) - set(exported)), sorted(set(exported) - set(source))
    if dup:
        problems.append(f"export wrote {dup} more than once")
    if missing:
        problems.append(f"export is missing {missing}")
    if extra:
        problems.append(f"export wrote tensors the source does not have: {extra}")
    return CheckResult("coverage", not problems, f"{len(source)} HF tensors", "\n".join(problems))


def check_logits(ref: torch.Tensor, got: torch.Tensor, baseline: torch.Tensor | None = None,
                 dtype: str = "float32", decisive: torch.Tensor | None = None,
                 ref_fp32: torch.Tensor | None = None) -> CheckResult:
    """Megatron logits against HF's; ``baseline`` is HF's logits for a re-initialised model,
    reported beside the figure so a reader sees how far from 'wrong' the result is.

    bf16 (only in addition to an fp32 run: ``BF16_BLIND``) is judged against HF's fp32 run
    ``ref_fp32`` on the same weights, which measures HF's own bf16 noise. Per position p, e(p) =
    |logits(p) - fp32(p)| / |fp32(p)| for Megatron and for HF bf16. Positions whose error exceeds
    BF16_FLIP_FACTOR x HF's median e are "moved wholesale" (an MoE routing near-tie that flipped
    under bf16 rounding): set apart, and Megatron may have at most BF16_NOISE_RATIO x HF's count
    of them plus one (or 1 %). On the other positions, Megatron's root-mean-square e may be at
    most BF16_NOISE_RATIO x HF's. Top-1 is judged where the fp32 top-1 margin clears 4x the noise
    (toy logits are flat; near-ties flip under any rounding): Megatron agrees with HF bf16 on
    >= 99 % of HF's ``decisive`` positions, or, on the positions not moved wholesale, misses the
    fp32 top-1 at most 3x as often as HF bf16, plus one position (or 1 %). Any NaN / inf fails,
    in either dtype.
    """
    if got.shape != ref.shape:
        return CheckResult("logits", False, "", f"shape {tuple(got.shape)} != HF {tuple(ref.shape)}")
    err, cos = rel_err(ref, got), cosine(ref, got)
    if decisive is None or dtype == "float32":
        decisive = torch.ones(ref.shape[:-1], dtype=torch.bool)
    agree = float((ref.argmax(-1) == got.argmax(-1))[decisive].double().mean())
    data = {"rel_err": err, "cosine": cos, "top1": agree, "decisive": float(decisive.double().mean())}
    base = ""
    if baseline is not None:
        data.update(baseline_rel_err=rel_err(ref, baseline), baseline_cosine=cosine(ref, baseline),
                    baseline_top1=top1(ref, baseline))
        base = f" (re-initialised model: {data['baseline_rel_err']:.3g})"
    bad = int((~torch.isfinite(got)).sum())
    if dtype == "float32":
        ok = err <= FP32_REL_ERR and not bad
        fig = f"rel err {err:.2e}{base}"
        why = "" if ok else f"relative error {err:.3g} > {FP32_REL_ERR:g}"
    else:
        if ref_fp32 is None:
            raise ValueError("a bf16 logits verdict needs HF's fp32 logits on the same weights (ref_fp32)")
        noise, kept = bf16_noise(ref, got, ref_fp32)
        # top-1 against the fp32 truth where it is decisive there, on the positions neither run
        # moved wholesale (those are counted above): Megatron may miss it at most
        # BF16_NOISE_RATIO times as often as HF's own bf16 run does, plus one position (or 1 %)
        top2 = ref_fp32.float().topk(2, dim=-1).values
        sure = ((top2[..., 0] - top2[..., 1]) > margin_tau(ref, ref_fp32)) & kept.reshape(top2.shape[:-1])
        truth, n = ref_fp32.argmax(-1)[sure], int(sure.sum())
        misses_meg = int((got.argmax(-1)[sure] != truth).sum())
        misses_hf = int((ref.argmax(-1)[sure] != truth).sum())
        miss_meg, miss_hf = misses_meg / max(n, 1), misses_hf / max(n, 1)
        top1_ok = agree >= BF16_TOP1 or misses_meg <= BF16_NOISE_RATIO * misses_hf + max(1, n // 100)
        data.update(noise, top1_miss=miss_meg, hf_bf16_top1_miss=miss_hf)
        ok = noise["noise_ok"] and top1_ok
        fig = (f"error vs HF fp32 {noise['noise_ratio']:.2f}x HF bf16's on {noise['kept']} positions "
               f"({noise['flips']} moved wholesale, HF bf16: {noise['hf_flips']}), top-1 {agree:.1%} "
               f"of decisive positions (misses the fp32 top-1 {miss_meg:.1%}, HF bf16 {miss_hf:.1%}), "
               f"cosine {cos:.6f}, rel err {err:.2e}{base}")
        why = "" if ok else (f"error vs HF fp32 {noise['noise_ratio']:.2f}x HF bf16's own (max "
                             f"{BF16_NOISE_RATIO:g}) / {noise['flips']} positions moved wholesale vs HF "
                             f"bf16's {noise['hf_flips']} (max {noise['max_flips']}) / top-1 misses "
                             f"{miss_meg:.1%} vs HF bf16's {miss_hf:.1%}")
    if bad:  # NaN / inf: say so, rather than "relative error nan"
        ok, why = False, f"{bad}/{got.numel()} logits are not finite (NaN or inf)"
    return CheckResult("logits", ok, fig, why, data)


def check_generation(ref: torch.Tensor, got: torch.Tensor, prompt_len: int,
                     decisive: torch.Tensor | None = None, ref_fp32: torch.Tensor | None = None) -> CheckResult:
    """Greedy continuations are token-identical. With ``decisive`` ([batch, steps], bf16 runs),
    each sequence is judged up to its first step whose HF top-1 margin is within bf16 noise,
    and that counts only if at least a quarter of the tokens are judged (BF16_MIN_JUDGED: an
    empty or tiny set would pass anything); failing that, with HF's fp32 generation
    ``ref_fp32``, Megatron must follow the fp32 run at least half as far as HF's own bf16 run
    does, and at least one token (MoE routing near-ties)."""
    ref_new, got_new = ref[:, prompt_len:], got[:, prompt_len:]
    same = ref_new == got_new
    judged = torch.ones_like(same)
    if decisive is not None:
        judged = torch.cumprod(decisive.int(), dim=1).bool()
    ok = bool(same[judged].all()) and int(judged.sum()) >= BF16_MIN_JUDGED * same.numel()
    if not ok and ref_fp32 is not None:
        truth = ref_fp32[:, prompt_len:]
        follow = lambda g: float(torch.cumprod((g == truth).int(), dim=1).sum(1).double().mean())
        meg, hf = follow(got_new), follow(ref_new)
        ok = meg >= 0.5 * hf and meg >= 1
        if ok:
            fig = (f"{int(same.sum())}/{same.numel()} tokens agree; follows the fp32 run for "
                   f"{meg:.1f} tokens (HF bf16: {hf:.1f})")
            return CheckResult("generation", True, fig, "")
    if not ok and ref_fp32 is None and bool(same[judged].all()):
        first = (f"only {int(judged.sum())}/{same.numel()} tokens before the first near-tie: too "
                 f"few to judge (min {BF16_MIN_JUDGED:.0%}), and no fp32 run to follow")
        return CheckResult("generation", False, f"{int(same.sum())}/{same.numel()} tokens agree", first)
    first = "" if bool(same.all()) else f"first difference at token {int((~same).int().argmax(-1).min())}: HF {ref_new.tolist()} vs Megatron {got_new.tolist()}"
    fig = f"{int(same.sum())}/{same.numel()} tokens agree"
    if decisive is not None:
        fig += f" ({int(same[judged].sum())}/{int(judged.sum())} before the first near-tie)"
    return CheckResult("generation", ok, fig, first)


def bf16_noise(ref: torch.Tensor, got: torch.Tensor, ref_fp32: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """The bf16 error statistic of ``check_logits`` (HF bf16 ``ref``, Megatron ``got``), and the
    flat mask of the positions neither run moved wholesale."""
    truth = ref_fp32.double()
    scale = truth.norm(dim=-1).clamp_min(1e-30)
    e_meg = (got.double() - truth).norm(dim=-1).flatten() / scale.flatten()
    e_hf = (ref.double() - truth).norm(dim=-1).flatten() / scale.flatten()
    limit = BF16_FLIP_FACTOR * max(float(e_hf.median()), 1e-12)
    moved_meg, moved_hf = e_meg > limit, e_hf > limit
    kept = ~(moved_meg | moved_hf)
    n = e_meg.numel()
    max_flips = int(BF16_NOISE_RATIO * int(moved_hf.sum()) + max(1, n // 100))
    rms = lambda e: float(e[kept].pow(2).mean().sqrt()) if bool(kept.any()) else float("nan")
    ratio = rms(e_meg) / max(rms(e_hf), 1e-12)
    return {"noise_ratio": ratio, "flips": int(moved_meg.sum()), "hf_flips": int(moved_hf.sum()),
            "max_flips": max_flips, "kept": int(kept.sum()),
            # fewer than half the positions left to compare: the statistic says nothing
            "noise_ok": ratio <= BF16_NOISE_RATIO and int(moved_meg.sum()) <= max_flips
            and int(kept.sum()) * 2 >= n}, kept


def margin_tau(ref: torch.Tensor, ref_fp32: torch.Tensor) -> float:
    """4x the typical bf16 rounding noise of HF's logits (median over positions of the largest
    |bf16 - fp32| difference)."""
    return 4 * float((ref.float() - ref_fp32.float()).abs().amax(-1).median())


def check_config_roundtrip(hf_config: dict[str, Any], exported: dict[str, Any],
                           fields: list[str]) -> CheckResult:
    """HF -> Megatron -> HF keeps every mapped field (dotted paths) at the same value."""
    from bridges.core.config import get_path

    bad = []
    for f in fields:
        a, b = get_path(hf_config, f, None), get_path(exported, f, None)
        if _norm(a) != _norm(b):
            bad.append(f"{f}: source {a!r}, after roundtrip {b!r}")
    return CheckResult("config", not bad, f"{len(fields) - len(bad)}/{len(fields)} fields kept",
                       "\n".join(bad))


def _norm(v):
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items() if x is not None}
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def check_quant(dequantized: dict[str, torch.Tensor], imported: list[tuple[str, torch.Tensor]],
                unquantized: dict[str, torch.Tensor], source: dict[str, torch.Tensor],
                requantized: list[tuple[str, torch.Tensor]]) -> CheckResult:
    """A quantized checkpoint was dequantized on import, and re-quantizes bit-exactly.

    (a) every imported weight equals the dequantized reference; (b) the std of every imported
    weight is within [0.5, 2] x that of the unquantized model (raw FP8 codes sit orders of
    magnitude away); (c) FP8 re-export gives back the source's quantized tensors and scales.
    FP8, MXFP4 (``_blocks``), NVFP4 (uint8 codes beside a ``_scale``), pack-quantized int
    (``_packed``), GPTQ / AWQ (``qweight``) and bitsandbytes 4-bit weights alike.
    """
    from bridges.core import quant
    from bridges.core.codecs import quantized_name

    bad = []
    got = dict(imported)
    nvfp4 = [n for n, t in source.items() if t.dtype == torch.uint8 and f"{n}_scale" in source]  # codes
    # MXFP4, pack-quantized, GPTQ / AWQ, bitsandbytes: by value name
    marked = [x for n in source if (x := quantized_name(n))]
    scales = {f"{n}_scale" for n in nvfp4 + marked}  # NVFP4's float8 block scales are not weights
    quantized = [n for n, t in source.items() if t.dtype in quant.FP8 and n not in scales] + nvfp4 + marked
    for n in quantized:
        w = got.get(n)
        if w is None:
            bad.append(f"{n}: not imported")
            continue
        if not torch.equal(w.float(), dequantized[n].float()):
            bad.append(f"{n}: imported values differ from the dequantized reference "
                       f"(max abs diff {float((w.float() - dequantized[n].float()).abs().max()):.3g})")
        ratio = float(w.float().std() / unquantized[n].float().std())
        if not 0.5 <= ratio <= 2.0:
            bad.append(f"{n}: std {float(w.float().std()):.3g} is {ratio:.3g}x the unquantized "
                       f"model's (band 0.5-2): a quantized tensor loaded without its scale?")
    back = dict(requantized)
    for n, t in source.items():
        r = back.get(n)
        if r is None:
            bad.append(f"{n}: missing from the FP8 re-export")
        elif r.dtype != t.dtype or not torch.equal(r.view(torch.uint8) if r.dtype in quant.FP8 else r,
                                                   t.view(torch.uint8) if t.dtype in quant.FP8 else t):
            bad.append(f"{n}: FP8 re-export differs from the source ({r.dtype} vs {t.dtype})")
    kv = sum(n.endswith(tuple(f".{s}" for s in quant.KV_CACHE_SCALES)) for n in source)
    done = f"{len(quantized)} quantized tensors dequantized, re-exported bit-exact" + \
        (f" (with {kv} KV-cache scales)" if kv else "")
    return CheckResult("quant", not bad, done if not bad else f"{len(bad)} problems", "\n".join(bad[:20]))
