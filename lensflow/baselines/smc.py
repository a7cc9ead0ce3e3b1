"""Baseline stage: tempered sequential Monte Carlo on lensflow's caustics likelihood.

A per-lens refinement that starts where the amortized flow leaves off. The flow's samples
lie in the right mode but are wider than the data-limited posterior on bright lenses
(docs/benchmarks.md: 5-10x in every lens parameter on demo_01), and an emcee chain started
there needs about 50 autocorrelation times of 400-1,400 steps to converge. This module
instead:

1. polishes the best flow samples to the posterior mode with L-BFGS and takes the Hessian
   there (a Laplace approximation);
2. draws ``n_particles`` from a multivariate Student-t ``q`` with that centre and scale (in
   the prior box's unconstrained space ``u``, where the density carries the log-Jacobian);
3. moves them to the posterior ``pi`` along the bridge ``q^(1 - beta) pi^beta``, choosing
   each next ``beta`` so that the reweighting keeps an effective sample size of
   ``ess_fraction * n_particles`` (adaptive tempering), resampling (systematic), then
   ``n_moves`` Metropolis sweeps that alternate a random walk with the particles' own
   covariance (its scale tuned towards 25% acceptance) and an independent draw from a
   Student-t fitted to the particles (mean and 1.2 x their covariance);
   ``n_final_moves`` more sweeps at ``beta = 1``.

The moves handle what the Gaussian cannot: the posterior is curved in the source's Sersic
amplitude, radius and index, where importance weights from a Gaussian or t are
heavy-tailed (``scripts/refine_probe.py``). They do so only partly on strongly curved
targets: on the banana of ``tests/test_baselines.py`` the particles' spread along the curve
is 6-17% short of the exact one after the default sweeps (an HMC move, tried in its place,
was no better there for 3.4 times the cost). Every sweep is one batched likelihood call
over all particles, as emcee's vectorized step is over its walkers.

The run also yields the log evidence ``log Z = log int pi(u) du`` of the model (the sum of
the log mean incremental weights over the temperatures; Del Moral et al. 2006), in the
units of ``log_posterior``: Prior.log_prob plus ``LensSimulator.log_likelihood``.

References:
    Del Moral, Doucet & Jasra 2006, "Sequential Monte Carlo samplers", JRSS B 68, 411.
    Jasra, Stephens, Doucet & Tsagaris 2011, "Inference for Levy-driven stochastic
    volatility models via adaptive sequential Monte Carlo", Scand. J. Stat. 38, 1.
    Chopin & Papaspiliopoulos 2020, "An Introduction to Sequential Monte Carlo", Springer.
"""

from __future__ import annotations

__all__ = [
    "SmcDiagnostics",
    "SmcResult",
    "run_smc",
    "student_t_log_density",
    "tempered_smc",
]

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lensflow.baselines.mcmc import _laplace_scale, _log_posterior_u, _polish, _setup
from lensflow.observation import Observation
from lensflow.params import NAMES
from lensflow.prior import Prior
from lensflow.sampling import PosteriorSamples
from lensflow.simulator import LensSimulator

#: Target acceptance of the random-walk sweeps (Roberts, Gelman & Gilks 1997).
_RW_ACCEPTANCE = 0.25

#: Scale of the independence proposal over the particles' covariance (heavier than the
#: population, so its ratio to the target stays bounded in the tails).
_R_INFLATE = 1.2


def student_t_log_density(u: Tensor, mean: Tensor, scale: Tensor, nu: float) -> Tensor:
    """Normalized multivariate Student-t log density.

    Args:
        u: Points, shape ``(N, D)``.
        mean: Location, shape ``(D,)``.
        scale: Scale matrix ``S`` (the t's shape matrix is ``S S^T``), shape ``(D, D)``,
            invertible.
        nu: Degrees of freedom, > 0.

    Returns:
        ``log t_nu(u; mean, S S^T)``, shape ``(N,)``.

    Example:
        >>> import torch
        >>> u = torch.zeros(1, 2, dtype=torch.float64)
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> round(float(student_t_log_density(u, u[0], eye, 1e8)[0]), 6)  # ~ N(0, I) at 0
        -1.837877
    """
    d = u.shape[-1]
    z = torch.linalg.solve(scale, (u - mean).T).T
    const = (
        math.lgamma(0.5 * (nu + d))
        - math.lgamma(0.5 * nu)
        - 0.5 * d * math.log(nu * math.pi)
        - float(torch.linalg.slogdet(scale)[1])
    )
    return const - 0.5 * (nu + d) * torch.log1p((z**2).sum(-1) / nu)


def _draw_t(mean: Tensor, scale: Tensor, nu: int, n: int, g: torch.Generator) -> Tensor:
    """``n`` draws ``(n, D)`` from the Student-t of :func:`student_t_log_density`.

    The chi-square variate is a sum of ``nu`` squared normals, so every draw comes from
    ``g`` (torch's gamma sampler takes no generator); hence an integer ``nu``.
    """
    d = mean.numel()
    z = torch.randn(n, d + nu, generator=g, dtype=mean.dtype).to(mean.device)
    w = (z[:, d:] ** 2).sum(1)
    return mean + (z[:, :d] / torch.sqrt(w / nu)[:, None]) @ scale.T


def _systematic(w: Tensor, g: torch.Generator) -> Tensor:
    """Indices ``(N,)`` of a systematic resample of normalized weights ``w`` ``(N,)``."""
    n = w.numel()
    offset = torch.rand((), generator=g, dtype=torch.float64).to(w)
    pos = (offset + torch.arange(n, dtype=w.dtype, device=w.device)) / n
    return torch.searchsorted(torch.cumsum(w, 0), pos).clamp_max(n - 1)


@dataclass(frozen=True)
class SmcDiagnostics:
    """What a tempered SMC run did.

    Attributes:
        n_particles: Particles (equally weighted at the end).
        temperatures: The ``beta`` of each stage, from 0 to 1.
        rw_acceptance: Mean random-walk acceptance at each stage after 0.
        independent_acceptance: Mean acceptance of the independent ``q`` draws per stage.
        target_evaluations: Log-posterior evaluations in all (particles x sweeps).
        unique_fraction: Fraction of distinct particles at the end (1 when every duplicate
            of the last resampling has moved).
        moves_per_particle: Mean accepted moves per particle at ``beta = 1``.
        log_evidence: ``log Z`` of the target, in the units of its log density.
        wall_time_s: Wall time of the run, s.
        is_converged: The run reached ``beta = 1``, every particle is distinct, and each
            accepted at least 3 moves on average at ``beta = 1``. A sanity flag, not a
            proof: the benchmark measures agreement with converged MCMC (C2ST).
    """

    n_particles: int
    temperatures: tuple[float, ...]
    rw_acceptance: tuple[float, ...]
    independent_acceptance: tuple[float, ...]
    target_evaluations: int
    unique_fraction: float
    moves_per_particle: float
    log_evidence: float
    wall_time_s: float
    is_converged: bool


def tempered_smc(
    target: Callable[[Tensor], Tensor],
    mean: Tensor,
    scale: Tensor,
    *,
    nu: int = 10,
    n_particles: int = 2000,
    n_moves: int = 10,
    n_final_moves: int = 20,
    ess_fraction: float = 0.5,
    max_stages: int = 100,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, SmcDiagnostics]:
    """Adaptive tempered SMC from a Student-t proposal to an unnormalized log density.

    Args:
        target: Unnormalized log density, ``(N, D) -> (N,)``; ``-inf`` or NaN where zero.
        mean: Proposal centre, shape ``(D,)`` (e.g. the target's mode).
        scale: Proposal scale ``S``, shape ``(D, D)`` (e.g. the inverse Hessian's square
            root).
        nu: Proposal degrees of freedom, a positive integer.
        n_particles: Particles (>= 2 D).
        n_moves: Metropolis sweeps after each reweighting (>= 2): a random walk with the
            particles' covariance and an independent draw from a Student-t fitted to the
            particles alternate.
        n_final_moves: Further sweeps at ``beta = 1`` (>= 0).
        ess_fraction: Conditional effective sample size kept at each reweighting, in (0, 1).
        max_stages: Refuse to run more temperatures than this (the proposal is then too
            far from the target to be useful).
        generator: Torch CPU generator for every random draw.

    Returns:
        Particles ``(N, D)``, their target log densities ``(N,)``, and diagnostics.

    Raises:
        ValueError: For bad settings, a non-finite target at every proposal draw, or more
            than ``max_stages`` temperatures.

    Example:
        >>> import torch
        >>> target = lambda u: -0.5 * ((u - 1.0) ** 2).sum(-1) / 0.25  # N(1, 0.5^2 I)
        >>> u, _, d = tempered_smc(target, torch.zeros(2, dtype=torch.float64),
        ...                        torch.eye(2, dtype=torch.float64), n_particles=400,
        ...                        generator=torch.Generator().manual_seed(0))
        >>> bool((u.mean(0) - 1).abs().max() < 0.1), d.temperatures[-1]
        (True, 1.0)
        >>> abs(d.log_evidence - math.log(2 * math.pi * 0.25)) < 0.1  # Z = 2 pi sigma^2
        True
    """
    d = mean.numel()
    if n_particles < 2 * d or n_moves < 2 or n_final_moves < 0:
        raise ValueError(f"need n_particles >= 2 D = {2 * d}, n_moves >= 2 and "
                         f"n_final_moves >= 0; got {n_particles}, {n_moves}, "
                         f"{n_final_moves}")  # fmt: skip
    if not 0.0 < ess_fraction < 1.0:
        raise ValueError(f"ess_fraction must be in (0, 1), got {ess_fraction}")
    if int(nu) != nu or nu < 1:
        raise ValueError(f"nu must be a positive integer, got {nu}")
    nu = int(nu)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n = n_particles
    start = time.perf_counter()

    def log_pi(u: Tensor) -> Tensor:
        return torch.nan_to_num(target(u), nan=-math.inf, posinf=-math.inf, neginf=-math.inf)

    u = _draw_t(mean, scale, nu, n, g)
    log_q, log_p = student_t_log_density(u, mean, scale, nu), log_pi(u)
    if not torch.isfinite(log_p).any():
        raise ValueError("the target is not finite at any proposal draw")
    evals, beta, step, log_z = n, 0.0, 2.38 / math.sqrt(d), 0.0
    betas, acc_rw, acc_ind = [0.0], [], []
    accepted = torch.zeros(n, device=u.device)
    while beta < 1.0:
        if len(betas) > max_stages:
            raise ValueError(f"no convergence to beta = 1 in {max_stages} temperatures "
                             f"(at beta = {beta:.3g}): the proposal is far from the target")  # fmt: skip
        delta = log_p - log_q  # -inf where the target is zero

        def ess(b: float, beta: float = beta, delta: Tensor = delta) -> float:
            w = torch.softmax((b - beta) * delta, 0)
            return float(1.0 / (w**2).sum())

        if ess(1.0) >= ess_fraction * n:
            new = 1.0
        else:  # bisection on the conditional ESS, a decreasing function of beta
            lo, hi = beta, 1.0
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if ess(mid) >= ess_fraction * n else (lo, mid)
            new = max(lo, beta + 1e-12)
        inc = (new - beta) * delta
        log_z += float(torch.logsumexp(inc, 0)) - math.log(n)
        w = torch.softmax(inc, 0)
        beta = new
        betas.append(beta)
        idx = _systematic(w, g)
        u, log_q, log_p = u[idx], log_q[idx], log_p[idx]
        final = beta >= 1.0
        sweeps = n_moves + (n_final_moves if final else 0)
        rw, ind = [], []
        for k in range(sweeps):
            if k % 2 == 0:  # random walk with the particles' covariance
                cov = torch.cov(u.T) + 1e-12 * torch.eye(d, dtype=u.dtype, device=u.device)
                chol = torch.linalg.cholesky(cov)
                eps = torch.randn(n, d, generator=g, dtype=u.dtype).to(u.device)
                prop = u + step * eps @ chol.T
            else:  # an independent draw from a t fitted to the particles
                r_mean = u.mean(0)
                r_scale = _R_INFLATE * torch.linalg.cholesky(
                    torch.cov(u.T) + 1e-12 * torch.eye(d, dtype=u.dtype, device=u.device)
                )
                prop = _draw_t(r_mean, r_scale, nu, n, g)
            lq, lp = student_t_log_density(prop, mean, scale, nu), log_pi(prop)
            evals += n
            # The bridge q^(1-beta) pi^beta; the independent proposal divides by r.
            log_a = (1 - beta) * (lq - log_q) + beta * (lp - log_p)
            if k % 2 == 1:
                log_a = log_a - (
                    student_t_log_density(prop, r_mean, r_scale, nu)
                    - student_t_log_density(u, r_mean, r_scale, nu)
                )
            log_a = torch.nan_to_num(log_a, nan=-math.inf, neginf=-math.inf)
            u_rand = torch.rand(n, generator=g, dtype=u.dtype).to(u.device)
            ok = u_rand.log() < log_a
            u = torch.where(ok[:, None], prop, u)
            log_q, log_p = torch.where(ok, lq, log_q), torch.where(ok, lp, log_p)
            rate = float(ok.double().mean())
            if final:
                accepted += ok
            if k % 2 == 0:
                rw.append(rate)
                step *= math.exp(rate - _RW_ACCEPTANCE)
            else:
                ind.append(rate)
        acc_rw.append(sum(rw) / len(rw))
        acc_ind.append(sum(ind) / len(ind))
    unique = torch.unique(u, dim=0).shape[0] / n
    moves = float(accepted.mean())
    diagnostics = SmcDiagnostics(
        n_particles=n, temperatures=tuple(betas), rw_acceptance=tuple(acc_rw),
        independent_acceptance=tuple(acc_ind), target_evaluations=evals,
        unique_fraction=unique, moves_per_particle=moves, log_evidence=log_z,
        wall_time_s=time.perf_counter() - start,
        is_converged=bool(betas[-1] >= 1.0 and unique >= 0.999 and moves >= 3.0),
    )  # fmt: skip
    return u, log_p, diagnostics


@dataclass(frozen=True)
class SmcResult:
    """Samples and diagnostics of :func:`run_smc`.

    Attributes:
        samples: The particles, ``method="smc"``, ``log_prob`` the unnormalized log
            posterior of ``baselines.mcmc.log_posterior`` (physical ``theta``).
        diagnostics: Temperatures, acceptance, evidence, wall time.
        start: The posterior mode the proposal was centred on, physical ``theta`` ``(D,)``.
    """

    samples: PosteriorSamples
    diagnostics: SmcDiagnostics
    start: Tensor


def run_smc(
    simulator: LensSimulator,
    observation: Observation,
    init_samples: Tensor,
    *,
    prior: Prior | None = None,
    n_particles: int = 2000,
    n_moves: int = 10,
    n_final_moves: int = 20,
    ess_fraction: float = 0.5,
    nu: int = 10,
    n_starts: int = 4,
    n_polish_steps: int = 200,
    chunk: int = 500,
    generator: torch.Generator | None = None,
) -> SmcResult:
    """Tempered SMC on lensflow's likelihood, from a Laplace fit at the flow's best samples.

    Args:
        simulator: The forward model (float64 recommended), on CPU or GPU; its grid, PSF
            and supersampling must be the observation's.
        observation: Image, noise map and mask; cast to the simulator's dtype and device.
        init_samples: Samples that locate the mode, physical ``theta`` ``(K, D)`` inside the
            prior box (e.g. the flow's posterior; at most 2,000 are scored).
        prior: Prior (default: the registry's default prior).
        n_particles: Particles, i.e. samples returned.
        n_moves: Metropolis sweeps per temperature (see :func:`tempered_smc`).
        n_final_moves: Further sweeps at ``beta = 1``.
        ess_fraction: Effective sample size kept at each reweighting.
        nu: Degrees of freedom of the Student-t proposal (a positive integer).
        n_starts: Best-scoring ``init_samples`` polished by L-BFGS; the best end is the mode.
        n_polish_steps: L-BFGS iterations per start.
        chunk: Particles per batched simulator call (memory).
        generator: Torch CPU generator for every random draw.

    Returns:
        Samples (``method="smc"``), diagnostics and the mode.

    Raises:
        ValueError: For mismatched observation/simulator grids, ``init_samples`` of the
            wrong shape or outside the prior box, or bad SMC settings.
        TypeError: If ``simulator`` or ``observation`` has the wrong type.
    """
    prior, obs, box = _setup(simulator, observation, prior)
    theta0 = torch.as_tensor(init_samples, dtype=prior.low.dtype, device=prior.low.device)
    if theta0.ndim != 2 or theta0.shape[1] != len(NAMES) or theta0.shape[0] < 1:
        raise ValueError(f"init_samples must have shape (K, {len(NAMES)}), got "
                         f"{tuple(theta0.shape)}")  # fmt: skip
    if not torch.isfinite(prior.log_prob(theta0)).all():
        raise ValueError("some init_samples lie outside the prior box")
    if n_starts < 1 or chunk < 1:
        raise ValueError(f"need n_starts >= 1 and chunk >= 1, got {n_starts}, {chunk}")
    t0 = time.perf_counter()

    def density(u: Tensor) -> Tensor:  # log posterior in u, with the log-Jacobian
        return _log_posterior_u(u, box, simulator, obs, prior)

    def target(u: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([density(c) for c in u.split(chunk)])

    pick = torch.linspace(0, theta0.shape[0] - 1, min(2000, theta0.shape[0])).long()
    u0 = box.to_u(theta0[pick])
    logp0 = torch.nan_to_num(target(u0), nan=-math.inf, neginf=-math.inf)
    best = [u0[i] for i in logp0.argsort(descending=True)[:n_starts]]
    ends = torch.stack([_polish(b, density, n_polish_steps) for b in best])
    mode = ends[torch.nan_to_num(target(ends), nan=-math.inf, neginf=-math.inf).argmax()]
    scale = _laplace_scale(mode, density).to(mode)
    u, log_p, diag = tempered_smc(
        target, mode, scale, nu=nu, n_particles=n_particles, n_moves=n_moves,
        n_final_moves=n_final_moves, ess_fraction=ess_fraction, generator=generator,
    )  # fmt: skip
    diag = dataclasses.replace(diag, wall_time_s=time.perf_counter() - t0)
    theta = box.from_u(u)
    samples = PosteriorSamples(
        theta=theta.detach().cpu(), names=NAMES,
        log_prob=(log_p + box.log_abs_det(theta)).detach().cpu(), method="smc",
    )  # fmt: skip
    return SmcResult(samples=samples, diagnostics=diag, start=box.from_u(mode).detach().cpu())
