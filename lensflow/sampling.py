"""Stage 5: posterior samples of observed lenses, and the record every method returns.

``PosteriorSamples`` is the one result type shared by the flow, the baselines and the
metrics. ``sample_posteriors`` takes observations of any size and pixel scale, cuts each to
the model's field of view (``cutouts.cut_to_fov``, centred on the cutout centre), builds
the network input with ``data.observation_input`` (the same function training used) and
samples all observations in one batched ODE solve per chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lensflow.checkpoint import TrainedPosterior
from lensflow.cutouts import cut_to_fov
from lensflow.data import observation_input
from lensflow.observation import Observation
from lensflow.params import NAMES, REGISTRY

if TYPE_CHECKING:
    from astropy.table import Table

__all__ = [
    "PosteriorSamples",
    "sample_posterior",
    "sample_posteriors",
    "samples_table",
    "summary_table",
]


@dataclass(frozen=True)
class PosteriorSamples:
    """Posterior samples of one lens.

    Attributes:
        theta: Samples, shape ``(N, D)``, physical units from ``params.REGISTRY``.
        names: Parameter names, ``params.NAMES`` order.
        log_prob: ``log q(theta | x)``, shape ``(N,)``, when the method provides it.
        method: ``"flow"``, ``"flow+feedback"``, ``"lenstronomy"`` or ``"emcee"``.
    """

    theta: Tensor
    names: tuple[str, ...] = NAMES
    log_prob: Tensor | None = None
    method: str = "flow"

    def __post_init__(self) -> None:
        if self.theta.ndim != 2 or self.theta.shape[1] != len(self.names):
            raise ValueError(
                f"theta must have shape (N, {len(self.names)}), got {tuple(self.theta.shape)}"
            )
        if self.log_prob is not None and self.log_prob.shape != self.theta.shape[:1]:
            raise ValueError(
                f"log_prob must have shape ({self.theta.shape[0]},), "
                f"got {tuple(self.log_prob.shape)}"
            )

    def quantiles(self, q: Sequence[float]) -> Tensor:
        """Per-parameter quantiles, shape ``(len(q), D)``, physical units."""
        return torch.quantile(self.theta.double(), torch.tensor(list(q), dtype=torch.float64), 0)


def sample_posteriors(
    observations: Sequence[Observation],
    model: TrainedPosterior,
    n: int,
    *,
    n_steps: int | None = None,
    solver: str | None = None,
    use_log_prob: bool = False,
    chunk: int = 64,
    generator: torch.Generator | None = None,
) -> list[PosteriorSamples]:
    """Posterior samples for many observations, batched.

    Args:
        observations: Observations of any size and pixel scale covering the model's field of
            view around their centres.
        model: The trained posterior (``checkpoint.load_model``).
        n: Samples per observation.
        n_steps: ODE steps (default: the model's).
        solver: ODE solver (default: the model's).
        use_log_prob: Also evaluate ``log q(theta | x)`` of every sample (an extra,
            roughly ``D``-times costlier ODE solve).
        chunk: Observations per batched solve.
        generator: Torch generator on the model's device, for the base noise.

    Returns:
        One ``PosteriorSamples`` per observation, in order, on the model's device.

    Raises:
        ValueError: If ``n < 1`` or an observation does not cover the field of view.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    posterior = model.posterior
    parameter = next(posterior.parameters())
    cut = [
        cut_to_fov(o, model.simulator).to(parameter.dtype, parameter.device) for o in observations
    ]
    out: list[PosteriorSamples] = []
    for start in range(0, len(cut), chunk):
        x = observation_input(cut[start : start + chunk], reference_rms=model.data.reference_rms)
        theta = posterior.sample(x, n, n_steps=n_steps, solver=solver, generator=generator)
        for b in range(x.shape[0]):
            log_prob = None
            if use_log_prob:
                x_rep = x[b : b + 1].expand(n, *x.shape[1:])
                log_prob = posterior.log_prob(theta[:, b], x_rep, n_steps=n_steps, solver=solver)
            out.append(PosteriorSamples(theta[:, b], NAMES, log_prob, "flow"))
    return out


def sample_posterior(
    observation: Observation,
    model: TrainedPosterior,
    n: int,
    *,
    n_steps: int | None = None,
    solver: str | None = None,
    use_log_prob: bool = False,
    generator: torch.Generator | None = None,
) -> PosteriorSamples:
    """Posterior samples of one observation (:func:`sample_posteriors` for a single lens).

    Args:
        observation: The observation (any size covering the model's field of view).
        model: The trained posterior.
        n: Number of samples.
        n_steps: ODE steps (default: the model's).
        solver: ODE solver (default: the model's).
        use_log_prob: Also evaluate ``log q(theta | x)`` of every sample.
        generator: Torch generator for the base noise.

    Returns:
        The samples, ``theta`` of shape ``(n, D)`` in physical units.
    """
    return sample_posteriors([observation], model, n, n_steps=n_steps, solver=solver,
                             use_log_prob=use_log_prob, generator=generator)[0]  # fmt: skip


def samples_table(samples: PosteriorSamples) -> Table:
    """The samples as an astropy table: one column per parameter, registry units.

    Args:
        samples: Posterior samples.

    Returns:
        Table with ``N`` rows, columns ``samples.names`` (plus ``log_prob`` when present)
        and ``meta["method"]``.
    """
    from astropy.table import Table

    units = {p.name: p.unit for p in REGISTRY}
    table = Table(meta={"method": samples.method})
    theta = samples.theta.detach().double().cpu().numpy()
    for i, name in enumerate(samples.names):
        table[name] = theta[:, i]
        table[name].unit = units.get(name) or None
    if samples.log_prob is not None:
        table["log_prob"] = samples.log_prob.detach().double().cpu().numpy()
    return table


def summary_table(samples: PosteriorSamples) -> Table:
    """One-row summary: ``<param>_median``, ``<param>_p16``, ``<param>_p84`` with units.

    Args:
        samples: Posterior samples.

    Returns:
        Table with one row, three columns per parameter (the ``run_catalog`` layout).
    """
    from astropy.table import Table

    units = {p.name: p.unit for p in REGISTRY}
    q = samples.quantiles((0.5, 0.16, 0.84)).cpu().numpy()
    table = Table(meta={"method": samples.method, "n_samples": int(samples.theta.shape[0])})
    for i, name in enumerate(samples.names):
        for j, suffix in enumerate(("median", "p16", "p84")):
            table[f"{name}_{suffix}"] = [q[j, i]]
            table[f"{name}_{suffix}"].unit = units.get(name) or None
    return table
