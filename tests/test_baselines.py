"""The classical baselines: lenstronomy + emcee, emcee and NUTS on lensflow's likelihood.

Fast tests run each baseline for a few steps on a 16x16 mock and check the shared
``PosteriorSamples`` record, the diagnostics records, the error messages, and that the
lenstronomy baseline's likelihood is lensflow's likelihood (parity, float64). Slow tests
check that each baseline's 95% interval covers the truth of a high-S/N mock.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

pytest.importorskip("lenstronomy")
pytest.importorskip("emcee")

from lensflow.baselines.lenstronomy import (
    fit_data,
    fitting_sequence,
    likelihood_mask,
    psf_pad_pix,
    run_lenstronomy,
    to_lenstronomy,
)
from lensflow.baselines.mcmc import (
    box_transform,
    ensemble_diagnostics,
    log_posterior,
    optimize_posterior,
    run_emcee,
    run_nuts,
)
from lensflow.baselines.smc import run_smc, student_t_log_density, tempered_smc
from lensflow.mocks import COMPACT_CONFIG as CONFIG
from lensflow.mocks import COMPACT_TRUTH as TRUTH
from lensflow.mocks import mock_observation
from lensflow.observation import Observation
from lensflow.params import NAMES, index
from lensflow.prior import Prior
from lensflow.sampling import PosteriorSamples
from lensflow.simulator import LensSimulator, chi2

pytestmark = pytest.mark.filterwarnings("ignore:`axes` should not be `None`:DeprecationWarning")

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Small images: a second torch thread only adds contention (10-100x slower per op on
    # the shared 2-core box), so the MCMC tests run single-threaded.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def mock() -> tuple[Observation, torch.Tensor]:
    return mock_observation()


@pytest.fixture(scope="module")
def sim() -> LensSimulator:
    return LensSimulator(CONFIG, dtype=F64)


@pytest.fixture(scope="module")
def centre() -> torch.Tensor:
    prior = Prior(dtype=F64)
    return 0.5 * (prior.low + prior.high)


def _check_record(samples: PosteriorSamples, method: str, n: int) -> None:
    # lenstronomy's amplitudes are solved linearly, unbounded by the prior box.
    columns = [
        i for i, name in enumerate(NAMES) if not (method == "lenstronomy" and "amp" in name)
    ]
    assert isinstance(samples, PosteriorSamples)
    assert samples.method == method
    assert samples.names == NAMES
    assert samples.theta.shape == (n, len(NAMES))
    assert samples.theta.dtype == F64
    assert torch.isfinite(samples.theta).all()
    # Registry units: every sample inside the default prior box (arcsec, dimensionless...).
    prior = Prior(dtype=F64)
    inside = (samples.theta >= prior.low) & (samples.theta <= prior.high)
    assert inside[:, columns].all()


# --- fast: records and diagnostics ----------------------------------------------------------


def test_mock_observation_is_the_truth_s_image_plus_seeded_noise(sim):
    obs, theta = mock_observation(noise=0.05, seed=7)
    again, _ = mock_observation(noise=0.05, seed=7)
    assert torch.equal(obs.image, again.image) and obs.image.dtype == F64
    resid = (obs.image - sim(theta)) / obs.sigma
    assert abs(float(resid.mean())) < 0.2 and 0.8 < float(resid.std()) < 1.2  # 256 pixels
    assert torch.equal(theta, torch.tensor([TRUTH[n] for n in NAMES], dtype=F64))
    assert bool(obs.mask.all()) and torch.allclose(obs.psf, sim.psf)
    with pytest.raises(ValueError, match=r"missing \['lens_e1'\]"):
        mock_observation({k: v for k, v in TRUTH.items() if k != "lens_e1"})
    with pytest.raises(ValueError, match="noise must be > 0"):
        mock_observation(noise=0.0)


def test_run_emcee_returns_registry_samples_and_diagnostics(mock, sim, centre):
    obs, _ = mock
    result = run_emcee(sim, obs, n_walkers=42, n_steps=6, n_burn=2, init=centre,
                       generator=torch.Generator().manual_seed(0),
                       rng=np.random.default_rng(0))  # fmt: skip
    _check_record(result.samples, "emcee", 6 * 42)
    assert torch.isfinite(result.samples.log_prob).all()
    d = result.diagnostics
    assert d.tau.shape == (len(NAMES),)
    assert (d.n_steps, d.n_burn, d.n_walkers, d.tol) == (6, 2, 42, 50.0)
    assert 0.0 <= d.acceptance_fraction <= 1.0
    assert d.is_converged is False  # 6 steps are never 50 tau
    assert d.wall_time_s > 0 and d.time_per_step_s > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.n_steps = 1


def test_run_emcee_is_reproducible_with_generator_and_rng(mock, sim, centre):
    obs, _ = mock
    runs = [run_emcee(sim, obs, n_walkers=42, n_steps=3, n_burn=0, init=centre,
                      generator=torch.Generator().manual_seed(1),
                      rng=np.random.default_rng(1)) for _ in range(2)]  # fmt: skip
    torch.testing.assert_close(runs[0].samples.theta, runs[1].samples.theta, rtol=0, atol=0)


def test_run_emcee_wall_time_limit_keeps_the_burn_in_and_cuts_the_chain(mock, sim, centre):
    obs, _ = mock
    kw = {"n_walkers": 42, "n_burn": 3, "init": centre, "generator": torch.Generator()}
    # A limit far below one step: the burn-in still runs in full, then one kept step.
    cut = run_emcee(sim, obs, n_steps=500, max_wall_s=1e-9, rng=np.random.default_rng(2), **kw)
    d = cut.diagnostics
    assert (d.n_burn, d.n_steps, d.time_limited) == (3, 1, True)
    assert cut.samples.theta.shape == (42, len(NAMES))
    assert cut.samples.log_prob.shape == (42,)
    assert d.is_converged is False
    # A generous limit changes nothing: same chain as without one, not flagged.
    kw["generator"] = torch.Generator().manual_seed(3)
    full = run_emcee(sim, obs, n_steps=4, max_wall_s=3600, rng=np.random.default_rng(3), **kw)
    kw["generator"] = torch.Generator().manual_seed(3)
    free = run_emcee(sim, obs, n_steps=4, rng=np.random.default_rng(3), **kw)
    assert (full.diagnostics.n_steps, full.diagnostics.time_limited) == (4, False)
    torch.testing.assert_close(full.samples.theta, free.samples.theta, rtol=0, atol=0)


def test_run_nuts_returns_registry_samples_and_leaves_the_global_rng(mock, sim, centre):
    obs, _ = mock
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    result = run_nuts(sim, obs, n_samples=4, n_warmup=2, n_chains=2, max_tree_depth=2,
                      init=centre, generator=torch.Generator().manual_seed(0))  # fmt: skip
    # Pyro draws from torch's global generator; run_nuts forks it.
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
    _check_record(result.samples, "nuts", 2 * 4)
    assert torch.isfinite(result.samples.log_prob).all()
    d = result.diagnostics
    assert d.r_hat.shape == d.ess.shape == (len(NAMES),)
    assert (d.n_chains, d.n_samples, d.n_warmup) == (2, 4, 2)
    assert d.is_converged is False  # 8 draws never reach ESS 400
    assert 0.0 <= d.acceptance_rate <= 1.0 and d.n_divergent >= 0


def test_run_nuts_pulls_non_finite_chain_starts_back_to_the_start(mock, sim, centre):
    # Jitter of 10 prior widths puts most chains where the simulator returns NaN (measured:
    # 41 of 64 such draws); those starts are moved back toward the start, not rejected.
    obs, _ = mock
    result = run_nuts(sim, obs, n_samples=4, n_warmup=2, n_chains=4, max_tree_depth=2,
                      init=centre, init_scale=10.0, use_laplace_scaling=False,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.isfinite(result.samples.log_prob).all()
    # An observation whose chi^2 overflows float32 everywhere is still an error.
    sim32 = LensSimulator(CONFIG, dtype=torch.float32)
    broken = dataclasses.replace(obs, image=torch.full_like(obs.image, 1e30),
                                 sigma=torch.full_like(obs.sigma, 1e-10))  # fmt: skip
    with pytest.raises(ValueError, match="non-finite initial log posterior at the start"):
        run_nuts(sim32, broken, n_samples=4, n_warmup=2, init=centre.float())


def test_run_lenstronomy_returns_registry_samples_quietly(mock, capsys):
    obs, _ = mock
    result = run_lenstronomy(obs, CONFIG, n_particles=8, n_iterations=3, n_walkers=38,
                             n_run=4, n_burn=0, rng=np.random.default_rng(0))  # fmt: skip
    _check_record(result.samples, "lenstronomy", 4 * 38)
    assert result.samples.log_prob is None
    assert result.log_likelihood.shape == (4 * 38,)
    assert result.best_fit.shape == (len(NAMES),)
    assert result.diagnostics.tau.shape == (len(NAMES),)
    assert result.diagnostics.is_converged is False
    assert 0.0 <= result.diagnostics.acceptance_fraction <= 1.0
    assert result.pso_wall_time_s > 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # lenstronomy's prints and PSO bar swallowed


def test_run_lenstronomy_start_centres_the_pso_on_the_given_parameters(mock):
    """A short PSO from the box centre ends far from the truth; the same PSO around the
    truth (standing in for an optimizer's result) stays in its mode."""
    obs, theta = mock
    # Before any fit, best_fit() is the start: the given values, not the box centre.
    init = fitting_sequence(obs, CONFIG, start=theta).best_fit(bijective=True)
    kw = to_lenstronomy(theta)
    for group in ("kwargs_lens", "kwargs_source", "kwargs_lens_light"):
        for got, want in zip(init[group], getattr(kw, group), strict=True):
            for key, value in got.items():
                assert value == pytest.approx(want[key], abs=1e-5), (group, key)
    box = fitting_sequence(obs, CONFIG).best_fit(bijective=True)
    assert box["kwargs_lens"][0]["theta_E"] != pytest.approx(kw.kwargs_lens[0]["theta_E"])
    kwargs = {"n_particles": 8, "n_iterations": 3, "n_walkers": 38, "n_run": 2, "n_burn": 0}
    centre = run_lenstronomy(obs, CONFIG, rng=np.random.default_rng(0), **kwargs)
    near = run_lenstronomy(obs, CONFIG, start=theta, rng=np.random.default_rng(0), **kwargs)
    i = index("lens_theta_e")
    assert abs(float(near.best_fit[i]) - float(theta[i])) < 0.05
    assert float(near.log_likelihood.max()) > float(centre.log_likelihood.max()) + 100


def test_run_lenstronomy_max_samples_completes_every_kth_step_of_the_same_chain(mock):
    obs, _ = mock
    kw = {"n_particles": 8, "n_iterations": 3, "n_walkers": 38, "n_run": 10, "n_burn": 0}
    full = run_lenstronomy(obs, CONFIG, rng=np.random.default_rng(5), **kw)
    thin = run_lenstronomy(obs, CONFIG, max_samples=4 * 38, rng=np.random.default_rng(5), **kw)
    # ceil(10 * 38 / 152) = 3: steps 0, 3, 6, 9 of the same chain, all 38 walkers.
    assert thin.samples.theta.shape == (4 * 38, len(NAMES))
    rows = full.samples.theta.reshape(10, 38, -1)[::3].reshape(-1, len(NAMES))
    sampled = [i for i, n in enumerate(NAMES) if n not in ("source_amp", "lens_light_amp")]
    torch.testing.assert_close(thin.samples.theta[:, sampled], rows[:, sampled], rtol=0, atol=0)
    d = thin.diagnostics
    assert (d.n_steps, d.n_walkers) == (10, 38) and d.tau.shape == (len(NAMES),)
    assert d.acceptance_fraction == full.diagnostics.acceptance_fraction  # from every step
    torch.testing.assert_close(thin.log_likelihood, full.log_likelihood, rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_samples must be >= n_walkers = 38"):
        run_lenstronomy(obs, CONFIG, max_samples=10, **kw)


def test_ensemble_diagnostics_of_a_thinned_chain_gives_tau_in_full_steps():
    """AR(1) walkers with rho = 0.9: tau = (1 + rho) / (1 - rho) = 19 steps."""
    rng = np.random.default_rng(3)
    rho, n, walkers = 0.9, 20_000, 16
    x = np.empty((n, walkers, 1))
    x[0] = rng.normal(size=(walkers, 1)) / np.sqrt(1 - rho**2)
    for i in range(1, n):
        x[i] = rho * x[i - 1] + rng.normal(size=(walkers, 1))
    kw = {"n_burn": 0, "acceptance_fraction": 0.3, "tol": 50.0, "wall_time_s": 1.0}
    full = ensemble_diagnostics(x, **kw)
    thin = ensemble_diagnostics(x[::4], thin=4, n_run=n, **kw)
    assert float(full.tau[0]) == pytest.approx(19.0, rel=0.1)
    assert float(thin.tau[0]) == pytest.approx(19.0, rel=0.15)
    assert (thin.n_steps, thin.is_converged) == (n, True)  # 20,000 >= 50 x 19
    with pytest.raises(ValueError, match="thinned by 4 cannot be 30000 long"):
        ensemble_diagnostics(x[::4], thin=4, n_run=30_000, **kw)


def test_optimize_posterior_improves_on_the_prior_centre(mock, sim, centre):
    obs, _ = mock
    prior = Prior(dtype=F64)
    start = optimize_posterior(sim, obs, n_starts=2, n_steps=10, n_polish=1, n_polish_steps=5,
                               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert start.shape == (len(NAMES),)
    assert log_posterior(start[None], sim, obs, prior) > log_posterior(centre[None], sim, obs,
                                                                        prior)  # fmt: skip


def test_box_transform_maps_the_real_line_onto_the_prior_box():
    prior = Prior(dtype=F64)
    transform = box_transform(prior)
    u = 3.0 * torch.randn(256, len(NAMES), dtype=F64)
    theta = transform.from_u(u)
    assert torch.isfinite(prior.log_prob(theta)).all()
    torch.testing.assert_close(transform.to_u(theta), u)


def test_log_posterior_is_minus_inf_outside_the_prior_without_simulating(mock, sim):
    obs, theta = mock
    bad = theta.clone()
    bad[index("source_r_sersic")] = -1.0  # unphysical; must not reach caustics
    logp = log_posterior(torch.stack([theta, bad]), sim, obs, Prior(dtype=F64))
    assert math.isfinite(float(logp[0])) and logp[1] == -math.inf


# --- fast: errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_walkers": 40}, "n_walkers must be even and >= 2 \\* D = 42"),
        ({"n_walkers": 43}, "n_walkers must be even"),
        ({"n_steps": 0}, "n_steps >= 1"),
        ({"max_wall_s": 0.0}, "max_wall_s must be a positive number"),
        ({"max_wall_s": float("nan")}, "max_wall_s must be a positive number"),
        ({"init": torch.zeros(3, dtype=F64)}, "init must have shape"),
        ({"init": torch.full((21,), 50.0, dtype=F64)}, "outside the prior box"),
    ],
)
def test_run_emcee_rejects_bad_settings(mock, sim, centre, kwargs, match):
    obs, _ = mock
    kwargs = {"init": centre, **kwargs}
    with pytest.raises(ValueError, match=match):
        run_emcee(sim, obs, **kwargs)


def test_baselines_reject_observations_that_do_not_match_the_model(mock, sim, centre):
    obs, _ = mock
    small = dataclasses.replace(obs, image=obs.image[:8, :8], sigma=obs.sigma[:8, :8],
                                mask=obs.mask[:8, :8])  # fmt: skip
    coarse = dataclasses.replace(obs, pixel_scale_arcsec=0.2)
    for bad, match in ((small, "has shape \\(8, 8\\)"), (coarse, "pixel_scale_arcsec=0.2")):
        with pytest.raises(ValueError, match=match):
            run_emcee(sim, bad, init=centre)
        with pytest.raises(ValueError, match=match):
            run_nuts(sim, bad, init=centre)
        with pytest.raises(ValueError, match=match):
            run_lenstronomy(bad, CONFIG)
    with pytest.raises(TypeError, match="Observation"):
        run_emcee(sim, obs.image, init=centre)
    with pytest.raises(TypeError, match="Observation"):
        run_lenstronomy(obs.image, CONFIG)


def test_run_emcee_rejects_a_non_finite_initial_log_posterior(centre):
    # A corrupted observation whose residuals overflow float32: chi2 = inf at every walker.
    sim32 = LensSimulator(CONFIG, dtype=torch.float32)
    obs, _ = mock_observation()
    broken = dataclasses.replace(obs, image=torch.full_like(obs.image, 1e30),
                                 sigma=torch.full_like(obs.sigma, 1e-10))  # fmt: skip
    with pytest.raises(ValueError, match="non-finite initial log posterior"):
        run_emcee(sim32, broken, n_walkers=42, init=centre.float())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_walkers": 36}, "n_walkers must be even and >= 2 x 19"),
        ({"n_run": 1}, "n_run >= 2"),
        ({"n_particles": 0}, "n_particles"),
        ({"start": torch.zeros(5)}, r"start must have shape \(21,\)"),
    ],
)
def test_run_lenstronomy_rejects_bad_settings(mock, kwargs, match):
    obs, _ = mock
    with pytest.raises(ValueError, match=match):
        run_lenstronomy(obs, CONFIG, **kwargs)


def test_run_nuts_rejects_bad_settings(mock, sim, centre):
    obs, _ = mock
    with pytest.raises(ValueError, match="n_samples >= 4"):
        run_nuts(sim, obs, n_samples=3, init=centre)
    with pytest.raises(ValueError, match="n_chains >= 1"):
        run_nuts(sim, obs, n_chains=0, init=centre)


# --- fast: tempered SMC ---------------------------------------------------------------------


def _gaussian(mean: torch.Tensor, cov: torch.Tensor):
    precision = torch.linalg.inv(cov)
    return lambda u: -0.5 * (((u - mean) @ precision) * (u - mean)).sum(-1)


def test_student_t_log_density_is_normalized_and_tends_to_the_gaussian():
    # 1-D: the t density integrates to 1 (trapezoid on a wide grid); large nu -> N(mean, s^2).
    x = torch.linspace(-400.0, 400.0, 400_001, dtype=F64)[:, None]
    mean, scale = torch.tensor([0.3], dtype=F64), torch.tensor([[1.7]], dtype=F64)
    dens = student_t_log_density(x, mean, scale, 5).exp()
    assert torch.trapezoid(dens, x[:, 0]).item() == pytest.approx(1.0, abs=1e-4)
    u = torch.tensor([[1.0, -2.0]], dtype=F64)
    s = torch.tensor([[2.0, 0.0], [0.5, 1.0]], dtype=F64)
    normal = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=F64), s @ s.T)
    assert student_t_log_density(u, torch.zeros(2, dtype=F64), s, 10**7).item() == pytest.approx(
        normal.log_prob(u).item(), abs=1e-5
    )


def test_tempered_smc_matches_a_correlated_gaussian_and_its_evidence():
    # Target N(m, C) unnormalized; proposal centred 1.5 sigma off with the wrong scale, so
    # several temperatures are needed. Mean, covariance and log Z = log sqrt((2 pi)^D |C|)
    # are known exactly.
    g = torch.Generator().manual_seed(3)
    d = 6
    a = torch.randn(d, d, generator=g, dtype=F64) * 0.4 + torch.eye(d, dtype=F64)
    cov, mean = a @ a.T, torch.randn(d, generator=g, dtype=F64)
    start = mean + 1.5 * torch.linalg.cholesky(cov) @ torch.ones(d, dtype=F64) / math.sqrt(d)
    u, log_p, diag = tempered_smc(_gaussian(mean, cov), start, 0.5 * torch.eye(d, dtype=F64),
                                  n_particles=4000, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert len(diag.temperatures) > 2 and diag.temperatures[-1] == 1.0
    assert diag.is_converged and diag.unique_fraction > 0.999
    sd = cov.diagonal().sqrt()
    # 4,000 particles: standard errors of about 0.02 sigma (means) and 2% (sds), inflated by
    # the particles' correlation; these bounds are 5-10 of those.
    assert ((u.mean(0) - mean).abs() / sd).max() < 0.1
    assert ((u.std(0) / sd) - 1).abs().max() < 0.1
    corr = torch.corrcoef(u.T)
    assert (corr - cov / torch.outer(sd, sd)).abs().max() < 0.06
    log_z = 0.5 * d * math.log(2 * math.pi) + 0.5 * torch.logdet(cov).item()
    assert diag.log_evidence == pytest.approx(log_z, abs=0.1)
    assert torch.equal(log_p, _gaussian(mean, cov)(u))
    assert diag.target_evaluations == 4000 * (1 + 10 * (len(diag.temperatures) - 1) + 20)


def test_tempered_smc_follows_a_curved_posterior():
    # A banana, u1 = b (u0^2 - 1) + e: exact draws by construction. A Gaussian at the mode
    # (u1 mean -b = -0.6, sd 0.5) misses the curvature; the sweeps recover most of it, not
    # all: over seeds 1-3 the u1 mean is -0.02 to -0.06 and its sd 0.88-0.93 (exact 0.00,
    # 0.98), so the bounds below pin that much and no more.
    d, b = 4, 0.6
    g = torch.Generator().manual_seed(5)
    exact = torch.randn(200_000, d, generator=g, dtype=F64)
    exact[:, 1] = 0.5 * exact[:, 1] + b * (exact[:, 0] ** 2 - 1)

    def target(u):
        r = u[:, 1] - b * (u[:, 0] ** 2 - 1)
        return -0.5 * (u[:, 0] ** 2 + (r / 0.5) ** 2 + (u[:, 2:] ** 2).sum(-1))

    mode = torch.tensor([0.0, -b, 0.0, 0.0], dtype=F64)
    scale = torch.diag(torch.tensor([1.0, 0.5, 1.0, 1.0], dtype=F64))
    u, _, diag = tempered_smc(target, mode, scale, n_particles=4000,
                              generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert diag.is_converged
    # The curvature: mean of u1 is 0 (not the mode's -b), its sd sqrt(0.25 + 2 b^2).
    assert u[:, 1].mean().item() == pytest.approx(exact[:, 1].mean().item(), abs=0.1)
    assert u[:, 1].std().item() == pytest.approx(exact[:, 1].std().item(), rel=0.15)
    assert torch.corrcoef(torch.stack([u[:, 0] ** 2, u[:, 1]]))[0, 1].item() == pytest.approx(
        torch.corrcoef(torch.stack([exact[:, 0] ** 2, exact[:, 1]]))[0, 1].item(), abs=0.05
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_particles": 5}, "n_particles >= 2 D = 6"),
        ({"n_moves": 1}, "n_moves >= 2"),
        ({"ess_fraction": 1.0}, "ess_fraction must be in"),
        ({"nu": 2.5}, "nu must be a positive integer"),
    ],
)
def test_tempered_smc_rejects_bad_settings(kwargs, match):
    target = _gaussian(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64))
    with pytest.raises(ValueError, match=match):
        tempered_smc(target, torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64), **kwargs)


def test_tempered_smc_refuses_a_target_it_cannot_reach():
    def nowhere(u):
        return torch.full(u.shape[:1], -math.inf, dtype=u.dtype)

    with pytest.raises(ValueError, match="not finite at any proposal draw"):
        tempered_smc(nowhere, torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    far = _gaussian(torch.full((2,), 40.0, dtype=F64), 1e-4 * torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match="no convergence to beta = 1 in 3 temperatures"):
        tempered_smc(far, torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64), max_stages=3)


def test_run_smc_returns_registry_samples_and_is_reproducible(mock, sim):
    obs, _ = mock
    # A start as the flow gives it: samples around the optimizer's answer, not the truth.
    best = optimize_posterior(sim, obs, n_starts=4, n_steps=50, n_polish=1,
                              n_polish_steps=20, generator=torch.Generator().manual_seed(0))  # fmt: skip
    box = box_transform(Prior(dtype=F64))
    init = box.from_u(box.to_u(best[None]) + 0.01 * torch.randn(
        64, len(NAMES), generator=torch.Generator().manual_seed(1), dtype=F64))  # fmt: skip
    kwargs = {"n_particles": 64, "n_moves": 2, "n_final_moves": 2, "n_polish_steps": 20}
    runs = [run_smc(sim, obs, init, generator=torch.Generator().manual_seed(2), **kwargs)
            for _ in range(2)]  # fmt: skip
    _check_record(runs[0].samples, "smc", 64)
    assert torch.equal(runs[0].samples.theta, runs[1].samples.theta)
    with torch.no_grad():
        expect = log_posterior(runs[0].samples.theta, sim, obs, Prior(dtype=F64))
    torch.testing.assert_close(runs[0].samples.log_prob, expect)
    d = runs[0].diagnostics
    assert d.temperatures[0] == 0.0 and d.temperatures[-1] == 1.0
    assert d.wall_time_s > 0 and math.isfinite(d.log_evidence)
    # The mode it centred on beats the optimizer's start it was polished from.
    with torch.no_grad():
        lp = log_posterior(torch.stack([runs[0].start, best]), sim, obs, Prior(dtype=F64))
    assert lp[0] >= lp[1] - 1e-6
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.n_particles = 1


def test_run_smc_rejects_bad_init_samples(mock, sim, centre):
    obs, _ = mock
    with pytest.raises(ValueError, match="init_samples must have shape"):
        run_smc(sim, obs, centre)
    with pytest.raises(ValueError, match="outside the prior box"):
        run_smc(sim, obs, torch.full((4, 21), 50.0, dtype=F64))


# --- fast: the lenstronomy likelihood is lensflow's likelihood ------------------------------


def test_likelihood_mask_drops_the_psf_border(mock):
    obs, _ = mock
    mask = likelihood_mask(obs, CONFIG)
    pad = psf_pad_pix(CONFIG, psf_kernel=obs.psf)
    assert pad >= 1
    assert mask[:pad].sum() == mask[-pad:].sum() == mask[:, :pad].sum() == 0
    assert mask.sum() == (CONFIG.n_pix - 2 * pad) ** 2


def test_fit_data_pads_the_grid_with_masked_pixels(mock):
    """border="pad": the data sit centred in a grid padded by the PSF's half-width, whose
    extra pixels are masked; every observed pixel (and only those) is used."""
    obs, _ = mock
    obs = dataclasses.replace(obs, mask=obs.mask.clone())
    obs.mask[2:4, 5:9] = False  # a masked blob, as on a real cutout
    pad = psf_pad_pix(CONFIG, psf_kernel=obs.psf)
    kwargs_data, mask = fit_data(obs, CONFIG)
    n = CONFIG.n_pix + 2 * pad
    assert mask.shape == kwargs_data["image_data"].shape == kwargs_data["noise_map"].shape
    assert mask.shape == (n, n) and mask.sum() == int(obs.mask.sum())
    inner = (slice(pad, -pad), slice(pad, -pad))
    np.testing.assert_array_equal(mask[inner], obs.mask.numpy().astype(int))
    np.testing.assert_array_equal(kwargs_data["image_data"][inner], obs.image.numpy())
    np.testing.assert_array_equal(kwargs_data["noise_map"][inner], obs.sigma.numpy())
    assert (kwargs_data["noise_map"] > 0).all()
    # Same pixel centres: the padded grid's pixel (pad, pad) is the data's pixel (0, 0).
    plain, plain_mask = fit_data(obs, CONFIG, "mask")
    scale = CONFIG.pixel_scale_arcsec
    assert kwargs_data["ra_at_xy_0"] + pad * scale == pytest.approx(plain["ra_at_xy_0"])
    assert kwargs_data["dec_at_xy_0"] + pad * scale == pytest.approx(plain["dec_at_xy_0"])
    np.testing.assert_array_equal(plain_mask, likelihood_mask(obs, CONFIG))
    for call in (lambda: fit_data(obs, CONFIG, "crop"),
                 lambda: run_lenstronomy(obs, CONFIG, border="crop")):  # fmt: skip
        with pytest.raises(ValueError, match="border must be one of pad, mask, got 'crop'"):
            call()


@pytest.mark.parity
@pytest.mark.parametrize("border", ["pad", "mask"])
def test_lenstronomy_likelihood_at_truth_equals_lensflow_likelihood(mock, border):
    # The FittingSequence's likelihood (noise map, PSF, mask, supersampling as configured)
    # at the true non-linear parameters is -chi2/2 at lenstronomy's solved amplitudes;
    # lensflow's chi2 with those amplitudes must agree: on every observed pixel (a masked
    # blob included) with border="pad", on the edge-masked ones with border="mask".
    obs, theta = mock
    obs = dataclasses.replace(obs, mask=obs.mask.clone())
    obs.mask[2:4, 5:9] = False
    fs = fitting_sequence(obs, CONFIG, border=border)
    kw = to_lenstronomy(theta)
    lists = {"kwargs_lens": kw.kwargs_lens, "kwargs_source": kw.kwargs_source,
             "kwargs_lens_light": kw.kwargs_lens_light}  # fmt: skip
    log_like = fs.likelihood_class.logL(fs.param_class.kwargs2args(**lists))
    _, amplitudes = fs.likelihood_class.image_likelihood.logL(**lists)
    theta_solved = theta.clone()
    theta_solved[index("source_amp")] = float(amplitudes[0])
    theta_solved[index("lens_light_amp")] = float(amplitudes[1])
    mask = obs.mask if border == "pad" else torch.from_numpy(likelihood_mask(obs, CONFIG) > 0)
    sim = LensSimulator(CONFIG, dtype=F64)
    chi2_lensflow = chi2(sim(theta_solved), obs.image, obs.sigma, mask)
    # Image parity is <= 5e-6 of peak (tests/test_parity.py); at S/N ~ 100 per pixel that
    # moves chi2 (~ n_pix = 144) by < 1e-2. The solved amplitudes are within ~1 sigma.
    expected = torch.tensor(float(log_like), dtype=F64)
    torch.testing.assert_close(-0.5 * chi2_lensflow, expected, rtol=0, atol=1e-2)
    assert abs(float(amplitudes[0]) / TRUTH["source_amp"] - 1) < 0.1


# --- slow: recovery of the truth ------------------------------------------------------------

#: Parameters whose 95% interval must cover the truth (theta_E and the best-measured ones).
KEY_PARAMS = ("lens_theta_e", "lens_center_x", "lens_center_y", "source_center_x",
              "lens_light_r_sersic")  # fmt: skip


def _covers(samples: PosteriorSamples, theta: torch.Tensor) -> dict[str, bool]:
    lo, hi = samples.quantiles([0.025, 0.975])
    return {n: bool(lo[index(n)] <= theta[index(n)] <= hi[index(n)]) for n in KEY_PARAMS}


@pytest.mark.slow
def test_run_emcee_recovers_the_truth(sim):
    obs, theta = mock_observation(noise=0.02)
    result = run_emcee(sim, obs, n_walkers=64, n_steps=1500, n_burn=1500,
                       generator=torch.Generator().manual_seed(0),
                       rng=np.random.default_rng(0))  # fmt: skip
    covered = _covers(result.samples, theta)
    assert all(covered.values()), (covered, result.diagnostics)


@pytest.mark.slow
def test_run_nuts_recovers_the_truth(sim):
    obs, theta = mock_observation(noise=0.02)
    result = run_nuts(sim, obs, n_samples=100, n_warmup=100, n_chains=2, max_tree_depth=5,
                      generator=torch.Generator().manual_seed(0))  # fmt: skip
    covered = _covers(result.samples, theta)
    assert all(covered.values()), (covered, result.diagnostics)


@pytest.mark.slow
def test_run_smc_recovers_the_truth(sim):
    obs, theta = mock_observation(noise=0.02)
    # Started as users start it: around the broad-start optimizer's answer.
    best = optimize_posterior(sim, obs, generator=torch.Generator().manual_seed(0))
    box = box_transform(Prior(dtype=F64))
    init = box.from_u(box.to_u(best[None]) + 0.01 * torch.randn(
        256, len(NAMES), generator=torch.Generator().manual_seed(1), dtype=F64))  # fmt: skip
    result = run_smc(sim, obs, init, n_particles=2000,
                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert result.diagnostics.is_converged, result.diagnostics
    covered = _covers(result.samples, theta)
    assert all(covered.values()), (covered, result.diagnostics)


@pytest.mark.slow
def test_run_lenstronomy_recovers_the_truth(sim):
    # The PSO is centred on optimize_posterior's result from broad starts (bench's
    # lt_start_optimizer=1). From the box centre, the 200 x 400 PSO on this mock's
    # whole-image likelihood (border="pad") ended 76,000-95,000 nats below the truth for
    # seeds 0, 1 and 2 (docs/baselines.md).
    obs, theta = mock_observation(noise=0.02)
    start = optimize_posterior(sim, obs, generator=torch.Generator().manual_seed(0))
    result = run_lenstronomy(obs, CONFIG, n_particles=200, n_iterations=400, n_walkers=64,
                             n_run=1000, n_burn=500, start=start,
                             rng=np.random.default_rng(0))  # fmt: skip
    covered = _covers(result.samples, theta)
    assert all(covered.values()), (covered, result.diagnostics)
