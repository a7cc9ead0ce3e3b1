"""Stage 5: simulator-feedback finetuning of a frozen flow posterior.

A pretrained ``FlowPosterior`` (the base flow, frozen) gets a small control network ``v_C``
whose correction is added to the base velocity late in the flow::

    u1_hat  = u_t + (1 - t) v(u_t, t, x)              # one-step look-ahead (standardized space)
    c       = signal(u1_hat, obs)                     # control features, (B, C)
    v_tilde = v + v_C([v, emb(t), c])   for t > t_start,   v_tilde = v   otherwise

Only ``v_C`` (and the signal's own parameters, for a learned residual encoder) train, with the
flow-matching loss on ``v_tilde`` and ``t`` drawn from ``[t_start, 1]``. The simulator enters
as an *input feature*: training gradients never flow through it.

Conventions:

* Flow time as in ``flow``: t = 0 is base noise, t = 1 is the standardized parameters ``u``.
* The gate is strict (``t > t_start``) and identical in training and sampling. The sampler
  integrates ``[0, t_start]`` and ``[t_start, 1]`` as two segments so that no solver step
  straddles the gate.
* ``obs`` is whatever the signal compares against, **one row per row of** ``u1_hat``. It must
  support ``len(obs)`` and ``obs[index]`` for a long tensor ``index`` (a ``Tensor`` does, and
  so does ``ObservedData``). The sampler keeps one row per observation and indexes it per
  chunk, so ``n`` samples of ``B`` observations never copy the data ``n`` times at once.
* Nothing here imports the lens simulator at module level: lens physics reaches feedback only
  through a cost or signal object (``lens_cost`` builds one from ``Observation`` records).

References:
    Holzschuh & Thuerey 2024, "Flow Matching for Posterior Inference with Simulator
    Feedback", arXiv:2410.22573.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lensflow.flow import (
    FlowPosterior,
    IdentityTransform,
    ParamTransform,
    base_noise,
    flow_matching_loss,
)
from lensflow.flow import sample_times as _sample_times
from lensflow.nn import ResidualMLP, TimeEmbedding
from lensflow.solvers import SOLVERS, get_solver

if TYPE_CHECKING:
    from lensflow.checkpoint import TrainedPosterior
    from lensflow.config import DataConfig, SimulatorConfig
    from lensflow.observation import Observation

__all__ = [
    "GRADIENT_BYTES_PER_FINE_PIXEL",
    "GRADIENT_MEMORY_BYTES",
    "SIGNAL_KINDS",
    "ControlNet",
    "ControlSignal",
    "ControlledPosterior",
    "FeedbackBatch",
    "FeedbackSamples",
    "FinetuneConfig",
    "GaussianCost",
    "GradientSignal",
    "LensRenderer",
    "ObservedData",
    "ResidualSignal",
    "RowData",
    "ZeroSignal",
    "finetune",
    "finetune_lens",
    "gradient_memory_bytes",
    "lens_cost",
    "load_control",
    "look_ahead",
    "make_signal",
    "sample_feedback",
    "save_control",
    "signal_calls_per_sample",
    "split_steps",
    "tensor_batches",
    "weights_hash",
]

#: Cost features are clipped to +/- this after the symmetric log (the paper clipped the NLL
#: to +/-12 for lensing).
FEATURE_CLIP = 12.0


def _symlog(x: Tensor) -> Tensor:
    """``sign(x) log(1 + |x|)``: compresses costs spanning decades, defined for any sign."""
    return torch.sign(x) * torch.log1p(x.abs())


# --------------------------------------------------------------------------- observed data


class RowData(Protocol):
    """What a signal compares against: one row per observation (a ``Tensor`` qualifies).

    ``len(obs)`` is the number of rows and ``obs[index]`` (``index`` a long tensor) selects
    rows; the sampler and ``finetune`` only ever index it, so any record of tensors works.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: Tensor) -> RowData: ...


@dataclass(frozen=True)
class ObservedData:
    """Observed data with Gaussian noise, one row per observation: what a cost compares to.

    Generic over the data's shape: images ``(B, H, W)`` for lenses, vectors ``(B, M)`` for
    the SBI tasks.

    Attributes:
        x: Data, shape ``(B, *S)``, in the forward model's units.
        sigma: Noise standard deviation, same units, > 0: shape ``(B, *S)`` (per row) or
            ``S`` (shared by every row).
        mask: Optional bool tensor, ``(B, *S)`` or ``S`` like ``sigma``; True where the
            datum is used.
        key: Optional long tensor ``(B,)``: which forward model each row belongs to (e.g. one
            simulator per distinct PSF), or for a forward that takes the keys
            (``LensRenderer``) which pixel grid and PSF; ``None`` means a single forward
            model.
    """

    x: Tensor
    sigma: Tensor
    mask: Tensor | None = None
    key: Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: Tensor) -> ObservedData:
        """Rows ``index`` (a long tensor or slice) of every field."""

        def take(a: Tensor | None) -> Tensor | None:
            # Fields with fewer dims than x are shared by every row (broadcast), not indexed.
            return a if a is None or a.ndim < self.x.ndim else a[index]

        key = None if self.key is None else self.key[index]
        return ObservedData(self.x[index], take(self.sigma), take(self.mask), key)


def _per_group(group: Tensor, fn: Callable[[int, Tensor], Tensor]) -> Tensor:
    """``fn(g, rows)`` once per distinct ``group`` value, results in the rows' order.

    Args:
        group: Long tensor ``(B,)``, the group of each row.
        fn: Maps a group and its row indices ``(n_g,)`` to results ``(n_g, ...)``.

    Returns:
        The results of all rows, ``(B, ...)``, row ``i`` at position ``i``.
    """
    order = torch.argsort(group, stable=True)
    groups = torch.unique_consecutive(group[order], return_counts=True)
    parts, start = [], 0
    for g, count in zip(*groups, strict=True):
        rows = order[start : start + int(count)]
        parts.append(fn(int(g), rows))
        start += int(count)
    return torch.cat(parts)[torch.argsort(order)]


class GaussianCost:
    """Reduced chi^2 of a forward model at ``theta = transform.from_u(u)`` against data.

    ``cost(u, obs) = sum_used ((f(theta) - x) / sigma)^2 / n_used`` per row: about 1 at the
    truth, whatever the data size, so one feature scale fits every instrument. Masked data
    (``obs.mask`` False) contribute exactly zero, whatever their values.

    Args:
        forward: Differentiable forward model ``theta (B, D) -> data (B, *S)`` (noiseless), or
            a sequence of them selected per row by ``obs.key``, or one that takes the keys
            itself (``forward(theta, key)``, marked by ``forward.takes_key = True``, e.g.
            ``LensRenderer``).
        transform: Physical <-> standardized parameters (identity by default).
        max_rows: Rows per differentiated evaluation (``GradientSignal`` splits larger
            batches), bounding the memory autograd keeps for the backward pass; ``None``:
            no limit. ``lens_cost`` sets it from the simulator's grid.

    Example:
        >>> cost = GaussianCost(lambda theta: 2 * theta)
        >>> obs = ObservedData(torch.zeros(3, 2), torch.ones(3, 2))
        >>> cost(torch.ones(3, 2), obs).tolist()
        [4.0, 4.0, 4.0]
    """

    def __init__(
        self,
        forward: Callable[[Tensor], Tensor] | Sequence[Callable[[Tensor], Tensor]],
        transform: ParamTransform | None = None,
        max_rows: int | None = None,
    ) -> None:
        self.forward = forward
        self.transform = transform or IdentityTransform()
        self.max_rows = max_rows

    def _simulate(self, theta: Tensor, key: Tensor | None) -> Tensor:
        if getattr(self.forward, "takes_key", False):
            return self.forward(theta, key)
        if callable(self.forward):
            return self.forward(theta)
        if key is None:
            raise ValueError("a sequence of forward models needs ObservedData.key per row")
        forward = self.forward
        return _per_group(key, lambda k, rows: forward[k](theta[rows]))

    def residual(self, u: Tensor, obs: ObservedData) -> Tensor:
        """Normalized residual ``(f(theta) - x) / sigma``, zero on masked data.

        Args:
            u: Standardized parameters, shape ``(B, D)``.
            obs: Observed data, ``B`` rows.

        Returns:
            Residuals, shape ``(B, *S)``, in units of sigma (may hold NaN where the forward
            model does, on used data).
        """
        theta = self.transform.from_u(u)
        model = self._simulate(theta, obs.key)
        r = (model - obs.x.to(model)) / obs.sigma.to(model)
        if obs.mask is not None:
            r = torch.where(obs.mask, r, torch.zeros_like(r))
        return r

    def __call__(self, u: Tensor, obs: ObservedData) -> Tensor:
        """Reduced chi^2 per row, shape ``(B,)``, for ``u`` ``(B, D)``."""
        r2 = self.residual(u, obs) ** 2
        dims = tuple(range(1, r2.ndim))
        if obs.mask is None:
            n_used = r2[0].numel()
        else:
            n_used = obs.mask.expand_as(r2).sum(dim=dims).clamp_min(1).to(r2)
        return r2.sum(dim=dims) / n_used


#: Memory budget of one differentiated simulator call of the lens feedback cost on the CPU
#: (and the least on a GPU), bytes.
GRADIENT_MEMORY_BYTES = 2**30


def gradient_memory_bytes(device: torch.device | str) -> int:
    """Memory budget of one differentiated simulator call on ``device``, bytes.

    ``GRADIENT_MEMORY_BYTES`` on the CPU (larger calls got slower there, docs/benchmarks.md).
    On CUDA, a quarter of the device memory free now, and at least that: a GPU needs rows by
    the thousand per call to keep busy (with 1 GiB, one controlled step of a 10,000-sample
    lens is 76 calls of 133 rows for ``euclid`` and 173 of 58 for ``hst``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(GRADIENT_MEMORY_BYTES, free // 4)
    return GRADIENT_MEMORY_BYTES


#: Bytes autograd keeps per float32 pixel of the simulator's fine grid (measured, rounded up).
GRADIENT_BYTES_PER_FINE_PIXEL = 400


class LensRenderer:
    """Images of rows from different observations, one simulator call per pixel grid.

    Rows whose observations share a pixel grid but not a PSF go through one simulator that
    takes the PSF per row (``LensSimulator(psf_per_row=True)``): a batch of lenses is then
    one call, not one per PSF (small calls leave a GPU idle, docs/benchmarks.md).

    Args:
        simulators: One simulator per pixel grid.
        psfs: Per grid, the fine kernels ``(P, K, K)`` of its per-row simulator, or ``None``
            for a simulator with its PSF built in.
        grid: Long tensor ``(M,)``: the grid of each key.
        slot: Long tensor ``(M,)``: the kernel of each key within its grid's ``psfs``.
    """

    takes_key = True

    def __init__(
        self, simulators: Sequence[Callable[..., Tensor]], psfs: Sequence[Tensor | None],
        grid: Tensor, slot: Tensor,
    ) -> None:  # fmt: skip
        self.simulators = list(simulators)
        self.psfs = list(psfs)
        self.grid = grid
        self.slot = slot

    def _render(self, g: int, theta: Tensor, slots: Tensor) -> Tensor:
        psfs = self.psfs[g]
        if psfs is None:
            return self.simulators[g](theta)
        return self.simulators[g](theta, psf=psfs[slots])

    def __call__(self, theta: Tensor, key: Tensor | None) -> Tensor:
        """Images ``(B, H, W)`` for ``theta`` ``(B, D)``; ``key`` ``(B,)`` picks grid and PSF."""
        if key is None:
            raise ValueError("LensRenderer needs ObservedData.key per row")
        grid, slot = self.grid[key], self.slot[key]
        if len(self.simulators) == 1:
            return self._render(0, theta, slot)
        return _per_group(grid, lambda g, rows: self._render(g, theta[rows], slot[rows]))


#: Rows of one compiled simulator call (``lens_cost(compile=True)``) per device type: every
#: call is padded to it, so that one compiled graph serves every batch size.
COMPILED_ROWS = {"cuda": 1024, "cpu": 32}

#: Compiled simulators take fine kernel sides of ``COMPILED_SIDE_STEP k + 1`` pixels.
COMPILED_SIDE_STEP = 8

#: Compiled simulators, reused across ``lens_cost`` calls: one compilation per grid, kernel
#: side, dtype and device in a process (a fresh module would be compiled again).
_COMPILED: dict[tuple, CompiledSimulator] = {}
_COMPILED_MAX = 8


class CompiledSimulator:
    """A per-row-PSF ``LensSimulator`` run through ``torch.compile`` on fixed-size row chunks.

    ``torch.compile`` fuses the simulator's elementwise work (hundreds of full-grid passes
    per differentiated call in eager mode) into a few kernels. Each call is split into
    chunks of ``rows`` rows and the last one is padded (with copies of its first row, no
    gradient), so one graph of fixed shape serves every batch size: a new row count would
    compile again (tens of seconds on a GPU, minutes on a CPU).

    Args:
        config: Pixel grid and supersampling.
        side: Fine kernel side (odd); ``forward``'s kernels must have it.
        dtype: Simulation dtype.
        device: Simulation device.
        rows: Rows per compiled call (default ``COMPILED_ROWS`` of the device type).
    """

    def __init__(
        self, config: SimulatorConfig, side: int, dtype: torch.dtype,
        device: torch.device | str, rows: int | None = None,
    ) -> None:  # fmt: skip
        from lensflow.simulator import LensSimulator

        device = torch.device(device)
        self.rows = rows or COMPILED_ROWS.get(device.type, COMPILED_ROWS["cpu"])
        self.simulator = LensSimulator(config, dtype=dtype, device=device, psf_per_row=True,
                                       psf_side=side, chunk_size=self.rows)  # fmt: skip
        self._fn = torch.compile(self.simulator, dynamic=False)

    @property
    def fine_grid_side(self) -> int:
        """Side, in fine pixels, of the PSF-padded supersampled grid."""
        return self.simulator.fine_grid_side

    def __call__(self, theta: Tensor, psf: Tensor) -> Tensor:
        """Images ``(B, H, W)`` for ``theta`` ``(B, 21)`` and fine kernels ``psf`` ``(B, K, K)``."""
        rows = self.rows
        parts = []
        for i in range(0, theta.shape[0], rows):
            th, ps = theta[i : i + rows], psf[i : i + rows]
            n = th.shape[0]
            if n < rows:
                th = torch.cat([th, th[:1].detach().expand(rows - n, -1)])
                ps = torch.cat([ps, ps[:1].expand(rows - n, -1, -1)])
            parts.append(self._fn(th, psf=ps)[:n])
        return torch.cat(parts)


def compiled_simulator(
    config: SimulatorConfig, side: int, dtype: torch.dtype, device: torch.device | str,
    rows: int | None = None,
) -> CompiledSimulator:  # fmt: skip
    """The process's ``CompiledSimulator`` for this grid, kernel side, dtype and device.

    Args:
        config: Pixel grid and supersampling (``n_pix``, ``pixel_scale_arcsec``, ...).
        side: Fine kernel side (odd).
        dtype: Simulation dtype.
        device: Simulation device.
        rows: Rows per compiled call (default ``COMPILED_ROWS`` of the device type).

    Returns:
        A cached ``CompiledSimulator``: the first call of a new one compiles.
    """
    device = torch.device(device)
    key = (config, side, dtype, str(device), rows)
    if key not in _COMPILED:
        if len(_COMPILED) >= _COMPILED_MAX:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = CompiledSimulator(config, side, dtype, device, rows)
    return _COMPILED[key]


def lens_cost(
    observations: Observation | Sequence[Observation],
    config: SimulatorConfig,
    transform: ParamTransform | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    psf_batching: bool | None = None,
    compile: bool = False,
) -> tuple[GaussianCost, ObservedData]:
    """The lens feedback cost, with simulators built from the observations themselves.

    Each observation is simulated on its own pixel grid (``n_pix`` and
    ``pixel_scale_arcsec`` from the observation) with its own PSF kernel; the other settings
    (supersampling) come from ``config``. Observations sharing grid and PSF share one
    simulator. With ``psf_batching``, observations sharing a grid share one simulator and
    one call whatever their PSFs (``LensRenderer``; the kernels go in per row). The data
    rows carry the image, noise map and likelihood mask.

    Args:
        observations: One or more observations, square images.
        config: Simulator settings for everything the observation does not fix.
        transform: Physical <-> standardized parameters of the flow (identity by default).
            Lenses use ``params.UnconstrainedTransform()``.
        dtype: Simulation dtype (default: the observations' dtype).
        device: Simulation device (default: the observations' device).
        psf_batching: One call per pixel grid (kernels per row, padded to the largest)
            instead of one per grid and PSF. Default: on a GPU only. There small calls
            leave the card idle (a batch of 100 euclid lenses x 100 samples: 8.0 s -> 2.5 s
            on an H100); on the CPU the padding and per-row kernel transforms cost more
            than they save (20 lenses x 20 samples: 7.5 s -> 9.5 s; docs/benchmarks.md).
        compile: Render through ``torch.compile``d simulators (``CompiledSimulator``: one
            per grid, kernels per row, fixed-size row chunks, cached in the process). The
            first call compiles (tens of seconds on a GPU, minutes on a CPU); it pays where
            many calls follow, such as a catalog (docs/benchmarks.md).

    Returns:
        The cost (reduced chi^2 over unmasked pixels) and the observed data, one row per
        observation in the given order.
    """
    from lensflow.simulator import LensSimulator, fine_psf, pad_psf

    obs_list = [observations] if not isinstance(observations, Sequence) else list(observations)
    if not obs_list:
        raise ValueError("lens_cost needs at least one observation")
    dtype = dtype or obs_list[0].image.dtype
    device = torch.device(device) if device is not None else obs_list[0].image.device
    grids: list[tuple[tuple[int, int], float]] = []
    kernels: list[list[Tensor]] = []
    pairs: list[tuple[int, int]] = []
    keys = []
    for obs in obs_list:
        h, w = obs.shape
        if h != w:
            raise ValueError(f"{obs.name or 'observation'}: image {h}x{w} is not square")
        grid = (obs.shape, obs.pixel_scale_arcsec)
        if grid not in grids:
            grids.append(grid)
            kernels.append([])
        g = grids.index(grid)
        slot = next(
            (i for i, k in enumerate(kernels[g])
             if k.shape == obs.psf.shape and bool(torch.equal(k, obs.psf))),
            None,
        )  # fmt: skip
        if slot is None:
            kernels[g].append(obs.psf)
            slot = len(kernels[g]) - 1
        if (g, slot) not in pairs:
            pairs.append((g, slot))
        keys.append(pairs.index((g, slot)))
    if psf_batching is None:
        psf_batching = device.type != "cpu"
    if (
        not psf_batching and not compile
    ):  # one simulator per grid and PSF, called one after another
        sims = []
        for g, slot in pairs:
            (n_pix, _), scale = grids[g]
            cfg = dataclasses.replace(config, n_pix=n_pix, pixel_scale_arcsec=scale)
            sims.append(LensSimulator(cfg, psf_kernel=kernels[g][slot], dtype=dtype,
                                      device=device))  # fmt: skip
        sides = [sim.fine_grid_side for sim in sims]
        forward: Callable[..., Tensor] | list[LensSimulator] = sims[0] if len(sims) == 1 else sims
        return _cost(forward, transform, sides, dtype, device), _rows(
            obs_list, keys, dtype, device
        )
    # One simulator per grid; with several PSFs (or compiled) it takes the kernel per row.
    sims, stacks = [], []
    for ((n_pix, _), scale), psfs in zip(grids, kernels, strict=True):
        cfg = dataclasses.replace(config, n_pix=n_pix, pixel_scale_arcsec=scale)
        if len(psfs) == 1 and not compile:
            sims.append(LensSimulator(cfg, psf_kernel=psfs[0], dtype=dtype, device=device))
            stacks.append(None)
            continue
        fine = [fine_psf(cfg, k) for k in psfs]
        side = max(f.shape[-1] for f in fine)
        if compile:
            # Kernel sides rounded up to 8k + 1 (zero padding does not change the images),
            # so that batches of similar PSFs share one compiled graph.
            side += -(side - 1) % COMPILED_SIDE_STEP
            sims.append(compiled_simulator(cfg, side, dtype, device))
        else:
            sims.append(LensSimulator(cfg, dtype=dtype, device=device, psf_per_row=True,
                                      psf_side=side))  # fmt: skip
        stacks.append(torch.stack([pad_psf(f, side) for f in fine]).to(device, dtype))
    if len(sims) == 1 and stacks[0] is None:
        forward = sims[0]
    else:
        index = torch.tensor(pairs, dtype=torch.long, device=device).reshape(-1, 2)
        forward = LensRenderer(sims, stacks, index[:, 0], index[:, 1])
    cost = _cost(forward, transform, [sim.fine_grid_side for sim in sims], dtype, device)
    if compile:  # the compiled calls' fixed row count
        cost.max_rows = sims[0].rows
    return cost, _rows(obs_list, keys, dtype, device)


def _rows(
    obs_list: Sequence[Observation], keys: Sequence[int], dtype: torch.dtype, device: torch.device
) -> ObservedData:
    return ObservedData(
        x=torch.stack([o.image for o in obs_list]).to(device, dtype),
        sigma=torch.stack([o.sigma for o in obs_list]).to(device, dtype),
        mask=torch.stack([o.mask for o in obs_list]).to(device),
        key=torch.tensor(keys, dtype=torch.long, device=device),
    )


def _cost(
    forward: Callable[..., Tensor] | Sequence[Callable[[Tensor], Tensor]],
    transform: ParamTransform | None, sides: Sequence[int], dtype: torch.dtype,
    device: torch.device,
) -> GaussianCost:  # fmt: skip
    # Memory of one differentiated image: about GRADIENT_BYTES_PER_FINE_PIXEL per float32
    # pixel of the PSF-padded supersampled grid (measured 245-346; 64 rows of a 100 x 100
    # image with a 61 x 61 PSF kernel keep 1.5 GB for the backward pass).
    per_row = max(sides) ** 2 * GRADIENT_BYTES_PER_FINE_PIXEL * torch.finfo(dtype).bits // 32
    max_rows = max(1, gradient_memory_bytes(device) // per_row)
    return GaussianCost(forward, transform, max_rows=max_rows)


# --------------------------------------------------------------------------- control signals


@runtime_checkable
class ControlSignal(Protocol):
    """The signature every control signal shares.

    ``signal(u1_hat, obs)`` maps look-ahead estimates ``u1_hat`` ``(B, D)`` (standardized
    space) and the observed data of each row (``len(obs) == B``) to features ``(B, dim)``,
    finite everywhere. Signals with parameters are ``nn.Module``s; those train with the
    control network.
    """

    dim: int

    def __call__(self, u1_hat: Tensor, obs: RowData) -> Tensor: ...


class GradientSignal:
    """Cost and gradient at the look-ahead estimate: ``[cost, |grad|, ok, grad / |grad|]``.

    The gradient is taken with respect to the standardized parameters ``u`` by autograd
    through ``cost`` (the differentiable simulator); it is an input feature, detached from
    every network. Normalization: ``symlog(cost)`` and ``symlog(|grad|)`` clipped to
    ``+/-FEATURE_CLIP``, and the gradient's direction (unit length). Rows whose cost or
    gradient is not finite get all-zero features and ``ok = 0``, so NaNs from the simulator
    never reach the control network.

    Args:
        cost: Differentiable ``cost(u (B, D), obs) -> (B,)``, rows independent (e.g. a
            ``GaussianCost``).
        dim_u: Parameter dimension ``D``.

    Attributes:
        dim: Feature width ``D + 3``.
    """

    def __init__(self, cost: Callable[[Tensor, RowData], Tensor], dim_u: int) -> None:
        self.cost = cost
        self.dim_u = dim_u
        self.dim = dim_u + 3

    def __call__(self, u1_hat: Tensor, obs: RowData) -> Tensor:
        """Features ``(B, D + 3)`` for ``u1_hat`` ``(B, D)`` and ``B`` rows of ``obs``."""
        if u1_hat.shape[-1] != self.dim_u:
            raise ValueError(f"u1_hat has {u1_hat.shape[-1]} columns, expected {self.dim_u}")
        n = u1_hat.shape[0]
        step = getattr(self.cost, "max_rows", None) or n
        costs, grads = [], []
        for i in range(0, n, step):  # bounded memory: autograd keeps each part's graph
            part = obs if step >= n else obs[i : i + step]
            u = u1_hat[i : i + step].detach().requires_grad_(True)
            with torch.enable_grad():
                c = self.cost(u, part)
                # Rows are independent, so the gradient of the sum is the per-row gradient.
                (g,) = torch.autograd.grad(c.sum(), u)
            costs.append(c.detach())
            grads.append(g.detach())
        c, g = torch.cat(costs).to(u1_hat), torch.cat(grads)
        ok = torch.isfinite(c) & torch.isfinite(g).all(dim=-1)
        c = torch.where(ok, c, torch.zeros_like(c))
        g = torch.where(ok[:, None], g, torch.zeros_like(g))
        norm = g.norm(dim=-1)
        direction = g / norm.clamp_min(1e-12)[:, None]
        scalars = torch.stack([_symlog(c), _symlog(norm)], dim=-1).clamp(
            -FEATURE_CLIP, FEATURE_CLIP
        )
        return torch.cat([scalars, ok[:, None].to(u1_hat), direction], dim=-1)


class ResidualSignal(nn.Module):
    """A learned encoder of the normalized residual at the look-ahead estimate.

    The residual ``(f(theta1_hat) - x) / sigma`` (zero on masked data) is computed without
    gradient, made finite (NaN/inf -> 0) and compressed with ``asinh`` (linear within a few
    sigma, logarithmic beyond), then encoded. Image residuals ``(B, H, W)`` get a channel
    axis, so ``nn.ImageEncoder(1, dim)`` fits; vector residuals ``(B, M)`` go in as they are
    (``nn.VectorEncoder(M, dim)``). The encoder trains together with the control network.

    Args:
        cost: An object with ``residual(u, obs) -> (B, *S)`` (a ``GaussianCost``).
        encoder: Module mapping the residual batch to ``(B, dim)``.
        dim: Output width of ``encoder``.
    """

    def __init__(self, cost: GaussianCost, encoder: nn.Module, dim: int) -> None:
        super().__init__()
        self.cost = cost
        self.encoder = encoder
        self.dim = dim

    def forward(self, u1_hat: Tensor, obs: RowData) -> Tensor:
        """Encoded residual ``(B, dim)`` for ``u1_hat`` ``(B, D)`` and ``B`` rows of ``obs``."""
        with torch.no_grad():
            r = self.cost.residual(u1_hat.detach(), obs)
            r = torch.asinh(torch.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0))
        if r.ndim == 3:
            r = r[:, None]
        return self.encoder(r.to(u1_hat))


class ZeroSignal:
    """Zeros in place of a signal: finetuning without the simulator (the ablation).

    Args:
        dim: Feature width (use the width of the signal it replaces).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def __call__(self, u1_hat: Tensor, obs: RowData) -> Tensor:
        """Zeros ``(B, dim)``."""
        return u1_hat.new_zeros(u1_hat.shape[0], self.dim)


#: The selectable control signals: simulator gradient, learned residual encoder, ablation.
SIGNAL_KINDS = ("gradient", "learned", "zero")

#: The residual encoder of the ``learned`` signal (an ``nn.ImageEncoder`` of one channel).
LEARNED_ENCODER = {"embed_dim": 32, "base_channels": 8, "n_stages": 3}


def make_signal(
    kind: str, cost: GaussianCost, dim_u: int, *, encoder: dict | None = None
) -> ControlSignal:
    """The control signal of a kind, on a cost (for images: a fresh residual encoder).

    Args:
        kind: ``"gradient"`` (``GradientSignal``, width ``D + 3``), ``"learned"``
            (``ResidualSignal`` with an ``nn.ImageEncoder`` of the image residual) or
            ``"zero"`` (``ZeroSignal`` of the gradient signal's width ``D + 3``).
        cost: The cost (reduced chi^2 and residual) built from the observations.
        dim_u: Parameter dimension ``D``.
        encoder: ``ImageEncoder`` settings of the learned signal (default
            ``LEARNED_ENCODER``).

    Returns:
        The signal; a learned one is an ``nn.Module`` with freshly initialized weights.
    """
    from lensflow.nn import ImageEncoder

    if kind == "gradient":
        return GradientSignal(cost, dim_u)
    if kind == "zero":
        return ZeroSignal(dim_u + 3)
    if kind == "learned":
        e = {**LEARNED_ENCODER, **(encoder or {})}
        net = ImageEncoder(1, e["embed_dim"], base_channels=e["base_channels"],
                           n_stages=e["n_stages"])  # fmt: skip
        return ResidualSignal(cost, net, e["embed_dim"])
    raise ValueError(f"unknown control signal {kind!r}; choose from {', '.join(SIGNAL_KINDS)}")


# --------------------------------------------------------------------------- control network


def look_ahead(u_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """One-step estimate of the endpoint, ``u1_hat = u_t + (1 - t) v``.

    Args:
        u_t: States, shape ``(B, D)``.
        t: Times, shape ``(B,)`` or ``()``.
        v: Base velocities at ``(u_t, t)``, shape ``(B, D)``.

    Returns:
        ``u1_hat``, shape ``(B, D)``.
    """
    t = t.expand(u_t.shape[:-1]) if t.ndim == 0 else t
    return u_t + (1 - t)[:, None] * v


class ControlNet(nn.Module):
    """The control network ``v_C([v, emb(t), c]) -> correction`` ``(B, D)``.

    The output layer is zero-initialized, so a fresh control leaves the base flow unchanged.

    Args:
        dim: Parameter dimension ``D``.
        signal_dim: Control feature width ``C``.
        width: Hidden width.
        n_blocks: Residual blocks.
        time_dim: Size of the sinusoidal time embedding.
    """

    def __init__(
        self, dim: int, signal_dim: int, *, width: int = 128, n_blocks: int = 2,
        time_dim: int = 32,
    ) -> None:  # fmt: skip
        super().__init__()
        self.dim, self.signal_dim = dim, signal_dim
        self.width, self.n_blocks, self.time_dim = width, n_blocks, time_dim
        self.time = TimeEmbedding(time_dim)
        self.mlp = ResidualMLP(
            dim + time_dim + signal_dim, dim, width=width, n_blocks=n_blocks, zero_init=True
        )

    def forward(self, v: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """Correction ``(B, D)`` for base velocities ``(B, D)``, times ``(B,)``, features ``(B, C)``."""
        t = t.expand(v.shape[:-1]) if t.ndim == 0 else t
        return self.mlp(torch.cat([v, self.time(t), c], dim=-1))


class ControlledPosterior(nn.Module):
    """A frozen base flow plus a control network driven by a control signal.

    The base posterior passed in is frozen in place (``requires_grad`` False, kept in
    ``eval`` mode); ``finetune`` hands it a copy, so the caller's flow is untouched.

    Args:
        base: The pretrained flow posterior.
        control: The control network.
        signal: The control signal (registered as a submodule if it is an ``nn.Module``).
        t_start: Control acts for ``t > t_start``.
        n_steps: Default solver steps over ``[0, 1]`` (the paper: 200).
        solver: Default solver name (the paper: ``euler``).
        chunk_size: Rows per signal evaluation (bounds simulator memory); ``None``: all.
        control_steps: Default solver steps on ``[t_start, 1]`` (each costs a signal call
            per sample); ``None``: the share ``round((1 - t_start) n_steps)`` of
            ``n_steps``. The steps on ``[0, t_start]`` are ``n_steps`` minus that share in
            either case, so a smaller ``control_steps`` makes feedback cheaper without
            coarsening the base flow's integration.
        base_solver: Default solver on ``[0, t_start]``, where only the base flow acts
            (network evaluations, no simulator calls); ``None``: ``solver``.
    """

    def __init__(
        self, base: FlowPosterior, control: ControlNet, signal: ControlSignal, *,
        t_start: float = 0.8, n_steps: int = 200, solver: str = "euler",
        chunk_size: int | None = 4096, control_steps: int | None = None,
        base_solver: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if not 0.0 <= t_start < 1.0:
            raise ValueError(f"t_start must be in [0, 1), got {t_start}")
        if control.signal_dim != signal.dim or control.dim != base.field.dim:
            raise ValueError(
                f"control net (dim={control.dim}, signal_dim={control.signal_dim}) does not "
                f"match the flow (dim={base.field.dim}) and signal (dim={signal.dim})"
            )
        self.base = base.requires_grad_(False).eval()
        self.control = control
        self.signal = signal
        self.t_start = t_start
        self.n_steps = n_steps
        self.solver = solver
        self.chunk_size = chunk_size
        self.control_steps = _check_control_steps(control_steps)
        if base_solver is not None:
            get_solver(base_solver)  # unknown names fail here, not at sampling
        self.base_solver = base_solver

    @property
    def transform(self) -> ParamTransform:
        """The base flow's parameter transform."""
        return self.base.transform

    def train(self, mode: bool = True) -> ControlledPosterior:
        """Set training mode on the control parts; the base flow stays in ``eval``."""
        super().train(mode)
        self.base.eval()
        return self

    def features(self, u1_hat: Tensor, obs: RowData, rows: Tensor | None = None) -> Tensor:
        """Signal features ``(N, C)``, evaluated in chunks of ``chunk_size`` rows.

        Args:
            u1_hat: Look-ahead estimates, shape ``(N, D)``.
            obs: Observed data; row ``i`` of ``u1_hat`` belongs to ``obs[rows[i]]``
                (``rows=None``: to ``obs[i]``).
            rows: Optional long tensor ``(N,)`` indexing ``obs``.

        Returns:
            Features, shape ``(N, C)``.
        """
        n = u1_hat.shape[0]
        step = self.chunk_size or n
        out = []
        for i in range(0, n, step):
            j = min(i + step, n)
            index = torch.arange(i, j, device=u1_hat.device) if rows is None else rows[i:j]
            out.append(self.signal(u1_hat[i:j], obs[index]))
        return torch.cat(out)

    def drift(
        self, u_t: Tensor, t: Tensor, h: Tensor, obs: RowData, rows: Tensor | None = None
    ) -> Tensor:
        """Controlled velocity: ``v + v_C([v, t, c])`` where ``t > t_start``, ``v`` elsewhere.

        Args:
            u_t: States, shape ``(N, D)``.
            t: Times, shape ``(N,)`` or ``()``.
            h: Base-flow embeddings of the observations, shape ``(N, E)``.
            obs: Observed data for the signal (see ``features`` for ``rows``).
            rows: Optional long tensor ``(N,)`` indexing ``obs``.

        Returns:
            Velocities, shape ``(N, D)``.
        """
        gate = t > self.t_start
        if not bool(gate.any()):
            with torch.no_grad():
                return self.base.drift(u_t, t, h)  # no signal (simulator) call before t_start
        v, controlled = self._velocities(u_t, t, h, obs, rows)
        return controlled if gate.ndim == 0 else torch.where(gate[:, None], controlled, v)

    def _velocities(
        self, u_t: Tensor, t: Tensor, h: Tensor, obs: RowData, rows: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Base and controlled velocity, ungated."""
        with torch.no_grad():
            v = self.base.drift(u_t, t, h)
        c = self.features(look_ahead(u_t, t, v), obs, rows)
        return v, v + self.control(v, t, c)

    def sample(
        self, x: Tensor, obs: RowData, n: int, *, n_steps: int | None = None,
        solver: str | None = None, generator: torch.Generator | None = None,
        noise: Tensor | None = None, control_steps: int | None = None,
        base_solver: str | None = None,
    ) -> Tensor:  # fmt: skip
        """Draw ``n`` posterior samples per observation with feedback, in physical units.

        Args:
            x: Network inputs of ``B`` observations (what the base flow embeds).
            obs: Observed data for the signal, ``B`` rows in the order of ``x``.
            n: Samples per observation.
            n_steps: Solver steps over ``[0, 1]`` (default ``self.n_steps``).
            solver: Solver name (default ``self.solver``).
            generator: Torch generator for the base noise.
            noise: Base noise ``(n, B, D)`` instead of drawing it.
            control_steps: Steps on ``[t_start, 1]`` (default ``self.control_steps``).
            base_solver: Solver on ``[0, t_start]`` (default: ``solver`` where given, else
                ``self.base_solver``, else ``self.solver``).

        Returns:
            ``theta`` samples, shape ``(n, B, D)``.
        """
        return sample_feedback(
            self, x, obs, n, n_steps=n_steps, solver=solver, generator=generator, noise=noise,
            control_steps=control_steps, base_solver=base_solver,
        ).theta  # fmt: skip


@dataclass(frozen=True)
class FeedbackSamples:
    """Posterior samples drawn with feedback, and what they cost.

    Attributes:
        theta: Physical samples, shape ``(n, B, D)``.
        u: Standardized samples, shape ``(n, B, D)``.
        n_signal_calls: Signal evaluations (simulator calls, each with a gradient for
            ``GradientSignal``) per sample.
        n_steps_base: Solver steps on ``[0, t_start]``.
        n_steps_control: Solver steps on ``[t_start, 1]``.
    """

    theta: Tensor
    u: Tensor
    n_signal_calls: int
    n_steps_base: int
    n_steps_control: int


def _check_control_steps(control_steps: int | None) -> int | None:
    if control_steps is not None and (
        isinstance(control_steps, bool) or not isinstance(control_steps, int) or control_steps < 1
    ):
        raise ValueError(f"control_steps must be an integer >= 1, got {control_steps!r}")
    return control_steps


def split_steps(n_steps: int, t_start: float, control_steps: int | None = None) -> tuple[int, int]:
    """Solver steps before and after ``t_start`` (how ``sample_feedback`` splits them).

    Args:
        n_steps: Steps over ``[0, 1]`` (>= 2).
        t_start: Start of the control, in ``(0, 1)``.
        control_steps: Steps on ``[t_start, 1]`` where not the share of ``n_steps``.

    Returns:
        ``(before, after)``: before is ``n_steps`` minus its share after,
        ``round((1 - t_start) n_steps)`` (at least 1); after is that share, or
        ``control_steps`` where given.

    Raises:
        ValueError: If ``n_steps < 2`` or ``control_steps < 1``.

    Example:
        >>> split_steps(40, 0.8), split_steps(20, 0.8, control_steps=8)
        ((32, 8), (16, 8))
    """
    if not isinstance(n_steps, int) or n_steps < 2:
        raise ValueError(f"n_steps must be an integer >= 2, got {n_steps!r}")
    share = min(n_steps - 1, max(1, round((1 - t_start) * n_steps)))
    if control_steps is None:
        return n_steps - share, share
    return n_steps - share, _check_control_steps(control_steps)


@torch.no_grad()
def sample_feedback(
    posterior: ControlledPosterior, x: Tensor, obs: RowData, n: int, *, n_steps: int | None = None,
    solver: str | None = None, generator: torch.Generator | None = None,
    noise: Tensor | None = None, control_steps: int | None = None,
    base_solver: str | None = None,
) -> FeedbackSamples:  # fmt: skip
    """Sample with feedback: the base drift up to ``t_start``, the controlled drift after.

    The two segments are integrated separately, ``n_steps - k`` steps on ``[0, t_start]`` and
    ``k = round((1 - t_start) n_steps)`` on ``[t_start, 1]``, so no step straddles the gate;
    choose ``n_steps`` with ``t_start * n_steps`` an integer for equal step sizes (200 Euler
    steps with ``t_start = 0.8``: 160 + 40, the paper's setting). ``control_steps`` replaces
    ``k`` on ``[t_start, 1]`` only (Euler 40 with 4 control steps: 32 + 4). Rows are laid out
    sample-major (row ``i`` belongs to observation ``i % B``); the signal is evaluated in
    chunks of ``posterior.chunk_size`` rows.

    Args:
        posterior: The controlled posterior.
        x: Network inputs of ``B`` observations.
        obs: Observed data for the signal, ``B`` rows in the order of ``x``.
        n: Samples per observation.
        n_steps: Solver steps over ``[0, 1]`` (default ``posterior.n_steps``).
        solver: Solver name (default ``posterior.solver``).
        generator: Torch generator for the base noise.
        noise: Base noise ``(n, B, D)`` instead of drawing it (e.g. one seed per
            observation, so a lens's samples do not depend on its batch neighbours).
        control_steps: Steps on ``[t_start, 1]`` (default ``posterior.control_steps``, and
            where that is ``None`` the share of ``n_steps`` above).
        base_solver: Solver on ``[0, t_start]``. Default: ``solver`` where it is given (an
            explicit solver applies to both segments), else ``posterior.base_solver``, else
            ``posterior.solver``. The base segment costs network evaluations only: a
            second-order solver there (``midpoint`` with half the steps) keeps the network
            cost of Euler and the simulator calls.

    Returns:
        The samples and the number of signal calls per sample.
    """
    base_solver = base_solver or solver or posterior.base_solver or posterior.solver
    solver = solver or posterior.solver
    if control_steps is None:
        control_steps = posterior.control_steps
    n_base, n_control = split_steps(n_steps or posterior.n_steps, posterior.t_start,
                                     control_steps)  # fmt: skip
    field = posterior.base.field
    h = field.embed(x)
    b = h.shape[0]
    if len(obs) != b:
        raise ValueError(f"obs has {len(obs)} rows for {b} observations")
    h_rep = h.unsqueeze(0).expand(n, *h.shape).reshape(n * b, -1)
    rows = torch.arange(b, device=h.device).repeat(n)
    z = base_noise(n, b, field.dim, h, generator=generator, noise=noise)
    solve = get_solver(solver)
    solve_base = get_solver(base_solver)
    t_start = posterior.t_start
    u = solve_base(lambda t, u_t: posterior.base.drift(u_t, t, h_rep), z, n_steps=n_base,
                   t1=t_start)  # fmt: skip
    calls = 0

    def controlled(t: Tensor, u_t: Tensor) -> Tensor:
        # The segment is the control interval: its left end t_start is the limit from the
        # right, so the gate is not re-evaluated here (t_start is not exact in float32).
        nonlocal calls
        calls += 1
        return posterior._velocities(u_t, t, h_rep, obs, rows)[1]

    u = solve(controlled, u, n_steps=n_control, t0=t_start, t1=1.0)
    u = u.reshape(n, b, field.dim)
    return FeedbackSamples(posterior.transform.from_u(u), u, calls, n_base, n_control)


def signal_calls_per_sample(
    n_steps: int, solver: str, t_start: float, control_steps: int | None = None
) -> int:
    """Signal calls per sample of ``sample_feedback``: evaluations in the controlled segment.

    Args:
        n_steps: Solver steps over ``[0, 1]``.
        solver: Solver name.
        t_start: Start of the control.
        control_steps: Steps on ``[t_start, 1]`` where not the share of ``n_steps``.

    Returns:
        Controlled steps times the solver's evaluations per step.

    Example:
        >>> signal_calls_per_sample(200, "euler", 0.8), signal_calls_per_sample(32, "midpoint", 0.8)
        (40, 12)
    """
    return split_steps(n_steps, t_start, control_steps)[1] * SOLVERS[solver][1]


# --------------------------------------------------------------------------- finetuning


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Settings of ``finetune``.

    Attributes:
        n_steps: Optimizer steps.
        batch_size: Training pairs per step.
        lr: Peak AdamW learning rate (cosine decay to 0).
        weight_decay: AdamW weight decay (control net and signal parameters only).
        grad_clip: Gradient-norm clip.
        t_start: Control acts for ``t > t_start``; training times are drawn in
            ``[t_start, 1]``.
        alpha: Time warp of the training times (0 = uniform on ``[t_start, 1]``).
        sigma_min: Width of the OT path at t = 1 (as in pretraining).
        width: Control net hidden width.
        n_blocks: Control net residual blocks.
        time_dim: Control net time-embedding size.
        n_steps_sample: Default solver steps of the returned posterior.
        solver: Default solver of the returned posterior.
        control_steps_sample: Default steps of the returned posterior on ``[t_start, 1]``
            (``None``: the share of ``n_steps_sample``; see ``split_steps``).
        base_solver_sample: Default solver of the returned posterior on ``[0, t_start]``
            (``None``: ``solver``).
        chunk_size: Rows per signal evaluation in sampling.
        time_limit_s: Optional wall-clock budget in seconds: the cosine then follows
            whichever of the step and time fractions is further along, and training stops
            when either reaches 1 (as ``TrainConfig.time_limit_s``).
    """

    n_steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    t_start: float = 0.8
    alpha: float = 0.0
    sigma_min: float = 1e-4
    width: int = 128
    n_blocks: int = 2
    time_dim: int = 32
    n_steps_sample: int = 200
    solver: str = "euler"
    control_steps_sample: int | None = None
    base_solver_sample: str | None = None
    chunk_size: int = 4096
    time_limit_s: float | None = None


@dataclass(frozen=True)
class FeedbackBatch:
    """One training batch for ``finetune``.

    Attributes:
        u: Standardized true parameters, shape ``(B, D)``.
        x: Network inputs (what the base flow embeds), batch of ``B``.
        obs: Observed data for the signal, ``B`` rows (e.g. ``ObservedData`` of the same
            simulated observations, with their noise map and mask).
    """

    u: Tensor
    x: Tensor
    obs: RowData


def tensor_batches(
    u: Tensor, x: Tensor, obs: RowData
) -> Callable[[int, torch.Generator | None], FeedbackBatch]:
    """A ``finetune`` data source drawing random rows (with replacement) from fixed pairs.

    Args:
        u: Standardized parameters, shape ``(N, D)``.
        x: Network inputs, batch of ``N``.
        obs: Observed data for the signal, ``N`` rows.

    Returns:
        ``data(batch_size, generator) -> FeedbackBatch``.
    """
    if not u.shape[0] == x.shape[0] == len(obs):
        raise ValueError(f"row counts differ: u {u.shape[0]}, x {x.shape[0]}, obs {len(obs)}")

    def draw(batch_size: int, generator: torch.Generator | None = None) -> FeedbackBatch:
        index = torch.randint(u.shape[0], (batch_size,), generator=generator)
        return FeedbackBatch(u[index], x[index], obs[index])

    return draw


def finetune(
    posterior: FlowPosterior, signal: ControlSignal,
    data: Callable[[int, torch.Generator | None], FeedbackBatch],
    cfg: FinetuneConfig | None = None, *, generator: torch.Generator | None = None,
    progress: bool = False, callback: Callable[[int, float], None] | None = None,
    init: ControlNet | None = None,
) -> ControlledPosterior:  # fmt: skip
    """Finetune a control network on a frozen copy of ``posterior``.

    The loss is the flow-matching loss of the controlled drift with ``t`` in
    ``[t_start, 1]``. Only the control net and the signal's parameters (if any) are in the
    optimizer; the simulator gradient, if any, is an input feature (no backpropagation
    through the simulator).

    Args:
        posterior: The pretrained flow; it is copied, and the original is left untouched.
        signal: The control signal.
        data: ``data(batch_size, generator) -> FeedbackBatch``.
        cfg: Settings (defaults: ``FinetuneConfig()``).
        generator: Torch generator for batches, times and noise.
        progress: Show a tqdm progress bar.
        callback: Called as ``callback(step, loss)`` after every step.
        init: Continue from this control net (a copy; its weights are not modified)
            instead of a zero-initialized one: a warm restart, with the learning rate
            starting its cosine again. Its shape is kept (``cfg.width``, ``n_blocks`` and
            ``time_dim`` are then unused).

    Returns:
        The controlled posterior (in ``eval`` mode).

    Raises:
        ValueError: If ``init`` does not fit the flow's dimension or the signal's width.
    """
    cfg = cfg or FinetuneConfig()
    if init is None:
        control = ControlNet(
            posterior.field.dim, signal.dim, width=cfg.width, n_blocks=cfg.n_blocks,
            time_dim=cfg.time_dim,
        )  # fmt: skip
    elif (init.dim, init.signal_dim) != (posterior.field.dim, signal.dim):
        raise ValueError(
            f"init control net takes {init.dim} parameters and a {init.signal_dim}-wide "
            f"signal, but the flow has {posterior.field.dim} and the signal "
            f"{type(signal).__name__} is {signal.dim} wide"
        )
    else:
        control = copy.deepcopy(init).requires_grad_(True)
    model = ControlledPosterior(
        copy.deepcopy(posterior), control, signal, t_start=cfg.t_start,
        n_steps=cfg.n_steps_sample, solver=cfg.solver, chunk_size=cfg.chunk_size,
        control_steps=cfg.control_steps_sample, base_solver=cfg.base_solver_sample,
    )  # fmt: skip
    ref = next(posterior.field.parameters())
    model.control.to(device=ref.device, dtype=ref.dtype)
    params = [p for p in model.parameters() if p.requires_grad]  # the base is frozen
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from lensflow.config import TrainConfig
    from lensflow.train import learning_rate  # the pretraining's cosine, without warmup

    schedule = TrainConfig(n_steps=cfg.n_steps, lr=1.0, warmup_steps=0,
                           time_limit_s=cfg.time_limit_s)  # fmt: skip
    model.train()
    steps: Iterable[int] = range(cfg.n_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="finetune")
    start = time.perf_counter()
    for step in steps:
        elapsed = time.perf_counter() - start
        if cfg.time_limit_s is not None and step > 0 and elapsed >= cfg.time_limit_s:
            break  # (after at least one step)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * learning_rate(step, schedule, elapsed)
        batch = data(cfg.batch_size, generator)
        u = batch.u.to(ref)
        with torch.no_grad():
            h = model.base.field.embed(batch.x)
        t = _sample_times(u.shape[0], alpha=cfg.alpha, t_min=cfg.t_start, generator=generator,
                          device=u.device, dtype=u.dtype)  # fmt: skip
        z = torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
        loss = flow_matching_loss(
            lambda u_t, tt, hh, obs=batch.obs: model.drift(u_t, tt, hh, obs), u, h, t, z,
            sigma_min=cfg.sigma_min,
        )  # fmt: skip
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if callback is not None:
            callback(step, float(loss.detach()))
    return model.eval()


def finetune_lens(
    model: TrainedPosterior, kind: str, cfg: FinetuneConfig | None = None, *,
    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
    progress: bool = False, callback: Callable[[int, float], None] | None = None,
    data: DataConfig | None = None, init: ControlNet | None = None,
    init_encoder: nn.Module | None = None,
) -> ControlledPosterior:  # fmt: skip
    """Finetune a lens control network on simulated lenses spanning the model's data ranges.

    Every batch is fresh from ``data.SimulatedPairs(model.simulator, model.data)``: PSF FWHM
    on the model's grid, background RMS and exposure time log-uniform over its ranges, fresh
    noise. The signal's cost is built the way ``lens_cost`` builds it from an observation at
    sampling time: a ``LensSimulator`` per grid FWHM given the PSF as a native *pixel
    kernel*, the pixel-integrated one of the generator's supersampled Gaussian
    (``simulator.pool_psf``), as an ``Observation`` carries it; row ``key`` = the PSF grid
    index; each image's own noise map.

    Args:
        model: The trained base posterior (``checkpoint.load_model``); not modified.
        kind: ``"gradient"``, ``"learned"`` or ``"zero"`` (see ``make_signal``).
        cfg: Finetuning settings (default ``FinetuneConfig()``).
        generator: Torch generator on ``device`` (prior, PSF, depth, noise, times).
        device: Device of simulation and training.
        progress: Show a tqdm progress bar.
        callback: Called as ``callback(step, loss)`` after every step.
        data: Seeing, depth and mask ranges of the training lenses (default: the model's
            own, ``model.data``); e.g. with ``mask_probability > 0`` the control net learns
            masked cutouts, whose masked pixels the cost leaves out.
        init: Continue from this control net (see ``finetune``), e.g. the ``control`` of
            ``checkpoint.load_control``.
        init_encoder: With ``kind="learned"``: continue from this residual encoder (a
            copy) instead of a fresh one; its output width must be ``init``'s signal
            width.

    Returns:
        The controlled posterior (on ``device``, ``eval`` mode); its signal's cost holds the
        training simulators, so use ``checkpoint.load_control`` to sample observations.

    Raises:
        ValueError: If ``init_encoder`` is given without ``init`` or for another kind.
    """
    from lensflow.data import SimulatedPairs
    from lensflow.simulator import LensSimulator, gaussian_psf, pool_psf

    base = copy.deepcopy(model.posterior).to(device)
    source = SimulatedPairs(model.simulator, data or model.data, device=device)
    transform = base.transform
    up, scale = model.simulator.upsample_factor, model.simulator.pixel_scale_arcsec
    sims = [
        LensSimulator(dataclasses.replace(model.simulator, psf_fwhm_arcsec=f),
                      psf_kernel=pool_psf(gaussian_psf(f, scale / up), up), device=device)
        for f in source.psf_grid_arcsec
    ]  # fmt: skip
    cost = GaussianCost(sims, transform)
    signal = make_signal(kind, cost, base.field.dim)
    if init_encoder is not None:
        if kind != "learned" or init is None:
            raise ValueError("init_encoder needs kind='learned' and the init control net")
        encoder = copy.deepcopy(init_encoder).requires_grad_(True)
        signal = ResidualSignal(cost, encoder, init.signal_dim)
    if isinstance(signal, nn.Module):
        signal.to(device)

    def draw(batch_size: int, gen: torch.Generator | None = None) -> FeedbackBatch:
        p = source.sample(batch_size, generator=gen)
        key = source.psf_index(p.psf_fwhm_arcsec)
        obs = ObservedData(p.image, p.sigma, mask=p.mask, key=key)  # masks: DataConfig
        return FeedbackBatch(transform.to_u(p.theta), p.x, obs)

    return finetune(base, signal, draw, cfg, generator=generator, progress=progress,
                    callback=callback, init=init)  # fmt: skip


# --------------------------------------------------------------------------- checkpoints


def weights_hash(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes, in sorted order).

    Args:
        module: Any module (the base flow's ``FlowPosterior``).

    Returns:
        Hex digest; equal digests mean bit-identical weights.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in {".safetensors", ".json"} else p
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_control(
    path: str | Path,
    posterior: ControlledPosterior,
    *,
    base_path: str | Path | None = None,
    extra: dict | None = None,
) -> tuple[Path, Path]:
    """Write the control network (and signal parameters) as safetensors + JSON.

    The JSON records the control net's shape, the gate and sampler defaults, the signal's
    class and width, and the base flow it belongs to: the SHA-256 of its weights (checked on
    load) and, optionally, its checkpoint path.

    Args:
        path: Output path; ``.safetensors`` and ``.json`` are written beside each other.
        posterior: The finetuned posterior.
        base_path: Path of the base checkpoint, recorded for provenance.
        extra: More JSON-able entries for the sidecar (``checkpoint.save_control`` adds the
            preset, signal kind, training record and status).

    Returns:
        The paths of the weights and of the JSON.
    """
    from safetensors.torch import save_file

    weights, meta_path = _paths(path)
    state = {f"control.{k}": v for k, v in posterior.control.state_dict().items()}
    if isinstance(posterior.signal, nn.Module):
        state |= {f"signal.{k}": v for k, v in posterior.signal.state_dict().items()}
    c = posterior.control
    meta = {
        "format": "lensflow-control",
        "version": 1,
        "dim": c.dim,
        "signal_dim": c.signal_dim,
        "width": c.width,
        "n_blocks": c.n_blocks,
        "time_dim": c.time_dim,
        "t_start": posterior.t_start,
        "n_steps": posterior.n_steps,
        "solver": posterior.solver,
        "control_steps": posterior.control_steps,
        "base_solver": posterior.base_solver,
        "signal": type(posterior.signal).__name__,
        "base_sha256": weights_hash(posterior.base),
        "base_path": None if base_path is None else str(base_path),
        "n_parameters": sum(p.numel() for p in posterior.control.parameters())
        + (sum(p.numel() for p in posterior.signal.parameters())
           if isinstance(posterior.signal, nn.Module) else 0),
    } | (extra or {})  # fmt: skip
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(weights))
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return weights, meta_path


def load_control(
    path: str | Path, base: FlowPosterior, signal: ControlSignal
) -> ControlledPosterior:
    """Rebuild a controlled posterior from ``save_control`` output.

    Args:
        path: The path given to ``save_control`` (either file, or their common stem).
        base: The base flow the control was trained on (its weight hash must match); it is
            copied, not modified.
        signal: A signal of the recorded class and width (its parameters are loaded).

    Returns:
        The controlled posterior, in ``eval`` mode.

    Raises:
        ValueError: If the base weights, the signal class or width do not match the record.
    """
    from safetensors.torch import load_file

    weights, meta_path = _paths(path)
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "lensflow-control":
        raise ValueError(f"{meta_path}: not a lensflow control checkpoint")
    base_hash = weights_hash(base)
    if base_hash != meta["base_sha256"]:
        raise ValueError(
            f"{meta_path}: base flow weights {base_hash[:12]} differ from the ones the control "
            f"was trained on ({meta['base_sha256'][:12]}, {meta['base_path']})"
        )
    if type(signal).__name__ != meta["signal"] or signal.dim != meta["signal_dim"]:
        raise ValueError(
            f"{meta_path}: signal {type(signal).__name__}(dim={signal.dim}) differs from the "
            f"recorded {meta['signal']}(dim={meta['signal_dim']})"
        )
    state = load_file(str(weights))
    control = ControlNet(meta["dim"], meta["signal_dim"], width=meta["width"],
                         n_blocks=meta["n_blocks"], time_dim=meta["time_dim"])  # fmt: skip
    control.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("control.")})
    if isinstance(signal, nn.Module):
        signal.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("signal.")})
    ref = next(base.field.parameters())
    model = ControlledPosterior(
        copy.deepcopy(base), control.to(device=ref.device, dtype=ref.dtype), signal,
        t_start=meta["t_start"], n_steps=meta["n_steps"], solver=meta["solver"],
        control_steps=meta.get("control_steps"),  # absent before 2026-11-26: the share
        base_solver=meta.get("base_solver"),  # absent before 2026-11-27: the solver's
    )  # fmt: skip
    return model.eval()
