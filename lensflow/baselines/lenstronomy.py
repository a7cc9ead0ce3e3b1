"""Baseline stage: the lensflow lens model translated to, and rendered by, lenstronomy.

This is the only module that imports lenstronomy (the ``baselines`` extra). It maps a
parameter vector ``theta`` (columns ``params.NAMES``) to lenstronomy's keyword lists, back,
and renders images with lenstronomy's ``ImageModel`` on exactly the grid, supersampling and
PSF of :class:`lensflow.simulator.LensSimulator`, so the two codes can be checked against
each other (tests/test_parity.py) and lenstronomy's samplers used as a baseline.

Conventions (measured and pinned by tests/test_parity.py):

* The registry's semantics *are* lenstronomy's, so the mapping is by name, driven by each
  ``ParamSpec.lenstronomy`` field (``"kwargs_lens[0].theta_E"``): SIE ``theta_E``, ``e1``,
  ``e2``; ``SHEAR`` ``gamma1, gamma2`` with its centre fixed at ``ra_0 = dec_0 = 0``;
  ``SERSIC_ELLIPSE`` ``R_sersic`` = the product-average half-light radius sqrt(a b) (the
  default, not ``sersic_major_axis``), ``b_n = 1.9992 n - 0.3271``, ``amp`` = surface
  brightness at ``R_sersic`` in image units per arcsec^2.
* Grid: ``data_configure_simple(n_pix, pixel_scale, inverse=False)``: pixel centres at
  ``(i - (n - 1) / 2) * pixel_scale``, +x (RA) to the right along columns, +y up along rows,
  no pixel at 0 for even ``n``: identical to caustics' grid.
* Images are lenstronomy's native units, surface brightness times pixel area (flux per
  pixel), like ``LensSimulator``.
* PSF: the fine-resolution kernel that ``LensSimulator`` convolves with, given to lenstronomy
  as a ``PIXEL`` PSF at ``point_source_supersampling_factor = upsample_factor``, convolved
  on the supersampled grid (``supersampling_convolution=True``) with the whole kernel
  (``supersampling_kernel_size=None``; lenstronomy's default 5 would convolve the kernel's
  wings at the native resolution).
* Edges: lenstronomy's pixel convolution zero-pads the image, while caustics evaluates the
  model on a grid padded by half the kernel so that its edge pixels are exact.
  :func:`render_lenstronomy` therefore renders on a grid padded by the kernel's half-width
  (in native pixels) and crops the centre; :func:`image_model` exposes the padding.

References:
    Birrer & Amara 2018, "lenstronomy: Multi-purpose gravitational lens modelling software
    package", Physics of the Dark Universe 22, 189.
"""

from __future__ import annotations

__all__ = [
    "LenstronomyKwargs",
    "from_lenstronomy",
    "image_model",
    "psf_pad_pix",
    "render_lenstronomy",
    "to_lenstronomy",
]

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lensflow.config import SimulatorConfig
from lensflow.params import NAMES, REGISTRY
from lensflow.simulator import fine_psf

try:
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util.simulation_util import data_configure_simple
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "lensflow.baselines.lenstronomy needs lenstronomy; install the baselines extra with "
        "`pip install 'lensflow[baselines]'`"
    ) from err


@dataclass(frozen=True)
class LenstronomyKwargs:
    """lenstronomy keyword lists of one lens system (the arguments of ``ImageModel.image``).

    Attributes:
        kwargs_lens: ``[SIE, SHEAR]`` keywords: ``theta_E, e1, e2, center_x, center_y`` and
            ``gamma1, gamma2, ra_0 = 0, dec_0 = 0``; positions and radii in arcsec.
        kwargs_source: ``[SERSIC_ELLIPSE]`` keywords of the source: ``amp`` (image units per
            arcsec^2), ``R_sersic`` (arcsec, sqrt(a b)), ``n_sersic``, ``e1, e2``,
            ``center_x, center_y`` (arcsec).
        kwargs_lens_light: ``[SERSIC_ELLIPSE]`` keywords of the lens light, as the source.
    """

    kwargs_lens: list[dict[str, float]]
    kwargs_source: list[dict[str, float]]
    kwargs_lens_light: list[dict[str, float]]


#: lenstronomy profile names of the model, per keyword list.
_PROFILES: dict[str, list[str]] = {
    "kwargs_lens": ["SIE", "SHEAR"],
    "kwargs_source": ["SERSIC_ELLIPSE"],
    "kwargs_lens_light": ["SERSIC_ELLIPSE"],
}
#: Keywords held fixed (not in the registry): the shear centre, degenerate with positions.
_FIXED: dict[tuple[str, int], dict[str, float]] = {("kwargs_lens", 1): {"ra_0": 0.0, "dec_0": 0.0}}


def _parse(spec: str) -> tuple[str, int, str]:
    """``"kwargs_lens[0].theta_E"`` -> ``("kwargs_lens", 0, "theta_E")``."""
    match = re.fullmatch(r"(\w+)\[(\d+)\]\.(\w+)", spec)
    if match is None or match.group(1) not in _PROFILES:
        raise ValueError(f"cannot parse the lenstronomy keyword {spec!r}")
    return match.group(1), int(match.group(2)), match.group(3)


#: ``(list, index, key)`` of each column of ``theta``, from the registry.
_KEYS: tuple[tuple[str, int, str], ...] = tuple(_parse(p.lenstronomy) for p in REGISTRY)


def _as_numpy(theta: Tensor | np.ndarray) -> np.ndarray:
    """Parameters as a float64 numpy array (detached, on the CPU)."""
    if isinstance(theta, Tensor):
        theta = theta.detach().cpu().to(torch.float64).numpy()
    return np.asarray(theta, dtype=np.float64)


def to_lenstronomy(theta: Tensor | np.ndarray) -> LenstronomyKwargs:
    """One parameter vector to lenstronomy's keyword lists.

    Args:
        theta: Physical parameters, shape ``(21,)``, columns ``params.NAMES``, units per
            registry (tensor or array).

    Returns:
        The keyword lists, with Python floats.

    Raises:
        ValueError: If ``theta`` is not of shape ``(21,)``.

    Example:
        >>> from lensflow.prior import Prior
        >>> kw = to_lenstronomy(Prior().sample())
        >>> sorted(kw.kwargs_lens[1])
        ['dec_0', 'gamma1', 'gamma2', 'ra_0']
    """
    values = _as_numpy(theta)
    if values.shape != (len(NAMES),):
        raise ValueError(f"theta must have shape ({len(NAMES)},), got {values.shape}")
    out: dict[str, list[dict[str, float]]] = {
        group: [{} for _ in profiles] for group, profiles in _PROFILES.items()
    }
    for (group, i, key), value in zip(_KEYS, values, strict=True):
        out[group][i][key] = float(value)
    for (group, i), fixed in _FIXED.items():
        out[group][i].update(fixed)
    return LenstronomyKwargs(**out)


def from_lenstronomy(kwargs: LenstronomyKwargs) -> np.ndarray:
    """Inverse of :func:`to_lenstronomy`.

    Args:
        kwargs: lenstronomy keyword lists with every registry keyword (extra keywords, such
            as the fixed shear centre, are ignored).

    Returns:
        Physical parameters, shape ``(21,)``, float64, columns ``params.NAMES``.

    Raises:
        KeyError: If a registry keyword is missing (the message names it).
    """
    values = np.empty(len(NAMES), dtype=np.float64)
    for j, (group, i, key) in enumerate(_KEYS):
        try:
            values[j] = getattr(kwargs, group)[i][key]
        except (IndexError, KeyError):
            raise KeyError(f"{group}[{i}] has no {key!r} (parameter {NAMES[j]})") from None
    return values


def psf_pad_pix(config: SimulatorConfig, *, psf_kernel: Tensor | np.ndarray | None = None) -> int:
    """Native pixels to pad each side so lenstronomy's edge pixels see the whole PSF.

    Args:
        config: Pixel grid, supersampling and PSF.
        psf_kernel: Optional native-resolution pixel kernel, shape ``(k, k)`` with ``k`` odd
            (as for ``LensSimulator``).

    Returns:
        ``ceil(half-width of the fine kernel / upsample_factor)``; 0 without a PSF.
    """
    half_fine = fine_psf(config, psf_kernel).shape[0] // 2
    return math.ceil(half_fine / config.upsample_factor)


def image_model(
    config: SimulatorConfig,
    *,
    psf_kernel: Tensor | np.ndarray | None = None,
    n_pad: int = 0,
) -> ImageModel:
    """lenstronomy's ``ImageModel`` of the lensflow model on a simulator grid.

    Args:
        config: Pixel grid, supersampling and PSF (as for ``LensSimulator``).
        psf_kernel: Optional native-resolution pixel kernel, shape ``(k, k)`` with ``k`` odd;
            replaces the Gaussian. Brought to the supersampled scale with
            ``supersample_psf`` exactly as ``LensSimulator`` does.
        n_pad: Extra native pixels on each side of the grid (``psf_pad_pix`` makes the edge
            pixels exact; 0 gives the data grid for fitting).

    Returns:
        An ``ImageModel`` whose ``image(**dataclasses.asdict(to_lenstronomy(theta)))`` is
        of shape ``(n_pix + 2 n_pad, n_pix + 2 n_pad)``, in flux per pixel.

    Raises:
        ValueError: If ``n_pad`` is negative.
    """
    if n_pad < 0:
        raise ValueError(f"n_pad must be >= 0, got {n_pad}")
    up = config.upsample_factor
    fine = fine_psf(config, psf_kernel).numpy()
    if fine.shape == (1, 1):
        psf = PSF(psf_type="NONE")
    else:
        psf = PSF(
            psf_type="PIXEL",
            kernel_point_source=fine,
            point_source_supersampling_factor=up,
        )
    kwargs_data = data_configure_simple(
        config.n_pix + 2 * n_pad, config.pixel_scale_arcsec, inverse=False
    )
    kwargs_numerics: dict[str, Any] = {
        "supersampling_factor": up,
        "supersampling_convolution": up > 1,
        # Convolve with the whole fine kernel, as caustics does (default: central 5 px).
        "supersampling_kernel_size": None,
    }
    return ImageModel(
        ImageData(**kwargs_data),
        psf,
        LensModel(_PROFILES["kwargs_lens"]),
        LightModel(_PROFILES["kwargs_source"]),
        LightModel(_PROFILES["kwargs_lens_light"]),
        kwargs_numerics=kwargs_numerics,
    )


def render_lenstronomy(
    theta: Tensor | np.ndarray,
    config: SimulatorConfig,
    *,
    psf_kernel: Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """Noiseless images of the lensflow model rendered by lenstronomy.

    The grid is padded by :func:`psf_pad_pix` and cropped back, so edge pixels include the
    PSF-scattered light from outside the field, as in ``LensSimulator``.

    Args:
        theta: Physical parameters, shape ``(B, 21)`` or ``(21,)``, columns
            ``params.NAMES``, units per registry (tensor or array).
        config: Pixel grid, supersampling and PSF.
        psf_kernel: Optional native-resolution pixel kernel, shape ``(k, k)`` with ``k`` odd
            (as for ``LensSimulator``).

    Returns:
        Images in flux per pixel, float64, shape ``(B, H, W)`` or ``(H, W)``.

    Raises:
        ValueError: If ``theta`` is not of shape ``(B, 21)`` or ``(21,)``.
    """
    values = _as_numpy(theta)
    if values.ndim not in (1, 2) or values.shape[-1] != len(NAMES):
        raise ValueError(
            f"theta must have shape (B, {len(NAMES)}) or ({len(NAMES)},), got {values.shape}"
        )
    n_pad = psf_pad_pix(config, psf_kernel=psf_kernel)
    model = image_model(config, psf_kernel=psf_kernel, n_pad=n_pad)
    n = config.n_pix
    images = np.empty((len(values.reshape(-1, len(NAMES))), n, n), dtype=np.float64)
    with warnings.catch_warnings():
        # lenstronomy 1.14's FFT convolution calls np.fft.rfftn(x, s) without axes, which
        # NumPy 2 deprecates; harmless for 2-D images.
        warnings.filterwarnings("ignore", "`axes` should not be `None`", DeprecationWarning)
        for b, row in enumerate(values.reshape(-1, len(NAMES))):
            kw = to_lenstronomy(row)
            full = model.image(kw.kwargs_lens, kw.kwargs_source, kw.kwargs_lens_light)
            images[b] = full[n_pad : n_pad + n, n_pad : n_pad + n]
    return images[0] if values.ndim == 1 else images
