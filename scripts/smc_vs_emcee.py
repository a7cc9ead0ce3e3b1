"""Tempered SMC against a converged emcee chain on a small mock whose chain converges fast.

The comparison that matters is on a full-size lens (``scripts/refine_probe.py`` against the
``reference`` bench chain, hours on a CPU). This one runs in minutes: a 16 x 16 mock
(0.1"/px, PSF FWHM 0.15": ``lensflow.mocks.mock_observation``'s default system, the one
of ``tests/test_baselines.py``) at a chosen noise, where emcee reaches 50 autocorrelation
times quickly. Three samplers of the same float64 posterior, all started as users start
them:

* **reference**: emcee, 64 walkers in a small ball at ``optimize_posterior``'s answer (16
  broad starts), ``--burn`` + ``--steps`` steps, checked against 50 tau;
* **SMC**: ``baselines.smc.run_smc`` from ``--n-init`` "flow-like" samples: a Gaussian
  ball of ``--init-scale`` prior widths (in ``u``) around that answer, wider than the
  posterior, as the amortized flow's samples are on bright lenses;
* **short emcee**: what ``lensflow fit --fallback mcmc`` runs from such samples (64
  walkers at distinct samples, 300 + 1,500 steps).

Reported per sampler: wall time, posterior evaluations, C2ST against the reference (all 21
parameters; evenly spaced subsets of ``--c2st-samples`` per side), per-parameter std ratios
and mean offsets in reference standard deviations, and the reference's own floor (its first
half against its second).

Example::

    python scripts/smc_vs_emcee.py --noise 0.02 --json smc-vs-emcee.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from lensflow.baselines.mcmc import box_transform, optimize_posterior, run_emcee
from lensflow.baselines.smc import run_smc
from lensflow.metrics import c2st
from lensflow.mocks import COMPACT_CONFIG, mock_observation
from lensflow.params import NAMES
from lensflow.prior import Prior
from lensflow.simulator import LensSimulator

F64 = torch.float64


def compare(theta: torch.Tensor, ref: torch.Tensor, n: int, seed: int) -> dict:
    """C2ST (21 parameters), std ratios and mean offsets of ``theta`` against ``ref``."""
    n = min(n, len(theta), len(ref))
    a = ref[torch.linspace(0, len(ref) - 1, n).long()]
    b = theta[torch.linspace(0, len(theta) - 1, n).long()]
    return {
        "c2st": c2st(a.float(), b.float(), seed=seed, max_iter=2000),
        "std_ratio": dict(zip(NAMES, (theta.std(0) / ref.std(0)).tolist(), strict=True)),
        "mean_offset_sd": dict(zip(NAMES, ((theta.mean(0) - ref.mean(0)) / ref.std(0)).tolist(),
                                   strict=True)),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--noise", type=float, default=0.02, help="pixel noise sigma (image units)")
    p.add_argument("--burn", type=int, default=3000, help="reference emcee burn-in steps")
    p.add_argument("--steps", type=int, default=20000, help="reference emcee kept steps")
    p.add_argument("--particles", type=int, default=2000, help="SMC particles")
    p.add_argument("--n-init", type=int, default=2000, help="flow-like start samples")
    p.add_argument("--init-scale", type=float, default=0.05,
                   help="their spread around the optimum, in prior widths of u")  # fmt: skip
    p.add_argument("--c2st-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(1)
    obs, _ = mock_observation(noise=args.noise, seed=7)
    sim = LensSimulator(COMPACT_CONFIG, dtype=F64)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    best = optimize_posterior(sim, obs, generator=g)
    opt_s = time.perf_counter() - t0
    box = box_transform(Prior(dtype=F64))
    u_best = box.to_u(best[None])
    ball = 1e-3 * torch.randn(64, len(NAMES), generator=g, dtype=F64)
    ref_run = run_emcee(sim, obs, n_walkers=64, n_burn=args.burn, n_steps=args.steps,
                        init_walkers=box.from_u(u_best + ball),
                        rng=np.random.default_rng(args.seed))  # fmt: skip
    ref, d = ref_run.samples.theta, ref_run.diagnostics
    print(f"reference emcee: {args.burn} + {args.steps} steps in {d.wall_time_s:.0f} s, max tau "
          f"{float(d.tau.max()):.0f}, converged {d.is_converged}", flush=True)  # fmt: skip
    half = len(ref) // 2
    results = {
        "reference": {"wall_time_s": d.wall_time_s, "max_tau": float(d.tau.max()),
                      "converged": d.is_converged, "evaluations": 64 * (args.burn + args.steps),
                      "floor": compare(ref[:half], ref[half:], args.c2st_samples, args.seed)},
    }  # fmt: skip
    print(f"  its floor (first half against second): C2ST "
          f"{results['reference']['floor']['c2st']:.3f}", flush=True)  # fmt: skip
    init = box.from_u(u_best + args.init_scale * torch.randn(
        args.n_init, len(NAMES), generator=g, dtype=F64))  # fmt: skip
    smc = run_smc(sim, obs, init, n_particles=args.particles,
                  generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    sd = smc.diagnostics
    results["smc"] = {"wall_time_s": sd.wall_time_s, "evaluations": sd.target_evaluations,
                      "temperatures": list(sd.temperatures), "converged": sd.is_converged,
                      "log_evidence": sd.log_evidence,
                      **compare(smc.samples.theta, ref, args.c2st_samples, args.seed)}  # fmt: skip
    print(f"SMC: {sd.n_particles} particles, {len(sd.temperatures) - 1} temperatures, "
          f"{sd.target_evaluations} evaluations in {sd.wall_time_s:.0f} s: C2ST "
          f"{results['smc']['c2st']:.3f}", flush=True)  # fmt: skip
    walkers = init[torch.linspace(0, args.n_init - 1, 64).long()]
    short = run_emcee(sim, obs, n_walkers=64, n_burn=300, n_steps=1500, init_walkers=walkers,
                      rng=np.random.default_rng(args.seed))  # fmt: skip
    ds = short.diagnostics
    results["short_emcee"] = {"wall_time_s": ds.wall_time_s, "evaluations": 64 * 1800,
                              "max_tau": float(ds.tau.max()), "converged": ds.is_converged,
                              **compare(short.samples.theta, ref, args.c2st_samples,
                                        args.seed)}  # fmt: skip
    print(f"short emcee (the fit fallback's 300 + 1500 steps): {ds.wall_time_s:.0f} s, C2ST "
          f"{results['short_emcee']['c2st']:.3f}", flush=True)  # fmt: skip
    for k in ("smc", "short_emcee"):
        r = results[k]
        print(f"{k}: std ratio {min(r['std_ratio'].values()):.2f}-"
              f"{max(r['std_ratio'].values()):.2f}, max |mean offset| "
              f"{max(abs(v) for v in r['mean_offset_sd'].values()):.2f} sd")  # fmt: skip
    if args.json:
        record = {"args": vars(args), "optimizer_s": opt_s, "results": results}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
