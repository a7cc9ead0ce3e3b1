"""Stage 2: the differentiable lens simulator (caustics), its noise model and likelihood.

``LensSimulator`` maps physical parameters ``theta`` ``(B, 21)`` (columns
``params.NAMES``) to noiseless images ``(B, H, W)`` with caustics' ``LensSource``: SIE +
external shear deflecting an elliptical Sersic source, plus elliptical Sersic lens light.

Conventions (docs/conventions.md):

* Images are in lenstronomy's units: surface brightness integrated over the pixel, i.e.
  flux per pixel (caustics returns the pixel-mean surface brightness; we multiply by the
  pixel area). ``*_amp`` parameters are surface brightness in image units per arcsec^2.
* ``image[row = y, col = x]``; pixel centres at ``(i - (n - 1) / 2) * pixel_scale_arcsec``
  (no pixel at 0 for even ``n``), +x to the right, +y up; identical to lenstronomy's
  ``data_configure_simple(..., inverse=False)`` grid.
* Supersampling: the model is evaluated on an ``upsample_factor``-times finer grid, padded
  by half the PSF, convolved with the PSF *at the fine resolution*, then average-pooled
  (lenstronomy's ``supersampling_convolution=True``).
* Sersic ``b_n = 1.9992 n - 0.3271`` (caustics ``use_lenstronomy_k=True``).

References:
    Stone et al. 2024, "caustics: a Python package for accelerated strong gravitational
    lensing simulations", JOSS 9(103), 7081.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import caustics
import torch
from torch import Tensor, nn

from lensflow.config import SimulatorConfig
from lensflow.params import CAUSTICS_ORDER, NAMES, to_caustics

__all__ = [
    "LensSimulator",
    "NoiseModel",
    "chi2",
    "fine_psf",
    "gaussian_psf",
    "log_likelihood",
    "supersample_psf",
]


def gaussian_psf(
    fwhm_arcsec: float,
    pixel_scale_arcsec: float,
    *,
    truncation: float = 4.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """A pixel-centre-sampled circular Gaussian PSF kernel, normalized to unit sum.

    Args:
        fwhm_arcsec: Full width at half maximum, in arcsec (> 0).
        pixel_scale_arcsec: Pixel side of the kernel grid, in arcsec.
        truncation: Kernel half-width in units of sigma (lenstronomy's ``truncation``).
        dtype: Floating dtype of the kernel.

    Returns:
        Kernel of shape ``(k, k)`` with ``k`` odd, ``k = 2 * ceil(truncation * sigma /
        pixel_scale_arcsec) + 1``.

    Example:
        >>> k = gaussian_psf(0.1, 0.05)
        >>> k.shape, round(float(k.sum()), 6)
        (torch.Size([9, 9]), 1.0)
    """
    if fwhm_arcsec <= 0 or pixel_scale_arcsec <= 0:
        raise ValueError(
            f"gaussian_psf needs positive FWHM and pixel scale, got "
            f"{fwhm_arcsec!r} and {pixel_scale_arcsec!r}"
        )
    sigma = fwhm_arcsec / (2 * math.sqrt(2 * math.log(2))) / pixel_scale_arcsec  # pixels
    half = max(1, math.ceil(truncation * sigma))
    r = torch.arange(-half, half + 1, dtype=dtype)
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def supersample_psf(kernel: Tensor, factor: int) -> Tensor:
    """Resample a pixel PSF kernel onto a ``factor``-times finer grid (bilinear, renormalized).

    Caustics convolves at the supersampled resolution, so a kernel measured at the native
    pixel scale (a FITS PSF) must be brought to that grid. Bilinear interpolation of the
    native kernel is an approximation: it smooths the kernel by about one fine pixel. A
    kernel measured at the fine resolution should be passed with ``factor=1``.

    Args:
        kernel: Native-resolution kernel, shape ``(k, k)``, ``k`` odd.
        factor: Supersampling factor (>= 1).

    Returns:
        Kernel of shape ``(m, m)``, ``m = k * factor`` made odd, summing to 1, centred on
        the same point as the input.
    """
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
        raise ValueError(f"PSF kernel must be square and odd-sized, got {tuple(kernel.shape)}")
    if factor == 1:
        return kernel / kernel.sum()
    k = kernel.shape[0]
    m = k * factor + (1 - factor % 2)
    # Fine-pixel centres in units of native pixels, centred on the kernel's central pixel.
    pos = (torch.arange(m, dtype=kernel.dtype, device=kernel.device) - (m - 1) / 2) / factor
    grid_1d = pos / ((k - 1) / 2)  # normalized coordinates for grid_sample, align_corners
    gy, gx = torch.meshgrid(grid_1d, grid_1d, indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None]
    fine = torch.nn.functional.grid_sample(
        kernel[None, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )[0, 0].clamp_min(0)
    return fine / fine.sum()


def fine_psf(config: SimulatorConfig, psf_kernel: Tensor | None = None) -> Tensor:
    """The PSF kernel the simulator convolves with, at the supersampled pixel scale.

    Args:
        config: Pixel grid, supersampling and Gaussian FWHM (used without ``psf_kernel``).
        psf_kernel: Optional kernel at the native pixel scale, shape ``(k, k)``, ``k`` odd.

    Returns:
        Kernel of unit sum, float64, shape ``(m, m)`` with ``m`` odd; ``(1, 1)`` ones (no
        PSF) when ``config.psf_fwhm_arcsec == 0`` and no kernel is given.
    """
    up = config.upsample_factor
    if psf_kernel is not None:
        return supersample_psf(torch.as_tensor(psf_kernel, dtype=torch.float64), up)
    if config.psf_fwhm_arcsec > 0:
        return gaussian_psf(config.psf_fwhm_arcsec, config.pixel_scale_arcsec / up,
                            truncation=config.psf_truncation)  # fmt: skip
    return torch.ones(1, 1, dtype=torch.float64)  # caustics' "no PSF"


class LensSimulator(nn.Module):
    """Noiseless SIE + shear + Sersic source + Sersic lens light images from caustics.

    Args:
        config: Pixel grid, supersampling and PSF (``config.psf_fwhm_arcsec``).
        psf_kernel: Optional pixel PSF kernel at the *native* pixel scale, shape ``(k, k)``
            with ``k`` odd; replaces the Gaussian. Normalized internally.
        dtype: Floating dtype of the simulation.
        device: Device of the simulation.
        chunk_size: Images simulated per vmap chunk. ``None`` picks one: on CPU, chunks whose
            intermediates stay under 16 MiB (glibc serves larger allocations with fresh
            mmap'ed pages, which made batch 1000 4-5x slower per image than batch 100; see
            docs/benchmarks.md); on GPU, the whole batch.

    Example:
        >>> from lensflow.config import preset
        >>> from lensflow.prior import Prior
        >>> sim = LensSimulator(preset("euclid"))
        >>> sim(Prior().sample((2,))).shape
        torch.Size([2, 64, 64])
    """

    def __init__(
        self,
        config: SimulatorConfig,
        psf_kernel: Tensor | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        up = config.upsample_factor
        psf = fine_psf(config, psf_kernel)
        with warnings.catch_warnings():
            # caustics' FlatLambdaCDM triggers a NumPy 2 __array_wrap__ DeprecationWarning.
            warnings.simplefilter("ignore", DeprecationWarning)
            cosmo = caustics.FlatLambdaCDM(name="cosmo")
        sie = caustics.SIE(cosmology=cosmo, name="sie")
        # The shear centre only adds a constant deflection degenerate with source position.
        shear = caustics.ExternalShear(cosmology=cosmo, name="shear", x0=0.0, y0=0.0)
        # Redshifts do not affect images in the Rein parametrization; they are placeholders.
        lens = caustics.SinglePlane(
            cosmology=cosmo, lenses=[sie, shear], z_l=0.5, z_s=1.0, name="lens"
        )
        source = caustics.Sersic(name="source", use_lenstronomy_k=True)
        lens_light = caustics.Sersic(name="lens_light", use_lenstronomy_k=True)
        self.caustics_sim = caustics.LensSource(
            lens=lens,
            source=source,
            lens_light=lens_light,
            pixelscale=config.pixel_scale_arcsec,
            pixels_x=config.n_pix,
            psf=psf.to(dtype),
            upsample_factor=up,
            name="sim",
        )
        self.caustics_sim.to(device=torch.device(device), dtype=dtype)
        # caustics.utils.meshgrid builds the pixel grid in float32 whatever the dtype, and
        # .to(float64) only upcasts the rounded values (0.1 -> 0.09999997, 5e-6 of peak in
        # the lenstronomy parity tests). Rebuild it in float64. Private caustics attributes:
        # valid for caustics 1.7 with quad_level=None (pinned in pyproject, tested in parity).
        cs = self.caustics_sim
        gx, gy = caustics.utils.meshgrid(
            config.pixel_scale_arcsec / up, *cs._n_pix, dtype=torch.float64
        )
        cs._grid = tuple(g[..., None].to(device=device, dtype=dtype) for g in (gx, gy))
        self.register_buffer("psf", psf.to(device=device, dtype=dtype), persistent=False)
        if chunk_size is None and torch.device(device).type == "cpu":
            n_fine = config.n_pix * up + psf.shape[0] - 1  # caustics' PSF-padded fine grid
            chunk_size = max(16, 2**24 // (n_fine**2 * torch.finfo(dtype).bits // 8))
        self.chunk_size = chunk_size
        self._pixel_area = config.pixel_scale_arcsec**2
        self._dtype = dtype
        self._check_param_order()

    def _check_param_order(self) -> None:
        # vmap passes a flat list of tensors; its order must be caustics' parameter order.
        order = tuple(s.strip() for s in self.caustics_sim.param_order().split(","))
        expected = tuple(n.replace(".", ": ") for n in CAUSTICS_ORDER)
        if order != expected:
            raise RuntimeError(f"caustics parameter order {order} differs from {expected}")

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the simulated images."""
        return (self.config.n_pix, self.config.n_pix)

    def forward(self, theta: Tensor) -> Tensor:
        """Simulate noiseless images.

        Args:
            theta: Physical parameters, shape ``(B, 21)`` or ``(21,)``, columns
                ``params.NAMES``, units per registry.

        Returns:
            Images in flux per pixel (image units), shape ``(B, H, W)`` or ``(H, W)``.
        """
        if theta.shape[-1] != len(NAMES):
            raise ValueError(
                f"theta must have {len(NAMES)} columns ({', '.join(NAMES)}), "
                f"got shape {tuple(theta.shape)}"
            )
        single = theta.ndim == 1
        batch = theta.reshape(-1, theta.shape[-1]).to(self._dtype)
        cols = list(to_caustics(batch).values())
        images = torch.vmap(self.caustics_sim, chunk_size=self.chunk_size)(cols)
        images = images * self._pixel_area
        return images[0] if single else images.reshape(*theta.shape[:-1], *self.image_shape)

    def source_plane(self, theta: Tensor, *, centered: bool = True) -> Tensor:
        """The unlensed source light on the image's pixel grid (no PSF, no supersampling).

        Args:
            theta: Physical parameters, shape ``(21,)``, columns ``params.NAMES``.
            centered: Centre the grid on the source centre (else on the optical axis).

        Returns:
            Source-plane surface brightness times pixel area (flux per pixel), shape
            ``(H, W)``, on a grid of the image's pixel scale; with ``centered`` the
            source centre sits at the grid centre.
        """
        if theta.ndim != 1 or theta.shape[0] != len(NAMES):
            raise ValueError(f"theta must have shape ({len(NAMES)},), got {tuple(theta.shape)}")
        values = to_caustics(theta.to(self._dtype))
        params = torch.stack([values[f"source.{k}"] for k in ("x0", "y0", "q", "phi", "n",
                                                                "Re", "Ie")])  # fmt: skip
        n, s = self.config.n_pix, self.config.pixel_scale_arcsec
        axis = (torch.arange(n, dtype=self._dtype, device=params.device) - (n - 1) / 2) * s
        gx, gy = torch.meshgrid(axis, axis, indexing="xy")
        if centered:
            gx, gy = gx + params[0], gy + params[1]
        return self.caustics_sim.source.brightness(gx, gy, params) * self._pixel_area

    def log_likelihood(
        self, theta: Tensor, x_obs: Tensor, sigma: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        """Gaussian log-likelihood of an observed image given parameters, batched.

        Args:
            theta: Physical parameters, shape ``(B, 21)`` or ``(21,)``.
            x_obs: Observed image, shape ``(H, W)``, flux per pixel.
            sigma: Per-pixel noise std, shape ``(H, W)``, > 0.
            mask: Optional bool mask ``(H, W)``; True = pixel used.

        Returns:
            Log-likelihood, shape ``(B,)`` or ``()`` (see :func:`log_likelihood`).
        """
        return log_likelihood(self(theta), x_obs, sigma, mask)


@dataclass(frozen=True)
class NoiseModel:
    """Per-pixel Gaussian noise: background + Poisson (Gaussian approximation), or a map.

    The variance of pixel ``i`` is ``background_rms**2 + max(model_i, 0) / exposure_time_s``
    when ``sigma_map`` is ``None``, else ``sigma_map_i**2``.

    Attributes:
        background_rms: Background noise per pixel, in image units.
        exposure_time_s: Exposure time for the Poisson term (image units are ct/s per
            pixel); ``inf`` disables it.
        sigma_map: Optional fixed per-pixel noise, shape ``(H, W)``, image units.
    """

    background_rms: float = 0.006
    exposure_time_s: float = math.inf
    sigma_map: Tensor | None = None

    @classmethod
    def from_config(cls, config: SimulatorConfig) -> NoiseModel:
        """The noise model of a simulator configuration (background + Poisson)."""
        return cls(background_rms=config.background_rms, exposure_time_s=config.exposure_time_s)

    def sigma(self, model: Tensor) -> Tensor:
        """Per-pixel noise standard deviation for noiseless images ``model``.

        Args:
            model: Noiseless images, shape ``(..., H, W)``, image units.

        Returns:
            Noise sigma, shape ``(..., H, W)``, image units.
        """
        if self.sigma_map is not None:
            return self.sigma_map.to(model).expand_as(model)
        var = torch.full_like(model, self.background_rms**2)
        if math.isfinite(self.exposure_time_s):
            var = var + model.clamp_min(0) / self.exposure_time_s
        return var.sqrt()

    def sample(self, model: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw a noisy realization of ``model``.

        Args:
            model: Noiseless images, shape ``(..., H, W)``, image units.
            generator: Optional torch generator on ``model``'s device.

        Returns:
            Noisy images, same shape and units.
        """
        eps = torch.randn(model.shape, generator=generator, dtype=model.dtype, device=model.device)
        return model + self.sigma(model) * eps


def chi2(model: Tensor, x_obs: Tensor, sigma: Tensor, mask: Tensor | None = None) -> Tensor:
    """Chi-square of model images against an observation.

    Args:
        model: Model images, shape ``(B, H, W)`` or ``(H, W)``, image units.
        x_obs: Observed image, shape broadcastable to ``model``.
        sigma: Per-pixel noise std, broadcastable to ``model``, image units, > 0.
        mask: Optional bool mask broadcastable to ``model``; True = pixel used.

    Returns:
        ``sum(((model - x_obs) / sigma)**2)`` over used pixels, shape ``(B,)`` or ``()``.
    """
    r2 = ((model - x_obs) / sigma) ** 2
    if mask is not None:
        r2 = torch.where(mask, r2, torch.zeros_like(r2))
    return r2.sum(dim=(-2, -1))


def log_likelihood(
    model: Tensor, x_obs: Tensor, sigma: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Gaussian log-likelihood of an observation given model images.

    Args:
        model: Model images, shape ``(B, H, W)`` or ``(H, W)``, image units.
        x_obs: Observed image, broadcastable to ``model``.
        sigma: Per-pixel noise std, broadcastable to ``model``, > 0.
        mask: Optional bool mask; True = pixel used.

    Returns:
        ``-chi2 / 2 - sum(log sigma) - n log(2 pi) / 2`` over used pixels, shape ``(B,)``
        or ``()``.
    """
    log_sigma = torch.log(sigma).expand_as(model)
    n = torch.ones_like(model)
    if mask is not None:
        log_sigma = torch.where(mask, log_sigma, torch.zeros_like(log_sigma))
        n = torch.where(mask, n, torch.zeros_like(n))
    norm = log_sigma.sum(dim=(-2, -1)) + 0.5 * math.log(2 * math.pi) * n.sum(dim=(-2, -1))
    return -0.5 * chi2(model, x_obs, sigma, mask) - norm
