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
