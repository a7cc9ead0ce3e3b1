"""Is lenstronomy's chain lensflow's posterior? Likelihood parity and importance weights.

Reads a lens's ``emcee`` run (lensflow's caustics likelihood, all 21 parameters sampled,
log-uniform amplitude priors, every observed pixel) and its ``lenstronomy`` run from a
``lensflow bench`` store, and separates the two ways their posteriors can differ:

1. **The likelihood.** At ``--n-parity`` samples of each chain, lenstronomy's profile
   log-likelihood (``FittingSequence`` image likelihood: amplitudes at their weighted
   least-squares values, the run's border and mask) against the same quantity computed with
   lensflow's simulator (the amplitudes solved from the two unit-amplitude images).
2. **The target.** lenstronomy's chain samples the 19 non-linear parameters from its
   profile likelihood on its pixels, and each sample's amplitudes are drawn from their
   conditional Gaussian (``run_lenstronomy``). Against lensflow's posterior its density is,
   per sample ``(theta, A)``, up to a constant::

       log w = +1/2 chi2_dropped(theta, A) + 1/2 log det F(theta) + log A_src + log A_ll

   (``chi2_dropped``: the pixels lensflow uses and lenstronomy does not, i.e. the PSF
   border with ``border="mask"``, none with ``"pad"``; ``F``: the amplitudes' Fisher matrix
   on lenstronomy's pixels; the last two terms undo lensflow's log-uniform amplitude
   priors.) Reweighting the emcee samples by ``w`` gives lenstronomy's target from
   lensflow's chain; if that matches lenstronomy's chain, the two codes agree and any
   difference between the chains is the target's.

Printed and written (``--json``): the parity statistics, the weights' effective sample
size, per-parameter mean offsets and width ratios (lenstronomy against emcee, reweighted
emcee against emcee, lenstronomy against reweighted emcee; in emcee standard deviations)
C2ST of each chain's first half against its second (the floor at this chain length), and
C2ST of lenstronomy's samples against emcee's, unweighted and importance-resampled
(systematic resampling of ``--c2st-samples``, kept well below the weights' effective sample
size: a resampled set with many repeated rows lets the classifier memorize them, which
inflates C2ST), for each group of terms.

Example (the bench store of docs/benchmarks.md's demo_01 merge)::

    python scripts/lenstronomy_target.py MERGED --lens demo_01 --json target.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lensflow.baselines.bench import _pick, load_demo_lenses, run_folder
from lensflow.baselines.lenstronomy import fitting_sequence, likelihood_mask, to_lenstronomy
from lensflow.checkpoint import load_model
from lensflow.metrics import c2st
from lensflow.observation import Observation
from lensflow.params import NAMES, index
from lensflow.sampling import read_samples
from lensflow.simulator import LensSimulator

F64 = torch.float64
IA, IL = index("source_amp"), index("lens_light_amp")


def unit_images(sim: LensSimulator, theta: torch.Tensor) -> torch.Tensor:
    """Images of the source and of the lens light at unit amplitude, ``(N, 2, H, W)``."""
    one_src, one_ll = theta.clone(), theta.clone()
    one_src[:, IA], one_src[:, IL] = 1.0, 0.0
    one_ll[:, IA], one_ll[:, IL] = 0.0, 1.0
    return torch.stack([sim(one_src), sim(one_ll)], 1)


def terms(
    sim: LensSimulator,
    obs: Observation,
    theta: torch.Tensor,
    used_lt: torch.Tensor,
    batch: int = 200,
) -> torch.Tensor:
    """Per sample ``(N, 4)``: lensflow's profile log-likelihood on lenstronomy's pixels, and
    the three log-weight terms (dropped-pixel chi^2 / 2, log det F / 2, log A_src + log A_ll)."""
    w_lt = used_lt / obs.sigma**2
    dropped = obs.mask & ~used_lt
    out = []
    with torch.no_grad():
        for b in range(0, len(theta), batch):
            th = theta[b : b + batch]
            basis = unit_images(sim, th)
            fisher = torch.einsum("nihw,njhw,hw->nij", basis, basis, w_lt)
            rhs = torch.einsum("nihw,hw,hw->ni", basis, obs.image, w_lt)
            best = torch.einsum("ni,nihw->nhw", torch.linalg.solve(fisher, rhs), basis)
            profile = -0.5 * (((obs.image - best) ** 2) * w_lt).sum((-1, -2))
            resid = ((obs.image - sim(th)) / obs.sigma) ** 2
            out.append(torch.stack([
                profile,
                0.5 * (resid * dropped).sum((-1, -2)),
                0.5 * torch.logdet(fisher),
                th[:, IA].log() + th[:, IL].log(),
            ], 1))  # fmt: skip
    return torch.cat(out)


def lenstronomy_profile(fs: Any, theta: torch.Tensor) -> np.ndarray:
    """lenstronomy's image log-likelihood at each row's non-linear parameters."""
    out = []
    for row in theta.numpy():
        kw = to_lenstronomy(row)
        log_like, _ = fs.likelihood_class.image_likelihood.logL(
            kwargs_lens=kw.kwargs_lens, kwargs_source=kw.kwargs_source,
            kwargs_lens_light=kw.kwargs_lens_light,
        )  # fmt: skip
        out.append(float(log_like))
    return np.asarray(out)


def weighted_moments(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = (w[:, None] * x).sum(0)
    return mean, (w[:, None] * (x - mean) ** 2).sum(0).sqrt()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store", type=Path, help="a lensflow bench --out folder with both runs")
    ap.add_argument("--lens", default="demo_01", help="demo lens id (default demo_01)")
    ap.add_argument("--model", default="euclid", help="model whose grid the lens is cut to")
    ap.add_argument(
        "--n-weights",
        type=int,
        default=20000,
        help="emcee samples reweighted (default 20000; all if fewer)",
    )
    ap.add_argument("--n-parity", type=int, default=300, help="samples per chain for parity")
    ap.add_argument(
        "--c2st-samples",
        type=int,
        default=1000,
        help="samples per C2ST side (default 1000: well below the weights' ESS, "
        "so that few resampled rows repeat; repeats inflate C2ST)",
    )
    ap.add_argument("--c2st-max-iter", type=int, default=10000, help="classifier epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    folders = {m: run_folder(args.store, args.lens, m) for m in ("emcee", "lenstronomy")}
    for m, f in folders.items():
        if not (f / "record.json").is_file():
            print(f"error: no stored {m} run of {args.lens} in {args.store}", file=sys.stderr)
            return 2
    record = json.loads((folders["lenstronomy"] / "record.json").read_text())
    border = record.get("likelihood_border", "mask")  # stored before 2026-11-27: masked
    em = read_samples(folders["emcee"])[0].theta.to(F64)
    lt = read_samples(folders["lenstronomy"])[0].theta.to(F64)
    lenses = {x.name: x for x in load_demo_lenses(12, model=args.model)}
    if args.lens not in lenses:
        print(f"error: {args.lens} is not a demo lens", file=sys.stderr)
        return 2
    obs = lenses[args.lens].observation
    cfg = load_model(args.model).simulator
    sim = LensSimulator(cfg, psf_kernel=obs.psf, dtype=F64)
    used_lt = obs.mask if border == "pad" else torch.from_numpy(likelihood_mask(obs, cfg) > 0)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{args.lens}: lenstronomy border {border!r}, {int(used_lt.sum())} of "
          f"{int(obs.mask.sum())} observed pixels; emcee {len(em)}, lenstronomy {len(lt)} rows")  # fmt: skip

    # 1. The likelihood at the same points.
    fs = fitting_sequence(obs, cfg, border=border)
    parity = {}
    for name, chain in (("emcee", em), ("lenstronomy", lt)):
        rows = chain[torch.randperm(len(chain), generator=gen)[: args.n_parity]]
        delta = lenstronomy_profile(fs, rows) - terms(sim, obs, rows, used_lt)[:, 0].numpy()
        parity[name] = {"n": len(rows), "max_abs_delta": float(np.abs(delta - delta.mean()).max()),
                        "mean_delta": float(delta.mean()), "sd_delta": float(delta.std())}  # fmt: skip
        print(f"parity at {name} samples: lenstronomy - lensflow profile log L = "
              f"{delta.mean():+.2e} +/- {delta.std():.1e} (max |dev| "
              f"{parity[name]['max_abs_delta']:.1e})")  # fmt: skip

    # 2. Importance weights from lensflow's posterior to lenstronomy's target.
    em_all = em  # in chain order, for the halves below
    em = em[torch.randperm(len(em), generator=gen)[: args.n_weights]]
    comp = terms(sim, obs, em, used_lt)[:, 1:]
    groups = {"none": torch.zeros(len(em), dtype=F64), "dropped pixels": comp[:, 0],
              "amplitudes": comp[:, 1] + comp[:, 2], "all": comp.sum(1)}  # fmt: skip
    mean_e, sd_e = em.mean(0), em.std(0)
    mean_l, sd_l = lt.mean(0), lt.std(0)
    n = min(args.c2st_samples, len(lt))
    lt_sub = lt[_pick(len(lt), n)]  # random rows: an even spacing follows few walkers
    rng = np.random.default_rng(args.seed)
    result: dict = {"lens": args.lens, "store": str(args.store), "border": border,
                    "n_weighted": len(em), "parity": parity, "weights": {}}  # fmt: skip
    for label, logw in groups.items():
        w = torch.softmax(logw, 0)
        ess = float(1 / (w**2).sum())
        mean_r, sd_r = weighted_moments(em, w)
        pick = np.searchsorted(np.cumsum(w.numpy()), (rng.random() + np.arange(n)) / n)
        pick = torch.from_numpy(pick.clip(0, len(em) - 1))
        score = c2st(lt_sub, em[pick], seed=1, max_iter=args.c2st_max_iter)
        result["weights"][label] = {
            "ess": ess, "c2st_lenstronomy_vs_reweighted_emcee": score,
            "per_parameter": {
                name: {"lt_minus_emcee_sd": float((mean_l[k] - mean_e[k]) / sd_e[k]),
                       "rw_minus_emcee_sd": float((mean_r[k] - mean_e[k]) / sd_e[k]),
                       "lt_minus_rw_sd": float((mean_l[k] - mean_r[k]) / sd_e[k]),
                       "sd_lt_over_emcee": float(sd_l[k] / sd_e[k]),
                       "sd_rw_over_emcee": float(sd_r[k] / sd_e[k])}
                for k, name in enumerate(NAMES)
            },
        }  # fmt: skip
        print(f"weights {label!r}: ESS {ess:.0f} of {len(em)}, C2ST(lenstronomy, reweighted "
              f"emcee) {score:.3f} ({n} per side, {len(pick.unique())} distinct)", flush=True)  # fmt: skip
    # The floor: each chain's first half against its second (correlated walkers' tracks
    # make a C2ST of a short ensemble chain exceed 0.5 even against itself).
    result["c2st_halves"] = {}
    for name, chain in (("emcee", em_all), ("lenstronomy", lt)):
        half = len(chain) // 2
        a, b = chain[:half], chain[half:]
        a, b = a[_pick(len(a), n)], b[_pick(len(b), n)]
        result["c2st_halves"][name] = c2st(a, b, seed=1, max_iter=args.c2st_max_iter)
        print(f"C2ST of {name}'s first half against its second: "
              f"{result['c2st_halves'][name]:.3f} ({len(a)} per side)", flush=True)  # fmt: skip
    print("\n| parameter | lt - emcee | rw - emcee | lt - rw | sd lt / emcee | sd rw / emcee |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in result["weights"]["all"]["per_parameter"].items():
        print(f"| `{name}` | {r['lt_minus_emcee_sd']:+.2f} | {r['rw_minus_emcee_sd']:+.2f} | "
              f"{r['lt_minus_rw_sd']:+.2f} | {r['sd_lt_over_emcee']:.2f} | "
              f"{r['sd_rw_over_emcee']:.2f} |")  # fmt: skip
    result["wall_time_s"] = time.perf_counter() - t0
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
