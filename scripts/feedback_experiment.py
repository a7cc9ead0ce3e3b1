"""Lens-scale simulator feedback on a trained model: gradient signal against the zero ablation.

Restricted to a single PSF: finetuning and held-out lenses are simulated with the model's
own pixel grid and depth ranges, but with the PSF FWHM fixed to ``--fwhm`` (the preset's
nominal 0.20" by default), so the feedback simulator (a ``LensSimulator`` with that PSF)
is exactly the one that made each image. The noisy image and its noise map (sigma, no mask)
are the signal's observation; the network input ``x`` is the one the base flow was trained on.

Steps: simulate a fixed finetuning pool (seed ``--seed + 10``) and ``--n-lenses`` held-out
lenses (seed ``--seed``, as ``evaluate_model.py``); finetune one control network with
``GradientSignal`` (reduced chi^2 + gradient) and one with ``ZeroSignal`` (same width, same
budget, same batches); sample every variant with the same solver and noise; then score the
samples: reduced chi^2 of each sample's image against the noisy observation (with the
observation's sigma), the truth's reduced chi^2, the cut in excess chi^2
``(chi2_base - chi2_variant) / (chi2_base - chi2_truth)`` (method.md's sign: positive is
better), theta_E median relative error of the posterior mean, 68%/95% central-interval
coverage (mean over parameters), wall time per lens and simulator calls per sample.

Example::

    python scripts/feedback_experiment.py --n-lenses 40 --n-samples 50 --t-start 0.8 \
        --json feedback_ts08.json

``--evaluate`` measures trained control-net checkpoints end to end, the way users
sample: held-out lenses simulated over the model's full PSF grid and depth ranges become
``Observation`` records (pixel-integrated PSF kernel, noise map, and the random likelihood
masks of the model's training setting, ``--mask-probability``/``--mask-max-fraction``), and
every variant goes through ``sampling.sample_posteriors`` (feedback cost from
``feedback.lens_cost`` of the cut observation, one seed per lens, the same seeds for every
variant). Scores as above, plus the parameter error in the standardized space (median over
lenses of ``|posterior mean - truth|``, averaged over parameters) and theta_E's median
absolute error in arcsec::

    python scripts/feedback_experiment.py --evaluate --n-lenses 200 --n-samples 100 \
        --variants none gradient=lensflow/models/euclid-gradient.json --json out.json

``--evaluate --lenstronomy-numerics independent`` renders the held-out lenses with
lenstronomy's own numerics instead (``baselines.lenstronomy.lenstronomy_pairs``): the
feedback simulator then differs from the one that made the data, as on real data. There the
"exact" columns are the caustics generator's re-simulation, no longer the data's simulator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from lensflow.checkpoint import load_model
from lensflow.data import SimulatedPairs
from lensflow.feedback import (
    FinetuneConfig,
    GaussianCost,
    GradientSignal,
    ObservedData,
    ZeroSignal,
    finetune,
    sample_feedback,
    signal_calls_per_sample,
    tensor_batches,
)
from lensflow.metrics import interval_coverage, tarp_coverage
from lensflow.params import NAMES


def sample_chi2(
    cost: GaussianCost, u: torch.Tensor, obs: ObservedData, chunk: int
) -> torch.Tensor:
    """Reduced chi^2 of standardized samples ``u`` ``(M, N, D)`` against ``obs`` (N rows)."""
    m, n, d = u.shape
    flat = u.reshape(m * n, d)
    rows = torch.arange(n).repeat(m)  # sample-major: row i belongs to lens i % n
    out = []
    with torch.no_grad():
        for i in range(0, m * n, chunk):
            out.append(cost(flat[i : i + chunk], obs[rows[i : i + chunk]]))
    return torch.cat(out).reshape(m, n)


def score(name, theta, u, truth, chi2_truth, cost, obs, seconds, calls, chunk,
          per_lens: bool = False) -> dict:  # fmt: skip
    """Metrics of one variant's samples ``theta``/``u`` ``(M, N, D)``; with ``per_lens``, also
    each lens's mean reduced chi^2 over its samples, in lens order."""
    chi2 = sample_chi2(cost, u, obs, chunk)
    chi2 = torch.nan_to_num(chi2, nan=float("inf"))
    extra = {"per_lens_chi2_mean": chi2.mean(0).tolist()} if per_lens else {}
    cov = interval_coverage(theta, truth, levels=(0.68, 0.95)).coverage.mean(dim=1)
    # Joint coverage (TARP) in the flow's standardized space, as scripts/evaluate_model.py.
    u_truth = cost.transform.to_u(truth.to(u))
    tarp = tarp_coverage(u.double(), u_truth.double(), levels=(0.68, 0.95),
                         generator=torch.Generator().manual_seed(0)).coverage  # fmt: skip
    mean = theta.mean(0)
    rel = ((mean[:, 0] - truth[:, 0]).abs() / truth[:, 0]).median()
    n_lenses = truth.shape[0]
    return {
        "variant": name,
        "chi2_mean": float(chi2.mean()),
        "chi2_median": float(chi2.median()),
        "chi2_lens_mean_median": float(chi2.mean(0).median()),
        "chi2_truth_mean": float(chi2_truth.mean()),
        "theta_e_rel_error_median": float(rel),
        "coverage68": float(cov[0]),
        "coverage95": float(cov[1]),
        "tarp_coverage68": float(tarp[0]),
        "tarp_coverage95": float(tarp[1]),
        "sampling_s": seconds,
        "s_per_lens": seconds / n_lenses,
        "simulator_calls_per_sample": calls,
        **extra,
    }


def evaluate(args: argparse.Namespace) -> None:
    """Score control-net checkpoints through ``sample_posteriors`` (see the module docstring)."""
    from lensflow.checkpoint import load_control
    from lensflow.cutouts import cut_to_fov
    from lensflow.feedback import lens_cost
    from lensflow.sampling import sample_posteriors

    model = load_model(args.model)
    posterior = model.posterior.eval()
    transform = posterior.transform
    # Sampling may run on a GPU; lenses, scores and TARP stay on the CPU (the same test
    # lenses and seeds whatever the device).
    sampler = model if args.device == "cpu" else load_model(args.model, device=args.device)
    stored = _read_samples(args.samples_npz) if args.samples_npz else {}
    # Masks are drawn last: overriding them leaves the lenses, PSFs and noise unchanged.
    overrides = {
        "mask_probability": args.mask_probability,
        "mask_max_fraction": args.mask_max_fraction,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    source = SimulatedPairs(model.simulator, dataclasses.replace(model.data, **overrides))
    test = source.sample(args.n_lenses, generator=torch.Generator().manual_seed(args.seed))
    n_lenses = args.n_lenses
    if args.first_lenses is not None:  # the first K of the same n_lenses draw
        if not 1 <= args.first_lenses <= args.n_lenses:
            raise SystemExit(f"--first-lenses must be in [1, {args.n_lenses}]")
        n_lenses = args.first_lenses
        test = test.select(torch.arange(n_lenses))
        stored = {k: (theta[:, :n_lenses] if theta.shape[1] == args.n_lenses else theta, info)
                  for k, (theta, info) in stored.items()}  # fmt: skip
    if args.lenstronomy_numerics != "none":  # the same lenses and noise, rendered by lenstronomy
        from lensflow.baselines.lenstronomy import lenstronomy_pairs

        test = lenstronomy_pairs(source, test, args.lenstronomy_numerics)
    observations = source.observations(test, psf_kernel=args.psf_kernel)
    cut = [cut_to_fov(o, model.simulator) for o in observations]
    cost, obs = lens_cost(cut, model.simulator, transform)
    truth = test.theta
    # The generator's own simulators (supersampled Gaussian PSF): the exact re-simulation.
    key = source.psf_index(test.psf_fwhm_arcsec)
    exact = GaussianCost(list(source.simulators), transform)
    obs_exact = ObservedData(test.image, test.sigma, key=key)
    with torch.no_grad():
        chi2_truth = cost(transform.to_u(truth), obs)
        chi2_truth_exact = exact(transform.to_u(truth), obs_exact)
    seeds = [args.seed * 1000 + i for i in range(n_lenses)]
    results = []
    drawn = {}
    for spec in args.variants:
        name, _, path = spec.partition("=")
        feedback = "none" if name == "none" else load_control(path, sampler)
        n_steps = args.n_steps or (model.flow.n_steps if name == "none" else feedback.n_steps)
        solver = args.solver or (model.flow.solver if name == "none" else feedback.solver)
        control_steps = base_solver = None
        if name != "none":
            control_steps = args.control_steps or feedback.control_steps
            # As sample_feedback: an explicit --solver applies to both segments.
            base_solver = args.base_solver or args.solver or feedback.base_solver
        sampler_name = (
            f"{solver} {n_steps}"
            + (f", {control_steps} control steps" if control_steps else "")
            + (f", {base_solver} base" if base_solver and base_solver != solver else "")
        )
        if name in stored:
            theta, info = stored[name]
            if info["sampler"] != sampler_name or tuple(theta.shape[:2]) != (
                args.n_samples,
                n_lenses,
            ):
                raise SystemExit(f"{args.samples_npz}: variant {name!r} was drawn with "
                                 f"{info['sampler']}, {tuple(theta.shape[:2])} (samples, "
                                 f"lenses); asked for {sampler_name}, "
                                 f"{(args.n_samples, n_lenses)}")  # fmt: skip
            seconds, method, device = info["sampling_s"], info["method"], info["device"]
        else:
            if sampler is not model:
                torch.cuda.synchronize()
            start = time.perf_counter()
            samples = sample_posteriors(observations, sampler, args.n_samples,
                                        feedback=feedback, seeds=seeds, n_steps=n_steps,
                                        solver=solver, chunk=args.lens_chunk,
                                        normalize_flux=args.normalize_flux,
                                        control_steps=control_steps,
                                        base_solver=base_solver)  # fmt: skip
            if sampler is not model:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            theta = torch.stack([s.theta for s in samples], dim=1).cpu()  # (M, N, D)
            method, device = samples[0].method, _device_name(args.device)
            print(f"{name}: {sampler_name}, {seconds:.2f} s on {device}", flush=True)
        drawn[name] = (theta, {"sampler": sampler_name, "sampling_s": seconds,
                               "method": method, "device": device})  # fmt: skip
        if args.sample_only:
            continue
        u = transform.to_u(theta)
        calls = (
            0
            if name == "none" or feedback.kind == "zero"
            # zeros: no simulator
            else (signal_calls_per_sample(n_steps, solver, feedback.t_start, control_steps))
        )
        r = score(name, theta, u, truth, chi2_truth, cost, obs, seconds, calls, args.chunk,
                  per_lens=args.per_lens)  # fmt: skip
        u_err = (u.mean(0) - transform.to_u(truth)).abs().median(0).values  # (D,)
        chi2_exact = torch.nan_to_num(sample_chi2(exact, u, obs_exact, args.chunk),
                                      nan=float("inf"))  # fmt: skip
        r |= {
            "chi2_exact_mean": float(chi2_exact.mean()),
            "chi2_exact_median": float(chi2_exact.median()),
            "method": method,
            "sampler": sampler_name,
            "sampling_device": device,
            "param_error_u_mean": float(u_err.mean()),
            "theta_e_abs_error_median_arcsec": float((theta.mean(0)[:, 0] - truth[:, 0]).abs()
                                                     .median()),
            "control": None if name == "none" else str(feedback.path),
            "control_params": 0 if name == "none" else feedback.n_parameters,
        }  # fmt: skip
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.samples_npz and any(k not in stored for k in drawn):  # stored + newly drawn
        _write_samples(args.samples_npz, drawn)
    if args.sample_only:
        return
    base = next((r for r in results if r["variant"] == "none"), None)
    truths = {"chi2_mean": float(chi2_truth.mean()), "chi2_median": float(chi2_truth.median()),
              "chi2_exact_mean": float(chi2_truth_exact.mean()),
              "chi2_exact_median": float(chi2_truth_exact.median())}  # fmt: skip
    masked = 1 - test.mask.double().mean(dim=(1, 2))  # per lens
    masks = {"masked_fraction_mean": float(masked.mean()),
             "masked_fraction_max": float(masked.max()),
             "lenses_masked": int((masked > 0).sum())}  # fmt: skip
    for r in results:
        for k, t in truths.items():
            excess = None if base is None else base[k] - t
            r[f"excess_cut_{k}"] = (base[k] - r[k]) / excess if excess else None

    def cut(r: dict, a: str, b: str) -> str:
        if r is base or r[a] is None:
            return "-"
        return f"{100 * r[a]:+.0f}% / {100 * r[b]:+.0f}%"

    first = "" if n_lenses == args.n_lenses else f" (the first {n_lenses} of {args.n_lenses})"
    print(f"\n{n_lenses} held-out lenses{first} (seed {args.seed}) x {args.n_samples} samples; "
          f"truth reduced chi^2 (obs PSF) mean {truths['chi2_mean']:.4f}, median "
          f"{truths['chi2_median']:.4f}; (exact) mean {truths['chi2_exact_mean']:.4f}, median "
          f"{truths['chi2_exact_median']:.4f}; {masks['lenses_masked']} lenses masked, "
          f"masked fraction mean {masks['masked_fraction_mean']:.3f}, max "
          f"{masks['masked_fraction_max']:.3f}")  # fmt: skip
    print(
        "| variant | sampler | mean / median χ²_r (obs PSF) | excess cut (mean / median) | "
        "mean / median χ²_r (exact) | excess cut (mean / median) | param error (u) | "
        "θ_E error (arcsec) | coverage 68% / 95% | TARP 68% / 95% | s per lens | "
        "calls per sample |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c1 = cut(r, "excess_cut_chi2_mean", "excess_cut_chi2_median")
        c2 = cut(r, "excess_cut_chi2_exact_mean", "excess_cut_chi2_exact_median")
        print(f"| {r['variant']} | {r['sampler']} | {r['chi2_mean']:.2f} / "
              f"{r['chi2_median']:.2f} | {c1} | {r['chi2_exact_mean']:.2f} / "
              f"{r['chi2_exact_median']:.2f} | {c2} | {r['param_error_u_mean']:.3f} | "
              f"{r['theta_e_abs_error_median_arcsec']:.4f} | {r['coverage68']:.3f} / "
              f"{r['coverage95']:.3f} | {r['tarp_coverage68']:.3f} / "
              f"{r['tarp_coverage95']:.3f} | {r['s_per_lens']:.2f} | "
              f"{r['simulator_calls_per_sample']} |")  # fmt: skip
    if args.json:
        record = {"args": vars(args), "truth": truths, "masks": masks, "results": results}
        if args.per_lens:  # what each lens is: truth, seeing, depth, mask, truth's chi^2
            record["lenses"] = {
                "theta": truth.tolist(),
                "names": list(NAMES),
                "psf_fwhm_arcsec": test.psf_fwhm_arcsec.tolist(),
                "background_rms": test.background_rms.tolist(),
                "exposure_time_s": test.exposure_time_s.tolist(),
                "masked_fraction": masked.tolist(),
                "chi2_truth": chi2_truth.tolist(),
            }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


def _device_name(device: str) -> str:
    """``"cpu"`` or the GPU's name, for the record."""
    if device == "cpu":
        return "cpu"
    return torch.cuda.get_device_name(torch.device(device))


def _write_samples(path: str, drawn: dict) -> None:
    """Store each variant's samples ``(M, N, D)`` and how they were drawn in one ``.npz``."""
    import numpy as np

    arrays = {f"theta_{k}": v[0].numpy() for k, v in drawn.items()}
    meta = json.dumps({k: v[1] for k, v in drawn.items()})
    np.savez_compressed(path, meta=np.array(meta), **arrays)


def _read_samples(path: str) -> dict:
    """What ``_write_samples`` stored: ``{variant: (theta (M, N, D), info)}``; ``{}`` if absent."""
    import os

    import numpy as np

    if not os.path.exists(path):
        return {}
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"]))
        return {k: (torch.from_numpy(f[f"theta_{k}"]), info) for k, info in meta.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="score control-net checkpoints end to end (see the docstring)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["none"],
        help="--evaluate: 'none' and NAME=CONTROL_JSON entries",
    )
    p.add_argument("--lens-chunk", type=int, default=20, help="--evaluate: lenses per solve")
    p.add_argument("--first-lenses", type=int, metavar="K",
                   help="--evaluate: sample and score only the first K of the --n-lenses "
                   "held-out lenses (the same lenses, seeds and samples as in the full set; "
                   "stored --samples-npz draws of all of them are cut to K)")  # fmt: skip
    p.add_argument(
        "--psf-kernel",
        choices=["point", "pooled"],
        default="pooled",
        help="--evaluate: observation PSF kernel, pixel-integrated from the generator's fine "
        "Gaussian (default: what the simulator rendered) or the Gaussian point-sampled at "
        "the pixel scale (the default before commit 'conditioning_fwhm_arcsec')",
    )
    p.add_argument(
        "--lenstronomy-numerics", choices=["none", "matched", "independent"], default="none",
        help="--evaluate: render the held-out lenses with lenstronomy (same parameters, PSF, "
        "depth and noise draws): with the simulator's numerics, or lenstronomy's own "
        "(6x supersampling, native-pixel convolution); the feedback still uses caustics",
    )  # fmt: skip
    p.add_argument(
        "--mask-probability", type=float,
        help="--evaluate: chance that a held-out lens gets a random likelihood mask (default: "
        "the model's training setting); the lenses and noise do not change with it",
    )  # fmt: skip
    p.add_argument(
        "--mask-max-fraction", type=float,
        help="--evaluate: bound on a mask's masked fraction (data.random_masks; default: the "
        "model's training setting)",
    )  # fmt: skip
    p.add_argument("--per-lens", action="store_true",
                   help="--evaluate: also write each lens's mean chi^2 per variant and what "
                   "the lens is (truth, PSF, depth, mask) to --json")  # fmt: skip
    p.add_argument("--normalize-flux", action="store_true",
                   help="--evaluate: sample in the model's flux units "
                   "(sampling.sample_posteriors(normalize_flux=True))")  # fmt: skip
    p.add_argument("--model", default="euclid")
    p.add_argument("--fwhm", type=float, default=0.20, help="the single PSF FWHM, arcsec")
    p.add_argument("--n-train", type=int, default=2048, help="finetuning pool size")
    p.add_argument("--n-lenses", type=int, default=40, help="held-out lenses")
    p.add_argument("--n-samples", type=int, default=50, help="posterior samples per lens")
    p.add_argument("--t-start", type=float, default=0.8)
    p.add_argument("--ft-steps", type=int, default=300)
    p.add_argument("--ft-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--n-blocks", type=int, default=2)
    p.add_argument(
        "--n-steps",
        type=int,
        help="sampler steps over [0, 1] (default: 40; --evaluate: each variant's own default)",
    )
    p.add_argument("--solver", help="solver (default: euler; --evaluate: each variant's own)")
    p.add_argument("--control-steps", type=int,
                   help="--evaluate: solver steps on [t_start, 1] (default: each control "
                   "net's; its share of --n-steps where it has none)")  # fmt: skip
    p.add_argument("--base-solver",
                   help="--evaluate: solver on [0, t_start], where only the base flow acts "
                   "(default: each control net's, else --solver)")  # fmt: skip
    p.add_argument("--chunk", type=int, default=1024, help="rows per simulator call")
    p.add_argument("--seed", type=int, default=20261125)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--device", default="cpu",
                   help="--evaluate: device that draws the samples (lenses, scores and TARP "
                   "stay on the CPU)")  # fmt: skip
    p.add_argument("--samples-npz",
                   help="--evaluate: store the drawn samples here (.npz, with the sampler, "
                   "wall time and device of each variant); if the file exists, score the "
                   "samples stored in it instead of drawing them")  # fmt: skip
    p.add_argument("--sample-only", action="store_true",
                   help="--evaluate: draw (and store with --samples-npz) but do not score, "
                   "e.g. on a GPU whose time is short; score later from the .npz")  # fmt: skip
    args = p.parse_args()
    if args.sample_only and not args.samples_npz:
        p.error("--sample-only needs --samples-npz (the samples would be lost)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.evaluate:
        evaluate(args)
        return
    args.n_steps = args.n_steps or 40
    args.solver = args.solver or "euler"

    model = load_model(args.model)
    posterior = model.posterior.eval()
    transform = posterior.transform
    data = dataclasses.replace(
        model.data, psf_fwhm_min_arcsec=args.fwhm, psf_fwhm_max_arcsec=args.fwhm, n_psf_grid=1
    )
    source = SimulatedPairs(model.simulator, data)
    cost = GaussianCost(source.simulators[0], transform)  # the simulator that made the images

    start = time.perf_counter()
    train = source.sample(args.n_train, generator=torch.Generator().manual_seed(args.seed + 10))
    test = source.sample(args.n_lenses, generator=torch.Generator().manual_seed(args.seed))
    sim_s = time.perf_counter() - start
    u_train = transform.to_u(train.theta)
    obs_train = ObservedData(train.image, train.sigma)
    obs_test = ObservedData(test.image, test.sigma)
    truth, dim = test.theta, test.theta.shape[1]
    with torch.no_grad():
        chi2_truth = cost(transform.to_u(truth), obs_test)

    cfg = FinetuneConfig(
        n_steps=args.ft_steps, batch_size=args.ft_batch, lr=args.lr, t_start=args.t_start,
        width=args.width, n_blocks=args.n_blocks, n_steps_sample=args.n_steps,
        solver=args.solver, chunk_size=args.chunk,
    )  # fmt: skip
    grad_signal = GradientSignal(cost, dim)
    controlled, finetune_info = {}, {}
    for name, signal in (("gradient", grad_signal), ("zero", ZeroSignal(grad_signal.dim))):
        losses: list[float] = []
        start = time.perf_counter()
        controlled[name] = finetune(
            posterior, signal, tensor_batches(u_train, train.x, obs_train), cfg,
            generator=torch.Generator().manual_seed(args.seed + 20),
            callback=lambda _step, loss, losses=losses: losses.append(loss),
        )  # fmt: skip
        seconds = time.perf_counter() - start
        k = max(1, len(losses) // 10)
        finetune_info[name] = {
            "seconds": seconds,
            "loss_first10pct": sum(losses[:k]) / k,
            "loss_last10pct": sum(losses[-k:]) / k,
            "control_params": sum(p.numel() for p in controlled[name].control.parameters()),
        }
        print(f"finetune {name}: {seconds:.1f} s, loss {finetune_info[name]['loss_first10pct']:.4f}"
              f" -> {finetune_info[name]['loss_last10pct']:.4f}", flush=True)  # fmt: skip

    results = []
    calls = signal_calls_per_sample(args.n_steps, args.solver, args.t_start)
    g = torch.Generator().manual_seed(args.seed + 1)
    start = time.perf_counter()
    u_base = posterior.sample_u(test.x, args.n_samples, n_steps=args.n_steps,
                                solver=args.solver, generator=g)  # fmt: skip
    theta = transform.from_u(u_base)
    seconds = time.perf_counter() - start
    results.append(score("pretrained only", theta, u_base, truth, chi2_truth, cost, obs_test,
                         seconds, 0, args.chunk))  # fmt: skip
    for name, label in (("gradient", "gradient feedback"), ("zero", "zero-signal ablation")):
        g = torch.Generator().manual_seed(args.seed + 1)  # same base noise as the baseline
        start = time.perf_counter()
        out = sample_feedback(controlled[name], test.x, obs_test, args.n_samples,
                              n_steps=args.n_steps, solver=args.solver, generator=g)  # fmt: skip
        seconds = time.perf_counter() - start
        sim_calls = out.n_signal_calls if name == "gradient" else 0
        results.append(score(label, out.theta, out.u, truth, chi2_truth, cost, obs_test,
                             seconds, sim_calls, args.chunk))  # fmt: skip
        print(f"sampled {label}: {seconds:.1f} s", flush=True)

    base, chi2_t = results[0], float(chi2_truth.mean())
    for r in results:
        for key in ("mean", "median"):  # of the mean (the paper's) and of the median chi^2
            excess = base[f"chi2_{key}"] - chi2_t
            cut = (base[f"chi2_{key}"] - r[f"chi2_{key}"]) / excess if excess else None
            r["excess_chi2_cut" + ("" if key == "mean" else "_median")] = cut

    summary = {
        "args": vars(args),
        "sampler": f"{args.solver}, {args.n_steps} steps, control for t > {args.t_start} "
        f"({calls} signal calls per sample)",
        "simulation_s": sim_s,
        "finetune": finetune_info,
        "results": results,
    }
    print(f"\n{args.n_lenses} held-out lenses x {args.n_samples} samples, PSF FWHM {args.fwhm}\", "
          f"t_start {args.t_start}, {summary['sampler']}; truth reduced chi^2 {chi2_t:.4f}")  # fmt: skip
    print("| variant | mean chi2_r | median chi2_r | excess cut (mean / median) | theta_E median rel. error"
          " | coverage 68% / 95% | s per lens | simulator calls per sample |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        cut = "-" if r is base else (f"{100 * r['excess_chi2_cut']:+.0f}% / "
                                     f"{100 * r['excess_chi2_cut_median']:+.0f}%")  # fmt: skip
        print(f"| {r['variant']} | {r['chi2_mean']:.4f} | {r['chi2_median']:.4f} | {cut} | "
              f"{100 * r['theta_e_rel_error_median']:.2f}% | {r['coverage68']:.3f} / "
              f"{r['coverage95']:.3f} | {r['s_per_lens']:.3f} | "
              f"{r['simulator_calls_per_sample']} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
