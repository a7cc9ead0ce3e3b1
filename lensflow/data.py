"""Stage 3: training data for the posterior: the network input, simulated and stored pairs.

``network_input`` is the *only* way an image becomes what the image encoder sees, used by
training (``SimulatedPairs``, ``H5Pairs``) and by sampling real data
(``observation_input``), so the two cannot drift apart. Its four channels, shape
``(B, 4, H, W)``:

0. ``asinh(image / s)``, with ``s`` the median noise sigma over unmasked pixels of that
   image (a robust per-image noise scale): the image in units of its own background noise,
   compressed above S/N ~ 1 so bright lens light does not swamp the arcs;
1. ``log(sigma / reference_rms)``: the noise map against a fixed per-model scale, which
   carries the absolute flux scale (for the amplitudes) and the Poisson structure, so one
   model serves different depths. Under ``DataConfig.normalize_flux`` every image is first
   brought to flux units where its noise scale is ``reference_rms`` (:func:`flux_factor`),
   so this channel keeps only the noise map's shape and the model is independent of flux
   units;
2. the mask (1 = pixel used);
3. the PSF FWHM in pixels divided by 2, constant over the image (the PSF conditioning).

Masked pixels are zero in every channel. ``reference_rms`` is stored with each model.

``SimulatedPairs`` draws ``(theta, x)`` on the fly on the simulator's device with fresh
noise for every example. The PSF width varies per example over a grid of
``DataConfig.n_psf_grid`` FWHM values (one ``LensSimulator`` per value, because caustics
fixes the PSF at construction; each example picks a grid value uniformly), and the noise
level varies continuously: background RMS and exposure time are log-uniform over the
``DataConfig`` ranges. Noise per pixel is ``sqrt(rms^2 + max(model, 0) / exposure)``,
``simulator.NoiseModel``'s formula with per-example values.

``write_pairs`` / ``H5Pairs`` store a fixed simulated set in HDF5 (numpy appears here only,
at that I/O edge) for CPU work and exact reproducibility.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from lensflow.config import DataConfig, SimulatorConfig
from lensflow.observation import Observation, kernel_fwhm_pix
from lensflow.params import NAMES, scale_flux
from lensflow.prior import Prior, make_prior
from lensflow.simulator import LensSimulator, gaussian_psf, pool_psf

__all__ = [
    "N_CHANNELS",
    "H5Pairs",
    "Pairs",
    "SimulatedPairs",
    "conditioning_fwhm_arcsec",
    "flux_factor",
    "network_input",
    "noise_scale",
    "observation_input",
    "random_masks",
    "training_masked_fraction",
    "write_pairs",
]

#: Channels of :func:`network_input`.
N_CHANNELS = 4


def network_input(
    image: Tensor,
    sigma: Tensor,
    mask: Tensor,
    psf_fwhm_arcsec: Tensor,
    *,
    pixel_scale_arcsec: float,
    reference_rms: float,
) -> Tensor:
    """The image encoder's input for a batch of images (see the module docstring).

    Args:
        image: Images, shape ``(B, H, W)``, flux per pixel (image units).
        sigma: Noise standard deviation, shape ``(B, H, W)``, image units, > 0 where used.
        mask: Bool, shape ``(B, H, W)``; True where the pixel is used.
        psf_fwhm_arcsec: PSF FWHM per image, shape ``(B,)``, arcsec.
        pixel_scale_arcsec: Pixel side, arcsec.
        reference_rms: The model's fixed noise scale, image units (``DataConfig``).

    Returns:
        Network input, shape ``(B, 4, H, W)``, in ``image``'s dtype.

    Example:
        >>> x = network_input(torch.zeros(2, 8, 8), torch.ones(2, 8, 8),
        ...                   torch.ones(2, 8, 8, dtype=torch.bool), torch.tensor([0.2, 0.2]),
        ...                   pixel_scale_arcsec=0.1, reference_rms=1.0)
        >>> x.shape, float(x[0, 3, 0, 0])
        (torch.Size([2, 4, 8, 8]), 1.0)
    """
    if image.ndim != 3 or image.shape != sigma.shape or image.shape != mask.shape:
        raise ValueError(
            f"image, sigma and mask must share a (B, H, W) shape, got {tuple(image.shape)}, "
            f"{tuple(sigma.shape)}, {tuple(mask.shape)}"
        )
    if psf_fwhm_arcsec.shape != image.shape[:1]:
        raise ValueError(
            f"psf_fwhm_arcsec must have shape (B,), got {tuple(psf_fwhm_arcsec.shape)}"
        )
    if pixel_scale_arcsec <= 0 or reference_rms <= 0:
        raise ValueError(
            f"pixel_scale_arcsec={pixel_scale_arcsec!r} and reference_rms={reference_rms!r} "
            "must be > 0"
        )
    m = mask.to(image.dtype)
    safe_sigma = torch.where(mask, sigma, torch.ones_like(sigma))
    # Median over used pixels only: masked pixels become NaN, which nanmedian skips.
    s = torch.where(mask, safe_sigma, torch.nan).flatten(1).nanmedian(dim=1).values
    snr = torch.asinh(image / s[:, None, None]) * m
    log_sigma = torch.log(safe_sigma / reference_rms) * m
    fwhm_pix = (psf_fwhm_arcsec.to(image) / pixel_scale_arcsec / 2)[:, None, None] * m
    return torch.stack([snr, log_sigma, m, fwhm_pix], dim=1)


@functools.lru_cache(maxsize=8)
def _pooled_fwhm_table(upsample_factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid FWHM (native pixels) and the Gaussian-fit FWHM of its pooled native kernel."""
    grid = np.geomspace(0.3, 16.0, 81)
    fitted = [
        kernel_fwhm_pix(pool_psf(gaussian_psf(float(f), 1.0 / upsample_factor), upsample_factor))
        for f in grid
    ]
    return grid, np.asarray(fitted)


def conditioning_fwhm_arcsec(observation: Observation, upsample_factor: int) -> float:
    """The PSF FWHM a model is conditioned on for an observation's pixel-integrated kernel.

    Training images are rendered with a Gaussian PSF of FWHM ``F`` at the supersampled scale
    and then pooled to native pixels, and the network is told ``F``. An observation's kernel
    is the native, pixel-integrated PSF (docs/conventions.md), whose Gaussian fit
    (``Observation.psf_fwhm_arcsec``) is wider than ``F`` by the pixel box: +9% at 0.16"
    on a 0.1" grid. This returns the ``F`` whose training kernel,
    ``pool_psf(gaussian_psf(F, scale / up), up)``, has the same Gaussian-fit FWHM as the
    observation's kernel (a monotone table, interpolated; beyond 16 pixels the box is
    removed in quadrature; below the table's smallest kernel, 0.3 pixels).

    Args:
        observation: The observation (its ``psf`` and ``pixel_scale_arcsec``).
        upsample_factor: The model's supersampling factor (``SimulatorConfig``).

    Returns:
        FWHM in arcsec; 0 for a 1 x 1 kernel.

    Example:
        >>> from lensflow.simulator import gaussian_psf, pool_psf
        >>> kernel = pool_psf(gaussian_psf(0.16, 0.05), 2)  # rendered at FWHM 0.16", 0.1"/px
        >>> obs = Observation(torch.zeros(8, 8), torch.ones(8, 8), kernel.float(), 0.1,
        ...                   torch.ones(8, 8, dtype=torch.bool))
        >>> round(obs.psf_fwhm_arcsec, 3), round(conditioning_fwhm_arcsec(obs, 2), 3)
        (0.174, 0.16)
    """
    fitted = observation.psf_fwhm_arcsec / observation.pixel_scale_arcsec
    if fitted == 0:
        return 0.0
    grid, table = _pooled_fwhm_table(int(upsample_factor))
    if fitted > table[-1]:
        pix = math.sqrt(fitted**2 - (table[-1] ** 2 - grid[-1] ** 2))
    else:
        pix = float(np.interp(fitted, table, grid))
    return pix * observation.pixel_scale_arcsec


#: Quantile of the used pixels' noise sigma that sets an image's flux scale (noise_scale).
NOISE_SCALE_QUANTILE = 0.1


def noise_scale(sigma: Tensor, mask: Tensor) -> Tensor:
    """An image's noise scale: the 10th percentile of sigma over its used pixels.

    Close to the background RMS (the noise floor) where some sky is in the cutout, and
    robust to the lens's Poisson noise and to noisy noise maps. It depends on the noise
    map only, and scales with it: ``noise_scale(k * sigma) = k * noise_scale(sigma)``.
    Training (``SimulatedPairs`` under ``DataConfig.normalize_flux``) and sampling
    (:func:`flux_factor`) use this same statistic.

    Args:
        sigma: Noise sigma, shape ``(..., H, W)``, image units.
        mask: Bool, same shape; True where the pixel is used.

    Returns:
        Shape ``sigma.shape[:-2]``, image units.

    Example:
        >>> sigma = torch.linspace(0.01, 0.11, 101).reshape(1, 1, 101)
        >>> round(float(noise_scale(sigma, torch.ones_like(sigma, dtype=torch.bool))), 6)
        0.02
    """
    used = torch.where(mask, sigma, torch.nan).flatten(-2)
    return torch.nanquantile(used, NOISE_SCALE_QUANTILE, dim=-1)


def flux_factor(observation: Observation, reference_rms: float) -> float:
    """The factor that brings a cutout's flux units to a model's noise scale.

    ``k = reference_rms / noise_scale`` (:func:`noise_scale`), so that
    ``observation.scaled(k)`` has its noise scale at ``reference_rms``. Channel 0 of
    :func:`network_input` is already independent of flux units; with this factor channel 1,
    ``log(sigma / reference_rms)``, is too, and the flux parameters come out in the units
    the model was trained in (``DataConfig.normalize_flux``; ``sampling.sample_posteriors``
    divides them by ``k`` again).

    Args:
        observation: The observation (cut or not).
        reference_rms: The model's noise scale, image units (``DataConfig.reference_rms``).

    Returns:
        ``k`` (> 0).

    Example:
        >>> from lensflow.observation import Observation
        >>> obs = Observation(torch.ones(4, 4), torch.full((4, 4), 0.02), torch.ones(1, 1),
        ...                   0.1, torch.ones(4, 4, dtype=torch.bool))
        >>> round(flux_factor(obs, reference_rms=0.004), 6)
        0.2
    """
    return reference_rms / float(noise_scale(observation.sigma, observation.mask))


def observation_input(
    observations: list[Observation], *, reference_rms: float, upsample_factor: int
) -> Tensor:
    """The network input of real (or loaded) observations, all on one pixel grid.

    Args:
        observations: Observations of equal shape and pixel scale (cut with
            ``cutouts.cut_to_fov``); the PSF channel is :func:`conditioning_fwhm_arcsec`
            of each kernel.
        reference_rms: The model's fixed noise scale, image units.
        upsample_factor: The model's supersampling factor.

    Returns:
        Network input, shape ``(B, 4, H, W)``, in the first observation's dtype.
    """
    if not observations:
        raise ValueError("observation_input needs at least one observation")
    first = observations[0]
    for obs in observations:
        if (
            obs.shape != first.shape
            or abs(obs.pixel_scale_arcsec / first.pixel_scale_arcsec - 1) > 1e-6
        ):
            raise ValueError(
                f"observation {obs.name!r} has shape {obs.shape} at {obs.pixel_scale_arcsec} "
                f"arcsec/px; expected {first.shape} at {first.pixel_scale_arcsec}"
            )
    dtype, device = first.image.dtype, first.image.device
    fwhm = [conditioning_fwhm_arcsec(o, upsample_factor) for o in observations]
    return network_input(
        torch.stack([o.image.to(device, dtype) for o in observations]),
        torch.stack([o.sigma.to(device, dtype) for o in observations]),
        torch.stack([o.mask.to(device) for o in observations]),
        torch.tensor(fwhm, dtype=dtype, device=device),
        pixel_scale_arcsec=first.pixel_scale_arcsec,
        reference_rms=reference_rms,
    )


@dataclass(frozen=True)
class Pairs:
    """A batch of simulated lenses with their network input.

    Attributes:
        theta: Physical parameters, shape ``(B, D)``, columns ``params.NAMES``.
        x: Network input, shape ``(B, 4, H, W)`` (:func:`network_input`).
        image: Noisy images, shape ``(B, H, W)``, flux per pixel.
        sigma: Noise standard deviation, shape ``(B, H, W)``, image units.
        psf_fwhm_arcsec: PSF FWHM, shape ``(B,)``, arcsec.
        background_rms: Background RMS, shape ``(B,)``, image units.
        exposure_time_s: Exposure time, shape ``(B,)``, s.
        mask: Likelihood mask, bool, shape ``(B, H, W)``, True where the pixel is used;
            ``None`` means every pixel is used.
    """

    theta: Tensor
    x: Tensor
    image: Tensor
    sigma: Tensor
    psf_fwhm_arcsec: Tensor
    background_rms: Tensor
    exposure_time_s: Tensor
    mask: Tensor | None = None

    def __len__(self) -> int:
        return int(self.theta.shape[0])

    def select(self, index: Tensor) -> Pairs:
        """The examples at ``index`` (a ``(K,)`` integer tensor), as new ``Pairs``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Pairs(**{k: None if v is None else v[index] for k, v in fields.items()})


def random_masks(
    n: int,
    shape: tuple[int, int],
    *,
    probability: float,
    max_fraction: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Random likelihood masks like those of real cutouts: neighbours, stars, bad pixels.

    Each image is masked with probability ``probability``. A masked image gets one to
    three discs (uniform centres anywhere in the image, radii uniform up to the radius at
    which three discs cover ``max_fraction / 2`` of the image) and scattered bad pixels
    (each pixel with probability uniform in ``[0, max_fraction / 10]``), so the masked
    fraction stays below ``max_fraction`` (discs may overlap).

    Args:
        n: Number of masks.
        shape: Image shape ``(H, W)``, pixels.
        probability: Chance that an image is masked at all, in ``[0, 1]``.
        max_fraction: Bound on the masked fraction, in ``(0, 1)``.
        generator: Torch generator on ``device``.
        device: Device of the masks.

    Returns:
        Bool masks, shape ``(n, H, W)``, True where the pixel is used.

    Example:
        >>> m = random_masks(4, (32, 32), probability=1.0, max_fraction=0.2,
        ...                  generator=torch.Generator().manual_seed(0))
        >>> m.shape, bool((1 - m.float().mean(dim=(1, 2)) <= 0.2).all())
        (torch.Size([4, 32, 32]), True)
    """
    if not 0.0 <= probability <= 1.0 or not 0.0 < max_fraction < 1.0:
        raise ValueError(
            f"need 0 <= probability <= 1 and 0 < max_fraction < 1, got {probability}, "
            f"{max_fraction}"
        )
    h, w = shape

    def rand(*size: int) -> Tensor:
        return torch.rand(size, generator=generator, device=device)

    r_max = math.sqrt(max_fraction / 2 * h * w / (3 * math.pi))
    centres_y, centres_x = rand(n, 3) * h - 0.5, rand(n, 3) * w - 0.5
    radii = rand(n, 3) * r_max
    n_discs = 1 + (rand(n) * 3).long().clamp_max(2)
    active = torch.arange(3, device=device)[None] < n_discs[:, None]  # (n, 3)
    yy = torch.arange(h, device=device, dtype=torch.float32)[:, None]
    xx = torch.arange(w, device=device, dtype=torch.float32)[None, :]
    d2 = (yy[None, None] - centres_y[..., None, None]) ** 2 + (
        xx[None, None] - centres_x[..., None, None]
    ) ** 2  # (n, 3, H, W)
    discs = ((d2 <= radii[..., None, None] ** 2) & active[..., None, None]).any(dim=1)
    bad = rand(n, h, w) < rand(n)[:, None, None] * (max_fraction / 10)
    masked = rand(n) < probability
    return ~((discs | bad) & masked[:, None, None])


def training_masked_fraction(config: DataConfig) -> float:
    """The largest masked fraction of a training image under a data config.

    :func:`random_masks` covers at most ``max_fraction / 2`` of an image with its discs and,
    in expectation, at most ``max_fraction / 10`` with bad pixels, so ``0.6 *
    mask_max_fraction`` bounds what a model saw (up to the bad pixels' binomial scatter,
    about 0.2% of a 64 x 64 cutout). A masked fraction beyond it is outside the training
    distribution; docs/fit.md measures what that costs.

    Args:
        config: The model's data config.

    Returns:
        The fraction in ``[0, 1)``; 0 for a model trained without masks.

    Example:
        >>> from lensflow.config import DataConfig
        >>> training_masked_fraction(DataConfig(mask_probability=0.3, mask_max_fraction=0.15))
        0.09
        >>> training_masked_fraction(DataConfig())
        0.0
    """
    if config.mask_probability <= 0:
        return 0.0
    return round(0.6 * config.mask_max_fraction, 12)


def _log_uniform(
    n: int, low: float, high: float, like: Tensor, generator: torch.Generator | None
) -> Tensor:
    r = torch.rand(n, generator=generator, dtype=like.dtype, device=like.device)
    return torch.exp(math.log(low) + (math.log(high) - math.log(low)) * r)


class SimulatedPairs:
    """On-the-fly simulated ``(theta, x)`` pairs with varied PSF and depth, fresh noise.

    Args:
        simulator: Pixel grid and supersampling (its PSF and noise fields are replaced by
            the ``data`` ranges).
        data: PSF and noise ranges.
        prior: Prior over ``theta`` (default: ``data.prior``, the training prior).
        dtype: Floating dtype of the simulation.
        device: Device of the simulation and of the returned tensors.

    Example:
        >>> from lensflow.config import DataConfig, SimulatorConfig
        >>> pairs = SimulatedPairs(SimulatorConfig(n_pix=16, pixel_scale_arcsec=0.3),
        ...                        DataConfig(n_psf_grid=2))
        >>> batch = pairs.sample(3, generator=torch.Generator().manual_seed(0))
        >>> batch.theta.shape, batch.x.shape
        (torch.Size([3, 21]), torch.Size([3, 4, 16, 16]))
    """

    def __init__(
        self,
        simulator: SimulatorConfig,
        data: DataConfig,
        *,
        prior: Prior | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.simulator_config = simulator
        self.data_config = data
        self.prior = prior or make_prior(data.prior, dtype=dtype, device=device)
        self.device = torch.device(device)
        self.dtype = dtype
        n = data.n_psf_grid
        lo, hi = data.psf_fwhm_min_arcsec, data.psf_fwhm_max_arcsec
        self.psf_grid_arcsec = tuple(lo + (hi - lo) * i / max(n - 1, 1) for i in range(n))
        self.simulators = [
            LensSimulator(
                dataclasses.replace(simulator, psf_fwhm_arcsec=fwhm), dtype=dtype, device=device
            )
            for fwhm in self.psf_grid_arcsec
        ]

    def psf_index(self, fwhm_arcsec: Tensor) -> Tensor:
        """Index in ``psf_grid_arcsec`` (and ``simulators``) of the grid FWHM nearest each value.

        Args:
            fwhm_arcsec: PSF FWHM per example, shape ``(B,)``, arcsec.

        Returns:
            Long tensor ``(B,)`` on ``fwhm_arcsec``'s device.
        """
        grid = torch.tensor(self.psf_grid_arcsec, dtype=fwhm_arcsec.dtype,
                            device=fwhm_arcsec.device)  # fmt: skip
        return (fwhm_arcsec[:, None] - grid[None]).abs().argmin(dim=1)

    def noiseless(self, theta: Tensor, index: Tensor) -> Tensor:
        """Noiseless images of ``theta`` ``(B, D)``, row ``i`` by ``simulators[index[i]]``.

        Args:
            theta: Physical parameters, shape ``(B, D)``.
            index: PSF-grid index per row (``psf_index``), long tensor ``(B,)``.

        Returns:
            Images in flux per pixel, shape ``(B, H, W)``, ``theta``'s dtype and device.
        """
        out = theta.new_zeros((theta.shape[0], *self.simulators[0].image_shape))
        for i, sim in enumerate(self.simulators):
            chosen = (index == i).nonzero().flatten()
            if chosen.numel():
                out[chosen] = sim(theta[chosen]).to(out)
        return out

    def observations(
        self, pairs: Pairs, *, psf_kernel: str = "pooled", prefix: str = "heldout"
    ) -> list[Observation]:
        """The examples of ``pairs`` as ``Observation`` objects, as a user would load them.

        Each gets its image, noise map and mask, and the *native-pixel* PSF kernel of its
        grid FWHM: pixel-integrated from the simulator's fine Gaussian (``"pooled"``, the
        default: what the simulator rendered and what ``mocks.write_mock_fits`` writes; the
        likelihood reads it exactly and :func:`conditioning_fwhm_arcsec` maps it back to the
        grid FWHM) or the Gaussian point-sampled at the pixel scale (``"point"``: too sharp
        by the pixel box, for the likelihood and for the network's PSF conditioning).

        Args:
            pairs: Examples drawn from this source (or rendered like them).
            psf_kernel: ``"point"`` or ``"pooled"``.
            prefix: Names are ``f"{prefix}{i}"``.

        Returns:
            One observation per example, on ``pairs``' device.
        """
        if psf_kernel not in ("point", "pooled"):
            raise ValueError(f"psf_kernel must be 'point' or 'pooled', got {psf_kernel!r}")
        scale = self.simulator_config.pixel_scale_arcsec
        up = self.simulator_config.upsample_factor
        kernels = [
            (gaussian_psf(f, scale) if psf_kernel == "point"
             else pool_psf(gaussian_psf(f, scale / up), up)).to(pairs.image)
            for f in self.psf_grid_arcsec
        ]  # fmt: skip
        index = self.psf_index(pairs.psf_fwhm_arcsec).tolist()
        mask = pairs.mask if pairs.mask is not None else torch.ones_like(pairs.image, dtype=bool)
        return [
            Observation(
                pairs.image[i], pairs.sigma[i], kernels[k], scale, mask[i], name=f"{prefix}{i}"
            )
            for i, k in enumerate(index)
        ]

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Pairs:
        """Draw ``n`` fresh examples.

        Args:
            n: Number of examples.
            generator: Torch generator on the simulation device (prior, PSF, depth, noise).

        Returns:
            The batch, on the simulation device.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        theta = self.prior.sample((n,), generator=generator).to(self.dtype)
        like = theta[:, 0]
        k = torch.randint(len(self.simulators), (n,), generator=generator, device=self.device)
        rms = _log_uniform(n, self.data_config.background_rms_min,
                           self.data_config.background_rms_max, like, generator)  # fmt: skip
        exposure = _log_uniform(n, self.data_config.exposure_time_min_s,
                                self.data_config.exposure_time_max_s, like, generator)  # fmt: skip
        model = self.noiseless(theta, k)
        var = rms[:, None, None] ** 2 + model.clamp_min(0) / exposure[:, None, None]
        sigma = var.sqrt()
        eps = torch.randn(model.shape, generator=generator, dtype=model.dtype, device=model.device)
        image = model + sigma * eps
        fwhm = torch.tensor(self.psf_grid_arcsec, dtype=self.dtype, device=self.device)[k]
        dc = self.data_config
        if dc.mask_probability > 0:  # drawn last: without masks the random stream is unchanged
            mask = random_masks(n, image.shape[1:], probability=dc.mask_probability,
                                max_fraction=dc.mask_max_fraction, generator=generator,
                                device=self.device)  # fmt: skip
        else:
            mask = torch.ones_like(image, dtype=torch.bool)
        if dc.normalize_flux:  # deterministic: the random stream is unchanged
            f = dc.reference_rms / noise_scale(sigma, mask)  # flux_factor of each example
            image, sigma = image * f[:, None, None], sigma * f[:, None, None]
            theta = scale_flux(theta, f)
            rms, exposure = rms * f, exposure / f
        x = network_input(
            image,
            sigma,
            mask,
            fwhm,
            pixel_scale_arcsec=self.simulator_config.pixel_scale_arcsec,
            reference_rms=dc.reference_rms,
        )
        return Pairs(theta, x, image, sigma, fwhm, rms, exposure, mask)


_FIELDS = ("theta", "image", "sigma", "psf_fwhm_arcsec", "background_rms", "exposure_time_s")


def write_pairs(
    path: str | Path,
    source: SimulatedPairs,
    n: int,
    *,
    chunk: int = 256,
    generator: torch.Generator | None = None,
) -> Path:
    """Simulate ``n`` examples and store them in HDF5 (float32), with the configs as JSON.

    Datasets: ``theta`` ``(n, D)``, ``image`` and ``sigma`` ``(n, H, W)``,
    ``psf_fwhm_arcsec``, ``background_rms``, ``exposure_time_s`` ``(n,)``. Attributes:
    ``names`` (JSON list), ``simulator`` and ``data`` (JSON of the configs).

    Args:
        path: Output file.
        source: The simulated-pair generator.
        n: Number of examples.
        chunk: Examples simulated per call.
        generator: Torch generator.

    Returns:
        The path written.
    """
    path = Path(path)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    h, w = source.simulators[0].image_shape
    shapes = {"theta": (len(NAMES),), "image": (h, w), "sigma": (h, w)}
    with h5py.File(path, "w") as f:
        for name in _FIELDS:
            f.create_dataset(name, shape=(n, *shapes.get(name, ())), dtype="float32")
        f.attrs["names"] = json.dumps(list(NAMES))
        f.attrs["simulator"] = json.dumps(dataclasses.asdict(source.simulator_config), default=str)
        f.attrs["data"] = json.dumps(dataclasses.asdict(source.data_config))
        f.create_dataset("mask", shape=(n, h, w), dtype="bool")
        for start in range(0, n, chunk):
            batch = source.sample(min(chunk, n - start), generator=generator)
            for name in _FIELDS:
                f[name][start : start + len(batch)] = getattr(batch, name).float().cpu().numpy()
            f["mask"][start : start + len(batch)] = batch.mask.cpu().numpy()
    return path


class H5Pairs:
    """A stored simulated set (:func:`write_pairs`), held in memory, sampled like the live one.

    Args:
        path: HDF5 file written by :func:`write_pairs`.
        dtype: Floating dtype of the returned tensors.
        device: Device of the returned tensors.

    Raises:
        ValueError: If the file is unreadable, lacks a dataset, or its parameter names differ
            from ``params.NAMES``.
    """

    def __init__(
        self, path: str | Path, *, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:  # fmt: skip
        path = Path(path)
        try:
            with h5py.File(path, "r") as f:
                names = tuple(json.loads(f.attrs["names"]))
                sim = json.loads(f.attrs["simulator"])
                data = json.loads(f.attrs["data"])
                arrays = {name: np.asarray(f[name]) for name in _FIELDS}
                # Files written before masks existed have none: every pixel used.
                stored_mask = np.asarray(f["mask"]) if "mask" in f else None
        except (OSError, KeyError) as err:
            raise ValueError(f"{path}: not a lensflow pairs file ({err})") from None
        if names != NAMES:
            raise ValueError(f"{path}: parameter names {names} differ from the registry {NAMES}")
        sim = {k: float(v) if v in ("inf", "-inf") else v for k, v in sim.items()}
        self.simulator_config = SimulatorConfig(**sim)
        self.data_config = DataConfig(**data)
        self.path = path
        t = {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in arrays.items()}
        mask = (
            torch.ones_like(t["image"], dtype=torch.bool)
            if stored_mask is None
            else torch.as_tensor(stored_mask, device=device)
        )
        x = network_input(
            t["image"],
            t["sigma"],
            mask,
            t["psf_fwhm_arcsec"],
            pixel_scale_arcsec=self.simulator_config.pixel_scale_arcsec,
            reference_rms=self.data_config.reference_rms,
        )
        self.pairs = Pairs(t["theta"], x, t["image"], t["sigma"], t["psf_fwhm_arcsec"],
                           t["background_rms"], t["exposure_time_s"], mask)  # fmt: skip

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Pairs:
        """Draw ``n`` stored examples uniformly with replacement.

        Args:
            n: Number of examples.
            generator: Torch generator (CPU).

        Returns:
            The batch.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        index = torch.randint(len(self), (n,), generator=generator)
        return self.pairs.select(index.to(self.pairs.theta.device))
