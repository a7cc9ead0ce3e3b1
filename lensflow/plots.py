"""Figures: the only module that imports matplotlib and corner.

Images are shown with ``origin="lower"`` so +x is right and +y is up, as in the simulator
and docs/conventions.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

    from lensflow.observation import Observation
    from lensflow.sampling import PosteriorSamples

__all__ = ["corner_plot", "coverage_plot", "plot_observation", "residual_plot"]


def _pyplot():  # noqa: ANN202 - returns the matplotlib.pyplot module
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'lensflow[plots]'") from None
    return plt


def _planes(obs: Observation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and sigma (float64) and mask (bool) of an observation as numpy arrays."""
    return (obs.image.detach().cpu().double().numpy(), obs.sigma.detach().cpu().double().numpy(),
            obs.mask.detach().cpu().numpy())  # fmt: skip


def _colorbar(fig, im, ax, *, min_gap: float = 0.07) -> None:  # noqa: ANN001 - matplotlib
    """A colorbar whose ticks are at least ``min_gap`` of its length apart.

    An asinh colour scale gets ticks at every decade on both sides of zero, which crowd and
    overlap near zero; ticks are kept from the top down, dropping any closer than
    ``min_gap`` (in the norm's 0-1 units) to one already kept.
    """
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    norm = im.norm
    if norm.vmin is None or norm.vmax is None:  # not scaled yet: nothing to thin against
        return
    ticks = [t for t in cb.get_ticks() if norm.vmin <= t <= norm.vmax]
    if len(ticks) < 3:
        return
    kept: list[float] = []
    last = None
    for pos, tick in sorted(zip(np.asarray(norm(ticks)), ticks, strict=True), reverse=True):
        if last is None or last - pos >= min_gap:
            kept.append(tick)
            last = pos
    cb.set_ticks(sorted(kept))


def plot_observation(obs: Observation, path: str | Path, *, title: str | None = None) -> Path:
    """Write a PNG/PDF with the image, the noise map, S/N and the PSF of an observation.

    Args:
        obs: The observation; image and sigma ``(H, W)`` in image units, PSF ``(k, k)``.
        path: Output file (format from the suffix, e.g. ``.png`` or ``.pdf``).
        title: Figure title; defaults to the observation's name and band.

    Returns:
        The path written.
    """
    plt = _pyplot()
    image, sigma, mask = _planes(obs)
    psf = obs.psf.detach().cpu().double().numpy()
    height, width = obs.fov_arcsec
    extent = (-width / 2, width / 2, -height / 2, height / 2)
    shown = np.where(mask, image, np.nan)
    snr = np.where(mask, image / sigma, np.nan)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2), constrained_layout=True)
    panels = [
        (shown, "image [flux / pixel]", "asinh", "magma", extent),
        (np.where(mask, sigma, np.nan), "noise sigma [flux / pixel]", "linear", "viridis", extent),
        (snr, "S/N per pixel", "linear", "RdBu_r", extent),
        (psf, f"PSF ({psf.shape[0]}x{psf.shape[1]} px)", "log", "magma", None),
    ]
    for ax, (data, label, scale, cmap, ext) in zip(axes, panels, strict=True):
        finite = data[np.isfinite(data)]
        kwargs: dict = {"origin": "lower", "cmap": cmap, "extent": ext}
        if finite.size:
            if scale == "log":
                pos = finite[finite > 0]
                from matplotlib.colors import LogNorm

                kwargs["norm"] = LogNorm(vmin=max(pos.min(), pos.max() * 1e-4), vmax=pos.max())
            elif scale == "asinh":
                from matplotlib.colors import AsinhNorm

                lo, hi = np.percentile(finite, [1, 99.8])
                kwargs["norm"] = AsinhNorm(
                    linear_width=max(float(np.median(sigma)), 1e-12), vmin=lo, vmax=hi
                )
            elif cmap == "RdBu_r":
                lim = float(np.percentile(np.abs(finite), 99.5)) or 1.0
                kwargs.update(vmin=-lim, vmax=lim)
        im = ax.imshow(data, **kwargs)
        _colorbar(fig, im, ax)
        ax.set_title(label, fontsize=10)
        if ext is not None:
            ax.set_xlabel("x [arcsec]")
            ax.set_ylabel("y [arcsec]")
        else:
            ax.set_xlabel("x [pixel]")
    band = f" ({obs.band})" if obs.band else ""
    fig.suptitle(
        title
        or f"{obs.name or 'observation'}{band}: {obs.image.shape[0]}x"
        f'{obs.image.shape[1]} px at {obs.pixel_scale_arcsec:.4g}"/px'
    )
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _save(fig, paths: Sequence[str | Path], dpi: int) -> list[Path]:  # noqa: ANN001
    out = []
    for p in paths:
        p = Path(p)
        fig.savefig(p, dpi=dpi, format=p.suffix.lstrip(".") or None)
        out.append(p)
    return out


#: 2-D contour levels of every corner plot: the regions holding 68% and 95% of the mass.
CORNER_LEVELS: tuple[float, float] = (0.68, 0.95)

#: Width of a two-column journal figure, inches (A&A, ApJ, MNRAS: 7.0-7.3).
JOURNAL_WIDTH_IN = 7.1


def corner_plot(
    samples: PosteriorSamples | Sequence[PosteriorSamples],
    paths: str | Path | Sequence[str | Path],
    *,
    labels: Sequence[str] | None = None,
    params: Sequence[str] | None = None,
    truths: Sequence[float] | None = None,
    title: str | None = None,
    max_samples: int = 20_000,
    width_in: float | None = None,
) -> list[Path]:
    """Write a corner plot of one or several posteriors overlaid (``corner.corner``).

    The 2-D panels show the regions holding 68% and 95% of each posterior's mass
    (``CORNER_LEVELS``; corner's default levels are 1 and 2 sigma of a 2-D Gaussian, 39% and
    86%, which is not what astronomers read them as). The diagonal shows the marginals;
    with a single posterior, its 16/50/84th percentiles are dashed and quoted above each
    column. Labels are the registry's LaTeX labels with units.

    Args:
        samples: One posterior or several (same parameter names), ``theta`` ``(N_k, D)`` in
            physical units.
        paths: Output file(s); the format comes from each suffix (``.pdf`` is vector).
        labels: Legend entry per posterior (default: each one's ``method``).
        params: Parameter names to show (default: all).
        truths: Optional true values, one per shown parameter.
        title: Figure title.
        max_samples: Plot at most this many samples per posterior (evenly spaced subset).
        width_in: Figure width in inches (default: ``JOURNAL_WIDTH_IN`` for up to 8
            parameters, growing with the count above that).

    Returns:
        The paths written.

    Raises:
        ValueError: On unknown parameters, mismatched truths or non-finite samples.
    """
    plt = _pyplot()
    try:
        import corner
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("corner plots need corner: pip install 'lensflow[plots]'") from None
    from matplotlib.lines import Line2D

    from lensflow.params import REGISTRY

    posts = [samples] if not isinstance(samples, Sequence) else list(samples)
    if not posts:
        raise ValueError("corner_plot needs at least one posterior")
    spec = {p.name: p for p in REGISTRY}
    names = list(params) if params is not None else list(posts[0].names)
    for post in posts:
        unknown = [n for n in names if n not in post.names]
        if unknown:
            raise ValueError(f"unknown parameter(s) for the corner plot: {', '.join(unknown)}")
    if truths is not None and len(truths) != len(names):
        raise ValueError(f"truths has {len(truths)} values for {len(names)} parameters")
    legend = list(labels) if labels is not None else [p.method for p in posts]
    if len(legend) != len(posts):
        raise ValueError(f"{len(legend)} labels for {len(posts)} posteriors")
    arrays = []
    for post, name in zip(posts, legend, strict=True):
        data = post.theta.detach().double().cpu().numpy()[:, [post.names.index(n) for n in names]]
        if data.shape[0] > max_samples:
            data = data[np.linspace(0, data.shape[0] - 1, max_samples).astype(int)]
        if not np.isfinite(data).all():
            raise ValueError(f"posterior {name!r} has non-finite samples; nothing was plotted")
        arrays.append(data)
    d = len(names)
    width = width_in or (JOURNAL_WIDTH_IN if d <= 8 else JOURNAL_WIDTH_IN * d / 8)
    fontsize = 8 if d <= 8 else 9
    lo = np.min([a.min(0) for a in arrays], axis=0)
    hi = np.max([a.max(0) for a in arrays], axis=0)
    if truths is not None:
        lo, hi = np.minimum(lo, truths), np.maximum(hi, truths)
    pad = 0.05 * np.where(hi > lo, hi - lo, 1.0)
    ranges = list(zip(lo - pad, hi + pad, strict=True))
    fig = plt.figure(figsize=(width, width))
    colors = ["#1f4e79", "#c44e52", "#55a868", "#8172b2", "#dd8452", "#64b5cd"]
    single = len(arrays) == 1
    for k, data in enumerate(arrays):
        corner.corner(
            data,
            fig=fig,
            range=ranges,
            labels=[spec[n].label if n in spec else n for n in names],
            color=colors[k % len(colors)],
            truths=None if truths is None or k else list(truths),
            truth_color="k",
            quantiles=(0.16, 0.5, 0.84) if single else (),
            show_titles=single,
            title_fmt=".3g",
            title_kwargs={"fontsize": fontsize - 1},
            label_kwargs={"fontsize": fontsize},
            levels=CORNER_LEVELS,
            plot_datapoints=False,
            plot_density=single,
            fill_contours=single,
            no_fill_contours=not single,
            smooth=1.0,
            smooth1d=None,
            hist_kwargs={"density": True, "linewidth": 1.2},
            contour_kwargs={"linewidths": 1.1},
            max_n_ticks=3,
        )
    for ax in fig.get_axes():
        ax.tick_params(labelsize=fontsize - 2)
    if not single:
        handles = [Line2D([], [], color=colors[k % len(colors)], lw=2) for k in range(len(arrays))]
        fig.legend(handles, legend, loc="upper right", fontsize=fontsize + 1, frameon=False)
    if title:
        fig.suptitle(title, fontsize=fontsize + 3)
    written = _save(fig, [paths] if isinstance(paths, str | Path) else paths, dpi=150 if d <= 8
                    else 70)  # fmt: skip
    plt.close(fig)
    return written


def residual_plot(
    obs: Observation,
    model: Tensor,
    path: str | Path,
    *,
    source: Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Write data, model, normalized residual and (optionally) the source-plane model.

    Args:
        obs: The observation the model was fitted to; ``image``/``sigma`` ``(H, W)``, masked
            pixels (``mask`` False) are blanked in every panel.
        model: Noiseless model image ``(H, W)``, same units as ``obs.image`` (e.g. at the
            posterior median).
        path: Output file (format from the suffix).
        source: Optional unlensed source light ``(H', W')`` on a grid of the observation's
            pixel scale, centred on the source (``LensSimulator.source_plane``).
        title: Figure title.

    Returns:
        The path written.
    """
    plt = _pyplot()
    from matplotlib.colors import AsinhNorm

    image, sigma, mask = _planes(obs)
    mod = model.detach().cpu().double().numpy()
    if mod.shape != image.shape:
        raise ValueError(f"model shape {mod.shape} differs from the image's {image.shape}")
    resid = np.where(mask, (image - mod) / sigma, np.nan)
    n_used = int(mask.sum())
    chi2_red = float(np.nansum(resid**2) / max(n_used, 1))
    height, width = obs.fov_arcsec
    extent = (-width / 2, width / 2, -height / 2, height / 2)
    finite = image[mask]
    lo, hi = np.percentile(finite, [1, 99.8]) if finite.size else (0.0, 1.0)
    norm = {"linear_width": max(float(np.median(sigma[mask])) if finite.size else 1.0, 1e-12)}
    n_panels = 4 if source is not None else 3
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 4.2), constrained_layout=True)
    panels = [
        (np.where(mask, image, np.nan), "data [flux / pixel]"),
        (np.where(mask, mod, np.nan), "model (posterior median)"),
    ]
    for ax, (data, label) in zip(axes[:2], panels, strict=True):
        im = ax.imshow(data, origin="lower", cmap="magma", extent=extent,
                       norm=AsinhNorm(vmin=lo, vmax=hi, **norm))  # fmt: skip
        _colorbar(fig, im, ax)
        ax.set_title(label, fontsize=10)
    im = axes[2].imshow(resid, origin="lower", cmap="RdBu_r", vmin=-5, vmax=5, extent=extent)
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    axes[2].set_title(f"(data - model) / sigma, reduced chi2 = {chi2_red:.2f}", fontsize=10)
    for ax in axes[:3]:
        ax.set_xlabel("x [arcsec]")
        ax.set_ylabel("y [arcsec]")
    if source is not None:
        src = source.detach().cpu().double().numpy()
        h, w = src.shape
        s = obs.pixel_scale_arcsec
        ext = (-w * s / 2, w * s / 2, -h * s / 2, h * s / 2)
        top = max(float(src.max()), 1e-12)
        im = axes[3].imshow(
            src,
            origin="lower",
            cmap="magma",
            extent=ext,
            norm=AsinhNorm(linear_width=top * 1e-2, vmin=0.0, vmax=top),
        )
        _colorbar(fig, im, axes[3])
        axes[3].set_title("source plane (unlensed model)", fontsize=10)
        axes[3].set_xlabel("x - x_source [arcsec]")
        axes[3].set_ylabel("y - y_source [arcsec]")
    fig.suptitle(title or (obs.name or "observation"))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def coverage_plot(
    samples: Tensor,
    truth: Tensor,
    path: str | Path,
    *,
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Calibration of posteriors against known truths (e.g. a catalog of simulated lenses).

    Left: the empirical coverage of central credible intervals against their nominal level,
    one line per parameter, with the binomial 95% band of a calibrated posterior. Right: the
    joint expected coverage by TARP (``metrics.tarp_coverage``).

    Args:
        samples: Posterior samples, shape ``(N, B, D)`` (``N`` per lens, ``B`` lenses).
        truth: True parameters, shape ``(B, D)``, same units.
        path: Output file (``.pdf`` or ``.png``).
        names: Parameter names for the legend (default: ``params.NAMES`` when ``D`` = 21).
        title: Figure title.

    Returns:
        The path written.
    """
    from lensflow.metrics import interval_coverage, tarp_coverage
    from lensflow.params import NAMES, REGISTRY

    plt = _pyplot()
    import torch

    d = truth.shape[-1]
    names = list(names) if names is not None else (list(NAMES) if d == len(NAMES) else
                                                   [f"p{i}" for i in range(d)])  # fmt: skip
    labels = {p.name: p.label.split(" [")[0] for p in REGISTRY}
    levels = [i / 20 for i in range(1, 20)]
    cov = interval_coverage(samples.double(), truth.double(), levels=levels)
    tarp = tarp_coverage(samples.double(), truth.double(), levels=levels,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    a = np.asarray(levels)
    band = 1.96 * np.sqrt(a * (1 - a) / truth.shape[0])
    fig, axes = plt.subplots(1, 2, figsize=(JOURNAL_WIDTH_IN, 3.6), constrained_layout=True)
    cmap = plt.get_cmap("tab20")
    for ax in axes:
        ax.fill_between(a, a - band, a + band, color="0.85", lw=0)
        ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("nominal credible level")
    c = cov.coverage.cpu().numpy()
    for j, name in enumerate(names):
        axes[0].plot(a, c[:, j], color=cmap(j % 20), lw=0.9, label=labels.get(name, name))
    axes[0].set_ylabel("empirical coverage")
    axes[0].set_title(f"central intervals, {truth.shape[0]} lenses", fontsize=9)
    axes[0].legend(fontsize=5, ncol=2, loc="upper left", frameon=False)
    axes[1].plot(a, tarp.coverage.cpu().numpy(), color="#1f4e79", lw=1.5)
    axes[1].set_title("joint (TARP)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
