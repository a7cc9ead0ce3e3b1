"""Posterior sampling of observations, the samples record, and the train/sample CLI."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.table import Table

import lensflow
from lensflow.checkpoint import TrainedPosterior, build_posterior, load_model
from lensflow.cli import main
from lensflow.config import DataConfig, FlowConfig, SimulatorConfig, TrainConfig
from lensflow.data import SimulatedPairs
from lensflow.mocks import write_mock_fits
from lensflow.observation import Observation, load_observation
from lensflow.params import NAMES, REGISTRY
from lensflow.sampling import PosteriorSamples, sample_posterior, sample_posteriors, summary_table
from lensflow.simulator import gaussian_psf

TINY = SimulatorConfig(name="tiny", n_pix=16, pixel_scale_arcsec=0.3, upsample_factor=1,
                       psf_fwhm_arcsec=0.5)  # fmt: skip
TINY_DATA = DataConfig(psf_fwhm_min_arcsec=0.4, psf_fwhm_max_arcsec=0.6, n_psf_grid=2)
TINY_FLOW = FlowConfig(embed_dim=16, base_channels=4, n_stages=2, width=32, n_blocks=1,
                       time_dim=8, n_steps=4)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _observation(n_pix=20, seed=0):
    big = SimulatorConfig(name="tiny", n_pix=n_pix, pixel_scale_arcsec=0.3, upsample_factor=1,
                          psf_fwhm_arcsec=0.5)  # fmt: skip
    batch = SimulatedPairs(big, DataConfig(psf_fwhm_min_arcsec=0.5, psf_fwhm_max_arcsec=0.5,
                                           n_psf_grid=1)).sample(1, generator=torch.Generator().manual_seed(seed))  # fmt: skip
    image, sigma = batch.image[0].double(), batch.sigma[0].double()
    return Observation(image, sigma, gaussian_psf(0.5, 0.3), 0.3,
                       torch.ones_like(image, dtype=torch.bool), name=f"mock{seed}")  # fmt: skip


def test_posterior_samples_validates_shapes():
    PosteriorSamples(torch.zeros(4, len(NAMES)))
    with pytest.raises(ValueError, match="shape"):
        PosteriorSamples(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="log_prob"):
        PosteriorSamples(torch.zeros(4, len(NAMES)), log_prob=torch.zeros(3))


def test_sample_posteriors_batched_shapes_and_units():
    model = TrainedPosterior(build_posterior(TINY_FLOW).eval(), TINY, TINY_DATA, TINY_FLOW)
    observations = [_observation(seed=s) for s in range(3)]  # 20x20 px, cut to 16x16
    out = sample_posteriors(observations, model, 7, generator=torch.Generator().manual_seed(0))
    assert len(out) == 3
    low = torch.tensor([p.low for p in REGISTRY])
    high = torch.tensor([p.high for p in REGISTRY])
    for samples in out:
        assert samples.theta.shape == (7, len(NAMES)) and samples.names == NAMES
        assert ((samples.theta > low) & (samples.theta < high)).all()  # physical bounds
    one = sample_posterior(observations[0], model, 5, use_log_prob=True, n_steps=2,
                           generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert one.log_prob.shape == (5,) and torch.isfinite(one.log_prob).all()
    summary = summary_table(one)
    assert len(summary) == 1 and summary["lens_theta_e_median"].unit == "arcsec"


def test_cli_train_and_sample_smoke(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(
        '[simulator]\nname = "tiny"\nn_pix = 16\npixel_scale_arcsec = 0.3\nupsample_factor = 1\n'
        "psf_fwhm_arcsec = 0.5\n"
        "[data]\npsf_fwhm_min_arcsec = 0.4\npsf_fwhm_max_arcsec = 0.6\nn_psf_grid = 2\n"
        "[flow]\nembed_dim = 16\nbase_channels = 4\nn_stages = 2\nwidth = 32\nn_blocks = 1\n"
        "time_dim = 8\nn_steps = 4\n"
        "[train]\nn_val = 8\nwarmup_steps = 1\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--steps", "3",
                 "--batch-size", "4", "--device", "cpu", "--quiet", "--prior", "broad"]) == 0  # fmt: skip
    assert (run / "model.safetensors").is_file() and (run / "provenance.json").is_file()
    assert load_model(run).meta["training"]["steps"] == 3
    assert load_model(run).data.prior == "broad"  # and the resolved config says so
    assert 'prior = "broad"' in (run / "config.toml").read_text()
    obs = _observation()
    fits_path = write_mock_fits(tmp_path / "lens.fits", obs.image, obs.sigma, obs.psf, TINY)
    assert load_observation(fits_path).shape == (20, 20)
    out = tmp_path / "post"
    assert main(["sample", str(fits_path), "--model", str(run), "-n", "20", "--n-steps", "2",
                 "--seed", "1", "--out", str(out)]) == 0  # fmt: skip
    table = Table.read(out / "samples.ecsv")
    assert table.colnames == list(NAMES) and len(table) == 20
    assert table["lens_theta_e"].unit == "arcsec"
    assert Table.read(out / "summary.ecsv")["source_amp_p84"].unit is not None
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["seed"] == 1 and provenance["model_training"]["steps"] == 3
    # User errors: one line, exit 2.
    assert main(["sample", str(fits_path), "--model", "nosuchmodel", "--out", str(out)]) == 2
    assert "no shipped model" in capsys.readouterr().err


@pytest.mark.slow
def test_small_lens_posterior_covers_truth():
    from lensflow.train import fit

    torch.manual_seed(0)
    flow = FlowConfig(embed_dim=64, base_channels=8, n_stages=3, width=128, n_blocks=2,
                      n_steps=16)  # fmt: skip
    posterior = build_posterior(flow)
    source = SimulatedPairs(TINY, TINY_DATA)
    val = source.sample(64, generator=torch.Generator().manual_seed(9))
    from lensflow.flow import FlowMatchingLoss

    cfg = TrainConfig(n_steps=1500, batch_size=64, lr=2e-3, warmup_steps=50, val_every=500,
                      n_val=64, ema_decay=0.995)  # fmt: skip
    result = fit(FlowMatchingLoss(posterior.field), posterior.transform, source, val, cfg)
    posterior.field.load_state_dict(result.field.state_dict())
    posterior.eval()
    test = source.sample(100, generator=torch.Generator().manual_seed(123))
    theta = posterior.sample(test.x, 200, generator=torch.Generator().manual_seed(0))
    lo, hi = torch.quantile(theta, 0.025, dim=0), torch.quantile(theta, 0.975, dim=0)
    covered = ((test.theta >= lo) & (test.theta <= hi)).float().mean(0)
    # 100 lenses: the 95% coverage of each parameter has a standard error of ~0.022.
    assert covered.min() > 0.85, covered
    # It learned from the images: in the standardized space (prior std ~1) the posterior
    # is narrower for theta_E (measured 0.71) and the lens light (measured 0.26-0.30).
    u_std = posterior.transform.to_u(theta).std(0).median(0).values
    assert u_std[0] < 0.85 and u_std[-4:].max() < 0.5, u_std


# --------------------------------------------------------------------------- feedback


@pytest.fixture(scope="module")
def fb_model(tmp_path_factory):
    """A tiny saved model with gradient and learned control nets beside it (3 steps each)."""
    from lensflow.checkpoint import save_control, save_model
    from lensflow.feedback import FinetuneConfig, finetune_lens

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("fb")
    torch.manual_seed(0)
    save_model(folder / "model", TrainedPosterior(build_posterior(TINY_FLOW).eval(), TINY,
                                                  TINY_DATA, TINY_FLOW))  # fmt: skip
    model = load_model(folder / "model")
    cfg = FinetuneConfig(n_steps=3, batch_size=4, lr=1e-2, width=16, n_blocks=1, time_dim=8,
                         n_steps_sample=10)  # fmt: skip
    for kind in ("gradient", "learned"):
        tuned = finetune_lens(model, kind, cfg, generator=torch.Generator().manual_seed(1))
        save_control(folder / f"model-{kind}", tuned, model, kind=kind, finetune=cfg,
                     status="test")  # fmt: skip
    return model


@pytest.mark.parametrize("feedback", ["none", "gradient", "learned"])
def test_seeded_lens_samples_do_not_depend_on_batch_neighbours(fb_model, feedback):
    obs = [_observation(seed=s) for s in range(3)]
    alone = sample_posteriors(obs[:1], fb_model, 40, feedback=feedback, seeds=[7])[0]
    batch = sample_posteriors([obs[2], obs[0], obs[1]], fb_model, 40, feedback=feedback,
                              seeds=[1, 7, 3], chunk=2)  # fmt: skip
    other = sample_posteriors([obs[1], obs[0]], fb_model, 40, feedback=feedback, seeds=[5, 7],
                              chunk=1)  # fmt: skip
    method = "flow" if feedback == "none" else f"flow+{feedback}"
    assert alone.method == batch[1].method == method
    to_u = fb_model.posterior.transform.to_u
    for inside in (batch[1].theta, other[1].theta):
        torch.testing.assert_close(to_u(inside), to_u(alone.theta), rtol=1e-5, atol=1e-5)
    # Seeds matter, and another lens gives other samples.
    assert not torch.allclose(batch[0].theta, batch[2].theta)
    again = sample_posterior(obs[0], fb_model, 40, feedback=feedback, seed=8)
    assert not torch.allclose(again.theta, alone.theta)


@pytest.mark.parametrize("feedback", ["none", "gradient", "learned"])
def test_normalized_flux_samples_do_not_depend_on_flux_units(fb_model, feedback):
    from lensflow.params import FLUX_NAMES

    obs = _observation(seed=2)
    flux = [NAMES.index(n) for n in FLUX_NAMES]
    rest = [j for j in range(len(NAMES)) if j not in flux]
    assert sorted(FLUX_NAMES) == ["lens_light_amp", "source_amp"]
    runs = {
        f: sample_posterior(obs.scaled(f), fb_model, 30, feedback=feedback, seed=4,
                            normalize_flux=True, use_log_prob=feedback == "none")
        for f in (1.0, 0.01, 250.0)
    }  # fmt: skip
    for f in (0.01, 250.0):
        torch.testing.assert_close(runs[f].theta[:, rest], runs[1.0].theta[:, rest],
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        torch.testing.assert_close(runs[f].theta[:, flux], runs[1.0].theta[:, flux] * f,
                                   rtol=1e-4, atol=0)  # fmt: skip
        if feedback == "none":  # q(theta) picks up the Jacobian 1/f per flux parameter
            torch.testing.assert_close(runs[f].log_prob, runs[1.0].log_prob - 2 * math.log(f),
                                       rtol=1e-5, atol=1e-3)  # fmt: skip
    # Without normalization the answer depends on the units (the noise channel moves).
    absolute = sample_posterior(obs.scaled(250.0), fb_model, 30, feedback=feedback, seed=4)
    assert not torch.allclose(absolute.theta[:, rest], runs[1.0].theta[:, rest], atol=1e-3)


def test_flux_normalized_model_normalizes_by_default_and_round_trips(tmp_path):
    import dataclasses

    from lensflow.checkpoint import save_model
    from lensflow.params import FLUX_NAMES

    data = dataclasses.replace(TINY_DATA, normalize_flux=True)
    torch.manual_seed(0)
    save_model(tmp_path / "m", TrainedPosterior(build_posterior(TINY_FLOW).eval(), TINY, data,
                                                TINY_FLOW))  # fmt: skip
    model = load_model(tmp_path / "m")
    assert model.data.normalize_flux and not TINY_DATA.normalize_flux
    obs = _observation(seed=5)
    flux = [NAMES.index(n) for n in FLUX_NAMES]
    rest = [j for j in range(len(NAMES)) if j not in flux]
    a = sample_posterior(obs, model, 20, seed=1)
    b = sample_posterior(obs.scaled(1e3), model, 20, seed=1)
    torch.testing.assert_close(b.theta[:, rest], a.theta[:, rest], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.theta[:, flux], a.theta[:, flux] * 1e3, rtol=1e-4, atol=0)
    forced_off = sample_posterior(obs.scaled(1e3), model, 20, seed=1, normalize_flux=False)
    assert not torch.allclose(forced_off.theta[:, rest], a.theta[:, rest], atol=1e-3)


def test_feedback_changes_samples_and_auto_picks_gradient(fb_model):
    obs = [_observation(seed=0)]
    none = sample_posteriors(obs, fb_model, 30, feedback="none", seeds=[0])[0]
    grad = sample_posteriors(obs, fb_model, 30, feedback="gradient", seeds=[0])[0]
    auto = sample_posteriors(obs, fb_model, 30, feedback="auto", seeds=[0])[0]
    assert auto.method == "flow+gradient" and torch.isfinite(grad.theta).all()
    torch.testing.assert_close(auto.theta, grad.theta)
    # The finetuned control moves the samples (the controlled segment differs from the base).
    assert (grad.theta - none.theta).abs().max() > 1e-4


def test_feedback_ignores_masked_pixels(fb_model):
    clean = _observation(n_pix=16, seed=4)
    mask = torch.ones_like(clean.mask)
    mask[:5, :6] = False
    masked = Observation(clean.image, clean.sigma, clean.psf, 0.3, mask, name="masked")
    image = clean.image.clone()
    image[:5, :6] = 1e6  # garbage where masked
    garbage = Observation(image, clean.sigma, clean.psf, 0.3, mask, name="garbage")
    for kind in ("gradient", "learned"):
        a = sample_posterior(masked, fb_model, 20, feedback=kind, seed=3)
        b = sample_posterior(garbage, fb_model, 20, feedback=kind, seed=3)
        torch.testing.assert_close(a.theta, b.theta)
        assert torch.isfinite(a.theta).all()


def test_sampler_settings_resolve_defaults_and_are_recorded_on_the_samples(fb_model):
    from lensflow.checkpoint import load_control
    from lensflow.sampling import sampler_settings

    flow = fb_model.posterior
    assert sampler_settings(fb_model) == {"solver": flow.solver, "n_steps": flow.n_steps}
    control = load_control("gradient", fb_model)
    s = sampler_settings(fb_model, control, n_steps=10)
    # 10 steps with t_start = 0.8: 8 base steps, 2 controlled, one call each (Euler).
    assert control.t_start == pytest.approx(0.8)
    assert s == {
        "solver": control.solver,
        "n_steps": 10,
        "t_start": control.t_start,
        "base_solver": control.solver,
        "base_steps": 8,
        "control_steps": 2,
        "simulator_calls_per_sample": 2 * {"euler": 1, "midpoint": 2}[control.solver],
    }
    s = sampler_settings(fb_model, control, n_steps=10, solver="midpoint", control_steps=3,
                         base_solver="rk4")  # fmt: skip
    assert (s["base_solver"], s["base_steps"], s["control_steps"]) == ("rk4", 8, 3)
    # A control net whose sidecar asks for a midpoint base: used unless a solver is given.
    mid = dataclasses.replace(control, base_solver="midpoint")
    assert sampler_settings(fb_model, mid)["base_solver"] == "midpoint"
    assert sampler_settings(fb_model, mid, solver="rk4")["base_solver"] == "rk4"
    assert sampler_settings(fb_model, mid, solver="rk4", base_solver="heun")["base_solver"] == (
        "heun")  # fmt: skip
    assert s["simulator_calls_per_sample"] == 6  # 3 midpoint steps, 2 calls each
    with pytest.raises(ValueError, match="base_solver='midpoint' needs feedback"):
        sampler_settings(fb_model, base_solver="midpoint")
    with pytest.raises(ValueError, match="unknown solver 'eular'"):
        sampler_settings(fb_model, control, base_solver="eular")
    obs = [_observation(seed=0), _observation(seed=1)]
    out = sample_posteriors(obs, fb_model, 4, feedback="gradient", n_steps=10, seeds=[1, 2],
                            base_solver="midpoint")  # fmt: skip
    want = sampler_settings(fb_model, control, n_steps=10, base_solver="midpoint")
    assert [o.sampler for o in out] == [want, want]
    same = sample_posteriors(obs, fb_model, 4, feedback="gradient", n_steps=10, seeds=[1, 2])
    assert not torch.allclose(out[0].theta, same[0].theta)  # the base solver was used
    assert sample_posteriors(obs, fb_model, 4, n_steps=6)[0].sampler == {
        "solver": flow.solver, "n_steps": 6}  # fmt: skip


def test_missing_control_net_is_a_one_line_error(fb_model, tmp_path):
    from lensflow.checkpoint import available_feedback, save_model

    assert available_feedback(fb_model) == ("gradient", "learned")
    save_model(tmp_path / "bare", TrainedPosterior(fb_model.posterior, TINY, TINY_DATA,
                                                   TINY_FLOW))  # fmt: skip
    bare = load_model(tmp_path / "bare")
    assert available_feedback(bare) == ()
    obs = [_observation(seed=0)]
    assert sample_posteriors(obs, bare, 3, feedback="auto")[0].method == "flow"
    with pytest.raises(ValueError, match="no gradient control net for bare.json; available: none"):
        sample_posteriors(obs, bare, 3, feedback="gradient")
    with pytest.raises(ValueError, match="feedback must be one of"):
        sample_posteriors(obs, bare, 3, feedback="gradiant")


def test_cli_sample_with_feedback_and_finetune(fb_model, tmp_path, capsys):
    obs = _observation()
    fits_path = write_mock_fits(tmp_path / "lens.fits", obs.image, obs.sigma, obs.psf, TINY)
    model = str(fb_model.path)
    out = tmp_path / "post"
    assert main(["sample", str(fits_path), "--model", model, "-n", "12", "--out", str(out)]) == 0
    assert "feedback: gradient feedback (model-gradient.json) [requested: auto]" in (
        capsys.readouterr().out
    )
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["feedback"] == "gradient" and provenance["control_status"] == "test"
    assert provenance["normalize_flux"] is False  # the model's own (absolute) units
    assert main(["sample", str(fits_path), "--model", model, "-n", "12", "--normalize-flux",
                 "--out", str(out / "norm")]) == 0  # fmt: skip
    assert json.loads((out / "norm" / "provenance.json").read_text())["normalize_flux"] is True
    assert Table.read(out / "samples.ecsv").meta["method"] == "flow+gradient"
    # --control-steps: fewer controlled steps, other samples, recorded; needs feedback.
    assert main(["sample", str(fits_path), "--model", model, "-n", "12", "--control-steps", "1",
                 "--out", str(out / "cs1")]) == 0  # fmt: skip
    assert json.loads((out / "cs1" / "provenance.json").read_text())["control_steps"] == 1
    one = Table.read(out / "cs1" / "samples.ecsv")
    assert not np.allclose(one["lens_theta_e"], Table.read(out / "samples.ecsv")["lens_theta_e"])
    capsys.readouterr()
    assert main(["sample", str(fits_path), "--model", model, "-n", "12", "--control-steps", "2",
                 "--feedback", "none", "--out", str(out / "cs2")]) == 2  # fmt: skip
    assert "control_steps=2 needs feedback, but it is 'none'" in capsys.readouterr().err
    assert main(["sample", str(fits_path), "--model", model, "-n", "12", "--control-steps", "0",
                 "--out", str(out / "cs0")]) == 2  # fmt: skip
    assert "control_steps must be an integer >= 1, got 0" in capsys.readouterr().err
    # --solver / --base-solver: the resolved sampler is printed and recorded.
    assert main(["sample", str(fits_path), "--model", model, "-n", "12", "--n-steps", "10",
                 "--base-solver", "midpoint", "--out", str(out / "mid")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "8 midpoint steps to t = 0.8, then 2 euler steps with feedback" in printed
    sampler = json.loads((out / "mid" / "provenance.json").read_text())["sampler"]
    assert (sampler["base_solver"], sampler["base_steps"], sampler["solver"]) == (
        "midpoint", 8, "euler")  # fmt: skip
    assert main(["sample", str(fits_path), "--model", model, "-n", "12", "--base-solver",
                 "midpoint", "--feedback", "none", "--out", str(out / "mb")]) == 2  # fmt: skip
    assert "base_solver='midpoint' needs feedback, but it is 'none'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse lists the solvers
        main(["sample", str(fits_path), "--model", model, "--solver", "eular", "--out", str(out)])
    assert "invalid choice: 'eular'" in capsys.readouterr().err
    assert main(["sample", str(fits_path), "--model", model, "-n", "12", "--feedback", "none",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "feedback: no feedback" in capsys.readouterr().out
    # finetune writes a control net that sample then finds beside the model.
    from lensflow.checkpoint import save_model

    run = tmp_path / "run"
    save_model(run / "model", TrainedPosterior(fb_model.posterior, TINY, TINY_DATA, TINY_FLOW))
    assert main(["sample", str(fits_path), "--model", str(run), "--feedback", "learned",
                 "--out", str(out)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("lensflow: error: no learned control net for model.json; available: "
                          "none") and len(err.strip().splitlines()) == 1  # fmt: skip
    assert main(["finetune", "--model", str(run), "--signal", "learned", "--out", str(run),
                 "--steps", "2", "--batch-size", "2", "--seed", "3", "--quiet",
                 "--mask-probability", "0.5"]) == 0  # fmt: skip
    assert "learned control net (" in capsys.readouterr().out
    meta = json.loads((run / "model-learned.json").read_text())
    assert meta["signal_kind"] == "learned" and meta["preset"] == "tiny"
    assert meta["training"]["data_config"]["mask_probability"] == 0.5
    assert meta["training"]["steps"] == 2 and meta["status"] == "provisional: CPU-trained"
    assert meta["n_parameters"] > 0 and meta["base"] == str((run / "model.json").resolve())
    # A new net stores the shipped nets' sampler of its signal (learned: Euler 40).
    models = Path(lensflow.__file__).parent / "models"
    sampler = ("n_steps", "solver", "control_steps", "base_solver")
    shipped = json.loads((models / "euclid-learned.json").read_text())
    assert {k: meta.get(k) for k in sampler} == {k: shipped.get(k) for k in sampler}
    assert main(["sample", str(fits_path), "--model", str(run), "-n", "5", "--out",
                 str(out)]) == 0  # fmt: skip
    assert "feedback: learned feedback" in capsys.readouterr().out
    # --init continues a control net: at lr 0 the weights (encoder included) are kept exactly.
    cont = tmp_path / "cont"
    assert main(["finetune", "--model", str(run), "--signal", "learned", "--out", str(cont),
                 "--init", "learned", "--steps", "2", "--batch-size", "2", "--lr", "0",
                 "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    again = json.loads((cont / "model-learned.json").read_text())["training"]
    assert again["init"]["path"] == str(run / "model-learned.json")
    assert again["init"]["steps"] == 2 and again["steps_total"] == 4
    # A continued net continued again counts every step before it (2 + 2 + 1).
    assert main(["finetune", "--model", str(run), "--signal", "learned", "--out",
                 str(tmp_path / "cont2"), "--init", str(cont / "model-learned.json"),
                 "--steps", "1", "--batch-size", "2", "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    third = json.loads((tmp_path / "cont2" / "model-learned.json").read_text())["training"]
    assert third["init"]["steps"] == 4 and third["steps_total"] == 5
    from safetensors.torch import load_file

    a = load_file(run / "model-learned.safetensors")
    b = load_file(cont / "model-learned.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("signal.encoder.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["finetune", "--model", str(run), "--signal", "gradient", "--out", str(cont),
                 "--init", "learned"]) == 2  # fmt: skip
    assert "is a learned control net, not gradient" in capsys.readouterr().err
    assert main(["finetune", "--model", str(run), "--signal", "gradient", "--out", str(run),
                 "--steps", "0"]) == 2  # fmt: skip
    assert main(["finetune", "--model", str(run), "--signal", "gradient", "--out", str(run),
                 "--mask-probability", "1.5"]) == 2  # fmt: skip
    assert "--mask-probability 1.5 must be in [0, 1]" in capsys.readouterr().err
    assert main(["finetune", "--model", str(run), "--signal", "gradient", "--out", str(run),
                 "--control-steps-sample", "0"]) == 2  # fmt: skip
    assert "--control-steps-sample" in capsys.readouterr().err
    # --width/--blocks shape a new net; an --init net keeps its own shape.
    wide = tmp_path / "wide"
    assert main(["finetune", "--model", str(run), "--signal", "gradient", "--out", str(wide),
                 "--steps", "1", "--batch-size", "2", "--width", "24", "--blocks", "3",
                 "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    meta = json.loads((wide / "model-gradient.json").read_text())
    assert meta["width"] == 24 and meta["finetune"]["n_blocks"] == 3
    # gradient: midpoint base segment, 8 feedback steps, as the shipped gradient nets.
    shipped = json.loads((models / "euclid-gradient.json").read_text())
    assert {k: meta[k] for k in sampler} == {k: shipped[k] for k in sampler}
    assert (meta["n_steps"], meta["control_steps"], meta["base_solver"]) == (20, 8, "midpoint")
    assert main(["finetune", "--model", str(run), "--signal", "learned", "--out", str(cont),
                 "--init", "learned", "--width", "24"]) == 2  # fmt: skip
    assert "has --width 128, not 24" in capsys.readouterr().err
    assert main(["finetune", "--model", str(run), "--signal", "gradient", "--out", str(run),
                 "--blocks", "0"]) == 2  # fmt: skip
    assert "must be >= 1" in capsys.readouterr().err
