"""Tests of lensflow.metrics: coverage on known answers, C2ST sanity, z-scores."""

from __future__ import annotations

import pytest
import torch

from lensflow.metrics import (
    c2st,
    coverage_from_ranks,
    hpd_ranks,
    interval_coverage,
    tarp_coverage,
    z_scores,
)


def _calibrated(n_obs: int, n_samples: int, dim: int, generator: torch.Generator):
    """Conjugate Gaussian: theta ~ N(0, 1), x ~ N(theta, 1) -> posterior N(x / 2, 1 / 2)."""
    theta = torch.randn(n_obs, dim, generator=generator, dtype=torch.float64)
    x = theta + torch.randn(n_obs, dim, generator=generator, dtype=torch.float64)
    mean, std = x / 2, 0.5**0.5
    samples = mean + std * torch.randn(n_samples, n_obs, dim, generator=generator,
                                       dtype=torch.float64)  # fmt: skip
    return theta, mean, std, samples


def test_interval_coverage_calibrated_is_nominal():
    g = torch.Generator().manual_seed(1)
    theta, _, _, samples = _calibrated(2000, 400, 3, g)
    cov = interval_coverage(samples, theta, levels=(0.68, 0.95))
    assert cov.coverage.shape == (2, 3)
    # Within 4 binomial standard errors (plus the quantile error of 400 samples).
    err = (cov.coverage - cov.levels[:, None]).abs()
    assert (err < 4 * cov.stderr[:, None] + 0.01).all(), cov.coverage


def test_interval_coverage_overconfident_undercovers():
    g = torch.Generator().manual_seed(2)
    theta, mean, _, _ = _calibrated(2000, 1, 2, g)
    narrow = mean + 0.3 * torch.randn(400, 2000, 2, generator=g, dtype=torch.float64)
    cov = interval_coverage(narrow, theta, levels=(0.68,))
    assert (cov.coverage < 0.5).all()


def test_hpd_ranks_calibrated_are_uniform():
    g = torch.Generator().manual_seed(3)
    theta, mean, std, samples = _calibrated(1000, 500, 2, g)

    def log_prob(t):
        return (-0.5 * ((t - mean) / std) ** 2).sum(-1)

    ranks = hpd_ranks(log_prob(samples), log_prob(theta))
    curve = coverage_from_ranks(ranks, levels=(0.25, 0.5, 0.68, 0.95))
    assert ((curve.coverage - curve.levels).abs() < 4 * curve.stderr + 0.01).all()


def test_tarp_calibrated_is_diagonal_and_biased_is_not():
    g = torch.Generator().manual_seed(4)
    theta, _, std, samples = _calibrated(1000, 300, 3, g)
    curve = tarp_coverage(samples, theta, levels=(0.2, 0.5, 0.8), generator=g)
    assert ((curve.coverage - curve.levels).abs() < 4 * curve.stderr + 0.02).all()
    biased = tarp_coverage(samples + 2 * std, theta, levels=(0.2, 0.5, 0.8), generator=g)
    assert ((biased.coverage - biased.levels).abs() > 0.1).any()


def test_z_scores_calibrated_have_unit_spread():
    g = torch.Generator().manual_seed(5)
    theta, _, _, samples = _calibrated(2000, 200, 2, g)
    z = z_scores(samples, theta)
    assert z.z.shape == (2000, 2)
    assert (z.bias.abs() < 0.1).all()
    assert ((z.rms - 1).abs() < 0.1).all()


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="expected samples"):
        interval_coverage(torch.zeros(10, 3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="levels"):
        interval_coverage(torch.zeros(10, 3, 2), torch.zeros(3, 2), levels=(1.5,))


def test_c2st_same_distribution_is_chance():
    pytest.importorskip("sklearn")
    g = torch.Generator().manual_seed(6)
    p, q = torch.randn(2000, 2, generator=g), torch.randn(2000, 2, generator=g)
    assert abs(c2st(p, q, seed=1) - 0.5) < 0.05


def test_c2st_separated_distributions_is_one():
    pytest.importorskip("sklearn")
    g = torch.Generator().manual_seed(7)
    p, q = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g) + 10.0
    assert c2st(p, q, seed=1) > 0.99
