"""Stage 0 (data): the ``Observation`` record and its FITS and HDF5 readers.

An ``Observation`` is one imaged lens: image, per-pixel noise, PSF, pixel scale and a
likelihood mask. The readers build one from files, repairing what can be repaired and raising
``ObservationError`` (one line naming the file) for the rest; docs/observations.md is the
user guide.

Conventions:

* ``image[row = y, col = x]``: +x along columns, +y along rows, plot with ``origin="lower"``.
  Positions are in arcsec relative to the cutout centre; pixel ``i`` of ``n`` has its centre
  at ``(i - (n - 1) / 2) * pixel_scale_arcsec``. Pixel coordinates are 0-based ``(x, y) =
  (column, row)``, as in astropy. Images are never flipped: for north-up, east-left data,
  +x points west (decreasing RA), which is also lenstronomy's pixel orientation.
* Image units are flux per pixel (whatever the file holds); ``sigma`` is in the same units.
* ``mask`` is True where a pixel enters the likelihood. Masked pixels hold the placeholder
  values ``image = 0`` and ``sigma = 1`` so that every tensor stays finite.
* User mask files use the opposite, PyAutoLens convention: nonzero means *excluded*.

Repairs made by every reader (counts in ``meta["n_masked_*"]``): non-finite image pixels,
and noise values that are non-finite, <= 0 or above ``SENTINEL_FACTOR`` x the median noise
(pipeline flags such as 1e8 or 1e16), are masked; a PSF is normalized to sum 1, with a
``UserWarning`` when its sum was off by more than ``PSF_SUM_TOLERANCE``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import astropy.units as u
import h5py
import numpy as np
import torch
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales
from torch import Tensor

__all__ = [
    "Observation",
    "ObservationError",
    "kernel_fwhm_pix",
    "load_observation",
    "read_fits",
    "read_hdf5",
    "summarize",
]

#: A PSF whose sum is off by more than this is normalized *with* a warning (below: silently).
PSF_SUM_TOLERANCE = 1e-2
#: Noise values above this multiple of the median noise are masked-pixel sentinels.
SENTINEL_FACTOR = 1e3
#: Relative pixel-scale difference below which ``cut_to_fov`` cuts without resampling.
SCALE_TOLERANCE = 1e-3
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fz")
HDF5_SUFFIXES = (".h5", ".hdf5", ".he5")

# Multi-extension HDUs named <BAND>_<KIND> (Euclid: VIS_FLUX, NIR_Y_RMS, DES_G_PSF). Image
# kinds are in order of preference, background-subtracted first.
_IMAGE_KINDS = ("BGSUB", "FLUX", "SCI", "IMAGE", "DATA")
_ROLES = {
    **dict.fromkeys(_IMAGE_KINDS, "image"),
    **dict.fromkeys(("RMS", "NOISE", "ERR", "SIGMA"), "noise"),
    **dict.fromkeys(("WHT", "WEIGHT", "IVAR"), "weight"),
    "PSF": "psf",
}
_GENERIC_STEMS = {"image", "data", "sci", "science", "img", "cutout"}
_HST_FILTER = re.compile(r"[Ff]\d{3,4}[A-Za-z]{1,2}")
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


class ObservationError(ValueError):
    """A problem with user input: a one-line message naming the file and the problem."""


@dataclass(frozen=True, eq=False)
class Observation:
    """One imaged lens, ready for the likelihood.

    Attributes:
        image: Data, shape ``(H, W)``, flux per pixel, floating (the readers give float64).
        sigma: Per-pixel noise standard deviation, shape ``(H, W)``, image units; finite and
            > 0 everywhere (1 on masked pixels).
        psf: Pixel PSF kernel, shape ``(k, k)`` with ``k`` odd, centred on the middle pixel,
            summing to 1, at the image's pixel scale.
        pixel_scale_arcsec: Pixel side in arcsec (square pixels).
        mask: Boolean, shape ``(H, W)``; True where the pixel enters the likelihood.
        wcs: Celestial WCS of ``image`` when the file had one.
        name: Label, by default derived from the file name.
        band: Filter or band label (``"VIS"``, ``"F814W"``), if known.
        z_lens: Lens redshift, if known.
        z_source: Source redshift, if known.
        meta: Provenance: source paths and HDUs, repair counts, header values.

    Raises:
        ObservationError: On inconsistent shapes or dtypes, non-finite data, sigma <= 0, a
            PSF that is not odd-square or does not sum to 1, a bad pixel scale, or when every
            pixel is masked.
        TypeError: If a tensor field is not a ``torch.Tensor``.
    """

    image: Tensor
    sigma: Tensor
    psf: Tensor
    pixel_scale_arcsec: float
    mask: Tensor
    wcs: WCS | None = None
    name: str = ""
    band: str | None = None
    z_lens: float | None = None
    z_source: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = self.meta.get("image_path") or self.name or "observation"
        img, sig, psf, mask = self.image, self.sigma, self.psf, self.mask
        if not all(isinstance(t, Tensor) for t in (img, sig, psf, mask)):
            raise TypeError(f"{where}: image, sigma, psf and mask must be torch tensors")
        shapes = f"image {tuple(img.shape)}, sigma {tuple(sig.shape)}, mask {tuple(mask.shape)}"
        dtypes = f"image {img.dtype}, sigma {sig.dtype}, psf {psf.dtype}, mask {mask.dtype}"
        k, scale = tuple(psf.shape), self.pixel_scale_arcsec
        for ok, problem in (
            (img.ndim == 2 and img.numel() > 0, f"image shape {tuple(img.shape)} is not (H, W)"),
            (img.shape == sig.shape == mask.shape, f"shapes differ: {shapes}"),
            (img.is_floating_point() and img.dtype == sig.dtype == psf.dtype, f"dtypes: {dtypes}"),
            (mask.dtype == torch.bool, f"mask must be bool: {dtypes}"),
            (len(k) == 2 and k[0] == k[1] and k[0] % 2 == 1, f"PSF shape {k} is not odd square"),
            (math.isfinite(scale) and scale > 0, f"pixel_scale_arcsec={scale!r} is not > 0"),
            (bool(torch.isfinite(img).all()), "image has non-finite values"),
            (bool((torch.isfinite(sig) & (sig > 0)).all()), "sigma is not finite and > 0"),
            (abs(float(psf.sum()) - 1) < 1e-3, f"PSF sums to {float(psf.sum()):.6g}, not 1"),
            (bool(mask.any()), "every pixel is masked; nothing to fit"),
        ):
            if not ok:
                raise ObservationError(f"{where}: {problem}")

    def __repr__(self) -> str:
        return (
            f"Observation(name={self.name!r}, band={self.band!r}, shape={self.shape}, "
            f"pixel_scale_arcsec={self.pixel_scale_arcsec:.6g}, psf={tuple(self.psf.shape)}, "
            f"masked_fraction={self.masked_fraction:.3f}, dtype={self.image.dtype})"
        )

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape ``(H, W)`` in pixels."""
        return (int(self.image.shape[0]), int(self.image.shape[1]))

    @property
    def fov_arcsec(self) -> tuple[float, float]:
        """Field of view ``(height, width)`` in arcsec."""
        return (self.shape[0] * self.pixel_scale_arcsec, self.shape[1] * self.pixel_scale_arcsec)

    @property
    def masked_fraction(self) -> float:
        """Fraction of pixels excluded from the likelihood, in [0, 1)."""
        return 1.0 - float(self.mask.double().mean())

    @property
    def psf_fwhm_arcsec(self) -> float:
        """PSF FWHM in arcsec of the least-squares best-fitting circular Gaussian.

        The Gaussian is sampled at pixel centres (as the kernel is), centred on the centroid
        of the 3x3 pixels around the peak, with free amplitude; the width is found to about
        0.02% by grid search. Wings and truncation barely change it. A 1x1 PSF gives 0.
        """
        return kernel_fwhm_pix(self.psf) * self.pixel_scale_arcsec

    @property
    def snr(self) -> float:
        """Total S/N of the unmasked pixels, ``sum(image) / sqrt(sum(sigma^2))``.

        Lens light and unmasked neighbours count too: it rates the cutout, not the arcs.
        """
        m = self.mask
        return float(self.image[m].sum() / torch.sqrt((self.sigma[m] ** 2).sum()))

    @property
    def peak_snr(self) -> float:
        """Largest single-pixel S/N, ``max(image / sigma)`` over unmasked pixels."""
        return float((self.image[self.mask] / self.sigma[self.mask]).max())

    def scaled(self, factor: float) -> Observation:
        """Copy in other flux units: ``image`` and ``sigma`` multiplied by ``factor``.

        A change of units only: every S/N, the likelihood of the non-flux parameters and
        their posterior stay the same, and the flux parameters (``params.FLUX_NAMES``) scale
        by ``factor``.

        Args:
            factor: Positive, finite multiplier.

        Returns:
            A new ``Observation``; ``meta["flux_factor"]`` accumulates the factor.

        Raises:
            ValueError: If ``factor`` is not positive and finite.

        Example:
            >>> obs = Observation(torch.ones(3, 3), torch.full((3, 3), 0.5), torch.ones(1, 1),
            ...                   0.1, torch.ones(3, 3, dtype=torch.bool))
            >>> s = obs.scaled(4.0)
            >>> float(s.sigma[0, 0]), s.peak_snr == obs.peak_snr, s.meta["flux_factor"]
            (2.0, True, 4.0)
        """
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"flux factor must be positive and finite, got {factor!r}")
        meta = dict(self.meta)
        meta["flux_factor"] = float(meta.get("flux_factor", 1.0)) * factor
        return dataclasses.replace(self, image=self.image * factor, sigma=self.sigma * factor,
                                   meta=meta)  # fmt: skip

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Observation:
        """Copy with ``image``, ``sigma``, ``psf`` cast to ``dtype``, all moved to ``device``.

        Args:
            dtype: Floating dtype; None keeps it.
            device: Target device; None keeps it.

        Returns:
            A new ``Observation``; ``mask`` stays boolean and ``meta`` is copied.
        """
        return dataclasses.replace(
            self,
            image=self.image.to(dtype=dtype, device=device),
            sigma=self.sigma.to(dtype=dtype, device=device),
            psf=self.psf.to(dtype=dtype, device=device),
            mask=self.mask.to(device=device),
            meta=dict(self.meta),
        )


def kernel_fwhm_pix(psf: Tensor) -> float:
    """FWHM in pixels of the least-squares circular Gaussian (sampled at pixel centres).

    Args:
        psf: Kernel, shape ``(k, k)``, ``k`` odd.

    Returns:
        The FWHM in pixels (``Observation.psf_fwhm_arcsec`` divided by the pixel scale);
        0 for a 1 x 1 kernel.
    """
    p = psf.detach().to(device="cpu", dtype=torch.float64)
    k = p.shape[-1]
    if k == 1:
        return 0.0
    iy, ix = divmod(int(p.argmax()), k)
    grid = torch.arange(k, dtype=p.dtype)
    rows, cols = slice(max(iy - 1, 0), iy + 2), slice(max(ix - 1, 0), ix + 2)
    block = p[rows, cols].clamp(min=0)
    cy = float((block.sum(1) * grid[rows]).sum() / block.sum())
    cx = float((block.sum(0) * grid[cols]).sum() / block.sum())
    r2 = (grid[:, None] - cy) ** 2 + (grid[None, :] - cx) ** 2
    lo, hi = math.log(0.1), math.log(k / 2)
    for _ in range(2):  # a coarse log-grid of widths, then a fine one around the best
        s = torch.exp(torch.linspace(lo, hi, 256, dtype=p.dtype))
        g = torch.exp(-r2 / (2 * s[:, None, None] ** 2))
        # The amplitude is linear, so the least-squares width maximizes <p, g>^2 / <g, g>.
        best = int(((g * p).sum((1, 2)) ** 2 / (g * g).sum((1, 2))).argmax())
        step = (hi - lo) / 255
        lo, hi = math.log(float(s[best])) - step, math.log(float(s[best])) + step
    return _FWHM_PER_SIGMA * float(s[best])


# --- reading ------------------------------------------------------------------------------


def _as_2d(values: object, where: str, what: str) -> np.ndarray:
    """Native-endian float64 2-D array (drops leading length-1 axes), or ObservationError."""
    try:
        # float64 conversion also makes big-endian data (DESJ0408 exposure_map) native.
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ObservationError(f"{where}: {what} is not numeric ({err})") from None
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise ObservationError(f"{where}: {what} has shape {arr.shape}; expected a 2-D image")
    return arr


def _assemble(
    image: np.ndarray,
    sigma: np.ndarray,
    psf: np.ndarray,
    pixel_scale_arcsec: float,
    user_mask: np.ndarray | None,
    meta: dict[str, Any],
    **fields: str | WCS | None,
) -> Observation:
    """Mask invalid and sentinel pixels, check the PSF, and build the Observation."""
    where, psf_where = meta["image_path"], meta.get("psf_path", meta["image_path"])
    noise_where = meta.get("noise_path", meta.get("weight_path", where))
    if sigma.shape != image.shape:
        raise ObservationError(
            f"{noise_where}: noise map shape {sigma.shape} != image {image.shape}"
        )
    usable = np.isfinite(sigma) & (sigma > 0)
    if not usable.any():
        raise ObservationError(f"{noise_where}: the noise map has no finite positive value")
    # Pipelines flag dead pixels with huge noise (1e8 in PyAutoLens, 1e16 in Euclid MER).
    sentinel = usable & (sigma > SENTINEL_FACTOR * np.median(sigma[usable]))
    excluded = np.zeros(image.shape, dtype=bool) if user_mask is None else user_mask != 0
    if excluded.shape != image.shape:
        raise ObservationError(
            f"{meta['mask_path']}: mask shape {excluded.shape} != image {image.shape}"
        )
    if excluded.mean() > 0.5:
        warnings.warn(
            f"{meta['mask_path']}: the mask excludes {excluded.mean():.0%} of the "
            "pixels; lensflow reads nonzero as excluded",
            UserWarning,
            stacklevel=3,
        )
    keep = np.isfinite(image) & usable & ~sentinel & ~excluded
    meta.update(
        n_masked_image_invalid=int((~np.isfinite(image)).sum()),
        n_masked_noise_invalid=int((~usable).sum()),
        n_masked_noise_sentinel=int(sentinel.sum()),
        n_masked_user=int(excluded.sum()),
    )
    if not keep.any():
        counts = ", ".join(f"{k[9:]}={v}" for k, v in meta.items() if k.startswith("n_masked"))
        raise ObservationError(f"{where}: every pixel is masked ({counts})")
    k, total = psf.shape, float(psf.sum())
    if k[0] > image.shape[0] or k[1] > image.shape[1]:
        raise ObservationError(
            f"{psf_where}: PSF kernel {k[0]}x{k[1]} is larger than the image "
            f"{image.shape[0]}x{image.shape[1]}; is this the right PSF file (a kernel, "
            "not an image)?"
        )
    if k[0] != k[1] or k[0] % 2 == 0:
        raise ObservationError(
            f"{psf_where}: PSF is {k[0]}x{k[1]}; lensflow needs a square "
            "kernel with an odd side, centred on its middle pixel"
        )
    if not (np.isfinite(psf).all() and total > 0):
        raise ObservationError(f"{psf_where}: PSF has NaN/inf values or a sum <= 0 ({total:.3g})")
    meta["psf_sum_raw"] = total
    if abs(total - 1.0) > PSF_SUM_TOLERANCE:
        warnings.warn(f"{psf_where}: PSF sums to {total:.4f}; normalized to 1", stacklevel=3)
    return Observation(
        image=torch.from_numpy(np.where(keep, image, 0.0)),
        sigma=torch.from_numpy(np.where(keep, sigma, 1.0)),
        psf=torch.from_numpy(psf / total),
        pixel_scale_arcsec=float(pixel_scale_arcsec),
        mask=torch.from_numpy(keep),
        meta=meta,
        **fields,
    )


def _existing(path: str | Path) -> Path:
    if not Path(path).is_file():
        raise ObservationError(f"{path}: file not found")
    return Path(path)


def _default_name(path: Path) -> str:
    stem = path.name.split(".")[0]
    return path.resolve().parent.name if stem.lower() in _GENERIC_STEMS else stem


def _choose_scale(
    explicit: float | None, found: float | None, source: str, meta: dict[str, Any]
) -> float:
    """Explicit pixel scale wins (with a warning if it disagrees by > 1%); else the file's."""
    where = meta["image_path"]
    if explicit is None and found is None:
        raise ObservationError(
            f"{where}: no pixel scale in the file (no celestial WCS or PIXSCALE keyword); "
            "pass pixel_scale_arcsec (--pixel-scale on the command line), e.g. 0.05"
        )
    if explicit is not None and not (math.isfinite(explicit) and explicit > 0):
        raise ObservationError(f"{where}: pixel_scale_arcsec={explicit!r} must be > 0")
    if explicit is not None and found is not None and abs(explicit / found - 1) > 1e-2:
        warnings.warn(
            f"{where}: pixel_scale_arcsec={explicit} overrides {found:.6g} from the {source}",
            stacklevel=3,
        )
    meta["pixel_scale_source"] = source if explicit is None else "argument"
    return float(explicit if explicit is not None else found)


def _open_fits(path: Path) -> fits.HDUList:
    try:
        hdul = fits.open(path, memmap=False)
        hdul.verify("silentfix")
    except (OSError, ValueError) as err:
        raise ObservationError(f"{path}: cannot read as FITS ({err})") from None
    return hdul


def _band_table(hdul: fits.HDUList) -> dict[str, dict[str, int]]:
    """``{band: {role: hdu index}}`` from EXTNAMEs ``<BAND>_<KIND>``, for bands with an image."""
    table: dict[str, dict[str, int]] = {}
    for i, hdu in enumerate(hdul):
        # An un-prefixed EXTNAME (IMAGE, NOISE, PSF: lensflow simulate's layout) is band "".
        band, _, kind = hdu.name.upper().rpartition("_")
        if kind in _ROLES:
            roles = table.setdefault(band, {})
            old = roles.get(_ROLES[kind])
            if old is None or (  # keep the preferred image kind, e.g. BGSUB over FLUX
                kind in _IMAGE_KINDS
                and _IMAGE_KINDS.index(kind) < _IMAGE_KINDS.index(hdul[old].name.split("_")[-1])
            ):
                roles[_ROLES[kind]] = i
    return {b: r for b, r in table.items() if "image" in r}


def _hdu_index(hdul: fits.HDUList, key: int | str | None, where: str) -> int:
    """Index of HDU ``key`` (index or EXTNAME), or of the first HDU with 2-D data if None."""
    if key is None:
        key = next((i for i, h in enumerate(hdul) if np.ndim(h.data) >= 2), None)
        if key is None:
            raise ObservationError(f"{where}: no image HDU in the file")
    try:
        return hdul.index_of(key) if isinstance(key, str) else range(len(hdul))[key]
    except (KeyError, IndexError):
        names = ", ".join(h.name for h in hdul)
        raise ObservationError(f"{where}: no HDU {key!r}; HDUs: {names}") from None


def _read_hdu(hdul: fits.HDUList, index: int, where: str, what: str) -> np.ndarray:
    if hdul[index].data is None:
        raise ObservationError(f"{where}: HDU {hdul[index].name} holds no {what} data")
    return _as_2d(hdul[index].data, f"{where}[{hdul[index].name}]", what)


def _read_plane(path: Path, band: str | None, role: str, meta: dict[str, Any]) -> np.ndarray:
    """A plane from its own file: the band's HDU of that role if named so, else the first."""
    meta[f"{role}_path"] = str(path)
    if role == "psf" and path.name.lower().endswith(HDF5_SUFFIXES):
        with _open_h5(path) as f:
            meta["psf_extras"] = [k for k in ("psf_variance_map", "psf_error_map") if k in f]
            return _as_2d(_h5_get(f, "kernel_point_source", path), str(path), "PSF")
    with _open_fits(path) as hdul:
        index = _hdu_index(hdul, _band_table(hdul).get(band or "", {}).get(role), str(path))
        meta[f"{role}_hdu"] = hdul[index].name or str(index)
        return _read_hdu(hdul, index, str(path), role)


def _header_scale(header: fits.Header, where: str) -> tuple[WCS | None, float | None, str]:
    """Celestial WCS and pixel scale in arcsec from a header, else its PIXSCALE keyword."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header).celestial
    except Exception:  # noqa: BLE001 - an unparsable WCS is treated as no WCS
        wcs = None
    if wcs is not None and wcs.has_celestial:
        units = [u.Unit(c) if str(c) else u.deg for c in wcs.wcs.cunit]
        scales = [
            float(s * unit / u.arcsec)
            for s, unit in zip(proj_plane_pixel_scales(wcs), units, strict=True)
        ]
        if abs(scales[0] / scales[1] - 1) > SCALE_TOLERANCE:
            raise ObservationError(
                f"{where}: pixels are not square ({scales[0]:.6g} x "
                f"{scales[1]:.6g} arcsec); resample first"
            )
        return wcs, sum(scales) / 2, "WCS"
    value = header.get("PIXSCALE")
    if isinstance(value, int | float) and value > 0:
        return None, float(value), "PIXSCALE keyword"
    return None, None, ""


def read_fits(
    image: str | Path,
    *,
    noise: str | Path | None = None,
    weight: str | Path | None = None,
    psf: str | Path | None = None,
    mask: str | Path | None = None,
    pixel_scale_arcsec: float | None = None,
    band: str | None = None,
    hdu: int | str | None = None,
    name: str | None = None,
) -> Observation:
    """Read an observation from FITS: separate files, or named HDUs of one file.

    A multi-extension file with HDUs ``<BAND>_<KIND>`` (Euclid: ``VIS_FLUX`` or
    ``VIS_BGSUB``, ``VIS_RMS``, ``VIS_PSF``; ``NIR_Y_*``, ``DES_G_*``) supplies the image,
    noise and PSF of ``band``. Without ``band``, a one-band file uses its band, a file with
    several uses ``VIS`` (recorded in ``meta["band_note"]``) or raises, listing the bands.
    ``noise``/``weight``/``psf`` files override the in-file HDUs. See the module docstring
    for the repairs.

    Args:
        image: Image file (or the multi-extension file).
        noise: Noise map file: per-pixel RMS in image units.
        weight: Weight map file: inverse variance; <= 0 means no data (masked).
        psf: PSF file (FITS, or HDF5 with ``kernel_point_source``).
        mask: FITS mask file, same shape as the image; nonzero means *excluded*.
        pixel_scale_arcsec: Pixel side in arcsec. Wins over the header (warning on a > 1%
            disagreement); required without a celestial WCS or PIXSCALE keyword.
        band: Band to read from a multi-extension file (case-insensitive), else a label.
        hdu: Index or EXTNAME of the image HDU; default by band, else the first 2-D HDU.
        name: Label; default the file stem, or the folder name for a generic stem.

    Returns:
        The observation in float64; ``meta`` records paths, HDUs and repairs.

    Raises:
        ObservationError: On a missing or unreadable file, unknown band or HDU, a missing
            noise map, PSF or pixel scale, a bad PSF, mismatched shapes, an empty image, or
            when every pixel ends up masked.
    """
    path = _existing(image)
    where = str(path)
    if noise is not None and weight is not None:
        raise ObservationError(f"{where}: pass noise= or weight=, not both")
    meta: dict[str, Any] = {"image_path": where}
    with _open_fits(path) as hdul:
        table = _band_table(hdul)
        key = band.upper() if band else None
        index = _hdu_index(hdul, hdu, where) if hdu is not None else None
        if index is not None and key is None:  # a <BAND>_<KIND> image HDU implies its band
            prefix = hdul[index].name.upper().rpartition("_")[0]
            key = prefix if prefix in table else None
        elif table and key is None:
            if len(table) > 1 and "VIS" not in table:
                raise ObservationError(
                    f"{where}: bands {', '.join(table)} in the file; pass band="
                )
            key = "VIS" if len(table) > 1 else next(iter(table))
            if len(table) > 1:
                meta["band_note"] = f"VIS chosen by default among {', '.join(table)}"
        elif table and key not in table:
            named = [b for b in table if b]
            if not named:
                raise ObservationError(
                    f"{where}: no band-prefixed HDUs (such as VIS_FLUX) in the file; "
                    f"leave out band={band!r}"
                )
            raise ObservationError(f"{where}: no band {band!r}; bands: {', '.join(named)}")
        roles = table.get(key or "", {})
        if index is None:
            index = _hdu_index(hdul, roles.get("image"), where)
        img, header = _read_hdu(hdul, index, where, "image"), hdul[index].header
        meta["image_hdu"] = hdul[index].name or str(index)
        planes = {r: _read_hdu(hdul, i, where, r) for r, i in roles.items() if r != "image"}
        meta.update({f"{r}_hdu": hdul[i].name for r, i in roles.items() if r != "image"})
    wcs, found, source = _header_scale(header, where)
    scale = _choose_scale(pixel_scale_arcsec, found, source, meta)
    meta.update({c.lower(): header[c] for c in ("MAGZERO", "BUNIT", "EXPTIME") if c in header})
    if noise is not None:
        planes["noise"] = _read_plane(_existing(noise), key, "noise", meta)
    elif weight is not None:
        planes["weight"] = _read_plane(_existing(weight), key, "weight", meta)
        planes.pop("noise", None)
    if "noise" in planes:
        sigma = planes["noise"]
    elif "weight" in planes:
        w = planes["weight"]  # weight <= 0 (or NaN) means no data: infinite sigma, masked
        sigma = np.where(w > 0, 1.0 / np.sqrt(np.where(w > 0, w, 1.0)), np.inf)
    else:
        raise ObservationError(f"{where}: no noise map; pass noise= (RMS) or weight= (1/var)")
    if psf is not None:
        planes["psf"] = _read_plane(_existing(psf), key, "psf", meta)
    if "psf" not in planes:
        raise ObservationError(f"{where}: no PSF; pass psf= (a FITS or HDF5 kernel file)")
    user_mask = None if mask is None else _read_plane(_existing(mask), None, "mask", meta)
    label = key or (str(header["FILTER"]).strip() if "FILTER" in header else None)
    name = name or _default_name(path)
    return _assemble(
        img, sigma, planes["psf"], scale, user_mask, meta, wcs=wcs, name=name, band=label
    )


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ObservationError(f"{path}: cannot read as HDF5 ({err})") from None


def _h5_get(f: h5py.File, key: str, where: str | Path) -> np.ndarray:
    if key not in f:
        raise ObservationError(f"{where}: missing dataset {key!r}; found {', '.join(f)}")
    return np.asarray(f[key][()], dtype=np.float64)


def read_hdf5(
    image: str | Path,
    *,
    psf: str | Path,
    mask: str | Path | None = None,
    pixel_scale_arcsec: float | None = None,
    band: str | None = None,
    name: str | None = None,
) -> Observation:
    """Read a lenstronomy-style HDF5 observation and its PSF file.

    The file holds ``image_data``, ``background_rms``, ``exposure_time`` or ``exposure_map``
    (scalar or per pixel, seconds), ``transform_pix2angle`` (2x2, arcsec/pixel) and
    optionally ``ra_at_xy_0``/``dec_at_xy_0`` (kept in ``meta``). The noise is
    ``sigma = sqrt(background_rms^2 + |image| / exposure)`` (lenstronomy clips negative
    pixels to 0 instead); pixels with exposure <= 0 are masked. The pixel scale is
    ``sqrt(|det transform_pix2angle|)``. See the module docstring for the repairs.

    Args:
        image: HDF5 image file.
        psf: PSF file holding ``kernel_point_source`` (or a FITS kernel).
        mask: FITS mask file, same shape as the image; nonzero means *excluded*.
        pixel_scale_arcsec: Wins over the transform's scale (warning on a > 1% difference).
        band: Band label; default an HST filter name found in the file name (``F814W``).
        name: Label; default the file stem.

    Returns:
        The observation in float64, with ``wcs=None``.

    Raises:
        ObservationError: On a missing or unreadable file or dataset, a bad transform,
            mismatched shapes, a bad PSF, or when every pixel ends up masked.
    """
    path = _existing(image)
    where = str(path)
    meta: dict[str, Any] = {"image_path": where}
    with _open_h5(path) as f:
        img = _as_2d(_h5_get(f, "image_data", where), where, "image_data")
        rms = _h5_get(f, "background_rms", where)
        exposure = _h5_get(f, "exposure_time" if "exposure_time" in f else "exposure_map", where)
        transform = _h5_get(f, "transform_pix2angle", where)
        meta.update({k: float(f[k][()]) for k in ("ra_at_xy_0", "dec_at_xy_0") if k in f})
    for what, arr in (("exposure", exposure), ("background_rms", rms)):
        if arr.ndim and arr.shape != img.shape:
            raise ObservationError(f"{where}: {what} shape {arr.shape} != image {img.shape}")
    det = float(np.linalg.det(transform)) if transform.shape == (2, 2) else math.nan
    if not (math.isfinite(det) and det != 0):
        raise ObservationError(f"{where}: transform_pix2angle is not a regular 2x2 matrix")
    meta["transform_pix2angle"] = transform.tolist()
    scale = _choose_scale(pixel_scale_arcsec, math.sqrt(abs(det)), "transform_pix2angle", meta)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.sqrt(rms**2 + np.where(exposure > 0, np.abs(img) / exposure, np.nan))
    kernel = _read_plane(_existing(psf), None, "psf", meta)
    user_mask = None if mask is None else _read_plane(_existing(mask), None, "mask", meta)
    if band is None:
        tokens = re.split(r"[_\-.]", path.name)
        band = next((t.upper() for t in tokens if _HST_FILTER.fullmatch(t)), None)
    name = name or _default_name(path)
    return _assemble(img, sigma, kernel, scale, user_mask, meta, name=name, band=band)


def load_observation(
    image: str | Path,
    *,
    noise: str | Path | None = None,
    weight: str | Path | None = None,
    psf: str | Path | None = None,
    mask: str | Path | None = None,
    pixel_scale_arcsec: float | None = None,
    band: str | None = None,
    name: str | None = None,
) -> Observation:
    """Read an observation with the reader its file extension calls for.

    ``FITS_SUFFIXES`` go to :func:`read_fits`, ``HDF5_SUFFIXES`` to :func:`read_hdf5`
    (which derives its own noise, so ``noise``/``weight`` are refused there).

    Args:
        image: Image file.
        noise: Noise (RMS) map file; FITS only.
        weight: Weight (inverse variance) map file; FITS only.
        psf: PSF file; required for HDF5.
        mask: FITS mask file; nonzero means *excluded*.
        pixel_scale_arcsec: Pixel side in arcsec; wins over the file's.
        band: Band to read, or a label.
        name: Label.

    Returns:
        The observation.

    Raises:
        ObservationError: On a missing file, an unknown extension, or any reader error.
    """
    path = _existing(image)
    common = {"mask": mask, "pixel_scale_arcsec": pixel_scale_arcsec, "band": band, "name": name}
    if path.name.lower().endswith(FITS_SUFFIXES):
        return read_fits(path, noise=noise, weight=weight, psf=psf, **common)
    if not path.name.lower().endswith(HDF5_SUFFIXES):
        raise ObservationError(
            f"{path}: unknown file type; expected one of {' '.join(FITS_SUFFIXES + HDF5_SUFFIXES)}"
        )
    if noise is not None or weight is not None:
        raise ObservationError(
            f"{path}: HDF5 noise comes from background_rms and exposure; drop noise=/weight="
        )
    if psf is None:
        raise ObservationError(f"{path}: an HDF5 observation needs psf= (a kernel file)")
    return read_hdf5(path, psf=psf, **common)


def summarize(obs: Observation) -> dict[str, Any]:
    """Plain-Python summary of an observation, as printed by ``lensflow inspect``.

    Args:
        obs: The observation.

    Returns:
        ``name``, ``band``, ``shape`` ``[H, W]``, ``pixel_scale_arcsec``, ``fov_arcsec``
        ``[height, width]``, ``psf_shape``, ``psf_fwhm_arcsec``, ``snr`` (total),
        ``peak_snr``, ``masked_fraction``, ``median_sigma`` (image units, unmasked pixels),
        ``z_lens`` and ``z_source``.
    """
    return {
        "name": obs.name,
        "band": obs.band,
        "shape": list(obs.shape),
        "pixel_scale_arcsec": obs.pixel_scale_arcsec,
        "fov_arcsec": list(obs.fov_arcsec),
        "psf_shape": list(obs.psf.shape),
        "psf_fwhm_arcsec": obs.psf_fwhm_arcsec,
        "snr": obs.snr,
        "peak_snr": obs.peak_snr,
        "masked_fraction": obs.masked_fraction,
        "median_sigma": float(obs.sigma[obs.mask].median()),
        "z_lens": obs.z_lens,
        "z_source": obs.z_source,
    }
