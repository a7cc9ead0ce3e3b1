"""Stage 6: fit observed lenses end to end: preset, cut, sample, diagnose, write.

``fit_lenses`` is what ``lensflow fit`` and ``lensflow catalog`` run: it picks the shipped
model for each observation (``preset="auto"`` chooses by pixel scale), cuts the cutout to
the model's field of view around the requested centre, samples the posterior of every lens
sharing a model in one batched call (with simulator feedback when a control network is
available), and computes the diagnostics that say when the amortized answer should not be
trusted. ``write_fit`` writes a lens's results into a folder; ``fit`` does everything for
one image file in one call (for notebooks).

Diagnostics (``Diagnostics``; thresholds in ``RELIABILITY``, measured in docs/fit.md):

* ``chi2_red_median``: reduced chi^2 of the model at the marginal posterior medians.
* ``chi2_red_samples``: mean reduced chi^2 of up to 64 posterior samples, re-simulated with
  the observation's own PSF, noise map and mask (about ``1 + 1/2 * D / N_pix`` for a
  calibrated posterior of a well-described lens).
* ``residual_coherence``: ``9 * mean(box3(r)^2) / mean(r^2)`` of the normalized residual
  ``r`` at the median: 1 for white residuals, up to 9 when the residual is spatially
  coherent (unmodelled structure, wrong PSF).
* ``psf_fwhm_arcsec`` and ``noise_rms`` (the background RMS, fitted to the noise map as
  ``sigma^2 = rms^2 + max(image, 0) / t``) against the ranges the model was trained on.
* ``masked_fraction`` of the cut observation (padding included) against the largest the
  model saw in training (``data.training_masked_fraction``): beyond it the posterior
  loses accuracy and calibration quickly (docs/fit.md).
* the posterior medians against the registry's default prior, the range the model was
  trained on: a median beyond it (by more than ``prior_tolerance`` of the prior's width,
  in log space for log-uniform parameters) means the network extrapolated, as on real
  cutouts whose flux scale the prior does not cover (docs/real-lenses.md).
* the samples against the prior's edges (``at_prior_edge``): nearly all of a parameter's
  samples pressed against one edge mean a sampler held by the prior box (the MCMC
  fallback on real cutouts whose lens light the prior does not cover).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lensflow import __version__
from lensflow.config import PRESETS
from lensflow.cutouts import cut_to_fov
from lensflow.data import conditioning_fwhm_arcsec, flux_factor, training_masked_fraction
from lensflow.observation import Observation, load_observation
from lensflow.params import FLUX_NAMES, NAMES, REGISTRY, ParamSpec, scale_flux
from lensflow.prior import PRIOR_CHOICES
from lensflow.sampling import (
    PosteriorSamples,
    resolve_normalize_flux,
    sample_posteriors,
    samples_table,
)

if TYPE_CHECKING:
    from astropy.table import Table

    from lensflow.checkpoint import TrainedPosterior
    from lensflow.prior import Prior
    from lensflow.simulator import LensSimulator

__all__ = [
    "CORNER_PARAMS",
    "MODEL_PIXEL_SCALES",
    "RELIABILITY",
    "SUMMARY_QUANTILES",
    "Diagnostics",
    "FitResult",
    "atomic_write",
    "diagnose",
    "fit",
    "fit_lens",
    "fit_lenses",
    "outside_prior",
    "resolve_device",
    "resolve_preset",
    "run_fallback",
    "summary_row",
    "write_fit",
]

#: Pixel scale (arcsec) of each preset's model grid, for ``preset="auto"``.
MODEL_PIXEL_SCALES: dict[str, float] = {k: v.pixel_scale_arcsec for k, v in PRESETS.items()}

#: ``auto`` accepts an observation whose pixel scale is within this factor of a preset's.
MAX_SCALE_RATIO = 2.0

#: Summary quantiles: column suffix -> quantile.
SUMMARY_QUANTILES: dict[str, float] = {
    "median": 0.5,
    "p16": 0.16,
    "p84": 0.84,
    "p2p5": 0.025,
    "p97p5": 0.975,
}

#: Thresholds of the ``reliable`` flag (docs/fit.md gives the measured firing rates).
RELIABILITY: dict[str, float] = {
    "chi2_red_samples_max": 1.5,  # posterior samples fit the data much worse than noise
    "residual_coherence_max": 2.0,  # spatially coherent residual structure
    "range_tolerance": 0.15,  # PSF / noise / masked fraction may exceed the training range
    "prior_tolerance": 0.05,  # posterior medians may leave the prior box by this fraction
    "edge_band": 0.002,  # a prior edge's band, as a fraction of the prior's (log-)width
    "edge_mass_max": 0.9,  # fraction of samples allowed in one edge band
}


def outside_prior(
    median: Tensor,
    tolerance: float = RELIABILITY["prior_tolerance"],
    *,
    flux_widening: float = 1.0,
    specs: Sequence[ParamSpec] = REGISTRY,
) -> list[str]:
    """Registry names whose posterior median lies outside the training prior's range.

    Args:
        median: Posterior medians, shape ``(21,)``, physical units (``params.NAMES`` order).
        tolerance: Allowed excess, as a fraction of the prior's width (of its log-width for
            log-uniform parameters).
        flux_widening: The flux parameters' range is ``[low / w, high * w]`` (before the
            tolerance): what a model sampling in normalized flux units covers, since
            amplitudes drawn over ``[low, high]`` at noise levels spanning a factor ``w^2``
            around ``reference_rms`` reach that range once expressed at ``reference_rms``.
        specs: The registry with the training prior (default: the default prior; a model's
            ``TrainedPosterior.prior_specs``).

    Returns:
        The names, in registry order (empty when all medians are inside).

    Example:
        >>> from lensflow.prior import Prior
        >>> m = Prior().low.clone()
        >>> m[0] = 3.0  # lens_theta_e, prior 0.5-2"
        >>> outside_prior(m)
        ['lens_theta_e']
    """
    names = []
    for spec, value in zip(specs, median.tolist(), strict=True):
        lo, hi, v = spec.prior_low, spec.prior_high, value
        if spec.name in FLUX_NAMES:
            lo, hi = lo / flux_widening, hi * flux_widening
        if spec.prior == "loguniform":
            if v <= 0:
                names.append(spec.name)
                continue
            lo, hi, v = math.log(lo), math.log(hi), math.log(v)
        pad = tolerance * (hi - lo)
        if not lo - pad <= v <= hi + pad:
            names.append(spec.name)
    return names


def at_prior_edge(
    theta: Tensor,
    band: float = RELIABILITY["edge_band"],
    mass: float = RELIABILITY["edge_mass_max"],
    specs: Sequence[ParamSpec] = REGISTRY,
) -> list[str]:
    """Registry names whose posterior samples pile up at an edge of the prior.

    A sampler confined to the prior box (the MCMC fallback) cannot follow data that want a
    value outside it: its samples then crowd against the box's edge, with a median just
    inside, which :func:`outside_prior` does not see. This check does.

    Args:
        theta: Posterior samples, shape ``(N, 21)``, physical units (``params.NAMES``).
        band: Width of the band at each edge, as a fraction of the prior's width (of its
            log-width for log-uniform parameters).
        mass: A parameter is reported when more than this fraction of its samples lie in
            one edge band.
        specs: The registry whose priors the sampler was confined to (default: the
            default prior; ``prior.wide_specs()`` for a wide-prior fallback).

    Returns:
        The names, in registry order (empty when no samples crowd an edge).

    Example:
        >>> from lensflow.prior import Prior
        >>> theta = Prior().sample((100,), generator=torch.Generator().manual_seed(0))
        >>> theta[:, 14] = 5.0  # lens_light_amp, prior 5-500 (log-uniform): all at 5
        >>> at_prior_edge(theta)
        ['lens_light_amp']
    """
    names = []
    for j, spec in enumerate(specs):
        lo, hi, v = spec.prior_low, spec.prior_high, theta[:, j].double()
        if spec.prior == "loguniform":
            lo, hi, v = math.log(lo), math.log(hi), v.clamp_min(1e-300).log()
        width = band * (hi - lo)
        near = max(
            float((v <= lo + width).double().mean()), float((v >= hi - width).double().mean())
        )
        if near > mass:
            names.append(spec.name)
    return names


#: Parameters of the corner plot ``write_fit`` draws by default: the mass model. A 21x21
#: corner takes ~10 s to draw (matplotlib's axes), a 7x7 one ~1 s; ``lensflow corner``
#: draws any other selection from ``samples.fits``.
CORNER_PARAMS: tuple[str, ...] = (
    "lens_theta_e", "lens_e1", "lens_e2", "lens_center_x", "lens_center_y", "shear_gamma1",
    "shear_gamma2",
)  # fmt: skip

#: Posterior samples re-simulated for ``chi2_red_samples``.
N_DIAGNOSTIC_SAMPLES = 64


@dataclass(frozen=True)
class Diagnostics:
    """When not to trust the amortized posterior of one lens.

    Attributes:
        chi2_red_median: Reduced chi^2 at the marginal posterior medians.
        chi2_red_samples: Mean reduced chi^2 of re-simulated posterior samples.
        residual_coherence: 1 for white normalized residuals, up to 9 for coherent ones.
        psf_fwhm_arcsec: The observation's PSF FWHM (Gaussian fit), arcsec.
        noise_rms: Background noise RMS, image units: the intercept of a fit of
            ``sigma^2 = rms^2 + max(image, 0) / t`` to the noise map.
        masked_fraction: Fraction of the cut observation's pixels excluded from the
            likelihood (masked or padded), in ``[0, 1)``.
        reliable: True when no check fired.
        reason: Semicolon-separated reasons; empty when reliable.
    """

    chi2_red_median: float
    chi2_red_samples: float
    residual_coherence: float
    psf_fwhm_arcsec: float
    noise_rms: float
    masked_fraction: float
    reliable: bool
    reason: str


@dataclass(frozen=True)
class FitResult:
    """The posterior of one lens with what is needed to write and audit it.

    Attributes:
        name: Lens id (the observation's name unless given).
        samples: Posterior samples, ``theta`` ``(N, 21)``, physical units.
        observation: The cut observation the model saw (model grid), on the CPU.
        model_image: Noiseless model at the posterior medians ``(H, W)``, image units.
        source_image: Unlensed source model at the medians ``(H, W)``, image units.
        diagnostics: Reliability diagnostics.
        preset: ``"hst"`` or ``"euclid"`` (or ``"custom"`` for a model path).
        feedback: ``"gradient"``, ``"learned"`` or ``"none"``: what was used.
        seed: Seed of the base noise.
        timings: Wall times in s: ``"sample"`` (share of the batched call), ``"diagnose"``.
        provenance: JSON-able record: inputs with SHA-256, model ids, version, device.
        fallback: When the flow's answer was flagged and re-run on the likelihood: the
            sampler's diagnostics (``"method"``: ``"emcee"`` with steps, walkers, tau; or
            ``"smc"`` with particles, temperatures, log evidence; both with ``converged``
            and the wall time) and the flow's diagnostics it replaced; ``None`` otherwise.
    """

    name: str
    samples: PosteriorSamples
    observation: Observation
    model_image: Tensor
    source_image: Tensor
    diagnostics: Diagnostics
    preset: str
    feedback: str
    seed: int
    timings: dict[str, float]
    provenance: dict[str, Any]
    fallback: dict[str, Any] | None = None


#: emcee settings of ``fallback="mcmc"``: walkers start at distinct flow samples, so the
#: burn-in can be short; the chain length is checked against 50 autocorrelation times.
FALLBACK_EMCEE: dict[str, int] = {"n_walkers": 64, "n_burn": 300, "n_steps": 1500}

#: Tempered SMC settings of ``fallback="smc"`` (``baselines.smc.run_smc``): particles
#: (at most this many samples are returned), Metropolis sweeps per temperature and at the
#: end. On demo_01 (3 temperatures) that was 51 sweeps, 1.02e5 likelihood calls, against
#: the 64 x 1,800 = 1.15e5 of the emcee fallback: the same cost (docs/baselines.md).
FALLBACK_SMC: dict[str, int] = {"n_particles": 2000, "n_moves": 10, "n_final_moves": 20}

#: What a flagged lens can be re-run with: nothing, emcee, or tempered SMC.
FALLBACKS = ("none", "mcmc", "smc")

#: The fallback restarts from the optimizer when its optimum beats every flow start by
#: more than this many nats of log posterior (the flow is then in the wrong mode).
MODE_MARGIN = 10.0


def run_fallback(result: FitResult, model: TrainedPosterior, *, seed: int = 0,
                 n_burn: int | None = None, n_steps: int | None = None,
                 n_opt_steps: int = 200, prior: str = "default", method: str = "mcmc",
                 n_particles: int | None = None) -> FitResult:  # fmt: skip
    """Re-run a lens on the same likelihood, started from its flow posterior.

    ``method="mcmc"`` runs emcee; ``method="smc"`` runs tempered SMC
    (``baselines.smc.run_smc``: a Laplace fit at the polished best start, then tempering to
    the posterior with Metropolis sweeps). docs/benchmarks.md has what is measured of
    both: the same cost on a CPU, SMC closer to a long chain on a small mock ("Tempered SMC
    against long chains on the CPU"), and on an H100 SMC within C2ST 0.60 of a 47-tau chain
    of demo_01 in 32.5 s ("Issue 3's comparison on the H100: demo_01").

    The likelihood is the feedback's: the lensflow simulator on the cut observation's grid
    with its PSF, noise map and mask, in float64; the prior is the model's training prior
    (``prior="default"``), another named prior (``"broad"``: ``prior.broad_specs``), or
    with ``prior="wide"`` each parameter's physical range (``prior.wide_specs``), for lenses
    whose best fit the training prior excludes (the flag's "piled at the edge" reason).
    The 64 walkers start at distinct flow samples, unless a multi-start optimizer (broad
    prior starts plus 8 flow samples, ``baselines.mcmc.optimize_posterior``) finds a mode
    more than ``MODE_MARGIN`` nats above every flow start: then they start around that
    optimum (``fallback["init"]`` says which). SMC centres its proposal on the best of the
    flow samples and that optimum after an L-BFGS polish, so it follows the same rule.

    Args:
        result: A flow fit (typically one whose ``diagnostics.reliable`` is False).
        model: The model it came from (for the preset's supersampling).
        seed: Seed of emcee's moves.
        n_burn: Burn-in steps (default ``FALLBACK_EMCEE``).
        n_steps: Kept steps per walker (default ``FALLBACK_EMCEE``).
        n_opt_steps: Adam steps, and L-BFGS iterations per polished point, of the mode
            check's optimizer (and of SMC's polish of its best starts).
        prior: ``"default"`` (the model's training prior), ``"broad"`` or ``"wide"``
            (``prior.PRIOR_CHOICES``).
        method: ``"mcmc"`` (emcee) or ``"smc"``.
        n_particles: SMC particles (default ``FALLBACK_SMC``; at most as many as the flow
            gave samples).

    Returns:
        The fit with the sampler's samples (``method="emcee"`` or ``"smc"``), fresh
        diagnostics and ``fallback`` filled in.

    Raises:
        ValueError: For an unknown ``method`` or ``prior``.
    """
    if method not in FALLBACKS[1:]:  # "none" is no re-run
        raise ValueError(f"fallback method must be 'mcmc' or 'smc', got {method!r}")
    import numpy as np

    from lensflow.baselines.mcmc import (
        box_transform,
        log_posterior,
        optimize_posterior,
        run_emcee,
    )
    from lensflow.prior import make_prior

    training = model.data.prior
    prior_name = training if prior == "default" else prior
    prior = make_prior(prior_name, dtype=torch.float64)  # checks the name first
    obs, sim = _observation_simulator(result.observation, model)
    # The prior box applies in the flux units the flow sampled in (DataConfig.normalize_flux
    # or fit_lenses(normalize_flux=True)): the chain runs there, and its flux parameters are
    # scaled back at the end.
    normalized = result.provenance.get("flux_factor") is not None
    unit = result.provenance["flux_factor"] if normalized else 1.0
    obs = obs.scaled(unit) if normalized else obs
    k = FALLBACK_EMCEE["n_walkers"]
    theta = scale_flux(result.samples.theta.double(), unit)
    pick = torch.linspace(0, theta.shape[0] - 1, min(k, theta.shape[0])).long()
    start = theta[pick]
    if start.shape[0] < k:  # fewer flow samples than walkers: repeat with a tiny jitter
        g = torch.Generator().manual_seed(seed)
        extra = start[torch.randint(0, start.shape[0], (k - start.shape[0],), generator=g)]
        start = torch.cat([start, extra * (1 + 1e-6 * torch.randn(extra.shape, generator=g))])
    # The training prior: the flow's samples are clamped into it, the mode check starts there.
    box = prior if prior_name == training else make_prior(training, dtype=torch.float64)
    start = box.clamp_inside(start)
    t0 = time.perf_counter()
    # Mode check: the flow may sit in the wrong mode (a short chain started there stays).
    # Optimize from broad prior starts and from 8 flow samples; if the optimum beats every
    # flow start by more than MODE_MARGIN nats, the walkers start around it instead.
    g = torch.Generator().manual_seed(seed)
    extra = start[torch.linspace(0, k - 1, 8).long()]
    best = optimize_posterior(
        sim, obs, prior=box, generator=g, n_steps=n_opt_steps, n_polish_steps=n_opt_steps,
        extra_starts=extra,
    )  # fmt: skip
    if prior_name != training:
        # Continue into the wider box from the training box's optimum and the flow starts,
        # by L-BFGS alone: broad starts and Adam's steps in the wide box's coordinates
        # land in other modes (a 2.3" Einstein radius came out 2.96" in a test).
        best = optimize_posterior(
            sim, obs, prior=prior, generator=g, n_starts=1, n_steps=0, n_polish=3,
            n_polish_steps=n_opt_steps, extra_starts=torch.cat([best[None], extra]),
        )  # fmt: skip
    with torch.no_grad():
        logp_flow = float(log_posterior(start, sim, obs, prior).max())
        logp_best = float(log_posterior(best[None], sim, obs, prior)[0])
    init = "flow"
    if logp_best > logp_flow + MODE_MARGIN:
        init = f"optimizer ({logp_best - logp_flow:.0f} nats above the best flow sample)"
        u0 = box_transform(prior).to_u(best[None])
        eps = torch.randn((k, u0.shape[-1]), generator=g, dtype=torch.float64)
        start = box_transform(prior).from_u(u0 + 1e-3 * eps)
    if method == "smc":
        return _smc_fallback(result, model, sim, obs, prior, prior_name, init, t0, unit,
                             torch.cat([box.clamp_inside(theta), best[None]]), n_particles,
                             n_opt_steps, g)  # fmt: skip
    run = run_emcee(sim, obs, prior=prior, n_walkers=k, init_walkers=start,
                    n_burn=n_burn or FALLBACK_EMCEE["n_burn"],
                    n_steps=n_steps or FALLBACK_EMCEE["n_steps"],
                    rng=np.random.default_rng(seed))  # fmt: skip
    d = run.diagnostics
    # As many samples as the flow gave, evenly spaced over the post-burn-in chain.
    n_keep = min(theta.shape[0], run.samples.theta.shape[0])
    keep = torch.linspace(0, run.samples.theta.shape[0] - 1, n_keep).long()
    lp = run.samples.log_prob
    samples = dataclasses.replace(run.samples, theta=scale_flux(run.samples.theta[keep], 1 / unit),
                                  log_prob=None if lp is None else lp[keep])  # fmt: skip
    fields = {
        "n_walkers": d.n_walkers,
        "n_burn": d.n_burn,
        "n_steps": d.n_steps,
        "n_chain_samples": int(run.samples.theta.shape[0]),
        "max_tau": float(d.tau.max()),
        "acceptance_fraction": d.acceptance_fraction,
    }
    return _fallback_result(result, model, samples, prior, prior_name=prior_name, init=init,
                            fields=fields, converged=d.is_converged, t0=t0)  # fmt: skip


def _fallback_result(result: FitResult, model: TrainedPosterior, samples: PosteriorSamples,
                     prior: Prior, *, prior_name: str, init: str, fields: dict[str, Any],
                     converged: bool, t0: float) -> FitResult:  # fmt: skip
    """``run_fallback``'s common end: diagnose the sampler's ``samples`` (physical units,
    ``samples.method`` names the sampler), write the ``fallback`` record (the sampler's own
    ``fields`` between the shared ones) and return the fit with both."""
    normalized = result.provenance.get("flux_factor") is not None
    diag, image, source = diagnose(result.observation, samples, model,
                                   normalize_flux=normalized, prior_specs=prior.specs)  # fmt: skip
    record = {
        "method": samples.method,
        "prior": prior_name,
        "init": init,
        **fields,
        "converged": converged,
        "wall_time_s": time.perf_counter() - t0,
        "flow_diagnostics": dataclasses.asdict(result.diagnostics),
    }
    return dataclasses.replace(
        result, samples=samples, model_image=image, source_image=source, diagnostics=diag,
        timings={**result.timings, "fallback": record["wall_time_s"]},
        provenance={**result.provenance, "method": samples.method, "fallback": record},
        fallback=record,
    )  # fmt: skip


def _smc_fallback(result: FitResult, model: TrainedPosterior, sim: LensSimulator,
                  obs: Observation, prior: Prior, prior_name: str, init: str, t0: float,
                  unit: float, starts: torch.Tensor, n_particles: int | None,
                  n_polish_steps: int, g: torch.Generator) -> FitResult:  # fmt: skip
    """``run_fallback``'s SMC branch: tempered SMC from ``starts`` (flow samples and the
    optimizer's mode, physical ``theta`` in the chain's flux units)."""
    from lensflow.baselines.smc import run_smc

    n = min(n_particles or FALLBACK_SMC["n_particles"], result.samples.theta.shape[0])
    n = max(n, 2 * len(NAMES))  # SMC's minimum
    run = run_smc(sim, obs, starts, prior=prior, n_particles=n,
                  n_moves=FALLBACK_SMC["n_moves"], n_final_moves=FALLBACK_SMC["n_final_moves"],
                  n_polish_steps=n_polish_steps, generator=g)  # fmt: skip
    d = run.diagnostics
    samples = dataclasses.replace(run.samples, theta=scale_flux(run.samples.theta, 1 / unit))
    fields = {
        "n_particles": d.n_particles,
        "temperatures": list(d.temperatures),
        "target_evaluations": d.target_evaluations,
        "unique_fraction": d.unique_fraction,
        "moves_per_particle": d.moves_per_particle,
        "log_evidence": d.log_evidence,
    }
    return _fallback_result(result, model, samples, prior, prior_name=prior_name, init=init,
                            fields=fields, converged=d.is_converged, t0=t0)  # fmt: skip


def resolve_preset(obs: Observation, preset: str = "auto") -> str:
    """The preset whose model serves an observation.

    Args:
        obs: The observation.
        preset: ``"auto"`` (by pixel scale) or a preset name.

    Returns:
        The preset name.

    Raises:
        ValueError: For an unknown preset, or a pixel scale more than ``MAX_SCALE_RATIO``
            from every (or the requested) preset's.

    Example:
        >>> import torch
        >>> m = torch.ones(80, 80, dtype=torch.bool)
        >>> o = Observation(torch.zeros(80, 80), torch.ones(80, 80), torch.ones(1, 1), 0.1, m)
        >>> resolve_preset(o)
        'euclid'
    """
    where = obs.meta.get("image_path") or obs.name or "observation"
    scale = obs.pixel_scale_arcsec
    if preset != "auto" and preset not in MODEL_PIXEL_SCALES:
        raise ValueError(
            f"unknown preset {preset!r}; choose auto or one of {', '.join(sorted(PRESETS))}"
        )
    candidates = MODEL_PIXEL_SCALES if preset == "auto" else {preset: MODEL_PIXEL_SCALES[preset]}
    best = min(candidates, key=lambda k: abs(math.log(scale / candidates[k])))
    ratio = max(scale / candidates[best], candidates[best] / scale)
    if ratio > MAX_SCALE_RATIO:
        known = ", ".join(f'{k} {v:g}"/px' for k, v in sorted(MODEL_PIXEL_SCALES.items()))
        raise ValueError(
            f'{where}: pixel scale {scale:.4g}"/px is far from the shipped models ({known}); '
            "check --pixel-scale or train a model for this instrument"
        )
    return best


_MODELS: dict[tuple[str, str], TrainedPosterior] = {}


def _load(model: str | Path, device: torch.device) -> TrainedPosterior:
    """A loaded model, cached per process (catalog workers load each model once)."""
    from lensflow.checkpoint import load_model, model_path

    key = (str(model_path(model)), str(device))
    if key not in _MODELS:
        _MODELS[key] = load_model(model, device=device)
    return _MODELS[key]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU) or a device name, checked.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``.

    Returns:
        The device.

    Raises:
        ValueError: If CUDA is requested but not available.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    return dev


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _inputs(obs: Observation) -> dict[str, dict[str, str]]:
    """The observation's input files with their SHA-256."""
    out = {}
    for role in ("image", "noise", "weight", "psf", "mask"):
        path = obs.meta.get(f"{role}_path")
        if path and Path(path).is_file():
            out[role] = {"path": str(path), "sha256": _sha256(path)}
    return out


def _center_pix(
    obs: Observation,
    center_pix: tuple[float, float] | None,
    center_radec: tuple[float, float] | None,
) -> tuple[float, float] | None:
    where = obs.meta.get("image_path") or obs.name or "observation"
    if center_pix is not None and center_radec is not None:
        raise ValueError(f"{where}: give the centre in pixels or in RA/Dec, not both")
    if center_radec is None:
        return None if center_pix is None else (float(center_pix[0]), float(center_pix[1]))
    if obs.wcs is None or not obs.wcs.has_celestial:
        raise ValueError(
            f"{where}: has no celestial WCS, so --center RA DEC cannot be used; "
            "give --center-pix X Y instead"
        )
    from astropy.coordinates import SkyCoord

    coord = SkyCoord(center_radec[0], center_radec[1], unit="deg")
    x, y = obs.wcs.celestial.world_to_pixel(coord)
    h, w = obs.shape
    if not (-0.5 <= float(x) <= w - 0.5 and -0.5 <= float(y) <= h - 0.5):
        raise ValueError(
            f"{where}: centre RA, Dec = {center_radec[0]:.6f}, {center_radec[1]:.6f} deg "
            f"falls outside the {h}x{w} px cutout (pixel {float(x):.1f}, {float(y):.1f})"
        )
    return float(x), float(y)


def _observation_simulator(
    obs: Observation, model: TrainedPosterior
) -> tuple[Observation, LensSimulator]:
    """The observation in float64 on the CPU and the simulator of its likelihood.

    The simulator renders on the observation's own grid with its PSF kernel; the other
    settings (supersampling) are the model's preset's.
    """
    from lensflow.simulator import LensSimulator

    obs = obs.to(torch.float64, "cpu")
    cfg = dataclasses.replace(model.simulator, n_pix=obs.shape[0],
                              pixel_scale_arcsec=obs.pixel_scale_arcsec)  # fmt: skip
    return obs, LensSimulator(cfg, psf_kernel=obs.psf, dtype=torch.float64)


def _box3(r: Tensor) -> Tensor:
    k = torch.ones(1, 1, 3, 3, dtype=r.dtype, device=r.device) / 9
    return torch.nn.functional.conv2d(r[None, None], k)[0, 0]


def _background_rms(sigma: Tensor, model: Tensor) -> float:
    """Background RMS from a noise map: the intercept of ``sigma^2 = rms^2 + flux / t``.

    Fitting the noise model of ``simulator.NoiseModel`` to the map separates the background
    from the source's Poisson noise, which dominates near bright lenses.
    """
    if sigma.numel() < 3:
        return float("nan")
    a = torch.stack([torch.ones_like(model), model.clamp_min(0)], 1)
    coef = torch.linalg.lstsq(a, (sigma**2)[:, None]).solution[:, 0]
    if float(coef[0]) <= 0:  # no usable intercept: fall back to the faintest pixels
        return float(torch.quantile(sigma, 0.05))
    return math.sqrt(float(coef[0]))


def diagnose(
    obs: Observation,
    samples: PosteriorSamples,
    model: TrainedPosterior,
    *,
    n_samples: int = N_DIAGNOSTIC_SAMPLES,
    normalize_flux: bool | None = None,
    prior_specs: Sequence[ParamSpec] | None = None,
) -> tuple[Diagnostics, Tensor, Tensor]:
    """Reliability diagnostics of one lens's posterior (module docstring).

    Args:
        obs: The cut observation (model grid) the samples were drawn for.
        samples: Its posterior samples, ``(N, 21)``.
        model: The model that drew them (for the training ranges and the preset's
            supersampling).
        n_samples: Posterior samples re-simulated for ``chi2_red_samples``.
        normalize_flux: Whether the samples were drawn in normalized flux units
            (``sampling.sample_posteriors``; default: as the model was trained): the
            training-range checks then apply in those units.
        prior_specs: The priors the samples were confined to, for the prior-edge check
            (default: the model's training prior, ``model.prior_specs``; the
            training-prior check always uses that one).

    Returns:
        The diagnostics, the model image at the medians ``(H, W)`` and the unlensed source
        ``(H, W)``, float64 on the CPU.
    """
    obs, sim = _observation_simulator(obs, model)
    theta = samples.theta.detach().double().cpu()
    median = torch.quantile(theta, 0.5, dim=0)
    pick = torch.linspace(0, theta.shape[0] - 1, min(n_samples, theta.shape[0])).long()
    with torch.no_grad():
        images = sim(torch.cat([median[None], theta[pick]]))
        source = sim.source_plane(median)
    used = obs.mask
    n_used = max(int(used.sum()), 1)
    resid = torch.where(used, (obs.image - images) / obs.sigma, 0.0)
    chi2 = (resid**2).sum(dim=(-2, -1)) / n_used
    r0 = resid[0]
    inner = used[1:-1, 1:-1] & (_box3(used.double()) > 1 - 1e-9)  # all 9 pixels used
    box = _box3(r0)
    if int(inner.sum()) > 0 and float((r0**2).sum()) > 0:
        coherence = 9 * float((box[inner] ** 2).mean()) / float((r0[used] ** 2).mean())
    else:
        coherence = float("nan")
    fwhm = float(obs.psf_fwhm_arcsec)
    # Regressed on the data, not on the model: it must not depend on the fit being good.
    noise = _background_rms(obs.sigma[used], obs.image[used])
    d, tol = model.data, RELIABILITY["range_tolerance"]
    reasons = []
    chi2_samples = float(chi2[1:].mean())
    if not math.isfinite(chi2_samples) or chi2_samples > RELIABILITY["chi2_red_samples_max"]:
        reasons.append(f"posterior samples fit poorly (reduced chi2 {chi2_samples:.2f})")
    if math.isfinite(coherence) and coherence > RELIABILITY["residual_coherence_max"]:
        reasons.append(f"structured residuals (coherence {coherence:.2f})")
    lo, hi = d.psf_fwhm_min_arcsec * (1 - tol), d.psf_fwhm_max_arcsec * (1 + tol)
    # The training range is of the Gaussian before the pixel box (data.conditioning_fwhm_arcsec).
    grid_fwhm = conditioning_fwhm_arcsec(obs, model.simulator.upsample_factor)
    if not lo <= grid_fwhm <= hi:
        reasons.append(
            f'PSF FWHM {grid_fwhm:.3f}" (kernel fit {fwhm:.3f}" less the pixel box) outside '
            f'the training range {d.psf_fwhm_min_arcsec:.3f}-{d.psf_fwhm_max_arcsec:.3f}"'
        )
    lo, hi = d.background_rms_min * (1 - tol), d.background_rms_max * (1 + 2 * tol)
    # A flux-normalized model has no absolute noise range (its depth is the S/N, which the
    # prior check below sees through the amplitudes, in the units the model saw).
    normalize_flux = resolve_normalize_flux(model, normalize_flux)
    if not normalize_flux and not lo <= noise <= hi:
        hint = "" if d.normalize_flux else " (normalize_flux / --normalize-flux may help)"
        reasons.append(
            f"noise level {noise:.3g} outside the training range "
            f"{d.background_rms_min:.3g}-{d.background_rms_max:.3g}{hint}"
        )
    masked, trained = obs.masked_fraction, training_masked_fraction(d)
    if masked > trained * (1 + tol) + 1e-9:
        what = "trained without masks" if trained == 0 else f"trained on at most {trained:.3f}"
        reasons.append(f"masked fraction {masked:.3f} outside the training range (the model "
                       f"was {what})")  # fmt: skip
    k = flux_factor(obs, d.reference_rms) if normalize_flux else 1.0
    widening = math.sqrt(d.background_rms_max / d.background_rms_min) if normalize_flux else 1.0
    training_specs = model.prior_specs
    outside = outside_prior(scale_flux(median, k), flux_widening=widening, specs=training_specs)
    if outside:
        reasons.append(f"posterior outside the training prior ({', '.join(outside)})")
    confined = training_specs if prior_specs is None else prior_specs
    edge = [n for n in at_prior_edge(scale_flux(theta, k), specs=confined) if n not in outside]
    if edge:
        reasons.append(f"posterior piled at the edge of the prior ({', '.join(edge)}): the "
                       "data want values the prior excludes")  # fmt: skip
    diag = Diagnostics(
        chi2_red_median=float(chi2[0]),
        chi2_red_samples=chi2_samples,
        residual_coherence=coherence,
        psf_fwhm_arcsec=fwhm,
        noise_rms=noise,
        masked_fraction=masked,
        reliable=not reasons,
        reason="; ".join(reasons),
    )
    return diag, images[0], source


def _model_id(model: TrainedPosterior, spec: str | Path) -> dict[str, Any]:
    from lensflow.checkpoint import model_path

    path = model_path(spec)
    weights = path.with_suffix(".safetensors")
    return {
        "name": str(spec),
        "path": str(path),
        "sha256": _sha256(weights) if weights.is_file() else None,
        "status": model.meta.get("status"),
        "lensflow_version": model.meta.get("lensflow_version"),
    }


def fit_lenses(
    observations: Sequence[Observation],
    *,
    preset: str | Sequence[str] = "auto",
    model: str | Path | None = None,
    feedback: str = "auto",
    n: int = 10_000,
    seeds: Sequence[int] | int = 0,
    centers_pix: Sequence[tuple[float, float] | None] | None = None,
    centers_radec: Sequence[tuple[float, float] | None] | None = None,
    names: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    n_steps: int | None = None,
    chunk: int | None = None,
    fallback: str = "none",
    normalize_flux: bool | None = None,
    pad: bool = False,
    control_steps: int | None = None,
    fallback_prior: str = "default",
    compile: bool = False,
    solver: str | None = None,
    base_solver: str | None = None,
) -> list[FitResult]:
    """Posteriors and diagnostics of many observed lenses, batched per model.

    Every lens's samples depend only on its own seed, not on which lenses share its batch
    (up to float32 round-off: batched kernels may sum in another order, ~1e-4 relative).

    Args:
        observations: Observations (any size and pixel scale covering the model's field).
        preset: ``"auto"``, a preset name, or one per observation.
        model: A model path (or shipped name) used for every lens instead of the preset's.
        feedback: ``"auto"`` (the shipped control network when there is one), ``"gradient"``,
            ``"learned"`` or ``"none"``.
        n: Posterior samples per lens.
        seeds: One seed, or one per lens (default 0: lens ``i`` then uses seed ``i``).
        centers_pix: Optional lens centre per observation, 0-based pixel ``(x, y)``.
        centers_radec: Optional lens centre per observation, ``(RA, Dec)`` in degrees.
        names: Lens ids (default: the observations' names).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        n_steps: ODE steps (default: the model's or the control network's).
        chunk: Lenses per batched solve (default: about 2e5 sample rows per solve).
        fallback: ``"mcmc"`` re-runs every lens flagged unreliable with emcee on the same
            likelihood, started from its flow posterior (``run_fallback``); ``"smc"`` with
            tempered SMC instead (docs/baselines.md); ``"none"``.
        normalize_flux: Sample in normalized flux units (``sampling.sample_posteriors``);
            default: as the model was trained. Forcing it on a model trained in absolute
            units helps cutouts whose noise lies far outside its training range and
            costs some accuracy on those inside (docs/real-lenses.md, "Flux units").
        pad: Where the model's field reaches beyond a cutout, mask the missing pixels
            (``cutouts.cut_to_fov(use_padding=True)``) instead of raising. The masked
            fraction enters the diagnostics like any mask.
        control_steps: With feedback, solver steps on ``[t_start, 1]`` (default: the
            control net's; each is one simulator call per sample, docs/feedback.md).
        fallback_prior: The fallback's prior: ``"default"`` (the model's training prior),
            ``"broad"`` (``prior.broad_specs``) or ``"wide"`` (each parameter's physical
            range, ``prior.wide_specs``).
        compile: With feedback, render through ``torch.compile``
            (``sampling.sample_posteriors``): the first batch compiles (tens of seconds on a
            GPU), later ones run faster (docs/benchmarks.md); for catalogs.
        solver: ODE solver (default: the control network's or the model's).
        base_solver: With feedback, the solver on ``[0, t_start]`` where only the base
            flow acts (default: ``solver`` where given, else the control network's;
            docs/feedback.md). The samplers used are recorded in each result's
            ``provenance["sampler"]``.

    Returns:
        One ``FitResult`` per observation, in order.

    Raises:
        ValueError: On a bad preset, pixel scale, centre, feedback kind or a field of view
            that does not fit in a cutout (the message names the file).
    """
    if n < 1:
        raise ValueError(f"the number of samples must be >= 1, got {n}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")
    if fallback_prior not in PRIOR_CHOICES:
        raise ValueError(f"fallback_prior must be one of {', '.join(PRIOR_CHOICES)}, "
                         f"got {fallback_prior!r}")  # fmt: skip
    m = len(observations)
    seed_list = [seeds + i for i in range(m)] if isinstance(seeds, int) else list(seeds)
    presets = [preset] * m if isinstance(preset, str) else list(preset)
    cpix = list(centers_pix) if centers_pix is not None else [None] * m
    cradec = list(centers_radec) if centers_radec is not None else [None] * m
    names = list(names) if names is not None else [o.name or f"lens{i}" for i, o in
                                                   enumerate(observations)]  # fmt: skip
    for what, seq in (("seeds", seed_list), ("preset", presets), ("centers_pix", cpix),
                      ("centers_radec", cradec), ("names", names)):  # fmt: skip
        if len(seq) != m:
            raise ValueError(f"{what} has {len(seq)} entries for {m} observations")
    dev = resolve_device(device)
    groups: dict[str, list[int]] = {}
    resolved = []
    for i, obs in enumerate(observations):
        p = "custom" if model is not None else resolve_preset(obs, presets[i])
        resolved.append(p)
        groups.setdefault(str(model) if model is not None else p, []).append(i)
    results: list[FitResult | None] = [None] * m
    for spec, idx in groups.items():
        t0 = time.perf_counter()  # per model: the load time of this group only
        trained = _load(spec, dev)
        model_id = _model_id(trained, spec)
        normalize = resolve_normalize_flux(trained, normalize_flux)
        cut = [
            cut_to_fov(observations[i], trained.simulator, use_padding=pad,
                       center_pix=_center_pix(observations[i], cpix[i], cradec[i]))
            for i in idx
        ]  # fmt: skip
        t_load = time.perf_counter() - t0
        t1 = time.perf_counter()
        lens_chunk = chunk or max(1, 200_000 // n)
        samples = sample_posteriors(
            cut,
            trained,
            n,
            feedback=feedback,
            n_steps=n_steps,
            seeds=[seed_list[i] for i in idx],
            chunk=lens_chunk,
            normalize_flux=normalize,
            control_steps=control_steps,
            compile=compile,
            solver=solver,
            base_solver=base_solver,
        )
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_sample = (time.perf_counter() - t1) / len(idx)
        for j, i in enumerate(idx):
            s = samples[j]
            s = dataclasses.replace(
                s,
                theta=s.theta.detach().cpu(),
                log_prob=None if s.log_prob is None else s.log_prob.cpu(),
            )
            if not torch.isfinite(s.theta).all():
                raise ValueError(f"{names[i]}: the sampler returned non-finite parameters")
            t2 = time.perf_counter()
            diag, image, source = diagnose(cut[j], s, trained, normalize_flux=normalize)
            used = s.method.split("+")[1] if "+" in s.method else "none"
            obs_cpu = cut[j].to(torch.float64, "cpu")
            results[i] = FitResult(
                name=names[i],
                samples=s,
                observation=obs_cpu,
                model_image=image,
                source_image=source,
                diagnostics=diag,
                preset=resolved[i],
                feedback=used,
                seed=seed_list[i],
                timings={"load": t_load, "sample": t_sample, "diagnose": time.perf_counter() - t2},
                provenance={
                    "lensflow_version": __version__,
                    "name": names[i],
                    "inputs": _inputs(observations[i]),
                    "pixel_scale_arcsec": observations[i].pixel_scale_arcsec,
                    "band": observations[i].band,
                    "cut_center_pix": cut[j].meta.get("cut_center_pix"),
                    "preset": resolved[i],
                    "model": model_id,
                    "feedback": used,
                    "method": s.method,
                    "flux_factor": flux_factor(cut[j], trained.data.reference_rms)
                    if normalize
                    else None,
                    "n_samples": n,
                    "n_steps": n_steps,
                    "control_steps": control_steps,
                    "sampler": s.sampler,
                    "compile": compile,
                    "seed": seed_list[i],
                    "device": str(dev),
                    "device_name": torch.cuda.get_device_name(dev)
                    if dev.type == "cuda"
                    else platform.processor() or platform.machine(),
                    "torch_threads": torch.get_num_threads(),
                },
            )
        if fallback != "none":
            for i in idx:
                r = results[i]
                if r is not None and not r.diagnostics.reliable:
                    results[i] = run_fallback(r, trained, seed=seed_list[i],
                                              prior=fallback_prior, method=fallback)  # fmt: skip
    return [r for r in results if r is not None]


def fit_lens(
    observation: Observation,
    *,
    seed: int = 0,
    center_pix: tuple[float, float] | None = None,
    center_radec: tuple[float, float] | None = None,
    name: str | None = None,
    preset: str = "auto",
    model: str | Path | None = None,
    feedback: str = "auto",
    n: int = 10_000,
    device: str | torch.device = "auto",
    n_steps: int | None = None,
    fallback: str = "none",
    normalize_flux: bool | None = None,
    pad: bool = False,
    control_steps: int | None = None,
    fallback_prior: str = "default",
    compile: bool = False,
    solver: str | None = None,
    base_solver: str | None = None,
) -> FitResult:
    """Posterior and diagnostics of one observed lens (``fit_lenses`` for one lens).

    Args:
        observation: The observation.
        seed: Seed of the base noise.
        center_pix: Optional lens centre, 0-based pixel ``(x, y)``.
        center_radec: Optional lens centre ``(RA, Dec)`` in degrees.
        name: Lens id (default: the observation's name).
        preset: ``"auto"`` or a preset name.
        model: A model path (or shipped name) instead of the preset's.
        feedback: ``"auto"``, ``"gradient"``, ``"learned"`` or ``"none"``.
        n: Posterior samples.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        n_steps: ODE steps (default: the model's or the control network's).
        fallback: ``"mcmc"`` re-runs the lens with emcee when it is flagged unreliable,
            ``"smc"`` with tempered SMC (``run_fallback``).
        normalize_flux: Sample in normalized flux units (see ``fit_lenses``).
        pad: Mask the part of the model's field outside the cutout instead of raising.
        control_steps: With feedback, solver steps on ``[t_start, 1]`` (see ``fit_lenses``).
        fallback_prior: ``"default"``, ``"broad"`` or ``"wide"`` (see ``fit_lenses``).
        compile: Render the feedback through ``torch.compile`` (see ``fit_lenses``).
        solver: ODE solver (see ``fit_lenses``).
        base_solver: With feedback, the solver on ``[0, t_start]`` (see ``fit_lenses``).

    Returns:
        The fit result.
    """
    return fit_lenses([observation], seeds=[seed], centers_pix=[center_pix],
                      centers_radec=[center_radec],
                      names=None if name is None else [name], preset=preset, model=model,
                      feedback=feedback, n=n, device=device, n_steps=n_steps,
                      fallback=fallback, normalize_flux=normalize_flux, pad=pad,
                      control_steps=control_steps, fallback_prior=fallback_prior,
                      compile=compile, solver=solver, base_solver=base_solver)[0]  # fmt: skip


def summary_row(samples: PosteriorSamples) -> dict[str, Any]:
    """Summary columns of one posterior: ``<param>_<q>`` for ``SUMMARY_QUANTILES``.

    Args:
        samples: Posterior samples, ``(N, D)``.

    Returns:
        Column name -> astropy ``Quantity`` (registry unit) or float (dimensionless).
    """
    import astropy.units as u

    units = {p.name: p.unit for p in REGISTRY}
    q = samples.quantiles(tuple(SUMMARY_QUANTILES.values())).cpu().numpy()
    row: dict[str, Any] = {}
    for i, name in enumerate(samples.names):
        unit = units.get(name) or ""
        for j, suffix in enumerate(SUMMARY_QUANTILES):
            value = float(q[j, i])
            row[f"{name}_{suffix}"] = value * u.Unit(unit) if unit else value
    return row


def summary_table(result: FitResult) -> Table:
    """One-row summary table of a fit: quantiles, diagnostics and ``reliable``.

    Args:
        result: The fit.

    Returns:
        Astropy table with ``id``, the ``summary_row`` columns, the ``Diagnostics`` fields,
        ``preset``, ``feedback``, ``method`` and ``n_samples``.
    """
    import astropy.units as u
    from astropy.table import QTable, Table

    row = summary_row(result.samples)
    diag = dataclasses.asdict(result.diagnostics)
    table = QTable(
        meta={
            "lensflow_version": __version__,
            "quantiles": dict(SUMMARY_QUANTILES),
            "method": result.samples.method,
        }
    )
    table["id"] = [result.name]
    for key, value in row.items():
        table[key] = [value.value] * value.unit if isinstance(value, u.Quantity) else [value]
    for key, value in diag.items():
        table[key] = [value]
    table["psf_fwhm_arcsec"].unit = u.arcsec
    table["preset"] = [result.preset]
    table["feedback"] = [result.feedback]
    table["method"] = [result.samples.method]
    table["n_samples"] = [int(result.samples.theta.shape[0])]
    fb = result.fallback or {}
    table["fallback"] = [fb.get("method", "")]
    table["fallback_converged"] = [bool(fb.get("converged", False))]
    table["flow_reliable"] = [bool(fb["flow_diagnostics"]["reliable"]) if fb else
                              result.diagnostics.reliable]  # fmt: skip
    return Table(table)


def _temp_path(path: Path) -> Path:
    """A fresh hidden temporary file beside ``path`` with the same suffix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix,
                               dir=path.parent)  # fmt: skip
    os.close(fd)
    return Path(tmp)


def atomic_write(path: Path, write: Callable[[Path], object], *, fsync: bool = False) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``.

    No reader ever sees a partial file; the result is world-readable (``0644``).

    Args:
        path: Destination file.
        write: Writes the content to the path it is given.
        fsync: Flush the file to disk before the rename (for files that mark progress, like a
            catalog lens's ``result.json``).

    Returns:
        ``path``.
    """
    tmp = _temp_path(path)
    try:
        write(Path(tmp))
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _output_folder(out: str | Path) -> Path:
    """``out`` as a folder, created; a one-line error when it is something else."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_fit(
    result: FitResult,
    out: str | Path,
    *,
    plots: bool = True,
    corner_params: Sequence[str] | None = CORNER_PARAMS,
) -> dict[str, Path]:
    """Write a fit into a folder, each file atomically (temporary file + rename).

    Files: ``samples.fits`` (binary table, one column per registry name, units set),
    ``summary.ecsv`` (``summary_table``), ``provenance.json`` and, with ``plots``,
    ``corner.pdf``, ``corner.png`` and ``residuals.png``.

    Args:
        result: The fit.
        out: Output folder (created).
        plots: Also write the figures (needs matplotlib and corner).
        corner_params: Parameters of the corner plot (``None``: all 21).

    Returns:
        File role -> path written.
    """
    out = _output_folder(out)
    written: dict[str, Path] = {}
    samples = samples_table(result.samples)
    samples.meta.update({"LENSID": result.name, "METHOD": result.samples.method,
                         "SEED": result.seed, "LFVERS": __version__})  # fmt: skip
    written["samples"] = atomic_write(
        out / "samples.fits", lambda p: samples.write(p, format="fits", overwrite=True)
    )
    summary = summary_table(result)
    written["summary"] = atomic_write(
        out / "summary.ecsv", lambda p: summary.write(p, format="ascii.ecsv", overwrite=True)
    )
    if plots:
        from lensflow import plots as lp

        title = f"{result.name} ({result.preset}, {result.samples.method})"
        # One corner figure saved twice (drawing 21x21 panels is the slow part).
        targets = {"corner_pdf": out / "corner.pdf", "corner_png": out / "corner.png"}
        tmps = {k: _temp_path(p) for k, p in targets.items()}
        try:
            lp.corner_plot(result.samples, list(tmps.values()), params=corner_params,
                           title=title)  # fmt: skip
            for key, path in targets.items():
                os.chmod(tmps[key], 0o644)
                os.replace(tmps[key], path)
                written[key] = path
        finally:
            for tmp in tmps.values():
                tmp.unlink(missing_ok=True)
        written["residuals"] = atomic_write(
            out / "residuals.png",
            lambda p: lp.residual_plot(result.observation, result.model_image, p,
                                       source=result.source_image, title=title),
        )  # fmt: skip
    provenance = {
        **result.provenance,
        "diagnostics": dataclasses.asdict(result.diagnostics),
        "timings_s": result.timings,
        "outputs": {k: v.name for k, v in written.items()},
    }
    written["provenance"] = atomic_write(
        out / "provenance.json",
        lambda p: p.write_text(json.dumps(provenance, indent=2, default=str) + "\n"),
    )
    return written


def fit(
    image: str | Path,
    *,
    noise: str | Path | None = None,
    weight: str | Path | None = None,
    psf: str | Path | None = None,
    pixel_scale: float | None = None,
    band: str | None = None,
    mask: str | Path | None = None,
    center_radec: tuple[float, float] | None = None,
    center_pix: tuple[float, float] | None = None,
    preset: str = "auto",
    feedback: str = "auto",
    n: int = 10_000,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    plots: bool = True,
    fallback: str = "none",
    normalize_flux: bool | None = None,
) -> PosteriorSamples:
    """Fit one observed lens from its files in one call (what ``lensflow fit`` runs).

    Args:
        image: Image file (FITS, multi-extension FITS with ``band``, or lenstronomy HDF5).
        noise: Noise (sigma) map file; or ``weight``, an inverse-variance map.
        weight: Weight map file.
        psf: PSF kernel file.
        pixel_scale: Pixel scale in arcsec (overrides the header).
        band: Band of a multi-extension file.
        mask: Mask file (nonzero = excluded).
        center_radec: Lens centre ``(RA, Dec)``, degrees.
        center_pix: Lens centre, 0-based pixel ``(x, y)``.
        preset: ``"auto"`` (by pixel scale), ``"hst"`` or ``"euclid"``.
        feedback: ``"auto"``, ``"gradient"``, ``"learned"`` or ``"none"``.
        n: Number of posterior samples.
        seed: Seed of the base noise.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        out: Optional output folder for ``write_fit``.
        plots: Write the figures into ``out``.
        fallback: ``"mcmc"`` re-runs the lens with emcee when it is flagged unreliable,
            ``"smc"`` with tempered SMC (``run_fallback``).
        normalize_flux: Sample in normalized flux units (see ``fit_lenses``).

    Returns:
        The posterior samples, ``theta`` ``(n, 21)`` in physical units (``method`` says
        which sampler produced them).
    """
    obs = load_observation(image, noise=noise, weight=weight, psf=psf,
                           pixel_scale_arcsec=pixel_scale, band=band, mask=mask)  # fmt: skip
    result = fit_lens(obs, seed=seed, center_pix=center_pix, center_radec=center_radec,
                      preset=preset, feedback=feedback, n=n, device=device,
                      fallback=fallback, normalize_flux=normalize_flux)  # fmt: skip
    if out is not None:
        write_fit(result, out, plots=plots)
    return result.samples
