"""Fixed-step solvers: analytic answers, convergence order, backwards integration."""

import math

import pytest
import torch

from lensflow.solvers import SOLVERS, euler, get_solver, heun, midpoint, rk4


@pytest.mark.parametrize(("solver", "atol"), [(euler, 2e-2), (midpoint, 1e-4), (heun, 1e-4),
                                              (rk4, 1e-10)])  # fmt: skip
def test_solver_matches_analytic_field(solver, atol):
    # dx/dt = 3 t^2 from x = 0 gives x(1) = 1; euler's error is 1.5 / n_steps, the second-order
    # ones' O(n^-2); rk4 integrates a quadratic exactly.
    x1 = solver(lambda t, x: 3 * t**2 * torch.ones_like(x), torch.zeros(4, 2, dtype=torch.float64),
                n_steps=100)  # fmt: skip
    torch.testing.assert_close(x1, torch.ones(4, 2, dtype=torch.float64), rtol=0, atol=atol)


@pytest.mark.parametrize(("name", "order"), [("euler", 1), ("midpoint", 2), ("heun", 2),
                                             ("rk4", 4)])  # fmt: skip
def test_solver_convergence_order(name, order):
    # dx/dt = x cos(t): x(1) = exp(sin 1). Halving the step divides the error by 2^order.
    solver = get_solver(name)
    exact = math.exp(math.sin(1.0))
    errs = [abs(solver(lambda t, x: x * torch.cos(t), torch.ones(1, dtype=torch.float64),
                       n_steps=n).item() - exact) for n in (16, 32)]  # fmt: skip
    assert abs(math.log2(errs[0] / errs[1]) - order) < 0.3


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_backwards_inverts_forwards(name):
    f = lambda t, x: torch.sin(3 * t) * x + t
    x0 = torch.randn(5, 3, dtype=torch.float64)
    solver = get_solver(name)
    back = solver(f, solver(f, x0, n_steps=400), n_steps=400, t0=1.0, t1=0.0)
    tol = {"euler": 2e-2, "midpoint": 1e-4, "heun": 1e-4, "rk4": 1e-9}[name]
    torch.testing.assert_close(back, x0, rtol=0, atol=tol)


def test_get_solver_unknown_and_bad_steps():
    with pytest.raises(ValueError, match="rk4"):
        get_solver("dopri5")
    with pytest.raises(ValueError, match="n_steps"):
        euler(lambda t, x: x, torch.zeros(1), n_steps=0)
