"""Figures: they open as images, and their colour bars stay legible."""

import numpy as np
import pytest
import torch

from lensflow import plots
from lensflow.observation import Observation
from lensflow.simulator import gaussian_psf

pytest.importorskip("matplotlib")


def _ring(n: int = 48, scale: float = 0.1) -> Observation:
    """A noisy Einstein ring with a bright core: fluxes spanning four decades."""
    y, x = torch.meshgrid(torch.arange(n) - n / 2 + 0.5, torch.arange(n) - n / 2 + 0.5,
                          indexing="ij")  # fmt: skip
    r = torch.hypot(x, y).double() * scale
    image = 0.1 * torch.exp(-r / 0.15) + 0.01 * torch.exp(-((r - 1.5) ** 2) / 0.02)
    sigma = torch.full_like(image, 1e-3)
    image = image + sigma * torch.randn(image.shape, generator=torch.Generator().manual_seed(0),
                                        dtype=torch.float64)  # fmt: skip
    return Observation(image, sigma, gaussian_psf(0.2, scale).double(), scale,
                       torch.ones_like(image, dtype=torch.bool), name="ring")  # fmt: skip


def test_asinh_colorbar_ticks_do_not_crowd_near_zero():
    plt = plots._pyplot()
    from matplotlib.colors import AsinhNorm

    data = _ring().image.numpy()
    fig, ax = plt.subplots()
    norm = AsinhNorm(linear_width=1e-3, vmin=float(np.percentile(data, 1)), vmax=0.1)
    im = ax.imshow(data, norm=norm)
    full = fig.colorbar(im, ax=ax).get_ticks()
    plots._colorbar(fig, im, ax)
    cb = ax.images[0].colorbar
    ticks = np.asarray(cb.get_ticks())
    plt.close(fig)
    assert len(full) > len(ticks) >= 3  # matplotlib's own ticks crowd; some were dropped
    pos = np.sort(np.asarray(norm(ticks)))
    assert np.all(np.diff(pos) >= 0.07 - 1e-12)
    assert np.all((ticks >= norm.vmin) & (ticks <= norm.vmax))
    assert 0.1 in ticks or 0.01 in ticks  # the bright decades are kept


def test_residual_plot_writes_an_image_of_the_three_panels(tmp_path):
    from matplotlib.image import imread

    obs = _ring()
    model = obs.image.clone()  # a perfect model: the residual is zero
    path = plots.residual_plot(obs, model, tmp_path / "r.png", title="ring")
    img = imread(path)
    assert img.ndim == 3 and img.shape[1] > 2.5 * img.shape[0]  # three panels side by side
    with pytest.raises(ValueError, match="differs from the image"):
        plots.residual_plot(obs, model[:-1], tmp_path / "bad.png")


def test_plot_observation_writes_the_four_panels(tmp_path):
    from matplotlib.image import imread

    img = imread(plots.plot_observation(_ring(), tmp_path / "obs.png"))
    assert img.ndim == 3 and img.shape[1] > 3 * img.shape[0]
