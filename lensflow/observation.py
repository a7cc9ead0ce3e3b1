"""Stage 0 (data): the ``Observation`` record, its FITS and HDF5 readers, and preset cuts.

An ``Observation`` is one imaged lens: the image, a per-pixel noise map, the PSF, the pixel
scale and a likelihood mask. The readers turn files on disk into one, repairing what can be
repaired (documented below and in docs/observations.md) and raising ``ObservationError``, a
one-line message naming the file, for everything else.

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

References:
    Bernstein & Jarvis 2002, AJ 123, 583 (adaptive second moments, used for the PSF FWHM).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import astropy.units as u
import h5py
import numpy as np
import torch
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from astropy.wcs.utils import proj_plane_pixel_scales
from torch import Tensor

if TYPE_CHECKING:
    from lensflow.config import SimulatorConfig

__all__ = [
    "Observation",
    "ObservationError",
    "cut_to_fov",
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

# Roles of multi-extension HDUs named <BAND>_<KIND> (Euclid: VIS_FLUX, NIR_Y_RMS, DES_G_PSF).
# Image kinds are listed in order of preference: background-subtracted first.
_ROLES = {
    **{k: "image" for k in ("BGSUB", "FLUX", "SCI", "IMAGE", "DATA")},
    **{k: "noise" for k in ("RMS", "NOISE", "ERR", "SIGMA")},
    **{k: "weight" for k in ("WHT", "WEIGHT", "IVAR")},
    "PSF": "psf",
}
_IMAGE_ORDER = ("BGSUB", "FLUX", "SCI", "IMAGE", "DATA")
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
        ObservationError: On inconsistent shapes, dtypes, non-positive noise, a bad PSF, a
            bad pixel scale, or when no pixel is unmasked.
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
        for attr in ("image", "sigma", "psf", "mask"):
            if not isinstance(getattr(self, attr), Tensor):
                raise TypeError(f"{where}: Observation.{attr} must be a torch.Tensor, "
                                f"got {type(getattr(self, attr)).__name__}")  # fmt: skip
        shape = tuple(self.image.shape)
        problems = [
            (self.image.ndim == 2, f"image has shape {shape}; expected (H, W)"),
            (self.image.numel() > 0, "image is empty"),
            (self.image.is_floating_point(), f"image dtype {self.image.dtype} is not floating"),
            (tuple(self.sigma.shape) == shape, f"sigma shape {tuple(self.sigma.shape)} != {shape}"),
            (tuple(self.mask.shape) == shape, f"mask shape {tuple(self.mask.shape)} != {shape}"),
            (self.mask.dtype == torch.bool, f"mask dtype {self.mask.dtype} is not bool"),
            (self.sigma.dtype == self.image.dtype == self.psf.dtype,
             f"dtypes differ: image {self.image.dtype}, sigma {self.sigma.dtype}, "
             f"psf {self.psf.dtype}"),
            (self.psf.ndim == 2 and self.psf.shape[0] == self.psf.shape[1]
             and self.psf.shape[0] % 2 == 1,
             f"PSF has shape {tuple(self.psf.shape)}; it must be square with an odd side"),
            (math.isfinite(self.pixel_scale_arcsec) and self.pixel_scale_arcsec > 0,
             f"pixel_scale_arcsec={self.pixel_scale_arcsec!r} must be finite and > 0"),
        ]  # fmt: skip
        for ok, message in problems:
            if not ok:
                raise ObservationError(f"{where}: {message}")
        if not bool(torch.isfinite(self.image).all()):
            raise ObservationError(f"{where}: image has non-finite values")
        if not bool((torch.isfinite(self.sigma) & (self.sigma > 0)).all()):
            raise ObservationError(f"{where}: sigma must be finite and > 0 everywhere")
        psf_sum = float(self.psf.sum())
        if not bool(torch.isfinite(self.psf).all()) or abs(psf_sum - 1.0) > 1e-3:
            raise ObservationError(f"{where}: PSF sums to {psf_sum:.6g}; it must sum to 1")
        if not bool(self.mask.any()):
            raise ObservationError(f"{where}: every pixel is masked; nothing to fit")

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
        """PSF FWHM in arcsec from Gaussian-weighted (adaptive) second moments.

        The weight is a circular Gaussian iterated to match the PSF core (Bernstein & Jarvis
        2002), so for a sampled Gaussian this is the Gaussian's FWHM, and extended wings or a
        truncated stamp barely change it. Negative kernel values are ignored. A single-pixel
        (delta) PSF gives 0.
        """
        return _psf_fwhm_pix(self.psf) * self.pixel_scale_arcsec

    @property
    def snr(self) -> float:
        """Total S/N over unmasked pixels: ``sum(image) / sqrt(sum(sigma^2))``.

        Includes lens light and any unmasked neighbours, so it measures the cutout, not the
        arcs alone.
        """
        m = self.mask
        return float(self.image[m].sum() / torch.sqrt((self.sigma[m] ** 2).sum()))

    @property
    def peak_snr(self) -> float:
        """Largest single-pixel S/N ``max(image / sigma)`` over unmasked pixels."""
        return float((self.image[self.mask] / self.sigma[self.mask]).max())

    def to(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Observation:
        """Copy with floating tensors cast to ``dtype`` and all tensors moved to ``device``.

        Args:
            dtype: Floating dtype for ``image``, ``sigma`` and ``psf``; None keeps it.
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


def _psf_fwhm_pix(psf: Tensor) -> float:
    """FWHM in pixels of the Gaussian matched to the PSF core by adaptive moments."""
    p = psf.detach().to(device="cpu", dtype=torch.float64).clamp(min=0)
    k = p.shape[-1]
    yy, xx = torch.meshgrid(
        torch.arange(k, dtype=p.dtype), torch.arange(k, dtype=p.dtype), indexing="ij"
    )
    cy, cx = (float(c) for c in divmod(int(p.argmax()), k))
    # Start from the radius of the above-half-maximum area, converted to a Gaussian sigma.
    s = max(0.5, math.sqrt(float((p >= p.max() / 2).sum()) / math.pi) / (_FWHM_PER_SIGMA / 2))
    for _ in range(200):
        w = p * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s**2))
        total = float(w.sum())
        cx, cy = float((w * xx).sum()) / total, float((w * yy).sum()) / total
        # For a Gaussian of width s0 weighted by one of width s, <r^2> = 2 s0^2 s^2/(s0^2+s^2);
        # its fixed point s = sqrt(<r^2>) is s0, reached with contraction factor ~1/2.
        s_new = math.sqrt(float((w * ((xx - cx) ** 2 + (yy - cy) ** 2)).sum()) / total)
        if s_new < 1e-6:
            return 0.0
        converged = abs(s_new - s) < 1e-10 * s
        s = s_new
        if converged:
            break
    return _FWHM_PER_SIGMA * s


# --- shared assembly of reader output ------------------------------------------------------


def _as_2d(values: Any, where: str, what: str) -> np.ndarray:
    """Native-endian float64 2-D array (drops leading length-1 axes), or ObservationError."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ObservationError(f"{where}: {what} is not numeric ({err})") from None
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ObservationError(f"{where}: {what} has shape {arr.shape}; expected a 2-D image")
    if arr.size == 0:
        raise ObservationError(f"{where}: {what} is empty (shape {arr.shape})")
    return arr


def _check_psf(psf: np.ndarray, where: str, meta: dict[str, Any]) -> np.ndarray:
    """Validate a PSF kernel and normalize it to unit sum (warning when far from 1)."""
    k = psf.shape
    if k[0] != k[1] or k[0] % 2 == 0:
        raise ObservationError(
            f"{where}: PSF is {k[0]}x{k[1]}; lensflow needs a square kernel with an odd side, "
            "centred on its middle pixel"
        )
    if not np.isfinite(psf).all():
        raise ObservationError(f"{where}: PSF has {int((~np.isfinite(psf)).sum())} NaN/inf values")
    total = float(psf.sum())
    if total <= 0:
        raise ObservationError(f"{where}: PSF sums to {total:.3g}; it must be positive")
    meta["psf_sum_raw"] = total
    if abs(total - 1.0) > PSF_SUM_TOLERANCE:
        warnings.warn(f"{where}: PSF sums to {total:.4f}; normalized to 1", UserWarning,
                      stacklevel=3)  # fmt: skip
    return psf / total


def _assemble(
    image: np.ndarray,
    sigma: np.ndarray,
    psf: np.ndarray,
    pixel_scale_arcsec: float,
    user_mask: np.ndarray | None,
    *,
    where: str,
    psf_where: str,
    meta: dict[str, Any],
    **fields: Any,
) -> Observation:
    """Mask invalid and sentinel pixels, check the PSF, and build the Observation."""
    if sigma.shape != image.shape:
        raise ObservationError(f"{where}: noise map shape {sigma.shape} != image {image.shape}")
    bad_image = ~np.isfinite(image)
    usable = np.isfinite(sigma) & (sigma > 0)
    if not usable.any():
        raise ObservationError(f"{where}: the noise map has no finite positive value")
    # Pipelines flag dead pixels with huge noise (1e8 in PyAutoLens, 1e16 in Euclid MER).
    sentinel = usable & (sigma > SENTINEL_FACTOR * np.median(sigma[usable]))
    excluded = np.zeros(image.shape, dtype=bool)
    if user_mask is not None:
        if user_mask.shape != image.shape:
            raise ObservationError(
                f"{meta['mask_path']}: mask shape {user_mask.shape} != image {image.shape}"
            )
        excluded = user_mask != 0  # NaN != 0 too, so NaN excludes
        if excluded.mean() > 0.5:
            warnings.warn(f"{meta['mask_path']}: the mask excludes {excluded.mean():.0%} of the "
                          "pixels; lensflow reads nonzero as excluded", UserWarning,
                          stacklevel=3)  # fmt: skip
    keep = ~(bad_image | ~usable | sentinel | excluded)
    meta.update(n_masked_image_invalid=int(bad_image.sum()),
                n_masked_noise_invalid=int((~usable).sum()),
                n_masked_noise_sentinel=int(sentinel.sum()), n_masked_user=int(excluded.sum()))  # fmt: skip
    if not keep.any():
        raise ObservationError(
            f"{where}: every pixel is masked ({meta['n_masked_image_invalid']} non-finite image, "
            f"{meta['n_masked_noise_invalid']} invalid noise, {meta['n_masked_noise_sentinel']} "
            f"sentinel noise, {meta['n_masked_user']} user-masked)"
        )
    psf = _check_psf(psf, psf_where, meta)
    return Observation(
        image=torch.from_numpy(np.where(keep, image, 0.0)),
        sigma=torch.from_numpy(np.where(keep, sigma, 1.0)),
        psf=torch.from_numpy(np.ascontiguousarray(psf)),
        pixel_scale_arcsec=float(pixel_scale_arcsec),
        mask=torch.from_numpy(keep),
        meta=meta,
        **fields,
    )


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ObservationError(f"{p}: file not found")
    return p


def _default_name(path: Path) -> str:
    stem = path.name.split(".")[0]
    return path.resolve().parent.name if stem.lower() in _GENERIC_STEMS else stem


def _choose_scale(explicit: float | None, found: float | None, source: str, where: str,
                  meta: dict[str, Any]) -> float:  # fmt: skip
    """Explicit pixel scale wins (with a warning if it disagrees); else the file's."""
    if explicit is not None:
        if not (math.isfinite(explicit) and explicit > 0):
            raise ObservationError(f"{where}: pixel_scale_arcsec={explicit!r} must be > 0")
        if found is not None and abs(explicit / found - 1) > 1e-2:
            warnings.warn(f"{where}: pixel_scale_arcsec={explicit} overrides {found:.6g} "
                          f"from the {source}", UserWarning, stacklevel=3)  # fmt: skip
        meta["pixel_scale_source"] = "argument"
        return float(explicit)
    if found is None:
        raise ObservationError(
            f"{where}: no pixel scale in the file (no celestial WCS or PIXSCALE keyword); "
            "pass pixel_scale_arcsec (e.g. 0.05 for HST ACS drizzled to 0.05\"/px)"
        )
    meta["pixel_scale_source"] = source
    return found


# --- FITS -------------------------------------------------------------------------------------


def _open_fits(path: Path) -> fits.HDUList:
    try:
        hdul = fits.open(path, memmap=False)
        hdul.verify("silentfix")
    except (OSError, ValueError) as err:
        raise ObservationError(f"{path}: cannot read as FITS ({err})") from None
    return hdul


def _band_table(hdul: fits.HDUList) -> dict[str, dict[str, int]]:
    """``{band: {role: hdu index}}`` from EXTNAMEs ``<BAND>_<KIND>``; bands with an image."""
    table: dict[str, dict[str, int]] = {}
    for i, hdu in enumerate(hdul):
        band, _, kind = hdu.name.upper().rpartition("_")
        role = _ROLES.get(kind)
        if not band or role is None:
            continue
        roles = table.setdefault(band, {})
        if role not in roles:
            roles[role] = i
        elif role == "image":  # keep the preferred kind, e.g. BGSUB over FLUX
            previous = hdul[roles["image"]].name.upper().rpartition("_")[2]
            if _IMAGE_ORDER.index(kind) < _IMAGE_ORDER.index(previous):
                roles["image"] = i
    return {b: r for b, r in table.items() if "image" in r}


def _first_image(hdul: fits.HDUList, where: str) -> int:
    for i, hdu in enumerate(hdul):
        if getattr(hdu, "data", None) is not None and np.ndim(hdu.data) >= 2:
            return i
    raise ObservationError(f"{where}: no image HDU in the file")


def _hdu_index(hdul: fits.HDUList, key: int | str, where: str) -> int:
    try:
        index = hdul.index_of(key)
        if not 0 <= index < len(hdul):
            raise IndexError(key)
        return index
    except (KeyError, IndexError):
        names = ", ".join(h.name or str(i) for i, h in enumerate(hdul))
        raise ObservationError(f"{where}: no HDU {key!r}; HDUs: {names}") from None


def _read_hdu(hdul: fits.HDUList, index: int, where: str, what: str) -> np.ndarray:
    hdu = hdul[index]
    if hdu.data is None:
        raise ObservationError(f"{where}: HDU {hdu.name or index!r} holds no {what} data")
    return _as_2d(hdu.data, f"{where}[{hdu.name or index}]", what)


def _read_plane(path: Path, band: str | None, role: str, what: str,
                meta: dict[str, Any]) -> np.ndarray:  # fmt: skip
    """One plane from a separate file: the band's HDU of that role if named so, else the first."""
    if path.name.lower().endswith(HDF5_SUFFIXES) and role == "psf":
        return _read_h5_psf(path, meta)
    with _open_fits(path) as hdul:
        key = _band_table(hdul).get(band or "", {}).get(role)
        if key is None:
            key = _first_image(hdul, str(path))
        meta[f"{role}_path"], meta[f"{role}_hdu"] = str(path), hdul[key].name
        return _read_hdu(hdul, key, str(path), what)


def _header_scale(header: fits.Header, where: str) -> tuple[WCS | None, float | None, str]:
    """Celestial WCS and pixel scale (arcsec) from a header, or the PIXSCALE keyword."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header).celestial
    except Exception:  # noqa: BLE001 - a broken WCS is treated as no WCS
        wcs = None
    if wcs is not None and wcs.has_celestial:
        units = [u.Unit(c) if str(c) else u.deg for c in wcs.wcs.cunit]
        scales = [(s * unit).to_value(u.arcsec)
                  for s, unit in zip(proj_plane_pixel_scales(wcs), units, strict=True)]  # fmt: skip
        if abs(scales[0] / scales[1] - 1) > SCALE_TOLERANCE:
            raise ObservationError(f"{where}: non-square pixels ({scales[0]:.6g}\" x "
                                   f"{scales[1]:.6g}\"); resample to square pixels first")  # fmt: skip
        return wcs, float(np.mean(scales)), "wcs"
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

    A multi-extension file with HDUs named ``<BAND>_<KIND>`` (Euclid: ``VIS_FLUX`` or
    ``VIS_BGSUB``, ``VIS_RMS``, ``VIS_PSF``; ``NIR_Y_*``, ``DES_G_*``) supplies the image,
    noise and PSF of ``band``. Without ``band``, a file with one band uses it, one with
    several uses ``VIS`` (noted in ``meta["band_note"]``), and otherwise it raises, listing
    the bands. A separate ``noise``/``weight``/``psf`` file overrides the in-file HDU.

    Repairs: non-finite image pixels and noise values that are non-finite, <= 0 or above
    ``SENTINEL_FACTOR`` x the median noise are masked (counts in ``meta``); a PSF is
    normalized to sum 1 (a ``UserWarning`` when off by more than ``PSF_SUM_TOLERANCE``).

    Args:
        image: Image file (or the multi-extension file).
        noise: Noise map file: per-pixel RMS in image units.
        weight: Weight map file: inverse variance; 0 means no data (masked).
        psf: PSF file (FITS, or HDF5 with ``kernel_point_source``).
        mask: Mask file, same shape as the image; nonzero means *excluded*.
        pixel_scale_arcsec: Pixel side in arcsec. Overrides the header's (warning on a >1%
            disagreement); required when the header has no celestial WCS or PIXSCALE.
        band: Band to read from a multi-extension file (case-insensitive); otherwise a label.
        hdu: Index or EXTNAME of the image HDU; by default chosen by band, else the first
            HDU with 2-D data.
        name: Label; by default the file stem, or the folder name for a generic stem.

    Returns:
        The observation, float64, with ``meta`` recording paths, HDUs and repairs.

    Raises:
        ObservationError: On a missing or unreadable file, unknown band or HDU, a missing
            noise map, PSF or pixel scale, an even or non-square PSF, mismatched shapes, an
            empty image, or when every pixel ends up masked.
    """
    path = _existing(image)
    where = str(path)
    if noise is not None and weight is not None:
        raise ObservationError(f"{where}: pass either noise= or weight=, not both")
    meta: dict[str, Any] = {"image_path": where}
    with _open_fits(path) as hdul:
        table = _band_table(hdul)
        key = band.upper() if band is not None else None
        img_index = _hdu_index(hdul, hdu, where) if hdu is not None else None
        if img_index is not None:
            in_file = hdul[img_index].name.upper().rpartition("_")[0]
            key = key or (in_file if in_file in table else None)
        elif table and key is None:
            if len(table) > 1 and "VIS" not in table:
                raise ObservationError(f"{where}: the file holds bands {', '.join(table)}; "
                                       "pass band=")  # fmt: skip
            key = "VIS" if len(table) > 1 else next(iter(table))
            if len(table) > 1:
                meta["band_note"] = f"VIS chosen by default among {', '.join(table)}"
        elif table and key not in table:
            raise ObservationError(
                f"{where}: band {band!r} not in the file; bands: {', '.join(table)}"
            )
        roles = table.get(key or "", {})
        if img_index is None:
            img_index = roles["image"] if roles else _first_image(hdul, where)
        img = _read_hdu(hdul, img_index, where, "image")
        header = hdul[img_index].header
        meta["image_hdu"] = hdul[img_index].name
        planes: dict[str, np.ndarray] = {}
        for role in ("noise", "weight", "psf"):
            if role in roles:
                planes[role] = _read_hdu(hdul, roles[role], where, role)
                meta[f"{role}_hdu"] = hdul[roles[role]].name
    wcs, found, source = _header_scale(header, where)
    scale = _choose_scale(pixel_scale_arcsec, found, source, where, meta)
    for meta_key, card in (("magzero", "MAGZERO"), ("bunit", "BUNIT"), ("exptime", "EXPTIME")):
        if card in header:
            meta[meta_key] = header[card]
    if noise is not None:
        sigma = _read_plane(_existing(noise), key, "noise", "noise map", meta)
    elif weight is None and "noise" in planes:
        sigma = planes["noise"]
    else:
        if weight is not None:
            planes["weight"] = _read_plane(_existing(weight), key, "weight", "weight map", meta)
        if "weight" not in planes:
            raise ObservationError(f"{where}: no noise map; pass noise= (RMS) or weight= "
                                   "(inverse variance)")  # fmt: skip
        w = planes["weight"]
        # Weight 0 (or negative, or NaN) means no data: infinite sigma, masked downstream.
        with np.errstate(divide="ignore", invalid="ignore"):
            sigma = np.where(w > 0, 1.0 / np.sqrt(np.where(w > 0, w, 1.0)), np.inf)
    if psf is not None:
        kernel = _read_plane(_existing(psf), key, "psf", "PSF", meta)
    elif "psf" in planes:
        kernel = planes["psf"]
    else:
        raise ObservationError(f"{where}: no PSF; pass psf= (a FITS or HDF5 kernel file)")
    user_mask = None if mask is None else _read_plane(_existing(mask), None, "mask", "mask", meta)
    label = key or (str(header["FILTER"]).strip() if "FILTER" in header else None)
    return _assemble(img, sigma, kernel, scale, user_mask, where=where,
                     psf_where=str(psf or where), meta=meta, wcs=wcs,
                     name=name or _default_name(path), band=label)  # fmt: skip


# --- HDF5 (lenstronomy layout) ------------------------------------------------------------


def _h5_get(f: h5py.File, key: str, where: str) -> np.ndarray:
    if key not in f:
        raise ObservationError(f"{where}: missing dataset {key!r}; found {', '.join(f.keys())}")
    # np.asarray(..., float64) also turns big-endian data (DESJ0408 exposure_map) native.
    return np.asarray(f[key][()], dtype=np.float64)


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ObservationError(f"{path}: cannot read as HDF5 ({err})") from None


def _read_h5_psf(path: Path, meta: dict[str, Any]) -> np.ndarray:
    with _open_h5(path) as f:
        kernel = _as_2d(_h5_get(f, "kernel_point_source", str(path)), str(path), "PSF")
        extras = [k for k in ("psf_variance_map", "psf_error_map") if k in f]
    meta.update(psf_path=str(path), psf_extras=extras)
    return kernel


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

    The image file holds ``image_data``, ``background_rms``, ``exposure_time`` or
    ``exposure_map`` (scalar or per pixel, seconds), ``transform_pix2angle`` (2x2,
    arcsec/pixel) and optionally ``ra_at_xy_0``/``dec_at_xy_0`` (kept in ``meta``). The
    noise is ``sigma = sqrt(background_rms^2 + |image| / exposure)`` (lenstronomy itself
    clips negative pixels to 0 instead of taking ``|image|``); pixels with exposure <= 0
    are masked. The pixel scale is ``sqrt(|det transform_pix2angle|)``.

    Args:
        image: HDF5 image file.
        psf: PSF file holding ``kernel_point_source`` (or a FITS kernel).
        mask: FITS mask file, same shape as the image; nonzero means *excluded*.
        pixel_scale_arcsec: Overrides the transform's scale (warning on a >1% disagreement).
        band: Band label; by default an HST filter name in the file name (``F814W``).
        name: Label; by default the file stem.

    Returns:
        The observation, float64, ``wcs=None``.

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
        exp_key = "exposure_time" if "exposure_time" in f else "exposure_map"
        if exp_key not in f:
            raise ObservationError(f"{where}: missing dataset exposure_time or exposure_map")
        exposure = _h5_get(f, exp_key, where)
        transform = _h5_get(f, "transform_pix2angle", where)
        for k in ("ra_at_xy_0", "dec_at_xy_0"):
            if k in f:
                meta[k] = float(np.asarray(f[k][()]))
    for label, arr in ((exp_key, exposure), ("background_rms", rms)):
        if arr.ndim and arr.shape != img.shape:
            raise ObservationError(f"{where}: {label} shape {arr.shape} != image {img.shape}")
    if transform.shape != (2, 2) or not np.isfinite(transform).all():
        raise ObservationError(f"{where}: transform_pix2angle must be a finite 2x2 matrix")
    found = math.sqrt(abs(float(np.linalg.det(transform))))
    if found == 0:
        raise ObservationError(f"{where}: transform_pix2angle is singular")
    meta["transform_pix2angle"] = transform.tolist()
    scale = _choose_scale(pixel_scale_arcsec, found, "transform_pix2angle", where, meta)
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = np.sqrt(rms**2 + np.where(exposure > 0, np.abs(img) / exposure, np.nan))
    kernel = _read_plane(_existing(psf), None, "psf", "PSF", meta)
    user_mask = None if mask is None else _read_plane(_existing(mask), None, "mask", "mask", meta)
    if band is None:
        tokens = re.split(r"[_\-.]", path.name)
        band = next((t.upper() for t in tokens if _HST_FILTER.fullmatch(t)), None)
    return _assemble(img, sigma, kernel, scale, user_mask, where=where, psf_where=str(psf),
                     meta=meta, name=name or _default_name(path), band=band)  # fmt: skip


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
    """Read an observation, choosing the reader by file extension.

    ``.fits .fit .fts .fits.gz .fit.gz .fz`` go to :func:`read_fits`; ``.h5 .hdf5 .he5`` to
    :func:`read_hdf5` (which computes its own noise, so ``noise``/``weight`` are refused).

    Args:
        image: Image file.
        noise: Noise (RMS) map file, FITS only.
        weight: Weight (inverse variance) map file, FITS only.
        psf: PSF file; required for HDF5.
        mask: FITS mask file; nonzero means excluded.
        pixel_scale_arcsec: Pixel side in arcsec; overrides the file's.
        band: Band to read, or label.
        name: Label.

    Returns:
        The observation.

    Raises:
        ObservationError: On a missing file, an unknown extension, or any reader error.
    """
    path = _existing(image)
    lower = path.name.lower()
    if lower.endswith(FITS_SUFFIXES):
        return read_fits(path, noise=noise, weight=weight, psf=psf, mask=mask,
                         pixel_scale_arcsec=pixel_scale_arcsec, band=band, name=name)  # fmt: skip
    if lower.endswith(HDF5_SUFFIXES):
        if noise is not None or weight is not None:
            raise ObservationError(f"{path}: HDF5 observations derive the noise from "
                                   "background_rms and exposure; drop noise=/weight=")  # fmt: skip
        if psf is None:
            raise ObservationError(f"{path}: an HDF5 observation needs psf= (kernel file)")
        return read_hdf5(path, psf=psf, mask=mask, pixel_scale_arcsec=pixel_scale_arcsec,
                         band=band, name=name)  # fmt: skip
    raise ObservationError(f"{path}: unknown file type; expected one of "
                           f"{' '.join(FITS_SUFFIXES + HDF5_SUFFIXES)}")  # fmt: skip


# --- cutting and resampling ----------------------------------------------------------------


def _overlap(n_out: int, start: float, step: float, n_in: int, like: Tensor) -> Tensor:
    """Exact 1-D overlap matrix, shape ``(n_out, n_in)``.

    Output pixel ``j`` spans ``[start + j step, start + (j + 1) step]`` in input pixel
    coordinates, where input pixel ``i`` spans ``[i - 0.5, i + 0.5]``; entry ``(j, i)`` is the
    length of their intersection, i.e. the fraction of input pixel ``i`` inside output ``j``.
    """
    lo = start + step * torch.arange(n_out, dtype=like.dtype, device=like.device)
    centres = torch.arange(n_in, dtype=like.dtype, device=like.device)
    a = torch.minimum(lo[:, None] + step, centres + 0.5) - torch.maximum(lo[:, None], centres - 0.5)
    a = a.clamp(min=0)
    return torch.where(a > 1e-9, a, torch.zeros_like(a))  # drop round-off slivers


def _resample_psf(psf: Tensor, step: float) -> Tensor:
    """Rebin a PSF to pixels ``step`` input pixels wide, odd-sized, centred, sum 1."""
    k = psf.shape[0]
    n = math.ceil(k / step - 1e-9)
    n += 1 - n % 2
    a = _overlap(n, (k - 1) / 2 - n * step / 2, step, k, psf)
    out = a @ psf @ a.T
    return out / out.sum()


def _cut_wcs(wcs: WCS | None, x0: float, y0: float, step: float, n: int,
             sliced: bool) -> WCS | None:  # fmt: skip
    """WCS of the cut: sliced when integer-aligned, else pixel grid shifted and rescaled.

    ``(x0, y0)`` is the 0-based input pixel coordinate of output pixel (0, 0)'s centre.
    """
    if wcs is None:
        return None
    if sliced:
        ix, iy = round(x0), round(y0)
        return wcs.slice((slice(iy, iy + n), slice(ix, ix + n)))
    if wcs.has_distortion:
        return None  # rescaling a distortion model is not attempted
    out = WCS(wcs.to_header())  # PC + CDELT form
    out.wcs.crpix = [(wcs.wcs.crpix[0] - 1 - x0) / step + 1, (wcs.wcs.crpix[1] - 1 - y0) / step + 1]
    out.wcs.cdelt = out.wcs.cdelt * step
    out.wcs.set()
    return out


def cut_to_fov(
    obs: Observation,
    config: SimulatorConfig,
    *,
    center_pix: tuple[float, float] | None = None,
    center_arcsec: tuple[float, float] | None = None,
    use_padding: bool = False,
) -> Observation:
    """Cut (and if needed resample) an observation to a preset's pixel grid.

    The output is ``config.n_pix`` square. If the pixel scales agree to ``SCALE_TOLERANCE``
    the cut is an exact pixel copy, keeping the observation's own scale; the window snaps
    to whole pixels, so its centre can move by up to half a pixel (the actual centre is in
    ``meta["cut_center_pix"]``). Otherwise the image is rebinned onto pixels of
    ``config.pixel_scale_arcsec`` centred exactly on the requested point, with separable
    exact area-overlap matrices: ``image' = Ay @ image @ Ax.T`` (flux conserving),
    ``sigma'^2 = Ay^2 @ sigma^2 @ (Ax^2).T`` (independent input pixels; the correlations
    that rebinning introduces are ignored, which understates the noise of upsampled data,
    hence a warning). An output pixel touching a masked input pixel is masked. The PSF is
    rebinned the same way, made odd-sized and renormalized; the WCS is shifted and rescaled
    (dropped if it has distortions).

    Args:
        obs: The observation.
        config: Preset giving ``n_pix`` and ``pixel_scale_arcsec``.
        center_pix: Centre as 0-based input pixel coordinates ``(x, y) = (column, row)``.
        center_arcsec: Centre as ``(x, y)`` arcsec from the input cutout's centre.
        use_padding: Mask output pixels that fall (even partly) outside the input instead of
            raising.

    Returns:
        The cut observation (positions now relative to its centre).

    Raises:
        ObservationError: If both centres are given, or the field does not fit in the
            cutout (without ``use_padding``), or nothing unmasked remains.
    """
    where = obs.meta.get("image_path") or obs.name or "observation"
    if center_pix is not None and center_arcsec is not None:
        raise ObservationError(f"{where}: pass center_pix or center_arcsec, not both")
    (h, w), s_in, n = obs.shape, obs.pixel_scale_arcsec, config.n_pix
    cx, cy = (w - 1) / 2, (h - 1) / 2
    if center_pix is not None:
        cx, cy = float(center_pix[0]), float(center_pix[1])
    elif center_arcsec is not None:
        cx, cy = cx + center_arcsec[0] / s_in, cy + center_arcsec[1] / s_in
    if not (math.isfinite(cx) and math.isfinite(cy)):
        raise ObservationError(f"{where}: centre ({cx}, {cy}) px is not finite")
    step = config.pixel_scale_arcsec / s_in
    resample = abs(step - 1) > SCALE_TOLERANCE
    if resample:
        x_lo, y_lo, scale = cx - n * step / 2, cy - n * step / 2, config.pixel_scale_arcsec
    else:
        step, scale = 1.0, s_in
        x_lo = math.floor(cx - (n - 1) / 2 + 0.5) - 0.5
        y_lo = math.floor(cy - (n - 1) / 2 + 0.5) - 0.5
    fits_x = -0.5 - 1e-6 <= x_lo and x_lo + n * step <= w - 0.5 + 1e-6
    fits_y = -0.5 - 1e-6 <= y_lo and y_lo + n * step <= h - 0.5 + 1e-6
    if not ((fits_x and fits_y) or use_padding):
        raise ObservationError(
            f"{where}: a {n}x{n} px field at {scale:.4g}\"/px ({n * scale:.3g}\") centred on "
            f"pixel (x, y) = ({cx:.1f}, {cy:.1f}) does not fit in the {h}x{w} px cutout "
            f"({h * s_in:.3g}\" x {w * s_in:.3g}\"); choose another centre or preset, or pass "
            "use_padding=True"
        )
    if step < 1 - SCALE_TOLERANCE:
        warnings.warn(f"{where}: upsampling {s_in:.4g}\"/px to {scale:.4g}\"/px; output pixels "
                      "are correlated and the likelihood will overweight the data",
                      UserWarning, stacklevel=2)  # fmt: skip
    ax = _overlap(n, x_lo, step, w, obs.image)
    ay = _overlap(n, y_lo, step, h, obs.image)
    masked = (~obs.mask).to(obs.image.dtype)
    touched = ((ay > 0).to(masked) @ masked @ (ax > 0).to(masked).T) > 0
    inside = (ay.sum(1) >= step * (1 - 1e-9))[:, None] & (ax.sum(1) >= step * (1 - 1e-9))[None]
    keep = inside & ~touched
    image = torch.where(keep, ay @ obs.image @ ax.T, 0.0)
    var = torch.where(obs.mask, obs.sigma**2, 0.0)
    sigma = torch.where(keep, torch.sqrt(ay**2 @ var @ (ax**2).T), 1.0)
    x0, y0 = x_lo + step / 2, y_lo + step / 2
    meta = {**obs.meta, "cut_center_pix": [x0 + (n - 1) * step / 2, y0 + (n - 1) * step / 2],
            "cut_from_shape": [h, w], "cut_from_pixel_scale_arcsec": s_in,
            "resampled": resample, "n_masked_outside": int((~inside).sum())}  # fmt: skip
    return Observation(
        image=image,
        sigma=sigma,
        psf=_resample_psf(obs.psf, step) if resample else obs.psf,
        pixel_scale_arcsec=scale,
        mask=keep,
        wcs=_cut_wcs(obs.wcs, x0, y0, step, n, sliced=not resample and fits_x and fits_y),
        name=obs.name,
        band=obs.band,
        z_lens=obs.z_lens,
        z_source=obs.z_source,
        meta=meta,
    )


def summarize(obs: Observation) -> dict[str, Any]:
    """Plain-Python summary of an observation, as printed by ``lensflow inspect``.

    Args:
        obs: The observation.

    Returns:
        Mapping with ``name``, ``band``, ``shape`` ``[H, W]``, ``pixel_scale_arcsec``,
        ``fov_arcsec`` ``[height, width]``, ``psf_shape``, ``psf_fwhm_arcsec``, ``snr``
        (total), ``peak_snr``, ``masked_fraction``, ``median_sigma`` (image units, unmasked
        pixels), ``z_lens`` and ``z_source``.
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
