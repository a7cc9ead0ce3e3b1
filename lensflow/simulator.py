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
    "pad_psf",
    "pool_psf",
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


def _bspline_weight(x: Tensor) -> Tensor:
    """The cubic B-spline at offsets ``x`` (in node spacings): positive, C^2, support +-2."""
    x = x.abs()
    near = 2 / 3 - x * x + 0.5 * x**3
    far = (2 - x).clamp_min(0) ** 3 / 6
    return torch.where(x < 1, near, far)


def _pooling_taps(factor: int) -> tuple[tuple[int, float], ...]:
    """1-D weights ``(fine offset, weight)`` of one native pixel on a centred fine kernel.

    They give the native pixel's response, ``sum_a w_a * fine[p * factor + a]``, to a point
    source at the centre of the native pixel ``p`` pixels away (the effective native PSF).
    Odd ``factor``: that centre is a fine-pixel centre and the response is the block sum of
    the ``factor`` fine pixels of native pixel ``p``. Even ``factor``: the native centre is
    a fine-pixel *corner*, so the point is split over the four fine pixels at +-1/2 and
    +-3/2 fine pixels with the cubic half-pixel weights ``(-1, 9, 9, -1) / 16`` before the
    block sum (they reproduce quadratics, so they add no variance; a bilinear half/half
    split, as lenstronomy's ``averaging_even_kernel``, adds 1/4 fine pixel^2).
    """
    block = [a - (factor - 1) / 2 for a in range(factor)]  # fine-pixel centres, native centre 0
    split = ((0.0, 1.0),) if factor % 2 else ((-1.5, -1 / 16), (-0.5, 9 / 16),
                                               (0.5, 9 / 16), (1.5, -1 / 16))  # fmt: skip
    taps: dict[int, float] = {}
    for b in block:
        for s, w in split:
            taps[round(b + s)] = taps.get(round(b + s), 0.0) + w
    return tuple(sorted(taps.items()))


def _pooling_matrix(n_native: int, n_fine: int, factor: int, like: Tensor) -> Tensor:
    """``(n_native, n_fine)`` matrix of :func:`_pooling_taps`; both grids odd and centred."""
    pool = like.new_zeros(n_native, n_fine)
    for p in range(n_native):
        centre = (p - (n_native - 1) // 2) * factor + (n_fine - 1) // 2
        for a, w in _pooling_taps(factor):
            if 0 <= centre + a < n_fine:
                pool[p, centre + a] += w
    return pool


def pool_psf(kernel: Tensor, factor: int) -> Tensor:
    """The effective native-pixel PSF of a kernel at the supersampled resolution.

    This is what ``LensSimulator`` does to a point source at a native pixel centre:
    convolve with ``kernel`` at the fine resolution, then sum each native pixel's
    ``factor x factor`` fine pixels (the simulator's average-pooling, normalized to unit
    sum). For an even ``factor`` the native centre falls on a fine-pixel corner; see
    :func:`supersample_psf` for the convention. :func:`supersample_psf` inverts it:
    ``pool_psf(supersample_psf(k, f), f)`` is ``k``, plus one ring of native pixels that
    holds the light scattered beyond ``k``'s support (measured <= 5e-4 of the peak).

    Args:
        kernel: Kernel at the fine pixel scale, shape ``(m, m)``, ``m`` odd, centred on its
            central pixel, indexed ``[row = y, col = x]``.
        factor: Supersampling factor (>= 1).

    Returns:
        Native-resolution kernel, shape ``(n, n)`` with ``n`` odd, large enough to hold
        every native pixel the fine kernel reaches, summing to ``kernel.sum()``.

    Example:
        >>> fine = gaussian_psf(0.2, 0.05)
        >>> pool_psf(fine, 2).shape, round(float(pool_psf(fine, 2).sum()), 6)
        (torch.Size([9, 9]), 1.0)
    """
    _check_kernel(kernel, factor)
    if factor == 1:
        return kernel.clone()
    m = kernel.shape[0]
    reach = max(abs(a) for a, _ in _pooling_taps(factor))
    n = 2 * (((m - 1) // 2 + reach) // factor) + 1
    pool = _pooling_matrix(n, m, factor, kernel)
    return pool @ kernel @ pool.T


def _check_kernel(kernel: Tensor, factor: int) -> None:
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
        raise ValueError(f"PSF kernel must be square and odd-sized, got {tuple(kernel.shape)}")
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"supersampling factor must be an integer >= 1, got {factor!r}")


def supersample_psf(kernel: Tensor, factor: int) -> Tensor:
    """The fine-grid kernel whose effective native-pixel PSF is a given native kernel.

    PSF kernels of real data are at the native pixel scale and pixel-integrated (a star's
    image). ``LensSimulator`` convolves at a ``factor``-times finer scale and then
    average-pools each native pixel, so the fine kernel must not contain the native pixel
    box a second time: it is built so that :func:`pool_psf` (fine convolution + pooling of
    a point at a native pixel centre) gives back ``kernel`` exactly. Interpolating the
    native kernel instead (bilinear, the former behaviour) turned a native Gaussian of FWHM
    0.200" into a fine kernel of 0.217" (second moments, 0.1"/px, ``factor`` 2).

    Method (the problem of lenstronomy's ``kernel_util.subgrid_kernel``, solved exactly
    instead of with its 5 fixed-point iterations and bilinear steps): the fine kernel is a
    cubic B-spline surface with one coefficient per native pixel, ``fine = B u B^T`` (``B``
    the ``(m, n)`` spline basis at the fine pixel centres, knots at the native pixel
    centres). Pooling is a matrix ``P`` (:func:`pool_psf`), so ``P B u B^T P^T = kernel``
    is solved for ``u`` with the ``n x n`` matrix ``C = P B`` (condition number 4.1-4.8 for
    factors 2-4 and kernels of 9-61 pixels). Both maps are separable, so any kernel
    (elongated, off-centre, asymmetric) is handled, and both reproduce linear functions, so
    the centroid is kept. The smooth spline beat an interpolating (Keys) cubic basis on
    images: rendering with the native PSF of a fine-Gaussian mock reproduces the mock to
    <= 2.0e-3 of the peak (Keys: 3.6e-3; bilinear resampling: 9.5e-2).

    Convention: the fine kernel is odd-sized and centred on its central fine pixel, which
    sits at the native kernel's centre. For odd ``factor`` that is the centre of a native
    pixel's central fine pixel. For even ``factor`` the simulator's native pixel centres
    fall on fine-pixel corners; the native kernel is matched to the response to a point at
    the native centre split over the 4 x 4 nearest fine pixels with cubic half-pixel weights
    ``(-1, 9, 9, -1) / 16`` per axis, which reproduce quadratics and so add no variance. A
    bilinear half/half split (lenstronomy's ``averaging_even_kernel``) adds 1/4 fine
    pixel^2 of variance, and matching it made the fine kernel 4-5% too narrow in FWHM.

    Args:
        kernel: Native-resolution kernel, shape ``(k, k)``, ``k`` odd, centred on its
            central pixel, indexed ``[row = y, col = x]``; normalized here.
        factor: Supersampling factor (>= 1). ``factor = 1`` returns the normalized kernel.

    Returns:
        Kernel of shape ``(m, m)``, ``m = k * factor`` made odd (``+1`` for even
        ``factor``), summing to 1, same dtype and device. It can have small negative lobes,
        as an exact deconvolution of the pixel box can: measured >= -3.5e-3 of the peak for
        Gaussians of FWHM 1.4-2.4 native pixels, -3.6e-3 and -2.4e-4 for the Euclid Q1
        and HST PSFs in shared/data/real_lenses.

    Raises:
        ValueError: For a non-square or even-sized kernel, or a bad factor.

    Example:
        >>> native = gaussian_psf(0.2, 0.1)
        >>> fine = supersample_psf(native, 2)
        >>> error = (pool_psf(fine, 2)[1:-1, 1:-1] - native).abs().max() / native.max()
        >>> fine.shape, bool(error < 1e-3)
        (torch.Size([19, 19]), True)
    """
    _check_kernel(kernel, factor)
    native = kernel / kernel.sum()
    if factor == 1:
        return native
    n = native.shape[0]
    m = n * factor + (1 - factor % 2)
    fine_pos = (torch.arange(m, dtype=native.dtype, device=native.device) - (m - 1) / 2) / factor
    node_pos = torch.arange(n, dtype=native.dtype, device=native.device) - (n - 1) / 2
    interp = _bspline_weight(fine_pos[:, None] - node_pos[None, :])  # (m, n)
    coupling = _pooling_matrix(n, m, factor, native) @ interp  # (n, n)
    u = torch.linalg.solve(coupling, torch.linalg.solve(coupling, native).T).T
    fine = interp @ u @ interp.T
    return fine / fine.sum()


def fine_psf(config: SimulatorConfig, psf_kernel: Tensor | None = None) -> Tensor:
    """The PSF kernel the simulator convolves with, at the supersampled pixel scale.

    Args:
        config: Pixel grid, supersampling and Gaussian FWHM (used without ``psf_kernel``).
        psf_kernel: Optional kernel at the native pixel scale, shape ``(k, k)``, ``k`` odd,
            pixel-integrated (as a PSF model or a star gives it); brought to the fine grid by
            :func:`supersample_psf`, so the simulator's effective native PSF is this kernel.

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


def pad_psf(kernel: Tensor, side: int) -> Tensor:
    """Zero-pad a centred odd kernel ``(k, k)`` to ``(side, side)``, keeping its centre.

    Args:
        kernel: PSF kernel, shape ``(k, k)``, ``k`` odd.
        side: Target side, odd and ``>= k``.

    Returns:
        The padded kernel, shape ``(side, side)``; convolving with it is the same.

    Example:
        >>> pad_psf(torch.ones(3, 3), 5)[:, 0].tolist()
        [0.0, 0.0, 0.0, 0.0, 0.0]
    """
    k = kernel.shape[-1]
    if kernel.shape[-2] != k or k % 2 == 0 or side % 2 == 0 or side < k:
        raise ValueError(f"cannot pad a {tuple(kernel.shape)} kernel to {side} x {side}")
    p = (side - k) // 2
    return torch.nn.functional.pad(kernel, (p, p, p, p))


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
        psf_per_row: Take the PSF as an input of ``forward`` (one fine kernel per image,
            caustics' ``LensSource.psf`` made a dynamic parameter), so images with
            different PSFs are one vmapped call. ``psf_kernel`` or the Gaussian then only
            sets the default kernel side.
        psf_side: Fine kernel side to pad the PSF to (odd); with ``psf_per_row``, the side
            every kernel given to ``forward`` must have (``pad_psf``).

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
        psf_per_row: bool = False,
        psf_side: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        up = config.upsample_factor
        psf = fine_psf(config, psf_kernel)
        if psf_side is not None:
            psf = pad_psf(psf, psf_side)
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
            n_fine = self.fine_grid_side
            chunk_size = max(16, 2**24 // (n_fine**2 * torch.finfo(dtype).bits // 8))
        self.chunk_size = chunk_size
        self._pixel_area = config.pixel_scale_arcsec**2
        self._dtype = dtype
        self.psf_per_row = psf_per_row
        if psf_per_row:
            cs.psf.to_dynamic()
        self._check_param_order()

    def _check_param_order(self) -> None:
        # vmap passes a flat list of tensors; its order must be caustics' parameter order.
        order = tuple(s.strip() for s in self.caustics_sim.param_order().split(","))
        expected = ("sim: psf",) * self.psf_per_row + tuple(
            n.replace(".", ": ") for n in CAUSTICS_ORDER
        )
        if order != expected:
            raise RuntimeError(f"caustics parameter order {order} differs from {expected}")

    @property
    def fine_grid_side(self) -> int:
        """Side, in fine pixels, of the PSF-padded supersampled grid caustics evaluates."""
        return self.config.n_pix * self.config.upsample_factor + self.psf.shape[0] - 1

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(H, W)`` of the simulated images."""
        return (self.config.n_pix, self.config.n_pix)

    def forward(self, theta: Tensor, psf: Tensor | None = None) -> Tensor:
        """Simulate noiseless images.

        Args:
            theta: Physical parameters, shape ``(B, 21)`` or ``(21,)``, columns
                ``params.NAMES``, units per registry.
            psf: With ``psf_per_row`` only (and then required): the fine (supersampled)
                kernel of each image, shape ``(B, K, K)`` or ``(K, K)`` for all, ``K`` the
                simulator's ``psf.shape[0]`` (``fine_psf`` then ``pad_psf``).

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
        if self.psf_per_row:
            side = self.psf.shape[-1]
            if psf is None or psf.shape[-2:] != (side, side) or psf.ndim not in (2, 3):
                got = None if psf is None else tuple(psf.shape)
                raise ValueError(f"psf must have shape (B, {side}, {side}), got {got}")
            psf = psf.to(self.psf).expand(batch.shape[0], side, side)
            cols = [psf, *cols]
        elif psf is not None:
            raise ValueError("psf is an input only for a simulator built with psf_per_row=True")
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
