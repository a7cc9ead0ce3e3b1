"""Does a shipped model's posterior depend on the flux units of a cutout?

Multiplying a cutout's image and noise map by ``s`` changes its units and nothing else: the
likelihood of every non-flux parameter is unchanged, and the flux parameters
(``params.FLUX_NAMES``) scale by ``s``. An amortized posterior should follow. This script
samples the reference real lenses of scripts/real_lenses_posterior.py (those with a
theta_E in SOURCES.md) at several ``s``, with the model's own units and with
``normalize_flux=True`` (``data.flux_factor``), and prints theta_E and the flux parameters
(divided by ``s``, i.e. back in the cutout's units).

Example::

    python scripts/flux_scale_probe.py -n 400 --json runs/flux_scale_probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_lenses_posterior as real

from lensflow.checkpoint import load_model
from lensflow.data import flux_factor, noise_scale
from lensflow.params import FLUX_NAMES, index, scale_flux
from lensflow.sampling import sample_posterior

SCALES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=real.ROOT)
    p.add_argument("-n", type=int, default=400, help="posterior samples per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| system | SOURCES.md theta_E | s | normalize_flux | flux factor k | "
          "theta_E median [16%, 84%] | lens_light_amp | source_amp |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for label, image, kwargs, preset, ref, _ in real.SYSTEMS:
        if ref is None:
            continue
        path = args.root / image
        if not path.exists():
            print(f"skipped {label}: {path} not found", file=sys.stderr)
            continue
        model = load_model(preset)
        _, cut, _ = real.load_cut(args.root, image, kwargs, model.simulator)
        runs = [(s, False) for s in SCALES] + [(1.0, True)]
        for s, normalize in runs:
            scaled = cut.scaled(s)
            k = flux_factor(scaled, model.data.reference_rms) if normalize else 1.0
            post = sample_posterior(scaled, model, args.n, seed=args.seed,
                                    normalize_flux=normalize)  # fmt: skip
            probs = torch.tensor([0.16, 0.5, 0.84], dtype=torch.float64)
            q = scale_flux(post.theta.double().quantile(probs, 0), 1.0 / s)  # cutout's units
            e = index("lens_theta_e")
            row = {
                "system": label, "model": preset, "theta_e_reference": ref, "scale": s,
                "normalize_flux": normalize, "flux_factor": k,
                "noise_scale": float(noise_scale(scaled.sigma, scaled.mask)),
                "theta_e_median": float(q[1, e]), "theta_e_p16": float(q[0, e]),
                "theta_e_p84": float(q[2, e]),
                **{f"{n}_median": float(q[1, index(n)]) for n in FLUX_NAMES},
            }  # fmt: skip
            rows.append(row)
            print(f"| {label} | {ref} | {s:g} | {'yes' if normalize else 'no'} | {k:.3g} | "
                  f"{row['theta_e_median']:.3f} [{row['theta_e_p16']:.3f}, "
                  f"{row['theta_e_p84']:.3f}] | {row['lens_light_amp_median']:.3g} | "
                  f"{row['source_amp_median']:.3g} |", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                               "rows": rows}, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
