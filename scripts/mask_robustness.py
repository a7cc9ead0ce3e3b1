"""How a likelihood mask larger than the training masks degrades the flow's posterior.

Held-out simulated lenses (``data.SimulatedPairs`` over the model's PSF grid and depth
ranges, seed ``--seed``) are drawn twice, identical except for their masks (masks are
drawn last): with the model's training masks, and with every lens masked by
``data.random_masks`` at ``--max-fraction`` (0.9: discs and bad pixels covering 0-40% of
the pixels). The flow alone samples each (``sampling.sample_posteriors``, one seed per
lens); per lens this records the masked fraction, the relative theta_E error of the
posterior mean and the fraction of the 21 parameters inside their central 68% / 95%
intervals. Prints both sets binned by masked fraction and writes JSON::

    python scripts/mask_robustness.py --model euclid --n-lenses 300 --json out.json

``data.training_masked_fraction`` gives the largest fraction the model saw in training;
``fit.diagnose`` flags a cut observation beyond it (docs/fit.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import torch

from lensflow.checkpoint import load_model
from lensflow.data import SimulatedPairs, training_masked_fraction
from lensflow.metrics import interval_coverage
from lensflow.sampling import sample_posteriors

BINS = (0.0, 0.03, 0.06, 0.09, 0.12, 0.15, 0.2, 0.4)


def per_lens(model, data, n: int, n_samples: int, seed: int) -> dict[str, list[float]]:
    """Masked fraction, theta_E relative error and 68/95% coverage of each lens."""
    source = SimulatedPairs(model.simulator, data)
    test = source.sample(n, generator=torch.Generator().manual_seed(seed))
    samples = sample_posteriors(source.observations(test), model, n_samples,
                                seeds=[seed * 1000 + i for i in range(n)], chunk=25)  # fmt: skip
    theta = torch.stack([s.theta for s in samples], dim=1)  # (M, N, D)
    truth = test.theta.to(theta)
    # Per lens: the fraction of its parameters inside their central intervals, (2, N).
    inside = torch.stack([
        interval_coverage(theta[:, i : i + 1], truth[i : i + 1]).coverage.mean(-1)
        for i in range(n)
    ], dim=1)  # fmt: skip
    theta_e = (theta.mean(0)[:, 0] - truth[:, 0]).abs() / truth[:, 0]
    return {
        "masked_fraction": (1 - test.mask.double().mean(dim=(1, 2))).tolist(),
        "theta_e_rel_error": theta_e.tolist(),
        "coverage68": inside[0].tolist(),
        "coverage95": inside[1].tolist(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="euclid", help="shipped preset or checkpoint path")
    p.add_argument("--n-lenses", type=int, default=300)
    p.add_argument("--n-samples", type=int, default=100)
    p.add_argument("--max-fraction", type=float, default=0.9,
                   help="random_masks max_fraction of the large-mask set")  # fmt: skip
    p.add_argument("--seed", type=int, default=20261125)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    sets = {
        "training masks": model.data,
        "large masks": dataclasses.replace(
            model.data, mask_probability=1.0, mask_max_fraction=args.max_fraction
        ),
    }
    results = {name: per_lens(model, data, args.n_lenses, args.n_samples, args.seed)
               for name, data in sets.items()}  # fmt: skip
    trained = training_masked_fraction(model.data)
    print(f"model {args.model}: training masks cover at most {trained:.3f} of the pixels; "
          f"{args.n_lenses} lenses x {args.n_samples} samples, flow alone")  # fmt: skip
    print("| masks | masked fraction | lenses | θ_E error (median) | coverage 68% / 95% |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        frac = torch.tensor(r["masked_fraction"])
        err = torch.tensor(r["theta_e_rel_error"])
        c68, c95 = torch.tensor(r["coverage68"]), torch.tensor(r["coverage95"])
        bins = [("none", frac == 0)] + [
            (f"{lo:.2f}-{hi:.2f}", (frac > lo) & (frac <= hi))
            for lo, hi in itertools.pairwise(BINS)
        ]
        for label, pick in bins:
            if int(pick.sum()) == 0:
                continue
            print(f"| {name} | {label} | {int(pick.sum())} | {100 * float(err[pick].median()):.1f}% "
                  f"| {float(c68[pick].mean()):.3f} / {float(c95[pick].mean()):.3f} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "training_masked_fraction": trained,
                       "results": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
