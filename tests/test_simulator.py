"""LensSimulator contract, analytic answers, gradients and the noise model."""

import math

import pytest
import torch

from lensflow.config import SimulatorConfig, preset
from lensflow.params import NAMES, index
from lensflow.prior import Prior
from lensflow.simulator import (
    LensSimulator,
    NoiseModel,
    chi2,
    gaussian_psf,
    log_likelihood,
    supersample_psf,
)

# A small, cheap configuration for contract and gradient tests.
SMALL = SimulatorConfig(
    name="small",
    n_pix=24,
    pixel_scale_arcsec=0.15,
    upsample_factor=1,
    psf_fwhm_arcsec=0.25,
    background_rms=0.01,
    exposure_time_s=1000.0,
)


def theta_asymmetric(dtype=torch.float64):
    """Hand-picked, non-symmetric parameters: every axis flip or e1/e2 swap changes the image."""
    values = {
        "lens_theta_e": 1.1,
        "lens_e1": 0.12,
        "lens_e2": -0.07,
        "lens_center_x": 0.08,
        "lens_center_y": -0.05,
        "shear_gamma1": 0.04,
        "shear_gamma2": -0.03,
        "source_amp": 30.0,
        "source_r_sersic": 0.25,
        "source_n_sersic": 1.3,
        "source_e1": 0.2,
        "source_e2": 0.1,
        "source_center_x": 0.15,
        "source_center_y": 0.07,
        "lens_light_amp": 20.0,
        "lens_light_r_sersic": 0.8,
        "lens_light_n_sersic": 2.5,
        "lens_light_e1": -0.1,
        "lens_light_e2": 0.15,
        "lens_light_center_x": 0.06,
        "lens_light_center_y": -0.04,
    }
    return torch.tensor([values[n] for n in NAMES], dtype=dtype)


def with_values(theta, **kw):
    theta = theta.clone()
    for name, value in kw.items():
        theta[..., index(name)] = value
    return theta


@pytest.mark.parametrize("dt", [torch.float32, torch.float64])
def test_simulator_shapes_dtype_finite(dt):
    sim = LensSimulator(SMALL, dtype=dt)
    theta = Prior(dtype=dt).sample((5,))
    batch = sim(theta)
    assert batch.shape == (5, 24, 24) and batch.dtype == dt
    assert torch.isfinite(batch).all()
    single = sim(theta[2])
    assert single.shape == (24, 24)
    torch.testing.assert_close(single, batch[2])
    assert "LensSimulator" in repr(sim)


def test_simulator_leading_batch_dims():
    sim = LensSimulator(SMALL, dtype=torch.float64)
    theta = Prior(dtype=torch.float64).sample((2, 3))
    torch.testing.assert_close(sim(theta), sim(theta.reshape(6, 21)).reshape(2, 3, 24, 24))


def test_simulator_rejects_wrong_width():
    with pytest.raises(ValueError, match="21 columns"):
        LensSimulator(SMALL)(torch.zeros(3, 20))


def test_simulator_deterministic_and_chunked_equal():
    theta = Prior(dtype=torch.float64).sample((7,))
    a = LensSimulator(SMALL, dtype=torch.float64)(theta)
    b = LensSimulator(SMALL, dtype=torch.float64, chunk_size=3)(theta)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_simulator_total_flux_matches_analytic_sersic():
    # Lens light only (source amp ~0): the image sum is the analytic Sersic total flux
    # 2 pi n R^2 I_e e^{b_n} b_n^{-2n} Gamma(2n) with R = sqrt(ab) (lenstronomy's R_sersic)
    # and b_n = 1.9992 n - 0.3271, times 1 (image units are flux per pixel).
    cfg = SimulatorConfig(
        n_pix=80, pixel_scale_arcsec=0.08, upsample_factor=4, psf_fwhm_arcsec=0.15
    )
    n, r, amp = 1.5, 0.4, 10.0
    theta = with_values(
        theta_asymmetric(),
        source_amp=1e-12,
        lens_light_amp=amp,
        lens_light_n_sersic=n,
        lens_light_r_sersic=r,
        lens_light_e1=0.2,
        lens_light_e2=0.1,
        lens_light_center_x=0.0,
        lens_light_center_y=0.0,
    )
    flux = LensSimulator(cfg, dtype=torch.float64)(theta).sum()
    b = 1.9992 * n - 0.3271
    expected = 2 * math.pi * n * r**2 * amp * math.exp(b) * b ** (-2 * n) * math.gamma(2 * n)
    # Tolerance: the cusp at r=0 is integrated by 4x supersampling only (~0.5% error).
    assert abs(flux.item() / expected - 1) < 0.01


def test_simulator_einstein_ring_radius_equals_theta_e():
    # A compact round source behind a round SIE (SIS) images to a ring at theta_E.
    cfg = SimulatorConfig(
        n_pix=80, pixel_scale_arcsec=0.05, upsample_factor=4, psf_fwhm_arcsec=0.0
    )
    theta = with_values(
        theta_asymmetric(),
        lens_e1=0.0,
        lens_e2=0.0,
        lens_center_x=0.0,
        lens_center_y=0.0,
        shear_gamma1=0.0,
        shear_gamma2=0.0,
        source_center_x=0.0,
        source_center_y=0.0,
        source_e1=0.0,
        source_e2=0.0,
        source_r_sersic=0.05,
        source_n_sersic=1.0,
        lens_light_amp=1e-12,
        lens_theta_e=1.3,
    )
    img = LensSimulator(cfg, dtype=torch.float64)(theta)
    c = (torch.arange(80, dtype=torch.float64) - 39.5) * 0.05
    Y, X = torch.meshgrid(c, c, indexing="ij")
    radius = (img * torch.hypot(X, Y)).sum() / img.sum()
    assert abs(radius.item() - 1.3) < 0.01  # a pixel is 0.05"; symmetric ring: ~exact


def test_simulator_axis_orientation_x_right_y_up():
    # image[row=y, col=x]: lens light moved to +x, +y peaks right of and above the centre.
    cfg = SimulatorConfig(n_pix=40, pixel_scale_arcsec=0.1, upsample_factor=1, psf_fwhm_arcsec=0.0)
    theta = with_values(
        theta_asymmetric(),
        source_amp=1e-12,
        lens_light_center_x=0.8,
        lens_light_center_y=-0.5,
        lens_light_n_sersic=4.0,
        lens_light_e1=0.0,
        lens_light_e2=0.0,
    )
    img = LensSimulator(cfg, dtype=torch.float64)(theta)
    row, col = divmod(int(img.argmax()), 40)
    # pixel centres (i - 19.5) * 0.1: x = 0.8 -> col 27 or 28; y = -0.5 -> row 14 or 15
    assert col in (27, 28) and row in (14, 15)


def test_simulator_primary_image_on_source_side():
    # SIS, compact source at beta = +0.3" on the x axis: point-source magnifications are
    # 1 / (1 - tE / (beta + tE)) = 4.67 at x > 0 and 2.67 at x < 0, a flux ratio of 1.75.
    cfg = SimulatorConfig(
        n_pix=60, pixel_scale_arcsec=0.08, upsample_factor=2, psf_fwhm_arcsec=0.0
    )
    sim = LensSimulator(cfg, dtype=torch.float64)
    theta = with_values(
        theta_asymmetric(),
        lens_e1=0.0,
        lens_e2=0.0,
        lens_center_x=0.0,
        lens_center_y=0.0,
        shear_gamma1=0.0,
        shear_gamma2=0.0,
        source_center_x=0.3,
        source_center_y=0.0,
        source_r_sersic=0.05,
        source_e1=0.0,
        source_e2=0.0,
        lens_light_amp=1e-12,
    )
    img = sim(theta)
    ratio = img[:, 30:].sum() / img[:, :30].sum()
    assert abs(ratio.item() - 1.75) < 0.15  # finite source size and pixels
    mirrored = sim(with_values(theta, source_center_x=-0.3))
    torch.testing.assert_close(mirrored, img.flip(-1), rtol=1e-6, atol=1e-9)


def test_simulator_gradient_matches_finite_differences():
    sim = LensSimulator(SMALL, dtype=torch.float64)
    theta = theta_asymmetric()
    data = sim(theta) + 0.01 * torch.randn(24, 24, dtype=torch.float64)
    sigma = torch.full((24, 24), 0.01, dtype=torch.float64)

    def f(t):
        return chi2(sim(t), data, sigma)

    grad = torch.func.grad(f)(theta)
    h = 1e-6 * theta.abs().clamp_min(1.0)
    fd = torch.stack(
        [
            (
                f(theta + h[i] * torch.eye(21, dtype=torch.float64)[i])
                - f(theta - h[i] * torch.eye(21, dtype=torch.float64)[i])
            )
            / (2 * h[i])
            for i in range(21)
        ]
    )
    assert torch.isfinite(grad).all() and (grad != 0).all()
    # Central differences at h=1e-6 in float64: truncation+rounding ~1e-6 relative.
    torch.testing.assert_close(grad, fd, rtol=1e-4, atol=1e-6 * fd.abs().max().item())


def test_simulator_jacfwd_matches_finite_differences_and_vmap_matches_loop():
    sim = LensSimulator(SMALL, dtype=torch.float64)
    theta = theta_asymmetric()
    jac = torch.func.jacfwd(sim)(theta)  # (24, 24, 21)
    i = index("lens_e2")
    h = 1e-6
    fd = (
        sim(with_values(theta, lens_e2=theta[i] + h))
        - sim(with_values(theta, lens_e2=theta[i] - h))
    ) / (2 * h)
    torch.testing.assert_close(jac[..., i], fd, rtol=1e-4, atol=1e-7 * fd.abs().max().item())
    batch = Prior(dtype=torch.float64).sample((4,))
    torch.testing.assert_close(sim(batch), torch.stack([sim(t) for t in batch]))


def test_gaussian_psf_fwhm_and_normalization():
    k = gaussian_psf(0.2, 0.02, truncation=5)
    assert k.shape[0] % 2 == 1
    torch.testing.assert_close(k.sum(), torch.tensor(1.0, dtype=torch.float64))
    profile = k[k.shape[0] // 2]
    above = (profile >= profile.max() / 2).sum().item()
    assert abs(above * 0.02 - 0.2) <= 0.02 + 1e-9  # half-max width to within a pixel


def test_supersample_psf_keeps_centre_and_sum():
    native = gaussian_psf(0.3, 0.1)
    fine = supersample_psf(native, 3)
    assert fine.shape[0] == native.shape[0] * 3 and fine.shape[0] % 2 == 1
    torch.testing.assert_close(fine.sum(), torch.tensor(1.0, dtype=torch.float64))
    c = fine.shape[0] // 2
    assert fine[c, c] == fine.max()
    with pytest.raises(ValueError, match="odd"):
        supersample_psf(torch.ones(4, 4), 2)


def test_simulator_pixel_kernel_equals_gaussian_at_native_resolution():
    cfg = SimulatorConfig(
        n_pix=24, pixel_scale_arcsec=0.15, upsample_factor=1, psf_fwhm_arcsec=0.3
    )
    theta = theta_asymmetric()
    a = LensSimulator(cfg, dtype=torch.float64)(theta)
    kernel = gaussian_psf(0.3, 0.15, truncation=cfg.psf_truncation)
    b = LensSimulator(cfg, psf_kernel=2.0 * kernel, dtype=torch.float64)(theta)  # unnormalized
    torch.testing.assert_close(a, b)


def test_noise_model_sigma_formula_and_draw_statistics():
    noise = NoiseModel(background_rms=0.1, exposure_time_s=100.0)
    model = torch.full((200, 200), 4.0, dtype=torch.float64)
    expected = math.sqrt(0.1**2 + 4.0 / 100.0)
    torch.testing.assert_close(noise.sigma(model), torch.full_like(model, expected))
    draw = noise.sample(model, generator=torch.Generator().manual_seed(0))
    resid = (draw - model) / expected
    # 40,000 standard normals: mean error ~0.005, std error ~0.0035.
    assert abs(resid.mean().item()) < 0.02 and abs(resid.std().item() - 1) < 0.02
    assert NoiseModel(background_rms=0.1).sigma(-model).min().item() == pytest.approx(0.1)


def test_noise_map_overrides_formula():
    sigma_map = torch.rand(8, 8, dtype=torch.float64) + 0.5
    noise = NoiseModel(sigma_map=sigma_map)
    torch.testing.assert_close(
        noise.sigma(torch.zeros(3, 8, 8, dtype=torch.float64))[1], sigma_map
    )


def test_chi2_at_truth_is_pixel_count_on_average():
    sim = LensSimulator(SMALL, dtype=torch.float64)
    theta = Prior(dtype=torch.float64).sample((64,))
    model = sim(theta)
    noise = NoiseModel.from_config(SMALL)
    data = noise.sample(model, generator=torch.Generator().manual_seed(1))
    c = chi2(model, data, noise.sigma(model))
    # chi2 with 576 dof: mean 576, std 34 per image; over 64 images the mean's std is ~4.2.
    assert abs(c.mean().item() - 576) < 20


def test_simulator_log_likelihood_peaks_at_truth_and_matches_function():
    sim = LensSimulator(SMALL, dtype=torch.float64)
    theta = theta_asymmetric()
    model = sim(theta)
    sigma = torch.full_like(model, 0.01)
    mask = torch.ones_like(model, dtype=torch.bool)
    mask[:3] = False
    shifted = with_values(theta, lens_theta_e=1.15)
    ll = sim.log_likelihood(torch.stack([theta, shifted]), model, sigma, mask)
    assert ll.shape == (2,) and ll[0] > ll[1]
    torch.testing.assert_close(ll[1], log_likelihood(sim(shifted), model, sigma, mask))


def test_likelihood_mask_and_normalization():
    model = torch.zeros(2, 4, 4, dtype=torch.float64)
    data = torch.ones(4, 4, dtype=torch.float64)
    sigma = torch.full((4, 4), 2.0, dtype=torch.float64)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[0] = False
    torch.testing.assert_close(
        chi2(model, data, sigma, mask), torch.full((2,), 12 * 0.25, dtype=torch.float64)
    )
    ll = log_likelihood(model, data, sigma, mask)
    expected = -0.5 * 3.0 - 12 * math.log(2.0) - 6 * math.log(2 * math.pi)
    torch.testing.assert_close(ll, torch.full((2,), expected, dtype=torch.float64))


def test_presets_are_instrument_like():
    hst, euclid = preset("hst"), preset("euclid")
    assert hst.pixel_scale_arcsec == pytest.approx(0.05)
    assert euclid.pixel_scale_arcsec == pytest.approx(0.1)
    with pytest.raises(ValueError, match="hst"):
        preset("jwst")


@pytest.mark.gpu
def test_simulator_cuda_matches_cpu():
    theta = Prior(dtype=torch.float64).sample((8,))
    cpu = LensSimulator(preset("euclid"), dtype=torch.float64)(theta)
    gpu = LensSimulator(preset("euclid"), dtype=torch.float64, device="cuda")(theta.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-12)
