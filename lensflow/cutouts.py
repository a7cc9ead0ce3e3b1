"""Stage 0 (data): cutting observations to a preset's field of view, resampling if needed.

``cut_to_fov`` turns an ``Observation`` of any size and pixel scale into the preset's
``n_pix x n_pix`` grid. Equal pixel scales give an exact pixel copy; otherwise the image is
rebinned by exact pixel-area overlap (flux conserving) with the noise propagated and the
PSF rebinned alike. Conventions are those of ``lensflow.observation``: ``image[row = y,
col = x]``, 0-based pixel coordinates ``(x, y) = (column, row)``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from astropy.wcs import WCS
from torch import Tensor

from lensflow.observation import SCALE_TOLERANCE, Observation, ObservationError

if TYPE_CHECKING:
    from lensflow.config import SimulatorConfig

__all__ = ["cut_to_fov"]


def _overlap(n_out: int, start: float, step: float, n_in: int, like: Tensor) -> Tensor:
    """Exact 1-D overlap matrix, shape ``(n_out, n_in)``.

    Output pixel ``j`` spans ``[start + j step, start + (j + 1) step]`` in input pixel
    coordinates, input pixel ``i`` spans ``[i - 0.5, i + 0.5]``; entry ``(j, i)`` is the
    length of their intersection: the fraction of input pixel ``i`` inside output ``j``.
    """
    lo = start + step * torch.arange(n_out, dtype=like.dtype, device=like.device)[:, None]
    i = torch.arange(n_in, dtype=like.dtype, device=like.device)
    a = (torch.minimum(lo + step, i + 0.5) - torch.maximum(lo, i - 0.5)).clamp(min=0)
    return torch.where(a > 1e-9, a, 0.0)  # drop round-off slivers at shared edges


def _resample_psf(psf: Tensor, step: float) -> Tensor:
    """Rebin a PSF onto pixels ``step`` input pixels wide: odd-sized, centred, sum 1."""
    k = psf.shape[0]
    n = math.ceil(k / step - 1e-9)
    n += 1 - n % 2
    a = _overlap(n, (k - 1) / 2 - n * step / 2, step, k, psf)
    out = a @ psf @ a.T
    return out / out.sum()


def _cut_wcs(
    wcs: WCS | None, x0: float, y0: float, step: float, n: int, sliced: bool
) -> WCS | None:
    """WCS of a cut whose output pixel (0, 0) is centred on input pixel ``(x0, y0)``."""
    if wcs is None:
        return None
    if sliced:  # integer-aligned, inside the image
        return wcs.slice((slice(round(y0), round(y0) + n), slice(round(x0), round(x0) + n)))
    if wcs.has_distortion:
        return None  # rescaling a distortion model is not attempted
    out = WCS(wcs.to_header())  # PC + CDELT form; FITS pixels are 1-based
    out.wcs.crpix = (np.asarray(wcs.wcs.crpix) - 1 - [x0, y0]) / step + 1
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
    """Cut (and if needed resample) an observation to a preset's ``n_pix`` square grid.

    When the pixel scales agree to ``SCALE_TOLERANCE`` this is an exact pixel copy keeping
    the observation's scale; the window snaps to whole pixels, so the centre can move by up
    to half a pixel (the actual centre is ``meta["cut_center_pix"]``). Otherwise the image
    is rebinned onto ``config.pixel_scale_arcsec`` pixels centred exactly on the requested
    point with separable exact area-overlap matrices: ``image' = Ay @ image @ Ax.T`` (flux
    conserving) and ``sigma'^2 = Ay^2 @ sigma^2 @ (Ax^2).T``, which ignores the correlations
    rebinning creates (upsampling warns: its noise is understated). An output pixel touching
    a masked input pixel is masked. The PSF is rebinned the same way, made odd-sized and
    renormalized; the WCS is shifted and rescaled (dropped if it has distortions).

    Args:
        obs: The observation.
        config: Preset giving ``n_pix`` and ``pixel_scale_arcsec``.
        center_pix: Centre as 0-based input pixel coordinates ``(x, y) = (column, row)``.
        center_arcsec: Centre as ``(x, y)`` in arcsec from the input cutout's centre.
        use_padding: Mask output pixels reaching outside the input instead of raising.

    Returns:
        The cut observation; positions are now relative to its centre.

    Raises:
        ObservationError: If both centres are given, if the field does not fit in the
            cutout (without ``use_padding``), or if nothing unmasked remains.
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
    step = config.pixel_scale_arcsec / s_in
    resample = abs(step - 1) > SCALE_TOLERANCE
    if resample:  # lower edges of the window, in input pixel coordinates
        x_lo, y_lo, scale = cx - n * step / 2, cy - n * step / 2, config.pixel_scale_arcsec
    else:
        step, scale = 1.0, s_in
        x_lo, y_lo = (math.floor(c - (n - 1) / 2 + 0.5) - 0.5 for c in (cx, cy))
    inside = all(
        lo >= -0.5 - 1e-6 and lo + n * step <= size - 0.5 + 1e-6
        for lo, size in ((x_lo, w), (y_lo, h))
    )
    if not (inside or use_padding):
        raise ObservationError(
            f"{where}: a {n}x{n} px field at {scale:.4g} arcsec/px ({n * scale:.3g} arcsec) "
            f"centred on pixel (x, y) = ({cx:.1f}, {cy:.1f}) does not fit in the {h}x{w} px "
            f"cutout ({h * s_in:.3g} x {w * s_in:.3g} arcsec); pass another centre, a larger "
            "cutout or another preset, or mask the missing pixels (--pad)"
        )
    if step < 1 - SCALE_TOLERANCE:
        warnings.warn(
            f"{where}: upsampling {s_in:.4g} to {scale:.4g} arcsec/px correlates "
            "output pixels; the likelihood will overweight the data",
            stacklevel=2,
        )
    ax, ay = _overlap(n, x_lo, step, w, obs.image), _overlap(n, y_lo, step, h, obs.image)
    bad = (~obs.mask).to(obs.image.dtype)
    touched = ((ay > 0).to(bad) @ bad @ (ax > 0).to(bad).T) > 0
    covered = (ay.sum(1) >= step - 1e-9)[:, None] & (ax.sum(1) >= step - 1e-9)[None, :]
    keep = covered & ~touched
    var = torch.where(obs.mask, obs.sigma**2, 0.0)
    x0, y0 = x_lo + step / 2, y_lo + step / 2
    meta = {
        **obs.meta,
        "cut_center_pix": [x0 + (n - 1) * step / 2, y0 + (n - 1) * step / 2],
        "cut_from_shape": [h, w],
        "cut_from_pixel_scale_arcsec": s_in,
        "n_masked_outside": int((~covered).sum()),
    }
    return dataclasses.replace(
        obs,
        image=torch.where(keep, ay @ obs.image @ ax.T, 0.0),
        sigma=torch.where(keep, torch.sqrt(ay**2 @ var @ (ax**2).T), 1.0),
        psf=_resample_psf(obs.psf, step) if resample else obs.psf,
        pixel_scale_arcsec=scale,
        mask=keep,
        wcs=_cut_wcs(obs.wcs, x0, y0, step, n, sliced=inside and not resample),
        meta=meta,
    )
