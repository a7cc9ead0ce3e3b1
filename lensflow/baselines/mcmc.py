"""Baseline stage: MCMC on lensflow's own batched, differentiable caustics likelihood.

Two samplers of the same target, the posterior ``p(theta | x_obs) ∝ Prior.log_prob(theta) *
exp(LensSimulator.log_likelihood(theta, x_obs))``, both with every amplitude sampled (no
linear solve):

* :func:`run_emcee`: emcee's affine-invariant ensemble in physical ``theta``, every walker
  of a step evaluated in one batched simulator call (``vectorize=True``), on the simulator's
  device and dtype (float64 recommended). Convergence: the integrated autocorrelation time
  ``tau`` of each parameter (``emcee.autocorr.integrated_time``, Goodman & Weare 2010 / Sokal
  windowing with ``c = 5``) and the rule ``n_steps >= tol * max(tau)`` with ``tol = 50``.
* :func:`run_nuts`: Pyro's NUTS with a potential function in the standardized unconstrained
  space ``u`` of the *prior box* (an ``UnconstrainedTransform`` whose bounds are the default
  prior's edges, so every ``u`` in R^D has finite density); the density in ``u`` carries the
  log-Jacobian, ``log p(u) = log p(theta) - log|det du/dtheta|``, and NUTS samples the
  whitened ``w`` of ``u = u_start + S w``, ``S`` from the Hessian at the optimizer's end
  point (a fixed Laplace preconditioner; NUTS still adapts its own step size and diagonal
  mass matrix). Chains run one after
  another (no multiprocessing); split R-hat and the effective sample size come from
  ``pyro.ops.stats``.

Both start from :func:`optimize_posterior`: Adam in ``u`` on the autograd gradient, from the
prior-box centre and a few prior draws (never from the truth).

Randomness: torch ``generator=`` for the optimizer starts and walker balls, ``rng=``
(numpy) for emcee's moves; Pyro draws from torch's global generator, which
:func:`run_nuts` forks and seeds from ``generator`` so the caller's state is untouched.

References:
    Foreman-Mackey et al. 2013, "emcee: The MCMC Hammer", PASP 125, 306.
    Hoffman & Gelman 2014, "The No-U-Turn Sampler", JMLR 15, 1593.
    Bingham et al. 2019, "Pyro: Deep Universal Probabilistic Programming", JMLR 20, 1.
    Vehtari et al. 2021, "Rank-normalization, folding, and localization: an improved
    R-hat", Bayesian Analysis 16, 667.
"""

from __future__ import annotations

__all__ = [
    "EmceeResult",
    "EnsembleDiagnostics",
    "NutsDiagnostics",
    "NutsResult",
    "box_transform",
    "ensemble_diagnostics",
    "log_posterior",
    "optimize_posterior",
    "run_emcee",
    "run_nuts",
]

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lensflow.observation import Observation
from lensflow.params import NAMES, UnconstrainedTransform
from lensflow.prior import Prior
from lensflow.sampling import PosteriorSamples
from lensflow.simulator import LensSimulator

try:
    import emcee
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "lensflow.baselines.mcmc needs emcee; install the baselines extra with "
        "`pip install 'lensflow[baselines]'`"
    ) from err

#: Relative pixel-scale mismatch between observation and simulator that is refused.
_SCALE_RTOL = 1e-3


# --- the target -----------------------------------------------------------------------------


def _check_inputs(simulator: LensSimulator, observation: Observation, prior: Prior) -> None:
    if not isinstance(simulator, LensSimulator):
        raise TypeError(f"simulator must be a LensSimulator, got {type(simulator).__name__}")
    if not isinstance(observation, Observation):
        raise TypeError(f"observation must be an Observation, got {type(observation).__name__}")
    if observation.shape != simulator.image_shape:
        raise ValueError(
            f"observation {observation.name!r} has shape {observation.shape} but the "
            f"simulator renders {simulator.image_shape}; build LensSimulator with n_pix="
            f"{observation.shape[0]}"
        )
    scale, sim_scale = observation.pixel_scale_arcsec, simulator.config.pixel_scale_arcsec
    if abs(scale / sim_scale - 1) > _SCALE_RTOL:
        raise ValueError(
            f"observation pixel_scale_arcsec={scale:.6g} differs from the simulator's "
            f"{sim_scale:.6g}"
        )
    if prior.names != NAMES:
        raise ValueError(f"prior parameters {prior.names} differ from params.NAMES")


def _on_simulator(simulator: LensSimulator, observation: Observation) -> Observation:
    """The observation in the simulator's dtype and on its device."""
    return observation.to(dtype=simulator.psf.dtype, device=simulator.psf.device)


def log_posterior(
    theta: Tensor, simulator: LensSimulator, observation: Observation, prior: Prior
) -> Tensor:
    """Unnormalized log posterior, ``Prior.log_prob + LensSimulator.log_likelihood``, batched.

    Rows outside the prior box get ``-inf`` without being simulated (their parameters may be
    unphysical, e.g. a negative radius).

    Args:
        theta: Physical parameters, shape ``(B, D)``, columns ``params.NAMES``, units per
            registry, on the simulator's device.
        simulator: The forward model; its grid must match the observation.
        observation: Image, noise, mask; in the simulator's dtype and device.
        prior: Prior over ``theta``, in the simulator's dtype and device.

    Returns:
        Log posterior up to a constant, shape ``(B,)``.
    """
    log_prior = prior.log_prob(theta)
    inside = torch.isfinite(log_prior)
    centre = 0.5 * (prior.low + prior.high)
    safe = torch.where(inside[:, None], theta, centre.to(theta))
    log_like = simulator.log_likelihood(safe, observation.image, observation.sigma,
                                        observation.mask)  # fmt: skip
    return torch.where(inside, log_prior + log_like, torch.full_like(log_like, -math.inf))


def box_transform(prior: Prior) -> UnconstrainedTransform:
    """The standardized unconstrained map whose image is exactly the prior box.

    Args:
        prior: Prior whose ``[prior_low, prior_high]`` intervals become the bounds.

    Returns:
        ``UnconstrainedTransform`` over specs with ``low = prior_low`` and
        ``high = prior_high`` (a scaled logit in every coordinate, linear space also for
        log-uniform entries; their ``1/theta`` density is in ``Prior.log_prob``).
    """
    return UnconstrainedTransform(
        tuple(dataclasses.replace(p, low=p.prior_low, high=p.prior_high) for p in prior.specs)
    )


def _log_posterior_u(
    u: Tensor,
    transform: UnconstrainedTransform,
    simulator: LensSimulator,
    observation: Observation,
    prior: Prior,
) -> Tensor:
    """Log density of ``u`` (log posterior of ``theta(u)`` plus the log-Jacobian)."""
    theta = transform.from_u(u)
    return log_posterior(theta, simulator, observation, prior) - transform.log_abs_det(theta)


def optimize_posterior(
    simulator: LensSimulator,
    observation: Observation,
    *,
    prior: Prior | None = None,
    n_starts: int = 16,
    n_steps: int = 200,
    lr: float = 0.05,
    n_polish: int = 4,
    n_polish_steps: int = 200,
    generator: torch.Generator | None = None,
    extra_starts: Tensor | None = None,
) -> Tensor:
    """Maximize the posterior density in ``u`` from broad starts (the MCMC initialization).

    Two stages, both on the autograd gradient: Adam on all starts together in one batch
    (the batch loss is a sum, so the starts are independent), then L-BFGS (strong Wolfe line
    search) on each of the ``n_polish`` best Adam end points; the best result wins. The
    starts are the prior-box centre and ``n_starts - 1`` prior draws, never the truth. The
    lens posterior is multimodal from a broad start (on a 16x16 mock, Adam alone from 64
    starts ended 700 to 3300 nats below the best mode in 3 of 4 seeds), hence many starts and
    the polish of several.

    Args:
        simulator: The forward model; grid equal to the observation's.
        observation: The data.
        prior: Prior (default: the registry's default prior in the simulator's dtype).
        n_starts: Number of starts (>= 1).
        n_steps: Adam steps (>= 0).
        lr: Adam learning rate, in units of the prior's standard deviation in ``u``.
        n_polish: Adam end points refined by L-BFGS (0 skips the polish).
        n_polish_steps: L-BFGS iterations per polished point.
        generator: Torch generator (CPU) for the prior-draw starts.
        extra_starts: Optional further starts, physical ``theta`` of shape ``(K, D)``
            inside the prior box (e.g. samples of an amortized posterior), optimized with
            the broad ones.

    Returns:
        Best physical ``theta``, shape ``(D,)``, inside the prior box.

    Raises:
        ValueError: For mismatched shapes, ``n_starts < 1`` or negative step counts, or
            when no start reaches a finite posterior.
    """
    prior, obs, transform = _setup(simulator, observation, prior)
    if n_starts < 1 or min(n_steps, n_polish, n_polish_steps) < 0:
        raise ValueError(
            f"need n_starts >= 1 and non-negative step counts, got n_starts={n_starts}, "
            f"n_steps={n_steps}, n_polish={n_polish}, n_polish_steps={n_polish_steps}"
        )
    target = lambda u: _log_posterior_u(u, transform, simulator, obs, prior)
    centre = 0.5 * (prior.low + prior.high)
    draws = Prior(prior.specs, dtype=torch.float64).sample((n_starts - 1,), generator=generator)
    starts = [centre[None], draws.to(centre)]
    if extra_starts is not None:
        starts.append(torch.as_tensor(extra_starts).to(centre).reshape(-1, centre.shape[0]))
    u = transform.to_u(torch.cat(starts)).detach().requires_grad_()
    optimizer = torch.optim.Adam([u], lr=lr)
    for _ in range(n_steps):
        optimizer.zero_grad()
        (-target(u).sum()).backward()
        optimizer.step()
    with torch.no_grad():
        logp = torch.nan_to_num(target(u), nan=-math.inf, neginf=-math.inf)
    candidates = [u[i].detach() for i in logp.argsort(descending=True)[: max(1, n_polish)]]
    if n_polish > 0 and n_polish_steps > 0:
        candidates = [_polish(c, target, n_polish_steps) for c in candidates]
    with torch.no_grad():
        logp = torch.nan_to_num(target(torch.stack(candidates)), nan=-math.inf, neginf=-math.inf)
    if not torch.isfinite(logp).any():
        raise ValueError("no optimizer start reached a finite log posterior")
    return transform.from_u(candidates[int(logp.argmax())]).detach()


def _polish(u: Tensor, target: Callable[[Tensor], Tensor], n_steps: int) -> Tensor:
    """L-BFGS from ``u`` ``(D,)`` on ``-target``; returns the start if it ends non-finite."""
    v = u.clone().requires_grad_()
    optimizer = torch.optim.LBFGS([v], lr=1.0, max_iter=n_steps, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)  # fmt: skip

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = -target(v[None])[0]
        loss.backward()
        return loss

    optimizer.step(closure)
    return v.detach() if bool(torch.isfinite(v).all()) else u


def _setup(
    simulator: LensSimulator, observation: Observation, prior: Prior | None
) -> tuple[Prior, Observation, UnconstrainedTransform]:
    """Default prior, checked inputs, observation on the simulator, box transform."""
    device, dtype = simulator.psf.device, simulator.psf.dtype
    prior = prior if prior is not None else Prior(dtype=dtype, device=device)
    _check_inputs(simulator, observation, prior)
    return prior, _on_simulator(simulator, observation), box_transform(prior)


def _initial_theta(
    init: Tensor | None,
    simulator: LensSimulator,
    observation: Observation,
    prior: Prior,
    n_opt_steps: int,
    generator: torch.Generator | None,
) -> Tensor:
    if init is None:
        return optimize_posterior(simulator, observation, prior=prior, n_steps=n_opt_steps,
                                  generator=generator)  # fmt: skip
    init = torch.as_tensor(init, dtype=prior.low.dtype, device=prior.low.device)
    if init.shape != (len(NAMES),):
        raise ValueError(f"init must have shape ({len(NAMES)},), got {tuple(init.shape)}")
    if not torch.isfinite(prior.log_prob(init)):
        raise ValueError("init lies outside the prior box")
    return init


def _ball(
    theta: Tensor,
    n: int,
    scale: float,
    transform: UnconstrainedTransform,
    generator: torch.Generator | None,
) -> Tensor:
    """``n`` points in a Gaussian ball of standard deviation ``scale`` in ``u``, as theta."""
    u = transform.to_u(theta[None])
    eps = torch.randn((n, u.shape[-1]), generator=generator, dtype=torch.float64)
    return transform.from_u(u + scale * eps.to(u))


# --- emcee ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnsembleDiagnostics:
    """Convergence of an ensemble (emcee) run.

    Attributes:
        tau: Integrated autocorrelation time per parameter, in steps, shape ``(D,)``,
            columns ``params.NAMES``; estimated with emcee's windowing (``c = 5``) on the
            post-burn-in chain (on a thinned copy for ``run_lenstronomy(max_samples=)``,
            still in steps of the full chain).
        n_steps: Steps per walker after burn-in (the chain the samples come from; they may
            be every ``k``-th step of it, see ``run_lenstronomy(max_samples=)``).
        n_burn: Discarded burn-in steps per walker.
        n_walkers: Number of walkers.
        acceptance_fraction: Mean fraction of accepted proposals over walkers.
        tol: Required chain length in units of ``max(tau)``.
        is_converged: ``n_steps >= tol * max(tau)`` and every ``tau`` finite.
        wall_time_s: Wall time of burn-in plus sampling, in seconds.
        time_limited: True when ``run_emcee``'s ``max_wall_s`` ended the chain before the
            requested ``n_steps`` (``n_steps`` is then the steps actually kept).
    """

    tau: Tensor
    n_steps: int
    n_burn: int
    n_walkers: int
    acceptance_fraction: float
    tol: float
    is_converged: bool
    wall_time_s: float
    time_limited: bool = False

    @property
    def time_per_step_s(self) -> float:
        """Wall time per ensemble step (all walkers), in seconds."""
        return self.wall_time_s / max(1, self.n_steps + self.n_burn)

    @property
    def n_effective(self) -> float:
        """Effective sample count, ``n_steps * n_walkers / max(tau)``."""
        return self.n_steps * self.n_walkers / float(self.tau.max())


def ensemble_diagnostics(
    chain: np.ndarray,
    *,
    n_burn: int,
    acceptance_fraction: float,
    tol: float,
    wall_time_s: float,
    time_limited: bool = False,
    thin: int = 1,
    n_run: int | None = None,
) -> EnsembleDiagnostics:
    """Autocorrelation diagnostics of a post-burn-in ensemble chain.

    Args:
        chain: Positions, shape ``(n_steps, n_walkers, D)``.
        n_burn: Burn-in steps that were discarded before ``chain``.
        acceptance_fraction: Mean acceptance fraction.
        tol: Required ``n_steps / max(tau)``.
        wall_time_s: Wall time of the run, seconds.
        time_limited: Whether a wall-time limit cut the chain short.
        thin: ``chain`` holds every ``thin``-th step of the run (steps 0, thin, 2 thin, ...):
            ``tau`` is returned in steps of the full run (the thinned estimate times
            ``thin``).
        n_run: Post-burn-in steps of the full run (default ``thin * len(chain)``); the
            convergence rule and ``n_steps`` use it.

    Returns:
        The diagnostics record.
    """
    if thin < 1:
        raise ValueError(f"thin must be >= 1, got {thin}")
    n_kept, n_walkers, _ = chain.shape
    n_steps = n_kept * thin if n_run is None else n_run
    if not (n_kept - 1) * thin < n_steps <= n_kept * thin:
        raise ValueError(f"a chain of {n_kept} steps thinned by {thin} cannot be {n_steps} long")
    # tol=0: always return the estimate; the tol rule is applied below, as emcee does.
    with np.errstate(invalid="ignore", divide="ignore"):
        # A walker that never moved has a zero autocovariance: tau is NaN, not converged.
        tau = thin * emcee.autocorr.integrated_time(chain, c=5, tol=0, quiet=True)
    is_converged = bool(np.all(np.isfinite(tau)) and n_steps >= tol * np.max(tau))
    return EnsembleDiagnostics(
        tau=torch.from_numpy(np.asarray(tau, dtype=np.float64)),
        n_steps=int(n_steps),
        n_burn=int(n_burn),
        n_walkers=int(n_walkers),
        acceptance_fraction=float(acceptance_fraction),
        tol=float(tol),
        is_converged=is_converged,
        wall_time_s=float(wall_time_s),
        time_limited=bool(time_limited),
    )


@dataclass(frozen=True)
class EmceeResult:
    """Samples and convergence of :func:`run_emcee`.

    Attributes:
        samples: Post-burn-in chain, flattened step-major (``N = n_steps * n_walkers``),
            ``method="emcee"``, ``log_prob`` the unnormalized log posterior.
        diagnostics: Autocorrelation times, acceptance, convergence flag, wall time.
        start: The optimizer's end point the walkers started around, shape ``(D,)``.
    """

    samples: PosteriorSamples
    diagnostics: EnsembleDiagnostics
    start: Tensor


def run_emcee(
    simulator: LensSimulator,
    observation: Observation,
    *,
    prior: Prior | None = None,
    n_walkers: int = 64,
    n_steps: int = 2000,
    n_burn: int = 500,
    tol: float = 50.0,
    init: Tensor | None = None,
    init_scale: float = 1e-3,
    init_walkers: Tensor | None = None,
    n_opt_steps: int = 200,
    use_progress: bool = False,
    max_wall_s: float | None = None,
    generator: torch.Generator | None = None,
    rng: np.random.Generator | None = None,
) -> EmceeResult:
    """emcee on lensflow's likelihood, all walkers in one batched simulator call per step.

    Args:
        simulator: The forward model (float64 recommended), on CPU or GPU; its grid, PSF
            and supersampling must be the observation's.
        observation: Image, noise map and mask; cast to the simulator's dtype and device.
        prior: Prior (default: the registry's default prior).
        n_walkers: Walkers (even, >= 2 D).
        n_steps: Kept steps per walker after burn-in (>= 1).
        n_burn: Discarded burn-in steps (>= 0).
        tol: Convergence rule ``n_steps >= tol * max(tau)`` (emcee recommends 50).
        init: Optional start, physical ``theta`` of shape ``(D,)``; default: the end point
            of :func:`optimize_posterior`.
        init_scale: Standard deviation of the walkers' initial ball in ``u`` (prior units).
        init_walkers: Optional start of every walker, physical ``theta`` of shape
            ``(n_walkers, D)``, e.g. distinct samples of an amortized posterior (replaces
            ``init`` and the optimizer; ``start`` is then their median).
        n_opt_steps: Adam steps of :func:`optimize_posterior` when ``init`` is None.
        use_progress: Show emcee's progress bar.
        max_wall_s: Optional wall-time limit of burn-in plus sampling, in seconds. The
            burn-in always completes; the chain then stops at the first step past the limit
            (keeping at least one), ``diagnostics.time_limited`` is set and
            ``diagnostics.n_steps`` counts the steps kept. The convergence rule is applied
            to the chain actually run. None: run all ``n_burn + n_steps`` steps.
        generator: Torch generator for the optimizer starts and the initial ball.
        rng: numpy generator seeding emcee's moves.

    Returns:
        Samples (``method="emcee"``) and diagnostics.

    Raises:
        ValueError: For mismatched observation/simulator grids, bad counts, an ``init``
            outside the prior, or a non-finite initial log posterior.
        TypeError: If ``simulator`` or ``observation`` has the wrong type.
    """
    prior, obs, transform = _setup(simulator, observation, prior)
    n_dim = len(NAMES)
    if n_walkers < 2 * n_dim or n_walkers % 2:
        raise ValueError(f"n_walkers must be even and >= 2 * D = {2 * n_dim}, got {n_walkers}")
    if n_steps < 1 or n_burn < 0:
        raise ValueError(f"need n_steps >= 1 and n_burn >= 0, got {n_steps}, {n_burn}")
    if max_wall_s is not None and not (math.isfinite(max_wall_s) and max_wall_s > 0):
        raise ValueError(f"max_wall_s must be a positive number of seconds, got {max_wall_s}")
    if init_walkers is not None:
        theta0 = torch.as_tensor(init_walkers, dtype=prior.low.dtype, device=prior.low.device)
        if theta0.shape != (n_walkers, n_dim):
            raise ValueError(
                f"init_walkers must have shape ({n_walkers}, {n_dim}), got {tuple(theta0.shape)}"
            )
        if not torch.isfinite(prior.log_prob(theta0)).all():
            raise ValueError("some init_walkers lie outside the prior box")
        start = theta0.median(dim=0).values
    else:
        start = _initial_theta(init, simulator, obs, prior, n_opt_steps, generator)
        theta0 = _ball(start, n_walkers, init_scale, transform, generator)

    def log_prob_fn(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            theta = torch.as_tensor(x, dtype=prior.low.dtype, device=prior.low.device)
            return log_posterior(theta, simulator, obs, prior).cpu().numpy()

    p0 = theta0.detach().cpu().numpy().astype(np.float64)
    if not np.all(np.isfinite(log_prob_fn(p0))):
        raise ValueError("non-finite initial log posterior for some walker")
    sampler = emcee.EnsembleSampler(n_walkers, n_dim, log_prob_fn, vectorize=True)
    seed = (rng if rng is not None else np.random.default_rng()).integers(2**32)
    sampler.random_state = np.random.RandomState(seed).get_state()
    t0 = time.perf_counter()
    time_limited = False
    for _ in sampler.sample(p0, iterations=n_burn + n_steps, progress=use_progress):
        if (max_wall_s is not None and sampler.iteration > n_burn
                and sampler.iteration < n_burn + n_steps
                and time.perf_counter() - t0 > max_wall_s):  # fmt: skip
            time_limited = True
            break
    wall = time.perf_counter() - t0
    chain = sampler.get_chain(discard=n_burn)
    diagnostics = ensemble_diagnostics(
        chain, n_burn=n_burn, acceptance_fraction=float(np.mean(sampler.acceptance_fraction)),
        tol=tol, wall_time_s=wall, time_limited=time_limited,
    )  # fmt: skip
    samples = PosteriorSamples(
        theta=torch.from_numpy(chain.reshape(-1, n_dim).copy()),
        names=NAMES,
        log_prob=torch.from_numpy(sampler.get_log_prob(discard=n_burn, flat=True).copy()),
        method="emcee",
    )
    return EmceeResult(samples=samples, diagnostics=diagnostics, start=start.detach().cpu())


# --- NUTS (Pyro) ----------------------------------------------------------------------------


def _laplace_scale(u: Tensor, target: Callable[[Tensor], Tensor]) -> Tensor:
    """``S`` with ``S S^T`` the inverse Hessian of ``-target`` at ``u`` (eigenvalues >= 1)."""
    hessian = torch.autograd.functional.hessian(lambda v: -target(v[None])[0], u)
    if not torch.isfinite(hessian).all():
        return torch.eye(len(u), dtype=u.dtype, device=u.device)
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (hessian + hessian.T))
    # A flat or saddle direction gets the prior's unit scale rather than an infinite one.
    return vectors * eigenvalues.clamp_min(1.0).rsqrt()


@dataclass(frozen=True)
class NutsDiagnostics:
    """Convergence of a NUTS run.

    Attributes:
        r_hat: Split R-hat per parameter (of ``u``, a monotone map of ``theta``), shape
            ``(D,)``, columns ``params.NAMES``.
        ess: Effective sample size per parameter over all chains, shape ``(D,)``.
        n_chains: Chains (run one after another).
        n_samples: Kept draws per chain.
        n_warmup: Warm-up (adaptation) iterations per chain, discarded.
        n_divergent: Divergent transitions after warm-up, all chains.
        acceptance_rate: Mean acceptance statistic after warm-up.
        max_r_hat: Threshold used for ``is_converged``.
        min_ess: Threshold used for ``is_converged``.
        is_converged: ``max(r_hat) < max_r_hat`` and ``min(ess) >= min_ess``.
        wall_time_s: Wall time of all chains, warm-up included, in seconds.
    """

    r_hat: Tensor
    ess: Tensor
    n_chains: int
    n_samples: int
    n_warmup: int
    n_divergent: int
    acceptance_rate: float
    max_r_hat: float
    min_ess: float
    is_converged: bool
    wall_time_s: float


@dataclass(frozen=True)
class NutsResult:
    """Samples and convergence of :func:`run_nuts`.

    Attributes:
        samples: All chains' draws, chain-major (``N = n_chains * n_samples``),
            ``method="nuts"``, ``log_prob`` the unnormalized log posterior of ``theta``.
        diagnostics: R-hat, ESS, divergences, convergence flag, wall time.
        start: The optimizer's end point the chains started around, shape ``(D,)``.
    """

    samples: PosteriorSamples
    diagnostics: NutsDiagnostics
    start: Tensor


def run_nuts(
    simulator: LensSimulator,
    observation: Observation,
    *,
    prior: Prior | None = None,
    n_samples: int = 500,
    n_warmup: int = 500,
    n_chains: int = 2,
    max_tree_depth: int = 8,
    target_accept_prob: float = 0.8,
    max_r_hat: float = 1.01,
    min_ess: float = 400.0,
    init: Tensor | None = None,
    init_scale: float = 1.0,
    n_opt_steps: int = 200,
    use_laplace_scaling: bool = True,
    use_progress: bool = False,
    generator: torch.Generator | None = None,
) -> NutsResult:
    """Pyro's NUTS on lensflow's likelihood, in the standardized prior-box space ``u``.

    The potential is ``-log p(u)`` (log posterior plus log-Jacobian) at ``u = u_start + S w``
    with ``S`` a fixed linear preconditioner (constant Jacobian); NUTS samples ``w`` and
    adapts its step size and a diagonal mass matrix during warm-up.

    Args:
        simulator: The forward model (float64 recommended); grid equal to the observation's.
        observation: Image, noise map and mask.
        prior: Prior (default: the registry's default prior).
        n_samples: Kept draws per chain (>= 4, for split R-hat).
        n_warmup: Warm-up iterations per chain (step size and diagonal mass adaptation).
        n_chains: Chains, run sequentially (>= 1; R-hat is split R-hat, so 1 works).
        max_tree_depth: NUTS tree depth limit (at most ``2**depth - 1`` gradients per draw).
        target_accept_prob: Step-size adaptation target.
        max_r_hat: Convergence threshold on R-hat (Vehtari et al. 2021 recommend 1.01).
        min_ess: Convergence threshold on the smallest ESS (100 per chain for 4 chains).
        init: Optional start, physical ``theta`` ``(D,)``; default: :func:`optimize_posterior`.
        init_scale: Standard deviation of each chain's jitter around the start, in the
            sampled (whitened) coordinates ``w``: about posterior standard deviations with
            ``use_laplace_scaling``, prior standard deviations without. A chain whose
            jittered start has a non-finite log posterior is moved halfway back to the
            start, up to 10 times.
        n_opt_steps: Adam steps of the optimizer when ``init`` is None.
        use_laplace_scaling: Sample ``w`` with ``u = u_start + S w``, ``S`` from the
            Hessian of the negative log density at the start (Laplace approximation,
            eigenvalues floored at 1, i.e. no wider than the prior). Lens posteriors are
            narrow and correlated in ``u`` (posterior standard deviations from 3e-4 to 0.1
            on the test mock); without it NUTS' diagonal adaptation needs a long warm-up.
        use_progress: Show Pyro's progress bar.
        generator: Torch generator for the starts; also seeds Pyro (in a forked RNG).

    Returns:
        Samples (``method="nuts"``) and diagnostics.

    Raises:
        ImportError: Without pyro-ppl (the ``baselines`` extra).
        ValueError: For mismatched grids, bad counts, ``init`` outside the prior, or a
            non-finite initial log posterior.
    """
    try:
        from pyro.infer import MCMC, NUTS
        from pyro.ops.stats import effective_sample_size, split_gelman_rubin
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "run_nuts needs pyro-ppl; install the baselines extra with "
            "`pip install 'lensflow[baselines]'`"
        ) from err
    prior, obs, transform = _setup(simulator, observation, prior)
    if n_samples < 4 or n_warmup < 0 or n_chains < 1 or max_tree_depth < 1:
        raise ValueError(
            f"need n_samples >= 4 (split R-hat), n_warmup >= 0, n_chains >= 1, "
            f"max_tree_depth >= 1; got {n_samples}, {n_warmup}, {n_chains}, {max_tree_depth}"
        )
    start = _initial_theta(init, simulator, obs, prior, n_opt_steps, generator)
    target = lambda u: _log_posterior_u(u, transform, simulator, obs, prior)
    u_start = transform.to_u(start).detach()
    scale = _laplace_scale(u_start, target) if use_laplace_scaling else torch.eye(len(u_start))
    scale = scale.to(u_start)
    eps = torch.randn((n_chains, len(u_start)), generator=generator, dtype=torch.float64)
    w0 = init_scale * eps.to(u_start)
    if not torch.isfinite(target(u_start[None])).all():
        raise ValueError("non-finite initial log posterior at the start")
    # A chain whose jitter lands where the simulator is not finite (flat Laplace directions
    # reach far into the prior) is pulled halfway back to the start, up to 10 times.
    for _ in range(10):
        bad = ~torch.isfinite(target(u_start + w0 @ scale.T))
        if not bad.any():
            break
        w0[bad] = 0.5 * w0[bad]
    else:
        raise ValueError("non-finite initial log posterior for some chain")

    def potential_fn(params: dict[str, Tensor]) -> Tensor:
        return -target((u_start + scale @ params["w"])[None])[0]

    seed = int(torch.randint(2**62, (1,), generator=generator))
    chains, n_divergent, accept = [], 0, []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for c in range(n_chains):
            kernel = NUTS(
                potential_fn=potential_fn,
                max_tree_depth=max_tree_depth,
                target_accept_prob=target_accept_prob,
                adapt_mass_matrix=True,
            )
            mcmc = MCMC(kernel, num_samples=n_samples, warmup_steps=n_warmup,
                        initial_params={"w": w0[c]}, disable_progbar=not use_progress)  # fmt: skip
            mcmc.run()
            chains.append(u_start + mcmc.get_samples()["w"].detach() @ scale.T)
            info = mcmc.diagnostics()
            n_divergent += sum(len(v) for v in info["divergences"].values())
            accept.extend(float(v) for v in info["acceptance rate"].values())
    wall = time.perf_counter() - t0
    u = torch.stack(chains)  # (C, N, D)
    r_hat = split_gelman_rubin(u, chain_dim=0, sample_dim=1).cpu().double()
    ess = effective_sample_size(u, chain_dim=0, sample_dim=1).cpu().double()
    diagnostics = NutsDiagnostics(
        r_hat=r_hat, ess=ess, n_chains=n_chains, n_samples=n_samples, n_warmup=n_warmup,
        n_divergent=n_divergent, acceptance_rate=float(np.mean(accept)), max_r_hat=max_r_hat,
        min_ess=min_ess, wall_time_s=wall,
        is_converged=bool(torch.isfinite(r_hat).all() and r_hat.max() < max_r_hat
                          and ess.min() >= min_ess),
    )  # fmt: skip
    with torch.no_grad():
        theta = transform.from_u(u.reshape(-1, u.shape[-1]))
        logp = log_posterior(theta, simulator, obs, prior)
    samples = PosteriorSamples(
        theta=theta.cpu().double(), names=NAMES, log_prob=logp.cpu().double(), method="nuts"
    )
    return NutsResult(samples=samples, diagnostics=diagnostics, start=start.detach().cpu())
