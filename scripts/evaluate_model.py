"""Accuracy, calibration and fit quality of a trained posterior on held-out simulated lenses.

Simulates ``--n-lenses`` fresh lenses over the model's own PSF and depth ranges
(``SimulatedPairs`` with a seed not used in training), draws ``--n-samples`` posterior
samples each and prints markdown tables:

* per parameter: median |posterior mean - truth|, median posterior std, prior std, coverage
  of the central 68% and 95% intervals (``lensflow.metrics.interval_coverage``), and the 68%
  coverage split at the median PSF FWHM (sharp / broad) and the median background RMS
  (deep / shallow);
* a summary per subset (all, sharp, broad, deep, shallow): theta_E relative error, mean
  per-parameter coverage, joint coverage by TARP (``lensflow.metrics.tarp_coverage`` in the
  flow's standardized space) and the reduced chi^2 of images re-simulated from posterior
  samples (``--chi2-samples`` per lens, through ``LensSimulator`` with the lens's own PSF),
  against the reduced chi^2 of the true parameters. Reduced chi^2 here is
  ``chi^2 / n_pixels``: the truth gives 1 on average, and so do samples of a calibrated
  posterior (in the Gaussian-linear limit, E[chi^2] = n_pixels for a posterior draw).

With ``--lenstronomy N`` the first ``N`` lenses are also rendered by lenstronomy through the
adapter (``baselines.lenstronomy.render_lenstronomy``) with the same parameters, PSF,
background, exposure and standard-normal noise draws, and the same metrics are computed on
them (the cross-simulator check); the caustics metrics of the same ``N`` lenses are printed
next to them. ``--lenstronomy-numerics matched`` (default) renders with the simulator's own
numerics (images agree to ~1e-10 of the peak, so the check only confirms the adapter);
``independent`` renders with lenstronomy's own numerics (6-fold supersampling, native-pixel
convolution with the pixel-integrated PSF), a different discretization of the same model
that differs from the training simulator by several per cent of the peak: a check the
model can fail. The re-simulated chi^2 still uses the lensflow simulator, so the truth's
chi^2 there measures the simulators' disagreement.

Example::

    python scripts/evaluate_model.py --model euclid --n-lenses 1000 --n-samples 200 \
        --lenstronomy 200 --json runs/euclid_eval.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from lensflow.checkpoint import TrainedPosterior, load_model
from lensflow.config import data_preset
from lensflow.data import Pairs, SimulatedPairs
from lensflow.metrics import interval_coverage, tarp_coverage
from lensflow.params import REGISTRY
from lensflow.prior import TRAINING_PRIORS
from lensflow.simulator import chi2
from lensflow.solvers import SOLVERS
from lensflow.train import device_description


def draw_samples(
    model: TrainedPosterior, x: Tensor, n: int, n_steps: int, seed: int, chunk: int = 50,
    solver: str | None = None,
) -> tuple[Tensor, float]:  # fmt: skip
    """Posterior samples ``(n, B, D)`` (physical units) of inputs ``x`` ``(B, 4, H, W)``.

    Returns the samples and the wall time in s.
    """
    device = next(model.posterior.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    start = time.perf_counter()
    out = [
        model.posterior.sample(
            x[i : i + chunk].to(device), n, n_steps=n_steps, solver=solver, generator=g
        ).cpu()
        for i in tqdm(range(0, x.shape[0], chunk), desc="sample", leave=False)
    ]
    return torch.cat(out, dim=1), time.perf_counter() - start


def reduced_chi2(
    source: SimulatedPairs, theta: Tensor, image: Tensor, sigma: Tensor, k: Tensor,
    chunk: int = 50,
) -> Tensor:  # fmt: skip
    """``chi^2 / n_pixels`` of images re-simulated from ``theta`` ``(K, B, D)``, shape ``(K, B)``.

    The images are simulated on ``source``'s device; the result is on the CPU.
    """
    dev = source.device
    theta, image, sigma, k = (a.to(dev) for a in (theta, image, sigma, k))
    n_pix = image.shape[-1] * image.shape[-2]
    n_k = theta.shape[0]
    out = []
    for i in tqdm(range(0, image.shape[0], chunk), desc="chi2", leave=False):
        th = theta[:, i : i + chunk]
        b = th.shape[1]
        flat = th.reshape(n_k * b, -1)
        model = source.noiseless(flat, k[i : i + chunk].repeat(n_k)).reshape(
            n_k, b, *image.shape[1:]
        )
        out.append((chi2(model, image[i : i + chunk], sigma[i : i + chunk]) / n_pix).cpu())
    return torch.cat(out, dim=1)


def summarize(
    model: TrainedPosterior, theta: Tensor, truth: Tensor, chi2_post: Tensor, chi2_true: Tensor,
    seed: int,
) -> dict[str, Any]:  # fmt: skip
    """Summary numbers of one subset: samples ``(N, B, D)``, truth ``(B, D)``, chi2 ``(K, B)``."""
    cov = interval_coverage(theta, truth, levels=(0.68, 0.95)).coverage  # (2, D)
    device = next(model.posterior.parameters()).device
    to_u = lambda th: model.posterior.transform.to_u(th.to(device)).cpu()
    tarp = tarp_coverage(to_u(theta.double()), to_u(truth.double()), levels=(0.68, 0.95),
                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
    mean = theta.mean(0)
    rel = ((mean[:, 0] - truth[:, 0]).abs() / truth[:, 0]).quantile(torch.tensor([0.5, 0.9]))
    return {
        "n_lenses": int(truth.shape[0]),
        "theta_e_rel_error_median": float(rel[0]), "theta_e_rel_error_p90": float(rel[1]),
        "theta_e_median_std": float(theta[:, :, 0].std(0).median()),
        "mean_coverage68": float(cov[0].mean()), "mean_coverage95": float(cov[1].mean()),
        "n_params_outside_005_at_68": int(((cov[0] - 0.68).abs() > 0.05).sum()),
        "n_params_outside_005_at_95": int(((cov[1] - 0.95).abs() > 0.05).sum()),
        "tarp_coverage68": float(tarp.coverage[0]), "tarp_coverage95": float(tarp.coverage[1]),
        "reduced_chi2_posterior_mean": float(chi2_post.mean()),
        "reduced_chi2_posterior_median": float(chi2_post.median()),
        "reduced_chi2_truth_mean": float(chi2_true.mean()),
    }  # fmt: skip


def evaluate(
    model: TrainedPosterior, source: SimulatedPairs, test: Pairs, args: argparse.Namespace,
    label: str,
) -> dict[str, Any]:  # fmt: skip
    """All metrics of one test set; prints the tables and returns the numbers."""
    theta, seconds = draw_samples(model, test.x, args.n_samples, args.n_steps, args.seed + 1,
                                  chunk=args.lens_chunk, solver=args.solver)  # fmt: skip
    truth = test.theta
    k = source.psf_index(test.psf_fwhm_arcsec)
    n_k = min(args.chi2_samples, args.n_samples)
    start = time.perf_counter()
    sim = source if args.device == "cpu" else SimulatedPairs(model.simulator, source.data_config,
                                                              device=args.device)  # fmt: skip
    chi2_post = reduced_chi2(sim, theta[:n_k], test.image, test.sigma, k)
    chi2_true = reduced_chi2(sim, truth[None], test.image, test.sigma, k)[0]
    chi2_seconds = time.perf_counter() - start
    bad = int((~torch.isfinite(theta)).any(-1).any(0).sum())
    if bad:
        print(f"warning: {bad} lenses have non-finite samples")
    # PSF: below / above the middle of the FWHM range (a grid value at the middle, as for
    # an odd n_psf_grid, is in neither); depth: below / above the median background RMS.
    fwhm, rms = test.psf_fwhm_arcsec, test.background_rms
    mid = (model.data.psf_fwhm_min_arcsec + model.data.psf_fwhm_max_arcsec) / 2
    sharp, broad = fwhm < mid - 1e-6, fwhm > mid + 1e-6
    shallow = rms >= rms.median()
    subsets = {"all": torch.ones_like(sharp), "sharp PSF": sharp, "broad PSF": broad,
               "deep": ~shallow, "shallow": shallow}  # fmt: skip
    subsets = {name: m for name, m in subsets.items() if m.any()}  # tiny sets: skip empty ones
    summary = {
        name: summarize(model, theta[:, m], truth[m], chi2_post[:, m], chi2_true[m],
                        args.seed + 2)
        for name, m in subsets.items()
    }  # fmt: skip
    cov = interval_coverage(theta, truth, levels=(0.68, 0.95)).coverage
    c68 = interval_coverage(theta, truth, levels=(0.68,))
    split = {name: interval_coverage(theta[:, m], truth[m], levels=(0.68,)).coverage[0]
             for name, m in subsets.items() if name != "all"}  # fmt: skip
    mean, std = theta.mean(0), theta.std(0)
    prior_std = torch.tensor([(q.prior_high - q.prior_low) / 12**0.5 for q in model.prior_specs])
    print(f"\n## {label}: {test.theta.shape[0]} lenses x {args.n_samples} samples, "
          f"{args.n_steps} {args.solver or model.flow.solver} steps, sampling {seconds:.1f} s, "
          f"chi2 ({n_k} samples per lens) {chi2_seconds:.1f} s; 68% stderr "
          f"{float(c68.stderr[0]):.3f}\n")  # fmt: skip
    print("| parameter | unit | median abs error of mean | median posterior std | "
          "prior std | coverage 68% | coverage 95% | 68%: sharp / broad PSF | "
          "68%: deep / shallow |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for j, spec in enumerate(REGISTRY):
        row = {
            "name": spec.name, "unit": spec.unit,
            "median_abs_error": float((mean[:, j] - truth[:, j]).abs().median()),
            "median_std": float(std[:, j].median()), "prior_std": float(prior_std[j]),
            "coverage68": float(cov[0, j]), "coverage95": float(cov[1, j]),
            **{f"coverage68_{n.split()[0]}": float(v[j]) for n, v in split.items()},
        }  # fmt: skip
        rows.append(row)
        print(f"| `{spec.name}` | {spec.unit or '-'} | {row['median_abs_error']:.3g} | "
              f"{row['median_std']:.3g} | {row['prior_std']:.3g} | {row['coverage68']:.2f} | "
              f"{row['coverage95']:.2f} | {row.get('coverage68_sharp', float('nan')):.2f} / "
              f"{row.get('coverage68_broad', float('nan')):.2f} | {row.get('coverage68_deep', float('nan')):.2f} / "
              f"{row.get('coverage68_shallow', float('nan')):.2f} |")  # fmt: skip
    print("\n| subset | lenses | theta_E rel. error median / p90 | mean coverage 68% / 95% | "
          "params outside +/-0.05 (68% / 95%) | TARP 68% / 95% | reduced chi2: posterior "
          "samples mean (median) / truth mean |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['n_lenses']} | {100 * s['theta_e_rel_error_median']:.2f}% / "
              f"{100 * s['theta_e_rel_error_p90']:.1f}% | {s['mean_coverage68']:.3f} / "
              f"{s['mean_coverage95']:.3f} | {s['n_params_outside_005_at_68']} / "
              f"{s['n_params_outside_005_at_95']} | {s['tarp_coverage68']:.3f} / "
              f"{s['tarp_coverage95']:.3f} | {s['reduced_chi2_posterior_mean']:.3f} "
              f"({s['reduced_chi2_posterior_median']:.3f}) / "
              f"{s['reduced_chi2_truth_mean']:.3f} |")  # fmt: skip
    return {"label": label, "sampling_s": seconds, "chi2_s": chi2_seconds,
            "chi2_samples_per_lens": n_k, "nonfinite_lenses": bad, "summary": summary,
            "parameters": rows}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="euclid", help="shipped preset or checkpoint path")
    p.add_argument("--n-lenses", type=int, default=200)
    p.add_argument("--n-samples", type=int, default=200)
    p.add_argument("--n-steps", type=int, default=32)
    p.add_argument("--solver", default=None, choices=sorted(SOLVERS),
                   help="ODE solver (default: the model's own: midpoint)")  # fmt: skip
    p.add_argument("--chi2-samples", type=int, default=20, help="re-simulated samples per lens")
    p.add_argument(
        "--lenstronomy", type=int, default=0, help="lenses for the cross-simulator check"
    )
    p.add_argument(
        "--lenstronomy-numerics", choices=["matched", "independent"], default="matched",
        help="lenstronomy rendering: the simulator's numerics, or lenstronomy's own "
        "(6x supersampling, native-pixel PSF convolution)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=20261125)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.add_argument("--device", default="cpu",
                   help="sampling and chi^2 device; the test lenses are always simulated on "
                   "the CPU, so every device sees the same lenses")  # fmt: skip
    p.add_argument("--lens-chunk", type=int, default=50, help="lenses per sampling call")
    p.add_argument("--test-data", metavar="PRESET",
                   help="draw the test lenses from this preset's PSF and depth ranges instead "
                   "of the model's own (e.g. a model trained over a wider depth range, "
                   "tested on the standard one)")  # fmt: skip
    p.add_argument("--test-prior", choices=TRAINING_PRIORS,
                   help="draw the test lenses' parameters from this prior (default: the "
                   "model's training prior), e.g. default to compare a broad-prior model with "
                   "the shipped ones on their own lenses")  # fmt: skip
    p.add_argument("--mask-probability", type=float, default=0.0,
                   help="fraction of test lenses with random likelihood masks (default 0: "
                   "unmasked, whatever the model was trained with)")  # fmt: skip
    args = p.parse_args()
    if args.n_lenses < 2 or args.n_samples < 2 or not 0 <= args.lenstronomy <= args.n_lenses:
        p.error("need --n-lenses >= 2, --n-samples >= 2 and 0 <= --lenstronomy <= --n-lenses")
    torch.set_num_threads(args.threads)
    if args.lenstronomy:  # import now: a late import could meet files other work is editing
        from lensflow.baselines.lenstronomy import lenstronomy_pairs

    model = load_model(args.model)
    model.posterior.to(args.device)
    data = dataclasses.replace(model.data, mask_probability=args.mask_probability)
    if args.test_data is not None:  # another preset's seeing and depth, in the model's units
        data = dataclasses.replace(data_preset(args.test_data),
                                   mask_probability=args.mask_probability,
                                   normalize_flux=model.data.normalize_flux)  # fmt: skip
        if (
            model.data.normalize_flux
            and abs(data.reference_rms / model.data.reference_rms - 1) > 1e-9
        ):
            p.error(f"--test-data {args.test_data}: reference_rms {data.reference_rms:.4g} differs "
                    f"from the normalized model's {model.data.reference_rms:.4g}")  # fmt: skip
    data = dataclasses.replace(data, prior=args.test_prior or model.data.prior)
    source = SimulatedPairs(model.simulator, data)
    start = time.perf_counter()
    test = source.sample(args.n_lenses, generator=torch.Generator().manual_seed(args.seed))
    print(f"simulated {args.n_lenses} test lenses in {time.perf_counter() - start:.1f} s")
    results: dict[str, Any] = {"args": vars(args), "model_training": model.meta.get("training"),
                               "device": device_description(args.device)}  # fmt: skip
    results["caustics"] = evaluate(model, source, test, args, "caustics (lensflow simulator)")
    if args.lenstronomy:
        sub = test.select(torch.arange(args.lenstronomy))
        start = time.perf_counter()
        lt = lenstronomy_pairs(source, sub, args.lenstronomy_numerics)
        print(f"\nrendered {args.lenstronomy} lenses with lenstronomy in "
              f"{time.perf_counter() - start:.1f} s")  # fmt: skip
        results["caustics_subset"] = evaluate(
            model, source, sub, args, f"caustics, first {args.lenstronomy} lenses"
        )
        results["lenstronomy"] = evaluate(model, source, lt, args,
                                          f"lenstronomy ({args.lenstronomy_numerics} numerics), same {args.lenstronomy} lenses")  # fmt: skip
        diff = (lt.image - sub.image).abs().amax(dim=(-2, -1)) / sub.image.abs().amax(dim=(-2, -1))
        results["lenstronomy"]["max_abs_image_difference_over_peak_median"] = float(diff.median())
        print(f"\nmedian over lenses of max|lenstronomy - caustics| / peak (noisy images, same noise draws): "
              f"{float(diff.median()):.2e}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
