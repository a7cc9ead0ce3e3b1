"""Command line: ``lensflow <subcommand>``; parse -> config -> one library call -> outputs.

Every user mistake ends in a one-line ``lensflow: error: ...`` message and exit status 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lensflow.observation import Observation

__all__ = ["main"]


def _add_observation_args(p: argparse.ArgumentParser) -> None:
    """The observation arguments every command that reads data takes."""
    p.add_argument(
        "image",
        help="image file: FITS (.fits, multi-extension allowed) or "
        "lenstronomy-style HDF5 (.h5/.hdf5)",
    )
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--noise", metavar="F", help="noise (sigma/RMS) map, FITS")
    noise.add_argument("--weight", metavar="F", help="weight (inverse-variance) map, FITS")
    p.add_argument("--psf", metavar="F", help="PSF kernel file (FITS or HDF5 kernel_point_source)")
    p.add_argument(
        "--pixel-scale",
        metavar="ARCSEC",
        type=float,
        help="pixel scale in arcsec (overrides the header)",
    )
    p.add_argument("--band", metavar="B", help="band of a multi-extension file, e.g. VIS")
    p.add_argument("--mask", metavar="F", help="FITS mask; nonzero pixels are excluded")


def _add_normalize_flux_arg(p: argparse.ArgumentParser) -> None:
    """``--normalize-flux/--no-normalize-flux`` of the sampling commands (default: None)."""
    p.add_argument("--normalize-flux", action=argparse.BooleanOptionalAction, default=None,
                   help="sample in flux units where the cutout's noise scale is the model's "
                   "(default: as the model was trained; the shipped models use absolute "
                   "units; see docs/real-lenses.md, 'Flux units')")  # fmt: skip


def _add_compile_arg(p: argparse.ArgumentParser) -> None:
    """``--compile`` of the commands that sample with feedback (sample, fit, catalog)."""
    p.add_argument("--compile", action="store_true",
                   help="with feedback: render through torch.compile; the first lens "
                   "compiles (tens of seconds on a GPU, minutes on a CPU), then feedback is "
                   "2-3x faster on a GPU (docs/benchmarks.md)")  # fmt: skip


def _add_threads_arg(p: argparse.ArgumentParser, workers: bool = False) -> None:
    """``--threads`` of the commands that compute in this process."""
    more = "; with --workers > 1, each Dask worker runs one" if workers else ""
    p.add_argument("--threads", type=int, metavar="N",
                   help=f"torch CPU threads of this process (default: torch's, about one per "
                   f"core{more})")  # fmt: skip


def _set_threads(n: int | None) -> None:
    """Apply ``--threads`` (``None``: leave torch's default)."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    """The ODE sampler's arguments of the commands that sample (sample, fit, catalog)."""
    from lensflow.solvers import SOLVERS

    p.add_argument("--n-steps", type=int, help="ODE steps (default: the control net's with "
                   "feedback, else the model's)")  # fmt: skip
    p.add_argument("--control-steps", type=int, metavar="K",
                   help="with feedback: steps after t_start, one simulator call per sample each "
                   "(default: the control net's; 4 halves the cost of the default 8, "
                   "docs/feedback.md)")  # fmt: skip
    p.add_argument("--solver", choices=sorted(SOLVERS),
                   help="ODE solver, of both segments with feedback unless --base-solver "
                   "(default: the control net's, else the model's)")  # fmt: skip
    p.add_argument("--base-solver", choices=sorted(SOLVERS),
                   help="with feedback: the solver before t_start, where only the base flow "
                   "acts (no simulator calls; default: --solver where given, else the control "
                   "net's; docs/feedback.md)")  # fmt: skip


def _load_observation(args: argparse.Namespace) -> Observation:
    """The observation named by ``_add_observation_args``' arguments."""
    from lensflow.observation import load_observation

    return load_observation(
        args.image, noise=args.noise, weight=args.weight, psf=args.psf,
        pixel_scale_arcsec=args.pixel_scale, band=args.band, mask=args.mask,
    )  # fmt: skip


def _cmd_simulate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from lensflow.config import preset, run_provenance, to_toml
    from lensflow.mocks import read_param_table, simulate_mocks

    config = preset(args.preset)
    out = Path(args.out)
    generator = torch.Generator().manual_seed(args.seed)
    table = read_param_table(args.params, generator=generator)
    if table.drawn:
        print(f"drawn from the prior (not in the table): {', '.join(table.drawn)}")
    with tqdm(total=len(table.ids), unit="lens", desc="simulate", disable=args.quiet) as bar:
        truth = simulate_mocks(table, config, out, generator=generator, progress=bar.update)
    truth.meta["seed"] = args.seed
    truth.write(out / "truth.ecsv", overwrite=True)
    (out / "config.toml").write_text(to_toml({"simulator": config}))
    (out / "provenance.json").write_text(
        json.dumps(run_provenance(args.seed, {"simulator": config}), indent=2) + "\n"
    )
    print(
        f"wrote {len(truth)} cutout(s) ({config.name}: {config.n_pix}x{config.n_pix} px at "
        f'{config.pixel_scale_arcsec}"/px) and truth.ecsv to {out}/'
    )
    return 0


def _format_value(value: object) -> str:
    """Floats to 4 significant digits, also inside lists and tuples."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return " x ".join(_format_value(v) for v in value)
    return str(value)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lensflow.observation import summarize
    from lensflow.plots import plot_observation

    obs = _load_observation(args)
    summary = summarize(obs)
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {_format_value(value)}")
    out = Path(args.out) if args.out else Path(Path(args.image).name.split(".")[0] + ".png")
    plot_observation(obs, out)
    print(f"wrote {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    import torch
    import torch.distributed as dist

    from lensflow.config import (
        FlowConfig,
        TrainConfig,
        data_preset,
        load_config,
        preset,
        run_provenance,
        to_toml,
    )
    from lensflow.train import train_model

    configs = load_config(args.config) if args.config else {"simulator": preset(args.preset)}
    sim = configs["simulator"]
    data = configs.get("data", data_preset(sim.name))
    if args.normalize_flux:
        data = dataclasses.replace(data, normalize_flux=True)
    if args.prior is not None:
        data = dataclasses.replace(data, prior=args.prior)
    flow = configs.get("flow", FlowConfig())
    overrides = {"n_steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                 "time_limit_s": args.time_limit}  # fmt: skip
    train = dataclasses.replace(
        configs.get("train", TrainConfig()),
        **{k: v for k, v in overrides.items() if v is not None},
    )
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "LOCAL_RANK" in os.environ:  # launched by torchrun: one process per device
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {"simulator": sim, "data": data, "flow": flow, "train": train}
    provenance = run_provenance(train.seed, resolved)
    provenance["command"] = "lensflow " + " ".join(sys.argv[1:])
    result = train_model(sim, data, flow, train, out_dir=out, device=device,
                         pairs_path=args.data, resume=args.resume, progress=not args.quiet,
                         provenance=provenance)  # fmt: skip
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    (out / "config.toml").write_text(to_toml(resolved))
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    val = f", validation loss {result.val_loss[-1]:.4f}" if result.val_loss else ""
    print(f"trained {result.steps} steps in {result.wall_time_s:.0f} s{val}; wrote {out}/model.*")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import time

    from lensflow.checkpoint import load_control, load_model, model_path
    from lensflow.config import SampleConfig, run_provenance
    from lensflow.sampling import (
        describe_sampler,
        resolve_feedback,
        resolve_normalize_flux,
        sample_posterior,
        sampler_settings,
        samples_table,
        summary_table,
    )

    obs = _load_observation(args)
    model = load_model(args.model)
    kind = resolve_feedback(model, args.feedback)
    control = None if kind == "none" else load_control(kind, model)
    sampler = sampler_settings(model, control, n_steps=args.n_steps, solver=args.solver,
                               control_steps=args.control_steps,
                               base_solver=args.base_solver)  # fmt: skip
    config = SampleConfig(n_samples=args.n, n_steps=sampler["n_steps"],
                          solver=sampler["solver"], seed=args.seed)  # fmt: skip
    start = time.perf_counter()
    normalize = resolve_normalize_flux(model, args.normalize_flux)
    samples = sample_posterior(obs, model, config.n_samples, feedback=control or "none",
                               seed=config.seed, n_steps=config.n_steps, solver=args.solver,
                               normalize_flux=normalize,
                               control_steps=args.control_steps,
                               compile=args.compile, base_solver=args.base_solver)  # fmt: skip
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, summary = samples_table(samples), summary_table(samples)
    for t in (table, summary):
        t.meta.update({"observation": obs.name, "model": str(model_path(args.model)),
                       "feedback": kind})  # fmt: skip
    table.write(out / "samples.ecsv", overwrite=True)
    summary.write(out / "summary.ecsv", overwrite=True)
    provenance = run_provenance(config.seed, {"sample": config, "simulator": model.simulator})
    provenance |= {"observation": str(args.image), "model": str(model_path(args.model)),
                   "model_training": model.meta.get("training", {}), "feedback": kind,
                   "feedback_requested": args.feedback,
                   "control": None if control is None else str(control.path),
                   "control_status": None if control is None else control.meta.get("status"),
                   "normalize_flux": normalize, "sampling_s": seconds,
                   "control_steps": args.control_steps, "sampler": samples.sampler,
                   "compile": args.compile}  # fmt: skip
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    how = "no feedback" if control is None else f"{kind} feedback ({control.path.name})"
    print(f"feedback: {how} [requested: {args.feedback}]; {describe_sampler(samples.sampler)}, "
          f"{seconds:.1f} s")  # fmt: skip
    print(f"wrote {config.n_samples} samples of {obs.name or args.image} to {out}/samples.ecsv")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    import dataclasses
    import platform
    import time

    import torch

    from lensflow.checkpoint import load_control, load_model, save_control
    from lensflow.config import run_provenance
    from lensflow.feedback import FinetuneConfig, finetune_lens, split_steps

    if args.steps < 1 or args.batch_size < 1 or not 0 <= args.t_start < 1:
        raise ValueError(
            f"--steps {args.steps} and --batch-size {args.batch_size} must be >= 1 and "
            f"--t-start {args.t_start} in [0, 1)"
        )
    if args.time_limit is not None and not args.time_limit > 0:
        raise ValueError(f"--time-limit {args.time_limit} must be > 0 seconds")
    # The shipped nets' samplers (docs/feedback.md): the gradient nets were measured with a
    # midpoint base segment, the learned ones with Euler 40.
    shipped = (20, 8, "midpoint") if args.signal == "gradient" else (40, None, None)
    if args.n_steps_sample is None:
        args.n_steps_sample = shipped[0]
        if args.control_steps_sample is None:
            args.control_steps_sample = shipped[1]
    if args.base_solver is None and args.solver == "euler":
        args.base_solver = shipped[2]
    try:  # the stored sampler is checked now, not when a user first samples with it
        split_steps(args.n_steps_sample, args.t_start, args.control_steps_sample)
    except ValueError as err:
        raise ValueError(f"--n-steps-sample / --control-steps-sample: {err}") from None
    if (args.width is not None and args.width < 1) or (
        args.blocks is not None and args.blocks < 1
    ):
        raise ValueError(f"--width {args.width} and --blocks {args.blocks} must be >= 1")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, device=device)
    data = model.data
    if args.mask_probability is not None:
        if not 0 <= args.mask_probability <= 1:
            raise ValueError(f"--mask-probability {args.mask_probability} must be in [0, 1]")
        data = dataclasses.replace(data, mask_probability=args.mask_probability)
    init, init_record = None, None
    if args.init is not None:
        init = load_control(args.init, model)  # checks the base weights
        if init.kind != args.signal:
            raise ValueError(f"--init {args.init} is a {init.kind} control net, not {args.signal}")
        if abs(init.t_start - args.t_start) > 1e-12:
            raise ValueError(f"--init {args.init} was trained for --t-start {init.t_start}, "
                             f"not {args.t_start}")  # fmt: skip
        c = init.control
        for flag, asked, has in (("--width", args.width, c.width),
                                 ("--blocks", args.blocks, c.n_blocks)):  # fmt: skip
            if asked is not None and asked != has:
                raise ValueError(f"--init {args.init} has {flag} {has}, not {asked}; "
                                 f"leave {flag} out to keep the init's shape")  # fmt: skip
        before = init.meta.get("training", {})
        # An init that was itself continued has trained steps_total steps in all.
        init_record = {"path": str(init.path),
                       "steps": before.get("steps_total", before.get("steps")),
                       "device": before.get("device")}  # fmt: skip
    cfg = FinetuneConfig(n_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         t_start=args.t_start, n_steps_sample=args.n_steps_sample,
                         solver=args.solver, control_steps_sample=args.control_steps_sample,
                         base_solver_sample=args.base_solver,
                         time_limit_s=args.time_limit)  # fmt: skip
    if args.width is not None:
        cfg = dataclasses.replace(cfg, width=args.width)
    if args.blocks is not None:
        cfg = dataclasses.replace(cfg, n_blocks=args.blocks)
    if init is not None:  # keep the init's shape in the record
        c = init.control
        cfg = dataclasses.replace(cfg, width=c.width, n_blocks=c.n_blocks, time_dim=c.time_dim)
    losses: list[float] = []
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    controlled = finetune_lens(
        model, args.signal, cfg, generator=torch.Generator(device).manual_seed(args.seed),
        device=device, progress=not args.quiet,
        callback=lambda _step, loss: losses.append(loss), data=data,
        init=None if init is None else init.control,
        init_encoder=None if init is None else init.encoder,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    k = max(1, len(losses) // 10)
    hardware = (f"{torch.cuda.get_device_name(device)}" if str(device).startswith("cuda")
                else f"cpu {platform.machine()} ({torch.get_num_threads()} torch threads)")  # fmt: skip
    training = {
        "steps": len(losses), "n_steps_scheduled": cfg.n_steps,
        "batch_size": cfg.batch_size, "wall_time_s": round(seconds, 1),
        "device": hardware, "seed": args.seed,
        "loss_first10pct": sum(losses[:k]) / k, "loss_last10pct": sum(losses[-k:]) / k,
        "data": "data.SimulatedPairs over the model's PSF grid and depth ranges",
        "data_config": dataclasses.asdict(data),
        "command": "lensflow " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    if init_record is not None:
        training["init"] = init_record
        if isinstance(init_record["steps"], int):
            training["steps_total"] = init_record["steps"] + len(losses)
    status = args.status or (
        "provisional: CPU-trained" if not str(device).startswith("cuda") else "GPU-trained"
    )
    out = Path(args.out)
    stem = out / f"{model.path.stem}-{args.signal}"
    meta_path = save_control(stem, controlled, model, kind=args.signal, finetune=cfg,
                             training=training, status=status)  # fmt: skip
    provenance = run_provenance(args.seed, {"finetune": cfg})
    provenance |= {"model": str(model.path), "control": str(meta_path), "training": training}
    (out / f"{stem.name}-provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    n_par = json.loads(meta_path.read_text())["n_parameters"]
    base = sum(p.numel() for p in model.posterior.parameters())
    print(f"finetuned the {args.signal} control net ({n_par:,} parameters, {n_par / base:.1%} of "
          f"the base flow's {base:,}) for {len(losses)} steps in {seconds:.0f} s, loss "
          f"{training['loss_first10pct']:.4f} -> {training['loss_last10pct']:.4f}; wrote "
          f"{stem}.safetensors/.json")  # fmt: skip
    if out.resolve() != model.path.parent.resolve():
        print(f"copy both files beside {model.path} to make them its default feedback")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from lensflow.fit import CORNER_PARAMS, fit_lens, resolve_preset, write_fit
    from lensflow.params import NAMES

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    obs = _load_observation(args)
    if args.preset == "auto" and args.model is None:
        chosen = resolve_preset(obs, "auto")
        print(f'preset auto: {chosen} (pixel scale {obs.pixel_scale_arcsec:.4g}"/px)')
    result = fit_lens(
        obs, seed=args.seed, preset=args.preset, model=args.model, feedback=args.feedback,
        n=args.n, device=args.device, n_steps=args.n_steps,
        center_pix=tuple(args.center_pix) if args.center_pix else None,
        center_radec=tuple(args.center) if args.center else None, fallback=args.fallback,
        normalize_flux=args.normalize_flux, pad=args.pad, control_steps=args.control_steps,
        fallback_prior=args.fallback_prior, compile=args.compile, solver=args.solver,
        base_solver=args.base_solver,
    )  # fmt: skip
    corner = CORNER_PARAMS
    if args.corner_params:
        corner = (
            None
            if args.corner_params == "all"
            else [c.strip() for c in args.corner_params.split(",")]
        )
        unknown = [c for c in corner or [] if c not in NAMES]
        if unknown:
            raise ValueError(f"--corner-params: unknown parameter(s) {', '.join(unknown)}")
    written = write_fit(result, args.out, plots=not args.no_plots, corner_params=corner)
    q = result.samples.quantiles((0.16, 0.5, 0.84))[:, 0].tolist()
    d = result.diagnostics
    flow = "flow" if result.feedback == "none" else f"flow+{result.feedback}"
    sampled = (f"{result.name}: {flow} ({result.preset}), {args.n} samples in "
               f"{result.timings['sample']:.1f} s")  # fmt: skip
    theta_e = f"theta_E = {q[1]:.4f} (+{q[2] - q[1]:.4f} / -{q[1] - q[0]:.4f}) arcsec"
    if result.fallback:
        fb = result.fallback
        print(f"{sampled}; flagged ({fb['flow_diagnostics']['reason']})")
        if fb["method"] == "smc":
            # Not a convergence test: every particle distinct and moved (docs/baselines.md).
            state = ("sanity checks passed" if fb["converged"]
                     else "sanity checks FAILED (see provenance.json)")  # fmt: skip
            print(f"re-ran tempered SMC: {fb['n_particles']} particles, "
                  f"{len(fb['temperatures']) - 1} temperatures in {fb['wall_time_s']:.0f} s, "
                  f"{state}; {theta_e}")  # fmt: skip
        else:
            state = "converged" if fb["converged"] else "NOT converged (chain < 50 tau)"
            print(f"re-ran emcee: {fb['n_walkers']} walkers x {fb['n_steps']} steps in "
                  f"{fb['wall_time_s']:.0f} s, max tau {fb['max_tau']:.0f}, {state}; "
                  f"{theta_e}")  # fmt: skip
    else:
        print(f"{sampled}; {theta_e}")
    flag = "reliable" if d.reliable else f"NOT reliable: {d.reason}"
    print(f"reduced chi2 of posterior samples {d.chi2_red_samples:.2f}; {flag}")
    print(f"wrote {', '.join(sorted(p.name for p in written.values()))} to {args.out}/")
    return 0


def _read_samples(path: str) -> tuple[object, str]:
    """Posterior samples from a ``fit``/``sample`` output (FITS/ECSV table or its folder)."""
    from lensflow.sampling import read_samples

    samples, meta = read_samples(path)
    return samples, str(meta.get("lensid", ""))


def _cmd_corner(args: argparse.Namespace) -> int:
    from astropy.table import Table

    from lensflow.params import NAMES
    from lensflow.plots import CORNER_LEVELS, corner_plot
    from lensflow.sampling import registry_values

    posts, ids = zip(*(_read_samples(s) for s in args.samples), strict=True)
    params = [p.strip() for p in args.params.split(",")] if args.params else list(NAMES)
    unknown = [p for p in params if p not in NAMES]
    if unknown:
        raise ValueError(f"--params: unknown parameter(s) {', '.join(unknown)}; see "
                         "docs/conventions.md for the names")  # fmt: skip
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(posts):
        raise ValueError(f"--labels has {len(labels)} entries for {len(posts)} sample files")
    truths = None
    if args.truths:
        table = Table.read(args.truths)
        if len(table) > 1:
            want = args.truth_id or ids[0]
            if "id" not in table.colnames or want not in list(table["id"]):
                raise ValueError(f"{args.truths}: {len(table)} rows and no row with id "
                                 f"{want!r}; pass --truth-id")  # fmt: skip
            table = table[[str(i) == want for i in table["id"]]]
        missing = [p for p in params if p not in table.colnames]
        if missing:
            raise ValueError(f"{args.truths}: no column(s) {', '.join(missing)}")
        truths = [float(registry_values(table, p)[0]) for p in params]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    corner_plot(list(posts), [out], labels=labels, params=params, truths=truths,
                title=args.title)  # fmt: skip
    lv = " and ".join(f"{100 * c:.0f}%" for c in CORNER_LEVELS)
    print(f"wrote {out}")
    print(f"caption: 2-D contours enclose {lv} of the posterior mass; diagonal panels show "
          "the 1-D marginal densities" + ("" if truths is None else "; black lines mark the "
          "true values") + ".")  # fmt: skip
    return 0


def _cmd_catalog(args: argparse.Namespace) -> int:
    from lensflow.catalog import read_catalog, run_catalog

    catalog = read_catalog(args.catalog)
    scheduler = args.scheduler or ("local" if args.workers > 1 else None)
    table = run_catalog(
        catalog, args.out, n=args.n, feedback=args.feedback, seed=args.seed,
        preset=args.preset, model=args.model, batch_size=args.batch_size, scheduler=scheduler,
        n_workers=args.workers, device=args.device, plots=not args.no_plots,
        progress=not args.quiet, fallback=args.fallback, pad=args.pad,
        fallback_prior=args.fallback_prior, compile=args.compile, n_steps=args.n_steps,
        control_steps=args.control_steps, solver=args.solver, base_solver=args.base_solver,
    )  # fmt: skip
    m = table.meta
    ok = table["status"] == "ok"
    n_flagged = int((ok & ~table["flow_reliable"]).sum())
    n_unreliable = int((ok & ~table["reliable"]).sum())
    text = f"{n_flagged} of {int(ok.sum())} flow posteriors flagged unreliable"
    if args.fallback != "none":
        n_conv = int((ok & table["fallback_converged"]).sum())
        how = ("emcee", "converged") if args.fallback == "mcmc" else (
            "tempered SMC", "passed its sanity checks")  # fmt: skip
        text += (f"; re-ran with {how[0]}: {n_conv} {how[1]}; {n_unreliable} still flagged "
                 "after the fallback")  # fmt: skip
    print(text + " (see reliable, unreliable_reason in the results)")
    print(f"{m['n_ok']} ok, {m['n_failed']} failed, {m['n_skipped']} skipped (already done) "
          f"in {m['wall_time_s']:.0f} s; results: {Path(args.out) / 'results.ecsv'}")  # fmt: skip
    return 0


def _cmd_coverage(args: argparse.Namespace) -> int:
    import torch
    from astropy.table import Table

    from lensflow.metrics import interval_coverage
    from lensflow.params import NAMES
    from lensflow.plots import coverage_plot
    from lensflow.sampling import registry_values

    run = Path(args.run)
    if not (run / "lenses").is_dir():
        raise ValueError(f"{run}: not a catalog output folder (no lenses/ inside)")
    truths = Table.read(args.truths)
    missing = [c for c in ("id", *NAMES) if c not in truths.colnames]
    if missing:
        raise ValueError(f"{args.truths}: missing column(s) {', '.join(missing)}")
    values = torch.stack(
        [torch.as_tensor(registry_values(truths, n), dtype=torch.float64) for n in NAMES], 1
    )
    samples, truth, skipped = [], [], []
    for k, lens_id in enumerate(truths["id"]):
        folder = run / "lenses" / str(lens_id)
        if not (folder / "samples.fits").is_file():
            skipped.append(str(lens_id))
            continue
        post, _ = _read_samples(str(folder))
        samples.append(post.theta)
        truth.append(values[k])
    if len(samples) < 2:
        raise ValueError(f"{run}: need samples of at least 2 lenses with truths, found "
                         f"{len(samples)}")  # fmt: skip
    n = min(s.shape[0] for s in samples)
    stacked = torch.stack([s[:n] for s in samples], 1)
    truth_t = torch.stack(truth)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    coverage_plot(stacked, truth_t, out, title=args.title)
    cov = interval_coverage(stacked, truth_t, levels=(0.68, 0.95)).coverage.mean(1).tolist()
    note = f" ({len(skipped)} truths without samples skipped)" if skipped else ""
    print(f"{len(samples)} lenses{note}: mean coverage {cov[0]:.3f} at 68%, {cov[1]:.3f} at "
          f"95%; wrote {out}")  # fmt: skip
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses
    import shlex

    import torch

    from lensflow.baselines import bench, report
    from lensflow.catalog import read_catalog
    from lensflow.config import run_provenance

    cfg = bench.BENCH_CONFIGS[args.config]
    changes = {} if args.methods is None else {"methods": bench.parse_methods(args.methods)}
    if args.n_lenses is not None:
        changes["n_lenses"] = args.n_lenses
    if args.set is not None:
        changes |= bench.parse_overrides(args.set)
    wanted = None
    if args.lenses is not None:
        wanted = [w.strip() for w in args.lenses.split(",") if w.strip()]
        if not wanted:
            raise ValueError("--lenses needs at least one lens name")
        if args.n_lenses is None:  # search the whole catalog for the named lenses
            changes["n_lenses"] = len(read_catalog(args.catalog or
                                                   bench.default_catalog()))  # fmt: skip
    cfg = dataclasses.replace(cfg, **changes)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; choose another --out")
    lenses = bench.load_demo_lenses(cfg.n_lenses, catalog=args.catalog, truths=args.truths,
                                    model=args.model)  # fmt: skip
    notes = []
    if args.real:
        real, notes = bench.load_real_lenses(args.real_root, model=args.model)
        lenses += real
    # A lens keeps its seed (seed + its position among the loaded lenses) in any subset.
    picked = list(enumerate(lenses))
    if wanted is not None:
        names = {lens.name: k for k, lens in picked}
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ValueError(f"--lenses: unknown lens(es) {', '.join(unknown)}; available: "
                             f"{', '.join(names)}")  # fmt: skip
        picked = [(names[w], lenses[names[w]]) for w in dict.fromkeys(wanted)]
    lenses = [lens for _, lens in picked]
    torch.manual_seed(args.seed)
    result = bench.run_bench(lenses, cfg, model=args.model, device=args.device, seed=args.seed,
                             seeds=[args.seed + k for k, _ in picked], store=out,
                             resume=args.resume, progress=not args.quiet)  # fmt: skip
    result = dataclasses.replace(result, notes=(*result.notes, *notes))
    parts = ["--config", args.config, "--methods", ",".join(cfg.methods), "--n-lenses",
             str(cfg.n_lenses), "--seed", str(args.seed), "--threads", str(args.threads),
             "--device", args.device, "--out", str(out)]  # fmt: skip
    parts += ["--lenses", ",".join(lens.name for lens in lenses)] if wanted else []
    overrides = bench.config_overrides(cfg)
    parts += ["--set", ",".join(f"{k}={v}" for k, v in overrides.items())] if overrides else []
    parts += ["--resume"] if args.resume else []
    for flag, value in (("--model", args.model if args.model != "euclid" else None),
                        ("--catalog", args.catalog), ("--truths", args.truths),
                        ("--real-root", args.real_root), ("--docs", args.docs)):  # fmt: skip
        parts += [flag, str(value)] if value else []
    parts += ["--real"] if args.real else []
    command = "lensflow bench " + " ".join(shlex.quote(a) for a in parts)
    out.mkdir(parents=True, exist_ok=True)
    tree = report.bench_json(result, command=command,
                             provenance=run_provenance(args.seed, {"bench": cfg}))  # fmt: skip
    written = [out / f"bench-{cfg.name}.json"]
    written[0].write_text(json.dumps(tree, indent=1) + "\n")
    figures = report.write_figures(result, out / "figures")
    md = report.markdown_report(result, command=command,
                                figures=[str(f.relative_to(out)) for f in figures])  # fmt: skip
    written.append(out / f"bench-{cfg.name}.md")
    written[-1].write_text(md)
    if args.docs:
        docs = Path(args.docs)
        shown = report.write_figures(result, docs.parent / "figures")
        (docs.parent / f"bench-{cfg.name}.json").write_text(json.dumps(tree, indent=1) + "\n")
        block = report.markdown_report(result, command=command,
                                       figures=[str(f.relative_to(docs.parent)) for f in shown])  # fmt: skip
        written.append(report.replace_docs_block(docs, block))
    print(f"{len(result.records)} records ({len(lenses)} lenses x {len(cfg.methods)} methods); "
          f"wrote {', '.join(map(str, written))} and {len(figures)} figure(s)")  # fmt: skip
    return 0


def _show_warning(message: Warning | str, category: type[Warning], *args, **kwargs) -> None:
    print(f"lensflow: warning: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lensflow`` command (exposed for the docs and tests)."""
    from lensflow import __version__
    from lensflow.config import PRESETS
    from lensflow.solvers import SOLVERS

    parser = argparse.ArgumentParser(
        prog="lensflow",
        description="Strong-lens posteriors from flow matching with simulator feedback.",
    )
    parser.add_argument("--version", action="version", version=f"lensflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "simulate",
        help="render mock lenses from a parameter table into FITS cutouts",
        description="Render one noisy FITS cutout (HDUs IMAGE, NOISE, PSF; PIXSCALE and a "
        "celestial WCS) per row of a parameter table, plus truth.ecsv. Columns "
        "are registry names (see docs/conventions.md) and an optional id; "
        "missing parameters are drawn from the default prior.",
    )
    p.add_argument("params", help="parameter table (ECSV, CSV or FITS)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument(
        "--preset", default="hst", choices=sorted(PRESETS), help="instrument preset (default: hst)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of prior and noise draws")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "inspect",
        help="summarize an observation and plot image, noise and PSF",
        description="Load an observation (FITS or lenstronomy HDF5), print its shape, pixel "
        "scale, S/N and masked fraction, and write a PNG of image, noise, S/N "
        "and PSF.",
    )
    _add_observation_args(p)
    p.add_argument("--out", metavar="FILE", help="figure path (default: <image name>.png)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "train",
        help="train a flow-matching posterior on simulated lenses",
        description="Train the base flow on lenses simulated on the fly (or read from an HDF5 "
        "set) and write OUT/model.safetensors + model.json, the resolved config and "
        "provenance. Training state is checkpointed in OUT; --resume continues it. "
        "Under torchrun each process trains on its own device (DDP).",
    )
    p.add_argument(
        "--preset", default="hst", choices=sorted(PRESETS), help="instrument preset (default: hst)"
    )
    p.add_argument("--config", metavar="TOML", help="config file ([simulator], [data], [flow], "
                   "[train] tables); replaces --preset")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint and output folder")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the config's)")
    p.add_argument("--batch-size", type=int, help="examples per step and process")
    p.add_argument("--seed", type=int, help="seed of initialization, data and noise")
    p.add_argument("--time-limit", type=float, metavar="S",
                   help="wall-clock budget in seconds (TrainConfig.time_limit_s): the cosine "
                   "decays over whichever of steps and time runs out first")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    _add_threads_arg(p)
    p.add_argument("--normalize-flux", action="store_true",
                   help="train in flux units normalized to each image's background noise "
                   "(DataConfig.normalize_flux): the model is then independent of a cutout's "
                   "flux units")  # fmt: skip
    p.add_argument("--prior", choices=["default", "broad"],
                   help="training prior (DataConfig.prior; default: the config's, else the "
                   "registry's): broad widens the ranges to cover the real reference lenses "
                   "(docs/training.md)")  # fmt: skip
    p.add_argument("--data", metavar="H5", help="train on a stored simulated set (HDF5)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "sample",
        help="draw posterior samples of an observed lens",
        description="Cut the observation to the model's field of view, sample the posterior "
        "and write OUT/samples.ecsv (one column per parameter, units in the "
        "header), OUT/summary.ecsv (median, 16th and 84th percentiles) and "
        "OUT/provenance.json.",
    )
    _add_observation_args(p)
    p.add_argument("--model", required=True, metavar="PRESET_OR_PATH",
                   help="shipped model name (euclid, hst) or a model path")  # fmt: skip
    p.add_argument("-n", type=int, default=1000, help="number of samples (default: 1000)")
    _add_sampler_args(p)
    _add_compile_arg(p)
    p.add_argument("--feedback", default="auto", choices=["auto", "gradient", "learned", "none"],
                   help="simulator feedback: auto (gradient if its control net exists, else "
                   "learned, else none; the default), gradient, learned or none")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the base noise")
    _add_threads_arg(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_normalize_flux_arg(p)
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser(
        "finetune",
        help="finetune a simulator-feedback control net for a trained model",
        description="Freeze the model and train a small control network on lenses simulated "
        "over the model's PSF and depth ranges, with the chosen control signal (simulator "
        "gradient, learned residual encoder, or zeros for the ablation). Writes "
        "OUT/<model>-<signal>.safetensors/.json (referencing the base weights' SHA-256) "
        "and a provenance file; placed beside the model, `lensflow sample` uses it.",
    )
    p.add_argument("--model", required=True, metavar="PRESET_OR_PATH",
                   help="shipped model name (euclid, hst) or a model path")  # fmt: skip
    p.add_argument("--signal", required=True, choices=["gradient", "learned", "zero"],
                   help="control signal")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="lenses per step (default: 64)")
    p.add_argument("--t-start", type=float, default=0.8,
                   help="control acts for t > t_start (default: 0.8)")  # fmt: skip
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--n-steps-sample", type=int,
                   help="default sampler steps stored with the control; the defaults of "
                   "these four options are the shipped nets' samplers (docs/feedback.md): "
                   "gradient 20 (16 midpoint base steps, 8 Euler steps with feedback), "
                   "learned and zero 40 (Euler, 8 of them with feedback)")  # fmt: skip
    p.add_argument("--solver", default="euler", choices=sorted(SOLVERS),
                   help="default sampler solver with feedback (default: euler)")  # fmt: skip
    p.add_argument("--control-steps-sample", type=int, metavar="K",
                   help="default sampler steps on [t_start, 1], one simulator call each "
                   "(default: gradient 8, else the share of --n-steps-sample)")  # fmt: skip
    p.add_argument("--base-solver", choices=sorted(SOLVERS),
                   help="default sampler solver on [0, t_start], network only (default: "
                   "gradient midpoint, else --solver)")  # fmt: skip
    p.add_argument("--status", help="status label (default: provisional: CPU-trained on CPU)")
    p.add_argument("--mask-probability", type=float, default=None, metavar="P",
                   help="fraction of training lenses with random likelihood masks "
                   "(default: the model's own training setting)")  # fmt: skip
    p.add_argument("--width", type=int, default=None,
                   help="control net hidden width (default: 128, or the --init net's)")  # fmt: skip
    p.add_argument("--blocks", type=int, default=None,
                   help="control net residual blocks (default: 2, or the --init net's)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of data, times and noise")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="wall-clock budget in seconds: the learning rate decays over "
                   "whichever of steps and time runs out first, then training stops")  # fmt: skip
    p.add_argument("--init", default=None, metavar="CONTROL",
                   help="continue training this control net of the same signal and model "
                   "(a kind beside the model, a shipped name such as hst-gradient, or a "
                   "path); the learning rate restarts its cosine from --lr")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    _add_threads_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser(
        "fit",
        help="fit an observed lens: posterior samples, summary, corner and residual plots",
        description="Cut the observation to the model's field of view around the lens centre, "
        "sample the posterior (with simulator feedback when the model has a control network), "
        "check it, and write OUT/samples.fits (one column per parameter, units), "
        "OUT/summary.ecsv (median, 16/84th and 2.5/97.5th percentiles, diagnostics, "
        "reliable flag), OUT/corner.pdf/.png, OUT/residuals.png and OUT/provenance.json.",
    )
    _add_observation_args(p)
    centre = p.add_mutually_exclusive_group()
    centre.add_argument("--center", nargs=2, type=float, metavar=("RA", "DEC"),
                        help="lens centre in degrees (needs a celestial WCS)")  # fmt: skip
    centre.add_argument("--center-pix", nargs=2, type=float, metavar=("X", "Y"),
                        help="lens centre, 0-based pixel (column, row)")  # fmt: skip
    p.add_argument("--preset", default="auto", choices=["auto", *sorted(PRESETS)],
                   help="model preset; auto picks it from the pixel scale (default)")  # fmt: skip
    p.add_argument("--model", metavar="PATH", help="a trained model instead of the preset's")
    p.add_argument("--feedback", default="auto", choices=["auto", "gradient", "learned", "none"],
                   help="simulator feedback (default auto: gradient when shipped)")  # fmt: skip
    p.add_argument("-n", type=int, default=10_000, help="number of samples (default: 10000)")
    _add_sampler_args(p)
    _add_compile_arg(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the base noise")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    _add_threads_arg(p)
    p.add_argument("--fallback", default="none", choices=["none", "mcmc", "smc"],
                   help="re-run a lens flagged unreliable on the same likelihood, started "
                   "from the flow posterior: mcmc (emcee) or smc (tempered SMC; "
                   "docs/baselines.md) (default: none)")  # fmt: skip
    p.add_argument("--fallback-prior", default="default", choices=["default", "broad", "wide"],
                   help="the fallback's prior: the model's training prior (default), broad "
                   "(ranges that cover the real reference lenses, docs/training.md), or wide: "
                   "each parameter's physical range, amplitudes 100x beyond, for lenses whose "
                   "fit piles at the training prior's edge")  # fmt: skip
    p.add_argument("--pad", action="store_true",
                   help="where the model's field reaches beyond the cutout, mask the missing "
                   "pixels instead of stopping (they count in the masked fraction)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true", help="skip corner and residual figures")
    p.add_argument(
        "--corner-params",
        metavar="P1,P2,...|all",
        help="parameters of corner.pdf (default: the 7 mass-model parameters)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    _add_normalize_flux_arg(p)
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser(
        "corner",
        help="corner plot of one or several posteriors (overlaid), for papers",
        description="Overlay posterior samples (samples.fits/.ecsv or fit output folders) in "
        "one corner plot with 68%% and 95%% contours, registry LaTeX labels with units, "
        "optional truths, sized for a two-column journal figure; PDF is vector.",
    )
    p.add_argument("samples", nargs="+", help="samples tables or fit output folders")
    p.add_argument("--truths", metavar="TABLE", help="table of true values (registry columns)")
    p.add_argument("--truth-id", metavar="ID", help="row of a multi-row truths table (id column)")
    p.add_argument("--params", metavar="P1,P2,...", help="parameters to show (default: all)")
    p.add_argument("--labels", metavar="L1,L2,...", help="legend label per samples file")
    p.add_argument("--title", help="figure title")
    p.add_argument("--out", required=True, metavar="FILE", help="output figure (.pdf, .png)")
    p.set_defaults(func=_cmd_corner)

    p = sub.add_parser(
        "coverage",
        help="calibration plot of a catalog run on simulated lenses with known truths",
        description="Read the posterior samples of every lens of a catalog run (DIR/lenses/"
        "<id>/samples.fits) whose id appears in a truths table, and plot the empirical "
        "coverage of central credible intervals per parameter and the joint TARP coverage "
        "against the nominal level.",
    )
    p.add_argument("run", help="output folder of lensflow catalog")
    p.add_argument("--truths", required=True, metavar="TABLE",
                   help="table with id and the 21 registry columns")  # fmt: skip
    p.add_argument("--title", help="figure title")
    p.add_argument("--out", required=True, metavar="FILE", help="output figure (.pdf, .png)")
    p.set_defaults(func=_cmd_coverage)

    p = sub.add_parser(
        "catalog",
        help="fit every lens of a catalog (resumable; Dask for many workers)",
        description="Fit each row of CATALOG (ECSV, FITS or CSV: id, image and optional "
        "noise/weight, psf, mask, pixel_scale, ra/dec or center_x/center_y, preset, band, "
        "z_lens, z_source; paths relative to the catalog; docs/catalog.md). Writes "
        "DIR/lenses/<id>/ like fit, and DIR/results.ecsv and .fits (input columns, status, "
        "reason, summary columns with units, diagnostics). Rerunning resumes: finished lenses "
        "are skipped. --workers N > 1 runs a local Dask cluster; --scheduler ADDRESS uses a "
        "running one.",
    )
    p.add_argument("catalog", help="catalog table (ECSV, FITS or CSV)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (rerun to resume)")
    p.add_argument("-n", type=int, default=1000, help="samples per lens (default: 1000)")
    _add_sampler_args(p)
    _add_compile_arg(p)
    p.add_argument("--feedback", default="auto", choices=["auto", "gradient", "learned", "none"],
                   help="simulator feedback (default auto: gradient when shipped)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="run seed; each lens's seed is derived "
                   "from it and the lens id")  # fmt: skip
    p.add_argument("--preset", default="auto", choices=["auto", *sorted(PRESETS)],
                   help="preset of rows without a preset value (default: auto)")  # fmt: skip
    p.add_argument("--model", metavar="PATH", help="a trained model for every lens")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="lenses per batched call (default: 64 with CUDA, else 1)")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="Dask workers of a local cluster (default 1: run in this process)")  # fmt: skip
    p.add_argument("--scheduler", metavar="local|ADDRESS",
                   help="'local' (a LocalCluster of --workers processes) or a Dask scheduler "
                   "address, e.g. tcp://host:8786")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    _add_threads_arg(p, workers=True)
    p.add_argument("--fallback", default="none", choices=["none", "mcmc", "smc"],
                   help="re-run lenses flagged unreliable on the same likelihood, started from "
                   "the flow posterior: mcmc (emcee) or smc (tempered SMC) (default: none)")  # fmt: skip
    p.add_argument("--fallback-prior", default="default", choices=["default", "broad", "wide"],
                   help="the fallback's prior: the model's training prior (default), broad or "
                   "wide (as for lensflow fit)")  # fmt: skip
    p.add_argument("--pad", action="store_true",
                   help="where a model's field reaches beyond a cutout, mask the missing pixels "
                   "instead of failing the lens (they count in the masked fraction)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true", help="skip corner and residual figures")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_catalog)

    p = sub.add_parser(
        "bench",
        help="benchmark the flow against emcee, NUTS and lenstronomy on the same lenses",
        description="Run each method on the first K lenstronomy-rendered demo mocks (and, "
        "with --real, the Euclid Q1 VIS cutouts in shared/data/real_lenses) and write "
        "OUT/bench-CONFIG.json (one record per lens x method: wall time, time to 10,000 "
        "samples, convergence, error vs truth, reduced chi^2, C2ST vs emcee; coverage and "
        "speed-ups), OUT/bench-CONFIG.md and OUT/figures/bench_*.png (docs/benchmarks.md).",
    )
    p.add_argument("--config", default="small", choices=["small", "reference", "full"],
                   help="small: CPU, minutes, 3 lenses, capped emcee chain; reference: CPU, "
                   "hours, 3 lenses, emcee to 50 tau; full: 12 lenses, chains to 50 tau, "
                   "every method (GPU)")  # fmt: skip
    p.add_argument("--methods", metavar="M1,M2,...",
                   help="subset of flow, flow+feedback, flow+smc, emcee, nuts, lenstronomy "
                   "(default: the config's)")  # fmt: skip
    p.add_argument("--n-lenses", type=int, metavar="K", help="first K demo lenses")
    p.add_argument("--set", metavar="FIELD=N,...",
                   help="change the config's sizes, e.g. emcee_burn=2000,emcee_steps=25000,"
                   "lt_steps=300 (the fields of lensflow.baselines.bench.BenchConfig); "
                   "recorded in the outputs, and --resume reuses only runs with the same "
                   "changes")  # fmt: skip
    p.add_argument("--lenses", metavar="ID1,ID2,...",
                   help="only these lenses (demo ids, or real folder names with --real); each "
                   "keeps the seed it has in the full run")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs already in OUT/runs/<lens>/<method>/ made with the same "
                   "config, model, seed and --set sizes of that method (run long references one "
                   "lens or method per process, then merge with a last --resume run)")  # fmt: skip
    p.add_argument("--real", action="store_true",
                   help="also the real Euclid Q1 lenses (no truths; skipped when absent)")  # fmt: skip
    p.add_argument("--real-root", metavar="DIR", help="real_lenses folder (default: shared)")
    p.add_argument("--catalog", metavar="TABLE", help="lens catalog (default: catalogs/demo.ecsv)")
    p.add_argument("--truths", metavar="TABLE", help="truth table (default: demo_truth.ecsv)")
    p.add_argument("--model", default="euclid", help="flow model (default: euclid)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of flow noise, starts and chains")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--docs", metavar="MD", help="also replace the generated block of this "
                   "Markdown file (figures into its figures/, JSON beside it)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lensflow`` console script.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        Exit status: 0 on success, 2 on a user error.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            # Repairs (a PSF normalized, sentinel pixels masked) are one line each for users.
            warnings.showwarning = _show_warning
            _set_threads(getattr(args, "threads", None))
            return args.func(args)
    except (ValueError, OSError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"lensflow: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lensflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
