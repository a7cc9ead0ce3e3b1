"""Flow matching: loss, sampling and log-density against analytic answers; a trained toy."""

import math

import pytest
import torch
from torch import nn

from lensflow.flow import FlowMatchingLoss, FlowPosterior, VectorField, sample_times
from lensflow.nn import VectorEncoder
from lensflow.params import UnconstrainedTransform
from lensflow.prior import Prior


class GaussianPath(FlowPosterior):
    """Exact drift that carries N(0, I) to N(mu, diag(s^2)) along u_t = a(t) z + t mu.

    a(t) = 1 - t + t s, so v(u, t) = (s - 1) / a(t) * (u - t mu) + mu.
    """

    def __init__(self, mu, s):
        super().__init__(VectorField(mu.shape[-1], nn.Identity(), 1, width=4, n_blocks=1))
        self.mu, self.s = mu, s

    def drift(self, u_t, t, h):
        a = 1 - t + t * self.s
        return (self.s - 1) / a * (u_t - t * self.mu) + self.mu


def test_sample_and_log_prob_match_analytic_gaussian():
    mu = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    s = torch.tensor([0.3, 1.5, 0.8], dtype=torch.float64)
    post = GaussianPath(mu, s)
    x = torch.zeros(1, 1, dtype=torch.float64)
    draws = post.sample(x, 20_000, n_steps=16, solver="rk4",
                        generator=torch.Generator().manual_seed(0))[:, 0]  # fmt: skip
    # 20,000 draws: standard error of the mean s/141, of the std s/200.
    torch.testing.assert_close(draws.mean(0), mu, rtol=0, atol=0.03)
    torch.testing.assert_close(draws.std(0), s, rtol=0.03, atol=0)
    theta = mu + s * torch.randn(6, 3, dtype=torch.float64)
    expected = (-0.5 * ((theta - mu) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(
        -1
    )
    got = post.log_prob(theta, torch.zeros(6, 1, dtype=torch.float64), n_steps=32, solver="rk4")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_unconstrained_transform_log_det_matches_autograd():
    tr = UnconstrainedTransform()
    theta = Prior(dtype=torch.float64).sample((3,))
    for row in theta:
        jac = torch.autograd.functional.jacobian(tr.to_u, row)
        torch.testing.assert_close(tr.log_abs_det(row), torch.linalg.slogdet(jac).logabsdet)


def test_sample_times_range_and_warp():
    g = torch.Generator().manual_seed(0)
    t = sample_times(10_000, alpha=0.0, generator=g, dtype=torch.float64)
    assert t.min() >= 0 and t.max() <= 1 and abs(t.mean().item() - 0.5) < 1e-3  # stratified
    warped = sample_times(10_000, alpha=3.0, generator=g, dtype=torch.float64)
    assert abs(warped.mean().item() - 0.8) < 2e-3  # E[s^(1/4)] = 4/5
    late = sample_times(100, t_min=0.8, generator=g)
    assert late.min() >= 0.8
    with pytest.raises(ValueError):
        sample_times(4, alpha=-1.0)


def test_vector_field_contract():
    field = VectorField(3, VectorEncoder(5, 8), 8, width=16, n_blocks=1).double()
    u, x, t = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64),
               torch.rand(4, dtype=torch.float64))  # fmt: skip
    v = field(u, x, t)
    assert v.shape == (4, 3) and torch.isfinite(v).all()
    torch.testing.assert_close(field.velocity(u, t, field.embed(x)), v)
    loss = FlowMatchingLoss(field)(u, x)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in field.parameters())
    field.eval()
    torch.testing.assert_close(field(u, x, t), field(u, x, t), rtol=0, atol=0)
    assert "VectorField" in repr(field)


@pytest.mark.slow
def test_trained_flow_matches_conditional_gaussian_posterior():
    # theta ~ N(0, I_2), x | theta ~ N(theta, s^2 I): posterior N(x / (1 + s^2), s^2 / (1 + s^2)).
    torch.manual_seed(0)
    s2 = 0.25
    field = VectorField(2, VectorEncoder(2, 16, width=64, n_blocks=1), 16, width=64, n_blocks=2)
    loss_fn = FlowMatchingLoss(field)
    opt = torch.optim.Adam(field.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1500)
    for _ in range(1500):
        theta = torch.randn(256, 2)
        x = theta + math.sqrt(s2) * torch.randn(256, 2)
        opt.zero_grad()
        loss_fn(theta, x).backward()
        opt.step()
        sched.step()
    field.eval()
    post = FlowPosterior(field, n_steps=32, solver="midpoint")
    x_obs = torch.tensor([[1.0, -0.5], [-1.5, 0.3]])
    draws = post.sample(x_obs, 4000, generator=torch.Generator().manual_seed(1))
    mean_true = x_obs / (1 + s2)
    std_true = math.sqrt(s2 / (1 + s2))  # 0.447
    # Tolerances: ~10% of the posterior std for the mean, 10% for the std; a flow trained for
    # 1500 steps on CPU is this close (sampling error alone is 1.5%).
    torch.testing.assert_close(draws.mean(0), mean_true, rtol=0, atol=0.1 * std_true)
    torch.testing.assert_close(draws.std(0), torch.full_like(mean_true, std_true), rtol=0.1,
                               atol=0)  # fmt: skip
    corr = torch.corrcoef(draws[:, 0].T)[0, 1]
    assert abs(corr.item()) < 0.1  # independent coordinates
    # log_prob of the trained flow against the analytic posterior density, near the mode.
    theta = mean_true + 0.3 * std_true * torch.randn(2, 2)
    expected = (-0.5 * ((theta - mean_true) / std_true) ** 2 - math.log(std_true)
                - 0.5 * math.log(2 * math.pi)).sum(-1)  # fmt: skip
    torch.testing.assert_close(post.log_prob(theta, x_obs), expected, rtol=0, atol=0.25)
