"""Stage 0: the lens parameter registry and every conversion of parameter vectors.

One registry holds, for each physical parameter, its name, unit, physical bounds, default
prior, LaTeX label and its caustics and lenstronomy names. ``NAMES`` is the only definition
of the column order of ``theta``.

Conventions (stated once in docs/conventions.md, pinned by tests/test_params.py):

* Semantics are lenstronomy's. ``e1, e2 = (1 - q) / (1 + q) * (cos 2phi, sin 2phi)`` with
  ``q = b / a`` and ``phi`` the position angle of the major axis, counter-clockwise from +x,
  in radians. ``lens_theta_e`` is lenstronomy's SIE ``theta_E`` (intermediate-axis radius),
  identical to caustics' ``Rein``. ``*_r_sersic`` is lenstronomy's default SERSIC_ELLIPSE
  half-light radius sqrt(a b) (product average); caustics' ``Re`` is measured along the
  major axis, so ``Re = R_sersic / sqrt(q)``. ``*_amp`` is the surface brightness at the
  half-light radius, in image units per arcsec^2 (lenstronomy's ``amp``; caustics ``Ie``).
* Positions in arcsec relative to the cutout centre; +x to the right along image columns,
  +y up along image rows (``image[row = y, col = x]``, plot with ``origin="lower"``).
* The networks see ``u = to_unconstrained(theta)``: each bounded parameter is mapped to R
  by a scaled logit of its physical bounds (a log for one-sided bounds) and then
  standardized with the mean and standard deviation of the prior in that space: the
  default prior's, or a model's training prior's (``DataConfig.prior``, ``prior_specs``).

A second model (EPL mass with a slope) is added as another tuple of ``ParamSpec`` plus its
caustics builder in ``simulator``; every function here takes ``specs`` and works unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

__all__ = [
    "FLUX_NAMES",
    "NAMES",
    "REGISTRY",
    "ParamSpec",
    "UnconstrainedTransform",
    "e1e2_to_qphi",
    "from_caustics",
    "from_unconstrained",
    "index",
    "qphi_to_e1e2",
    "scale_flux",
    "to_caustics",
    "to_unconstrained",
    "unconstrained_stats",
]


@dataclass(frozen=True)
class ParamSpec:
    """One physical parameter of the lens model.

    Attributes:
        name: Registry name, ``<component>_<lenstronomy key>`` (``lens_theta_e``).
        unit: astropy-parsable unit string (``"arcsec"``, ``""`` for dimensionless).
        low: Lower physical bound, in ``unit`` (``-inf`` allowed only with ``high=inf``).
        high: Upper physical bound, in ``unit`` (``inf`` for one-sided parameters).
        prior: Default prior family, ``"uniform"`` or ``"loguniform"``.
        prior_low: Lower edge of the default prior, in ``unit``.
        prior_high: Upper edge of the default prior, in ``unit``.
        label: LaTeX label with unit, for plots.
        caustics: Caustics parameter this maps to (``"sie.Rein"``); ``e1/e2`` map to the
            derived ``q, phi`` of that component.
        lenstronomy: lenstronomy keyword (``"kwargs_lens[0].theta_E"``).
    """

    name: str
    unit: str
    low: float
    high: float
    prior: str
    prior_low: float
    prior_high: float
    label: str
    caustics: str
    lenstronomy: str

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"{self.name}: physical bounds must satisfy low < high")
        if not self.low <= self.prior_low < self.prior_high <= self.high:
            raise ValueError(f"{self.name}: default prior must lie inside the physical bounds")
        if self.prior not in ("uniform", "loguniform"):
            raise ValueError(f"{self.name}: unknown prior family {self.prior!r}")
        if self.prior == "loguniform" and self.prior_low <= 0:
            raise ValueError(f"{self.name}: a log-uniform prior needs prior_low > 0")
        if math.isinf(self.low) or (math.isinf(self.high) and self.low != 0.0):
            raise ValueError(f"{self.name}: only (low, high) or (0, inf) bounds are supported")


_AMP = "ct / (s arcsec2)"
_E = 0.7  # |e1|, |e2| < 0.7 keeps |e| < 0.99, i.e. q > 0.005, for any pair


# fmt: off
def _sersic(component: str, tex: str, kw: str, amp: tuple[float, float],
            r: tuple[float, float], n: tuple[float, float], e: float,
            c: float) -> tuple[ParamSpec, ...]:
    """The seven SERSIC_ELLIPSE entries of one light component (caustics module ``component``)."""
    p = component
    return (
        ParamSpec(f"{p}_amp", _AMP, 0.0, math.inf, "loguniform", *amp,
                  rf"$I_{{\rm {tex}}}$ [ct s$^{{-1}}$ arcsec$^{{-2}}$]", f"{p}.Ie", f"{kw}[0].amp"),
        ParamSpec(f"{p}_r_sersic", "arcsec", 0.01, 10.0, "uniform", *r,
                  rf"$R_{{\rm {tex}}}$ [arcsec]", f"{p}.Re", f"{kw}[0].R_sersic"),
        ParamSpec(f"{p}_n_sersic", "", 0.3, 8.0, "uniform", *n,
                  rf"$n_{{\rm {tex}}}$", f"{p}.n", f"{kw}[0].n_sersic"),
        ParamSpec(f"{p}_e1", "", -_E, _E, "uniform", -e, e,
                  rf"$e_{{1,\rm {tex}}}$", f"{p}.q,phi", f"{kw}[0].e1"),
        ParamSpec(f"{p}_e2", "", -_E, _E, "uniform", -e, e,
                  rf"$e_{{2,\rm {tex}}}$", f"{p}.q,phi", f"{kw}[0].e2"),
        ParamSpec(f"{p}_center_x", "arcsec", -4.0, 4.0, "uniform", -c, c,
                  rf"$x_{{\rm {tex}}}$ [arcsec]", f"{p}.x0", f"{kw}[0].center_x"),
        ParamSpec(f"{p}_center_y", "arcsec", -4.0, 4.0, "uniform", -c, c,
                  rf"$y_{{\rm {tex}}}$ [arcsec]", f"{p}.y0", f"{kw}[0].center_y"),
    )


#: SIE + external shear + elliptical Sersic source + elliptical Sersic lens light.
#: Columns: name, unit, physical low/high, prior family, prior low/high, label, caustics,
#: lenstronomy.
REGISTRY: tuple[ParamSpec, ...] = (
    ParamSpec("lens_theta_e", "arcsec", 0.0, 10.0, "uniform", 0.5, 2.0,
              r"$\theta_{\rm E}$ [arcsec]", "sie.Rein", "kwargs_lens[0].theta_E"),
    ParamSpec("lens_e1", "", -_E, _E, "uniform", -0.3, 0.3,
              r"$e_1$", "sie.q,phi", "kwargs_lens[0].e1"),
    ParamSpec("lens_e2", "", -_E, _E, "uniform", -0.3, 0.3,
              r"$e_2$", "sie.q,phi", "kwargs_lens[0].e2"),
    ParamSpec("lens_center_x", "arcsec", -2.0, 2.0, "uniform", -0.2, 0.2,
              r"$x_{\rm lens}$ [arcsec]", "sie.x0", "kwargs_lens[0].center_x"),
    ParamSpec("lens_center_y", "arcsec", -2.0, 2.0, "uniform", -0.2, 0.2,
              r"$y_{\rm lens}$ [arcsec]", "sie.y0", "kwargs_lens[0].center_y"),
    ParamSpec("shear_gamma1", "", -0.5, 0.5, "uniform", -0.1, 0.1,
              r"$\gamma_1$", "shear.gamma_1", "kwargs_lens[1].gamma1"),
    ParamSpec("shear_gamma2", "", -0.5, 0.5, "uniform", -0.1, 0.1,
              r"$\gamma_2$", "shear.gamma_2", "kwargs_lens[1].gamma2"),
    *_sersic("source", "src", "kwargs_source", amp=(2.0, 200.0), r=(0.05, 0.6),
             n=(0.5, 4.0), e=0.4, c=0.5),
    *_sersic("lens_light", "ll", "kwargs_lens_light", amp=(5.0, 500.0), r=(0.3, 2.5),
             n=(1.0, 6.0), e=0.3, c=0.2),
)
# fmt: on

#: Column order of every ``theta`` tensor in lensflow.
NAMES: tuple[str, ...] = tuple(p.name for p in REGISTRY)

#: Parameters in image flux units (surface brightness): they scale with the image's flux
#: units, every other parameter is independent of them (``Observation.scaled``).
FLUX_NAMES: tuple[str, ...] = tuple(p.name for p in REGISTRY if p.unit == _AMP)


def scale_flux(theta: Tensor, factor: float | Tensor) -> Tensor:
    """``theta`` in other flux units: a copy with the ``FLUX_NAMES`` columns times ``factor``.

    Args:
        theta: Parameters, shape ``(..., D)``, columns ``NAMES``.
        factor: A number, or one factor per row, shape ``theta.shape[:-1]``.

    Returns:
        The scaled copy, same shape and dtype.

    Example:
        >>> theta = torch.ones(2, len(NAMES))
        >>> out = scale_flux(theta, torch.tensor([2.0, 3.0]))
        >>> out[:, index("source_amp")].tolist(), out[:, index("lens_theta_e")].tolist()
        ([2.0, 3.0], [1.0, 1.0])
    """
    columns = [NAMES.index(name) for name in FLUX_NAMES]
    factor = torch.as_tensor(factor, dtype=theta.dtype, device=theta.device)
    out = theta.clone()
    out[..., columns] = out[..., columns] * factor[..., None]
    return out


def index(name: str, specs: Sequence[ParamSpec] = REGISTRY) -> int:
    """Column of ``name`` in ``theta``.

    Args:
        name: A registry name such as ``"lens_theta_e"``.
        specs: The parameter registry.

    Returns:
        The column index.

    Raises:
        KeyError: If the name is not in the registry (the message lists the valid names).
    """
    for i, p in enumerate(specs):
        if p.name == name:
            return i
    raise KeyError(f"unknown parameter {name!r}; valid names: {', '.join(p.name for p in specs)}")


def qphi_to_e1e2(q: Tensor, phi: Tensor) -> tuple[Tensor, Tensor]:
    """Axis ratio and position angle to lenstronomy's ellipticity components.

    Args:
        q: Axis ratio b/a in (0, 1], any shape.
        phi: Position angle of the major axis in radians, counter-clockwise from +x.

    Returns:
        ``(e1, e2)``, each of the broadcast shape of the inputs.

    Example:
        >>> e1, e2 = qphi_to_e1e2(torch.tensor(0.5), torch.tensor(0.0))
        >>> round(float(e1), 6), round(float(e2), 6)
        (0.333333, 0.0)
    """
    e = (1 - q) / (1 + q)
    return e * torch.cos(2 * phi), e * torch.sin(2 * phi)


def e1e2_to_qphi(e1: Tensor, e2: Tensor) -> tuple[Tensor, Tensor]:
    """Ellipticity components to axis ratio and position angle.

    The inverse of :func:`qphi_to_e1e2` with ``phi`` in (-pi/2, pi/2]. At ``e1 = e2 = 0``
    exactly the angle is set to 0 and its gradient to 0 (a circle has no orientation), so
    autograd never returns NaN there.

    Args:
        e1: First ellipticity component, any shape, ``|e| < 1``.
        e2: Second ellipticity component, same shape.

    Returns:
        ``(q, phi)``: axis ratio in (0, 1] and angle in radians.
    """
    e_sq = e1**2 + e2**2
    round_ = e_sq < 1e-24
    # Double-where keeps both sqrt and atan2 off their singular point at e = 0.
    e = torch.where(round_, torch.zeros_like(e_sq), torch.sqrt(torch.where(round_, 1.0, e_sq)))
    phi = torch.where(
        round_,
        torch.zeros_like(e_sq),
        0.5 * torch.atan2(torch.where(round_, 0.0, e2), torch.where(round_, 1.0, e1)),
    )
    return (1 - e) / (1 + e), phi


# --- caustics -------------------------------------------------------------------------------

#: caustics parameters of the default model, in ``LensSource.param_order()`` order.
CAUSTICS_ORDER: tuple[str, ...] = (
    "sie.x0", "sie.y0", "sie.q", "sie.phi", "sie.Rein", "shear.gamma_1", "shear.gamma_2",
    "source.x0", "source.y0", "source.q", "source.phi", "source.n", "source.Re", "source.Ie",
    "lens_light.x0", "lens_light.y0", "lens_light.q", "lens_light.phi", "lens_light.n",
    "lens_light.Re", "lens_light.Ie",
)  # fmt: skip


def to_caustics(theta: Tensor) -> dict[str, Tensor]:
    """Registry parameters to caustics' (q, phi, major-axis Re) parametrization.

    Args:
        theta: Physical parameters, shape ``(..., 21)``, columns ``NAMES``.

    Returns:
        Mapping from ``CAUSTICS_ORDER`` names to tensors of shape ``(...)``.
    """
    col = {n: theta[..., i] for i, n in enumerate(NAMES)}
    out = {
        "sie.x0": col["lens_center_x"],
        "sie.y0": col["lens_center_y"],
        "sie.Rein": col["lens_theta_e"],
        "shear.gamma_1": col["shear_gamma1"],
        "shear.gamma_2": col["shear_gamma2"],
    }
    out["sie.q"], out["sie.phi"] = e1e2_to_qphi(col["lens_e1"], col["lens_e2"])
    for c in ("source", "lens_light"):
        q, phi = e1e2_to_qphi(col[f"{c}_e1"], col[f"{c}_e2"])
        out[f"{c}.x0"] = col[f"{c}_center_x"]
        out[f"{c}.y0"] = col[f"{c}_center_y"]
        out[f"{c}.q"], out[f"{c}.phi"] = q, phi
        out[f"{c}.n"] = col[f"{c}_n_sersic"]
        # lenstronomy's R_sersic is sqrt(a b); caustics' Re is the semi-major axis.
        out[f"{c}.Re"] = col[f"{c}_r_sersic"] / torch.sqrt(q)
        out[f"{c}.Ie"] = col[f"{c}_amp"]
    return {k: out[k] for k in CAUSTICS_ORDER}


def from_caustics(values: dict[str, Tensor]) -> Tensor:
    """Inverse of :func:`to_caustics`.

    Args:
        values: Mapping with every ``CAUSTICS_ORDER`` name, tensors of shape ``(...)``.

    Returns:
        Physical parameters, shape ``(..., 21)``, columns ``NAMES``.
    """
    col = {
        "lens_theta_e": values["sie.Rein"],
        "lens_center_x": values["sie.x0"],
        "lens_center_y": values["sie.y0"],
        "shear_gamma1": values["shear.gamma_1"],
        "shear_gamma2": values["shear.gamma_2"],
    }
    col["lens_e1"], col["lens_e2"] = qphi_to_e1e2(values["sie.q"], values["sie.phi"])
    for c in ("source", "lens_light"):
        q = values[f"{c}.q"]
        col[f"{c}_e1"], col[f"{c}_e2"] = qphi_to_e1e2(q, values[f"{c}.phi"])
        col[f"{c}_center_x"] = values[f"{c}.x0"]
        col[f"{c}_center_y"] = values[f"{c}.y0"]
        col[f"{c}_n_sersic"] = values[f"{c}.n"]
        col[f"{c}_r_sersic"] = values[f"{c}.Re"] * torch.sqrt(q)
        col[f"{c}_amp"] = values[f"{c}.Ie"]
    return torch.stack([col[n] for n in NAMES], dim=-1)


# --- unconstrained, standardized space for the networks -----------------------------------


def _to_real(x: Tensor, p: ParamSpec) -> Tensor:
    """Bounded physical value -> R (scaled logit, or log for (0, inf))."""
    if math.isinf(p.high):
        return torch.log(x)
    s = (x - p.low) / (p.high - p.low)
    return torch.log(s) - torch.log1p(-s)


def _from_real(y: Tensor, p: ParamSpec) -> Tensor:
    """Inverse of :func:`_to_real`."""
    if math.isinf(p.high):
        return torch.exp(y)
    return p.low + (p.high - p.low) * torch.sigmoid(y)


@lru_cache(maxsize=8)
def unconstrained_stats(specs: tuple[ParamSpec, ...] = REGISTRY) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of the specs' prior in the bounds-transformed space.

    Computed deterministically by the midpoint rule over 20,001 prior quantiles (float64),
    so every process and every checkpoint agrees bit for bit.

    Args:
        specs: The parameter registry (a tuple, so the result can be cached).

    Returns:
        ``(loc, scale)``, each of shape ``(D,)``, float64.
    """
    q = (torch.arange(20001, dtype=torch.float64) + 0.5) / 20001
    locs, scales = [], []
    for p in specs:
        if p.prior == "uniform":
            x = p.prior_low + (p.prior_high - p.prior_low) * q
        else:
            x = p.prior_low * (p.prior_high / p.prior_low) ** q
        y = _to_real(x, p)
        locs.append(y.mean())
        scales.append(y.std())
    return torch.stack(locs), torch.stack(scales)


def _check_width(theta: Tensor, specs: Sequence[ParamSpec]) -> None:
    if theta.shape[-1] != len(specs):
        raise ValueError(
            f"theta has {theta.shape[-1]} columns but the registry has {len(specs)} parameters"
        )


def to_unconstrained(theta: Tensor, specs: Sequence[ParamSpec] = REGISTRY) -> Tensor:
    """Physical parameters -> standardized, unconstrained ``u`` (what the flow sees).

    Args:
        theta: Physical parameters, shape ``(..., D)``, strictly inside the physical
            bounds (a value on a bound maps to +-inf).
        specs: The parameter registry.

    Returns:
        ``u``, shape ``(..., D)``, about zero mean and unit variance under the prior.

    Example:
        >>> from lensflow.prior import Prior
        >>> theta = Prior().sample((4,))
        >>> torch.allclose(from_unconstrained(to_unconstrained(theta)), theta, atol=1e-5)
        True
    """
    _check_width(theta, specs)
    loc, scale = unconstrained_stats(tuple(specs))
    y = torch.stack([_to_real(theta[..., i], p) for i, p in enumerate(specs)], dim=-1)
    return (y - loc.to(y)) / scale.to(y)


def from_unconstrained(u: Tensor, specs: Sequence[ParamSpec] = REGISTRY) -> Tensor:
    """Inverse of :func:`to_unconstrained`.

    Args:
        u: Standardized unconstrained values, shape ``(..., D)``.
        specs: The parameter registry.

    Returns:
        Physical parameters, shape ``(..., D)``, inside the physical bounds.
    """
    _check_width(u, specs)
    loc, scale = unconstrained_stats(tuple(specs))
    y = u * scale.to(u) + loc.to(u)
    return torch.stack([_from_real(y[..., i], p) for i, p in enumerate(specs)], dim=-1)


def _log_dreal(x: Tensor, p: ParamSpec) -> Tensor:
    """log of d(_to_real)/dx, elementwise."""
    if math.isinf(p.high):
        return -torch.log(x)
    return math.log(p.high - p.low) - torch.log(x - p.low) - torch.log(p.high - x)


class UnconstrainedTransform:
    """``to_unconstrained`` as an object with its log-Jacobian (what ``FlowPosterior`` takes).

    Args:
        specs: The parameter registry.

    Example:
        >>> from lensflow.prior import Prior
        >>> tr = UnconstrainedTransform()
        >>> theta = Prior(dtype=torch.float64).sample((2,))
        >>> torch.allclose(tr.from_u(tr.to_u(theta)), theta)
        True
    """

    def __init__(self, specs: Sequence[ParamSpec] = REGISTRY) -> None:
        self.specs = tuple(specs)

    def to_u(self, theta: Tensor) -> Tensor:
        """Physical ``(..., D)`` -> standardized unconstrained ``(..., D)``."""
        return to_unconstrained(theta, self.specs)

    def from_u(self, u: Tensor) -> Tensor:
        """Standardized unconstrained ``(..., D)`` -> physical ``(..., D)``."""
        return from_unconstrained(u, self.specs)

    def log_abs_det(self, theta: Tensor) -> Tensor:
        """``log |det du/dtheta|``, shape ``(...)``, for physical ``theta`` ``(..., D)``."""
        _check_width(theta, self.specs)
        _, scale = unconstrained_stats(self.specs)
        terms = torch.stack([_log_dreal(theta[..., i], p) for i, p in enumerate(self.specs)], -1)
        return terms.sum(-1) - torch.log(scale.to(theta)).sum()
