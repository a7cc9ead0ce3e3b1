"""Stage 5: posterior samples of observed lenses, and the record every method returns.

``PosteriorSamples`` is the one result type shared by the flow, the baselines and the
metrics. ``sample_posteriors`` takes observations of any size and pixel scale, cuts each to
the model's field of view (``cutouts.cut_to_fov``, centred on the cutout centre), builds
the network input with ``data.observation_input`` (the same function training used) and
samples all observations in one batched ODE solve per chunk.

With simulator feedback (``feedback="auto"``, ``"gradient"`` or ``"learned"``) the base flow
is integrated up to the control net's ``t_start`` and the controlled drift after it
(``feedback.sample_feedback``); the feedback cost is built from the *cut* observations (their
PSF, noise map, mask and pixel grid), so masked pixels never enter it. With ``seeds`` each
lens's base noise comes from its own generator, so its samples do not depend on which other
lenses share the batch or on ``chunk`` (a catalog run that is interrupted and resumed gives
the same samples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lensflow.checkpoint import TrainedControl, TrainedPosterior, available_feedback, load_control
from lensflow.cutouts import cut_to_fov
from lensflow.data import flux_factor, observation_input
from lensflow.feedback import sample_feedback, split_steps
from lensflow.observation import Observation
from lensflow.params import FLUX_NAMES, NAMES, REGISTRY, scale_flux
from lensflow.solvers import SOLVERS, get_solver

if TYPE_CHECKING:
    import numpy as np
    from astropy.table import Table

__all__ = [
    "FEEDBACK_CHOICES",
    "PosteriorSamples",
    "describe_sampler",
    "read_samples",
    "registry_values",
    "resolve_feedback",
    "resolve_normalize_flux",
    "sample_posterior",
    "sample_posteriors",
    "sampler_settings",
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
        method: ``"flow"``, ``"flow+gradient"``, ``"flow+learned"`` (``"flow+zero"`` for the
            ablation), ``"lenstronomy"`` or ``"emcee"``.
        sampler: How the flow's ODE was integrated (``sampler_settings``): solver and steps
            of each segment, simulator calls per sample; ``None`` for other methods.
    """

    theta: Tensor
    names: tuple[str, ...] = NAMES
    log_prob: Tensor | None = None
    method: str = "flow"
    sampler: dict[str, Any] | None = None

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


#: What ``sample_posteriors(feedback=...)`` accepts (``"zero"``, the ablation, also works).
FEEDBACK_CHOICES = ("auto", "gradient", "learned", "none")


def resolve_feedback(model: TrainedPosterior, feedback: str = "auto") -> str:
    """The feedback a request resolves to: ``"auto"`` picks gradient, then learned, then none.

    Args:
        model: The trained posterior.
        feedback: ``"auto"``, ``"gradient"``, ``"learned"``, ``"zero"`` or ``"none"``.

    Returns:
        ``"gradient"``, ``"learned"``, ``"zero"`` or ``"none"``.

    Raises:
        ValueError: For an unknown choice, or an explicit kind with no control net (the
            message names the ones that exist).
    """
    if feedback not in (*FEEDBACK_CHOICES, "zero"):
        raise ValueError(
            f"feedback must be one of {', '.join(FEEDBACK_CHOICES)}, got {feedback!r}"
        )
    if feedback == "none":
        return "none"
    have = available_feedback(model)
    if feedback == "auto":
        return next((k for k in ("gradient", "learned") if k in have), "none")
    if feedback not in have:
        where = model.path.name if model.path is not None else "this (unsaved) model"
        raise ValueError(
            f"no {feedback} control net for {where}; available: {', '.join(have) or 'none'} "
            "(use --feedback none, or train one with lensflow finetune)"
        )
    return feedback


def resolve_normalize_flux(model: TrainedPosterior, normalize_flux: bool | None = None) -> bool:
    """Whether sampling runs in normalized flux units: as requested, else as the model was
    trained (``DataConfig.normalize_flux``).

    Args:
        model: The trained posterior.
        normalize_flux: ``True`` or ``False`` to force it, ``None`` to follow the model.

    Returns:
        The effective choice.
    """
    return model.data.normalize_flux if normalize_flux is None else bool(normalize_flux)


def _lens_noise(seeds: Sequence[int], n: int, dim: int, like: Tensor) -> Tensor:
    """Base noise ``(n, B, D)``: lens ``b``'s from a CPU ``Generator().manual_seed(seeds[b])``.

    Drawn on the CPU in ``like``'s dtype and then moved to its device, so a seed gives the
    same noise on every device (CUDA generators have other streams).
    """
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        out.append(torch.randn((n, dim), generator=g, dtype=like.dtype))
    return torch.stack(out, dim=1).to(like.device)


def sampler_settings(
    model: TrainedPosterior,
    control: TrainedControl | None = None,
    *,
    n_steps: int | None = None,
    solver: str | None = None,
    control_steps: int | None = None,
    base_solver: str | None = None,
) -> dict[str, Any]:
    """The ODE sampler a ``sample_posteriors`` call resolves to, with the defaults filled in.

    Args:
        model: The trained posterior.
        control: The control net with feedback, else ``None``.
        n_steps: Requested steps over ``[0, 1]`` (``None``: the control net's, else the
            model's).
        solver: Requested solver (``None``: the control net's, else the model's).
        control_steps: Requested steps on ``[t_start, 1]`` (feedback only).
        base_solver: Requested solver on ``[0, t_start]`` (feedback only; ``None``: the
            requested ``solver`` where given, else the control net's base solver, else its
            solver).

    Returns:
        ``{"solver", "n_steps"}`` for the flow alone; with feedback also ``"t_start"``,
        ``"base_solver"``, ``"base_steps"``, ``"control_steps"`` and
        ``"simulator_calls_per_sample"`` (controlled steps times the solver's evaluations
        per step; each call renders the lens and differentiates its chi^2).

    Raises:
        ValueError: For an unknown solver, bad step counts, or feedback-only settings
            without feedback.

    Example:
        >>> from lensflow.checkpoint import load_control, load_model
        >>> model = load_model("euclid")
        >>> sampler_settings(model, n_steps=32)
        {'solver': 'midpoint', 'n_steps': 32}
        >>> s = sampler_settings(model, load_control("gradient", model), control_steps=4)
        >>> s["control_steps"], s["simulator_calls_per_sample"]
        (4, 4)
    """
    if control is None:
        if control_steps is not None or base_solver is not None:
            what = (f"control_steps={control_steps}" if control_steps is not None
                    else f"base_solver={base_solver!r}")  # fmt: skip
            raise ValueError(f"{what} needs feedback, but it is 'none'")
        flow = model.posterior
        name = solver or flow.solver
        get_solver(name)
        steps = n_steps or flow.n_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1, got {steps!r}")
        return {"solver": name, "n_steps": steps}
    name = solver or control.solver
    get_solver(name)
    base = base_solver or solver or control.base_solver or name
    get_solver(base)
    steps = n_steps or control.n_steps
    if control_steps is None:
        control_steps = control.control_steps
    n_base, n_control = split_steps(steps, control.t_start, control_steps)
    return {
        "solver": name,
        "n_steps": steps,
        "t_start": control.t_start,
        "base_solver": base,
        "base_steps": n_base,
        "control_steps": n_control,
        "simulator_calls_per_sample": n_control * SOLVERS[name][1],
    }


def describe_sampler(sampler: dict[str, Any] | None) -> str:
    """One line on a ``sampler_settings`` record (``PosteriorSamples.sampler``).

    Args:
        sampler: The record, or ``None`` (samples not drawn by the flow).

    Returns:
        E.g. ``"midpoint, 32 steps"``, or with feedback ``"16 midpoint steps to t = 0.8,
        then 8 euler steps with feedback (8 simulator calls per sample)"``.

    Example:
        >>> describe_sampler({"solver": "midpoint", "n_steps": 32})
        'midpoint, 32 steps'
    """
    if not sampler:
        return "no ODE sampler"
    if "base_steps" not in sampler:
        return f"{sampler['solver']}, {sampler['n_steps']} steps"
    return (f"{sampler['base_steps']} {sampler['base_solver']} steps to t = "
            f"{sampler['t_start']:g}, then {sampler['control_steps']} {sampler['solver']} "
            f"steps with feedback ({sampler['simulator_calls_per_sample']} simulator calls "
            "per sample)")  # fmt: skip


def sample_posteriors(
    observations: Sequence[Observation],
    model: TrainedPosterior,
    n: int,
    *,
    feedback: str | TrainedControl = "none",
    seeds: Sequence[int] | None = None,
    n_steps: int | None = None,
    solver: str | None = None,
    use_log_prob: bool = False,
    chunk: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
    normalize_flux: bool | None = None,
    control_steps: int | None = None,
    compile: bool = False,
    base_solver: str | None = None,
) -> list[PosteriorSamples]:
    """Posterior samples for many observations, batched, optionally with simulator feedback.

    Args:
        observations: Observations of any size and pixel scale covering the model's field of
            view around their centres.
        model: The trained posterior (``checkpoint.load_model``).
        n: Samples per observation.
        feedback: ``"none"`` (the flow alone), ``"gradient"`` or ``"learned"`` (that control
            net, see ``checkpoint.available_feedback``), ``"auto"`` (gradient if it exists,
            else learned, else none), or a loaded ``TrainedControl``.
        seeds: One seed per observation for its base noise (independent of batching);
            ``None`` draws the noise of the whole chunk from ``generator``.
        n_steps: ODE steps (default: the control net's with feedback, else the model's).
        solver: ODE solver (default: the control net's with feedback, else the model's).
        use_log_prob: Also evaluate ``log q(theta | x)`` of every sample (an extra,
            roughly ``D``-times costlier ODE solve); not available with feedback.
        chunk: Observations per batched solve.
        generator: Torch generator on the model's device, for the base noise when ``seeds``
            is None.
        progress: Show a tqdm progress bar over chunks.
        normalize_flux: Sample each observation in flux units where its noise scale is
            the model's ``reference_rms`` (``data.flux_factor``), then scale the flux
            parameters back: the samples then do not depend on the cutout's flux units
            (``params.FLUX_NAMES`` scale with them exactly, the rest not at all). Default:
            what the model was trained with (``DataConfig.normalize_flux``); forcing it on
            a model trained in absolute units moves its inputs off the training
            distribution (docs/real-lenses.md, "Flux units").
        control_steps: With feedback, solver steps on ``[t_start, 1]`` (default: the
            control net's; each costs one simulator call per sample).
        compile: With feedback, render through ``torch.compile`` (``feedback.lens_cost``):
            the first call in a process compiles, so it is for catalogs and long runs
            (docs/benchmarks.md has what it saves).
        base_solver: With feedback, the solver on ``[0, t_start]`` where only the base flow
            acts (default: ``solver`` where given, else the control net's base solver, else
            its solver; docs/feedback.md).

    Returns:
        One ``PosteriorSamples`` per observation, in order, on the model's device;
        ``method`` says which feedback was used (``"flow"``, ``"flow+gradient"``,
        ``"flow+learned"``).

    Raises:
        ValueError: If ``n < 1``, ``seeds`` has the wrong length, an observation does not
            cover the field of view, or the requested control net does not exist.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    if seeds is not None and len(seeds) != len(observations):
        raise ValueError(f"{len(seeds)} seeds for {len(observations)} observations")
    control = None
    if isinstance(feedback, TrainedControl):
        control = feedback
    else:
        kind = resolve_feedback(model, feedback)
        control = None if kind == "none" else load_control(kind, model)
    if control is not None and use_log_prob:
        raise ValueError("log_prob is not available with feedback (use feedback='none')")
    sampler = sampler_settings(model, control, n_steps=n_steps, solver=solver,
                               control_steps=control_steps, base_solver=base_solver)  # fmt: skip
    method = "flow" if control is None else f"flow+{control.kind}"
    posterior = model.posterior
    parameter = next(posterior.parameters())
    dim = posterior.field.dim
    cut = [
        cut_to_fov(o, model.simulator).to(parameter.dtype, parameter.device) for o in observations
    ]
    normalize_flux = resolve_normalize_flux(model, normalize_flux)
    factors = [flux_factor(o, model.data.reference_rms) if normalize_flux else 1.0 for o in cut]
    cut = [o.scaled(k) if k != 1.0 else o for o, k in zip(cut, factors, strict=True)]
    out: list[PosteriorSamples] = []
    starts = range(0, len(cut), chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"sample ({method})", unit="chunk")
    for start in starts:
        part = cut[start : start + chunk]
        x = observation_input(part, reference_rms=model.data.reference_rms,
                              upsample_factor=model.simulator.upsample_factor)  # fmt: skip
        noise = None
        if seeds is not None:
            noise = _lens_noise(seeds[start : start + chunk], n, dim, parameter)
        # The resolved settings go in explicitly, so the record is what runs.
        if control is None:
            theta = posterior.sample(x, n, n_steps=sampler["n_steps"], solver=sampler["solver"],
                                     generator=generator, noise=noise)  # fmt: skip
        else:
            controlled, data = control.posterior(part, compile=compile)
            theta = sample_feedback(controlled, x, data, n, n_steps=sampler["n_steps"],
                                    solver=sampler["solver"], generator=generator, noise=noise,
                                    control_steps=sampler["control_steps"],
                                    base_solver=sampler["base_solver"]).theta  # fmt: skip
        for b in range(x.shape[0]):
            log_prob, sample = None, theta[:, b]
            if use_log_prob:
                x_rep = x[b : b + 1].expand(n, *x.shape[1:])
                log_prob = posterior.log_prob(sample, x_rep, n_steps=sampler["n_steps"],
                                              solver=sampler["solver"])  # fmt: skip
            k = factors[start + b]
            if k != 1.0:  # back to the cutout's units; q(theta) = q_k(k theta) k^m
                sample = scale_flux(sample, 1 / k)
                if log_prob is not None:
                    log_prob = log_prob + len(FLUX_NAMES) * math.log(k)
            out.append(PosteriorSamples(sample, NAMES, log_prob, method, dict(sampler)))
    return out


def sample_posterior(
    observation: Observation,
    model: TrainedPosterior,
    n: int,
    *,
    feedback: str | TrainedControl = "none",
    seed: int | None = None,
    n_steps: int | None = None,
    solver: str | None = None,
    use_log_prob: bool = False,
    generator: torch.Generator | None = None,
    normalize_flux: bool | None = None,
    control_steps: int | None = None,
    compile: bool = False,
    base_solver: str | None = None,
) -> PosteriorSamples:
    """Posterior samples of one observation (:func:`sample_posteriors` for a single lens).

    Args:
        observation: The observation (any size covering the model's field of view).
        model: The trained posterior.
        n: Number of samples.
        feedback: ``"none"``, ``"auto"``, ``"gradient"``, ``"learned"`` or a
            ``TrainedControl`` (see :func:`sample_posteriors`).
        seed: Seed of this lens's base noise (the same samples as inside any batch);
            ``None`` uses ``generator``.
        n_steps: ODE steps (default: the control net's or the model's).
        solver: ODE solver (default: the control net's or the model's).
        use_log_prob: Also evaluate ``log q(theta | x)`` of every sample (no feedback).
        generator: Torch generator for the base noise.
        normalize_flux: Sample in the model's flux units (default: as the model was
            trained; see :func:`sample_posteriors`).
        control_steps: With feedback, solver steps on ``[t_start, 1]`` (default: the
            control net's).
        compile: With feedback, render through ``torch.compile`` (see
            :func:`sample_posteriors`).
        base_solver: With feedback, the solver on ``[0, t_start]`` (see
            :func:`sample_posteriors`).

    Returns:
        The samples, ``theta`` of shape ``(n, D)`` in physical units.
    """
    return sample_posteriors([observation], model, n, feedback=feedback,
                             seeds=None if seed is None else [seed], n_steps=n_steps,
                             solver=solver, use_log_prob=use_log_prob,
                             generator=generator, normalize_flux=normalize_flux,
                             control_steps=control_steps, compile=compile,
                             base_solver=base_solver)[0]  # fmt: skip


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


def registry_values(table: Table, name: str) -> np.ndarray:
    """Column ``name`` of an astropy table in the registry's unit, as float64.

    A column without a unit is taken to be in the registry's unit already.

    Args:
        table: Table with a column ``name`` (a registry parameter).
        name: Registry name, e.g. ``"lens_theta_e"``.

    Returns:
        The values, shape ``(len(table),)``.
    """
    import numpy as np

    unit = next(p.unit for p in REGISTRY if p.name == name)
    col = table[name]
    if col.unit is not None and unit:
        return np.asarray(col.quantity.to_value(unit), dtype=np.float64)
    return np.asarray(col, dtype=np.float64)


def read_samples(path: str | Path) -> tuple[PosteriorSamples, dict[str, Any]]:
    """Read posterior samples written by :func:`samples_table` (FITS or ECSV, or their folder).

    Args:
        path: A ``samples.fits``/``samples.ecsv`` file, or a folder holding one (a ``fit``,
            ``sample`` or ``bench`` output).

    Returns:
        The samples (float64, columns ``params.NAMES`` converted to registry units;
        ``log_prob`` when the table has it; ``method`` from the metadata, else the folder
        name) and the table metadata with lower-case keys.

    Raises:
        ValueError: For a missing or unreadable file or a table without every registry column.
    """
    import numpy as np
    from astropy.table import Table

    p = Path(path)
    if p.is_dir():
        found = [p / n for n in ("samples.fits", "samples.ecsv") if (p / n).is_file()]
        if not found:
            raise ValueError(f"{p}: no samples.fits or samples.ecsv in this folder")
        p = found[0]
    if not p.is_file():
        raise ValueError(f"{p}: no such samples file")
    try:
        table = Table.read(p)
    except Exception as err:  # noqa: BLE001 - astropy raises many types for unreadable tables
        raise ValueError(f"{p}: cannot read a samples table ({err})") from None
    missing = [n for n in NAMES if n not in table.colnames]
    if missing:
        raise ValueError(f"{p}: missing parameter column(s) {', '.join(missing)}")
    cols = [torch.as_tensor(registry_values(table, name)) for name in NAMES]
    log_prob = None
    if "log_prob" in table.colnames:
        log_prob = torch.as_tensor(np.asarray(table["log_prob"], dtype=np.float64))
    meta = {str(k).lower(): v for k, v in table.meta.items()}
    method = str(meta.get("method", p.parent.name))
    return PosteriorSamples(torch.stack(cols, 1), NAMES, log_prob, method), meta


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
