"""The lensflow command line: help, simulate round trip, user errors without tracebacks."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from astropy import units as u
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from lensflow.cli import main
from lensflow.config import preset
from lensflow.params import NAMES, REGISTRY
from lensflow.simulator import LensSimulator


def _table(path, **columns):
    t = Table(columns)
    t.write(path, overwrite=True)
    return path


def test_cli_help_and_version(capsys):
    for argv in (["--help"], ["simulate", "--help"], ["inspect", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "lensflow" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "lensflow.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("lensflow ")


def test_simulate_writes_fits_layout_and_truth(tmp_path):
    params = _table(
        tmp_path / "p.ecsv",
        id=["a", "b", "c"],
        lens_theta_e=[1.0, 1.4, 0.8] * u.arcsec,
        source_center_x=[100.0, -50.0, 0.0] * u.mas,
    )
    assert (
        main(
            [
                "simulate",
                str(params),
                "--out",
                str(tmp_path / "out"),
                "--preset",
                "euclid",
                "--seed",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    truth = Table.read(tmp_path / "out" / "truth.ecsv")
    assert list(truth["id"]) == ["a", "b", "c"]
    for spec in REGISTRY:
        assert spec.name in truth.colnames
        assert truth[spec.name].unit == (u.Unit(spec.unit) if spec.unit else None)
    np.testing.assert_allclose(truth["source_center_x"], [0.1, -0.05, 0.0])
    cfg = preset("euclid")
    with fits.open(tmp_path / "out" / "b.fits") as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "NOISE", "PSF"]
        image, noise = hdul["IMAGE"].data.astype(np.float64), hdul["NOISE"].data
        assert image.shape == (cfg.n_pix, cfg.n_pix)
        assert hdul["IMAGE"].header["PIXSCALE"] == pytest.approx(cfg.pixel_scale_arcsec)
        w = WCS(hdul["IMAGE"].header)
        assert w.has_celestial
        np.testing.assert_allclose(proj_plane_pixel_scales(w) * 3600, cfg.pixel_scale_arcsec)
        assert w.pixel_scale_matrix[0, 0] < 0  # east left: +x (columns) points West
        assert hdul["PSF"].data.sum() == pytest.approx(1.0)
    # The image is the simulator's model of the truth plus noise of the stated sigma.
    theta = torch.tensor([[truth[n][1] for n in NAMES]], dtype=torch.float64)
    model = LensSimulator(cfg, dtype=torch.float64)(theta)[0].numpy()
    chi2_per_pixel = np.mean(((image - model) / noise) ** 2)
    # 4096 pixels: the mean of chi^2_1 has std sqrt(2/4096) = 0.022; float32 storage is exact
    # enough.
    assert abs(chi2_per_pixel - 1) < 0.1


def test_simulate_is_reproducible_with_seed(tmp_path):
    params = _table(tmp_path / "p.csv", lens_theta_e=[1.0, 1.2])
    for run in ("r1", "r2"):
        assert (
            main(
                [
                    "simulate",
                    str(params),
                    "--out",
                    str(tmp_path / run),
                    "--preset",
                    "euclid",
                    "--seed",
                    "7",
                    "--quiet",
                ]
            )
            == 0
        )
    a = fits.getdata(tmp_path / "r1" / "lens_00001.fits", "IMAGE")
    b = fits.getdata(tmp_path / "r2" / "lens_00001.fits", "IMAGE")
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        ({"lens_theta_e": [1.0, -1.0]}, "row 1, column lens_theta_e"),
        ({"lens_theta_e": [1.0, np.nan]}, "row 1, column lens_theta_e"),
        ({"lens_theta_e": [1.0, 2.0] * u.kg}, "not convertible"),
        ({"id": ["x", "x"], "lens_theta_e": [1.0, 1.1]}, "duplicates"),
        ({"id": ["ok", "bad/name"], "lens_theta_e": [1.0, 1.1]}, "file name"),
    ],
)
def test_simulate_bad_table_is_one_line_error(tmp_path, capsys, columns, match):
    params = _table(tmp_path / "p.ecsv", **columns)
    assert main(["simulate", str(params), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and str(params) in err


def test_simulate_missing_or_unreadable_file(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "nope.ecsv"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    junk = tmp_path / "junk.fits"
    junk.write_bytes(b"not a fits file")
    assert main(["simulate", str(junk), "--out", str(tmp_path)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_simulate_then_load_observation_round_trip(tmp_path):
    from lensflow.observation import load_observation

    params = _table(tmp_path / "p.ecsv", id=["only"], lens_theta_e=[1.2])
    assert main(["simulate", str(params), "--out", str(tmp_path), "--preset", "hst",
                 "--quiet"]) == 0  # fmt: skip
    obs = load_observation(tmp_path / "only.fits")
    cfg = preset("hst")
    assert obs.shape == (cfg.n_pix, cfg.n_pix)
    assert obs.pixel_scale_arcsec == pytest.approx(cfg.pixel_scale_arcsec)
    assert obs.psf_fwhm_arcsec == pytest.approx(cfg.psf_fwhm_arcsec, rel=0.1)
    np.testing.assert_allclose(obs.sigma.numpy(), fits.getdata(tmp_path / "only.fits", "NOISE"),
                               rtol=1e-6)  # fmt: skip
    assert bool(obs.mask.all())


# Every real system in ../shared/data/real_lenses, as a user would pass it to inspect.
REAL_ARGS = {
    "SDSSJ1430": ["SDSSJ1430+4105/image.fits", "--noise", "SDSSJ1430+4105/noise_map.fits",
                  "--psf", "SDSSJ1430+4105/psf.fits", "--pixel-scale", "0.05"],
    "SDSSJ2303": ["SDSSJ2303+1422/image.fits", "--noise", "SDSSJ2303+1422/noise_map.fits",
                  "--psf", "SDSSJ2303+1422/psf.fits", "--pixel-scale", "0.05"],
    "SL2S_F475X": ["SL2SJ0219-0829/image_lens_system3_F475X.h5", "--psf",
                   "SL2SJ0219-0829/psf_lens_system3_F475X.h5"],
    "SL2S_F600LP": ["SL2SJ0219-0829/image_lens_system3_F600LP.h5", "--psf",
                    "SL2SJ0219-0829/psf_lens_system3_F600LP.h5"],
    "dolphin": ["dolphin_lens_system1_F390W/image_lens_system1_F390W.h5", "--psf",
                "dolphin_lens_system1_F390W/psf_lens_system1_F390W.h5"],
    "DESJ0408_F160W": ["DESJ0408-5354/data_f160w.hdf5", "--psf", "DESJ0408-5354/psf_f160w.hdf5"],
    "DESJ0408_F475X": ["DESJ0408-5354/data_f475x.hdf5", "--psf", "DESJ0408-5354/psf_f475x.hdf5"],
    "DESJ0408_F814W": ["DESJ0408-5354/data_f814w.hdf5", "--psf", "DESJ0408-5354/psf_f814w.hdf5"],
    "Euclid_NEG5700": [("EuclidQ1_102018665_NEG570040238507752998/"
                       "102018665_NEG570040238507752998.fits"), "--band", "VIS"],
    "Euclid_NEG5767": [("EuclidQ1_102018665_NEG576731213511114485/"
                       "102018665_NEG576731213511114485.fits"), "--band", "VIS", "--mask",
                       "EuclidQ1_102018665_NEG576731213511114485/mask_extra_galaxies.fits"],
    "Euclid_NEG5896": [("EuclidQ1_102019126_NEG589666030505609975/"
                       "102019126_NEG589666030505609975.fits"), "--band", "VIS"],
}  # fmt: skip


@pytest.mark.parametrize("system", sorted(REAL_ARGS))
def test_inspect_renders_every_real_lens(real_lenses, tmp_path, capsys, system):
    args = [str(real_lenses / a) if "/" in a else a for a in REAL_ARGS[system]]
    png = tmp_path / f"{system}.png"
    assert main(["inspect", *args, "--out", str(png)]) == 0
    out, err = capsys.readouterr()
    if "Euclid" in system:  # the Q1 VIS PSFs sum to ~0.95: normalized, with a warning
        assert "lensflow: warning:" in err and "PSF" in err
    assert "pixel_scale_arcsec" in out and "masked_fraction" in out
    assert png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_missing_pixel_scale_is_one_line_error(real_lenses, capsys):
    d = real_lenses / "SDSSJ2303+1422"
    code = main(["inspect", str(d / "image.fits"), "--noise", str(d / "noise_map.fits"),
                 "--psf", str(d / "psf.fits")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "pixel scale" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["train", "sample", "finetune", "fit", "catalog"])
def test_threads_option_sets_torch_threads_or_is_a_one_line_error(command, tmp_path, capsys):
    """--threads N is applied before the command runs (each then stops on a missing input
    here); N < 1 is a one-line error."""
    out = ["--out", str(tmp_path / "out")]
    argv = {"train": ["--config", str(tmp_path / "missing.toml"), *out],
            "sample": [str(tmp_path / "missing.fits"), "--model", "euclid", *out],
            "finetune": ["--model", str(tmp_path / "missing"), "--signal", "gradient", *out],
            "fit": [str(tmp_path / "missing.fits"), *out],
            "catalog": [str(tmp_path / "missing.ecsv"), *out]}[command]  # fmt: skip
    threads = torch.get_num_threads()
    want = 1 if threads > 1 else 2
    try:
        assert main([command, *argv, "--threads", "0"]) == 2
        assert capsys.readouterr().err == "lensflow: error: --threads must be >= 1, got 0\n"
        assert main([command, *argv, "--threads", str(want)]) == 2
        assert "missing" in capsys.readouterr().err
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(threads)
