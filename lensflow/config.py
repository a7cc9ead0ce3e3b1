"""Configuration: one frozen dataclass per stage, instrument presets, and TOML loading.

Every field has a real default. A TOML file only overrides defaults; unknown keys raise.
The instrument presets are ``SimulatorConfig`` instances chosen so that the real cutouts in
``shared/data/real_lenses`` are representative (docs/presets.md gives the measurements).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["PRESETS", "SimulatorConfig", "load_config", "preset", "run_provenance", "to_toml"]


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """Pixel grid, PSF and noise of a simulated instrument.

    Attributes:
        name: Preset or user label, written into outputs.
        n_pix: Image side length in pixels (square images ``n_pix x n_pix``).
        pixel_scale_arcsec: Pixel side in arcsec.
        upsample_factor: Sub-pixel supersampling per axis; the PSF convolution happens at
            the supersampled resolution (caustics' scheme, lenstronomy's
            ``supersampling_convolution=True``).
        psf_fwhm_arcsec: FWHM of the Gaussian PSF used when no pixel kernel is given.
            0 means no PSF.
        psf_truncation: Gaussian kernel half-width in units of sigma.
        background_rms: Gaussian background noise per pixel, in image units
            (ct/s per pixel).
        exposure_time_s: Exposure time for the Poisson term; the per-pixel variance is
            ``background_rms**2 + max(model, 0) / exposure_time_s``. ``inf`` disables it.
    """

    name: str = "custom"
    n_pix: int = 100
    pixel_scale_arcsec: float = 0.05
    upsample_factor: int = 2
    psf_fwhm_arcsec: float = 0.09
    psf_truncation: float = 4.0
    background_rms: float = 0.006
    exposure_time_s: float = 1000.0

    def __post_init__(self) -> None:
        checks = {
            "n_pix": self.n_pix >= 4,
            "pixel_scale_arcsec": self.pixel_scale_arcsec > 0,
            "upsample_factor": self.upsample_factor >= 1,
            "psf_fwhm_arcsec": self.psf_fwhm_arcsec >= 0,
            "psf_truncation": self.psf_truncation > 0,
            "background_rms": self.background_rms >= 0,
            "exposure_time_s": self.exposure_time_s > 0,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"SimulatorConfig.{field}={getattr(self, field)!r} is invalid")
        if self.background_rms == 0 and math.isinf(self.exposure_time_s):
            raise ValueError(
                "SimulatorConfig: background_rms=0 and no Poisson term means "
                "zero noise; the likelihood would be undefined"
            )

    @property
    def fov_arcsec(self) -> float:
        """Field of view (side) in arcsec."""
        return self.n_pix * self.pixel_scale_arcsec


#: Instrument presets. See docs/presets.md for how they were chosen.
PRESETS: dict[str, SimulatorConfig] = {
    # HST ACS/WFC3-UVIS drizzled to 0.05"/px; optical PSF FWHM ~0.09" (the HST PSFs in
    # shared/ fit 0.05-0.10"); noise 0.002-0.0096 ct/s/px (median 0.006), ~1000 s exposures.
    "hst": SimulatorConfig(
        name="hst",
        n_pix=100,
        pixel_scale_arcsec=0.05,
        upsample_factor=2,
        psf_fwhm_arcsec=0.09,
        background_rms=0.006,
        exposure_time_s=1000.0,
    ),
    # Euclid VIS MER mosaics at 0.1"/px; the Q1 VIS PSFs in shared/ fit Gaussians of FWHM
    # 0.18-0.22"; RMS maps 0.0036-0.0044 per pixel; 4 x 560 s dithers.
    "euclid": SimulatorConfig(
        name="euclid",
        n_pix=64,
        pixel_scale_arcsec=0.1,
        upsample_factor=2,
        psf_fwhm_arcsec=0.20,
        background_rms=0.004,
        exposure_time_s=2240.0,
    ),
}


def preset(name: str) -> SimulatorConfig:
    """Look up an instrument preset.

    Args:
        name: ``"hst"`` or ``"euclid"``.

    Returns:
        The preset's simulator configuration.

    Raises:
        ValueError: For an unknown name (the message lists the presets).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


T = TypeVar("T")


def _build(cls: type[T], values: dict[str, Any], where: str) -> T:
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**values)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML file of stage configurations.

    The ``[simulator]`` table may start from a preset (``preset = "hst"``) and override any
    field.

    Args:
        path: Path to a TOML file.

    Returns:
        Mapping from stage name (``"simulator"``) to its frozen configuration.

    Raises:
        ValueError: On unknown tables or keys, naming the file.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: cannot read config: {err}") from None
    stages = {"simulator": SimulatorConfig}
    unknown = sorted(set(raw) - set(stages))
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {unknown}; known: {sorted(stages)}")
    out: dict[str, Any] = {}
    sim = dict(raw.get("simulator", {}))
    base = preset(sim.pop("preset")) if "preset" in sim else SimulatorConfig()
    out["simulator"] = _build(
        SimulatorConfig, {**dataclasses.asdict(base), **sim}, f"{path} [simulator]"
    )
    return out


def to_toml(configs: dict[str, Any]) -> str:
    """Serialize stage configurations to TOML (the resolved config written next to outputs).

    Args:
        configs: Mapping from stage name to a frozen dataclass.

    Returns:
        TOML text that :func:`load_config` reads back to equal configurations.
    """
    lines = []
    for stage, cfg in configs.items():
        lines.append(f"[{stage}]")
        for key, value in dataclasses.asdict(cfg).items():
            if isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            elif isinstance(value, bool):
                lines.append(f"{key} = {str(value).lower()}")
            elif isinstance(value, float) and math.isinf(value):
                lines.append(f"{key} = {'inf' if value > 0 else '-inf'}")
            else:
                lines.append(f"{key} = {value!r}")
        lines.append("")
    return "\n".join(lines)


def run_provenance(seed: int | None, configs: dict[str, Any]) -> dict[str, Any]:
    """What every run writes next to its outputs to be reproducible.

    Args:
        seed: The run's seed (``None`` if unseeded).
        configs: Mapping from stage name to its frozen configuration.

    Returns:
        JSON-serializable mapping: lensflow version, git SHA of the source tree (or
        ``None`` outside a git checkout), seed, torch version, UTC time and the configs.
    """
    import datetime
    import subprocess

    import torch

    from lensflow import __version__

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "lensflow_version": __version__,
        "git_sha": sha,
        "seed": seed,
        "torch_version": torch.__version__,
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # JSON has no inf: non-finite floats are written as strings ("inf").
        "config": {
            stage: {
                k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in dataclasses.asdict(cfg).items()
            }
            for stage, cfg in configs.items()
        },
    }
