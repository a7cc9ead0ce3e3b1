"""SBI benchmark tasks in torch: Two Moons, SLCP, Lotka-Volterra and SIR, as sbibm defines them.

Each task gives its prior (``prior`` for log-densities, ``sample_prior`` for draws with a
``generator``), ``simulate(theta, generator=...)`` and the bijection from the prior's support
to R^D that the flow works in (``to_unconstrained``/``from_unconstrained``: a logit on box
priors, a log on log-normal priors). Lotka-Volterra and SIR also expose the noiseless,
differentiable ODE forward model (``forward``) and their exact ``log_likelihood``, used as
costs by simulator feedback; SLCP has an exact likelihood too.

Conventions (all from sbibm 1.1.0, Lueckmann et al. 2021):
    * ``theta`` has shape ``(B, D)``, ``x`` shape ``(B, dim_data)``; dtype and device follow
      ``theta``.
    * Lotka-Volterra: prey ``x`` and predator ``y`` from ``(30, 1)`` over 20 days, saved
      every 0.1 day; the data are ``x`` then ``y`` at saves ``0, 21, ..., 189`` (20 values),
      each with log-normal noise of scale 0.1 around the clamped ODE solution.
    * SIR: ``N = 10^6``, ``(S, I, R) = (N - 1, 1, 0)`` over 160 days, saved daily; the data are
      binomial counts out of 1000 with probability ``I / N`` at days ``0, 17, ..., 153``.
    * The ODEs are solved by fixed-step RK4 in float64 (sbibm used Julia's adaptive solver);
      the step reproduces sbibm's stored Lotka-Volterra observations from their seeds to
      float32 precision (see ``tests/test_sbi.py``).

References:
    Lueckmann et al. 2021, "Benchmarking Simulation-Based Inference", AISTATS,
    arXiv:2101.04653; code: github.com/sbi-benchmark/sbibm (MIT).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, LogNormal, Uniform

__all__ = [
    "SIR",
    "SLCP",
    "TASKS",
    "LotkaVolterra",
    "Task",
    "TwoMoons",
    "get_task",
]


class Task(Protocol):
    """What the benchmark driver needs from a task."""

    name: str
    dim_parameters: int
    dim_data: int

    def prior(self) -> Distribution: ...

    def sample_prior(self, n: int, *, generator: torch.Generator | None = None) -> Tensor: ...

    def simulate(self, theta: Tensor, *, generator: torch.Generator | None = None) -> Tensor: ...

    def to_unconstrained(self, theta: Tensor) -> Tensor: ...

    def from_unconstrained(self, y: Tensor) -> Tensor: ...

    def log_abs_det(self, theta: Tensor) -> Tensor: ...

    def to_features(self, x: Tensor) -> Tensor: ...


class _BoxPrior:
    """Uniform prior on ``[low, high]^D`` with a logit bijection to R^D."""

    low: float
    high: float
    dim_parameters: int

    def prior(self) -> Distribution:
        """The prior ``U(low, high)^D`` (float32; cast ``theta`` to evaluate other dtypes)."""
        d = self.dim_parameters
        return Independent(Uniform(torch.full((d,), self.low), torch.full((d,), self.high)), 1)

    def sample_prior(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``(n, D)`` parameters from the prior."""
        r = torch.rand(n, self.dim_parameters, generator=generator)
        return self.low + (self.high - self.low) * r

    def to_unconstrained(self, theta: Tensor) -> Tensor:
        """Logit of the position in the box, shape ``(..., D)``."""
        p = (theta - self.low) / (self.high - self.low)
        return torch.logit(p)

    def from_unconstrained(self, y: Tensor) -> Tensor:
        """Inverse of ``to_unconstrained``."""
        return self.low + (self.high - self.low) * torch.sigmoid(y)

    def log_abs_det(self, theta: Tensor) -> Tensor:
        """``log |det d to_unconstrained / d theta|``, shape ``(...)``."""
        p = (theta - self.low) / (self.high - self.low)
        return -(torch.log(p) + torch.log1p(-p) + math.log(self.high - self.low)).sum(-1)

    def to_features(self, x: Tensor) -> Tensor:
        """The data as the network sees them before standardization (unchanged)."""
        return x


class _LogNormalPrior:
    """Log-normal prior with a log bijection to R^D."""

    loc: tuple[float, ...]
    scale: tuple[float, ...]

    def prior(self) -> Distribution:
        """The prior ``LogNormal(loc, scale)`` per parameter (float32)."""
        return Independent(LogNormal(torch.tensor(self.loc), torch.tensor(self.scale)), 1)

    def sample_prior(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``(n, D)`` parameters from the prior."""
        z = torch.randn(n, len(self.loc), generator=generator)
        return torch.exp(torch.tensor(self.loc) + torch.tensor(self.scale) * z)

    def to_unconstrained(self, theta: Tensor) -> Tensor:
        """``log theta``, shape ``(..., D)``."""
        return torch.log(theta)

    def from_unconstrained(self, y: Tensor) -> Tensor:
        """Inverse of ``to_unconstrained``."""
        return torch.exp(y)

    def log_abs_det(self, theta: Tensor) -> Tensor:
        """``log |det d log(theta) / d theta|``, shape ``(...)``."""
        return -torch.log(theta).sum(-1)


class TwoMoons(_BoxPrior):
    """Two Moons: ``theta ~ U(-1, 1)^2``, a crescent-shaped likelihood (sbibm ``two_moons``)."""

    name = "two_moons"
    dim_parameters = 2
    dim_data = 2
    low, high = -1.0, 1.0

    def simulate(self, theta: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Simulate ``x`` ``(B, 2)`` for ``theta`` ``(B, 2)``."""
        b = theta.shape[0]
        a = (torch.rand(b, generator=generator) - 0.5) * math.pi  # U(-pi/2, pi/2)
        r = 0.1 + 0.01 * torch.randn(b, generator=generator)
        a, r = a.to(theta), r.to(theta)
        p = torch.stack([torch.cos(a) * r + 0.25, torch.sin(a) * r], dim=-1)
        c = s = math.sqrt(0.5)  # rotation by -pi/4: cos = sqrt(1/2), sin = -sqrt(1/2)
        z0 = c * theta[:, 0] + s * theta[:, 1]
        z1 = -s * theta[:, 0] + c * theta[:, 1]
        return p + torch.stack([-z0.abs(), z1], dim=-1)


class SLCP(_BoxPrior):
    """SLCP: four 2-D Gaussian draws whose mean and covariance depend on ``theta`` (sbibm ``slcp``).

    ``theta ~ U(-3, 3)^5``; mean ``(theta_1, theta_2)``, standard deviations
    ``theta_3^2, theta_4^2`` and correlation ``tanh(theta_5)``; 1e-6 is added to the
    covariance diagonal as in sbibm. ``x`` is the four draws flattened, ``(B, 8)``.
    """

    name = "slcp"
    dim_parameters = 5
    dim_data = 8
    low, high = -3.0, 3.0

    @staticmethod
    def _cholesky(theta: Tensor) -> tuple[Tensor, Tensor]:
        s1, s2, rho = theta[:, 2] ** 2, theta[:, 3] ** 2, torch.tanh(theta[:, 4])
        v1, v2, c12 = s1**2 + 1e-6, s2**2 + 1e-6, rho * s1 * s2
        l11 = v1.sqrt()
        l21 = c12 / l11
        l22 = (v2 - l21**2).clamp_min(0.0).sqrt()
        zero = torch.zeros_like(l11)
        chol = torch.stack([torch.stack([l11, zero], -1), torch.stack([l21, l22], -1)], -2)
        return theta[:, :2], chol

    def simulate(self, theta: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Simulate ``x`` ``(B, 8)`` for ``theta`` ``(B, 5)``."""
        mean, chol = self._cholesky(theta)
        eps = torch.randn(theta.shape[0], 4, 2, generator=generator).to(theta)
        draws = mean[:, None, :] + torch.einsum("bij,bkj->bki", chol, eps)
        return draws.reshape(-1, 8)

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """Exact ``log p(x | theta)``, shape ``(B,)`` for ``theta`` ``(B, 5)``, ``x`` ``(B, 8)``."""
        mean, chol = self._cholesky(theta)
        r = x.reshape(-1, 4, 2) - mean[:, None, :]
        w = torch.linalg.solve_triangular(chol[:, None], r[..., None], upper=False)[..., 0]
        log_det = torch.log(chol[:, 0, 0]) + torch.log(chol[:, 1, 1])
        return (-0.5 * (w**2).sum(-1) - log_det[:, None] - math.log(2 * math.pi)).sum(-1)


def _rk4_grid(
    rhs: Callable[[Tensor], Tensor], u0: Tensor, *, dt_save: float, n_saves: int, n_sub: int
) -> Tensor:
    """Fixed-step RK4 from ``u0`` ``(B, S)``; returns the states at ``n_saves`` save times.

    The first save is ``u0``; saves are ``dt_save`` apart with ``n_sub`` steps between them.
    Returns shape ``(B, S, n_saves)``.
    """
    h = dt_save / n_sub
    u, saves = u0, [u0]
    for _ in range(n_saves - 1):
        for _ in range(n_sub):
            k1 = rhs(u)
            k2 = rhs(u + 0.5 * h * k1)
            k3 = rhs(u + 0.5 * h * k2)
            k4 = rhs(u + h * k3)
            u = u + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        saves.append(u)
    return torch.stack(saves, dim=-1)


class LotkaVolterra(_LogNormalPrior):
    """Lotka-Volterra predator-prey (sbibm ``lotka_volterra``).

    ``dx/dt = alpha x - beta x y``, ``dy/dt = -gamma y + delta x y``, parameters
    ``(alpha, beta, gamma, delta)`` with log-normal priors of log-means
    ``(-0.125, -3, -0.125, -3)`` and log-scale 0.5.

    Args:
        n_sub: RK4 steps per 0.1-day save interval (20 reproduces sbibm to float32).
    """

    name = "lotka_volterra"
    dim_parameters = 4
    dim_data = 20
    loc = (-0.125, -3.0, -0.125, -3.0)
    scale = (0.5, 0.5, 0.5, 0.5)
    noise_scale = 0.1

    def __init__(self, n_sub: int = 20) -> None:
        self.n_sub = n_sub

    def forward(self, theta: Tensor) -> Tensor:
        """Noiseless populations at the 10 subsampled times, ``(B, 20)``; differentiable.

        Computed in float64 and returned in the dtype of ``theta``; clamped to
        ``[1e-10, 1e4]`` as sbibm clamps before adding noise.
        """
        p = theta.double()
        a, b, g, d = p.unbind(-1)

        def rhs(u: Tensor) -> Tensor:
            x, y = u[:, 0], u[:, 1]
            return torch.stack([a * x - b * x * y, -g * y + d * x * y], dim=-1)

        u0 = p.new_tensor([30.0, 1.0]).expand(p.shape[0], 2)
        us = _rk4_grid(rhs, u0, dt_save=0.1, n_saves=201, n_sub=self.n_sub)
        out = us[:, :, ::21].reshape(p.shape[0], -1)
        return torch.nan_to_num(out, nan=1e4).clamp(1e-10, 1e4).to(theta.dtype)

    def simulate(self, theta: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Simulate ``x`` ``(B, 20)``: log-normal noise (scale 0.1) around ``forward``."""
        with torch.no_grad():
            mean = self.forward(theta)
        eps = torch.randn(mean.shape, generator=generator).to(mean)
        return torch.exp(torch.log(mean) + self.noise_scale * eps)

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """Exact ``log p(x | theta)``, shape ``(B,)``; differentiable in ``theta``."""
        r = (torch.log(x) - torch.log(self.forward(theta))) / self.noise_scale
        const = math.log(self.noise_scale) + 0.5 * math.log(2 * math.pi)
        return (-0.5 * r**2 - const - torch.log(x)).sum(-1)

    def to_features(self, x: Tensor) -> Tensor:
        """Log of the positive populations (the noise is multiplicative)."""
        return torch.log(x)


class SIR(_LogNormalPrior):
    """SIR epidemic model (sbibm ``sir``): contact rate ``beta`` and recovery rate ``gamma``.

    ``dS/dt = -beta S I / N``, ``dI/dt = beta S I / N - gamma I``, ``dR/dt = gamma I``;
    log-normal priors with log-means ``(log 0.4, log 0.125)`` and log-scales ``(0.5, 0.2)``.

    Args:
        n_sub: RK4 steps per one-day save interval.
    """

    name = "sir"
    dim_parameters = 2
    dim_data = 10
    loc = (math.log(0.4), math.log(0.125))
    scale = (0.5, 0.2)
    population = 1_000_000.0
    total_count = 1000

    def __init__(self, n_sub: int = 10) -> None:
        self.n_sub = n_sub

    def forward(self, theta: Tensor) -> Tensor:
        """Infected fraction ``I / N`` at days ``0, 17, ..., 153``, ``(B, 10)``; differentiable."""
        p = theta.double()
        beta, gamma = p.unbind(-1)
        n = self.population

        def rhs(u: Tensor) -> Tensor:
            infection = beta * u[:, 0] * u[:, 1] / n
            recovery = gamma * u[:, 1]
            return torch.stack([-infection, infection - recovery, recovery], dim=-1)

        u0 = p.new_tensor([n - 1.0, 1.0, 0.0]).expand(p.shape[0], 3)
        us = _rk4_grid(rhs, u0, dt_save=1.0, n_saves=161, n_sub=self.n_sub)
        return (us[:, 1, ::17] / n).clamp(0.0, 1.0).to(theta.dtype)

    def simulate(self, theta: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Simulate counts ``x`` ``(B, 10)``: ``Binomial(1000, I / N)`` at each save."""
        with torch.no_grad():
            probs = self.forward(theta)
        count = torch.full_like(probs, float(self.total_count))
        return torch.binomial(count.float(), probs.float(), generator=generator).to(theta)

    def log_likelihood(self, theta: Tensor, x: Tensor) -> Tensor:
        """Exact binomial ``log p(x | theta)``, shape ``(B,)``; differentiable in ``theta``."""
        probs = self.forward(theta)
        n = self.total_count
        log_binom = (
            torch.lgamma(x.new_tensor(n + 1.0)) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)
        )
        eps = torch.finfo(probs.dtype).tiny  # keeps 0 * log(0) = 0 where I / N underflows
        log_p = x * torch.log(probs + eps) + (n - x) * torch.log1p(-probs + eps)
        return (log_binom + log_p).sum(-1)

    def to_features(self, x: Tensor) -> Tensor:
        """The counts, unchanged (standardized later by the driver)."""
        return x


#: The tasks by sbibm name.
TASKS: dict[str, type] = {t.name: t for t in (TwoMoons, SLCP, LotkaVolterra, SIR)}


def get_task(name: str) -> Task:
    """Construct a task by its sbibm name.

    Args:
        name: ``"two_moons"``, ``"slcp"``, ``"lotka_volterra"`` or ``"sir"``.

    Returns:
        The task.

    Raises:
        ValueError: For an unknown name (the message lists the tasks).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]()
