"""Accuracy and calibration of a trained posterior on held-out simulated lenses.

Simulates ``--n-lenses`` fresh lenses over the model's own PSF and depth ranges (a seed
not used in training), draws ``--n-samples`` posterior samples each and prints a markdown
table per parameter: median |posterior mean - truth|, median posterior std, and the
coverage of the central 68% and 95% intervals, plus coverage split by PSF FWHM and depth.
Coverage is computed inline (equal-tailed marginal intervals) until lensflow.metrics lands.

Example::

    python scripts/evaluate_model.py --model euclid --n-lenses 200 --n-samples 200
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lensflow.checkpoint import load_model
from lensflow.data import SimulatedPairs
from lensflow.params import REGISTRY


def _coverage(theta: torch.Tensor, truth: torch.Tensor, level: float) -> torch.Tensor:
    """Fraction of lenses whose truth lies in the central ``level`` interval, per parameter."""
    a = (1 - level) / 2
    q = torch.quantile(theta, torch.tensor([a, 1 - a]), dim=0)
    return ((truth >= q[0]) & (truth <= q[1])).float()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="euclid")
    p.add_argument("--n-lenses", type=int, default=200)
    p.add_argument("--n-samples", type=int, default=200)
    p.add_argument("--n-steps", type=int, default=32)
    p.add_argument("--seed", type=int, default=20261125)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="also write the numbers to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    source = SimulatedPairs(model.simulator, model.data)
    test = source.sample(args.n_lenses, generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    chunks = []
    g = torch.Generator().manual_seed(args.seed + 1)
    for i in range(0, args.n_lenses, 50):
        x = test.x[i : i + 50]
        chunks.append(model.posterior.sample(x, args.n_samples, n_steps=args.n_steps, generator=g))
    theta = torch.cat(chunks, dim=1)  # (n_samples, n_lenses, D)
    seconds = time.perf_counter() - start
    truth = test.theta
    mean, std = theta.mean(0), theta.std(0)
    c68, c95 = _coverage(theta, truth, 0.68), _coverage(theta, truth, 0.95)
    fwhm, rms = test.psf_fwhm_arcsec, test.background_rms
    sharp, shallow = fwhm <= fwhm.median(), rms >= rms.median()
    prior_std = torch.tensor([(q.prior_high - q.prior_low) / 12**0.5 for q in REGISTRY])
    rows = []
    print(f"{args.n_lenses} lenses x {args.n_samples} samples, {args.n_steps} midpoint steps, "
          f"sampling {seconds:.1f} s")  # fmt: skip
    print("| parameter | unit | median abs error of mean | median posterior std | "
          "prior std | coverage 68% | coverage 95% | 68%: sharp / broad PSF | "
          "68%: deep / shallow |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for j, spec in enumerate(REGISTRY):
        err = (mean[:, j] - truth[:, j]).abs().median()
        row = {
            "name": spec.name, "unit": spec.unit, "median_abs_error": float(err),
            "median_std": float(std[:, j].median()), "prior_std": float(prior_std[j]),
            "coverage68": float(c68[:, j].mean()), "coverage95": float(c95[:, j].mean()),
            "coverage68_sharp": float(c68[sharp, j].mean()),
            "coverage68_broad": float(c68[~sharp, j].mean()),
            "coverage68_deep": float(c68[~shallow, j].mean()),
            "coverage68_shallow": float(c68[shallow, j].mean()),
        }  # fmt: skip
        rows.append(row)
        print(f"| `{spec.name}` | {spec.unit or '-'} | {row['median_abs_error']:.3g} | "
              f"{row['median_std']:.3g} | {row['prior_std']:.3g} | {row['coverage68']:.2f} | "
              f"{row['coverage95']:.2f} | {row['coverage68_sharp']:.2f} / "
              f"{row['coverage68_broad']:.2f} | {row['coverage68_deep']:.2f} / "
              f"{row['coverage68_shallow']:.2f} |")  # fmt: skip
    rel = ((mean[:, 0] - truth[:, 0]).abs() / truth[:, 0]).quantile(torch.tensor([0.5, 0.9]))
    summary = {
        "n_lenses": args.n_lenses, "n_samples": args.n_samples, "n_steps": args.n_steps,
        "sampling_s": seconds, "theta_e_rel_error_median": float(rel[0]),
        "theta_e_rel_error_p90": float(rel[1]),
        "mean_coverage68": float(c68.mean()), "mean_coverage95": float(c95.mean()),
        "n_params_outside_005_at_68": int(((c68.mean(0) - 0.68).abs() > 0.05).sum()),
        "n_params_outside_005_at_95": int(((c95.mean(0) - 0.95).abs() > 0.05).sum()),
    }  # fmt: skip
    try:  # joint calibration by TARP, in the flow's standardized space
        from lensflow.metrics import tarp_coverage

        to_u = model.posterior.transform.to_u
        curve = tarp_coverage(to_u(theta.double()), to_u(truth.double()), levels=(0.68, 0.95),
                              generator=torch.Generator().manual_seed(args.seed + 2))  # fmt: skip
        summary["tarp_coverage68"], summary["tarp_coverage95"] = curve.coverage.tolist()
    except ImportError:
        pass
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "parameters": rows}, f, indent=1)


if __name__ == "__main__":
    main()
