"""Tests for lensflow.observation: readers on the real cutouts, repairs, errors, cut_to_fov."""

from __future__ import annotations

import math
import re
import warnings

import h5py
import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.wcs import WCS

from lensflow.config import PRESETS, SimulatorConfig
from lensflow.cutouts import cut_to_fov
from lensflow.observation import (
    Observation,
    ObservationError,
    load_observation,
    read_fits,
    read_hdf5,
    summarize,
)

EUCLID_5700 = "EuclidQ1_102018665_NEG570040238507752998/102018665_NEG570040238507752998.fits"
EUCLID_5767 = "EuclidQ1_102018665_NEG576731213511114485"
EUCLID_5896 = "EuclidQ1_102019126_NEG589666030505609975"


def _slacs(folder: str) -> dict:
    return {
        "image": f"{folder}/image.fits",
        "noise": f"{folder}/noise_map.fits",
        "psf": f"{folder}/psf.fits",
        "pixel_scale_arcsec": 0.05,
    }


def _h5(folder: str, image: str, psf: str) -> dict:
    return {"image": f"{folder}/{image}", "psf": f"{folder}/{psf}"}


# (files, expected shape, pixel scale from SOURCES.md, band, PSF sum far from 1 -> warning)
REAL = {
    "SDSSJ1430": (_slacs("SDSSJ1430+4105"), (281, 281), 0.05, None, False),
    "SDSSJ2303": (_slacs("SDSSJ2303+1422"), (281, 281), 0.05, None, False),
    "Euclid5700": ({"image": EUCLID_5700, "band": "VIS"}, (300, 300), 0.1, "VIS", True),
    "Euclid5767": (
        {
            "image": f"{EUCLID_5767}/102018665_NEG576731213511114485.fits",
            "band": "VIS",
            "mask": f"{EUCLID_5767}/mask_extra_galaxies.fits",
        },
        (300, 300),
        0.1,
        "VIS",
        True,
    ),
    "Euclid5896": (
        {"image": f"{EUCLID_5896}/102019126_NEG589666030505609975.fits", "band": "VIS"},
        (100, 100),
        0.1,
        "VIS",
        True,
    ),
    "SL2S_F475X": (
        _h5("SL2SJ0219-0829", "image_lens_system3_F475X.h5", "psf_lens_system3_F475X.h5"),
        (130, 130),
        0.04,
        "F475X",
        False,
    ),
    "SL2S_F600LP": (
        _h5("SL2SJ0219-0829", "image_lens_system3_F600LP.h5", "psf_lens_system3_F600LP.h5"),
        (130, 130),
        0.04,
        "F600LP",
        False,
    ),
    "dolphin_F390W": (
        _h5(
            "dolphin_lens_system1_F390W",
            "image_lens_system1_F390W.h5",
            "psf_lens_system1_F390W.h5",
        ),
        (120, 120),
        0.04,
        "F390W",
        False,
    ),
    **{
        f"DESJ0408_{band}": (
            _h5("DESJ0408-5354", f"data_{band}.hdf5", f"psf_{band}.hdf5"),
            shape,
            scale,
            band.upper(),
            False,
        )
        for band, shape, scale in (
            ("f160w", (120, 120), 0.08),
            ("f475x", (180, 180), 0.04),
            ("f814w", (180, 180), 0.04),
        )
    },
}


def _load(real_lenses, files: dict, **extra) -> Observation:
    roles = ("image", "noise", "psf", "mask")
    paths = {k: real_lenses / v if k in roles else v for k, v in files.items()}
    return load_observation(**paths, **extra)


@pytest.mark.parametrize("system", list(REAL))
def test_load_observation_reads_every_real_system(real_lenses, system):
    files, shape, scale, band, psf_warns = REAL[system]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        obs = _load(real_lenses, files)
    psf_warnings = [w for w in caught if "PSF sums to" in str(w.message)]
    assert len(psf_warnings) == int(psf_warns)  # only the Euclid VIS PSFs (sum 0.95-0.96)
    assert obs.shape == shape
    assert obs.band == band
    # HDF5 scales come from transform_pix2angle (0.0400013 etc.); SOURCES.md rounds them.
    assert obs.pixel_scale_arcsec == pytest.approx(scale, rel=1e-3)
    assert obs.image.dtype == torch.float64
    assert bool(torch.isfinite(obs.image).all())
    assert bool((torch.isfinite(obs.sigma) & (obs.sigma > 0)).all())
    torch.testing.assert_close(obs.psf.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert obs.psf.shape[0] % 2 == 1
    assert 0 <= obs.masked_fraction < 0.2
    summary = summarize(obs)
    assert summary["shape"] == list(shape) and summary["median_sigma"] > 0
    assert 0 < summary["psf_fwhm_arcsec"] < 1.5


def test_read_fits_masks_slacs_noise_sentinels(real_lenses):
    obs = _load(real_lenses, REAL["SDSSJ1430"][0])
    # 14 pixels near a star at rows 252-265 have noise 1e8 (SOURCES.md; its "cols 35-37" is
    # off: the flagged columns are 34-41).
    flagged = fits.getdata(real_lenses / "SDSSJ1430+4105/noise_map.fits") > 1e7
    assert obs.meta["n_masked_noise_sentinel"] == 14 == int(flagged.sum())
    assert torch.equal(~obs.mask, torch.from_numpy(flagged))
    assert bool((obs.sigma[~obs.mask] == 1).all()) and bool((obs.image[~obs.mask] == 0).all())


def test_read_fits_masks_euclid_rms_sentinels(real_lenses):
    with pytest.warns(UserWarning, match="PSF sums to 0.95"):
        obs = read_fits(real_lenses / EUCLID_5700, band="vis")
    assert obs.meta["n_masked_noise_sentinel"] == 1441
    assert int((~obs.mask).sum()) == 1441
    assert float(obs.sigma[obs.mask].max()) < 0.1  # the 1e16 flags are gone
    assert obs.wcs is not None and obs.meta["pixel_scale_source"] == "WCS"


def test_read_fits_applies_euclid_extra_galaxy_masks(real_lenses):
    expected = {EUCLID_5767: 685, EUCLID_5896: 987}
    for folder, n_excluded in expected.items():
        with pytest.warns(UserWarning, match="PSF sums to"):
            obs = read_fits(
                next((real_lenses / folder).glob("1020*.fits")),
                mask=real_lenses / folder / "mask_extra_galaxies.fits",
            )
        assert obs.meta["n_masked_user"] == n_excluded
        assert int((~obs.mask).sum()) == n_excluded


def test_read_fits_defaults_to_vis_and_reads_other_bands(real_lenses):
    path = real_lenses / EUCLID_5896 / "102019126_NEG589666030505609975.fits"
    with pytest.warns(UserWarning, match="PSF sums to"):
        obs = read_fits(path)
    assert obs.band == "VIS" and "VIS chosen by default" in obs.meta["band_note"]
    assert obs.meta["image_hdu"] == "VIS_BGSUB"
    des = read_fits(path, band="des_g")
    assert (
        des.band == "DES_G" and des.psf.shape == (49, 49) and des.meta["noise_hdu"] == "DES_G_RMS"
    )
    by_hdu = read_fits(path, hdu="NIR_Y_BGSUB")
    assert by_hdu.band == "NIR_Y" and by_hdu.psf.shape == (33, 33)
    with pytest.raises(ObservationError, match=r"no band 'K'; bands: DES_G, DES_R, VIS"):
        read_fits(path, band="K")
    with pytest.raises(ObservationError, match="no HDU 'NOPE'"):
        read_fits(path, hdu="NOPE")


def test_read_fits_slacs_without_pixel_scale_raises(real_lenses):
    files = {k: v for k, v in REAL["SDSSJ1430"][0].items() if k != "pixel_scale_arcsec"}
    with pytest.raises(ObservationError, match=re.escape("image.fits") + ".*pixel_scale_arcsec"):
        _load(real_lenses, files)


def test_read_hdf5_noise_from_big_endian_exposure_map(real_lenses):
    folder = real_lenses / "DESJ0408-5354"
    obs = read_hdf5(folder / "data_f160w.hdf5", psf=folder / "psf_f160w.hdf5")
    with h5py.File(folder / "data_f160w.hdf5") as f:
        assert f["exposure_map"].dtype.byteorder == ">"
        img = f["image_data"][()].astype(float)
        exposure = f["exposure_map"][()].astype(float)
        rms = float(f["background_rms"][()])
    expected = np.sqrt(rms**2 + np.abs(img) / exposure)
    torch.testing.assert_close(obs.sigma, torch.from_numpy(expected))
    assert obs.psf_fwhm_arcsec == pytest.approx(0.22, abs=0.02)
    assert obs.meta["psf_extras"] == ["psf_error_map"]


def test_psf_fwhm_matches_sources_for_slacs(real_lenses):
    # SOURCES.md gives Gaussian-fit FWHMs of 1.87 and 1.77 px; the fitting details differ
    # (centre and weighting), so allow 6%.
    for system, fwhm_pix in (("SDSSJ1430", 1.87), ("SDSSJ2303", 1.77)):
        obs = _load(real_lenses, REAL[system][0])
        assert obs.psf_fwhm_arcsec / 0.05 == pytest.approx(fwhm_pix, rel=0.06)


# --- synthetic files for the repairs and errors ---------------------------------------------


def _gaussian(k: int, sigma_pix: float) -> np.ndarray:
    r = np.arange(k) - (k - 1) / 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma_pix**2))
    return g / g.sum()


def _write(path, data, header=None):
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


@pytest.fixture
def files(tmp_path):
    """A clean 20x24 image, noise 0.1, 7x7 Gaussian PSF as separate FITS files."""
    rng = np.random.default_rng(1)
    return {
        "image": _write(tmp_path / "img.fits", rng.normal(size=(20, 24))),
        "noise": _write(tmp_path / "noise.fits", np.full((20, 24), 0.1)),
        "psf": _write(tmp_path / "psf.fits", _gaussian(7, 1.2)),
        "pixel_scale_arcsec": 0.05,
    }


def test_read_fits_masks_invalid_pixels(tmp_path, files):
    image = fits.getdata(files["image"]).copy()
    noise = np.full(image.shape, 0.1)
    image[0, 0], image[1, 1] = np.nan, np.inf
    noise[2, 2], noise[3, 3], noise[4, 4], noise[5, 5], noise[6, 6] = np.nan, 0, -1, 1e8, 1e16
    files["image"] = _write(tmp_path / "bad_img.fits", image)
    files["noise"] = _write(tmp_path / "bad_noise.fits", noise)
    obs = read_fits(**files)
    assert (obs.meta["n_masked_image_invalid"], obs.meta["n_masked_noise_invalid"]) == (2, 3)
    assert obs.meta["n_masked_noise_sentinel"] == 2
    masked = [(i, i) for i in range(7)]
    assert sorted(map(tuple, torch.nonzero(~obs.mask).tolist())) == masked
    assert bool(torch.isfinite(obs.image).all()) and float(obs.sigma.max()) == 1.0


def test_read_fits_normalizes_psf_with_warning(tmp_path, files):
    files["psf"] = _write(tmp_path / "psf2.fits", 2 * _gaussian(7, 1.2))
    with pytest.warns(UserWarning, match=re.escape(str(files["psf"])) + ".*sums to 2.0000"):
        obs = read_fits(**files)
    torch.testing.assert_close(obs.psf, torch.from_numpy(_gaussian(7, 1.2)))
    assert obs.meta["psf_sum_raw"] == pytest.approx(2.0)
    files["psf"] = _write(tmp_path / "psf3.fits", 0.995 * _gaussian(7, 1.2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within PSF_SUM_TOLERANCE: silent
        assert float(read_fits(**files).psf.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("role", "data", "blamed", "problem"),
    [
        ("psf", _gaussian(7, 1.2)[:6, :6], "psf", "PSF is 6x6"),
        ("psf", _gaussian(7, 1.2)[:, :5], "psf", "PSF is 7x5"),
        ("psf", np.full((3, 3), np.nan), "psf", "NaN/inf"),
        ("noise", np.full((20, 23), 0.1), "noise", r"shape \(20, 23\) != image \(20, 24\)"),
        ("noise", np.zeros((20, 24)), "noise", "no finite positive value"),
        ("image", np.full((20, 24), np.nan), "image", "every pixel is masked"),
        ("image", np.zeros((5, 2, 3)), "image", r"shape \(5, 2, 3\); expected a 2-D image"),
        ("mask", np.ones((20, 24)), "image", "every pixel is masked"),
        ("mask", np.zeros((4, 4)), "mask", r"mask shape \(4, 4\)"),
    ],
)
def test_read_fits_rejects_bad_input(tmp_path, files, role, data, blamed, problem):
    files[role] = _write(tmp_path / f"bad_{role}.fits", data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the all-ones mask also warns about its coverage
        with pytest.raises(ObservationError, match=re.escape(str(files[blamed])) + ".*" + problem):
            read_fits(**files)


def test_read_fits_rejects_empty_image(tmp_path, files):
    files["image"] = _write(tmp_path / "empty.fits", np.zeros((0, 4)))
    with pytest.raises(ObservationError, match=re.escape(str(files["image"]))):
        read_fits(**files)


def test_read_fits_missing_pixel_scale_and_noise_and_psf(tmp_path, files):
    for drop, problem in (
        ("pixel_scale_arcsec", "pass pixel_scale_arcsec"),
        ("noise", "no noise map"),
        ("psf", "no PSF"),
    ):
        kwargs = {k: v for k, v in files.items() if k != drop}
        with pytest.raises(
            ObservationError, match=re.escape(str(files["image"])) + ".*" + problem
        ):
            read_fits(**kwargs)


def test_read_fits_weight_map_gives_inverse_sqrt_sigma(tmp_path, files):
    weight = np.full((20, 24), 400.0)
    weight[3, 4] = 0.0
    files["weight"] = _write(tmp_path / "wht.fits", weight)
    with pytest.raises(ObservationError, match="not both"):
        read_fits(**files)
    del files["noise"]
    obs = read_fits(**files)
    assert not bool(obs.mask[3, 4]) and int((~obs.mask).sum()) == 1
    torch.testing.assert_close(obs.sigma[obs.mask], torch.full((479,), 0.05, dtype=torch.float64))


def test_read_fits_pixel_scale_from_wcs_pixscale_and_argument(tmp_path, files):
    del files["pixel_scale_arcsec"]
    image = fits.getdata(files["image"])
    header = WCS(naxis=2)
    header.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    header.wcs.cd = [[-0.04 / 3600, 0], [0, 0.04 / 3600]]
    header.wcs.crval, header.wcs.crpix = [150.0, 2.0], [12.5, 10.5]
    files["image"] = _write(tmp_path / "wcs.fits", image, header.to_header())
    obs = read_fits(**files)
    assert obs.pixel_scale_arcsec == pytest.approx(0.04, rel=1e-9)
    assert obs.meta["pixel_scale_source"] == "WCS" and obs.wcs is not None
    with pytest.warns(UserWarning, match="overrides 0.04 from the WCS"):
        assert read_fits(**files, pixel_scale_arcsec=0.05).pixel_scale_arcsec == 0.05
    files["image"] = _write(tmp_path / "pixscale.fits", image, fits.Header({"PIXSCALE": 0.1}))
    obs = read_fits(**files)
    assert obs.pixel_scale_arcsec == 0.1 and obs.meta["pixel_scale_source"] == "PIXSCALE keyword"


def test_read_fits_multi_extension_with_weight_and_compressed_name(tmp_path, files):
    hdus = fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(fits.getdata(files["image"]), fits.Header({"PIXSCALE": 0.1}), "R_SCI"),
            fits.ImageHDU(np.full((20, 24), 25.0), name="R_WHT"),
            fits.ImageHDU(_gaussian(5, 1.0), name="R_PSF"),
        ]
    )
    hdus.writeto(tmp_path / "cube.fits.gz")
    obs = load_observation(tmp_path / "cube.fits.gz")
    assert obs.band == "R" and obs.meta["weight_hdu"] == "R_WHT" and obs.psf.shape == (5, 5)
    torch.testing.assert_close(obs.sigma, torch.full((20, 24), 0.2, dtype=torch.float64))


def _write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            f[key] = value
    return path


def test_read_hdf5_reads_and_rejects(tmp_path):
    img = np.abs(np.random.default_rng(2).normal(size=(16, 16)))
    transform = np.array([[-0.05, 0.0], [0.0, 0.05]])
    good = {"image_data": img, "background_rms": 0.1, "exposure_time": 100.0}
    path = _write_h5(tmp_path / "f814w_data.h5", **good, transform_pix2angle=transform)
    psf = _write_h5(tmp_path / "psf.h5", kernel_point_source=_gaussian(9, 1.5))
    obs = load_observation(path, psf=psf)
    assert obs.band == "F814W" and obs.pixel_scale_arcsec == pytest.approx(0.05)
    torch.testing.assert_close(obs.sigma, torch.from_numpy(np.sqrt(0.01 + img / 100)))
    with pytest.raises(ObservationError, match=re.escape(str(path)) + ".*needs psf="):
        load_observation(path)
    with pytest.raises(ObservationError, match="drop noise="):
        load_observation(path, psf=psf, noise=path)
    missing = _write_h5(tmp_path / "missing.h5", **good)
    with pytest.raises(ObservationError, match=re.escape(str(missing)) + ".*transform_pix2angle"):
        read_hdf5(missing, psf=psf)
    empty = _write_h5(tmp_path / "empty.h5", **{**good, "image_data": np.zeros((0, 0))})
    with pytest.raises(ObservationError, match=re.escape(str(empty)) + ".*shape"):
        read_hdf5(empty, psf=psf)
    even = _write_h5(tmp_path / "even.h5", kernel_point_source=np.ones((4, 4)))
    with pytest.raises(ObservationError, match=re.escape(str(even)) + ".*PSF is 4x4"):
        read_hdf5(path, psf=even)


def test_load_observation_rejects_missing_and_unknown_files(tmp_path):
    with pytest.raises(ObservationError, match="nothing.fits: file not found"):
        load_observation(tmp_path / "nothing.fits")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(ObservationError, match=r"image.png: unknown file type"):
        load_observation(tmp_path / "image.png")
    (tmp_path / "broken.fits").write_text("not a fits file")
    with pytest.raises(ObservationError, match="broken.fits: "):
        load_observation(tmp_path / "broken.fits", pixel_scale_arcsec=0.05)


# --- the record itself ------------------------------------------------------------------------


def _obs(image, sigma=None, psf=None, scale=0.05, mask=None, **kwargs) -> Observation:
    image = torch.as_tensor(image, dtype=torch.float64)
    return Observation(
        image=image,
        sigma=torch.ones_like(image) if sigma is None else torch.as_tensor(sigma).double(),
        psf=torch.from_numpy(_gaussian(5, 1.0)) if psf is None else psf,
        pixel_scale_arcsec=scale,
        mask=torch.ones(image.shape, dtype=torch.bool) if mask is None else mask,
        **kwargs,
    )


def test_observation_validates_fields():
    with pytest.raises(ObservationError, match=r"shapes differ"):
        _obs(torch.zeros(4, 4), sigma=torch.ones(4, 5))
    with pytest.raises(ObservationError, match="PSF shape"):
        _obs(torch.zeros(4, 4), psf=torch.ones(2, 2, dtype=torch.float64) / 4)
    with pytest.raises(ObservationError, match="sums to 2"):
        _obs(torch.zeros(4, 4), psf=2 * torch.from_numpy(_gaussian(5, 1.0)))
    with pytest.raises(ObservationError, match="sigma is not finite"):
        _obs(torch.zeros(4, 4), sigma=torch.zeros(4, 4))
    with pytest.raises(ObservationError, match="every pixel is masked"):
        _obs(torch.zeros(4, 4), mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError):
        _obs(torch.zeros(4, 4), mask=np.ones((4, 4), dtype=bool))


def test_observation_properties_and_to():
    image = torch.zeros(4, 6, dtype=torch.float64)
    image[1, 2], image[2, 3] = 3.0, 5.0
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[0, 0] = False
    obs = _obs(image, sigma=torch.full((4, 6), 0.5), mask=mask, scale=0.1, name="toy")
    assert obs.shape == (4, 6) and obs.fov_arcsec == pytest.approx((0.4, 0.6))
    assert obs.masked_fraction == pytest.approx(1 / 24)
    assert obs.snr == pytest.approx(8.0 / math.sqrt(23 * 0.25))
    assert obs.peak_snr == pytest.approx(10.0)
    psf = torch.from_numpy(_gaussian(31, 3.0))
    assert _obs(image, psf=psf, scale=0.1).psf_fwhm_arcsec == pytest.approx(
        0.1 * 3.0 * 2 * math.sqrt(2 * math.log(2)), rel=1e-3
    )
    small = obs.to(dtype=torch.float32)
    assert small.image.dtype == small.sigma.dtype == small.psf.dtype == torch.float32
    assert small.mask.dtype == torch.bool and small.name == "toy" and "toy" in repr(small)
    assert set(summarize(obs)) >= {"shape", "pixel_scale_arcsec", "snr", "median_sigma", "band"}


# --- cut_to_fov ---------------------------------------------------------------------------------


def _config(n_pix: int, scale: float) -> SimulatorConfig:
    return SimulatorConfig(n_pix=n_pix, pixel_scale_arcsec=scale)


def test_cut_to_fov_centres_on_asymmetric_source():
    image = torch.arange(30 * 40, dtype=torch.float64).reshape(30, 40) * 1e-3
    image[7, 25] = 100.0  # row 7 (y), column 25 (x): far from any symmetry axis
    obs = _obs(image)
    for kwargs in (
        {"center_pix": (25, 7)},
        {"center_arcsec": ((25 - 19.5) * 0.05, (7 - 14.5) * 0.05)},
    ):
        cut = cut_to_fov(obs, _config(5, 0.05), **kwargs)
        torch.testing.assert_close(cut.image, image[5:10, 23:28], rtol=0, atol=0)
        assert cut.meta["cut_center_pix"] == [25.0, 7.0] and cut.shape == (5, 5)
    default = cut_to_fov(obs, _config(6, 0.05))
    torch.testing.assert_close(default.image, image[12:18, 17:23], rtol=0, atol=0)


def test_cut_to_fov_resampled_centre_and_block_sums():
    image = torch.zeros(40, 40, dtype=torch.float64)
    image[10:12, 30:32] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    cut = cut_to_fov(_obs(image), _config(5, 0.1), center_pix=(30.5, 10.5))
    expected = torch.zeros(5, 5, dtype=torch.float64)
    expected[2, 2] = 10.0  # the whole 2x2 block lands in the central output pixel
    torch.testing.assert_close(cut.image, expected)
    assert cut.pixel_scale_arcsec == 0.1


def test_cut_to_fov_downsampling_sums_2x2_blocks():
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(8, 8, generator=gen, dtype=torch.float64)
    sigma = 0.1 + torch.rand(8, 8, generator=gen, dtype=torch.float64)
    cut = cut_to_fov(_obs(image, sigma=sigma), _config(4, 0.1))
    blocks = image.reshape(4, 2, 4, 2).sum((1, 3))
    torch.testing.assert_close(cut.image, blocks)
    torch.testing.assert_close(cut.sigma**2, (sigma**2).reshape(4, 2, 4, 2).sum((1, 3)))
    assert cut.psf.shape[0] % 2 == 1 and float(cut.psf.sum()) == pytest.approx(1.0)


def test_cut_to_fov_upsampling_splits_pixels_and_warns():
    image = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    with pytest.warns(UserWarning, match="upsampling"):
        cut = cut_to_fov(_obs(image, sigma=torch.full((4, 4), 0.4)), _config(8, 0.025))
    torch.testing.assert_close(
        cut.image, image.repeat_interleave(2, 0).repeat_interleave(2, 1) / 4
    )
    torch.testing.assert_close(cut.sigma, torch.full((8, 8), 0.1, dtype=torch.float64))


def _overlap_loop(n_out, start, step, n_in):
    """Reference 1-D overlap lengths, one interval at a time."""
    a = np.zeros((n_out, n_in))
    for j in range(n_out):
        lo, hi = start + j * step, start + (j + 1) * step
        for i in range(n_in):
            a[j, i] = max(0.0, min(hi, i + 0.5) - max(lo, i - 0.5))
    return torch.from_numpy(a)


def test_cut_to_fov_conserves_flux_and_propagates_variance_at_non_integer_ratio():
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(15, 15, generator=gen, dtype=torch.float64)
    sigma = 0.1 + torch.rand(15, 15, generator=gen, dtype=torch.float64)
    # 15 px at 0.04" -> 12 px at 0.05" covers exactly the same 0.6" field.
    cut = cut_to_fov(_obs(image, sigma=sigma, scale=0.04), _config(12, 0.05))
    torch.testing.assert_close(cut.image.sum(), image.sum(), rtol=1e-13, atol=0)
    a = _overlap_loop(12, -0.5, 1.25, 15)
    torch.testing.assert_close(cut.image, a @ image @ a.T)
    torch.testing.assert_close(cut.sigma**2, a**2 @ sigma**2 @ (a**2).T)
    # A constant surface brightness stays constant: flux per pixel scales with pixel area.
    flat = cut_to_fov(_obs(torch.full((15, 15), 0.16), scale=0.04), _config(12, 0.05))
    torch.testing.assert_close(flat.image, torch.full((12, 12), 0.25, dtype=torch.float64))


def test_cut_to_fov_propagates_mask():
    mask = torch.ones(15, 15, dtype=torch.bool)
    mask[7, 7] = False
    cut = cut_to_fov(_obs(torch.ones(15, 15), mask=mask, scale=0.04), _config(12, 0.05))
    # Input pixel 7 spans [6.5, 7.5]; output pixels span [-0.5 + 1.25 j, 0.75 + 1.25 j],
    # so it touches outputs 5 ([5.75, 7.0]) and 6 ([7.0, 8.25]) on each axis.
    expected = torch.ones(12, 12, dtype=torch.bool)
    expected[5:7, 5:7] = False
    assert torch.equal(cut.mask, expected)
    assert bool((cut.image[~cut.mask] == 0).all()) and bool((cut.sigma[~cut.mask] == 1).all())


def test_cut_to_fov_too_small_raises_or_pads():
    obs = _obs(torch.ones(10, 12), name="tiny")
    with pytest.raises(ObservationError, match=r"tiny: a 16x16 px field.*10x12 px cutout"):
        cut_to_fov(obs, _config(16, 0.05))
    with pytest.raises(ObservationError, match="not both"):
        cut_to_fov(obs, _config(4, 0.05), center_pix=(1, 1), center_arcsec=(0, 0))
    padded = cut_to_fov(obs, _config(16, 0.05), use_padding=True)
    assert int(padded.mask.sum()) == 120 and padded.meta["n_masked_outside"] == 256 - 120
    torch.testing.assert_close(padded.image.sum(), torch.tensor(120.0, dtype=torch.float64))


def test_cut_to_fov_updates_wcs(tmp_path, files):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cd = [[-0.05 / 3600, 0], [0, 0.05 / 3600]]
    wcs.wcs.crval, wcs.wcs.crpix = [150.0, 2.0], [12.5, 10.5]
    files["image"] = _write(tmp_path / "wcs.fits", fits.getdata(files["image"]), wcs.to_header())
    obs = read_fits(**files)
    sliced = cut_to_fov(obs, _config(6, 0.05), center_pix=(15, 8))
    rebinned = cut_to_fov(obs, _config(5, 0.1), center_pix=(15.3, 8.6))
    for cut, step in ((sliced, 1.0), (rebinned, 2.0)):
        cx, cy = cut.meta["cut_center_pix"]
        n = cut.shape[0]
        for j in (0, n - 1):  # output pixel j <-> input coordinate c + (j - (n-1)/2) * step
            out = cut.wcs.pixel_to_world_values(j, n - 1 - j)
            x_in, y_in = cx + (j - (n - 1) / 2) * step, cy + (n - 1 - j - (n - 1) / 2) * step
            np.testing.assert_allclose(out, obs.wcs.pixel_to_world_values(x_in, y_in), rtol=1e-12)


def test_cut_to_fov_real_cutouts_to_presets(real_lenses):
    slacs = _load(real_lenses, REAL["SDSSJ2303"][0])
    hst = cut_to_fov(slacs, PRESETS["hst"])
    assert hst.shape == (100, 100) and hst.pixel_scale_arcsec == 0.05 and hst.psf.shape == (61, 61)
    with pytest.warns(UserWarning, match="PSF sums to"):
        euclid = read_fits(real_lenses / EUCLID_5700, band="VIS")
    cut = cut_to_fov(euclid, PRESETS["euclid"])
    assert cut.shape == (64, 64) and cut.wcs is not None
    np.testing.assert_allclose(
        cut.wcs.pixel_to_world_values(31.5, 31.5), euclid.wcs.pixel_to_world_values(149.5, 149.5)
    )
    sl2s = _load(real_lenses, REAL["SL2S_F475X"][0])  # 0.04" -> 0.05": rebinned
    cut = cut_to_fov(sl2s, PRESETS["hst"])
    assert cut.pixel_scale_arcsec == 0.05 and cut.psf.shape[0] % 2 == 1
    assert cut.image.sum() == pytest.approx(float(sl2s.image[2:127, 2:127].sum()), rel=0.02)
