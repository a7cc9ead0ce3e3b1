"""Posteriors of the real lenses in ../shared/data/real_lenses with the shipped models.

For every system and band of SOURCES.md that is present (others are skipped with a note):
read it as scripts/measure_real_lenses.py does, pick the model for its pixel scale (``euclid``
for 0.08-0.1"/px cutouts, ``hst`` for the 0.04-0.05"/px HST optical ones; ``--hst-model`` /
``--euclid-model`` override), cut it to the model's field of view centred on the cutout
centre (``cutouts.cut_to_fov``; ``use_padding`` where the cutout is smaller than the field),
sample the posterior (``sampling.sample_posterior``) and report:

* ``lens_theta_e``: median and 16-84% interval, next to the value SOURCES.md gives (if any);
* the reduced chi^2, ``chi^2 / n_unmasked_pixels``, of the image simulated at the
  posterior median (per-parameter medians) with the observation's own PSF kernel and noise
  map, and the mean over ``--chi2-samples`` posterior samples;
* a figure data / model / normalized residual (``lensflow.plots.residual_plot``) in
  ``--fig-dir``.

Prints a markdown table and writes ``--json``.

Example::

    python scripts/real_lenses_posterior.py -n 1000 --fig-dir docs/figures \
        --json runs/real_lenses.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lensflow.checkpoint import CheckpointError, TrainedPosterior, load_model
from lensflow.config import SimulatorConfig
from lensflow.cutouts import cut_to_fov
from lensflow.observation import Observation, ObservationError, load_observation
from lensflow.sampling import sample_posterior
from lensflow.simulator import LensSimulator, chi2

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_lenses"

# (label, image, reader keywords, model preset, SOURCES.md theta_E [arcsec] or None, note).
SYSTEMS: list[tuple[str, str, dict[str, Any], str, float | None, str]] = [
    ("SDSSJ1430+4105 F814W", "SDSSJ1430+4105/image.fits",
     {"noise": "SDSSJ1430+4105/noise_map.fits", "psf": "SDSSJ1430+4105/psf.fits",
      "pixel_scale_arcsec": 0.05}, "hst", None, "no theta_E in SOURCES.md"),
    ("SDSSJ2303+1422 F814W", "SDSSJ2303+1422/image.fits",
     {"noise": "SDSSJ2303+1422/noise_map.fits", "psf": "SDSSJ2303+1422/psf.fits",
      "pixel_scale_arcsec": 0.05}, "hst", 1.62, "Bolton et al. 2008 SIE"),
    ("SL2SJ0219-0829 F475X", "SL2SJ0219-0829/image_lens_system3_F475X.h5",
     {"psf": "SL2SJ0219-0829/psf_lens_system3_F475X.h5"}, "hst", None,
     "no theta_E in SOURCES.md"),
    ("SL2SJ0219-0829 F600LP", "SL2SJ0219-0829/image_lens_system3_F600LP.h5",
     {"psf": "SL2SJ0219-0829/psf_lens_system3_F600LP.h5"}, "hst", None,
     "no theta_E in SOURCES.md"),
    ("dolphin system1 F390W", "dolphin_lens_system1_F390W/image_lens_system1_F390W.h5",
     {"psf": "dolphin_lens_system1_F390W/psf_lens_system1_F390W.h5"}, "hst", 1.234,
     "dolphin's EPL fit (not literature)"),
    ("DESJ0408-5354 F814W", "DESJ0408-5354/data_f814w.hdf5",
     {"psf": "DESJ0408-5354/psf_f814w.hdf5"}, "hst", None, "no theta_E in SOURCES.md"),
    ("DESJ0408-5354 F475X", "DESJ0408-5354/data_f475x.hdf5",
     {"psf": "DESJ0408-5354/psf_f475x.hdf5"}, "hst", None, "no theta_E in SOURCES.md"),
    ("DESJ0408-5354 F160W", "DESJ0408-5354/data_f160w.hdf5",
     {"psf": "DESJ0408-5354/psf_f160w.hdf5"}, "euclid", None, "no theta_E in SOURCES.md"),
    ("Euclid NEG5700 VIS",
     "EuclidQ1_102018665_NEG570040238507752998/102018665_NEG570040238507752998.fits",
     {"band": "VIS"}, "euclid", 0.849, "PyAutoLens SIE fit in the origin repo"),
    ("Euclid NEG5767 VIS",
     "EuclidQ1_102018665_NEG576731213511114485/102018665_NEG576731213511114485.fits",
     {"band": "VIS", "mask": "EuclidQ1_102018665_NEG576731213511114485/mask_extra_galaxies.fits"},
     "euclid", None, "no theta_E in SOURCES.md"),
    ("Euclid NEG5896 VIS",
     "EuclidQ1_102019126_NEG589666030505609975/102019126_NEG589666030505609975.fits",
     {"band": "VIS", "mask": "EuclidQ1_102019126_NEG589666030505609975/mask_extra_galaxies.fits"},
     "euclid", None, "no theta_E in SOURCES.md"),
]  # fmt: skip


def find_system(parser: argparse.ArgumentParser, text: str) -> tuple:
    """The one ``SYSTEMS`` entry whose label contains ``text`` (a parser error otherwise)."""
    match = [s for s in SYSTEMS if text in s[0]]
    if len(match) != 1:
        parser.error(f"--system {text!r} matches {len(match)} systems; be more specific")
    return match[0]


def load_cut(
    root: Path, image: str, kwargs: dict[str, Any], config: SimulatorConfig
) -> tuple[Observation, Observation, bool]:
    """Read a system's cutout as ``SYSTEMS`` describes it and cut it to a model's field.

    The field is centred on the cutout centre; where the cutout is smaller than the field,
    the missing pixels are masked (``use_padding``).

    Returns:
        The observation as read, the cut observation, and whether it was padded.
    """
    kw = {k: (str(root / v) if k in ("noise", "psf", "mask") else v) for k, v in kwargs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs = load_observation(str(root / image), **kw)
        padded = min(obs.fov_arcsec) < config.n_pix * config.pixel_scale_arcsec - 1e-6
        cut = cut_to_fov(obs, config, use_padding=padded)
    return obs, cut, padded


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def _residual_figure(obs: Any, model: torch.Tensor, path: Path, title: str) -> Path:
    from lensflow.plots import residual_plot

    return residual_plot(obs, model, path, title=title)


def run_one(
    label: str, image: str, kwargs: dict[str, Any], model: TrainedPosterior, model_name: str,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """Posterior, reduced chi^2 and figure of one system; the row of the results."""
    sim_cfg = model.simulator
    obs, cut, padded = load_cut(args.root, image, kwargs, sim_cfg)
    start = time.perf_counter()
    post = sample_posterior(cut, model, args.n, feedback=args.feedback, seed=args.seed,
                            n_steps=args.n_steps, normalize_flux=args.normalize_flux)  # fmt: skip
    seconds = time.perf_counter() - start
    theta = post.theta.double()
    finite = torch.isfinite(theta).all(-1)
    q = torch.quantile(theta[finite], torch.tensor([0.5, 0.16, 0.84], dtype=torch.float64), 0)
    cfg = sim_cfg if abs(cut.pixel_scale_arcsec - sim_cfg.pixel_scale_arcsec) < 1e-9 else None
    if cfg is None:  # exact copy at the observation's own (close) pixel scale
        import dataclasses

        cfg = dataclasses.replace(sim_cfg, pixel_scale_arcsec=cut.pixel_scale_arcsec)
    sim = LensSimulator(cfg, psf_kernel=cut.psf.double(), dtype=torch.float64)
    n_used = int(cut.mask.sum())
    median_image = sim(q[0])
    chi2_median = float(chi2(median_image, cut.image, cut.sigma, cut.mask)) / n_used
    some = theta[finite][: args.chi2_samples]
    chi2_samples = chi2(sim(some), cut.image, cut.sigma, cut.mask) / n_used
    fig = None
    if args.fig_dir is not None:
        args.fig_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if post.method == "flow" else f"_{post.method.replace('+', '_')}"
        fig = _residual_figure(cut, median_image,
                               args.fig_dir / f"real_{_slug(label)}{suffix}.png",
                               f"{label} ({model_name} model, {post.method})")  # fmt: skip
    return {
        "label": label, "model": model_name, "method": post.method,
        "pixel_scale_arcsec": cut.pixel_scale_arcsec,
        "input_pixel_scale_arcsec": obs.pixel_scale_arcsec, "padded": padded,
        "psf_fwhm_arcsec": cut.psf_fwhm_arcsec, "median_sigma": float(cut.sigma[cut.mask].median()),
        "n_unmasked": n_used, "n_samples": args.n, "n_nonfinite": int((~finite).sum()),
        "sampling_s": seconds,
        "theta_e_median": float(q[0, 0]), "theta_e_p16": float(q[1, 0]),
        "theta_e_p84": float(q[2, 0]),
        "median": {n: float(v) for n, v in zip(post.names, q[0], strict=True)},
        "reduced_chi2_median": chi2_median,
        "reduced_chi2_samples_mean": float(chi2_samples.mean()),
        "reduced_chi2_samples_min": float(chi2_samples.min()),
        "figure": str(fig) if fig else None,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=ROOT)
    p.add_argument("-n", type=int, default=1000, help="posterior samples per lens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chi2-samples", type=int, default=20)
    p.add_argument("--feedback", default="none", choices=["none", "auto", "gradient", "learned"],
                   help="simulator feedback (default none: the base flow; auto uses a "
                   "model's control net where one is shipped)")  # fmt: skip
    p.add_argument("--n-steps", type=int, help="ODE steps (default: the sampler's own)")
    p.add_argument("--normalize-flux", action="store_true",
                   help="sample in the model's flux units (data.flux_factor)")  # fmt: skip
    p.add_argument("--hst-model", default="hst", help="shipped preset or checkpoint path")
    p.add_argument("--euclid-model", default="euclid")
    p.add_argument("--only", help="run only systems whose label contains this text")
    p.add_argument("--fig-dir", type=Path, help="write residual figures here")
    p.add_argument("--json", type=Path, help="write the numbers here")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.root.is_dir():
        print(f"no real lenses at {args.root}; nothing to do")
        return
    models: dict[str, TrainedPosterior | str] = {}
    for name, spec in (("hst", args.hst_model), ("euclid", args.euclid_model)):
        try:
            models[name] = load_model(spec)
        except CheckpointError as err:
            models[name] = str(err)
    rows: list[dict[str, Any]] = []
    print("| system | model | method | theta_E median [16-84%] (arcsec) | SOURCES.md theta_E "
          "(arcsec) | reduced chi2 at median / mean of samples | s | figure |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for label, image, kwargs, model_name, ref, note in SYSTEMS:
        if args.only and args.only not in label:
            continue
        model = models[model_name]
        if not (args.root / image).is_file():
            print(f"| {label} | - | - | skipped: {image} not found | | | | |")
            continue
        if isinstance(model, str):
            print(f"| {label} | {model_name} | - | skipped: {model} | | | | |")
            continue
        try:
            row = run_one(label, image, kwargs, model, model_name, args)
        except (ObservationError, ValueError) as err:
            print(f"| {label} | {model_name} | - | skipped: {err} | | | | |")
            continue
        row["reference_theta_e"], row["reference_note"] = ref, note
        rows.append(row)
        ref_text = f"{ref:.3f} ({note})" if ref is not None else note
        print(f"| {label} | {model_name} | {row['method']} | {row['theta_e_median']:.3f} "
              f"[{row['theta_e_p16']:.3f}-{row['theta_e_p84']:.3f}] | {ref_text} | "
              f"{row['reduced_chi2_median']:.2f} / {row['reduced_chi2_samples_mean']:.2f} | "
              f"{row['sampling_s']:.0f} | {row['figure'] or '-'} |", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
