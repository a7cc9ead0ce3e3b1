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
    signal_calls_per_sample,
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
    sample: Callable[[Tensor, Tensor, torch.Generator], Tensor], task: Task,
    num_observations: tuple[int, ...], n_samples: int, seed: int, c2st_seed: int,
    c2st_max_iter: int, log: Callable[[str], None] | None,
) -> tuple[Tensor, float, float]:  # fmt: skip
    """C2ST per observation of ``sample(x_obs, data_obs, generator) -> theta (n, D)``.

    Every method draws its base noise from the same seed per observation, so the methods are
    compared on paired samples. Returns the scores and the sampling and C2ST wall times.
    """
    scores, sample_s, c2st_s = [], 0.0, 0.0
    for k in num_observations:
        ref = load_reference(task.name, k)
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed + 1000 * k)
        drawn = sample(ref.observation, observed_data(task, ref.observation), gen)
        sample_s += (mid := time.perf_counter()) - start
        scores.append(c2st(ref.samples, drawn, seed=c2st_seed, max_iter=c2st_max_iter))
        c2st_s += time.perf_counter() - mid
        if log is not None:
            log(f"observation {k}: c2st {scores[-1]:.4f} (sample {mid - start:.0f} s, "
                f"c2st {time.perf_counter() - mid:.0f} s)")  # fmt: skip
    return torch.tensor(scores), sample_s, c2st_s


def run_feedback_benchmark(
    task: Task, n_simulations: int, methods: tuple[str, ...], cfg: BenchConfig,
    finetune_cfg: FinetuneConfig, *, seed: int = 0, n_sub: int = 5,
    num_observations: tuple[int, ...] = tuple(range(1, N_OBSERVATIONS + 1)),
    c2st_seed: int = 1, on_result: Callable[[BenchResult], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[BenchResult]:  # fmt: skip
    """Train the base flow on a budget, then finetune and score each feedback method.

    The finetuning reuses the same simulations (no extra prior draws); the feedback cost
    calls the forward model (noiseless ODE solve) at finetuning and sampling time, which is
    counted in ``finetune_sim_calls`` and ``sim_calls_per_sample``. All methods, the base
    flow included (method ``"flow"``), are sampled with ``finetune_cfg.solver`` and
    ``finetune_cfg.n_steps_sample`` steps from the same base noise per observation; each
    control net is initialized and trained from ``seed`` whatever the order of ``methods``.

    Args:
        task: ``LotkaVolterra`` or ``SIR``.
        n_simulations: Simulation budget.
        methods: ``"flow"`` (the base flow, no feedback) and keys of ``SIGNALS``.
        cfg: Base-flow settings (and ``n_samples``, ``c2st_max_iter`` for scoring).
        finetune_cfg: Control settings (``n_steps_sample`` and ``solver`` for sampling).
        seed: Seed of simulation, training, finetuning and sampling.
        n_sub: RK4 steps per save interval of the cost's forward model.
        num_observations: sbibm observations to score.
        c2st_seed: Seed of the C2ST classifier and folds.
        on_result: Called with each result as soon as it is scored.
        log: Called with a progress line per scored observation.

    Returns:
        One result per method, ``method = "flow"`` or ``"flow+<name>"``; for feedback
        methods ``train_s`` is the finetuning time and ``n_epochs`` the finetuning steps.

    Raises:
        ValueError: For an unknown method.
    """
    unknown = set(methods) - set(SIGNALS) - {"flow"}
    if unknown:
        raise ValueError(
            f"unknown feedback methods {sorted(unknown)}; choose from {sorted(SIGNALS) + ['flow']}"
        )
    fc = finetune_cfg
    sampler = f"{fc.solver} {fc.n_steps_sample}, control t > {fc.t_start:g}"
    calls = signal_calls_per_sample(fc.n_steps_sample, fc.solver, fc.t_start)
    torch.manual_seed(seed)  # network initialization
    gen = torch.Generator().manual_seed(seed)
    theta, x = simulate_budget(task, n_simulations, generator=gen)
    trained = train_posterior(task, theta, x, cfg, generator=gen)
    base = trained.posterior
    if log is not None:
        log(f"base flow: {trained.n_epochs} epochs, {trained.wall_s:.0f} s")
    cost = task_cost(task, base, n_sub=n_sub)
    data = tensor_batches(base.transform.to_u(theta).detach(), x, observed_data(task, x))
    common = {"task": task.name, "n_simulations": n_simulations,
              "num_observations": num_observations}  # fmt: skip
    score = {"task": task, "num_observations": num_observations, "n_samples": cfg.n_samples,
             "seed": seed, "c2st_seed": c2st_seed, "c2st_max_iter": cfg.c2st_max_iter,
             "log": log}  # fmt: skip
    results = []
    for name in methods:
        if name == "flow":

            def draw(x_obs: Tensor, _obs: ObservedData, g: torch.Generator) -> Tensor:
                with torch.no_grad():
                    return base.sample(x_obs, cfg.n_samples, n_steps=fc.n_steps_sample,
                                       solver=fc.solver, generator=g)[:, 0]  # fmt: skip

            scores, sample_s, c2st_s = _score(draw, **score)
            result = BenchResult(
                **common, method="flow", c2st=scores, train_s=trained.wall_s,
                score_s=sample_s + c2st_s, n_epochs=trained.n_epochs,
                sampler=f"{fc.solver} {fc.n_steps_sample}", sample_s=sample_s, c2st_s=c2st_s,
            )  # fmt: skip
        else:
            start = time.perf_counter()
            torch.manual_seed(seed)  # control-net (and residual-encoder) initialization
            signal = SIGNALS[name](cost, task.dim_parameters, task.dim_data)
            model = finetune(base, signal, data, fc, generator=torch.Generator().manual_seed(seed))
            train_s = time.perf_counter() - start

            def draw(
                x_obs: Tensor,
                obs: ObservedData,
                g: torch.Generator,
                model: ControlledPosterior = model,
            ) -> Tensor:
                return sample_feedback(model, x_obs, obs, cfg.n_samples, generator=g).theta[:, 0]

            scores, sample_s, c2st_s = _score(draw, **score)
            uses_simulator = not isinstance(signal, ZeroSignal)
            result = BenchResult(
                **common, method=f"flow+{name}", c2st=scores, train_s=train_s,
                score_s=sample_s + c2st_s, n_epochs=fc.n_steps, sampler=sampler,
                sim_calls_per_sample=calls if uses_simulator else 0,
                finetune_sim_calls=fc.n_steps * fc.batch_size if uses_simulator else 0,
                sample_s=sample_s, c2st_s=c2st_s,
            )  # fmt: skip
        if log is not None:
            spread = f" +/- {scores.std():.3f}" if len(scores) > 1 else ""
            log(f"{result.method}: c2st {scores.mean():.3f}{spread}")
        if on_result is not None:
            on_result(result)
        results.append(result)
    return results
