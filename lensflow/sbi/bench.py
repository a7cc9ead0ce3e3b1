"""SBI benchmark driver: simulate a budget, train a flow-matching posterior, score by C2ST.

One budget of ``n_simulations`` prior draws is split 95/5 into training and validation
sets; a ``VectorField`` (``VectorEncoder`` + residual MLP) is trained with the flow-matching
loss and stopped early on the validation loss; 10,000 posterior samples per sbibm
observation are scored by C2ST against sbibm's reference samples (0.5 is perfect).

Conventions: the flow sees ``u = (task.to_unconstrained(theta) - loc) / scale`` with
``loc``/``scale`` the training-set mean and standard deviation (``StandardizedTransform``);
the encoder sees ``task.to_features(x)`` z-scored with training statistics. Non-finite
simulations are dropped and count against the budget.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lensflow.flow import FlowMatchingLoss, FlowPosterior, VectorField
from lensflow.metrics import c2st
from lensflow.nn import VectorEncoder
from lensflow.sbi.reference import N_OBSERVATIONS, load_reference
from lensflow.sbi.tasks import Task

__all__ = [
    "BenchConfig",
    "BenchResult",
    "FeatureScaler",
    "StandardizedTransform",
    "TrainResult",
    "build_posterior",
    "run_benchmark",
    "score_c2st",
    "simulate_budget",
    "train_posterior",
]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Network, training and scoring settings of one benchmark run."""

    width: int = 128
    n_blocks: int = 3
    embed_dim: int = 64
    encoder_width: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    max_epochs: int = 1000
    patience: int = 30
    max_train_s: float = 600.0
    validation_fraction: float = 0.05
    n_steps: int = 32
    solver: str = "midpoint"
    n_samples: int = 10_000
    c2st_max_iter: int = 10_000


class StandardizedTransform(nn.Module):
    """Physical ``theta`` <-> ``u``: the task's bijection to R^D, then a z-score.

    Args:
        task: Supplies ``to_unconstrained``/``from_unconstrained``/``log_abs_det``.
        loc: Mean of the unconstrained training parameters, shape ``(D,)``.
        scale: Their standard deviation, shape ``(D,)``.
    """

    def __init__(self, task: Task, loc: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.task = task
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    def to_u(self, theta: Tensor) -> Tensor:
        """``theta`` ``(..., D)`` -> ``u`` ``(..., D)``."""
        return (self.task.to_unconstrained(theta) - self.loc) / self.scale

    def from_u(self, u: Tensor) -> Tensor:
        """``u`` ``(..., D)`` -> ``theta`` ``(..., D)``."""
        return self.task.from_unconstrained(u * self.scale + self.loc)

    def log_abs_det(self, theta: Tensor) -> Tensor:
        """``log |det du/dtheta|``, shape ``(...)``."""
        return self.task.log_abs_det(theta) - torch.log(self.scale).sum()


class FeatureScaler(nn.Module):
    """Encoder input: ``(task.to_features(x) - loc) / scale``, then a ``VectorEncoder``."""

    def __init__(self, task: Task, loc: Tensor, scale: Tensor, encoder: nn.Module) -> None:
        super().__init__()
        self.task = task
        self.encoder = encoder
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    def forward(self, x: Tensor) -> Tensor:
        """Embed raw data ``(B, dim_data)`` -> ``(B, embed_dim)``."""
        return self.encoder((self.task.to_features(x) - self.loc) / self.scale)


@dataclass(frozen=True)
class TrainResult:
    """A trained posterior and its training record.

    Attributes:
        posterior: The flow posterior at the best validation loss.
        best_val_loss: Its validation loss.
        n_epochs: Epochs run.
        n_train: Training pairs used.
        wall_s: Training wall time in seconds.
    """

    posterior: FlowPosterior
    best_val_loss: float
    n_epochs: int
    n_train: int
    wall_s: float


@dataclass(frozen=True)
class BenchResult:
    """C2ST of one task, budget and method over sbibm observations.

    Attributes:
        task: sbibm task name.
        n_simulations: Simulation budget.
        method: ``"flow"`` for the base flow.
        c2st: Accuracy per observation, shape ``(K,)``.
        num_observations: The sbibm observation numbers scored.
        train_s: Training wall time (s).
        score_s: Sampling + C2ST wall time (s).
        n_epochs: Training epochs (finetuning steps for a feedback method).
        sampler: Solver and step count of the scored samples, e.g. ``"midpoint 32"``.
        sim_calls_per_sample: Forward-model calls per posterior sample (feedback only).
        finetune_sim_calls: Forward-model calls of the finetuning (feedback only).
        sample_s: Sampling wall time (s), part of ``score_s``.
        c2st_s: C2ST wall time (s), part of ``score_s``.
    """

    task: str
    n_simulations: int
    method: str
    c2st: Tensor
    num_observations: tuple[int, ...]
    train_s: float
    score_s: float
    n_epochs: int
    sampler: str = ""
    sim_calls_per_sample: int = 0
    finetune_sim_calls: int = 0
    sample_s: float = float("nan")
    c2st_s: float = float("nan")


def simulate_budget(
    task: Task, n_simulations: int, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw ``n_simulations`` (theta, x) pairs from the prior; drop non-finite ones.

    Args:
        task: The task.
        n_simulations: Budget.
        generator: Torch generator.

    Returns:
        ``theta`` ``(n, D)`` and ``x`` ``(n, dim_data)``, ``n <= n_simulations``.
    """
    theta = task.sample_prior(n_simulations, generator=generator)
    x = task.simulate(theta, generator=generator)
    ok = x.isfinite().all(-1) & task.to_features(x).isfinite().all(-1)
    return theta[ok], x[ok]


def build_posterior(task: Task, theta: Tensor, x: Tensor, cfg: BenchConfig) -> FlowPosterior:
    """An untrained posterior whose transforms are fitted to training pairs.

    Args:
        task: The task.
        theta: Training parameters, shape ``(N, D)``.
        x: Training data, shape ``(N, dim_data)``.
        cfg: Settings.

    Returns:
        The posterior (field initialized at random).
    """
    y, f = task.to_unconstrained(theta), task.to_features(x)
    # Guard constant features (SIR counts at day 0 are always 0).
    f_scale = f.std(dim=0).clamp_min(1e-6)
    encoder = VectorEncoder(task.dim_data, cfg.embed_dim, width=cfg.encoder_width)
    field = VectorField(
        task.dim_parameters, FeatureScaler(task, f.mean(dim=0), f_scale, encoder),
        cfg.embed_dim, width=cfg.width, n_blocks=cfg.n_blocks,
    )  # fmt: skip
    transform = StandardizedTransform(task, y.mean(dim=0), y.std(dim=0))
    return FlowPosterior(field, transform, n_steps=cfg.n_steps, solver=cfg.solver)


def train_posterior(
    task: Task, theta: Tensor, x: Tensor, cfg: BenchConfig, *,
    generator: torch.Generator | None = None,
) -> TrainResult:  # fmt: skip
    """Train a flow posterior with early stopping on a held-out validation split.

    Args:
        task: The task.
        theta: Parameters, shape ``(N, D)``.
        x: Data, shape ``(N, dim_data)``.
        cfg: Settings (split, batch, learning rate, patience, time cap).
        generator: Torch generator for the split, batches and flow-matching noise.

    Returns:
        The posterior at the best validation loss and the training record.
    """
    start = time.perf_counter()
    perm = torch.randperm(theta.shape[0], generator=generator)
    n_val = max(1, math.ceil(cfg.validation_fraction * theta.shape[0]))
    val, train = perm[:n_val], perm[n_val:]
    posterior = build_posterior(task, theta[train], x[train], cfg)
    u = posterior.transform.to_u(theta)
    loss_fn = FlowMatchingLoss(posterior.field)
    opt = torch.optim.AdamW(posterior.field.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, since_best, epoch = math.inf, None, 0, 0
    for epoch in range(1, cfg.max_epochs + 1):  # noqa: B007 - epoch is reported
        posterior.train()
        for idx in train[torch.randperm(len(train), generator=generator)].split(cfg.batch_size):
            loss = loss_fn(u[idx], x[idx], generator=generator)
            opt.zero_grad()
            loss.backward()
            opt.step()
        posterior.eval()
        with torch.no_grad():
            # Fixed noise and times, so that epochs are compared on the same draws.
            val_gen = torch.Generator().manual_seed(0)
            val_loss = sum(loss_fn(u[val], x[val], generator=val_gen).item() for _ in range(4))
        if val_loss < best:
            best, best_state, since_best = val_loss, copy.deepcopy(posterior.state_dict()), 0
        else:
            since_best += 1
        if since_best >= cfg.patience or time.perf_counter() - start > cfg.max_train_s:
            break
    posterior.load_state_dict(best_state)
    wall = time.perf_counter() - start
    return TrainResult(posterior, best / 4, epoch, len(train), wall)


def score_c2st(
    posterior: FlowPosterior, task_name: str, num_observations: tuple[int, ...], cfg: BenchConfig,
    *, generator: torch.Generator | None = None, seed: int = 1,
) -> Tensor:  # fmt: skip
    """C2ST of ``cfg.n_samples`` posterior samples against sbibm's reference, per observation.

    Args:
        posterior: The posterior.
        task_name: sbibm task name.
        num_observations: Observation numbers to score (1..10).
        cfg: Settings (samples, solver steps).
        generator: Torch generator for the samples.
        seed: C2ST classifier seed.

    Returns:
        Accuracies, shape ``(len(num_observations),)``.
    """
    scores = []
    for k in num_observations:
        ref = load_reference(task_name, k)
        samples = posterior.sample(ref.observation, cfg.n_samples, generator=generator)[:, 0]
        scores.append(c2st(ref.samples, samples, seed=seed, max_iter=cfg.c2st_max_iter))
    return torch.tensor(scores)


def run_benchmark(
    task: Task, n_simulations: int, cfg: BenchConfig, *, seed: int = 0,
    num_observations: tuple[int, ...] = tuple(range(1, N_OBSERVATIONS + 1)),
) -> BenchResult:  # fmt: skip
    """Simulate, train and score one task at one budget with the base flow.

    Args:
        task: The task.
        n_simulations: Simulation budget (train + validation).
        cfg: Settings.
        seed: Seed of simulation, training and sampling.
        num_observations: sbibm observations to score.

    Returns:
        The C2ST per observation and the wall times.
    """
    gen = torch.Generator().manual_seed(seed)
    theta, x = simulate_budget(task, n_simulations, generator=gen)
    trained = train_posterior(task, theta, x, cfg, generator=gen)
    start = time.perf_counter()
    scores = score_c2st(trained.posterior, task.name, num_observations, cfg, generator=gen)
    return BenchResult(
        task=task.name, n_simulations=n_simulations, method="flow", c2st=scores,
        num_observations=num_observations, train_s=trained.wall_s,
        score_s=time.perf_counter() - start, n_epochs=trained.n_epochs,
        sampler=f"{cfg.solver} {cfg.n_steps}",
    )  # fmt: skip
