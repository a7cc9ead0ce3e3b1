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
