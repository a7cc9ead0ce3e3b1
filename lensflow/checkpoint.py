"""Trained posteriors on disk: safetensors weights plus a JSON sidecar, and the model builder.

A model is two files with one stem: ``<stem>.safetensors`` (the vector field's weights, no
pickles) and ``<stem>.json`` (everything needed to rebuild and to trust it: simulator,
data and flow configs, registry names, normalization statistics, lensflow version, git
SHA, training steps, device and wall time). :func:`load_model` rebuilds the network from
the sidecar and refuses a checkpoint made for another registry, another preset or another
lensflow release series with a one-line ``CheckpointError``.

Compatibility rule for the version: below 1.0 the minor version is the breaking one, so
``0.1.x`` loads ``0.1.y`` but not ``0.2.z``; from 1.0 on, the major version.

Shipped models live in ``lensflow/models/<preset>.safetensors`` and are loaded by preset
name (``load_model("euclid")``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from lensflow import __version__
from lensflow.config import DataConfig, FlowConfig, SimulatorConfig
from lensflow.data import N_CHANNELS
from lensflow.flow import FlowPosterior, VectorField
from lensflow.nn import ImageEncoder
from lensflow.params import NAMES, REGISTRY, UnconstrainedTransform, unconstrained_stats

__all__ = [
    "CheckpointError",
    "TrainedPosterior",
    "build_posterior",
    "load_model",
    "model_path",
    "save_model",
]

FORMAT = "lensflow-posterior/1"
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or incompatible (one line, naming the file)."""


@dataclass(frozen=True, eq=False)
class TrainedPosterior:
    """A posterior network with the configurations it was trained under.

    Attributes:
        posterior: The flow posterior (``sample``, ``log_prob``), physical units.
        simulator: Pixel grid of the training images (the field of view to cut data to).
        data: PSF and noise ranges of training; ``data.reference_rms`` scales the input.
        flow: Network and sampling hyper-parameters.
        meta: The JSON sidecar (provenance, training record); empty for a fresh model.
    """

    posterior: FlowPosterior
    simulator: SimulatorConfig
    data: DataConfig
    flow: FlowConfig
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def build_posterior(flow: FlowConfig) -> FlowPosterior:
    """A fresh (untrained) posterior: ``VectorField(ImageEncoder)`` in the unconstrained space.

    Args:
        flow: Network and sampling hyper-parameters.

    Returns:
        The posterior, float32 on CPU, initialized from the global torch RNG.

    Example:
        >>> posterior = build_posterior(FlowConfig(base_channels=4, n_stages=2, width=16,
        ...                                        n_blocks=1, embed_dim=8))
        >>> posterior.field.dim
        21
    """
    encoder = ImageEncoder(N_CHANNELS, flow.embed_dim, base_channels=flow.base_channels,
                           n_stages=flow.n_stages)  # fmt: skip
    field = VectorField(len(NAMES), encoder, flow.embed_dim, width=flow.width,
                        n_blocks=flow.n_blocks, time_dim=flow.time_dim)  # fmt: skip
    return FlowPosterior(field, UnconstrainedTransform(REGISTRY), n_steps=flow.n_steps,
                         solver=flow.solver)  # fmt: skip


def _jsonable(cfg: object) -> dict[str, Any]:
    # JSON has no inf: non-finite floats are written as strings ("inf").
    return {
        k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
        for k, v in dataclasses.asdict(cfg).items()
    }


def _from_json(cls: type[T], values: dict[str, Any]) -> T:
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    out = {k: float(v) if v in ("inf", "-inf") else v for k, v in values.items()}
    unknown = sorted(set(out) - fields)
    if unknown:
        raise CheckpointError(f"unknown {cls.__name__} keys {unknown}")
    return cls(**out)


def _series(version: str) -> tuple[int, ...]:
    major, minor = (int(p) for p in version.split(".")[:2])
    return (major, minor) if major == 0 else (major,)


def save_model(
    stem: str | Path,
    model: TrainedPosterior,
    *,
    training: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json``.

    Args:
        stem: Path without suffix (``models/euclid``).
        model: The posterior and its configurations.
        training: Training record (steps, wall time, device, command, ...), stored as is.
        provenance: Extra provenance (``config.run_provenance``), stored as is.

    Returns:
        The path of the JSON sidecar.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    field = model.posterior.field
    weights = {k: v.detach().cpu().contiguous() for k, v in field.state_dict().items()}
    save_file(weights, str(stem.with_suffix(".safetensors")), metadata={"format": FORMAT})
    loc, scale = unconstrained_stats(REGISTRY)
    sidecar = {
        "format": FORMAT,
        "lensflow_version": __version__,
        "names": list(NAMES),
        "units": [p.unit for p in REGISTRY],
        "simulator": _jsonable(model.simulator),
        "data": _jsonable(model.data),
        "flow": _jsonable(model.flow),
        "normalization": {
            "u_loc": loc.tolist(),
            "u_scale": scale.tolist(),
            "reference_rms": model.data.reference_rms,
            "input_channels": [
                "asinh(image/median_sigma)",
                "log(sigma/reference_rms)",
                "mask",
                "psf_fwhm_pix/2",
            ],
        },
        "n_parameters": sum(p.numel() for p in field.parameters()),
        "training": training or {},
        "provenance": provenance or {},
    }
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(sidecar, indent=2) + "\n")
    return path


def model_path(model: str | Path) -> Path:
    """Resolve a shipped preset name or a path to a model's JSON sidecar.

    Args:
        model: ``"euclid"``/``"hst"`` (shipped), or a path with or without suffix.

    Returns:
        Path of the JSON sidecar.

    Raises:
        CheckpointError: If no such model exists.
    """
    text = str(model)
    if "/" not in text and "." not in text and not Path(text).exists():
        shipped = Path(str(resources.files("lensflow") / "models" / f"{text}.json"))
        if not shipped.is_file():
            raise CheckpointError(
                f"no shipped model for {text!r}; shipped: "
                f"{', '.join(sorted(_shipped())) or 'none'} (or pass a checkpoint path)"
            )
        return shipped
    path = Path(text)
    if path.is_dir():
        path = path / "model.json"
    path = path.with_suffix(".json") if path.suffix in ("", ".safetensors") else path
    if not path.is_file():
        raise CheckpointError(f"{path}: model sidecar not found")
    return path


def _shipped() -> list[str]:
    folder = Path(str(resources.files("lensflow") / "models"))
    return [p.stem for p in folder.glob("*.json")] if folder.is_dir() else []


def load_model(
    model: str | Path,
    *,
    expected_simulator: SimulatorConfig | None = None,
    device: torch.device | str = "cpu",
) -> TrainedPosterior:
    """Load a model, checking that it fits this lensflow and, optionally, an instrument.

    Args:
        model: Shipped preset name or checkpoint path (see :func:`model_path`).
        expected_simulator: If given, the checkpoint's pixel grid (name, ``n_pix``,
            ``pixel_scale_arcsec``, ``upsample_factor``) must match it.
        device: Device of the returned network (in eval mode).

    Returns:
        The posterior and its configurations.

    Raises:
        CheckpointError: On a missing or unreadable file, another format, registry,
            normalization, lensflow release series or instrument; the message names the
            file and the mismatch.
    """
    path = model_path(model)
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable sidecar ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if tuple(meta.get("names", ())) != NAMES:
        raise CheckpointError(
            f"{path}: trained for parameters {meta.get('names')}, but this lensflow's registry "
            f"is {list(NAMES)}"
        )
    if _series(meta["lensflow_version"]) != _series(__version__):
        raise CheckpointError(
            f"{path}: written by lensflow {meta['lensflow_version']}, incompatible with "
            f"{__version__}; retrain or use a matching lensflow"
        )
    try:
        sim = _from_json(SimulatorConfig, meta["simulator"])
        data = _from_json(DataConfig, meta["data"])
        flow = _from_json(FlowConfig, meta["flow"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad configuration in sidecar ({err})") from None
    loc, scale = unconstrained_stats(REGISTRY)
    norm = meta.get("normalization", {})
    if not (
        torch.allclose(torch.tensor(norm.get("u_loc", []), dtype=torch.float64), loc)
        and torch.allclose(torch.tensor(norm.get("u_scale", []), dtype=torch.float64), scale)
    ):
        raise CheckpointError(f"{path}: parameter normalization differs from this registry's")
    if expected_simulator is not None:
        for key in ("name", "n_pix", "pixel_scale_arcsec", "upsample_factor"):
            have, want = getattr(sim, key), getattr(expected_simulator, key)
            if have != want:
                raise CheckpointError(
                    f"{path}: trained for simulator {key}={have!r}, but {want!r} was requested"
                )
    posterior = build_posterior(flow)
    weights_path = path.with_suffix(".safetensors")
    try:
        weights = load_file(str(weights_path))
    except Exception as err:  # noqa: BLE001 - safetensors raises several error types
        raise CheckpointError(f"{weights_path}: unreadable weights ({err})") from None
    try:
        posterior.field.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[:2]
        raise CheckpointError(
            f"{weights_path}: weights do not fit the network of the sidecar ({' '.join(first)})"
        ) from None
    posterior.to(device).eval()
    return TrainedPosterior(posterior, sim, data, flow, meta)
