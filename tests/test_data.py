"""Network input and simulated/stored training pairs."""

import pytest
import torch

from lensflow.config import DataConfig, SimulatorConfig
from lensflow.data import (
    N_CHANNELS,
    H5Pairs,
    SimulatedPairs,
    conditioning_fwhm_arcsec,
    network_input,
    observation_input,
    random_masks,
    training_masked_fraction,
    write_pairs,
)
from lensflow.mocks import write_mock_fits
from lensflow.observation import load_observation
from lensflow.params import NAMES
from lensflow.simulator import gaussian_psf, pool_psf

TINY = SimulatorConfig(name="tiny", n_pix=16, pixel_scale_arcsec=0.3, upsample_factor=1,
                       psf_fwhm_arcsec=0.5)  # fmt: skip
TINY_DATA = DataConfig(psf_fwhm_min_arcsec=0.4, psf_fwhm_max_arcsec=0.6, n_psf_grid=2)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pairs():
    return SimulatedPairs(TINY, TINY_DATA)


def test_simulated_pairs_shapes_and_ranges(pairs):
    batch = pairs.sample(32, generator=torch.Generator().manual_seed(1))
    assert batch.theta.shape == (32, len(NAMES))
    assert batch.x.shape == (32, N_CHANNELS, 16, 16)
    assert batch.image.shape == batch.sigma.shape == (32, 16, 16)
    grid = torch.tensor([0.4, 0.6])
    assert ((batch.psf_fwhm_arcsec[:, None] - grid).abs().min(1).values < 1e-6).all()
    assert batch.background_rms.min() >= 0.003 and batch.background_rms.max() <= 0.005
    assert batch.exposure_time_s.min() >= 1500 and batch.exposure_time_s.max() <= 3000
    assert torch.isfinite(batch.x).all()


def test_simulated_pairs_noise_is_fresh_and_unit_normal(pairs):
    g = torch.Generator().manual_seed(2)
    batch = pairs.sample(64, generator=g)
    k = (batch.psf_fwhm_arcsec > 0.5).long()
    model = torch.stack([pairs.simulators[int(i)](t) for i, t in zip(k, batch.theta, strict=True)])
    r = (batch.image - model) / batch.sigma
    # 64 x 256 standard normal residuals: mean and std within ~5 standard errors.
    assert abs(float(r.mean())) < 0.04 and abs(float(r.std()) - 1) < 0.03
    # The same parameters drawn again get a new noise realization.
    again = pairs.sample(64, generator=g)
    assert not torch.equal(batch.image, again.image)


def test_network_input_masks_and_channels():
    image = torch.full((1, 4, 4), 2.0)
    sigma = torch.full((1, 4, 4), 2.0)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = False
    x = network_input(image, sigma, mask, torch.tensor([0.4]), pixel_scale_arcsec=0.1,
                      reference_rms=1.0)  # fmt: skip
    assert (x[0, :, 0, 0] == 0).all()
    torch.testing.assert_close(x[0, 0, 1, 1], torch.asinh(torch.tensor(1.0)))
    torch.testing.assert_close(x[0, 1, 1, 1], torch.log(torch.tensor(2.0)))
    torch.testing.assert_close(x[0, 3, 1, 1], torch.tensor(2.0))  # 4 px FWHM / 2
    with pytest.raises(ValueError, match="shape"):
        network_input(image, sigma[0], mask, torch.tensor([0.4]), pixel_scale_arcsec=0.1,
                      reference_rms=1.0)  # fmt: skip


def test_network_input_same_for_simulated_and_loaded_observation(pairs, tmp_path):
    batch = pairs.sample(1, generator=torch.Generator().manual_seed(3))
    fwhm = float(batch.psf_fwhm_arcsec[0])
    up = TINY.upsample_factor
    # The kernel a user has: the native, pixel-integrated PSF the simulator rendered with.
    kernel = pool_psf(gaussian_psf(fwhm, TINY.pixel_scale_arcsec / up), up)
    path = write_mock_fits(tmp_path / "lens.fits", batch.image[0], batch.sigma[0], kernel, TINY)
    obs = load_observation(path)
    x_obs = observation_input([obs], reference_rms=TINY_DATA.reference_rms,
                              upsample_factor=up).float()  # fmt: skip
    # Image channels: float32 FITS round trip. PSF channel: the Gaussian fit of the kernel,
    # less the pixel box (data.conditioning_fwhm_arcsec), recovers the grid FWHM to 5e-4.
    torch.testing.assert_close(x_obs[:, :3], batch.x[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_obs[:, 3], batch.x[:, 3], rtol=5e-4, atol=0)


def test_h5_pairs_round_trip(pairs, tmp_path):
    g = torch.Generator().manual_seed(4)
    path = write_pairs(tmp_path / "pairs.h5", pairs, 10, chunk=4, generator=g)
    stored = H5Pairs(path)
    assert len(stored) == 10 and stored.simulator_config == TINY
    assert stored.data_config == TINY_DATA
    g = torch.Generator().manual_seed(4)
    first = pairs.sample(4, generator=g)
    torch.testing.assert_close(stored.pairs.theta[:4], first.theta, rtol=0, atol=0)
    torch.testing.assert_close(stored.pairs.x[:4], first.x, rtol=0, atol=0)
    assert stored.sample(3, generator=torch.Generator().manual_seed(0)).x.shape == (3, 4, 16, 16)
    with pytest.raises(ValueError, match="not a lensflow pairs file"):
        H5Pairs(tmp_path / "missing.h5")


def test_random_masks_probability_fraction_and_shapes():
    g = torch.Generator().manual_seed(0)
    m = random_masks(2000, (20, 24), probability=0.3, max_fraction=0.15, generator=g)
    assert m.shape == (2000, 20, 24) and m.dtype == torch.bool
    masked_fraction = 1 - m.float().mean(dim=(1, 2))
    has_mask = masked_fraction > 0
    # 30% of images are masked (binomial sd 1%); none loses more than 15% of its pixels.
    assert abs(has_mask.float().mean().item() - 0.3) < 0.04
    assert masked_fraction.max() <= 0.15
    assert masked_fraction[has_mask].mean() > 0.01  # the discs are not negligible
    assert random_masks(5, (8, 8), probability=0.0, max_fraction=0.1).all()
    with pytest.raises(ValueError, match="max_fraction"):
        random_masks(1, (8, 8), probability=0.5, max_fraction=1.0)


@pytest.mark.parametrize("max_fraction", [0.15, 0.5, 0.9])
def test_training_masked_fraction_bounds_the_random_masks(max_fraction):
    # 0.6 * max_fraction bounds every mask (64 x 64, the euclid grid) and is not loose: the
    # largest of 2,000 reaches more than 60% of it.
    config = DataConfig(mask_probability=1.0, mask_max_fraction=max_fraction)
    bound = training_masked_fraction(config)
    assert bound == pytest.approx(0.6 * max_fraction)
    g = torch.Generator().manual_seed(1)
    m = random_masks(2000, (64, 64), probability=1.0, max_fraction=max_fraction, generator=g)
    largest = (1 - m.double().mean(dim=(1, 2))).max().item()
    assert 0.6 * bound < largest <= bound
    assert training_masked_fraction(DataConfig(mask_probability=0.0)) == 0.0


def test_masked_pairs_zero_the_input_and_round_trip(tmp_path):
    data = DataConfig(psf_fwhm_min_arcsec=0.4, psf_fwhm_max_arcsec=0.6, n_psf_grid=2,
                      mask_probability=1.0)  # fmt: skip
    masked = SimulatedPairs(TINY, data)
    batch = masked.sample(6, generator=torch.Generator().manual_seed(1))
    assert (~batch.mask).any(dim=(1, 2)).all()  # every example is masked somewhere
    assert (batch.x[:, 2] == batch.mask.float()).all()  # channel 2 is the mask
    assert (batch.x.transpose(0, 1)[:, ~batch.mask] == 0).all()  # masked pixels are zero
    assert batch.select(torch.tensor([4, 1])).mask.shape == (2, 16, 16)
    # Without masking the random stream is unchanged (models trained before masks existed).
    plain = SimulatedPairs(TINY, TINY_DATA).sample(6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain.image, batch.image, rtol=0, atol=0)
    assert plain.mask.all()
    path = write_pairs(
        tmp_path / "masked.h5", masked, 6, generator=torch.Generator().manual_seed(1)
    )
    stored = H5Pairs(path)
    assert stored.data_config.mask_probability == 1.0
    assert torch.equal(stored.pairs.mask, batch.mask)
    torch.testing.assert_close(stored.pairs.x, batch.x, rtol=0, atol=0)


def test_psf_index_and_noiseless_follow_the_grid(pairs):
    fwhm = torch.tensor([0.6, 0.4, 0.45, 0.58])  # grid (0.4, 0.6)
    k = pairs.psf_index(fwhm)
    assert k.tolist() == [1, 0, 0, 1]
    theta = pairs.prior.sample((4,), generator=torch.Generator().manual_seed(2))
    images = pairs.noiseless(theta, k)
    for i in range(4):
        torch.testing.assert_close(images[i], pairs.simulators[int(k[i])](theta[i]))


def test_observations_of_pairs_fit_their_truth_at_chi2_one():
    from lensflow.feedback import lens_cost

    sim = SimulatorConfig(name="small", n_pix=32, pixel_scale_arcsec=0.1, upsample_factor=2)
    data = DataConfig(psf_fwhm_min_arcsec=0.16, psf_fwhm_max_arcsec=0.24, n_psf_grid=3,
                      mask_probability=0.5)  # fmt: skip
    source = SimulatedPairs(sim, data)
    test = source.sample(16, generator=torch.Generator().manual_seed(2))
    point, pooled = source.observations(test, psf_kernel="point"), source.observations(test)
    assert [o.name for o in pooled[:2]] == ["heldout0", "heldout1"]
    assert all(torch.equal(o.mask, m) for o, m in zip(pooled, test.mask, strict=True))
    grid = [source.psf_grid_arcsec[k] for k in source.psf_index(test.psf_fwhm_arcsec).tolist()]
    for o, p, f in zip(point, pooled, grid, strict=True):
        assert abs(o.psf_fwhm_arcsec - f) < 1e-4  # a point-sampled Gaussian fits its FWHM
        # the pixel-integrated kernel fits wider, by the pixel box in quadrature (to 2%) ...
        assert p.psf_fwhm_arcsec**2 == pytest.approx(f**2 + 0.462 * 0.1**2, rel=0.02)
        # ... and the network is conditioned on the grid FWHM it was rendered with
        assert conditioning_fwhm_arcsec(p, 2) == pytest.approx(f, abs=2e-4)
        # without supersampling the training kernel is point-sampled: nothing to remove
        assert conditioning_fwhm_arcsec(o, 1) == pytest.approx(f, abs=2e-4)
    x = observation_input(pooled, reference_rms=data.reference_rms, upsample_factor=2)
    assert torch.allclose(x[:, 3].amax(dim=(1, 2)), torch.tensor(grid) / 0.1 / 2, atol=2e-3)
    # The likelihood built from the pooled kernels re-renders the truth to chi^2 / n ~ 1
    # (1,024 pixels per lens: the mean of 16 has a standard error of about 0.011). The
    # point-sampled kernel, read as pixel-integrated (docs/conventions.md), is too sharp.
    cost, rows = lens_cost(pooled, sim)
    assert abs(float(cost(test.theta, rows).mean()) - 1) < 0.05
    cost, rows = lens_cost(point, sim)
    assert float(cost(test.theta, rows).mean()) > 1.1
    with pytest.raises(ValueError, match="psf_kernel"):
        source.observations(test, psf_kernel="airy")


def test_flux_normalized_pairs_are_the_same_lenses_in_other_units(pairs):
    import dataclasses

    from lensflow.data import flux_factor, noise_scale
    from lensflow.params import FLUX_NAMES

    data = dataclasses.replace(TINY_DATA, normalize_flux=True, mask_probability=0.5)
    plain = SimulatedPairs(TINY, dataclasses.replace(data, normalize_flux=False))
    normed = SimulatedPairs(TINY, data)
    a = plain.sample(16, generator=torch.Generator().manual_seed(3))
    b = normed.sample(16, generator=torch.Generator().manual_seed(3))  # same draws
    scale = noise_scale(b.sigma, b.mask)
    torch.testing.assert_close(scale, torch.full_like(scale, data.reference_rms))
    f = data.reference_rms / noise_scale(a.sigma, a.mask)  # k of each example
    torch.testing.assert_close(b.sigma, a.sigma * f[:, None, None])
    torch.testing.assert_close(b.image, a.image * f[:, None, None])
    flux = [NAMES.index(n) for n in FLUX_NAMES]
    rest = [j for j in range(len(NAMES)) if j not in flux]
    torch.testing.assert_close(b.theta[:, rest], a.theta[:, rest])
    torch.testing.assert_close(b.theta[:, flux], a.theta[:, flux] * f[:, None])
    torch.testing.assert_close(b.background_rms, a.background_rms * f)
    torch.testing.assert_close(b.exposure_time_s, a.exposure_time_s / f)
    # The noise model still holds in the new units, and so does the model image.
    k = normed.psf_index(b.psf_fwhm_arcsec)
    model = normed.noiseless(b.theta, k)
    var = (
        b.background_rms[:, None, None] ** 2
        + model.clamp_min(0) / b.exposure_time_s[:, None, None]
    )
    torch.testing.assert_close(var.sqrt(), b.sigma, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(model, plain.noiseless(a.theta, k) * f[:, None, None],
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    # The S/N channel is unchanged, and sampling's flux_factor of each normalized example
    # (as a user would load it) is 1: training and sampling use the same statistic.
    torch.testing.assert_close(b.x[:, 0], a.x[:, 0], rtol=1e-4, atol=1e-5)
    factors = torch.tensor([flux_factor(o, data.reference_rms) for o in normed.observations(b)])
    torch.testing.assert_close(factors, torch.ones_like(factors), rtol=1e-5, atol=0)


def test_simulated_pairs_draw_from_the_training_prior():
    from lensflow.params import index

    broad = SimulatedPairs(TINY, DataConfig(n_psf_grid=1, prior="broad"))
    theta = broad.sample(400, generator=torch.Generator().manual_seed(0)).theta
    amp, gamma = theta[:, index("lens_light_amp")], theta[:, index("shear_gamma1")]
    # broad: lens light 0.2-500 (log-uniform; 35% below the default's 5), shear +/-0.25
    assert amp.min() >= 0.2 and amp.max() <= 500 and 0.25 < float((amp < 5).double().mean()) < 0.45
    assert gamma.abs().max() <= 0.25 and float((gamma.abs() > 0.1).double().mean()) > 0.45
    default = SimulatedPairs(TINY, DataConfig(n_psf_grid=1)).sample(400).theta
    assert default[:, index("lens_light_amp")].min() >= 5
    for name in ("open", "wide"):  # wide is for samplers only
        with pytest.raises(
            ValueError, match=f"prior='{name}' is invalid; choose default or broad"
        ):
            DataConfig(prior=name)
