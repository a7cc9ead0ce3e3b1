"""Flow-matching posterior q(theta | x): vector field, loss, sampling and log-density.

Convention: t = 0 is base noise z ~ N(0, I); t = 1 is the standardized parameters u.
Optimal-transport path with ``sigma_min``::

    u_t = t u + (1 - (1 - sigma_min) t) z,   target velocity  w = u - (1 - sigma_min) z

Time sampling is stratified uniform, optionally warped as ``t = s ** (1 / (1 + alpha))``
(larger ``alpha`` trains more near t = 1). The observation is embedded once per
observation and reused across every ODE step and sample. Nothing here knows about lenses:
the parameter transform (physical theta <-> u) is passed in.

References:
    Lipman et al. 2023, "Flow Matching for Generative Modeling", ICLR.
    Holzschuh & Thuerey 2024, "Flow Matching for Posterior Inference with Simulator
    Feedback", arXiv:2410.22573.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from lensflow.nn import ResidualMLP, TimeEmbedding
from lensflow.solvers import get_solver

__all__ = [
    "FlowMatchingLoss",
    "FlowPosterior",
    "IdentityTransform",
    "ParamTransform",
    "VectorField",
    "base_noise",
    "flow_matching_loss",
    "sample_times",
]

Drift = Callable[[Tensor, Tensor, Tensor], Tensor]  # (u_t (B,D), t (B,), h (B,E)) -> (B,D)


class VectorField(nn.Module):
    """Conditional velocity v(u_t, t, x): an encoder of x and a residual MLP.

    Args:
        dim: Parameter dimension ``D``.
        encoder: Module mapping an observation batch to ``(B, embed_dim)``.
        embed_dim: Output size of ``encoder``.
        width: Hidden width of the MLP.
        n_blocks: Residual blocks of the MLP.
        time_dim: Size of the sinusoidal time embedding.

    Example:
        >>> from lensflow.nn import VectorEncoder
        >>> field = VectorField(2, VectorEncoder(3, 8), 8, width=16, n_blocks=1)
        >>> field(torch.zeros(4, 2), torch.zeros(4, 3), torch.rand(4)).shape
        torch.Size([4, 2])
    """

    def __init__(
        self, dim: int, encoder: nn.Module, embed_dim: int, *, width: int = 256,
        n_blocks: int = 4, time_dim: int = 64,
    ) -> None:  # fmt: skip
        super().__init__()
        self.dim = dim
        self.encoder = encoder
        self.time = TimeEmbedding(time_dim)
        self.mlp = ResidualMLP(dim + time_dim + embed_dim, dim, width=width, n_blocks=n_blocks)

    def embed(self, x: Tensor) -> Tensor:
        """Embed observations once: ``x`` batch -> ``(B, embed_dim)``."""
        return self.encoder(x)

    def velocity(self, u_t: Tensor, t: Tensor, h: Tensor) -> Tensor:
        """Velocity from an embedding.

        Args:
            u_t: States, shape ``(B, D)``.
            t: Times, shape ``(B,)`` or ``()``.
            h: Embeddings, shape ``(B, E)``.

        Returns:
            Velocities, shape ``(B, D)``.
        """
        t = t.expand(u_t.shape[:-1]) if t.ndim == 0 else t
        return self.mlp(torch.cat([u_t, self.time(t), h], dim=-1))

    def forward(self, u_t: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Velocity ``(B, D)`` for states ``(B, D)``, observations ``x`` and times ``(B,)``."""
        return self.velocity(u_t, t, self.embed(x))


def sample_times(
    n: int, *, alpha: float = 0.0, t_min: float = 0.0, t_max: float = 1.0,
    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:  # fmt: skip
    """Stratified flow times, warped towards t = 1 by ``alpha`` and mapped to a range.

    Args:
        n: Number of times.
        alpha: Warp exponent: ``t = s ** (1 / (1 + alpha))``; 0 is uniform.
        t_min: Lower end of the range (``t_start`` when finetuning a control).
        t_max: Upper end of the range.
        generator: Torch generator.
        device: Device of the result.
        dtype: Dtype of the result.

    Returns:
        Times, shape ``(n,)``, in ``[t_min, t_max]``, in random order.
    """
    if alpha < 0 or not 0 <= t_min < t_max <= 1:
        raise ValueError(f"invalid time sampling alpha={alpha}, range=({t_min}, {t_max})")
    r = torch.rand(n, generator=generator, device=device, dtype=dtype)
    perm = torch.randperm(n, generator=generator, device=device)
    s = (perm.to(dtype) + r) / n  # one draw per stratum, shuffled
    return t_min + (t_max - t_min) * s ** (1.0 / (1.0 + alpha))


def flow_matching_loss(
    drift: Drift, u: Tensor, h: Tensor, t: Tensor, z: Tensor, *, sigma_min: float = 1e-4
) -> Tensor:
    """Conditional flow-matching loss of a drift on the OT path.

    Args:
        drift: ``drift(u_t, t, h)`` -> velocity ``(B, D)``.
        u: Standardized parameters, shape ``(B, D)``.
        h: Observation embeddings (or raw observations, whatever ``drift`` takes), ``(B, ...)``.
        t: Times, shape ``(B,)``.
        z: Base noise, shape ``(B, D)``.
        sigma_min: Width of the path at t = 1.

    Returns:
        Mean squared error over batch and dimensions (a scalar).
    """
    tt = t[:, None]
    u_t = tt * u + (1 - (1 - sigma_min) * tt) * z
    target = u - (1 - sigma_min) * z
    return ((drift(u_t, t, h) - target) ** 2).mean()


class FlowMatchingLoss(nn.Module):
    """The pretraining loss of a ``VectorField``.

    Args:
        field: The vector field.
        sigma_min: Width of the OT path at t = 1.
        alpha: Time warp exponent (0 = uniform).
        times_per_example: Draws of ``(t, z)`` per example. Each observation is embedded
            once and its embedding reused by every draw, so values above 1 add cheap MLP
            work per costly image (simulation and encoder); 1 keeps the random stream of
            the earlier single-draw loss.
    """

    def __init__(
        self,
        field: VectorField,
        *,
        sigma_min: float = 1e-4,
        alpha: float = 0.0,
        times_per_example: int = 1,
    ) -> None:
        super().__init__()
        if times_per_example < 1:
            raise ValueError(f"times_per_example must be >= 1, got {times_per_example!r}")
        self.field = field
        self.sigma_min = sigma_min
        self.alpha = alpha
        self.times_per_example = times_per_example

    def forward(self, u: Tensor, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Loss for standardized parameters ``u`` ``(B, D)`` and observations ``x``."""
        h = self.field.embed(x)
        if self.times_per_example > 1:
            u = u.repeat(self.times_per_example, 1)
            h = h.repeat(self.times_per_example, 1)
        t = sample_times(u.shape[0], alpha=self.alpha, generator=generator, device=u.device,
                         dtype=u.dtype)  # fmt: skip
        z = torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
        return flow_matching_loss(self.field.velocity, u, h, t, z, sigma_min=self.sigma_min)


def base_noise(
    n: int, b: int, dim: int, like: Tensor, *, generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """The sampler's base noise, sample-major ``(n B, D)`` (row ``i`` is observation ``i % B``).

    Args:
        n: Samples per observation.
        b: Observations.
        dim: Parameter dimension ``D``.
        like: Tensor giving device and dtype.
        generator: Torch generator, used when ``noise`` is None.
        noise: Given noise, shape ``(n, B, D)``.

    Returns:
        Noise, shape ``(n B, D)``.
    """
    if noise is None:
        return torch.randn((n * b, dim), generator=generator, device=like.device,
                           dtype=like.dtype)  # fmt: skip
    if tuple(noise.shape) != (n, b, dim):
        raise ValueError(f"noise must have shape {(n, b, dim)}, got {tuple(noise.shape)}")
    return noise.to(like).reshape(n * b, dim)


class ParamTransform(Protocol):
    """Physical parameters <-> the flow's standardized space (elementwise)."""

    def to_u(self, theta: Tensor) -> Tensor: ...

    def from_u(self, u: Tensor) -> Tensor: ...

    def log_abs_det(self, theta: Tensor) -> Tensor:
        """``log |det d u / d theta|``, shape ``(...)`` for ``theta`` ``(..., D)``."""
        ...


class IdentityTransform:
    """The flow works on the parameters directly."""

    def to_u(self, theta: Tensor) -> Tensor:
        return theta

    def from_u(self, u: Tensor) -> Tensor:
        return u

    def log_abs_det(self, theta: Tensor) -> Tensor:
        return theta.new_zeros(theta.shape[:-1])


class FlowPosterior(nn.Module):
    """Posterior q(theta | x) from a vector field, sampled and evaluated by ODE solves.

    Args:
        field: The trained vector field.
        transform: Physical <-> standardized parameters (identity by default).
        n_steps: Default number of solver steps.
        solver: Default solver name (``euler``, ``midpoint``, ``heun``, ``rk4``).
    """

    def __init__(
        self, field: VectorField, transform: ParamTransform | None = None, *,
        n_steps: int = 32, solver: str = "midpoint",
    ) -> None:  # fmt: skip
        super().__init__()
        self.field = field
        self.transform = transform or IdentityTransform()
        self.n_steps = n_steps
        self.solver = solver

    def drift(self, u_t: Tensor, t: Tensor, h: Tensor) -> Tensor:
        """The velocity the sampler integrates (subclasses add control)."""
        return self.field.velocity(u_t, t, h)

    @torch.no_grad()
    def sample_u(
        self, x: Tensor, n: int, *, n_steps: int | None = None, solver: str | None = None,
        generator: torch.Generator | None = None, noise: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Draw ``n`` samples per observation in the standardized space.

        Args:
            x: Observations, batch of ``B``.
            n: Samples per observation.
            n_steps: Solver steps (default ``self.n_steps``).
            solver: Solver name (default ``self.solver``).
            generator: Torch generator for the base noise.
            noise: Base noise ``(n, B, D)`` to start from instead of drawing it (e.g. drawn
                per observation from its own seed); ``generator`` is then unused.

        Returns:
            ``u`` samples, shape ``(n, B, D)``.
        """
        h = self.field.embed(x)  # embedded once, reused by every step and sample
        b = h.shape[0]
        h_rep = h.unsqueeze(0).expand(n, *h.shape).reshape(n * b, -1)
        z = base_noise(n, b, self.field.dim, h, generator=generator, noise=noise)
        u = get_solver(solver or self.solver)(
            lambda t, u_t: self.drift(u_t, t, h_rep), z, n_steps=n_steps or self.n_steps
        )
        return u.reshape(n, b, self.field.dim)

    def sample(
        self, x: Tensor, n: int, *, n_steps: int | None = None, solver: str | None = None,
        generator: torch.Generator | None = None, noise: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Draw ``n`` posterior samples per observation, in physical units.

        Args:
            x: Observations, batch of ``B``.
            n: Samples per observation.
            n_steps: Solver steps (default ``self.n_steps``).
            solver: Solver name (default ``self.solver``).
            generator: Torch generator for the base noise.
            noise: Base noise ``(n, B, D)`` instead of drawing it (see ``sample_u``).

        Returns:
            ``theta`` samples, shape ``(n, B, D)``.
        """
        u = self.sample_u(x, n, n_steps=n_steps, solver=solver, generator=generator,
                          noise=noise)  # fmt: skip
        return self.transform.from_u(u)

    def log_prob(
        self, theta: Tensor, x: Tensor, *, n_steps: int | None = None, solver: str | None = None
    ) -> Tensor:
        """log q(theta | x) by integrating the exact divergence from t = 1 back to t = 0.

        Args:
            theta: Physical parameters, shape ``(B, D)``, one per observation.
            x: Observations, batch of ``B``.
            n_steps: Solver steps (default ``self.n_steps``).
            solver: Solver name (default ``self.solver``).

        Returns:
            Log-densities in physical units, shape ``(B,)``.
        """
        d = self.field.dim
        with torch.no_grad():
            h = self.field.embed(x)
            u1 = self.transform.to_u(theta)

        def single(u: Tensor, t: Tensor, hh: Tensor) -> Tensor:
            return self.drift(u[None], t, hh[None])[0]

        jac = torch.func.vmap(torch.func.jacrev(single), in_dims=(0, None, 0))

        def augmented(t: Tensor, state: Tensor) -> Tensor:
            u = state[:, :d]
            with torch.no_grad():
                v = self.drift(u, t, h)
                div = torch.diagonal(jac(u, t, h), dim1=-2, dim2=-1).sum(-1)
            return torch.cat([v, div[:, None]], dim=-1)

        state = torch.cat([u1, u1.new_zeros(u1.shape[0], 1)], dim=-1)
        # Backwards from t = 1: the extra coordinate accumulates -int_0^1 div v dt.
        out = get_solver(solver or self.solver)(
            augmented, state, n_steps=n_steps or self.n_steps, t0=1.0, t1=0.0
        )
        u0, delta = out[:, :d], out[:, d]
        log_base = -0.5 * (u0**2).sum(-1) - 0.5 * d * math.log(2 * math.pi)
        return log_base + delta + self.transform.log_abs_det(theta)
