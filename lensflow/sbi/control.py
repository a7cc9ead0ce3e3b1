"""Simulator feedback on the SBI tasks: costs, control signals and a finetune-and-score run.

Lotka-Volterra and SIR have differentiable ODE forward models (``task.forward``), so the
generic ``lensflow.feedback`` machinery applies as it does to lenses, through a
``GaussianCost`` on the task's data:

* Lotka-Volterra: the log-populations, with the task's own log-normal noise (sigma 0.1),
  so the reduced chi^2 is the exact negative log-likelihood up to constants.
* SIR: the binomial counts in a Gaussian approximation with the observed-count variance,
  sigma = sqrt(x + 1) (Neyman's chi^2; the +1 keeps zero counts finite).

The signals are ``GradientSignal`` (cost and its gradient), ``ResidualSignal`` (a learned
``VectorEncoder`` of the residual) and ``ZeroSignal`` (the ablation). The cost uses a coarser
RK4 step than the simulator (``n_sub``) because it is evaluated at every controlled solver
step for every sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from lensflow.feedback import (
    ControlledPosterior,
    FinetuneConfig,
    GaussianCost,
    GradientSignal,
    ObservedData,
    ResidualSignal,
    ZeroSignal,
    finetune,
    sample_feedback,
    tensor_batches,
)
from lensflow.flow import FlowPosterior
from lensflow.metrics import c2st
from lensflow.nn import VectorEncoder
from lensflow.sbi.bench import BenchConfig, BenchResult, simulate_budget, train_posterior
from lensflow.sbi.reference import N_OBSERVATIONS, load_reference
from lensflow.sbi.tasks import SIR, LotkaVolterra, Task

__all__ = ["SIGNALS", "observed_data", "run_feedback_benchmark", "task_cost"]


def task_cost(task: Task, posterior: FlowPosterior, *, n_sub: int = 5) -> GaussianCost:
    """The feedback cost of an ODE task, in the posterior's standardized space.

    Args:
        task: ``LotkaVolterra`` or ``SIR``.
        posterior: The base flow (its transform maps ``u`` to ``theta``).
        n_sub: RK4 steps per save interval of the cost's forward model.

    Returns:
        A reduced-chi^2 cost ``cost(u (B, D), obs) -> (B,)``; compare with ``observed_data``.

    Raises:
        TypeError: For a task without a differentiable ODE forward model.
    """
    if isinstance(task, LotkaVolterra):
        ode = LotkaVolterra(n_sub=n_sub)
        return GaussianCost(lambda theta: torch.log(ode.forward(theta)), posterior.transform)
    if isinstance(task, SIR):
        ode = SIR(n_sub=n_sub)
        return GaussianCost(
            lambda theta: ode.total_count * ode.forward(theta), posterior.transform
        )
    raise TypeError(f"no feedback cost for task {task.name!r}")


def observed_data(task: Task, x: Tensor) -> ObservedData:
    """Rows of data for ``task_cost``, one per row of ``x`` ``(B, dim_data)``.

    Raises:
        TypeError: For a task without a feedback cost.
    """
    if isinstance(task, LotkaVolterra):
        return ObservedData(torch.log(x), x.new_full((task.dim_data,), task.noise_scale))
    if isinstance(task, SIR):
        return ObservedData(x, (x + 1).sqrt())
    raise TypeError(f"no feedback cost for task {task.name!r}")


#: Control signals by method name: ``make(cost, dim_u, dim_data) -> signal``.
SIGNALS: dict[str, Callable[[GaussianCost, int, int], object]] = {
    "gradient": lambda cost, d, m: GradientSignal(cost, d),
    "learned": lambda cost, d, m: ResidualSignal(cost, VectorEncoder(m, 32, width=64), 32),
    "zero": lambda cost, d, m: ZeroSignal(d + 3),
}


def _score(
    model: ControlledPosterior, task: Task, num_observations: tuple[int, ...], n_samples: int,
    n_steps: int, solver: str, generator: torch.Generator,
) -> Tensor:  # fmt: skip
    scores = []
    for k in num_observations:
        ref = load_reference(task.name, k)
        drawn = sample_feedback(model, ref.observation, observed_data(task, ref.observation),
                                n_samples, n_steps=n_steps, solver=solver,
                                generator=generator)  # fmt: skip
        scores.append(c2st(ref.samples, drawn.theta[:, 0]))
    return torch.tensor(scores)


def run_feedback_benchmark(
    task: Task, n_simulations: int, methods: tuple[str, ...], cfg: BenchConfig,
    finetune_cfg: FinetuneConfig, *, seed: int = 0, n_sub: int = 5,
    num_observations: tuple[int, ...] = tuple(range(1, N_OBSERVATIONS + 1)),
) -> list[BenchResult]:  # fmt: skip
    """Train the base flow on a budget, then finetune and score each feedback method.

    The finetuning reuses the same simulations (no extra simulator budget for pairs); the
    feedback cost calls the forward model at sampling and finetuning time.

    Args:
        task: ``LotkaVolterra`` or ``SIR``.
        n_simulations: Simulation budget.
        methods: Keys of ``SIGNALS``.
        cfg: Base-flow settings (and ``n_samples`` for scoring).
        finetune_cfg: Control settings (``n_steps_sample`` and ``solver`` for sampling).
        seed: Seed of simulation, training, finetuning and sampling.
        n_sub: RK4 steps per save interval of the cost's forward model.
        num_observations: sbibm observations to score.

    Returns:
        One result per method, ``method = "flow+<name>"``; ``train_s`` is the finetuning
        time and ``n_epochs`` the finetuning steps.

    Raises:
        ValueError: For an unknown method.
    """
    unknown = set(methods) - set(SIGNALS)
    if unknown:
        raise ValueError(
            f"unknown feedback methods {sorted(unknown)}; choose from {sorted(SIGNALS)}"
        )
    gen = torch.Generator().manual_seed(seed)
    theta, x = simulate_budget(task, n_simulations, generator=gen)
    base = train_posterior(task, theta, x, cfg, generator=gen).posterior
    cost = task_cost(task, base, n_sub=n_sub)
    data = tensor_batches(base.transform.to_u(theta).detach(), x, observed_data(task, x))
    results = []
    for name in methods:
        start = time.perf_counter()
        signal = SIGNALS[name](cost, task.dim_parameters, task.dim_data)
        model = finetune(base, signal, data, finetune_cfg, generator=gen)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        scores = _score(model, task, num_observations, cfg.n_samples,
                        finetune_cfg.n_steps_sample, finetune_cfg.solver, gen)  # fmt: skip
        score_s = time.perf_counter() - start
        result = BenchResult(
            task=task.name, n_simulations=n_simulations, method=f"flow+{name}", c2st=scores,
            num_observations=num_observations, train_s=train_s, score_s=score_s,
            n_epochs=finetune_cfg.n_steps,
        )  # fmt: skip
        results.append(result)
    return results
