"""Can a cheap per-lens step turn the flow's posterior into the MCMC one? A probe.

Issue 3's converged emcee reference (docs/benchmarks.md, "Converged emcee references on
CPU") is 5-10x narrower than the amortized posterior. This script tries cheap
refinements on one lens against that reference, in the box-transformed space ``u`` of
``baselines.mcmc`` (the density there carries the log-Jacobian):

1. **Laplace**: start L-BFGS (``baselines.mcmc``'s polish) from the 4 best of 2,000 flow
   samples (by log posterior), take the Hessian at the optimum and draw from the Gaussian.
2. **Importance sampling**: reweight draws from that Gaussian (or a Student-t with
   ``--nu``) by the exact posterior over the proposal, then adapt the proposal's mean and
   covariance to the weighted draws for ``--rounds`` rounds (population Monte Carlo).
   Reported: effective sample size and the Pareto k-hat of the largest weights (k > 0.7
   means the estimate is unreliable, Vehtari et al. 2024).

3. **Tempered SMC** (``--smc-particles N``): ``baselines.smc.run_smc`` from the flow
   samples, what ``lensflow fit --fallback smc`` runs.
4. **The emcee fallback** (``--fallback-emcee``): what ``lensflow fit --fallback mcmc``
   runs (64 walkers at distinct flow samples, 300 + 1,500 steps).

Each is compared with the stored emcee samples: the per-parameter std ratio, the mean
offset in emcee standard deviations, and the C2ST (all 21 parameters, and the 7 lens mass
parameters; evenly spaced subsets of at most 5,000 per side). ``--smc-out``/``--emcee-out``
store samples, ``--compare`` scores stored ones, and the reference's own floor is its first
half against its second.

Example (the stored runs of ``lensflow bench --config reference``)::

    python scripts/refine_probe.py --runs runs/ref/runs/demo_01 --lens demo_01
    python scripts/refine_probe.py --runs runs/ref/runs/demo_01 --lens demo_01 --only-smc \
        --skip-floor --smc-particles 2000 --smc-out smc.npz --fallback-emcee --emcee-out fb.npz
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import genpareto

from lensflow.baselines.bench import load_demo_lenses
from lensflow.baselines.mcmc import _log_posterior_u, _polish, box_transform, run_emcee
from lensflow.baselines.smc import run_smc
from lensflow.checkpoint import load_model
from lensflow.metrics import c2st
from lensflow.prior import Prior
from lensflow.sampling import read_samples
from lensflow.simulator import LensSimulator


def pareto_khat(log_w: torch.Tensor) -> float:
    """Shape of a generalized Pareto fitted to the largest ``min(N/5, 3 sqrt(N))`` weights."""
    srt = np.sort(log_w.numpy())
    m = int(min(0.2 * len(srt), 3 * math.sqrt(len(srt))))
    tail = np.exp(srt[-m:] - srt[-m - 1]) - 1
    return float(genpareto.fit(tail, floc=0)[0])


def compare(name: str, theta: torch.Tensor, ref: torch.Tensor, seed: int) -> None:
    """Print std ratios, mean offsets and C2ST of ``theta`` against ``ref`` (both ``(N, 21)``)."""
    ratio = (theta.std(0) / ref.std(0)).numpy()
    offset = ((theta.mean(0) - ref.mean(0)) / ref.std(0)).numpy()
    n = min(len(theta), len(ref), 5000)
    # Evenly spaced subsets: a chain's first n rows would be its first stretch only.
    ref = ref[torch.linspace(0, len(ref) - 1, n).long()]
    theta = theta[torch.linspace(0, len(theta) - 1, n).long()]
    all21 = c2st(ref.float(), theta.float(), seed=seed, max_iter=2000)
    lens7 = c2st(ref[:, :7].float(), theta[:, :7].float(), seed=seed, max_iter=2000)
    print(f"{name}: C2ST {all21:.3f} (21 parameters), {lens7:.3f} (7 lens mass parameters)")
    print(f"  std ratio to emcee   {np.array2string(ratio, precision=2, max_line_width=200)}")
    print(f"  mean offset / std    {np.array2string(offset, precision=2, max_line_width=200)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, required=True,
                   help="folder with flow+feedback/ and emcee/ runs of one lens")  # fmt: skip
    p.add_argument("--lens", default="demo_01", help="demo catalog id of that lens")
    p.add_argument("--flow", default="flow+feedback", help="run whose samples start the search")
    p.add_argument("--n-proposal", type=int, default=8000, help="draws in the last IS round")
    p.add_argument("--rounds", type=int, default=3, help="adaptive IS rounds")
    p.add_argument("--nu", type=float, default=10.0, help="Student-t degrees of freedom")
    p.add_argument("--smc-particles", type=int, default=0, help="tempered SMC particles (0: skip)")
    p.add_argument("--smc-moves", type=int, default=10, help="Metropolis sweeps per temperature")
    p.add_argument("--smc-final-moves", type=int, default=20, help="more sweeps at beta = 1")
    p.add_argument("--smc-out", help="write the SMC samples here (.npz, theta and log_prob)")
    p.add_argument("--emcee-out", help="write the fallback emcee's samples here (.npz)")
    p.add_argument("--compare", nargs="+", metavar="NPZ",
                   help="only compare stored samples (--smc-out/--emcee-out files) with "
                   "the emcee reference")  # fmt: skip
    p.add_argument(
        "--fallback-emcee",
        action="store_true",
        help="also run the emcee of `lensflow fit --fallback mcmc` from the flow",
    )
    p.add_argument(
        "--skip-floor",
        action="store_true",
        help="skip the reference's first-half against second-half C2ST",
    )
    p.add_argument("--only-smc", action="store_true", help="skip the Laplace and IS stages")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    ids = [lens.name for lens in load_demo_lenses(12)]
    lens = load_demo_lenses(ids.index(args.lens) + 1)[-1]
    sim = LensSimulator(load_model("euclid").simulator, psf_kernel=lens.observation.psf,
                        dtype=torch.float64)  # fmt: skip
    obs = lens.observation.to(torch.float64, "cpu")
    prior = Prior(dtype=torch.float64)
    box = box_transform(prior)

    def target(u: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = torch.cat([_log_posterior_u(c, box, sim, obs, prior) for c in u.split(1000)])
        return torch.nan_to_num(out, nan=-math.inf, neginf=-math.inf)

    flow = read_samples(args.runs / args.flow / "samples.fits")[0].theta.double()
    ref = read_samples(args.runs / "emcee" / "samples.fits")[0].theta.double()
    flow = prior.clamp_inside(flow)  # flow samples on the box's edge: inside, as fit does
    if args.compare:
        for path in args.compare:
            with np.load(path) as f:
                compare(path, torch.from_numpy(f["theta"]).double(), ref, args.seed)
        return
    g = torch.Generator().manual_seed(args.seed)

    if not args.only_smc:
        start = time.perf_counter()
        u_flow = box.to_u(flow[:2000])
        best = u_flow[target(u_flow).argsort(descending=True)[:4]]
        ends = torch.stack([
            _polish(b, lambda v: _log_posterior_u(v, box, sim, obs, prior), 200) for b in best
        ])  # fmt: skip
        u0 = ends[target(ends).argmax()]
        hessian = torch.autograd.functional.hessian(
            lambda v: -_log_posterior_u(v[None], box, sim, obs, prior)[0], u0
        )
        values, vectors = torch.linalg.eigh(0.5 * (hessian + hessian.T))
        chol = vectors * values.clamp_min(1e-6).rsqrt()
        print(f"{args.lens}: MAP from the flow samples + Hessian in {time.perf_counter() - start:.1f}"
              f" s; log posterior at the MAP {float(target(u0[None])[0]):.1f}, at the truth "
              f"{float(target(box.to_u(lens.truth[None]))[0]):.1f}")  # fmt: skip
        z = torch.randn(5000, u0.numel(), generator=g, dtype=torch.float64)
        compare("Laplace", box.from_u(u0 + z @ chol.T), ref, args.seed)

        mean, scale = u0.clone(), chol.clone()
        d = u0.numel()
        chi2 = torch.distributions.Chi2(torch.tensor(args.nu, dtype=torch.float64))
        sizes = [
            max(500, args.n_proposal // 2 ** (args.rounds - 1 - r)) for r in range(args.rounds)
        ]
        for r, n in enumerate(sizes):
            z = torch.randn(n, d, generator=g, dtype=torch.float64)
            z = z / torch.sqrt(chi2.sample((n,)) / args.nu)[:, None]
            log_q = -0.5 * (args.nu + d) * torch.log1p((z**2).sum(1) / args.nu)
            log_q = log_q - torch.linalg.slogdet(scale)[1]
            u = mean + z @ scale.T
            t0 = time.perf_counter()
            log_w = target(u) - log_q
            w = torch.softmax(log_w, 0)
            ess = float(1 / (w**2).sum())
            print(f"IS round {r}: {n} draws in {time.perf_counter() - t0:.1f} s, ESS {ess:.0f} "
                  f"({ess / n:.1%}), Pareto k-hat {pareto_khat(log_w - log_w.max()):.2f}")  # fmt: skip
            mean = (w[:, None] * u).sum(0)
            cov = (w[:, None, None] * (u - mean)[:, :, None] * (u - mean)[:, None, :]).sum(0)
            scale = torch.linalg.cholesky(cov * 1.1**2)
        pick = torch.multinomial(w, 5000, replacement=True, generator=g)
        compare("importance-resampled", box.from_u(u[pick]), ref, args.seed)
    if not args.skip_floor:  # the reference's own floor: its first half against its second
        half = len(ref) // 2
        compare("emcee, first half against second half", ref[:half], ref[half:], args.seed)
    if args.fallback_emcee:  # what `lensflow fit --fallback mcmc` runs, for comparison
        from lensflow.fit import FALLBACK_EMCEE

        k = FALLBACK_EMCEE["n_walkers"]
        walkers = flow[torch.linspace(0, len(flow) - 1, k).long()]
        run = run_emcee(sim, obs, prior=prior, n_walkers=k, init_walkers=walkers,
                        n_burn=FALLBACK_EMCEE["n_burn"], n_steps=FALLBACK_EMCEE["n_steps"],
                        rng=np.random.default_rng(args.seed))  # fmt: skip
        dg = run.diagnostics
        print(f"fallback emcee: {k} walkers x ({dg.n_burn} + {dg.n_steps}) steps in "
              f"{dg.wall_time_s:.1f} s, max tau {float(dg.tau.max()):.0f}, converged "
              f"{dg.is_converged}")  # fmt: skip
        if args.emcee_out:
            np.savez_compressed(args.emcee_out, theta=run.samples.theta.numpy(),
                                log_prob=run.samples.log_prob.numpy())  # fmt: skip
        compare("fallback emcee", run.samples.theta.double(), ref, args.seed)
    if args.smc_particles:
        smc = run_smc(sim, obs, flow, prior=prior, n_particles=args.smc_particles,
                      n_moves=args.smc_moves, n_final_moves=args.smc_final_moves,
                      generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
        d = smc.diagnostics
        print(f"SMC: {d.n_particles} particles in {d.wall_time_s:.1f} s, temperatures "
              f"{', '.join(f'{b:.3g}' for b in d.temperatures)}; random-walk acceptance "
              f"{', '.join(f'{a:.2f}' for a in d.rw_acceptance)}, independent "
              f"{', '.join(f'{a:.2f}' for a in d.independent_acceptance)}; "
              f"{d.target_evaluations} posterior evaluations, unique fraction "
              f"{d.unique_fraction:.3f}, {d.moves_per_particle:.1f} moves per particle at "
              f"beta = 1, log evidence {d.log_evidence:.1f}")  # fmt: skip
        if args.smc_out:
            np.savez_compressed(args.smc_out, theta=smc.samples.theta.numpy(),
                                log_prob=smc.samples.log_prob.numpy())  # fmt: skip
        compare("tempered SMC", smc.samples.theta.double(), ref, args.seed)


if __name__ == "__main__":
    main()
