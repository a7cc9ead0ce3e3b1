"""Measure the real cutouts in ../shared/data/real_lenses (the basis of the presets).

Usage: python scripts/measure_real_lenses.py [--root ../shared/data/real_lenses]
Prints a Markdown table: pixel scale, PSF FWHM, median and blank-sky noise, S/N per system.
"""

import argparse
import warnings
from pathlib import Path

import torch

from lensflow.observation import load_observation

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_lenses"

# (label, image, keyword arguments) for every system and band in SOURCES.md.
SYSTEMS = [
    (
        "SDSSJ1430+4105 F814W",
        "SDSSJ1430+4105/image.fits",
        {
            "noise": "SDSSJ1430+4105/noise_map.fits",
            "psf": "SDSSJ1430+4105/psf.fits",
            "pixel_scale_arcsec": 0.05,
        },
    ),
    (
        "SDSSJ2303+1422 F814W",
        "SDSSJ2303+1422/image.fits",
        {
            "noise": "SDSSJ2303+1422/noise_map.fits",
            "psf": "SDSSJ2303+1422/psf.fits",
            "pixel_scale_arcsec": 0.05,
        },
    ),
    (
        "SL2SJ0219-0829 F475X",
        "SL2SJ0219-0829/image_lens_system3_F475X.h5",
        {"psf": "SL2SJ0219-0829/psf_lens_system3_F475X.h5"},
    ),
    (
        "SL2SJ0219-0829 F600LP",
        "SL2SJ0219-0829/image_lens_system3_F600LP.h5",
        {"psf": "SL2SJ0219-0829/psf_lens_system3_F600LP.h5"},
    ),
    (
        "dolphin system1 F390W",
        "dolphin_lens_system1_F390W/image_lens_system1_F390W.h5",
        {"psf": "dolphin_lens_system1_F390W/psf_lens_system1_F390W.h5"},
    ),
    (
        "DESJ0408-5354 F814W",
        "DESJ0408-5354/data_f814w.hdf5",
        {"psf": "DESJ0408-5354/psf_f814w.hdf5"},
    ),
    (
        "DESJ0408-5354 F475X",
        "DESJ0408-5354/data_f475x.hdf5",
        {"psf": "DESJ0408-5354/psf_f475x.hdf5"},
    ),
    (
        "DESJ0408-5354 F160W",
        "DESJ0408-5354/data_f160w.hdf5",
        {"psf": "DESJ0408-5354/psf_f160w.hdf5"},
    ),
    (
        "Euclid NEG5700 VIS",
        "EuclidQ1_102018665_NEG570040238507752998/102018665_NEG570040238507752998.fits",
        {"band": "VIS"},
    ),
    (
        "Euclid NEG5767 VIS",
        "EuclidQ1_102018665_NEG576731213511114485/102018665_NEG576731213511114485.fits",
        {"band": "VIS"},
    ),
    (
        "Euclid NEG5896 VIS",
        "EuclidQ1_102019126_NEG589666030505609975/102019126_NEG589666030505609975.fits",
        {"band": "VIS"},
    ),
]


def blank_sky_sigma(image: torch.Tensor, mask: torch.Tensor, corner: int = 15) -> float:
    """Robust std (1.4826 x MAD) of the four corner patches: the empirical background RMS."""
    patches = [
        image[:corner, :corner],
        image[:corner, -corner:],
        image[-corner:, :corner],
        image[-corner:, -corner:],
    ]
    masks = [
        mask[:corner, :corner],
        mask[:corner, -corner:],
        mask[-corner:, :corner],
        mask[-corner:, -corner:],
    ]
    values = torch.cat([p[m] for p, m in zip(patches, masks, strict=True)])
    return float(1.4826 * (values - values.median()).abs().median())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args()
    print(
        '| system | pixel scale ["] | PSF FWHM ["] | median sigma | blank-sky RMS | '
        "total S/N | masked |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, image, kwargs in SYSTEMS:
        kw = {k: (str(args.root / v) if k in ("noise", "psf") else v) for k, v in kwargs.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs = load_observation(str(args.root / image), **kw)
        sigma = float(obs.sigma[obs.mask].median())
        print(
            f"| {label} | {obs.pixel_scale_arcsec:.4f} | {obs.psf_fwhm_arcsec:.3f} | "
            f"{sigma:.4g} | {blank_sky_sigma(obs.image, obs.mask):.4g} | {obs.snr:.0f} | "
            f"{obs.masked_fraction:.3f} |"
        )


if __name__ == "__main__":
    main()
