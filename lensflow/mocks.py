"""Mock observations: parameter tables in, noisy FITS cutouts and a truth table out.

This is how users and tests make mock lenses (``lensflow simulate``). A parameter table is
any astropy-readable table (ECSV, CSV, FITS) whose columns are registry names plus an
optional ``id``; columns with units are converted to the registry's units, missing
parameters are drawn from the default prior.

Output FITS layout (one file per row, ``<id>.fits``): an empty primary HDU and the image
HDUs ``IMAGE`` (noisy image, flux per pixel, i.e. lenstronomy's units), ``NOISE``
(per-pixel sigma, same units) and ``PSF`` (the native-resolution kernel, unit sum). Each
image HDU has ``PIXSCALE`` (arcsec) and a celestial TAN WCS, north up and east left:
column index increases towards the West, so lensflow's +x points West
(docs/conventions.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from astropy import units as u
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from torch import Tensor

from lensflow.config import SimulatorConfig
from lensflow.observation import Observation
from lensflow.params import NAMES, REGISTRY
from lensflow.prior import Prior
from lensflow.simulator import LensSimulator, NoiseModel, fine_psf, pool_psf

__all__ = [
    "COMPACT_CONFIG",
    "COMPACT_TRUTH",
    "ParamTable",
    "mock_observation",
    "read_param_table",
    "simulate_mocks",
    "write_mock_fits",
]

_ID_RE = re.compile(r"^[A-Za-z0-9_.+\-]+$")

#: A compact grid (16 x 16 pixels of 0.1", no supersampling, 0.15" Gaussian PSF) on which
#: one float64 likelihood call takes well under a millisecond on a CPU: the baselines'
#: recovery tests and scripts/smc_vs_emcee.py use it with ``COMPACT_TRUTH``.
COMPACT_CONFIG = SimulatorConfig(n_pix=16, pixel_scale_arcsec=0.1, upsample_factor=1,
                                 psf_fwhm_arcsec=0.15, background_rms=0.01)  # fmt: skip

#: A lens system well inside the default prior box (every value away from the box edges).
COMPACT_TRUTH: dict[str, float] = {
    "lens_theta_e": 0.6, "lens_e1": 0.1, "lens_e2": -0.05, "lens_center_x": 0.03,
    "lens_center_y": -0.02, "shear_gamma1": 0.02, "shear_gamma2": -0.01,
    "source_amp": 60.0, "source_r_sersic": 0.2, "source_n_sersic": 1.5, "source_e1": 0.1,
    "source_e2": 0.05, "source_center_x": 0.08, "source_center_y": 0.05,
    "lens_light_amp": 20.0, "lens_light_r_sersic": 0.6, "lens_light_n_sersic": 3.0,
    "lens_light_e1": 0.05, "lens_light_e2": 0.02, "lens_light_center_x": 0.03,
    "lens_light_center_y": -0.02,
}  # fmt: skip


def mock_observation(
    truth: dict[str, float] | None = None,
    config: SimulatorConfig = COMPACT_CONFIG,
    *,
    noise: float = 0.05,
    seed: int = 7,
    name: str = "mock",
) -> tuple[Observation, Tensor]:
    """One float64 mock observation with uniform Gaussian noise, in memory.

    Args:
        truth: Registry name to value (all 21 parameters); default ``COMPACT_TRUTH``.
        config: Grid, supersampling and PSF of the simulator that renders it.
        noise: Per-pixel noise standard deviation, flux per pixel (> 0).
        seed: Seed of the noise draw.
        name: The observation's name.

    Returns:
        The observation (image, sigma, the simulator's PSF, a full mask), shapes
        ``(n_pix, n_pix)``, and the true parameters ``(21,)`` in registry units, float64.

    Raises:
        ValueError: For a missing or unknown parameter name, or ``noise <= 0``.

    Example:
        >>> obs, theta = mock_observation(noise=0.1)
        >>> tuple(obs.image.shape), float(obs.sigma[0, 0]), round(float(theta[0]), 2)
        ((16, 16), 0.1, 0.6)
    """
    truth = COMPACT_TRUTH if truth is None else truth
    if set(truth) != set(NAMES):
        missing, unknown = set(NAMES) - set(truth), set(truth) - set(NAMES)
        raise ValueError(f"truth must give all {len(NAMES)} parameters; missing "
                         f"{sorted(missing)}, unknown {sorted(unknown)}")  # fmt: skip
    if not noise > 0:
        raise ValueError(f"noise must be > 0, got {noise}")
    theta = torch.tensor([truth[n] for n in NAMES], dtype=torch.float64)
    sim = LensSimulator(config, dtype=torch.float64)
    x = sim(theta)
    sigma = torch.full_like(x, noise)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)  # fmt: skip
    obs = Observation(image=x + sigma * eps, sigma=sigma, psf=sim.psf.clone(),
                      pixel_scale_arcsec=config.pixel_scale_arcsec,
                      mask=torch.ones(x.shape, dtype=torch.bool), name=name)  # fmt: skip
    return obs, theta


@dataclass(frozen=True)
class ParamTable:
    """Parameters of a set of lenses.

    Attributes:
        ids: One identifier per lens (safe as a file name).
        theta: Physical parameters, shape ``(N, 21)``, columns ``params.NAMES``, float64.
        drawn: Names of the parameters that were drawn from the prior (not in the table).
    """

    ids: tuple[str, ...]
    theta: Tensor
    drawn: tuple[str, ...]


def read_param_table(
    path: str | Path, *, prior: Prior | None = None, generator: torch.Generator | None = None
) -> ParamTable:
    """Read a table of lens parameters, drawing missing columns from the prior.

    Args:
        path: ECSV, CSV or FITS table with registry-named columns and an optional ``id``.
        prior: Prior for missing parameters (default: the registry's default prior).
        generator: Torch generator for the prior draws.

    Returns:
        The parsed table.

    Raises:
        ValueError: For an unreadable file, an empty table, non-numeric or non-finite
            values, values outside the physical bounds, incompatible units, or duplicate
            / unsafe ids; the message names the file, row and column.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: parameter table not found")
    try:
        fmt = "ascii.csv" if path.suffix.lower() in (".csv", ".txt") else None
        table = Table.read(path, format=fmt) if fmt else Table.read(path)
    except Exception as err:  # noqa: BLE001 - astropy raises many types for bad tables
        raise ValueError(f"{path}: cannot read as a table (ECSV, CSV or FITS): {err}") from None
    if len(table) == 0:
        raise ValueError(f"{path}: the table has no rows")
    prior = prior or Prior(dtype=torch.float64)
    theta = prior.sample((len(table),), generator=generator).to(torch.float64)
    for i, spec in enumerate(REGISTRY):
        if spec.name not in table.colnames:
            continue
        col = table[spec.name]
        try:
            values = (
                u.Quantity(col).to_value(u.Unit(spec.unit))
                if col.unit is not None
                else np.asarray(col, dtype=np.float64)
            )
        except (u.UnitConversionError, u.UnitsError) as err:
            raise ValueError(
                f"{path}: column {spec.name}: unit {col.unit} is not "
                f"convertible to {spec.unit or 'dimensionless'}: {err}"
            ) from None
        except (TypeError, ValueError):
            raise ValueError(f"{path}: column {spec.name} is not numeric") from None
        values = np.ma.filled(np.ma.asarray(values, dtype=np.float64), np.nan)
        bad = ~np.isfinite(values) | (values <= spec.low) | (values >= spec.high)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"{path}: row {row}, column {spec.name} = {values[row]!r} is missing or "
                f"outside the physical bounds ({spec.low}, {spec.high}) {spec.unit}".rstrip()
            )
        theta[:, i] = torch.from_numpy(values)
    if "id" in table.colnames:
        ids = tuple(str(v).strip() for v in table["id"])
    else:
        ids = tuple(f"lens_{k:05d}" for k in range(len(table)))
    for k, name in enumerate(ids):
        if not _ID_RE.match(name):
            raise ValueError(
                f"{path}: row {k}: id {name!r} is not usable as a file name "
                "(letters, digits, '_', '-', '.', '+' only)"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: the id column has duplicates")
    drawn = tuple(n for n in NAMES if n not in table.colnames)
    return ParamTable(ids=ids, theta=theta, drawn=drawn)


def _wcs(config: SimulatorConfig, ra_deg: float, dec_deg: float) -> WCS:
    """North-up, east-left TAN WCS centred on the cutout centre."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    w.wcs.crpix = [(config.n_pix + 1) / 2, (config.n_pix + 1) / 2]  # FITS is 1-based
    scale = config.pixel_scale_arcsec / 3600.0
    w.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    w.wcs.cunit = ["deg", "deg"]
    return w


def write_mock_fits(
    path: str | Path,
    image: Tensor,
    sigma: Tensor,
    psf: Tensor,
    config: SimulatorConfig,
    *,
    header: dict | None = None,
    ra_deg: float = 0.0,
    dec_deg: float = 0.0,
) -> Path:
    """Write one mock cutout as FITS with ``IMAGE``, ``NOISE`` and ``PSF`` HDUs.

    Args:
        path: Output file.
        image: Noisy image, shape ``(H, W)``, flux per pixel.
        sigma: Per-pixel noise std, shape ``(H, W)``, flux per pixel.
        psf: PSF kernel at the image's pixel scale, shape ``(k, k)``, unit sum.
        config: Simulator configuration (pixel scale, preset name).
        header: Extra primary-header cards (``{"KEY": (value, comment)}``).
        ra_deg: Right ascension of the cutout centre, degrees.
        dec_deg: Declination of the cutout centre, degrees.

    Returns:
        The path written.
    """
    wcs_header = _wcs(config, ra_deg, dec_deg).to_header()
    primary = fits.PrimaryHDU()
    primary.header["ORIGIN"] = ("lensflow", "lensflow simulate")
    primary.header["PRESET"] = (config.name, "lensflow simulator preset")
    for key, value in (header or {}).items():
        primary.header[key] = value
    hdus = [primary]
    for name, data, bunit in (("IMAGE", image, "ct/s"), ("NOISE", sigma, "ct/s")):
        hdu = fits.ImageHDU(data.detach().cpu().numpy().astype(np.float32), name=name)
        hdu.header.update(wcs_header)
        hdu.header["PIXSCALE"] = (config.pixel_scale_arcsec, "arcsec per pixel")
        hdu.header["BUNIT"] = (bunit, "flux per pixel (lenstronomy units)")
        hdus.append(hdu)
    psf_hdu = fits.ImageHDU(psf.detach().cpu().numpy().astype(np.float64), name="PSF")
    psf_hdu.header["PIXSCALE"] = (config.pixel_scale_arcsec, "arcsec per pixel")
    hdus.append(psf_hdu)
    path = Path(path)
    tmp = path.with_suffix(".fits.part")
    fits.HDUList(hdus).writeto(tmp, overwrite=True)
    tmp.replace(path)  # atomic: a partial file is never mistaken for a result
    return path


def simulate_mocks(
    table: ParamTable,
    config: SimulatorConfig,
    out_dir: str | Path,
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> Table:
    """Render, add noise to and write one FITS cutout per table row.

    Args:
        table: Lens parameters (``read_param_table``).
        config: Simulator configuration (a preset).
        out_dir: Output folder (created).
        generator: Torch generator for the noise draws.
        batch_size: Lenses simulated per batched call.
        progress: Called with the number of lenses finished after each batch.

    Returns:
        The truth table: ``id``, ``file``, every registry column (with units) and
        ``snr`` (total S/N of the noiseless image).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sim = LensSimulator(config, dtype=torch.float64)
    noise = NoiseModel.from_config(config)
    # The native-pixel PSF the simulator actually applies (fine Gaussian, then pixel-pooled).
    psf = pool_psf(fine_psf(config), config.upsample_factor)
    files, snrs = [], []
    for start in range(0, len(table.ids), batch_size):
        theta = table.theta[start : start + batch_size]
        with torch.no_grad():
            model = sim(theta)
            sigma = noise.sigma(model)
            noisy = noise.sample(model, generator=generator)
        if not torch.isfinite(model).all():
            raise RuntimeError(
                f"non-finite simulated image among ids {table.ids[start]}.."
                f"{table.ids[start + theta.shape[0] - 1]}; please report it"
            )
        for k in range(theta.shape[0]):
            lens_id = table.ids[start + k]
            snr = float(model[k].sum() / sigma[k].pow(2).sum().sqrt())
            path = write_mock_fits(
                out_dir / f"{lens_id}.fits",
                noisy[k],
                sigma[k],
                psf,
                config,
                header={"LENS_ID": lens_id},
            )
            files.append(path.name)
            snrs.append(snr)
        if progress is not None:
            progress(theta.shape[0])
    truth = Table()
    truth["id"] = list(table.ids)
    truth["file"] = files
    for i, spec in enumerate(REGISTRY):
        truth[spec.name] = table.theta[:, i].numpy()
        truth[spec.name].unit = u.Unit(spec.unit) if spec.unit else None
        truth[spec.name].description = spec.label
    truth["snr"] = snrs
    truth["snr"].description = "total S/N of the noiseless image: sum(model) / sqrt(sum(sigma^2))"
    truth.meta["preset"] = config.name
    truth.meta["pixel_scale_arcsec"] = config.pixel_scale_arcsec
    truth.meta["drawn_from_prior"] = list(table.drawn)
    return truth
