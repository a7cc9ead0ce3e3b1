"""Fixed-step ODE solvers with one signature: ``solver(f, x0, n_steps=, t0=, t1=) -> x1``.

``f(t, x)`` returns ``dx/dt`` for a state ``x`` of any shape; ``t`` is a 0-dim tensor on
``x``'s device and dtype. Integration may run backwards (``t1 < t0``), as the log-density
does. The solvers know nothing about flows or lenses.

Convention: flow time runs from t = 0 (base noise) to t = 1 (parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import Tensor

__all__ = ["SOLVERS", "Solver", "euler", "get_solver", "heun", "midpoint", "rk4"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]


class Solver(Protocol):
    """The signature every solver shares."""

    def __call__(
        self, f: VelocityFn, x0: Tensor, *, n_steps: int = 64, t0: float = 0.0, t1: float = 1.0
    ) -> Tensor: ...


def _check(n_steps: int) -> None:
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")


def euler(
    f: VelocityFn, x0: Tensor, *, n_steps: int = 64, t0: float = 0.0, t1: float = 1.0
) -> Tensor:
    """Explicit Euler, first order: one evaluation of ``f`` per step.

    Args:
        f: Velocity ``f(t, x) -> dx/dt``, same shape as ``x``.
        x0: State at ``t0``, any shape.
        n_steps: Number of equal steps.
        t0: Start time.
        t1: End time (may be smaller than ``t0``).

    Returns:
        The state at ``t1``, shape of ``x0``.

    Example:
        >>> import torch
        >>> x1 = euler(lambda t, x: torch.ones_like(x), torch.zeros(2), n_steps=4)
        >>> x1.tolist()
        [1.0, 1.0]
    """
    _check(n_steps)
    h = (t1 - t0) / n_steps
    x = x0
    for i in range(n_steps):
        x = x + h * f(x.new_tensor(t0 + i * h), x)
    return x


def midpoint(
    f: VelocityFn, x0: Tensor, *, n_steps: int = 64, t0: float = 0.0, t1: float = 1.0
) -> Tensor:
    """Explicit midpoint, second order: two evaluations per step (same arguments as euler)."""
    _check(n_steps)
    h = (t1 - t0) / n_steps
    x = x0
    for i in range(n_steps):
        t = t0 + i * h
        x_mid = x + 0.5 * h * f(x.new_tensor(t), x)
        x = x + h * f(x.new_tensor(t + 0.5 * h), x_mid)
    return x


def heun(
    f: VelocityFn, x0: Tensor, *, n_steps: int = 64, t0: float = 0.0, t1: float = 1.0
) -> Tensor:
    """Heun's method (explicit trapezoid), second order: two evaluations per step."""
    _check(n_steps)
    h = (t1 - t0) / n_steps
    x = x0
    for i in range(n_steps):
        t = t0 + i * h
        k1 = f(x.new_tensor(t), x)
        k2 = f(x.new_tensor(t + h), x + h * k1)
        x = x + 0.5 * h * (k1 + k2)
    return x


def rk4(
    f: VelocityFn, x0: Tensor, *, n_steps: int = 64, t0: float = 0.0, t1: float = 1.0
) -> Tensor:
    """Classical Runge-Kutta, fourth order: four evaluations per step."""
    _check(n_steps)
    h = (t1 - t0) / n_steps
    x = x0
    for i in range(n_steps):
        t = t0 + i * h
        k1 = f(x.new_tensor(t), x)
        k2 = f(x.new_tensor(t + 0.5 * h), x + 0.5 * h * k1)
        k3 = f(x.new_tensor(t + 0.5 * h), x + 0.5 * h * k2)
        k4 = f(x.new_tensor(t + h), x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


#: Solvers by name, with their evaluations of ``f`` per step.
SOLVERS: dict[str, tuple[Solver, int]] = {
    "euler": (euler, 1),
    "midpoint": (midpoint, 2),
    "heun": (heun, 2),
    "rk4": (rk4, 4),
}


def get_solver(name: str) -> Solver:
    """Look up a solver by name.

    Args:
        name: ``"euler"``, ``"midpoint"``, ``"heun"`` or ``"rk4"``.

    Returns:
        The solver function.

    Raises:
        ValueError: For an unknown name (the message lists the solvers).
    """
    try:
        return SOLVERS[name][0]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}") from None
