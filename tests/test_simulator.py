"""LensSimulator contract, analytic answers, gradients and the noise model."""

import dataclasses
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
    fine_psf,
    gaussian_psf,
    log_likelihood,
    pad_psf,
    pool_psf,
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
    assert supersample_psf(native, 2).shape[0] == native.shape[0] * 2 + 1
    torch.testing.assert_close(fine.sum(), torch.tensor(1.0, dtype=torch.float64))
    c = fine.shape[0] // 2
    assert fine[c, c] == fine.max()
    with pytest.raises(ValueError, match="odd"):
        supersample_psf(torch.ones(4, 4), 2)
    with pytest.raises(ValueError, match="factor"):
        supersample_psf(native, 0)


# --- PSF supersampling: the effective native-pixel PSF of the pipeline ----------------------


def _pixel_integrated_gaussian(fwhm_arcsec, pixel_scale_arcsec, half):
    """A circular Gaussian integrated over each pixel (erf), as a real native PSF kernel is."""
    sigma = fwhm_arcsec / (2 * math.sqrt(2 * math.log(2))) / pixel_scale_arcsec
    edges = torch.arange(-half - 0.5, half + 1.5, dtype=torch.float64)
    g = torch.diff(torch.special.erf(edges / (sigma * math.sqrt(2))))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def _effective_native_psf(fine, factor, n_native):
    """What the simulator makes of a point at a native pixel centre, with plain torch ops.

    A fine image of ``n_native`` native pixels holds the point at the centre of the central
    native pixel (for an even factor, a fine-pixel corner: split over the 4 x 4 nearest fine
    pixels with cubic half-pixel weights (-1, 9, 9, -1) / 16, supersample_psf's convention);
    it is convolved with ``fine`` (conv2d correlates, so the kernel is flipped) and each
    native pixel's fine pixels are summed (average-pooling times factor^2).
    """
    k, m = factor, fine.shape[0]
    image = torch.zeros(n_native * k, n_native * k, dtype=fine.dtype)
    corner = (n_native // 2) * k  # first fine pixel of the central native pixel
    if k % 2:
        w = torch.ones(1, dtype=fine.dtype)
        first = corner + (k - 1) // 2
    else:
        w = torch.tensor([-1.0, 9.0, 9.0, -1.0], dtype=fine.dtype) / 16
        first = corner + k // 2 - 2
    image[first : first + len(w), first : first + len(w)] = w[:, None] * w[None, :]
    conv = torch.nn.functional.conv2d(image[None, None], fine.flip(-2, -1)[None, None],
                                      padding=m // 2)  # fmt: skip
    return torch.nn.functional.avg_pool2d(conv, k)[0, 0] * k * k


def _second_moment_fwhm(kernel, pixel_scale_arcsec):
    n = kernel.shape[0]
    c = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * pixel_scale_arcsec
    y, x = torch.meshgrid(c, c, indexing="ij")
    w = kernel / kernel.sum()
    var = 0.5 * ((w * x * x).sum() - (w * x).sum() ** 2 + (w * y * y).sum() - (w * y).sum() ** 2)
    return 2 * math.sqrt(2 * math.log(2) * var.item())


#: (pixel scale arcsec, upsample factor, FWHM arcsec): Euclid-like and HST-like grids.
PSF_CASES = [(0.1, 2, 0.16), (0.1, 2, 0.2), (0.1, 2, 0.24), (0.05, 2, 0.07), (0.05, 2, 0.09),
             (0.05, 2, 0.12), (0.1, 3, 0.2), (0.1, 4, 0.2)]  # fmt: skip


@pytest.mark.parametrize(("pixel_scale", "factor", "fwhm"), PSF_CASES)
def test_supersample_psf_effective_native_psf_is_the_native_kernel(pixel_scale, factor, fwhm):
    # Fine convolution + pooling of a point at a native pixel centre gives back the native
    # (pixel-integrated) kernel; only light scattered outside the native support (a 1-pixel
    # ring) and the renormalization differ. Measured max error <= 7.0e-4 of the peak at
    # FWHM 1.4-1.6 native pixels, <= 2.8e-4 from 1.8 pixels on; the former bilinear
    # resampling was 0.13-0.24 of the peak off.
    native = _pixel_integrated_gaussian(
        fwhm, pixel_scale, half=math.ceil(2.5 * fwhm / pixel_scale)
    )
    fine = supersample_psf(native, factor)
    n = native.shape[0]
    effective = _effective_native_psf(fine, factor, n + 4)
    centre = effective[2:-2, 2:-2]
    assert (centre - native).abs().max() <= 1e-3 * native.max()
    assert effective.sum().item() == pytest.approx(1.0, abs=1e-12)
    # pool_psf is the same map, written as matrices
    pooled = pool_psf(fine, factor)
    pad = (effective.shape[0] - pooled.shape[0]) // 2
    torch.testing.assert_close(pooled, effective[pad : effective.shape[0] - pad,
                                                 pad : effective.shape[0] - pad])  # fmt: skip


@pytest.mark.parametrize(("pixel_scale", "factor", "fwhm"), PSF_CASES)
def test_supersample_psf_recovers_the_fine_gaussian(pixel_scale, factor, fwhm):
    # The native PSF of a mock rendered with the fine Gaussian is pool_psf(fine Gaussian);
    # supersample_psf must undo the pooling, not add a second pixel box. Second-moment FWHM
    # of the recovered fine kernel: measured within 0.8% of the Gaussian's (0.1988" for
    # 0.200" at 0.1"/px, factor 2; the bilinear resampling gave 0.2245"), 1.3% for the
    # undersampled 0.07" at 0.05"/px (1.4 native pixels).
    exact = gaussian_psf(fwhm, pixel_scale / factor)
    recovered = supersample_psf(pool_psf(exact, factor), factor)
    fwhm_recovered = _second_moment_fwhm(recovered, pixel_scale / factor)
    assert fwhm_recovered == pytest.approx(_second_moment_fwhm(exact, pixel_scale / factor),
                                           rel=0.02)  # fmt: skip
    # and pooling it again is the native kernel it came from (an exact solve; pool_psf
    # returns one more ring of native pixels, which holds the light beyond the support)
    native = pool_psf(exact, factor)
    again = pool_psf(recovered, factor)
    ring = (again.shape[0] - native.shape[0]) // 2
    again = again[ring : again.shape[0] - ring, ring : again.shape[0] - ring]
    assert (again - native).abs().max() <= 1.5e-3 * native.max()


def _bright_theta():
    # theta_asymmetric with 10x the light: peak S/N ~260 at Euclid depth, where the former
    # bilinear kernel gave chi2_r = 2.47 at the truth.
    return with_values(theta_asymmetric(), source_amp=300.0, lens_light_amp=200.0)


@pytest.mark.parametrize(("pixel_scale", "factor", "fwhm"), PSF_CASES[:6])
def test_simulator_native_kernel_reproduces_fine_gaussian_images(pixel_scale, factor, fwhm):
    # A mock rendered with the exact fine Gaussian, and the simulator given that mock's
    # native PSF (what a PSF model or a star gives): same image to max|diff| / peak
    # <= 2.0e-3 measured (bilinear: 4.7e-2 to 9.5e-2).
    preset_name = "euclid" if pixel_scale == 0.1 else "hst"
    cfg = dataclasses.replace(preset(preset_name), psf_fwhm_arcsec=fwhm, upsample_factor=factor)
    exact_sim = LensSimulator(cfg, dtype=torch.float64)
    native = pool_psf(exact_sim.psf, factor)
    theta = _bright_theta()
    exact = exact_sim(theta)
    from_native = LensSimulator(cfg, psf_kernel=native, dtype=torch.float64)(theta)
    assert ((from_native - exact).abs().max() / exact.max()).item() < 4e-3


@pytest.mark.parametrize("native_kind", ["pooled", "erf"])
@pytest.mark.parametrize("fwhm", [0.16, 0.2, 0.24])
def test_simulator_chi2_at_truth_with_native_kernel(native_kind, fwhm):
    # Euclid depth (preset noise), bright seeded lens, mock rendered with the exact fine
    # Gaussian. The simulator given the native kernel must fit the truth like the exact
    # Gaussian does. "pooled": the mock's own effective native PSF; "erf": the Gaussian
    # integrated over each native pixel: the mock is not exactly that, because the
    # simulator integrates over a pixel with a factor x factor midpoint rule (effective
    # variance smaller by (pixel / factor)^2 / 12), so the erf case also measures that
    # discretization. Measured chi2_r 0.9984 with the exact Gaussian; minus that:
    # 0.0001-0.0005 (pooled), 0.009-0.024 (erf, FWHM 0.24-0.16"); the former bilinear
    # supersampling: +1.1 to +2.0 (pooled), +1.3 to +2.4 (erf).
    cfg = dataclasses.replace(preset("euclid"), psf_fwhm_arcsec=fwhm)
    exact_sim = LensSimulator(cfg, dtype=torch.float64)
    if native_kind == "pooled":
        native = pool_psf(exact_sim.psf, cfg.upsample_factor)
    else:
        half = math.ceil(cfg.psf_truncation * fwhm / 2.3548 / cfg.pixel_scale_arcsec)
        native = _pixel_integrated_gaussian(fwhm, cfg.pixel_scale_arcsec, half)
    theta = _bright_theta()
    truth = exact_sim(theta)
    noise = NoiseModel.from_config(cfg)
    sigma = noise.sigma(truth)
    data = noise.sample(truth, generator=torch.Generator().manual_seed(7))
    n = truth.numel()
    chi2_exact = chi2(truth, data, sigma).item() / n
    model = LensSimulator(cfg, psf_kernel=native, dtype=torch.float64)(theta)
    chi2_native = chi2(model, data, sigma).item() / n
    assert abs(chi2_native - 1) < 0.05
    # The noise realization largely cancels in the difference.
    assert chi2_native - chi2_exact < (0.005 if native_kind == "pooled" else 0.04)


def test_supersample_psf_factor_one_is_the_normalized_kernel():
    kernel = 3.0 * _pixel_integrated_gaussian(0.2, 0.1, half=4)
    torch.testing.assert_close(supersample_psf(kernel, 1), kernel / 3.0, rtol=0, atol=0)
    torch.testing.assert_close(pool_psf(kernel, 1), kernel, rtol=0, atol=0)


def _elongated_kernel(n=15):
    """Elongated (axis ratio 0.6), rotated (30 deg) Gaussian, centred off-axis, plus a bump."""
    r = torch.arange(n, dtype=torch.float64) - n // 2
    y, x = torch.meshgrid(r, r, indexing="ij")
    x0, y0, angle = 0.3, -0.2, math.radians(30)
    dx, dy = x - x0, y - y0
    xr = math.cos(angle) * dx + math.sin(angle) * dy
    yr = -math.sin(angle) * dx + math.cos(angle) * dy
    kernel = torch.exp(-0.5 * ((xr / 1.6) ** 2 + (yr / 0.96) ** 2))
    kernel = kernel + 0.1 * torch.exp(-0.5 * ((x - 2.0) ** 2 + (y - 1.0) ** 2) / 0.8**2)
    return kernel / kernel.sum()


def _moments(kernel, pixel):
    n = kernel.shape[0]
    c = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * pixel
    y, x = torch.meshgrid(c, c, indexing="ij")
    w = kernel / kernel.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    xx, yy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    xy = (w * (x - mx) * (y - my)).sum()
    return mx.item(), my.item(), 0.5 * math.atan2(2 * xy.item(), (xx - yy).item())


@pytest.mark.parametrize("factor", [2, 3])
def test_supersample_psf_keeps_orientation_and_centroid_of_asymmetric_kernel(factor):
    native = _elongated_kernel()
    fine = supersample_psf(native, factor)
    mx, my, angle = _moments(native, 1.0)
    fx, fy, fine_angle = _moments(fine, 1.0 / factor)  # in native pixels
    # Both maps reproduce linear functions: the centroid is kept (measured to 2e-5 pixel;
    # what differs is light beyond the kernel's support).
    assert abs(fx - mx) < 1e-4 and abs(fy - my) < 1e-4
    assert abs(mx) > 0.1 and abs(my) > 0.1  # really off-axis
    # Position angle of the second moments (30.5 deg): measured equal to 4.3e-5 rad
    # (pooling is separable and symmetric, so it adds the same variance along x and y).
    assert abs(fine_angle - angle) < 1e-4
    effective = _effective_native_psf(fine, factor, native.shape[0] + 4)[2:-2, 2:-2]
    assert (effective - native).abs().max() <= 1e-3 * native.max()
    # Mirroring or transposing the kernel mirrors or transposes the result, exactly.
    for op in (lambda k: k.flip(-1), lambda k: k.flip(-2), lambda k: k.T):
        torch.testing.assert_close(supersample_psf(op(native), factor), op(fine),
                                   rtol=0, atol=1e-14)  # fmt: skip


def test_simulator_pixel_kernel_equals_gaussian_at_native_resolution():
    cfg = SimulatorConfig(
        n_pix=24, pixel_scale_arcsec=0.15, upsample_factor=1, psf_fwhm_arcsec=0.3
    )
    theta = theta_asymmetric()
    a = LensSimulator(cfg, dtype=torch.float64)(theta)
    kernel = gaussian_psf(0.3, 0.15, truncation=cfg.psf_truncation)
    b = LensSimulator(cfg, psf_kernel=2.0 * kernel, dtype=torch.float64)(theta)  # unnormalized
    torch.testing.assert_close(a, b)


def test_simulator_psf_per_row_equals_one_simulator_per_psf():
    # Kernels of different sizes (and an asymmetric one) go in per row, zero-padded to the
    # largest fine side; each row must equal the simulator built with its own kernel.
    cfg = dataclasses.replace(SMALL, upsample_factor=2)
    kernels = [gaussian_psf(f, cfg.pixel_scale_arcsec) for f in (0.2, 0.35)]
    kernels.append(_elongated_kernel())
    fine = [fine_psf(cfg, k) for k in kernels]
    side = max(f.shape[-1] for f in fine)
    assert len({f.shape[-1] for f in fine}) > 1  # really different sides
    stack = torch.stack([pad_psf(f, side) for f in fine])
    per_row = LensSimulator(cfg, dtype=torch.float64, psf_per_row=True, psf_side=side)
    theta = Prior().sample((6,), generator=torch.Generator().manual_seed(3)).double()
    slot = torch.tensor([0, 1, 2, 2, 1, 0])
    images = per_row(theta, psf=stack[slot])
    for i in range(len(slot)):
        alone = LensSimulator(cfg, psf_kernel=kernels[int(slot[i])], dtype=torch.float64)
        torch.testing.assert_close(images[i], alone(theta[i]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="psf must have shape"):
        per_row(theta)
    with pytest.raises(ValueError, match="psf must have shape"):
        per_row(theta, psf=stack[:, 1:, 1:])
    with pytest.raises(ValueError, match="only for a simulator built with psf_per_row"):
        LensSimulator(cfg)(theta, psf=stack[slot])
    with pytest.raises(ValueError, match="cannot pad"):
        pad_psf(fine[0], side - 1)


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
