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
    flow = configs.get("flow", FlowConfig())
    overrides = {"n_steps": args.steps, "batch_size": args.batch_size, "seed": args.seed}
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
    import torch

    from lensflow.checkpoint import load_model, model_path
    from lensflow.config import SampleConfig, run_provenance
    from lensflow.sampling import sample_posterior, samples_table, summary_table

    config = SampleConfig(n_samples=args.n, n_steps=args.n_steps, seed=args.seed)
    obs = _load_observation(args)
    model = load_model(args.model)
    generator = torch.Generator().manual_seed(config.seed)
    samples = sample_posterior(obs, model, config.n_samples, n_steps=config.n_steps,
                               solver=config.solver, generator=generator)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, summary = samples_table(samples), summary_table(samples)
    for t in (table, summary):
        t.meta.update({"observation": obs.name, "model": str(model_path(args.model))})
    table.write(out / "samples.ecsv", overwrite=True)
    summary.write(out / "summary.ecsv", overwrite=True)
    provenance = run_provenance(config.seed, {"sample": config, "simulator": model.simulator})
    provenance |= {"observation": str(args.image), "model": str(model_path(args.model)),
                   "model_training": model.meta.get("training", {})}  # fmt: skip
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"wrote {config.n_samples} samples of {obs.name or args.image} to {out}/samples.ecsv")
    return 0


def _show_warning(message: Warning | str, category: type[Warning], *args, **kwargs) -> None:
    print(f"lensflow: warning: {message}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lensflow`` command (exposed for the docs and tests)."""
    from lensflow import __version__
    from lensflow.config import PRESETS

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
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
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
    p.add_argument("--n-steps", type=int, default=32, help="ODE steps (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base noise")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=_cmd_sample)
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
