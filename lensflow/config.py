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

__all__ = [
    "DATA_PRESETS",
    "PRESETS",
    "DataConfig",
    "FlowConfig",
    "SampleConfig",
    "SimulatorConfig",
    "TrainConfig",
    "data_preset",
    "load_config",
    "preset",
    "run_provenance",
    "to_toml",
]


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


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Ranges of seeing and depth that simulated training pairs are drawn from.

    Each example draws its PSF FWHM uniformly from a grid of ``n_psf_grid`` values spanning
    ``[psf_fwhm_min_arcsec, psf_fwhm_max_arcsec]`` (one simulator per grid value: the
    caustics PSF is fixed at construction), and its background RMS and exposure time
    log-uniformly from their ranges. Defaults are the ``euclid`` preset's ranges.

    Attributes:
        psf_fwhm_min_arcsec: Smallest Gaussian PSF FWHM, arcsec.
        psf_fwhm_max_arcsec: Largest Gaussian PSF FWHM, arcsec.
        n_psf_grid: Number of FWHM grid values (1 uses ``psf_fwhm_min_arcsec`` only).
        background_rms_min: Smallest background RMS per pixel, image units.
        background_rms_max: Largest background RMS per pixel, image units.
        exposure_time_min_s: Shortest exposure for the Poisson term, s.
        exposure_time_max_s: Longest exposure for the Poisson term, s.
        mask_probability: Fraction of examples that get a random likelihood mask
            (``data.random_masks``: up to three discs, as for neighbours and stars, plus
            scattered bad pixels), so the model learns to handle masked cutouts; 0 keeps
            every pixel (and the random stream of models trained before masks existed).
        mask_max_fraction: Largest masked fraction of an image's pixels (discs and bad pixels).
        normalize_flux: Express every example in flux units where its noise scale
            (``data.noise_scale``: the 10th percentile of sigma) is ``reference_rms``:
            image, sigma and background RMS times ``k = reference_rms / noise_scale``, the
            flux parameters
            (``params.FLUX_NAMES``) times ``k``, the exposure time divided by ``k`` (the same
            noise model). A model trained so is exactly independent of a cutout's flux
            units, and sampling normalizes each observation the same way
            (``data.flux_factor``). False (the models shipped so far) keeps absolute units.
        prior: The training prior, a name of ``prior.TRAINING_PRIORS``: ``"default"`` (the
            registry's; the models shipped so far) or ``"broad"`` (``prior.broad_specs``,
            which covers the real reference lenses). It also sets the standardization of
            the parameters the network sees (``params.UnconstrainedTransform``).
    """

    psf_fwhm_min_arcsec: float = 0.16
    psf_fwhm_max_arcsec: float = 0.24
    n_psf_grid: int = 5
    background_rms_min: float = 0.003
    background_rms_max: float = 0.005
    exposure_time_min_s: float = 1500.0
    exposure_time_max_s: float = 3000.0
    mask_probability: float = 0.0
    mask_max_fraction: float = 0.15
    normalize_flux: bool = False
    prior: str = "default"

    def __post_init__(self) -> None:
        from lensflow.prior import TRAINING_PRIORS  # config itself imports no lensflow module

        if self.prior not in TRAINING_PRIORS:
            raise ValueError(
                f"DataConfig.prior={self.prior!r} is invalid; choose {' or '.join(TRAINING_PRIORS)}"
            )
        checks = {
            "mask_probability": 0.0 <= self.mask_probability <= 1.0,
            "mask_max_fraction": 0.0 < self.mask_max_fraction < 1.0,
            "psf_fwhm_min_arcsec": 0 < self.psf_fwhm_min_arcsec <= self.psf_fwhm_max_arcsec,
            "n_psf_grid": self.n_psf_grid >= 1,
            "background_rms_min": 0 < self.background_rms_min <= self.background_rms_max,
            "exposure_time_min_s": 0 < self.exposure_time_min_s <= self.exposure_time_max_s,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"DataConfig.{field}={getattr(self, field)!r} is invalid")

    @property
    def reference_rms(self) -> float:
        """Geometric mean of the RMS range: the noise scale of the network input."""
        return math.sqrt(self.background_rms_min * self.background_rms_max)


#: Training ranges per preset (docs/training.md): they bracket the real cutouts measured in
#: docs/presets.md.
DATA_PRESETS: dict[str, DataConfig] = {
    "hst": DataConfig(
        psf_fwhm_min_arcsec=0.05,
        psf_fwhm_max_arcsec=0.12,
        n_psf_grid=8,
        background_rms_min=0.002,
        background_rms_max=0.01,
        exposure_time_min_s=500.0,
        exposure_time_max_s=2000.0,
    ),
    "euclid": DataConfig(),
}


def data_preset(name: str) -> DataConfig:
    """Training ranges of a preset (a custom simulator name gets the ``DataConfig`` defaults).

    Args:
        name: ``"hst"``, ``"euclid"`` or any other label.

    Returns:
        The data configuration.
    """
    return DATA_PRESETS.get(name, DataConfig())


@dataclass(frozen=True, kw_only=True)
class FlowConfig:
    """Network and path of the flow-matching posterior (``checkpoint.build_posterior``).

    Attributes:
        embed_dim: Image embedding size.
        base_channels: Channels of the encoder's first stage.
        n_stages: Encoder resolution stages.
        width: Residual MLP width.
        n_blocks: Residual MLP blocks.
        time_dim: Sinusoidal time embedding size.
        sigma_min: Width of the OT path at t = 1.
        alpha: Time warp exponent (0 = uniform; larger trains more near t = 1).
        n_steps: Default ODE steps when sampling.
        solver: Default ODE solver (``euler``, ``midpoint``, ``heun``, ``rk4``).
    """

    embed_dim: int = 128
    base_channels: int = 16
    n_stages: int = 4
    width: int = 256
    n_blocks: int = 3
    time_dim: int = 64
    sigma_min: float = 1e-4
    alpha: float = 0.0
    n_steps: int = 32
    solver: str = "midpoint"

    def __post_init__(self) -> None:
        for field in ("embed_dim", "base_channels", "n_stages", "width", "n_blocks", "n_steps"):
            if getattr(self, field) < 1:
                raise ValueError(f"FlowConfig.{field}={getattr(self, field)!r} must be >= 1")
        if self.time_dim < 2 or self.time_dim % 2:
            raise ValueError(f"FlowConfig.time_dim={self.time_dim!r} must be even and >= 2")
        if not 0 <= self.sigma_min < 1 or self.alpha < 0:
            raise ValueError(f"FlowConfig: sigma_min={self.sigma_min!r}, alpha={self.alpha!r}")
        if self.solver not in ("euler", "midpoint", "heun", "rk4"):
            raise ValueError(f"FlowConfig.solver={self.solver!r} is unknown")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimization of the base flow (``train.fit``).

    Attributes:
        n_steps: Optimizer steps (the learning-rate schedule spans them).
        batch_size: Examples per step (per process under DDP).
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warmup steps before the cosine decay to 0.
        grad_clip: Maximum global gradient norm.
        ema_decay: Decay of the exponential moving average of the weights.
        val_every: Steps between validation losses (and at the end).
        n_val: Size of the fixed held-out validation set.
        checkpoint_every: Steps between resumable checkpoints (and at the end).
        seed: Seed of initialization, data and loss noise.
        time_limit_s: Optional wall-clock budget in seconds (a GPU lease, a batch-queue
            slot). The cosine schedule then follows whichever of ``step / n_steps`` and
            ``elapsed / time_limit_s`` is further along, and training stops when either
            reaches 1, so a time-limited run still ends with a decayed learning rate. Its
            step count depends on the hardware, so it is not reproducible bit for bit.
        times_per_example: ``(t, z)`` draws per simulated example, sharing one image
            embedding (``flow.FlowMatchingLoss``).
    """

    n_steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    val_every: int = 200
    n_val: int = 256
    checkpoint_every: int = 500
    seed: int = 0
    time_limit_s: float | None = None
    times_per_example: int = 1

    def __post_init__(self) -> None:
        checks = {
            "n_steps": self.n_steps >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_steps": self.warmup_steps >= 0,
            "grad_clip": self.grad_clip > 0,
            "ema_decay": 0 <= self.ema_decay < 1,
            "val_every": self.val_every >= 1,
            "n_val": self.n_val >= 1,
            "checkpoint_every": self.checkpoint_every >= 1,
            "time_limit_s": self.time_limit_s is None or self.time_limit_s > 0,
            "times_per_example": self.times_per_example >= 1,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{field}={getattr(self, field)!r} is invalid")


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    """Posterior sampling (``sampling.sample_posterior``).

    Attributes:
        n_samples: Posterior samples per observation.
        n_steps: ODE steps.
        solver: ODE solver name.
        seed: Seed of the base noise.
    """

    n_samples: int = 1000
    n_steps: int = 32
    solver: str = "midpoint"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.n_steps < 1:
            raise ValueError(
                f"SampleConfig: n_samples={self.n_samples!r}, n_steps={self.n_steps!r} "
                "must be >= 1"
            )


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
        Mapping from stage name (``"simulator"``, and ``"data"``, ``"flow"``, ``"train"``,
        ``"sample"`` when the file has those tables) to its frozen configuration.

    Raises:
        ValueError: On unknown tables or keys, naming the file.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: cannot read config: {err}") from None
    stages = {
        "simulator": SimulatorConfig,
        "data": DataConfig,
        "flow": FlowConfig,
        "train": TrainConfig,
        "sample": SampleConfig,
    }
    unknown = sorted(set(raw) - set(stages))
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {unknown}; known: {sorted(stages)}")
    out: dict[str, Any] = {}
    sim = dict(raw.get("simulator", {}))
    base = preset(sim.pop("preset")) if "preset" in sim else SimulatorConfig()
    out["simulator"] = _build(
        SimulatorConfig, {**dataclasses.asdict(base), **sim}, f"{path} [simulator]"
    )
    # The other stages appear only when the file has their table; [data] may start from a
    # preset's training ranges like [simulator] does.
    for stage in ("data", "flow", "train", "sample"):
        if stage in raw:
            values = dict(raw[stage])
            base_values = {}
            if stage == "data" and "preset" in values:
                base_values = dataclasses.asdict(data_preset(str(values.pop("preset"))))
            out[stage] = _build(stages[stage], {**base_values, **values}, f"{path} [{stage}]")
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
            if value is None:  # TOML has no null: an absent key reads back as the default
                lines.append(f"# {key} = (none)")
            elif isinstance(value, str):
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
