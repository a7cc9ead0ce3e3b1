"""Fitting observed lenses end to end: preset choice, centring, outputs, diagnostics, CLI."""

import dataclasses
import hashlib
import json
import re

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table

from lensflow.checkpoint import load_model
from lensflow.cli import main
from lensflow.config import preset
from lensflow.fit import (
    SUMMARY_QUANTILES,
    atomic_write,
    diagnose,
    fit,
    fit_lens,
    fit_lenses,
    resolve_preset,
    write_fit,
)
from lensflow.mocks import write_mock_fits
from lensflow.observation import Observation, load_observation
from lensflow.params import NAMES, REGISTRY
from lensflow.prior import Prior
from lensflow.sampling import PosteriorSamples
from lensflow.simulator import LensSimulator, NoiseModel, gaussian_psf

pytestmark = pytest.mark.usefixtures("one_thread")

EUCLID = preset("euclid")
N_FAST = {"n": 64, "n_steps": 6, "feedback": "none"}


def _theta(seed: int) -> torch.Tensor:
    theta = Prior().sample((1,), generator=torch.Generator().manual_seed(seed))[0].double()
    theta[NAMES.index("lens_theta_e")] = 1.2
    return theta


def _mock(seed: int = 0, *, fwhm: float = 0.2, n_pix: int = 64, shift=(0, 0)):
    """A Euclid-like mock (noisy image, sigma, PSF kernel, truth), optionally larger."""
    cfg = dataclasses.replace(EUCLID, n_pix=n_pix, psf_fwhm_arcsec=fwhm)
    theta = _theta(seed)
    theta[NAMES.index("lens_center_x")] += shift[0] * cfg.pixel_scale_arcsec
    theta[NAMES.index("lens_center_y")] += shift[1] * cfg.pixel_scale_arcsec
    for c in ("lens_light_center_x", "lens_light_center_y"):
        theta[NAMES.index(c)] = theta[NAMES.index(c.replace("lens_light", "lens"))]
    # Rendered with the native-pixel kernel the FITS file carries, exactly as the fit's
    # simulator renders (simulator.supersample_psf), so chi2 at the truth is pure noise.
    psf = gaussian_psf(fwhm, cfg.pixel_scale_arcsec)
    sim = LensSimulator(cfg, psf_kernel=psf, dtype=torch.float64)
    clean = sim(theta)
    noise = NoiseModel(background_rms=0.004, exposure_time_s=2000.0)
    g = torch.Generator().manual_seed(100 + seed)
    image = noise.sample(clean, generator=g)
    return image, noise.sigma(clean), psf, theta, cfg


def _write(tmp_path, name="lens", **kw):
    image, sigma, psf, theta, cfg = _mock(**kw)
    path = write_mock_fits(tmp_path / f"{name}.fits", image.float(), sigma.float(), psf, cfg)
    return path, theta


def test_resolve_preset_by_pixel_scale():
    def obs(scale):
        return Observation(
            torch.zeros(8, 8),
            torch.ones(8, 8),
            torch.ones(1, 1),
            scale,
            torch.ones(8, 8, dtype=torch.bool),
        )

    assert resolve_preset(obs(0.1)) == "euclid"
    assert resolve_preset(obs(0.05)) == "hst"
    assert resolve_preset(obs(0.04)) == "hst"  # ACS-like scales still map to hst
    assert resolve_preset(obs(0.1), "hst") == "hst"  # explicit, within the factor of 2
    with pytest.raises(ValueError, match="far from the shipped models"):
        resolve_preset(obs(0.3))
    with pytest.raises(ValueError, match="unknown preset 'jwst'"):
        resolve_preset(obs(0.1), "jwst")


@pytest.mark.parametrize("fsync", [False, True])
def test_atomic_write_replaces_whole_files_or_nothing(tmp_path, fsync):
    target = tmp_path / "result.json"
    target.write_text("old")
    atomic_write(target, lambda p: p.write_text("new"), fsync=fsync)
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o644

    def fails(p):
        p.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails, fsync=fsync)
    assert target.read_text() == "new"  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left


def test_fit_writes_every_output_with_units(tmp_path):
    path, _ = _write(tmp_path)
    obs = load_observation(path)
    result = fit_lens(obs, seed=3, **N_FAST)
    written = write_fit(result, tmp_path / "out")
    assert set(written) == {"samples", "summary", "corner_pdf", "corner_png", "residuals",
                            "provenance"}  # fmt: skip
    for p in written.values():
        assert p.stat().st_size > 0
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary files left behind
    # Samples: one column per registry name, units in the FITS header, values round-trip.
    table = Table.read(written["samples"])
    assert table.colnames[: len(NAMES)] == list(NAMES)
    units = {p.name: p.unit for p in REGISTRY}
    assert table["lens_theta_e"].unit == "arcsec"
    assert table["source_amp"].unit == units["source_amp"]
    theta = np.stack([table[n] for n in NAMES], 1)
    np.testing.assert_allclose(theta, result.samples.theta.numpy(), rtol=1e-6)
    with fits.open(written["samples"]) as hdul:
        assert hdul[1].header["LENSID"] == "lens"
    # Summary: quantiles equal numpy's on the samples, diagnostics and flag present.
    summary = Table.read(written["summary"])
    for suffix, q in SUMMARY_QUANTILES.items():
        expected = np.quantile(theta[:, 0].astype(np.float64), q)
        assert summary[f"lens_theta_e_{suffix}"][0] == pytest.approx(expected, rel=1e-6)
    assert summary["lens_theta_e_median"].unit == "arcsec"
    for col in ("chi2_red_samples", "residual_coherence", "reliable", "reason", "feedback"):
        assert col in summary.colnames
    # Provenance: inputs with their SHA-256, model ids, seed and device.
    prov = json.loads(written["provenance"].read_text())
    assert prov["inputs"]["image"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["seed"] == 3 and prov["preset"] == "euclid" and prov["device"] == "cpu"
    assert len(prov["model"]["sha256"]) == 64
    assert prov["diagnostics"]["chi2_red_samples"] == pytest.approx(
        result.diagnostics.chi2_red_samples
    )


def test_samples_depend_only_on_their_own_seed(tmp_path):
    obs = [load_observation(_write(tmp_path, f"l{i}", seed=i)[0]) for i in range(3)]
    alone = fit_lens(obs[1], seed=7, **N_FAST).samples.theta
    again = fit_lens(obs[1], seed=7, **N_FAST).samples.theta
    batch = fit_lenses(obs, seeds=[1, 7, 9], **N_FAST)
    torch.testing.assert_close(alone, again, rtol=0, atol=0)
    torch.testing.assert_close(batch[1].samples.theta, alone, rtol=1e-5, atol=1e-6)
    other = fit_lens(obs[1], seed=8, **N_FAST).samples.theta
    assert not torch.allclose(other, alone)


def test_fit_control_steps_reach_the_sampler_and_the_provenance(tmp_path):
    obs = load_observation(_write(tmp_path, "l0", seed=0)[0])
    kw = {"seed": 3, "n": 16, "n_steps": 10, "feedback": "gradient"}
    one, two = (fit_lens(obs, control_steps=k, **kw) for k in (1, 2))
    assert one.provenance["control_steps"] == 1 and two.provenance["control_steps"] == 2
    assert not torch.allclose(one.samples.theta, two.samples.theta)
    with pytest.raises(ValueError, match="control_steps=1 needs feedback, but it is 'none'"):
        fit_lens(obs, control_steps=1, **(kw | {"feedback": "none"}))
    # The resolved sampler is in the provenance (the shipped default's midpoint base
    # segment); base_solver reaches the sampler.
    assert one.provenance["sampler"]["control_steps"] == 1
    assert one.provenance["sampler"]["base_steps"] == 8
    assert one.provenance["sampler"]["base_solver"] == "midpoint"
    euler = fit_lens(obs, control_steps=1, base_solver="euler", **kw)
    assert euler.provenance["sampler"]["base_solver"] == "euler"
    assert not torch.allclose(euler.samples.theta, one.samples.theta)


def test_fit_with_forced_flux_normalization_ignores_units_and_records_the_factor():
    from lensflow.params import FLUX_NAMES

    image, sigma, psf, _, _ = _mock(seed=2)
    mask = torch.ones_like(image, dtype=torch.bool)
    obs = Observation(image, sigma, psf, EUCLID.pixel_scale_arcsec, mask, name="u")
    base, big = fit_lenses([obs, obs.scaled(1e3)], seeds=[3, 3], normalize_flux=True, **N_FAST)
    flux = [NAMES.index(n) for n in FLUX_NAMES]
    rest = [j for j in range(len(NAMES)) if j not in flux]
    torch.testing.assert_close(big.samples.theta[:, rest], base.samples.theta[:, rest],
                               rtol=1e-3, atol=1e-4)  # fmt: skip
    torch.testing.assert_close(big.samples.theta[:, flux], base.samples.theta[:, flux] * 1e3,
                               rtol=1e-3, atol=0)  # fmt: skip
    k = base.provenance["flux_factor"]
    assert k == pytest.approx(big.provenance["flux_factor"] * 1e3, rel=1e-6)
    assert "noise level" not in big.diagnostics.reason
    # The shipped model's own units: the big cutout is outside its noise range, with a hint.
    plain = fit_lens(obs.scaled(1e3), seed=3, **N_FAST)
    assert plain.provenance["flux_factor"] is None
    assert "--normalize-flux may help" in plain.diagnostics.reason


def test_centre_in_pixels_and_radec_cut_the_same_window(tmp_path):
    # An 80x80 cutout whose lens sits 6 px right and 4 px up of the cutout centre.
    image, sigma, psf, _, cfg = _mock(n_pix=80, shift=(6, 4))
    path = write_mock_fits(tmp_path / "big.fits", image.float(), sigma.float(), psf, cfg,
                           ra_deg=150.0, dec_deg=2.0)  # fmt: skip
    obs = load_observation(path)
    cx, cy = (80 - 1) / 2 + 6, (80 - 1) / 2 + 4
    by_pix = fit_lens(obs, center_pix=(cx, cy), **N_FAST)
    ra, dec = obs.wcs.celestial.pixel_to_world_values(cx, cy)
    by_sky = fit_lens(obs, center_radec=(float(ra), float(dec)), **N_FAST)
    centre = by_pix.provenance["cut_center_pix"]
    assert abs(centre[0] - cx) <= 0.5 and abs(centre[1] - cy) <= 0.5
    assert by_sky.provenance["cut_center_pix"] == centre
    torch.testing.assert_close(by_pix.observation.image, by_sky.observation.image)
    # The cut window holds the lens near its centre: its brightest pixel is within 2 px.
    img = by_pix.observation.image
    peak = divmod(int(torch.argmax(img)), img.shape[1])
    assert abs(peak[0] - 31.5) <= 2.5 and abs(peak[1] - 31.5) <= 2.5
    with pytest.raises(ValueError, match="not both"):
        fit_lens(obs, center_pix=(cx, cy), center_radec=(float(ra), float(dec)), **N_FAST)
    with pytest.raises(ValueError, match="outside the 80x80 px cutout"):
        fit_lens(obs, center_radec=(10.0, 10.0), **N_FAST)


def _diagnose(image, sigma, psf, theta, n=32):
    mask = torch.ones_like(image, dtype=torch.bool)
    obs = Observation(image, sigma, psf, EUCLID.pixel_scale_arcsec, mask, name="d")
    samples = PosteriorSamples(theta.expand(n, -1).clone())
    return diagnose(obs, samples, load_model("euclid"))[0]


def test_diagnostics_pass_at_the_truth_and_flag_mismatches():
    image, sigma, psf, theta, _ = _mock(seed=4)
    good = _diagnose(image, sigma, psf, theta)
    # At the truth the residual is the noise: chi2_red ~ 1 +- sqrt(2 / 4096), white.
    assert good.chi2_red_median == pytest.approx(1.0, abs=0.08)
    assert good.residual_coherence == pytest.approx(1.0, abs=0.25)
    assert good.reliable and good.reason == ""
    # Parameters off by 10% in theta_E: a poor fit with coherent residuals.
    off = theta.clone()
    off[NAMES.index("lens_theta_e")] *= 1.1
    bad = _diagnose(image, sigma, psf, off)
    assert not bad.reliable and "fit poorly" in bad.reason and "structured" in bad.reason
    # A PSF far outside the euclid model's training range (0.16-0.24").
    image_w, sigma_w, psf_w, theta_w, _ = _mock(seed=4, fwhm=0.45)
    wide = _diagnose(image_w, sigma_w, psf_w, theta_w)
    assert not wide.reliable and "PSF FWHM" in wide.reason


def test_diagnostics_flag_a_masked_fraction_beyond_the_training_masks():
    # The shipped euclid model saw masks of at most 9% of the pixels (0.6 x 0.15); up to 15%
    # beyond that passes, more is flagged (docs/fit.md: coverage 0.48 / 0.76 at 9-12%).
    image, sigma, psf, theta, _ = _mock(seed=4)
    samples = PosteriorSamples(theta.expand(32, -1).clone())
    model = load_model("euclid")
    for rows, flagged in ((6, False), (10, True)):  # 6 / 64 = 9.4%, 10 / 64 = 15.6%
        mask = torch.ones_like(image, dtype=torch.bool)
        mask[:rows] = False
        obs = Observation(image, sigma, psf, EUCLID.pixel_scale_arcsec, mask, name="m")
        d = diagnose(obs, samples, model)[0]
        assert d.masked_fraction == pytest.approx(rows / 64)
        assert ("masked fraction" in d.reason) == flagged, d.reason
        assert d.reliable == (not flagged), d.reason
    assert "trained on at most 0.090" in d.reason
    untrained = dataclasses.replace(
        model, data=dataclasses.replace(model.data, mask_probability=0.0)
    )
    d = diagnose(obs, samples, untrained)[0]
    assert "the model was trained without masks" in d.reason


def test_diagnostics_flag_posteriors_outside_the_training_prior():
    from lensflow.fit import outside_prior
    from lensflow.prior import Prior

    prior = Prior(dtype=torch.float64)
    inside = prior.sample((1000,), generator=torch.Generator().manual_seed(0))
    assert all(outside_prior(row) == [] for row in inside)
    mid = (prior.low + prior.high) / 2
    amp = NAMES.index("lens_light_amp")  # log-uniform 5-500: 5% of the log-width is x1.26
    for value, flagged in ((4.5, False), (3.0, True), (600.0, False), (900.0, True)):
        m = mid.clone()
        m[amp] = value
        assert (outside_prior(m) == ["lens_light_amp"]) == flagged, value
        # A normalized-flux model covers amplitudes over a range widened by w each way.
        assert outside_prior(m, flux_widening=2.0) == [], value
    m[NAMES.index("lens_theta_e")] = 2.5  # widening applies to the flux parameters only
    assert outside_prior(m, flux_widening=2.0) == ["lens_theta_e"]
    # A broad-prior model's own ranges apply (lens light from 0.2; theta_E still 0.5-2").
    from lensflow.prior import broad_specs

    m[amp] = 1.0
    assert outside_prior(m) == ["lens_theta_e", "lens_light_amp"]
    assert outside_prior(m, specs=broad_specs()) == ["lens_theta_e"]
    image, sigma, psf, theta, _ = _mock(seed=4)
    off = theta.clone()
    off[NAMES.index("lens_theta_e")] = 2.5  # prior 0.5-2.0"
    bad = _diagnose(image, sigma, psf, off)
    assert not bad.reliable and "outside the training prior (lens_theta_e)" in bad.reason


def test_diagnostics_flag_samples_piled_at_a_prior_edge():
    # The MCMC fallback samples inside the prior box; where the data want a value outside
    # it (NEG5700's lens light, docs/real-lenses.md) its samples crowd against the edge
    # with a median just inside, which outside_prior does not see.
    from lensflow.fit import at_prior_edge
    from lensflow.prior import Prior

    prior = Prior(dtype=torch.float64)
    draws = prior.sample((2000,), generator=torch.Generator().manual_seed(1))
    assert at_prior_edge(draws) == []  # 0.2% of a flat prior lies in each band
    amp = NAMES.index("lens_light_amp")  # log-uniform 5-500: the 0.2% band is 5-5.046
    for frac, flagged in ((0.85, False), (0.95, True)):
        theta = draws[:100].clone()
        theta[: int(100 * frac), amp] = 5.02
        assert (at_prior_edge(theta) == ["lens_light_amp"]) == flagged, frac
    image, sigma, psf, truth, _ = _mock(seed=4)
    piled = truth.clone()
    piled[NAMES.index("lens_light_r_sersic")] = 0.3  # the prior's lower edge
    diag = _diagnose(image, sigma, psf, piled)
    assert "piled at the edge of the prior (lens_light_r_sersic)" in diag.reason


def test_diagnostics_of_a_flux_normalized_model_do_not_depend_on_flux_units():
    from lensflow.params import FLUX_NAMES

    image, sigma, psf, theta, _ = _mock(seed=4)
    mask = torch.ones_like(image, dtype=torch.bool)
    obs = Observation(image, sigma, psf, EUCLID.pixel_scale_arcsec, mask, name="d")
    flux = [NAMES.index(n) for n in FLUX_NAMES]
    big_theta = theta.clone()
    big_theta[flux] *= 1e4
    big = PosteriorSamples(big_theta.expand(32, -1).clone())
    absolute = load_model("euclid")
    normalized = dataclasses.replace(
        absolute, data=dataclasses.replace(absolute.data, normalize_flux=True)
    )
    # The same lens in units 1e4 times larger: out of range for the absolute model only.
    flagged = diagnose(obs.scaled(1e4), big, absolute)[0]
    assert not flagged.reliable and "noise level" in flagged.reason
    assert "source_amp, lens_light_amp" in flagged.reason
    scaled = diagnose(obs.scaled(1e4), big, normalized)[0]
    plain = diagnose(obs, PosteriorSamples(theta.expand(32, -1).clone()), normalized)[0]
    assert scaled.reliable and plain.reliable, (scaled.reason, plain.reason)
    assert scaled.chi2_red_median == pytest.approx(plain.chi2_red_median, rel=1e-6)


def test_pad_masks_the_part_of_the_field_outside_a_small_cutout(tmp_path, capsys):
    # A 60x60 cutout (6.0") for the 64x64 (6.4") euclid field, like the dolphin's 4.8" HST
    # cutout for the 5" hst field: without --pad the fit stops with a one-line error that
    # names the option; with it, the 2-pixel border is masked and counted.
    path, _ = _write(tmp_path, n_pix=60)
    out = tmp_path / "o"
    base = ["fit", str(path), "-n", "8", "--n-steps", "4", "--feedback", "none", "--no-plots"]
    assert main([*base, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "does not fit in the 60x60 px cutout" in err and "--pad" in err
    assert main([*base, "--pad", "--out", str(out)]) == 0
    result = fit_lens(load_observation(path), pad=True, **N_FAST)
    mask = result.observation.mask
    assert mask.shape == (64, 64)
    assert not mask[:2].any() and not mask[-2:].any() and not mask[:, :2].any()
    assert mask[2:-2, 2:-2].all()
    expected = 1 - 60**2 / 64**2
    assert result.diagnostics.masked_fraction == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(result.observation.image[2:-2, 2:-2],
                               load_observation(path).image)  # fmt: skip


def test_fit_one_call_api(tmp_path):
    path, _ = _write(tmp_path)
    samples = fit(path, n=32, feedback="none", out=tmp_path / "o", plots=False)
    assert samples.theta.shape == (32, len(NAMES))
    assert torch.isfinite(samples.theta).all()
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"samples.fits", "summary.ecsv",
                                                            "provenance.json"}  # fmt: skip


def test_cli_fit_and_corner(tmp_path, capsys):
    path, theta = _write(tmp_path)
    out = tmp_path / "fit"
    code = main(["fit", str(path), "-n", "64", "--n-steps", "6", "--feedback", "none",
                 "--seed", "1", "--out", str(out)])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "preset auto: euclid" in text and "theta_E" in text
    for name in ("samples.fits", "summary.ecsv", "corner.pdf", "corner.png", "residuals.png",
                 "provenance.json"):  # fmt: skip
        assert (out / name).is_file()
    truth = Table({n: [float(v)] for n, v in zip(NAMES, theta, strict=True)})
    truth.write(tmp_path / "truth.ecsv")
    fig = tmp_path / "c.pdf"
    code = main(["corner", str(out), str(out / "samples.fits"), "--labels", "a,b",
                 "--params", "lens_theta_e,lens_e1", "--truths", str(tmp_path / "truth.ecsv"),
                 "--out", str(fig)])  # fmt: skip
    assert code == 0 and fig.read_bytes()[:4] == b"%PDF"
    assert "68% and 95%" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pixel-scale", "0.3"], "far from the shipped models"),
        (["--center-pix", "3", "3"], "does not fit in the 64x64 px cutout"),
        (["--center", "10", "10"], "outside the 64x64 px cutout"),
        (["--psf", "missing.fits"], "missing.fits"),
        (["--model", "nowhere/model"], "nowhere/model"),
        (["--psf", "BIG_PSF"], "is larger than the image"),
        (["--band", "VIS"], "no band-prefixed HDUs"),
        (["--n-steps", "4", "-n", "0"], "must be >= 1"),
    ],
)
def test_cli_fit_user_errors_are_one_line(tmp_path, capsys, args, message):
    path, _ = _write(tmp_path)
    if "BIG_PSF" in args:
        fits.writeto(tmp_path / "big_psf.fits", np.ones((101, 101)) / 101**2)
        args = [str(tmp_path / "big_psf.fits") if a == "BIG_PSF" else a for a in args]
    code = main(["fit", str(path), "-n", "8", "--feedback", "none", "--out",
                 str(tmp_path / "o"), *args])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("lensflow: error:") and message in err[-1]


def test_cli_fit_refuses_a_file_as_output_folder(tmp_path, capsys):
    path, _ = _write(tmp_path)
    code = main(["fit", str(path), "-n", "8", "--out", str(path)])
    assert code == 2 and "is not a folder" in capsys.readouterr().err


def test_cli_corner_rejects_unknown_parameters(tmp_path, capsys):
    path, _ = _write(tmp_path)
    fit(path, n=16, feedback="none", out=tmp_path / "o", plots=False)
    code = main(["corner", str(tmp_path / "o"), "--params", "theta_e", "--out",
                 str(tmp_path / "c.pdf")])  # fmt: skip
    assert code == 2 and "unknown parameter(s) theta_e" in capsys.readouterr().err


def _flagged_fit():
    """A flagged fit of a euclid mock: a deliberately wrong "flow posterior" (128 samples,
    theta_E 10% high, small spread). Returns the fit, the model and the true theta."""
    from lensflow.fit import FitResult

    image, sigma, psf, theta, _ = _mock(seed=4)
    mask = torch.ones_like(image, dtype=torch.bool)
    obs = Observation(image, sigma, psf, EUCLID.pixel_scale_arcsec, mask, name="fb")
    model = load_model("euclid")
    g = torch.Generator().manual_seed(0)
    bad = theta.expand(128, -1).clone()
    bad[:, NAMES.index("lens_theta_e")] *= 1.1
    bad *= 1 + 1e-3 * torch.randn(bad.shape, generator=g, dtype=torch.float64)
    samples = PosteriorSamples(bad)
    diag, image_m, source = diagnose(obs, samples, model)
    assert not diag.reliable
    flagged = FitResult("fb", samples, obs, image_m, source, diag, "euclid", "none", 0, {}, {})
    return flagged, model, theta


def test_fallback_mcmc_improves_a_flagged_fit():
    from lensflow.fit import run_fallback

    flagged, model, _ = _flagged_fit()
    diag = flagged.diagnostics
    fixed = run_fallback(flagged, model, seed=1, n_burn=40, n_steps=20, n_opt_steps=30)
    assert fixed.samples.method == "emcee" and fixed.samples.theta.shape == (128, len(NAMES))
    assert fixed.fallback["n_walkers"] == 64 and fixed.fallback["n_steps"] == 20
    assert fixed.fallback["flow_diagnostics"]["reliable"] is False
    # 60 short steps do not converge, but they move the chain well toward the truth.
    assert fixed.diagnostics.chi2_red_samples < 0.5 * diag.chi2_red_samples


def test_fallback_smc_improves_a_flagged_fit_and_records_its_run():
    from lensflow.fit import run_fallback

    flagged, model, theta = _flagged_fit()
    diag, obs = flagged.diagnostics, flagged.observation
    fixed = run_fallback(flagged, model, seed=1, n_opt_steps=30, method="smc", n_particles=64)
    assert fixed.samples.method == "smc" and fixed.samples.theta.shape == (64, len(NAMES))
    fb = fixed.fallback
    assert fb["method"] == "smc" and fb["n_particles"] == 64
    assert fb["temperatures"][0] == 0.0 and fb["temperatures"][-1] == 1.0
    assert fb["flow_diagnostics"]["reliable"] is False
    assert fixed.provenance["method"] == "smc" and "fallback" in fixed.timings
    assert json.loads(json.dumps(fb)) == fb  # what provenance.json stores
    # The particles sit at the data's theta_E, not the flow's 10% offset.
    j = NAMES.index("lens_theta_e")
    assert abs(float(fixed.samples.theta[:, j].median()) / float(theta[j]) - 1) < 0.01
    assert fixed.diagnostics.chi2_red_samples < 0.5 * diag.chi2_red_samples
    with pytest.raises(ValueError, match="fallback method must be 'mcmc' or 'smc', got 'nuts'"):
        run_fallback(flagged, model, method="nuts")
    with pytest.raises(ValueError, match="fallback must be one of none, mcmc, smc, got 'hmc'"):
        fit_lens(obs, fallback="hmc", **N_FAST)


@pytest.mark.slow
def test_cli_fit_fallback_smc_prints_and_records_the_rerun(tmp_path, capsys):
    path, _ = _write(tmp_path, seed=4)
    out = tmp_path / "o"
    code = main(["fit", str(path), "-n", "64", "--n-steps", "6", "--feedback", "none",
                 "--fallback", "smc", "--out", str(out), "--no-plots"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    prov = json.loads((out / "provenance.json").read_text())
    # Six Euler steps of the flow alone are flagged on this bright mock.
    assert "flagged (" in text and "re-ran tempered SMC: 64 particles" in text
    assert "sanity checks" in text and " converged" not in text
    assert prov["method"] == "smc" and prov["fallback"]["method"] == "smc"
    assert prov["fallback"]["temperatures"][-1] == 1.0


def test_fallback_wide_prior_follows_data_the_default_prior_excludes():
    from lensflow.fit import FitResult, run_fallback
    from lensflow.prior import Prior, wide_specs

    # An Einstein radius of 2.3" (default prior 0.5-2.0"): the ring pins it, no degeneracy.
    j = NAMES.index("lens_theta_e")
    cfg = dataclasses.replace(EUCLID, psf_fwhm_arcsec=0.2)
    theta = _theta(4)
    theta[j] = 2.3
    psf = gaussian_psf(0.2, cfg.pixel_scale_arcsec)
    clean = LensSimulator(cfg, psf_kernel=psf, dtype=torch.float64)(theta)
    noise = NoiseModel(background_rms=0.004, exposure_time_s=2000.0)
    image = noise.sample(clean, generator=torch.Generator().manual_seed(5))
    obs = Observation(image, noise.sigma(clean), psf, cfg.pixel_scale_arcsec,
                      torch.ones_like(image, dtype=torch.bool), name="wide")  # fmt: skip
    model = load_model("euclid")
    # The flow's answer, pinned at the default prior's edge (as a box-confined fit would be).
    g = torch.Generator().manual_seed(0)
    pinned = theta.expand(128, -1).clone()
    pinned *= 1 + 1e-3 * torch.randn(pinned.shape, generator=g, dtype=torch.float64)
    pinned[:, j] = 2.0
    samples = PosteriorSamples(pinned)
    diag, image_m, source = diagnose(obs, samples, model)
    assert "piled at the edge of the prior (lens_theta_e)" in diag.reason
    flagged = FitResult("wide", samples, obs, image_m, source, diag, "euclid", "none", 0, {},
                        {})  # fmt: skip
    kw = {"seed": 1, "n_burn": 40, "n_steps": 20, "n_opt_steps": 30}
    boxed = run_fallback(flagged, model, **kw)
    wide = run_fallback(flagged, model, prior="wide", **kw)
    assert boxed.fallback["prior"] == "default" and wide.fallback["prior"] == "wide"
    assert float(boxed.samples.theta[:, j].max()) <= 2.0  # held by the box
    assert "piled at the edge of the prior (lens_theta_e" in boxed.diagnostics.reason
    assert abs(float(wide.samples.theta[:, j].median()) - 2.3) < 0.02  # follows the data
    assert wide.diagnostics.chi2_red_samples < 0.5 * boxed.diagnostics.chi2_red_samples
    # Outside the training prior, and said so; but not at the edge of the prior it sampled.
    assert "outside the training prior (lens_theta_e" in wide.diagnostics.reason
    assert "piled at the edge" not in wide.diagnostics.reason
    assert Prior(wide_specs()).log_prob(wide.samples.theta).isfinite().all()
    with pytest.raises(ValueError, match="unknown prior 'open'; choose default, broad, wide"):
        run_fallback(flagged, model, prior="open", **kw)
    with pytest.raises(
        ValueError, match="fallback_prior must be one of default, broad, wide, got 'open'"
    ):
        fit_lens(obs, fallback="mcmc", fallback_prior="open", **N_FAST)


def test_cli_coverage_of_a_calibrated_synthetic_run(tmp_path, capsys):
    # 200 "lenses" whose posteriors are calibrated by construction: truth and samples are
    # independent draws around the same centre.
    g = torch.Generator().manual_seed(0)
    b, n = 200, 200
    centre = torch.randn(b, len(NAMES), generator=g, dtype=torch.float64)
    truth = centre + torch.randn(b, len(NAMES), generator=g, dtype=torch.float64)
    rows = []
    for i in range(b):
        folder = tmp_path / "run" / "lenses" / f"l{i}"
        folder.mkdir(parents=True)
        draws = centre[i] + torch.randn(n, len(NAMES), generator=g, dtype=torch.float64)
        Table({k: draws[:, j].numpy() for j, k in enumerate(NAMES)}).write(folder / "samples.fits")
        rows.append({"id": f"l{i}", **{k: float(truth[i, j]) for j, k in enumerate(NAMES)}})
    Table(rows=rows).write(tmp_path / "truth.ecsv")
    code = main(["coverage", str(tmp_path / "run"), "--truths", str(tmp_path / "truth.ecsv"),
                 "--out", str(tmp_path / "cov.png")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and (tmp_path / "cov.png").stat().st_size > 0
    c68, c95 = (float(x) for x in re.findall(r"coverage ([\d.]+) at 68%, ([\d.]+) at 95%", out)[0])
    # 21 x 200 intervals: standard error ~0.033 / sqrt(21) per level for the mean over parameters.
    assert abs(c68 - 0.68) < 0.03 and abs(c95 - 0.95) < 0.02
    # Truth columns with units are converted to the registry's: theta_E in mas gives the same.
    mas = Table.read(tmp_path / "truth.ecsv")
    mas["lens_theta_e"] = mas["lens_theta_e"] * 1000
    mas["lens_theta_e"].unit = "mas"
    mas.write(tmp_path / "truth_mas.ecsv")
    code = main(["coverage", str(tmp_path / "run"), "--truths", str(tmp_path / "truth_mas.ecsv"),
                 "--out", str(tmp_path / "cov2.png")])  # fmt: skip
    pattern = r"coverage ([\d.]+) at 68%, ([\d.]+) at 95%"
    assert code == 0
    assert re.findall(pattern, capsys.readouterr().out) == re.findall(pattern, out)
