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

The lenstronomy + emcee baseline (:func:`run_lenstronomy`) runs lenstronomy's own
``FittingSequence`` (PSO, then emcee) on an :class:`~lensflow.observation.Observation`,
with the same model, grid, PSF (the observation's kernel as a ``PIXEL`` PSF),
supersampling, noise (``noise_map``) and mask as lensflow's likelihood, and bounds from
the registry's default prior box. Because of the zero padding above, the data are put on a
grid padded by the PSF's half-width whose extra pixels are masked (:func:`fit_data`,
``border="pad"``), so lenstronomy's likelihood uses every observed pixel, each exact, as
lensflow's does; ``border="mask"`` drops a PSF-wide border instead (:func:`likelihood_mask`;
a different, wider posterior). lenstronomy solves the two amplitudes linearly; each
returned sample's amplitudes are drawn from their conditional Gaussian. docs/baselines.md
is the user guide.

References:
    Birrer & Amara 2018, "lenstronomy: Multi-purpose gravitational lens modelling software
    package", Physics of the Dark Universe 22, 189.
"""

from __future__ import annotations

__all__ = [
    "BORDERS",
    "INDEPENDENT_SUPERSAMPLING",
    "NUMERICS",
    "LenstronomyKwargs",
    "LenstronomyResult",
    "fit_data",
    "fitting_sequence",
    "from_lenstronomy",
    "image_model",
    "lenstronomy_pairs",
    "likelihood_mask",
    "native_psf",
    "psf_pad_pix",
    "render_lenstronomy",
    "run_lenstronomy",
    "to_lenstronomy",
]

import contextlib
import dataclasses
import io
import math
import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lensflow.baselines.mcmc import EnsembleDiagnostics, ensemble_diagnostics
from lensflow.config import SimulatorConfig
from lensflow.data import Pairs, SimulatedPairs, network_input
from lensflow.observation import Observation
from lensflow.params import NAMES, REGISTRY, ParamSpec
from lensflow.sampling import PosteriorSamples
from lensflow.simulator import fine_psf, gaussian_psf, pool_psf

try:
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_linear_solve import ImageLinearFit
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util.simulation_util import data_configure_simple
    from lenstronomy.Workflow.fitting_sequence import FittingSequence
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


#: ``image_model(numerics=...)`` choices: ``matched`` reproduces ``LensSimulator`` (same
#: supersampling, PSF convolved at the fine scale); ``independent`` is how a lenstronomy user
#: sets it up: ``INDEPENDENT_SUPERSAMPLING``-fold supersampling and lenstronomy's default
#: convolution of the pixel-integrated image with the native pixel-integrated PSF kernel.
NUMERICS = ("matched", "independent")

#: Supersampling factor of ``numerics="independent"``.
INDEPENDENT_SUPERSAMPLING = 6


def native_psf(config: SimulatorConfig, psf_kernel: Tensor | np.ndarray | None = None) -> Tensor:
    """The native pixel-integrated PSF kernel of a configuration.

    Args:
        config: Pixel grid and Gaussian FWHM (used without ``psf_kernel``).
        psf_kernel: Optional native kernel, shape ``(k, k)``, ``k`` odd; returned normalized.

    Returns:
        Kernel of unit sum, float64, shape ``(n, n)``, ``n`` odd; the Gaussian is integrated
        over pixels on a ``INDEPENDENT_SUPERSAMPLING``-fold grid (``simulator.pool_psf``).
    """
    if psf_kernel is not None:
        k = torch.as_tensor(psf_kernel, dtype=torch.float64)
        return k / k.sum()
    f = INDEPENDENT_SUPERSAMPLING
    fine = gaussian_psf(config.psf_fwhm_arcsec, config.pixel_scale_arcsec / f,
                        truncation=config.psf_truncation)  # fmt: skip
    return pool_psf(fine, f)


def image_model(
    config: SimulatorConfig,
    *,
    psf_kernel: Tensor | np.ndarray | None = None,
    n_pad: int = 0,
    numerics: str = "matched",
) -> ImageModel:
    """lenstronomy's ``ImageModel`` of the lensflow model on a simulator grid.

    Args:
        config: Pixel grid, supersampling and PSF (as for ``LensSimulator``).
        psf_kernel: Optional native-resolution pixel kernel, shape ``(k, k)`` with ``k`` odd;
            replaces the Gaussian. With ``numerics="matched"`` it is brought to the
            supersampled scale with ``supersample_psf`` exactly as ``LensSimulator`` does.
        n_pad: Extra native pixels on each side of the grid (``psf_pad_pix`` makes the edge
            pixels exact; 0 gives the data grid for fitting).
        numerics: ``"matched"`` (the same numerics as ``LensSimulator``: images agree to
            ~1e-6 of the peak) or ``"independent"`` (``INDEPENDENT_SUPERSAMPLING``-fold
            supersampling, native-pixel convolution with ``native_psf``: lenstronomy's
            defaults, a different discretization of the same model; see ``NUMERICS``).

    Returns:
        An ``ImageModel`` whose ``image(**dataclasses.asdict(to_lenstronomy(theta)))`` is
        of shape ``(n_pix + 2 n_pad, n_pix + 2 n_pad)``, in flux per pixel.

    Raises:
        ValueError: If ``n_pad`` is negative or ``numerics`` unknown.
    """
    if n_pad < 0:
        raise ValueError(f"n_pad must be >= 0, got {n_pad}")
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
    kwargs_data = data_configure_simple(
        config.n_pix + 2 * n_pad, config.pixel_scale_arcsec, inverse=False
    )
    no_psf = psf_kernel is None and config.psf_fwhm_arcsec == 0
    if numerics == "independent":
        psf = (PSF(psf_type="NONE") if no_psf
               else PSF(psf_type="PIXEL", kernel_point_source=native_psf(config, psf_kernel)
                        .numpy()))  # fmt: skip
        kwargs_numerics: dict[str, Any] = {
            "supersampling_factor": INDEPENDENT_SUPERSAMPLING,
            "supersampling_convolution": False,
        }
    else:
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
        kwargs_numerics = {
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
    numerics: str = "matched",
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
        numerics: ``"matched"`` or ``"independent"`` (see :func:`image_model`).

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
    if numerics == "independent" and (psf_kernel is not None or config.psf_fwhm_arcsec > 0):
        n_pad = max(n_pad, native_psf(config, psf_kernel).shape[0] // 2)
    model = image_model(config, psf_kernel=psf_kernel, n_pad=n_pad, numerics=numerics)
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


def lenstronomy_pairs(source: SimulatedPairs, pairs: Pairs, numerics: str = "matched") -> Pairs:
    """The same simulated lenses rendered by lenstronomy, with the same noise draws.

    Each lens keeps its parameters, PSF FWHM, background RMS, exposure time and the
    standard-normal draws of its noise (recovered from ``pairs``' caustics image); only the
    noiseless model is lenstronomy's. Used for cross-simulator checks of trained models.

    Args:
        source: The generator of ``pairs`` (its simulators, PSF grid and data ranges).
        pairs: Simulated lenses from ``source``, ``B`` of them.
        numerics: ``"matched"`` or ``"independent"`` (see :func:`image_model`).

    Returns:
        New ``Pairs`` with lenstronomy images, their noise maps and network inputs; the
        masks of ``pairs`` are kept.
    """
    k = source.psf_index(pairs.psf_fwhm_arcsec)
    model_c = source.noiseless(pairs.theta, k).to(pairs.image)
    model_l = torch.zeros_like(pairs.image)
    for i, fwhm in enumerate(source.psf_grid_arcsec):
        chosen = (k == i).nonzero().flatten()
        if chosen.numel():
            cfg = dataclasses.replace(source.simulator_config, psf_fwhm_arcsec=fwhm)
            rendered = render_lenstronomy(pairs.theta[chosen].double(), cfg, numerics=numerics)
            model_l[chosen] = torch.as_tensor(rendered).to(model_l)
    eps = (pairs.image - model_c) / pairs.sigma  # the standard-normal draws of the lenses
    rms, exposure = pairs.background_rms[:, None, None], pairs.exposure_time_s[:, None, None]
    sigma = (rms**2 + model_l.clamp_min(0) / exposure).sqrt()
    image = model_l + sigma * eps
    mask = pairs.mask if pairs.mask is not None else torch.ones_like(image, dtype=torch.bool)
    x = network_input(
        image, sigma, mask, pairs.psf_fwhm_arcsec,
        pixel_scale_arcsec=source.simulator_config.pixel_scale_arcsec,
        reference_rms=source.data_config.reference_rms,
    )  # fmt: skip
    return dataclasses.replace(pairs, x=x, image=image, sigma=sigma)


# --- the lenstronomy + emcee baseline -------------------------------------------------------

#: lenstronomy's ``kwargs_params`` key of each keyword list.
_PARAM_GROUPS = {
    "kwargs_lens": "lens_model",
    "kwargs_source": "source_model",
    "kwargs_lens_light": "lens_light_model",
}
#: Keywords lenstronomy solves linearly (not sampled) with ``linear_solver=True``.
_LINEAR_KEYS = frozenset({"amp"})


def _check_observation(observation: Observation, config: SimulatorConfig) -> None:
    if not isinstance(observation, Observation):
        raise TypeError(f"observation must be an Observation, got {type(observation).__name__}")
    if observation.shape != (config.n_pix, config.n_pix):
        raise ValueError(
            f"observation {observation.name!r} has shape {observation.shape} but the config "
            f"has n_pix={config.n_pix}"
        )
    if abs(observation.pixel_scale_arcsec / config.pixel_scale_arcsec - 1) > 1e-3:
        raise ValueError(
            f"observation pixel_scale_arcsec={observation.pixel_scale_arcsec:.6g} differs "
            f"from the config's {config.pixel_scale_arcsec:.6g}"
        )


def likelihood_mask(observation: Observation, config: SimulatorConfig) -> np.ndarray:
    """The pixels lenstronomy's likelihood uses: the observation's mask minus a PSF border.

    lenstronomy's pixel convolution zero-pads the model, so the outer ``psf_pad_pix`` rows
    and columns miss the light scattered in from outside the field (lensflow's simulator
    pads and is exact there). They are excluded.

    Args:
        observation: The data; its ``mask`` is True where a pixel is used.
        config: Grid, supersampling and PSF (the kernel is the observation's).

    Returns:
        Integer mask (1 = used) of shape ``(H, W)``, as lenstronomy's
        ``image_likelihood_mask_list`` expects.
    """
    _check_observation(observation, config)
    mask = observation.mask.cpu().numpy().copy()
    pad = psf_pad_pix(config, psf_kernel=observation.psf)
    if pad > 0:
        border = np.ones_like(mask)
        border[pad:-pad, pad:-pad] = False
        mask[border] = False
    if not mask.any():
        raise ValueError(
            f"no pixel is left after masking a {pad}-pixel PSF border of a {observation.shape} "
            "image; use a larger cutout"
        )
    return mask.astype(int)


#: ``fitting_sequence(border=...)`` choices: ``pad`` puts the data on a grid padded by
#: ``psf_pad_pix`` masked pixels (lenstronomy's model is then exact on every observed pixel,
#: and its likelihood is lensflow's); ``mask`` drops a ``psf_pad_pix`` border of the
#: observed pixels instead (``likelihood_mask``).
BORDERS = ("pad", "mask")


def fit_data(
    observation: Observation, config: SimulatorConfig, border: str = "pad"
) -> tuple[dict[str, Any], np.ndarray]:
    """lenstronomy's ``kwargs_data`` and likelihood mask for fitting an observation.

    With ``border="pad"`` the image, noise map and mask are padded by
    :func:`psf_pad_pix` pixels on each side; the padding is masked (its image is 0 and its
    noise the median of ``sigma``, neither used), so lenstronomy renders the model on the
    padded grid, every observed pixel receives the light scattered in from outside the
    field, and the likelihood runs over exactly the observation's mask, as
    ``LensSimulator.log_likelihood`` does. The grid stays centred on the cutout.
    With ``border="mask"`` the grid is the observation's and :func:`likelihood_mask`
    drops the PSF-wide border (the behaviour before 2026-11-27; on demo_01 it widens the
    lens light's Sersic posteriors by 1.2-1.3x, docs/baselines.md).

    Args:
        observation: Image, noise, native-resolution PSF kernel and mask.
        config: Grid and supersampling; its grid must match the observation's.
        border: One of ``BORDERS``.

    Returns:
        ``kwargs_data`` (``image_data``, ``noise_map`` and the grid) and the integer mask
        (1 = used) on the same grid, of shape ``(n_pix + 2 pad, n_pix + 2 pad)`` with
        ``pad = psf_pad_pix(config, psf_kernel=observation.psf)`` for ``"pad"``, else
        ``(n_pix, n_pix)``.

    Raises:
        ValueError: For an unknown ``border``, a grid mismatch, or (``"mask"``) no pixel
            left inside the border.
        TypeError: If ``observation`` is not an ``Observation``.
    """
    if border not in BORDERS:
        raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
    _check_observation(observation, config)
    image = observation.image.detach().cpu().double().numpy()
    sigma = observation.sigma.detach().cpu().double().numpy()
    if border == "mask":
        mask = likelihood_mask(observation, config)
        pad = 0
    else:
        mask = observation.mask.cpu().numpy().astype(int)  # never empty (Observation)
        pad = psf_pad_pix(config, psf_kernel=observation.psf)
        image = np.pad(image, pad)
        sigma = np.pad(sigma, pad, constant_values=float(np.median(sigma)))
        mask = np.pad(mask, pad)
    kwargs_data = data_configure_simple(config.n_pix + 2 * pad, config.pixel_scale_arcsec,
                                        inverse=False)  # fmt: skip
    kwargs_data["image_data"] = image
    kwargs_data["noise_map"] = sigma
    return kwargs_data, mask


def _box_kwargs(
    specs: Sequence[ParamSpec], attr: str, start: Tensor | None = None
) -> dict[str, list[dict[str, float]]]:
    """Registry values (``prior_low``, centre, ...) as lenstronomy keyword lists; with
    ``attr="start"``, the values of ``start`` ``(D,)`` pulled a hair inside the box."""
    out = {group: [{} for _ in profiles] for group, profiles in _PROFILES.items()}
    for k, (spec, (group, i, key)) in enumerate(zip(specs, _KEYS, strict=True)):
        if key in _LINEAR_KEYS:
            continue
        lo, hi = spec.prior_low, spec.prior_high
        if attr == "start":
            margin = 1e-6 * (hi - lo)
            out[group][i][key] = min(max(float(start[k]), lo + margin), hi - margin)
            continue
        value = {"low": lo, "high": hi, "centre": 0.5 * (lo + hi), "width": hi - lo}[attr]
        out[group][i][key] = value
    return out


def fitting_sequence(
    observation: Observation,
    config: SimulatorConfig,
    *,
    specs: Sequence[ParamSpec] = REGISTRY,
    sigma_scale: float = 0.25,
    use_source_marg: bool = False,
    start: Tensor | None = None,
    border: str = "pad",
) -> FittingSequence:
    """lenstronomy's ``FittingSequence`` of the lensflow model on an observation.

    Model, PSF and supersampling are those of :func:`image_model`; the noise is the
    observation's ``sigma`` as lenstronomy's ``noise_map``; grid, data and likelihood mask
    are :func:`fit_data`'s (by default the data grid padded by masked pixels, so the
    likelihood is lensflow's on every observed pixel). Bounds are the registry's default prior
    box, the start (PSO centre) is the box centre, or ``start``, with
    ``sigma = sigma_scale * width``.
    The two amplitudes are solved linearly at every likelihood call, as lenstronomy does by
    default (19 sampled parameters).

    Args:
        observation: Image, noise, native-resolution PSF kernel and mask.
        config: Supersampling (``upsample_factor``); its grid must match the observation.
        specs: Registry whose ``prior_low``/``prior_high`` give the bounds.
        sigma_scale: Initial spread of the PSO particles and emcee walkers, as a fraction of
            the prior width (lenstronomy multiplies it by the stage's own ``sigma_scale``).
        use_source_marg: Add lenstronomy's marginalization term over the linear amplitudes
            (``source_marg``); off by default, as lenstronomy users run it.
        start: Physical parameters ``(D,)`` (registry order) to centre the PSO on instead
            of the box centre, e.g. an optimizer's result; its amplitudes are ignored (they
            are solved), the rest are pulled a hair inside the box.
        border: How the edge pixels are handled, one of ``BORDERS`` (:func:`fit_data`).

    Returns:
        The configured ``FittingSequence``.

    Raises:
        ValueError: If the observation's grid differs from the config's, every pixel is
            masked, or ``border`` is unknown.
        TypeError: If ``observation`` is not an ``Observation``.
    """
    kwargs_data, mask = fit_data(observation, config, border)
    up = config.upsample_factor
    kernel = fine_psf(config, observation.psf.detach().cpu()).numpy()
    kwargs_psf: dict[str, Any] = (
        {"psf_type": "NONE"}
        if kernel.shape == (1, 1)
        else {"psf_type": "PIXEL", "kernel_point_source": kernel,
              "point_source_supersampling_factor": up}
    )  # fmt: skip
    kwargs_numerics = {
        "supersampling_factor": up,
        "supersampling_convolution": up > 1,
        "supersampling_kernel_size": None,
    }
    kwargs_model = {
        "lens_model_list": _PROFILES["kwargs_lens"],
        "source_light_model_list": _PROFILES["kwargs_source"],
        "lens_light_model_list": _PROFILES["kwargs_lens_light"],
    }
    init = _box_kwargs(specs, "centre") if start is None else _box_kwargs(specs, "start", start)
    width = _box_kwargs(specs, "width")
    low, high = _box_kwargs(specs, "low"), _box_kwargs(specs, "high")
    fixed: dict[str, list[dict[str, float]]] = {g: [{} for _ in p] for g, p in _PROFILES.items()}
    for (group, i), values in _FIXED.items():
        fixed[group][i].update(values)
    kwargs_params = {
        _PARAM_GROUPS[g]: [
            init[g],
            [{k: sigma_scale * v for k, v in d.items()} for d in width[g]],
            fixed[g],
            low[g],
            high[g],
        ]
        for g in _PROFILES
    }
    with contextlib.redirect_stdout(io.StringIO()):
        return FittingSequence(
            {"multi_band_list": [[kwargs_data, kwargs_psf, kwargs_numerics]],
             "multi_band_type": "single-band"},
            kwargs_model,
            {"linear_solver": True},
            {"check_bounds": True, "image_likelihood_mask_list": [mask],
             "source_marg": use_source_marg, "check_positive_flux": False},
            kwargs_params,
        )  # fmt: skip


@dataclass(frozen=True)
class LenstronomyResult:
    """Samples and convergence of :func:`run_lenstronomy`.

    Attributes:
        samples: Post-burn-in emcee chain in registry names and units, flattened step-major
            (``N = n_run * n_walkers``), ``method="lenstronomy"``, ``log_prob=None``. Each
            sample's two amplitudes are a draw from their conditional Gaussian given its
            non-linear parameters (lenstronomy's weighted least-squares solution and
            covariance).
        diagnostics: Autocorrelation times (of the 21 registry columns), acceptance,
            convergence flag and the emcee stage's wall time.
        log_likelihood: lenstronomy's log-likelihood of each sample, ``-chi2 / 2`` at the
            best-fit amplitudes (plus the marginalization term with ``use_source_marg``),
            shape ``(N,)``.
        best_fit: PSO result with its best-fit amplitudes, physical ``theta`` ``(D,)``.
        pso_wall_time_s: Wall time of the PSO stage, in seconds.
    """

    samples: PosteriorSamples
    diagnostics: EnsembleDiagnostics
    log_likelihood: Tensor
    best_fit: Tensor
    pso_wall_time_s: float


@contextlib.contextmanager
def _seeded_numpy(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG (lenstronomy's PSO and emcee use it) and restore it after."""
    # lenstronomy draws from the legacy global RNG; there is no generator to pass it.
    state = np.random.get_state()  # noqa: NPY002
    np.random.seed(seed)  # noqa: NPY002
    try:
        yield
    finally:
        np.random.set_state(state)  # noqa: NPY002


class _AmplitudeSolver:
    """lenstronomy's linear amplitude solve on the fitting sequence's data, PSF and mask."""

    def __init__(self, observation: Observation, config: SimulatorConfig, border: str) -> None:
        fs_data, mask = fit_data(observation, config, border)
        template = image_model(config, psf_kernel=observation.psf.detach().cpu())
        self._fit = ImageLinearFit(
            ImageData(**fs_data),
            template.PSF,
            LensModel(_PROFILES["kwargs_lens"]),
            LightModel(_PROFILES["kwargs_source"]),
            LightModel(_PROFILES["kwargs_lens_light"]),
            kwargs_numerics={
                "supersampling_factor": config.upsample_factor,
                "supersampling_convolution": config.upsample_factor > 1,
                "supersampling_kernel_size": None,
            },
            likelihood_mask=mask,
        )

    def solve(self, kwargs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Best-fit ``[source_amp, lens_light_amp]`` and their covariance."""
        _, _, cov, param = self._fit.image_linear_solve(
            kwargs["kwargs_lens"], kwargs["kwargs_source"], kwargs["kwargs_lens_light"],
            inv_bool=True,
        )  # fmt: skip
        return np.asarray(param, dtype=np.float64), np.asarray(cov, dtype=np.float64)


def _to_theta(kwargs: dict[str, Any], amplitudes: np.ndarray) -> np.ndarray:
    """lenstronomy's non-linear keyword lists plus ``[source, lens light]`` amplitudes."""
    source = [{**kwargs["kwargs_source"][0], "amp": float(amplitudes[0])}]
    lens_light = [{**kwargs["kwargs_lens_light"][0], "amp": float(amplitudes[1])}]
    return from_lenstronomy(LenstronomyKwargs(kwargs["kwargs_lens"], source, lens_light))


def run_lenstronomy(
    observation: Observation,
    config: SimulatorConfig,
    *,
    n_particles: int = 200,
    n_iterations: int = 400,
    n_walkers: int = 64,
    n_run: int = 1000,
    n_burn: int = 500,
    sigma_scale: float = 0.25,
    mcmc_sigma_scale: float = 0.01,
    tol: float = 50.0,
    use_source_marg: bool = False,
    use_progress: bool = False,
    max_samples: int | None = None,
    start: Tensor | None = None,
    rng: np.random.Generator | None = None,
    border: str = "pad",
) -> LenstronomyResult:
    """lenstronomy + emcee as a lenstronomy user runs it: ``FittingSequence`` PSO, then emcee.

    The amplitudes are solved linearly by lenstronomy at every likelihood call, so the
    chain holds the 19 non-linear parameters; each sample's amplitudes are then drawn from
    their conditional Gaussian (the weighted least-squares solution and its covariance), a
    flat-amplitude-prior completion of the sample. lenstronomy's stdout chatter (and, without
    ``use_progress``, the PSO progress bar on stderr) is swallowed.

    Args:
        observation: Image, noise, native-resolution PSF kernel and mask (float64 used).
        config: Supersampling (``upsample_factor``); grid equal to the observation's.
        n_particles: PSO particles (>= 1). On the 16x16 test mock, 100 particles x 200
            iterations from the box centre ended in a mode 6000 nats below the truth's;
            200 x 400 found the best mode.
        n_iterations: PSO iterations (>= 1).
        n_walkers: emcee walkers (>= 2 x 19 sampled parameters).
        n_run: Kept emcee steps per walker (>= 2).
        n_burn: Discarded emcee burn-in steps.
        sigma_scale: PSO start spread, fraction of the prior width (around the box centre).
        mcmc_sigma_scale: Walker ball around the PSO result, in units of the PSO spread.
        tol: Convergence rule ``n_run >= tol * max(tau)``.
        use_source_marg: lenstronomy's ``source_marg`` (amplitude marginalization term).
        use_progress: Show emcee's progress bar.
        max_samples: Optional cap on the returned samples. The amplitude completion (one
            linear solve with covariance per distinct chain position, about twice a
            likelihood call) then runs only on every ``k``-th step of the chain, all walkers,
            with ``k = ceil(n_run * n_walkers / max_samples)``, and tau comes from that
            thinned chain in units of full steps (``ensemble_diagnostics(thin=k)``). None:
            every step is completed and returned.
        start: Physical parameters ``(D,)`` to centre the PSO on (``fitting_sequence``);
            None: the prior-box centre. On demo_01 (64 x 64) a 200 x 400 PSO from the box
            centre ended in another mode with three seeds (docs/benchmarks.md).
        rng: numpy generator; seeds numpy's global RNG (restored afterwards) for
            lenstronomy's PSO and emcee.
        border: Edge pixels, one of ``BORDERS`` (:func:`fit_data`): ``"pad"`` (default)
            samples lensflow's likelihood over every observed pixel; ``"mask"`` drops a
            PSF-wide border (a wider posterior).

    Returns:
        Samples (``method="lenstronomy"``), diagnostics, log-likelihoods and the PSO fit.

    Raises:
        ValueError: For a grid mismatch, too few walkers, bad counts or an unknown
            ``border``.
        TypeError: If ``observation`` is not an ``Observation``.
    """
    if border not in BORDERS:
        raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
    n_sampled = sum(key not in _LINEAR_KEYS for _, _, key in _KEYS)
    if n_walkers < 2 * n_sampled or n_walkers % 2:
        raise ValueError(
            f"n_walkers must be even and >= 2 x {n_sampled} sampled parameters = "
            f"{2 * n_sampled}, got {n_walkers}"
        )
    if min(n_particles, n_iterations) < 1 or n_run < 2 or n_burn < 0:
        raise ValueError(
            f"need n_particles, n_iterations >= 1, n_run >= 2, n_burn >= 0; got "
            f"{n_particles}, {n_iterations}, {n_run}, {n_burn}"
        )
    if max_samples is not None and max_samples < n_walkers:
        raise ValueError(f"max_samples must be >= n_walkers = {n_walkers}, got {max_samples}")
    thin = 1 if max_samples is None else max(1, math.ceil(n_run * n_walkers / max_samples))
    if start is not None and tuple(start.shape) != (len(NAMES),):
        raise ValueError(f"start must have shape ({len(NAMES)},), got {tuple(start.shape)}")
    fs = fitting_sequence(observation, config, sigma_scale=sigma_scale,
                          use_source_marg=use_source_marg, start=start,
                          border=border)  # fmt: skip
    solver = _AmplitudeSolver(observation, config, border)
    rng = rng if rng is not None else np.random.default_rng()
    with (
        _seeded_numpy(int(rng.integers(2**32))),
        contextlib.redirect_stdout(io.StringIO()),
        # PSO's tqdm bar goes to stderr whatever ``progress`` says.
        contextlib.redirect_stderr(io.StringIO())
        if not use_progress
        else contextlib.nullcontext(),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", "`axes` should not be `None`", DeprecationWarning)
        t0 = time.perf_counter()
        fs.fit_sequence([["PSO", {"sigma_scale": 1.0, "n_particles": n_particles,
                                  "n_iterations": n_iterations}]])  # fmt: skip
        t1 = time.perf_counter()
        best_kwargs = fs.best_fit(bijective=True)  # the PSO result (emcee overwrites it)
        chain_list = fs.fit_sequence([["emcee", {
            "n_burn": n_burn, "n_run": n_run, "n_walkers": n_walkers,
            "sigma_scale": mcmc_sigma_scale, "progress": use_progress,
        }]])  # fmt: skip
        t2 = time.perf_counter()
        _, flat, _, log_like = chain_list[-1]
        best_fit = _to_theta(best_kwargs, solver.solve(best_kwargs)[0])
        kept = flat.reshape(n_run, n_walkers, -1)[::thin].reshape(-1, flat.shape[-1])
        theta = np.empty((len(kept), len(NAMES)))
        last: dict[int, tuple[np.ndarray, dict[str, Any], np.ndarray, np.ndarray]] = {}
        for j, args in enumerate(kept):
            walker = j % n_walkers  # emcee's flat chain is step-major
            if walker in last and np.array_equal(last[walker][0], args):
                # A rejected move repeats the position: reuse its solve, draw afresh.
                _, kwargs, mean, cov = last[walker]
            else:
                kwargs = fs.param_class.args2kwargs(args, bijective=True)
                mean, cov = solver.solve(kwargs)
                last[walker] = (args, kwargs, mean, cov)
            theta[j] = _to_theta(kwargs, rng.multivariate_normal(mean, cov))
    chain = theta.reshape(-1, n_walkers, len(NAMES))
    # emcee keeps a walker in place when it rejects, so a move is an acceptance.
    moved = np.any(np.diff(flat.reshape(n_run, n_walkers, -1), axis=0) != 0, axis=-1)
    diagnostics = ensemble_diagnostics(chain, n_burn=n_burn, acceptance_fraction=moved.mean(),
                                       tol=tol, wall_time_s=t2 - t1, thin=thin,
                                       n_run=n_run)  # fmt: skip
    samples = PosteriorSamples(theta=torch.from_numpy(theta), names=NAMES, log_prob=None,
                               method="lenstronomy")  # fmt: skip
    return LenstronomyResult(
        samples=samples,
        diagnostics=diagnostics,
        log_likelihood=torch.from_numpy(np.asarray(log_like, dtype=np.float64)),
        best_fit=torch.from_numpy(best_fit),
        pso_wall_time_s=t1 - t0,
    )
