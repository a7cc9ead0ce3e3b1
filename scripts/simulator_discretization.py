"""Discretization error of the simulator's supersampling, against a finely supersampled render.

Renders prior draws with ``LensSimulator`` at ``upsample_factor`` 1, 2 and 4 and with
lenstronomy's independent numerics (``render_lenstronomy(numerics="independent")``), and
compares each with lenstronomy's matched render at 8-fold supersampling (the convolution at
the fine scale, as the simulator does: the nearest to the continuous model here). The
difference is expressed as the reduced chi^2 it adds at the preset's noise
(``NoiseModel.from_config``), i.e. what a perfect fit would show on real data because of
the discretization alone. Example (docs/training.md)::

    python scripts/simulator_discretization.py --preset euclid --n 200
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from lensflow.baselines.lenstronomy import render_lenstronomy
from lensflow.config import preset
from lensflow.prior import Prior
from lensflow.simulator import LensSimulator, NoiseModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="euclid")
    p.add_argument("--n", type=int, default=200, help="prior draws")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    cfg = preset(args.preset)
    theta = Prior().sample((args.n,), generator=torch.Generator().manual_seed(args.seed))
    theta = theta.double()
    fine = torch.as_tensor(render_lenstronomy(theta, dataclasses.replace(cfg, upsample_factor=8)))
    sigma = NoiseModel.from_config(cfg).sigma(fine)
    renders = {
        f"LensSimulator, {up}x supersampling": LensSimulator(
            dataclasses.replace(cfg, upsample_factor=up), dtype=torch.float64
        )(theta)
        for up in (1, 2, 4)
    }
    renders["lenstronomy, independent numerics"] = torch.as_tensor(
        render_lenstronomy(theta, cfg, numerics="independent")
    )
    print(f"{args.preset}: {args.n} prior draws against an 8x render, at the preset's noise")
    print("| render | added reduced chi^2: median | mean | 90th percentile |")
    print("|---|---|---|---|")
    for name, image in renders.items():
        chi2 = ((image - fine) / sigma).pow(2).mean(dim=(1, 2))
        print(f"| {name} | {chi2.median():.4f} | {chi2.mean():.4f} | {chi2.quantile(0.9):.4f} |")


if __name__ == "__main__":
    main()
