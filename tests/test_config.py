"""Configuration dataclasses, presets and TOML round trips."""

import dataclasses
import math

import pytest

from lensflow.config import PRESETS, SimulatorConfig, load_config, preset, to_toml


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_toml_round_trip(tmp_path, name):
    path = tmp_path / "c.toml"
    path.write_text(to_toml({"simulator": preset(name)}))
    assert load_config(path)["simulator"] == preset(name)


def test_toml_round_trip_with_inf_exposure(tmp_path):
    cfg = SimulatorConfig(exposure_time_s=math.inf)
    path = tmp_path / "c.toml"
    path.write_text(to_toml({"simulator": cfg}))
    assert load_config(path)["simulator"] == cfg


def test_load_config_preset_with_override(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[simulator]\npreset = "euclid"\nn_pix = 32\n')
    cfg = load_config(path)["simulator"]
    assert cfg == dataclasses.replace(preset("euclid"), n_pix=32)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[simulator]\nnpix = 3\n", "unknown key"),
        ("[trainer]\nx = 1\n", "unknown table"),
        ("[simulator]\nn_pix = 2\n", "n_pix"),
        ("[simulator]\npreset = 'jwst'\n", "unknown preset"),
        ("[simulator\n", "cannot read"),
    ],
)
def test_load_config_rejects_bad_input(tmp_path, text, match):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(path)


def test_config_rejects_noise_free_likelihood():
    with pytest.raises(ValueError, match="zero noise"):
        SimulatorConfig(background_rms=0.0, exposure_time_s=math.inf)
