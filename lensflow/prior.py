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

__all__ = ["PRIOR_CHOICES", "Prior", "make_prior", "wide_specs"]

#: Named priors of the samplers that take one (``fit.run_fallback``): the registry's
#: default (the training prior) and ``wide_specs``.
PRIOR_CHOICES = ("default", "wide")


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


def make_prior(
    name: str = "default", *, dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Prior:  # fmt: skip
    """A named prior: ``"default"`` (the registry's) or ``"wide"`` (``wide_specs``).

    Raises:
        ValueError: For another name (one line naming the choices).
    """
    if name not in PRIOR_CHOICES:
        raise ValueError(f"unknown prior {name!r}; choose {' or '.join(PRIOR_CHOICES)}")
    return Prior(REGISTRY if name == "default" else wide_specs(), dtype=dtype, device=device)


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
