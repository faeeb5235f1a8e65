"""Random-sampling labels: the two-level inverse-CDF sampler and its counter-based uniforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from labelgen.extraction import draw_uniforms, sample_draws


def full_inverse_cdf(logits: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(-1)
    return torch.searchsorted(cdf, u).clamp(max=logits.shape[-1] - 1)


@pytest.mark.parametrize("vocab", [7, 512, 1000, 4099])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_two_level_sampler_equals_the_full_inverse_cdf(vocab, temperature):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(64, vocab, generator=gen) * 3
    u = torch.rand(64, 16, generator=gen, dtype=torch.float64)
    got, log_z = sample_draws(logits, u, temperature)
    torch.testing.assert_close(log_z, torch.logsumexp(logits / temperature, -1, keepdim=True))
    want = full_inverse_cdf(logits, u, temperature)
    assert got.shape == (64, 16) and got.dtype == torch.int64
    assert int(got.min()) >= 0 and int(got.max()) < vocab
    # Identical draws except where a uniform falls within float32 rounding of an id boundary.
    assert (got == want).double().mean() > 0.99
    # Block width does not change the result beyond the same rounding.
    assert (sample_draws(logits, u, temperature, block=8)[0] == want).double().mean() > 0.99


def test_empirical_frequencies_match_the_distribution():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, 2.5] + [-30.0] * 40])  # 45 ids, most with ~0 mass
    uniforms = torch.rand(1, 200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = sample_draws(logits, uniforms)[0].numpy()[0]
    freq = np.bincount(draws, minlength=45) / draws.size
    p = torch.softmax(logits[0].double(), -1).numpy()
    np.testing.assert_allclose(freq, p, atol=4e-3)
    assert freq[5:].sum() < 1e-4


def test_uniforms_are_a_pure_function_of_position():
    positions = torch.arange(10, 20)
    whole = draw_uniforms(3, 12345, positions, 8)
    parts = torch.cat([draw_uniforms(3, 12345, positions[:4], 8), draw_uniforms(3, 12345, positions[4:], 8)])
    torch.testing.assert_close(whole, parts, rtol=0, atol=0)
    assert not torch.equal(whole, draw_uniforms(4, 12345, positions, 8))
    assert float(whole.min()) >= 0 and float(whole.max()) < 1
