"""bf16 verdicts judged against HF's own bf16 noise (conformance/checks.py)."""
import torch

from conformance.checks import check_generation, check_logits


def _logits(seed, scale=1.0):
    return torch.randn(4, 32, 50, generator=torch.Generator().manual_seed(seed)) * scale


def test_logits_within_hf_bf16_noise_pass_and_a_wrong_model_fails():
    fp32 = _logits(0, 3.0)
    hf_bf16 = fp32 + 0.02 * _logits(1)
    flips = fp32.clone()
    flips[0, :3] = _logits(2, 3.0)[0, :3]  # a few positions moved wholesale (routing flips)
    honest = flips + 0.02 * _logits(3)
    hf_flips = hf_bf16.clone()
    hf_flips[1, :3] = _logits(4, 3.0)[1, :3]  # HF's own bf16 run flips as often
    ok = check_logits(hf_flips, honest, dtype="bfloat16", decisive=torch.ones(4, 32, dtype=torch.bool),
                      ref_fp32=fp32)
    assert ok.passed, ok
    bad = check_logits(hf_flips, _logits(5, 3.0), dtype="bfloat16",
                       decisive=torch.ones(4, 32, dtype=torch.bool), ref_fp32=fp32)
    assert not bad.passed and "x HF bf16's own" in bad.details


def test_generation_follows_the_fp32_run_as_far_as_hf_bf16_does():
    prompt = torch.zeros(2, 3, dtype=torch.long)
    fp32 = torch.cat([prompt, torch.arange(8).repeat(2, 1)], 1)
    hf_bf16 = fp32.clone()
    hf_bf16[:, 3 + 4:] += 1  # HF bf16 leaves the fp32 run after 4 tokens
    meg = fp32.clone()
    meg[:, 3 + 3:] += 2  # Megatron after 3: differs from HF bf16 from token 3 on
    near_tie_late = torch.ones(2, 8, dtype=torch.bool)
    assert check_generation(hf_bf16, meg, 3, near_tie_late, fp32).passed
    wrong = fp32.clone()
    wrong[:, 3:] += 5
    assert not check_generation(hf_bf16, wrong, 3, near_tie_late, fp32).passed
    assert not check_generation(hf_bf16, meg, 3, near_tie_late).passed  # without fp32: token-exact


def test_non_finite_logits_fail_with_their_count():
    ref = _logits(0, 3.0)
    got = ref.clone()
    got[0, 0, 0] = float("nan")
    got[1, 2, 3] = float("inf")
    for dtype in ("float32", "bfloat16"):
        r = check_logits(ref, got, dtype=dtype, decisive=torch.ones(4, 32, dtype=torch.bool), ref_fp32=ref)
        assert not r.passed and "2/6400 logits are not finite (NaN or inf)" in r.details, r


ALL = torch.ones(4, 32, dtype=torch.bool)


def _bf16_run(times_noise, flips=(), seed=10):
    """(fp32 truth, HF bf16, Megatron bf16): HF at noise 0.02 (2 positions moved wholesale, as
    routing flips do), Megatron at ``times_noise`` x that noise, with its own moved positions."""
    fp32 = _logits(0, 3.0)
    hf = fp32 + 0.02 * _logits(1)
    hf[1, :2] = _logits(2, 3.0)[1, :2]
    meg = fp32 + times_noise * 0.02 * _logits(seed)
    for i, p in enumerate(flips):
        meg[0, p] = _logits(100 + i, 3.0)[0, p]
    return fp32, hf, meg


def test_bf16_threshold_is_pinned_between_2x_and_4x_the_noise():
    from conformance.checks import BF16_NOISE_RATIO

    assert BF16_NOISE_RATIO == 3.0
    fp32, hf, meg = _bf16_run(2.0)
    ok = check_logits(hf, meg, dtype="bfloat16", decisive=ALL, ref_fp32=fp32)
    assert ok.passed, ok
    assert 1.8 < ok.data["noise_ratio"] < 2.2 and ok.data["hf_flips"] == 2 and ok.data["flips"] == 0
    fp32, hf, meg = _bf16_run(4.0)
    bad = check_logits(hf, meg, dtype="bfloat16", decisive=ALL, ref_fp32=fp32)
    assert not bad.passed and 3.6 < bad.data["noise_ratio"] < 4.4, bad
    assert "x HF bf16's own (max 3)" in bad.details


def test_bf16_routing_flips_are_set_apart_not_averaged_in():
    # Megatron flips as HF does (up to 3x HF's 2, plus one): its other positions decide
    fp32, hf, meg = _bf16_run(1.0, flips=range(7))
    ok = check_logits(hf, meg, dtype="bfloat16", decisive=ALL, ref_fp32=fp32)
    assert ok.passed and ok.data["flips"] == 7 and ok.data["noise_ratio"] < 1.2, ok
    # flips do not buy slack for the rest: 4x noise elsewhere fails even with HF's big flips
    fp32, hf, meg = _bf16_run(4.0)
    assert not check_logits(hf, meg, dtype="bfloat16", decisive=ALL, ref_fp32=fp32).passed
    # the old global ratio would have passed it: HF's 2 flipped positions dominate its error
    from conformance.checks import rel_err
    assert rel_err(fp32, meg) / rel_err(fp32, hf) < 1.5
    # more flips than 3x HF's + 1: fails
    fp32, hf, meg = _bf16_run(1.0, flips=range(10))
    bad = check_logits(hf, meg, dtype="bfloat16", decisive=ALL, ref_fp32=fp32)
    assert not bad.passed and "10 positions moved wholesale vs HF bf16's 2 (max 7)" in bad.details, bad


def test_bf16_logits_need_the_fp32_reference():
    import pytest

    with pytest.raises(ValueError, match="fp32"):
        check_logits(_logits(0), _logits(0), dtype="bfloat16", decisive=ALL)


def test_bf16_generation_cannot_pass_on_too_few_judged_tokens():
    prompt = torch.zeros(2, 3, dtype=torch.long)
    hf = torch.cat([prompt, torch.arange(8).repeat(2, 1)], 1)
    wrong = hf.clone()
    wrong[:, 3 + 1:] += 5  # right on the first token only
    early_tie = torch.zeros(2, 8, dtype=torch.bool)
    early_tie[:, 0] = True  # 2 of 16 tokens before the first near-tie
    r = check_generation(hf, wrong, 3, early_tie)
    assert not r.passed and "too few to judge" in r.details, r
    late_tie = torch.ones(2, 8, dtype=torch.bool)
    late_tie[:, 4:] = False  # 8 of 16 judged: identity there decides
    assert check_generation(hf, torch.where(torch.arange(11) >= 7, hf + 1, hf), 3, late_tie).passed
    assert not check_generation(hf, wrong, 3, late_tie).passed
