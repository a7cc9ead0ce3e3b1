"""Checkpoints: bit-identical round trip, refusal of mismatched files, the model builder."""

import json

import pytest
import torch

from lensflow.checkpoint import (
    CheckpointError,
    TrainedPosterior,
    build_posterior,
    load_model,
    save_model,
)
from lensflow.config import DataConfig, FlowConfig, SimulatorConfig
from lensflow.data import N_CHANNELS

TINY = SimulatorConfig(name="tiny", n_pix=16, pixel_scale_arcsec=0.3, upsample_factor=1,
                       psf_fwhm_arcsec=0.5)  # fmt: skip
TINY_FLOW = FlowConfig(embed_dim=16, base_channels=4, n_stages=2, width=32, n_blocks=1,
                       time_dim=8, n_steps=4)  # fmt: skip


@pytest.fixture
def saved(tmp_path):
    model = TrainedPosterior(build_posterior(TINY_FLOW), TINY, DataConfig(), TINY_FLOW)
    path = save_model(tmp_path / "m", model, training={"steps": 3})
    return model, path


def test_build_posterior_shapes():
    posterior = build_posterior(TINY_FLOW)
    x = torch.randn(3, N_CHANNELS, 16, 16)
    assert posterior.sample(x, 5).shape == (5, 3, 21)
    assert posterior.field(torch.zeros(3, 21), x, torch.rand(3)).shape == (3, 21)


def test_checkpoint_round_trip_bit_identical(saved):
    model, path = saved
    loaded = load_model(path, expected_simulator=TINY)
    assert loaded.simulator == TINY and loaded.flow == TINY_FLOW and loaded.data == DataConfig()
    assert loaded.meta["training"] == {"steps": 3}
    x = torch.randn(2, N_CHANNELS, 16, 16)
    model.posterior.eval()
    a = model.posterior.sample(x, 4, generator=torch.Generator().manual_seed(0))
    b = loaded.posterior.sample(x, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    # The stem, the .safetensors path and the .json path all name the same model.
    assert (
        load_model(path.with_suffix("")).meta == load_model(path.with_suffix(".safetensors")).meta
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("names", ["lens_theta_e"], "trained for parameters"),
        ("lensflow_version", "0.9.0", "incompatible"),
        ("format", "something-else", "format"),
        ("flow", {**TINY_FLOW.__dict__, "width": 48}, "do not fit"),
    ],
)
def test_checkpoint_refuses_mismatch(saved, key, value, message):
    _, path = saved
    meta = json.loads(path.read_text())
    meta[key] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_model(path)


def test_checkpoint_refuses_other_instrument_and_missing_files(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="n_pix=16"):
        load_model(path, expected_simulator=SimulatorConfig(name="tiny", n_pix=32))
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nothing.json")
    with pytest.raises(CheckpointError, match="no shipped model"):
        load_model("nonexistentpreset")


def test_control_checkpoint_round_trip_and_refusals(tmp_path):
    from lensflow.checkpoint import available_feedback, load_control, save_control
    from lensflow.feedback import FinetuneConfig, finetune_lens

    data = DataConfig(psf_fwhm_min_arcsec=0.4, psf_fwhm_max_arcsec=0.6, n_psf_grid=2)
    save_model(tmp_path / "m", TrainedPosterior(build_posterior(TINY_FLOW), TINY, data,
                                                TINY_FLOW))  # fmt: skip
    model = load_model(tmp_path / "m")
    assert model.path == tmp_path / "m.json" and available_feedback(model) == ()
    cfg = FinetuneConfig(n_steps=2, batch_size=3, width=16, n_blocks=1, time_dim=8)
    tuned = finetune_lens(model, "learned", cfg, generator=torch.Generator().manual_seed(0))
    meta_path = save_control(tmp_path / "m-learned", tuned, model, kind="learned", finetune=cfg,
                             training={"steps": 2}, status="provisional: test")  # fmt: skip
    meta = json.loads(meta_path.read_text())
    n_control = sum(p.numel() for p in tuned.control.parameters())
    n_encoder = sum(p.numel() for p in tuned.signal.encoder.parameters())
    assert meta["n_parameters"] == n_control + n_encoder
    assert meta["signal_kind"] == "learned" and meta["preset"] == "tiny"
    assert meta["base"] == str(tmp_path / "m.json") and len(meta["base_sha256"]) == 64
    assert meta["finetune"]["n_steps"] == 2 and meta["status"] == "provisional: test"
    assert available_feedback(model) == ("learned",)
    assert meta["control_steps"] is None and load_control("learned", model).control_steps is None
    assert meta["base_solver"] is None and load_control("learned", model).base_solver is None
    # the sampler defaults
    meta_path.write_text(json.dumps(meta | {"control_steps": 4, "base_solver": "midpoint"}))
    for name in ("learned", tmp_path / "m-learned", str(meta_path)):
        control = load_control(name, model)
        assert control.kind == "learned" and control.n_parameters == meta["n_parameters"]
        assert control.control_steps == 4 and control.base_solver == "midpoint"
        for a, b in zip(control.control.state_dict().values(),
                        tuned.control.state_dict().values(), strict=True):  # fmt: skip
            assert torch.equal(a, b)
        for a, b in zip(control.encoder.state_dict().values(),
                        tuned.signal.encoder.state_dict().values(), strict=True):  # fmt: skip
            assert torch.equal(a, b)
    with pytest.raises(
        CheckpointError, match="no gradient control net for model .*m.json .*available: learned"
    ):
        load_control("gradient", model)
    # Other base weights: refused on load, and not offered by available_feedback.
    other_stem = tmp_path / "other"
    save_model(other_stem, TrainedPosterior(build_posterior(TINY_FLOW), TINY, data, TINY_FLOW))
    other = load_model(other_stem)
    with pytest.raises(CheckpointError, match="trained on base weights"):
        load_control(meta_path, other)
    (tmp_path / "other-learned.json").write_text(meta_path.read_text())
    assert available_feedback(other) == ()


def test_broad_prior_checkpoint_round_trips_with_its_own_normalization(tmp_path):
    from lensflow.params import unconstrained_stats
    from lensflow.prior import broad_specs

    data = DataConfig(prior="broad")
    model = TrainedPosterior(build_posterior(TINY_FLOW, "broad"), TINY, data, TINY_FLOW)
    path = save_model(tmp_path / "m", model)
    meta = json.loads(path.read_text())
    loc, scale = unconstrained_stats(broad_specs())
    assert meta["data"]["prior"] == "broad" and meta["normalization"]["u_loc"] == loc.tolist()
    assert meta["normalization"]["u_scale"] == scale.tolist()
    loaded = load_model(path)
    assert loaded.data.prior == "broad" and loaded.prior_specs == broad_specs()
    # The same physical point standardizes differently under the two priors.
    theta = torch.tensor([[1.0, 0.4, 0.0, 0.0, 0.0, 0.2, 0.0, 1.0, 0.2, 1.0, 0.5, 0.0, 0.0, 0.0,
                           1.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # fmt: skip
    u_broad = loaded.posterior.transform.to_u(theta)
    u_default = build_posterior(TINY_FLOW).transform.to_u(theta)
    assert not torch.allclose(u_broad, u_default)
    torch.testing.assert_close(loaded.posterior.transform.from_u(u_broad), theta)
    x = torch.randn(2, N_CHANNELS, 16, 16)
    model.posterior.eval()
    g = lambda: torch.Generator().manual_seed(0)
    assert torch.equal(model.posterior.sample(x, 4, generator=g()),
                       loaded.posterior.sample(x, 4, generator=g()))  # fmt: skip
    # A sidecar whose prior name does not match its normalization is refused, as is a
    # posterior saved with a data config of another prior.
    meta["data"]["prior"] = "default"
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="differs from this registry's 'default' prior"):
        load_model(path)
    meta["data"]["prior"] = "open"
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="DataConfig.prior='open' is invalid"):
        load_model(path)
    with pytest.raises(ValueError, match="built for another prior"):
        save_model(tmp_path / "bad", TrainedPosterior(build_posterior(TINY_FLOW), TINY, data,
                                                      TINY_FLOW))  # fmt: skip
