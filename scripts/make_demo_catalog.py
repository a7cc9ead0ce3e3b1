"""Write the demo catalog: 12 mock Euclid-like lenses rendered by lenstronomy, with truths.

Usage (repository root):
    python scripts/make_demo_catalog.py [--out catalogs] [--seed 2026]

Writes ``OUT/demo/<id>.fits`` (HDUs IMAGE, NOISE, PSF with BUNIT, PIXSCALE and a north-up
TAN WCS, as ``lensflow simulate`` writes them), the catalog ``OUT/demo.ecsv`` and the truths
``OUT/demo_truth.ecsv``. The images are rendered with lenstronomy through the adapter
(``lensflow.baselines.lenstronomy.render_lenstronomy``), so the demo does not only see the
model's own caustics simulator. Parameters are drawn from the default prior; PSF FWHM,
background RMS and exposure time from the euclid training ranges (``DATA_PRESETS``).

Lens ``demo_11`` is an 80x80 px cutout whose lens sits 8 px right and 4 px below the cutout
centre; its catalog row gives that position as ``center_x, center_y`` (0-based pixels) and
no ra/dec, so centring is exercised. The other rows give the lens position as ``ra, dec``.
Its truth table row holds the parameters relative to the 64x64 field around that centre.
"""

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from astropy import units as u
from astropy.table import Table

from lensflow.baselines.lenstronomy import render_lenstronomy
from lensflow.config import DATA_PRESETS, PRESETS
from lensflow.mocks import write_mock_fits
from lensflow.params import NAMES, REGISTRY, index
from lensflow.prior import Prior
from lensflow.simulator import NoiseModel, fine_psf, pool_psf

N_LENSES = 12
#: The off-centre lens: cutout side and lens offset from the cutout centre in pixels (x, y).
BIG_ID, BIG_PIX, BIG_OFFSET_PIX = "demo_11", 80, (8, -4)
#: Sky positions are scattered over a 1 deg field around this (COSMOS-like) point.
FIELD_RA_DEG, FIELD_DEC_DEG = 150.1, 2.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="catalogs", help="catalogs folder (default: catalogs)")
    parser.add_argument("--seed", type=int, default=2026, help="seed of all draws")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    (out / "demo").mkdir(parents=True, exist_ok=True)
    base, ranges = PRESETS["euclid"], DATA_PRESETS["euclid"]
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    theta = Prior(dtype=torch.float64).sample((N_LENSES,), generator=gen)
    centers = [index(n) for n in NAMES if n.endswith("_center_x")]  # x columns; y follow them

    rows, truths = [], []
    for k in range(N_LENSES):
        lens_id = f"demo_{k:02d}"
        fwhm = float(rng.uniform(ranges.psf_fwhm_min_arcsec, ranges.psf_fwhm_max_arcsec))
        rms = float(
            math.exp(rng.uniform(math.log(ranges.background_rms_min),
                                 math.log(ranges.background_rms_max)))
        )  # fmt: skip
        exposure = float(
            math.exp(rng.uniform(math.log(ranges.exposure_time_min_s),
                                 math.log(ranges.exposure_time_max_s)))
        )  # fmt: skip
        n_pix = BIG_PIX if lens_id == BIG_ID else base.n_pix
        config = dataclasses.replace(
            base, n_pix=n_pix, psf_fwhm_arcsec=fwhm, background_rms=rms, exposure_time_s=exposure
        )
        ra = round(FIELD_RA_DEG + float(rng.uniform(-0.5, 0.5)), 6)
        dec = round(FIELD_DEC_DEG + float(rng.uniform(-0.5, 0.5)), 6)
        render = theta[k].clone()
        center_pix = ((n_pix - 1) / 2, (n_pix - 1) / 2)
        if lens_id == BIG_ID:
            # Shift every component by the offset (arcsec, +x along columns, +y along rows).
            dx, dy = (o * base.pixel_scale_arcsec for o in BIG_OFFSET_PIX)
            for i in centers:
                render[i] += dx
                render[i + 1] += dy
            # The shear is centred on the cutout centre (lensflow and the adapter fix it
            # there), so in the shifted frame it adds the constant deflection Gamma @ (dx, dy);
            # moving the source by the same amount keeps the image a pure translation.
            g1, g2 = float(theta[k, index("shear_gamma1")]), float(theta[k, index("shear_gamma2")])
            render[index("source_center_x")] -= g1 * dx + g2 * dy
            render[index("source_center_y")] -= g2 * dx - g1 * dy
            center_pix = (center_pix[0] + BIG_OFFSET_PIX[0], center_pix[1] + BIG_OFFSET_PIX[1])
        model = torch.from_numpy(render_lenstronomy(render, config))
        noise = NoiseModel.from_config(config)
        sigma = noise.sigma(model)
        noisy = noise.sample(model, generator=gen)
        # The native-pixel PSF the render applies (fine Gaussian, then pixel-pooled).
        psf = pool_psf(fine_psf(config), config.upsample_factor)
        path = write_mock_fits(
            out / "demo" / f"{lens_id}.fits",
            noisy,
            sigma,
            psf,
            config,
            header={"LENS_ID": lens_id, "RENDERER": ("lenstronomy", "via lensflow adapter")},
            ra_deg=ra,
            dec_deg=dec,
        )
        if lens_id == BIG_ID:  # the row gives the lens position in pixels, not on the sky
            ra = dec = math.nan
        snr = float(model.sum() / sigma.pow(2).sum().sqrt())
        rows.append(
            {
                "id": lens_id,
                "image": f"demo/{path.name}",
                "noise": f"demo/{path.name}",
                "psf": f"demo/{path.name}",
                "pixel_scale": base.pixel_scale_arcsec,
                "ra": ra,
                "dec": dec,
                "center_x": center_pix[0] if lens_id == BIG_ID else math.nan,
                "center_y": center_pix[1] if lens_id == BIG_ID else math.nan,
                "z_lens": round(float(rng.uniform(0.2, 0.8)), 3),
                "z_source": round(float(rng.uniform(1.0, 3.0)), 3),
                "preset": "euclid",
            }
        )
        truths.append((lens_id, fwhm, rms, exposure, snr))

    catalog = Table(rows=rows)
    for name in ("ra", "dec", "center_x", "center_y"):
        catalog[name] = np.ma.masked_invalid(np.asarray(catalog[name], dtype=np.float64))
    catalog["pixel_scale"].unit = u.arcsec
    catalog["ra"].unit = catalog["dec"].unit = u.deg
    catalog["center_x"].unit = catalog["center_y"].unit = u.pix
    catalog.meta["description"] = (
        "lensflow demo catalog: 12 mock Euclid VIS-like lenses rendered with lenstronomy "
        "(scripts/make_demo_catalog.py); truths in demo_truth.ecsv"
    )
    catalog.meta["seed"] = args.seed
    catalog.write(out / "demo.ecsv", overwrite=True)

    truth = Table()
    truth["id"] = [t[0] for t in truths]
    for i, spec in enumerate(REGISTRY):
        truth[spec.name] = theta[:, i].numpy()
        truth[spec.name].unit = u.Unit(spec.unit) if spec.unit else None
    truth["psf_fwhm_arcsec"] = [t[1] for t in truths] * u.arcsec
    truth["background_rms"] = [t[2] for t in truths]
    truth["background_rms"].description = "background noise per pixel, image units (ct/s)"
    truth["exposure_time_s"] = [t[3] for t in truths] * u.s
    truth["snr"] = [t[4] for t in truths]
    truth["snr"].description = "total S/N of the noiseless image: sum(model) / sqrt(sum(sigma^2))"
    truth.meta["description"] = (
        "true parameters of catalogs/demo.ecsv, relative to the centre of the 64x64 px field "
        "the catalog row points at (for demo_11: the center_x, center_y pixel)"
    )
    truth.meta["renderer"] = "lenstronomy (lensflow.baselines.lenstronomy.render_lenstronomy)"
    truth.meta["seed"] = args.seed
    truth.write(out / "demo_truth.ecsv", overwrite=True)
    size = sum(p.stat().st_size for p in (out / "demo").glob("*.fits"))
    print(f"wrote {len(catalog)} lenses ({size / 1e6:.2f} MB of FITS) to {out}/demo.ecsv")


if __name__ == "__main__":
    main()
