"""Does the shipped flow recover a real cutout's best fit when that fit is simulated?

Takes the best free fit of ``scripts/profile_theta_e.py`` (its JSON), renders it with our
simulator, the cutout's own PSF kernel and noise map, adds noise, and samples the shipped
flow on that mock. If the flow misses theta_E on its own simulator at this parameter
point, the real-data error is the network's, not a difference between the data and the
model family. Then it repeats with an in-distribution PSF (a Gaussian of the conditioning
FWHM, rendered as in training) and with single parameters moved into the training prior
or the S/N raised, to find what the network gets wrong.

Usage (repository root, ../shared present):
    python scripts/profile_theta_e.py --system NEG5700 ... --json P.json
    python scripts/real_lens_mock_check.py --system NEG5700 --profile P.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_lenses_posterior import ROOT, find_system, load_cut

from lensflow.checkpoint import load_model
from lensflow.data import conditioning_fwhm_arcsec
from lensflow.params import NAMES
from lensflow.sampling import sample_posterior
from lensflow.simulator import LensSimulator, fine_psf, pool_psf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--system", required=True, help="text in the label (scripts/real_lenses_posterior.py)"
    )
    p.add_argument("--profile", type=Path, required=True, help="scripts/profile_theta_e.py JSON")
    p.add_argument("--model", default=None, help="model (default: the system's preset)")
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("-n", type=int, default=400, help="posterior samples per mock")
    p.add_argument("--seed", type=int, default=3, help="noise seed of the mocks")
    args = p.parse_args()
    torch.set_num_threads(1)
    label, image, kwargs, preset, ref, _note = find_system(p, args.system)
    rows = json.loads(args.profile.read_text())["rows"]
    best = next(r for r in rows if not r["fixed"])["theta"]
    theta = torch.tensor([best[n] for n in NAMES], dtype=torch.float64)
    model = load_model(args.model or preset)
    _, cut, _ = load_cut(args.root, image, kwargs, model.simulator)
    g = torch.Generator().manual_seed(args.seed)
    own = LensSimulator(model.simulator, psf_kernel=cut.psf.double(), dtype=torch.float64)
    fwhm = conditioning_fwhm_arcsec(cut, model.simulator.upsample_factor)
    gauss_cfg = dataclasses.replace(model.simulator, psf_fwhm_arcsec=fwhm)
    gauss = LensSimulator(gauss_cfg, dtype=torch.float64)
    gauss_kernel = pool_psf(fine_psf(gauss_cfg), gauss_cfg.upsample_factor).to(cut.psf.dtype)

    def mock(th: torch.Tensor, sim: LensSimulator, kernel: torch.Tensor, name: str) -> None:
        img = sim(th)
        noise = cut.sigma.double() * torch.randn(img.shape, generator=g, dtype=torch.float64)
        o = dataclasses.replace(cut, image=(img + noise).to(cut.image.dtype), psf=kernel)
        s = sample_posterior(o, model, args.n, seed=0).theta[:, 0]
        q = torch.quantile(s, torch.tensor([0.16, 0.5, 0.84]))
        print(f"| {name} | {th[0]:.3f} | {q[1]:.3f} [{q[0]:.3f}, {q[2]:.3f}] |", flush=True)

    def moved(**factors_or_values: float) -> torch.Tensor:
        th = theta.clone()
        for k, v in factors_or_values.items():
            th[NAMES.index(k)] = v
        return th

    print(f"# {label}: the best free fit of {args.profile} simulated, sampled with "
          f"{args.model or preset} ({args.n} samples); reference theta_E {ref}")  # fmt: skip
    print("| mock | true theta_E | flow theta_E median [16%, 84%] |\n|---|---:|---|")
    mock(theta, own, cut.psf, "best fit, cutout's PSF and noise map")
    mock(theta, gauss, gauss_kernel, f'best fit, Gaussian PSF of FWHM {fwhm:.3f}"')
    e = theta[[NAMES.index("source_e1"), NAMES.index("source_e2")]]
    th = theta.clone()
    th[[NAMES.index("source_e1"), NAMES.index("source_e2")]] = e * 0.3 / e.norm()
    mock(th, gauss, gauss_kernel, f"Gaussian PSF, source |e| {e.norm():.2f} -> 0.30")
    mock(moved(lens_light_amp=max(5.0, float(theta[NAMES.index("lens_light_amp")]))),
         gauss, gauss_kernel, "Gaussian PSF, lens_light_amp at least 5 (prior minimum)")  # fmt: skip
    mock(moved(source_r_sersic=0.2), gauss, gauss_kernel, "Gaussian PSF, source_r_sersic 0.2")
    amps = {k: 10 * float(theta[NAMES.index(k)]) for k in ("source_amp", "lens_light_amp")}
    mock(moved(**amps), gauss, gauss_kernel, "Gaussian PSF, both amplitudes x10 (S/N x10)")


if __name__ == "__main__":
    main()
