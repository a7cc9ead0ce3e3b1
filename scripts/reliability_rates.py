"""How often the ``reliable`` flag of ``lensflow.fit`` fires, on good and on mismatched inputs.

Held-out simulated lenses from the preset's training ranges (PSF and depth vary per lens;
seed not used in training) are fitted with ``fit.fit_lenses`` under these conditions:

* ``good``: the observation as simulated (native-pixel Gaussian PSF kernel of the true
  FWHM, per-pixel noise map);
* ``wrong_psf``: the PSF kernel handed over is 1.5x wider than the one that made the image;
* ``wrong_pixel_scale``: the pixel scale is declared 20% larger than it is;
* ``outside_prior``: theta_E drawn from 2.4-3.0" (the prior ends at 2.0");
* ``large_mask``: the good lenses under random masks larger than training's
  (``data.random_masks`` with ``max_fraction`` 0.9: discs and bad pixels covering 0-40%
  of the pixels, 13% on average; the model saw at most 9%).

Prints a Markdown table and writes JSON. Example (docs/fit.md)::

    python scripts/reliability_rates.py --preset euclid --n-lenses 100 --n-samples 200 \\
        --json docs/reliability-rates.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings

import torch

from lensflow.config import DATA_PRESETS, PRESETS
from lensflow.data import random_masks
from lensflow.fit import fit_lenses
from lensflow.observation import Observation
from lensflow.params import NAMES
from lensflow.prior import Prior
from lensflow.simulator import LensSimulator, NoiseModel, gaussian_psf

CONDITIONS = ("good", "wrong_psf", "wrong_pixel_scale", "outside_prior", "large_mask")
REASONS = {"fit poorly": "chi2", "structured": "coherence", "PSF FWHM": "psf", "noise": "noise",
           "training prior": "prior", "masked fraction": "mask", "edge of the prior": "edge"}  # fmt: skip


def _lenses(preset: str, n: int, seed: int, condition: str) -> list[Observation]:
    cfg, data = PRESETS[preset], DATA_PRESETS[preset]
    g = torch.Generator().manual_seed(seed)
    prior = Prior(dtype=torch.float64)
    theta = prior.sample((n,), generator=g)
    if condition == "outside_prior":
        theta[:, NAMES.index("lens_theta_e")] = 2.4 + 0.6 * torch.rand(n, generator=g)
    fwhm = data.psf_fwhm_min_arcsec + (data.psf_fwhm_max_arcsec - data.psf_fwhm_min_arcsec) * (
        torch.rand(n, generator=g, dtype=torch.float64)
    )
    log_rms = torch.empty(n, dtype=torch.float64).uniform_(
        *map(float, torch.log(torch.tensor([data.background_rms_min, data.background_rms_max]))),
        generator=g,
    )
    log_t = torch.empty(n, dtype=torch.float64).uniform_(
        *map(float, torch.log(torch.tensor([data.exposure_time_min_s, data.exposure_time_max_s]))),
        generator=g,
    )
    out = []
    for i in range(n):
        psf = gaussian_psf(float(fwhm[i]), cfg.pixel_scale_arcsec)
        sim = LensSimulator(cfg, psf_kernel=psf, dtype=torch.float64)
        clean = sim(theta[i])
        noise = NoiseModel(float(log_rms[i].exp()), float(log_t[i].exp()))
        image = noise.sample(clean, generator=g)
        scale = cfg.pixel_scale_arcsec
        given_psf = psf
        if condition == "wrong_psf":
            given_psf = gaussian_psf(1.5 * float(fwhm[i]), cfg.pixel_scale_arcsec)
        if condition == "wrong_pixel_scale":
            scale *= 1.2
        out.append(
            Observation(image, noise.sigma(clean), given_psf, scale,
                        torch.ones_like(image, dtype=torch.bool), name=f"{condition}{i}")
        )  # fmt: skip
    if condition == "large_mask":  # own generator: the lenses stay those of "good"
        masks = random_masks(n, out[0].shape, probability=1.0, max_fraction=0.9,
                             generator=torch.Generator().manual_seed(seed + 1))  # fmt: skip
        out = [dataclasses.replace(o, mask=m) for o, m in zip(out, masks, strict=True)]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="euclid")
    p.add_argument("--n-lenses", type=int, default=100)
    p.add_argument("--n-samples", type=int, default=200)
    p.add_argument("--feedback", default="auto")
    p.add_argument("--seed", type=int, default=20261126)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for condition in args.conditions:
        obs = _lenses(args.preset, args.n_lenses, args.seed, condition)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():  # the wrong pixel scale's resampling warning
                warnings.filterwarnings("ignore", message=".*correlates output pixels")
                results = fit_lenses(obs, preset=args.preset, n=args.n_samples,
                                     feedback=args.feedback,
                                     seeds=list(range(len(obs))))  # fmt: skip
        except ValueError as err:  # e.g. a declared pixel scale the cut cannot serve
            rows.append({"condition": condition, "error": str(err)})
            continue
        wall = time.perf_counter() - t0
        flagged = [not r.diagnostics.reliable for r in results]
        by_reason = {
            key: sum(text in r.diagnostics.reason for r in results) / len(results)
            for text, key in REASONS.items()
        }
        chi2 = torch.tensor([r.diagnostics.chi2_red_samples for r in results])
        coh = torch.tensor([r.diagnostics.residual_coherence for r in results])
        q10, q50, q90 = chi2.double().quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
        rows.append({
            "condition": condition,
            "n_lenses": len(results),
            "flagged": sum(flagged) / len(results),
            "by_reason": by_reason,
            "chi2_red_samples_median": float(q50),
            "chi2_red_samples_p10_p90": [float(q10), float(q90)],
            "residual_coherence_median": float(coh.nanmedian()),
            "feedback": results[0].feedback,
            "wall_s": wall,
        })  # fmt: skip
    print(f"preset {args.preset}, {args.n_lenses} lenses per condition, {args.n_samples} samples, "
          f"feedback {args.feedback}")  # fmt: skip
    print("| condition | flagged | chi2 | coherence | PSF range | noise range | prior | mask | "
          "prior edge | median chi2_red of samples [10%, 90%] | median coherence | feedback |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['condition']} | error: {r['error']} ||||||||||")
            continue
        b = r["by_reason"]
        lo, hi = r["chi2_red_samples_p10_p90"]
        print(f"| {r['condition']} | {r['flagged']:.2f} | {b['chi2']:.2f} | {b['coherence']:.2f} "
              f"| {b['psf']:.2f} | {b['noise']:.2f} | {b['prior']:.2f} | {b['mask']:.2f} "
              f"| {b['edge']:.2f} "
              f"| {r['chi2_red_samples_median']:.3g} [{lo:.3g}, {hi:.3g}] "
              f"| {r['residual_coherence_median']:.2f} | {r['feedback']} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
