"""Figures: the only module that imports matplotlib (and, later, corner).

Images are shown with ``origin="lower"`` so +x is right and +y is up, as in the simulator
and docs/conventions.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lensflow.observation import Observation

__all__ = ["plot_observation"]


def _pyplot():  # noqa: ANN202 - returns the matplotlib.pyplot module
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'lensflow[plots]'") from None
    return plt


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
    image = obs.image.detach().cpu().double().numpy()
    sigma = obs.sigma.detach().cpu().double().numpy()
    mask = obs.mask.detach().cpu().numpy()
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
        fig.colorbar(im, ax=ax, shrink=0.8)
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
