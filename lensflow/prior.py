"""Stage 1: the default prior over physical parameters.

A product of independent one-dimensional priors, each ``uniform`` or ``loguniform`` on the
``[prior_low, prior_high]`` interval of its registry entry. Samples are physical ``theta``
with columns ``params.NAMES``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lensflow.params import REGISTRY, ParamSpec

__all__ = ["BROAD_RANGES", "PRIOR_CHOICES", "TRAINING_PRIORS", "Prior", "broad_specs",
           "make_prior", "prior_specs", "wide_specs"]  # fmt: skip

#: Named priors: the registry's default (the shipped models' training prior), ``broad``
#: (a training prior that covers the real reference lenses, ``broad_specs``) and ``wide``
#: (every range opened, for samplers only: ``wide_specs``). A model records the one it was
#: trained on (``DataConfig.prior``); ``fit.run_fallback`` takes one too.
PRIOR_CHOICES = ("default", "broad", "wide")

#: The named priors a model may be trained on (``DataConfig.prior``): ``wide`` is not one
#: (Einstein radii down to 0, amplitudes over eight decades).
TRAINING_PRIORS = ("default", "broad")

#: ``broad`` prior ranges that differ from the registry's default, ``name: (low, high)``.
#: Each covers what the best fits of our own model family to the real reference cutouts need
#: (docs/real-lenses.md, "Where the networks go wrong": profile fits of NEG5700, SDSSJ2303,
#: the dolphin, NEG5767 and NEG5896), with some margin: external shear up to 0.19, lens
#: ellipticity components up to 0.43, lens centres 0.23" off, sources as elongated as 0.63
#: per component and as faint as 1.4 (with Sersic indices down to 0.40), lens light as
#: faint as 0.40, as compact as 0.14" and as extended as 3.7", with indices down to 0.78
#: and centres 0.48" off. One best-fit value stays outside: SDSSJ2303's lens light e1 of
#: 0.81, beyond the physical bound of 0.7.
BROAD_RANGES: dict[str, tuple[float, float]] = {
    "lens_e1": (-0.5, 0.5),
    "lens_e2": (-0.5, 0.5),
    "lens_center_x": (-0.3, 0.3),
    "lens_center_y": (-0.3, 0.3),
    "shear_gamma1": (-0.25, 0.25),
    "shear_gamma2": (-0.25, 0.25),
    "source_amp": (0.5, 500.0),
    "source_n_sersic": (0.3, 4.0),
    "source_e1": (-0.65, 0.65),
    "source_e2": (-0.65, 0.65),
    "lens_light_amp": (0.2, 500.0),
    "lens_light_r_sersic": (0.1, 4.0),
    "lens_light_n_sersic": (0.5, 6.0),
    "lens_light_e1": (-0.45, 0.45),
    "lens_light_e2": (-0.45, 0.45),
    "lens_light_center_x": (-0.5, 0.5),
    "lens_light_center_y": (-0.5, 0.5),
}


def broad_specs(specs: Sequence[ParamSpec] = REGISTRY) -> tuple[ParamSpec, ...]:
    """The registry with the ``BROAD_RANGES`` priors: a training prior for real cutouts.

    The default prior excludes what the real reference lenses' best fits need (fainter and
    wider lens light, more elongated sources, stronger shear); this one covers them while
    staying a training prior (the Einstein radius keeps 0.5-2", each amplitude spans at
    most 3.4 decades). Families (uniform, log-uniform) are unchanged.

    Args:
        specs: The parameter registry.

    Returns:
        The specs with ``prior_low`` and ``prior_high`` replaced where ``BROAD_RANGES``
        names them.

    Example:
        >>> broad = {p.name: p for p in broad_specs()}
        >>> broad["lens_light_amp"].prior_low, broad["shear_gamma1"].prior_high
        (0.2, 0.25)
    """
    return tuple(
        dataclasses.replace(
            p, prior_low=BROAD_RANGES[p.name][0], prior_high=BROAD_RANGES[p.name][1]
        )
        if p.name in BROAD_RANGES
        else p
        for p in specs
    )


def wide_specs(
    specs: Sequence[ParamSpec] = REGISTRY, *, flux_decades: float = 2.0
) -> tuple[ParamSpec, ...]:
    """The registry with every prior opened: what a sampler may explore beyond training.

    Uniform priors become uniform on the parameter's physical bounds (``low``, ``high``:
    Einstein radius 0-10", Sersic radii 0.01-10", indices 0.3-8, ellipticity components
    +/-0.7, ...); log-uniform ones (the amplitudes, physically 0 to infinity) are widened
    by ``flux_decades`` decades at each end. The real lenses' best fits that the default
    prior excludes (lens light amplitudes of 0.5-1.7 for a prior of 5-500, a lens light
    radius of 3.2" for one up to 2.5"; docs/real-lenses.md) lie inside it.

    Args:
        specs: The parameter registry.
        flux_decades: Decades added below and above each log-uniform prior, >= 0.

    Returns:
        The specs with ``prior_low`` and ``prior_high`` replaced.

    Example:
        >>> wide = {p.name: p for p in wide_specs()}
        >>> wide["lens_light_amp"].prior_low, wide["lens_light_r_sersic"].prior_high
        (0.05, 10.0)
    """
    if not (math.isfinite(flux_decades) and flux_decades >= 0):
        raise ValueError(f"flux_decades must be finite and >= 0, got {flux_decades!r}")
    f = 10.0**flux_decades
    return tuple(
        dataclasses.replace(p, prior_low=p.prior_low / f, prior_high=p.prior_high * f)
        if p.prior == "loguniform"
        else dataclasses.replace(p, prior_low=p.low, prior_high=p.high)
        for p in specs
    )


def prior_specs(name: str = "default") -> tuple[ParamSpec, ...]:
    """The registry with the priors of a named prior (``PRIOR_CHOICES``).

    Args:
        name: ``"default"`` (the registry's), ``"broad"`` (``broad_specs``) or ``"wide"``
            (``wide_specs``).

    Returns:
        The specs, ``params.NAMES`` order.

    Raises:
        ValueError: For another name (one line naming the choices).

    Example:
        >>> [p.prior_high for p in prior_specs("broad")][:2]
        [2.0, 0.5]
    """
    if name not in PRIOR_CHOICES:
        raise ValueError(f"unknown prior {name!r}; choose {', '.join(PRIOR_CHOICES)}")
    if name == "default":
        return REGISTRY
    return broad_specs() if name == "broad" else wide_specs()


def make_prior(
    name: str = "default", *, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Prior:  # fmt: skip
    """A named prior (``prior_specs``): ``"default"``, ``"broad"`` or ``"wide"``.

    Raises:
        ValueError: For another name (one line naming the choices).
    """
    return Prior(prior_specs(name), dtype=dtype, device=device)


class Prior:
    """Product prior over the registry's parameters.

    Args:
        specs: The parameter registry.
        dtype: Floating dtype of samples.
        device: Device of samples.

    Example:
        >>> prior = Prior()
        >>> theta = prior.sample((3,), generator=torch.Generator().manual_seed(0))
        >>> theta.shape, bool(torch.isfinite(prior.log_prob(theta)).all())
        (torch.Size([3, 21]), True)
    """

    def __init__(
        self,
        specs: Sequence[ParamSpec] = REGISTRY,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.specs = tuple(specs)
        self.names = tuple(p.name for p in self.specs)
        self._is_log = torch.tensor([p.prior == "loguniform" for p in self.specs], device=device)
        lo = torch.tensor([p.prior_low for p in self.specs], dtype=torch.float64)
        hi = torch.tensor([p.prior_high for p in self.specs], dtype=torch.float64)
        # Sample in log space for log-uniform entries, linear space otherwise.
        self._a = torch.where(self._is_log.cpu(), lo.log(), lo).to(device=device, dtype=dtype)
        self._b = torch.where(self._is_log.cpu(), hi.log(), hi).to(device=device, dtype=dtype)
        self.low = lo.to(device=device, dtype=dtype)
        self.high = hi.to(device=device, dtype=dtype)

    @property
    def dim(self) -> int:
        """Number of parameters ``D``."""
        return len(self.specs)

    def sample(
        self, sample_shape: tuple[int, ...] = (), *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw parameters from the prior.

        Args:
            sample_shape: Leading shape of the draw.
            generator: Optional torch generator (on the prior's device) for reproducibility.

        Returns:
            ``theta``, shape ``(*sample_shape, D)``, physical units per registry.
        """
        r = torch.rand(
            (*sample_shape, self.dim),
            generator=generator,
            dtype=self._a.dtype,
            device=self._a.device,
        )
        y = self._a + (self._b - self._a) * r
        return torch.where(self._is_log, y.exp(), y)

    def clamp_inside(self, theta: Tensor, *, margin: float = 1e-9) -> Tensor:
        """Move ``theta`` into the prior box, ``margin`` box widths inside each edge.

        For starting points of samplers whose transform to unconstrained space is infinite
        on the box's edges (flow samples, walkers reflected at an edge).

        Args:
            theta: Physical parameters, shape ``(..., D)``.
            margin: Distance kept from each edge, in units of the box width.

        Returns:
            The clamped parameters, shape and dtype of ``theta``.

        Example:
            >>> prior = Prior(dtype=torch.float64)
            >>> theta = prior.clamp_inside(prior.high + 1.0)
            >>> bool((theta < prior.high).all()) and bool(torch.isfinite(prior.log_prob(theta)))
            True
        """
        lo, hi = self.low.to(theta), self.high.to(theta)
        span = hi - lo
        return torch.minimum(torch.maximum(theta, lo + margin * span), hi - margin * span)

    def log_prob(self, theta: Tensor) -> Tensor:
        """Log density of ``theta`` under the prior (``-inf`` outside its support).

        Args:
            theta: Physical parameters, shape ``(..., D)``.

        Returns:
            Log density, shape ``(...)``, in units of 1 / prod(parameter units).
        """
        if theta.shape[-1] != self.dim:
            raise ValueError(f"theta has {theta.shape[-1]} columns, expected {self.dim}")
        a, b, lo, hi = (t.to(theta) for t in (self._a, self._b, self.low, self.high))
        inside = ((theta >= lo) & (theta <= hi)).all(-1)
        # Log-uniform density 1 / (x log(hi/lo)); uniform 1 / (hi - lo).
        logp = torch.where(
            self._is_log,
            -torch.log(b - a) - torch.log(theta.clamp_min(1e-300)),
            -torch.log(b - a),
        ).sum(-1)
        return torch.where(inside, logp, torch.full_like(logp, -torch.inf))
