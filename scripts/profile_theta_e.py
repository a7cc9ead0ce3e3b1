"""Profile likelihood of theta_E on a real cutout: where does our model family fit best?

For each theta_E on a grid, the other 20 parameters are fitted by least squares (Adam, then
L-BFGS) from several starts, with the prior box opened: amplitudes, radii and Sersic
indices only have to be positive and ellipticities below 1. The best reduced chi^2 per
theta_E says which Einstein radius the SIE + shear + Sersic + Sersic model prefers on the
cutout, independently of any trained network. The starts are posterior samples of the
shipped flow (and of ``--extra-model``, if given) with theta_E overwritten.

Usage (repository root, ../shared present):
    python scripts/profile_theta_e.py --system NEG5700 --grid 0.7 0.85 1.0 1.1 1.25 1.4 1.7 \
        --json docs/profile-theta-e-neg5700.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_lenses_posterior import ROOT, find_system, load_cut

from lensflow.checkpoint import load_model
from lensflow.params import NAMES
from lensflow.sampling import sample_posterior
from lensflow.simulator import LensSimulator, chi2

POSITIVE = [i for i, n in enumerate(NAMES) if n.endswith(("_amp", "_r_sersic", "_n_sersic"))]
ELLIPTIC = [(NAMES.index(f"{p}_e1"), NAMES.index(f"{p}_e2"))
            for p in ("lens", "source", "lens_light")]  # fmt: skip
E_MAX = 0.95


def to_theta(z: torch.Tensor) -> torch.Tensor:
    """Free variables ``(B, 21)`` -> physical parameters: exp for positive ones, a radial
    tanh for each ellipticity pair (``|e| < E_MAX``), identity for the rest."""
    theta = z.clone()
    theta[:, POSITIVE] = z[:, POSITIVE].exp()
    for i, j in ELLIPTIC:
        w = z[:, [i, j]]
        r = w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        theta[:, [i, j]] = w * (E_MAX * torch.tanh(r) / r)
    return theta


def to_z(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_theta`."""
    z = theta.clone()
    z[:, POSITIVE] = theta[:, POSITIVE].clamp_min(1e-6).log()
    for i, j in ELLIPTIC:
        e = theta[:, [i, j]]
        r = e.norm(dim=1, keepdim=True).clamp(1e-12, E_MAX * 0.999)
        z[:, [i, j]] = e * (torch.atanh(r / E_MAX) / r)
    return z


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--system", required=True, help="text in the label (scripts/real_lenses_posterior.py)"
    )
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("--grid", type=float, nargs="+", required=True, help="theta_E values [arcsec]")
    p.add_argument("--starts", type=int, default=6, help="starts per theta_E and model")
    p.add_argument("--extra-model", default=None, help="a second model's samples as starts too")
    p.add_argument("--adam-steps", type=int, default=300)
    p.add_argument("--lbfgs-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    label, image, kwargs, preset, ref, _note = find_system(p, args.system)
    if not (args.root / image).exists():
        p.error(f"{args.root / image} not found (../shared/data/real_lenses is needed)")
    model = load_model(preset)
    _, cut, _ = load_cut(args.root, image, kwargs, model.simulator)
    sim = LensSimulator(model.simulator, psf_kernel=cut.psf.double(), dtype=torch.float64)
    n_used = int(cut.mask.sum())
    x, sigma, mask = cut.image.double(), cut.sigma.double(), cut.mask

    starts = []
    for m in [model] + ([load_model(args.extra_model)] if args.extra_model else []):
        s = sample_posterior(cut, m, 200, seed=args.seed).theta.double()
        s = s[torch.isfinite(s).all(-1)]
        starts.append(s[torch.randperm(len(s))[: args.starts]])
    starts = torch.cat(starts)
    grid = torch.tensor(args.grid, dtype=torch.float64)
    # Rows: every start at every grid value, plus every start with theta_E free.
    theta0 = starts.repeat(len(grid) + 1, 1)
    fixed = torch.cat([grid.repeat_interleave(len(starts)),
                       torch.full((len(starts),), float("nan"), dtype=torch.float64)])  # fmt: skip
    is_fixed = torch.isfinite(fixed)
    theta0[is_fixed, 0] = fixed[is_fixed]
    z = to_z(theta0).requires_grad_(True)

    def per_row() -> torch.Tensor:
        theta = to_theta(z)
        theta = torch.where(is_fixed[:, None] & (torch.arange(21) == 0), fixed[:, None], theta)
        return chi2(sim(theta), x, sigma, mask)

    t0 = time.perf_counter()
    opt = torch.optim.Adam([z], lr=0.02)
    for _ in range(args.adam_steps):
        opt.zero_grad()
        loss = per_row()
        loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)).sum()
        loss.backward()
        opt.step()
    lbfgs = torch.optim.LBFGS([z], max_iter=args.lbfgs_steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = per_row()
        loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, 1e12)).sum()
        loss.backward()
        return loss

    if args.lbfgs_steps > 0:
        lbfgs.step(closure)
    with torch.no_grad():
        final = per_row() / n_used
        theta = to_theta(z)
        theta[is_fixed, 0] = fixed[is_fixed]
    seconds = time.perf_counter() - t0
    rows = []
    for value in [*args.grid, None]:
        sel = is_fixed & (fixed == value) if value is not None else ~is_fixed
        c = final.clone()
        c[~sel] = float("inf")
        best = int(torch.argmin(torch.where(torch.isfinite(c), c, torch.full_like(c, 1e30))))
        rows.append({"theta_e": float(theta[best, 0]), "fixed": value is not None,
                     "reduced_chi2_best": float(final[best]),
                     "theta": {n: float(v) for n, v in zip(NAMES, theta[best], strict=True)}})  # fmt: skip
    print(f"# {label}: profile of the best reduced chi^2 over theta_E ({len(starts)} starts "
          f"per value, {n_used} pixels, {seconds:.0f} s); reference theta_E {ref}")  # fmt: skip
    print("| theta_E [arcsec] | best reduced chi^2 |\n|---:|---:|")
    for r in rows:
        tag = "" if r["fixed"] else " (free)"
        print(f"| {r['theta_e']:.3f}{tag} | {r['reduced_chi2_best']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"system": label, "reference_theta_e": ref,
                                         "args": {k: str(v) for k, v in vars(args).items()},
                                         "n_pixels": n_used, "seconds": seconds,
                                         "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
