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

Control networks (simulator feedback, ``lensflow.feedback``) are checkpointed the same way,
next to the base model they belong to: ``<base stem>-<signal>.safetensors/.json``, e.g.
``lensflow/models/euclid-gradient.*`` for the shipped euclid model or ``run/model-learned.*``
beside ``run/model.json``. The sidecar records the base (name or path and the SHA-256 of its
weights, checked on load), the preset, the signal kind, the finetuning config, the parameter
count, the training record and a status. :func:`available_feedback` lists the control nets of
a model and :func:`load_control` loads one as a :class:`TrainedControl`, which builds the
controlled posterior for given (cut) observations: the feedback cost depends on each
observation's PSF, noise map, mask and pixel grid.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from lensflow import __version__
from lensflow.config import DataConfig, FlowConfig, SimulatorConfig
from lensflow.data import N_CHANNELS
from lensflow.feedback import (
    SIGNAL_KINDS,
    ControlledPosterior,
    ControlNet,
    FinetuneConfig,
    ObservedData,
    lens_cost,
    make_signal,
    weights_hash,
)
from lensflow.feedback import save_control as _save_control_files
from lensflow.flow import FlowPosterior, VectorField
from lensflow.nn import ImageEncoder
from lensflow.params import NAMES, REGISTRY, ParamSpec, UnconstrainedTransform, unconstrained_stats
from lensflow.prior import prior_specs

if TYPE_CHECKING:
    from lensflow.observation import Observation

__all__ = [
    "CheckpointError",
    "TrainedControl",
    "TrainedPosterior",
    "available_feedback",
    "build_posterior",
    "control_path",
    "load_control",
    "load_model",
    "model_path",
    "save_control",
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
        path: The JSON sidecar it was loaded from (``None`` for a fresh model); control
            networks are looked up beside it.
    """

    posterior: FlowPosterior
    simulator: SimulatorConfig
    data: DataConfig
    flow: FlowConfig
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    path: Path | None = None

    @property
    def prior_specs(self) -> tuple[ParamSpec, ...]:
        """The registry with the model's training prior (``data.prior``)."""
        return prior_specs(self.data.prior)


def build_posterior(flow: FlowConfig, prior: str = "default") -> FlowPosterior:
    """A fresh (untrained) posterior: ``VectorField(ImageEncoder)`` in the unconstrained space.

    Args:
        flow: Network and sampling hyper-parameters.
        prior: The training prior's name (``DataConfig.prior``): the parameters are
            standardized with its statistics.

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
    return FlowPosterior(field, UnconstrainedTransform(prior_specs(prior)), n_steps=flow.n_steps,
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

    Raises:
        ValueError: If the posterior standardizes its parameters for another prior than
            ``model.data.prior`` (``build_posterior(flow, data.prior)`` builds a match).
    """
    specs, transform = model.prior_specs, model.posterior.transform
    if isinstance(transform, UnconstrainedTransform) and transform.specs != specs:
        raise ValueError(f"the posterior was built for another prior than data.prior="
                         f"{model.data.prior!r}; use build_posterior(flow, data.prior)")  # fmt: skip
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    field = model.posterior.field
    weights = {k: v.detach().cpu().contiguous() for k, v in field.state_dict().items()}
    save_file(weights, str(stem.with_suffix(".safetensors")), metadata={"format": FORMAT})
    loc, scale = unconstrained_stats(specs)
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
    controls = tuple(f"-{kind}" for kind in SIGNAL_KINDS)  # control nets beside the models
    if not folder.is_dir():
        return []
    return [p.stem for p in folder.glob("*.json") if not p.stem.endswith(controls)]


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
    loc, scale = unconstrained_stats(prior_specs(data.prior))
    norm = meta.get("normalization", {})
    if not (
        torch.allclose(torch.tensor(norm.get("u_loc", []), dtype=torch.float64), loc)
        and torch.allclose(torch.tensor(norm.get("u_scale", []), dtype=torch.float64), scale)
    ):
        raise CheckpointError(
            f"{path}: parameter normalization differs from this registry's {data.prior!r} prior"
        )
    if expected_simulator is not None:
        for key in ("name", "n_pix", "pixel_scale_arcsec", "upsample_factor"):
            have, want = getattr(sim, key), getattr(expected_simulator, key)
            if have != want:
                raise CheckpointError(
                    f"{path}: trained for simulator {key}={have!r}, but {want!r} was requested"
                )
    posterior = build_posterior(flow, data.prior)
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
    return TrainedPosterior(posterior, sim, data, flow, meta, path)


# --------------------------------------------------------------------------- control networks

CONTROL_FORMAT = "lensflow-control"


def _models_dir() -> Path:
    return Path(str(resources.files("lensflow") / "models"))


def _base_ref(model: TrainedPosterior) -> str | None:
    """The shipped name of the model (``"euclid"``) or its sidecar path."""
    if model.path is None:
        return None
    path = Path(model.path).resolve()
    return path.stem if path.parent == _models_dir().resolve() else str(path)


def control_path(model: TrainedPosterior, kind: str) -> Path:
    """Where the ``kind`` control net of ``model`` lives: ``<base stem>-<kind>.json`` beside it.

    Args:
        model: A loaded model (``load_model``; a fresh model has no location).
        kind: ``"gradient"``, ``"learned"`` or ``"zero"``.

    Returns:
        The JSON sidecar path (it may not exist).

    Raises:
        CheckpointError: If ``model`` was not loaded from disk or ``kind`` is unknown.
    """
    if kind not in SIGNAL_KINDS:
        raise CheckpointError(f"unknown control signal {kind!r}; choose from {SIGNAL_KINDS}")
    if model.path is None:
        raise CheckpointError("this model was not loaded from disk; pass a control net path")
    path = Path(model.path)
    return path.with_name(f"{path.stem}-{kind}.json")


def _read_control_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable control sidecar ({err})") from None
    if meta.get("format") != CONTROL_FORMAT or meta.get("signal_kind") not in SIGNAL_KINDS:
        raise CheckpointError(f"{path}: not a lensflow lens control checkpoint")
    return meta


def available_feedback(model: TrainedPosterior) -> tuple[str, ...]:
    """The control nets that exist for ``model`` (shipped or beside its checkpoint).

    Only control nets trained on exactly these base weights count (the SHA-256 in their
    sidecar matches).

    Args:
        model: A loaded model.

    Returns:
        Signal kinds in ``("gradient", "learned", "zero")`` order, e.g.
        ``("gradient", "learned")``; empty for a fresh model or when none exist.
    """
    if model.path is None:
        return ()
    found, digest = [], None
    for kind in SIGNAL_KINDS:
        path = control_path(model, kind)
        if not path.is_file():
            continue
        try:
            meta = _read_control_meta(path)
        except CheckpointError:
            continue
        digest = digest or weights_hash(model.posterior)
        if meta.get("base_sha256") == digest:
            found.append(kind)
    return tuple(found)


@dataclass(frozen=True, eq=False)
class TrainedControl:
    """A finetuned control network with what it needs to sample observations with feedback.

    Attributes:
        kind: Signal kind, ``"gradient"``, ``"learned"`` or ``"zero"``.
        control: The control network (eval mode, on the model's device).
        encoder: The residual encoder of a learned signal, else ``None``.
        model: The base model it belongs to (its weights were checked).
        t_start: Control acts for ``t > t_start``.
        n_steps: Default solver steps over ``[0, 1]``.
        solver: Default solver name.
        meta: The JSON sidecar.
        path: The JSON sidecar's path.
        chunk_size: Rows per signal evaluation when sampling; ``None``: 1,024 on the CPU,
            on a GPU the memory bound of one differentiated simulator call
            (``GaussianCost.max_rows``, thousands of rows: a GPU needs large calls to keep
            busy, and the learned signal's residuals stay within the same memory).
        control_steps: Default solver steps on ``[t_start, 1]`` (``None``: the share of
            ``n_steps``; see ``feedback.sample_feedback``).
        base_solver: Default solver on ``[0, t_start]`` (``None``: ``solver``).
    """

    kind: str
    control: ControlNet
    encoder: torch.nn.Module | None
    model: TrainedPosterior
    t_start: float
    n_steps: int
    solver: str
    meta: dict[str, Any]
    path: Path | None = None
    chunk_size: int | None = None
    control_steps: int | None = None
    base_solver: str | None = None

    @property
    def n_parameters(self) -> int:
        """Trainable parameters of control net and encoder."""
        mods = [self.control] + ([self.encoder] if self.encoder is not None else [])
        return sum(p.numel() for m in mods for p in m.parameters())

    def posterior(
        self, observations: Sequence[Observation], *, compile: bool = False
    ) -> tuple[ControlledPosterior, ObservedData]:
        """The controlled posterior for these observations, and their data rows.

        The feedback simulator is built from each observation (``feedback.lens_cost``): its
        pixel grid, PSF kernel, noise map and mask, so masked pixels are ignored.

        Args:
            observations: Observations cut to the model's field of view
                (``cutouts.cut_to_fov``), in the model's dtype and device.
            compile: Render the feedback through ``torch.compile`` (``feedback.lens_cost``;
                the first call in a process compiles).

        Returns:
            The controlled posterior (sharing the base flow and control net, eval mode) and
            the ``ObservedData`` to pass to ``feedback.sample_feedback`` with their network
            input.
        """
        base = self.model.posterior
        cost, data = lens_cost(observations, self.model.simulator, base.transform,
                               compile=compile)  # fmt: skip
        signal = make_signal(self.kind, cost, base.field.dim, encoder=self.meta.get("encoder"))
        if self.encoder is not None:
            signal.encoder = self.encoder  # the trained one
        chunk = self.chunk_size
        if chunk is None:  # a GPU's rows by the memory bound of one differentiated call
            chunk = 1024 if next(base.parameters()).device.type == "cpu" else cost.max_rows
        controlled = ControlledPosterior(
            base, self.control, signal, t_start=self.t_start, n_steps=self.n_steps,
            solver=self.solver, chunk_size=chunk, control_steps=self.control_steps,
            base_solver=self.base_solver,
        )  # fmt: skip
        return controlled.eval(), data


def save_control(
    stem: str | Path,
    controlled: ControlledPosterior,
    model: TrainedPosterior,
    *,
    kind: str,
    finetune: FinetuneConfig,
    training: dict[str, Any] | None = None,
    status: str = "",
) -> Path:
    """Write a lens control net as ``<stem>.safetensors`` + ``<stem>.json``.

    Args:
        stem: Path without suffix; name it ``<base stem>-<kind>`` beside the base model so
            :func:`available_feedback` finds it.
        controlled: The finetuned posterior (``feedback.finetune_lens``).
        model: The base model it was finetuned on.
        kind: Signal kind.
        finetune: The finetuning settings.
        training: Training record (steps, wall time, device, command, losses).
        status: E.g. ``"provisional: CPU-trained"``.

    Returns:
        The path of the JSON sidecar.
    """
    from lensflow.feedback import LEARNED_ENCODER

    extra = {
        "signal_kind": kind,
        "preset": model.simulator.name,
        "base": _base_ref(model),
        "base_n_parameters": sum(p.numel() for p in model.posterior.field.parameters()),
        "encoder": dict(LEARNED_ENCODER) if kind == "learned" else None,
        "finetune": _jsonable(finetune),
        "training": training or {},
        "lensflow_version": __version__,
        "status": status,
    }
    base_path = None if model.path is None else str(model.path)
    _, meta_path = _save_control_files(stem, controlled, base_path=base_path, extra=extra)
    return meta_path


def load_control(name_or_path: str | Path, model: TrainedPosterior) -> TrainedControl:
    """Load the control net of ``model``: a signal kind (looked up beside it) or a path.

    Args:
        name_or_path: ``"gradient"``, ``"learned"`` or ``"zero"`` (the net beside the model,
            see :func:`control_path`), a shipped name (``"euclid-gradient"``), or a path
            (either file or their stem).
        model: The base model; its weights must be the ones the control was trained on.

    Returns:
        The control, on the model's device, in eval mode.

    Raises:
        CheckpointError: If it does not exist (naming the ones that do), is unreadable, was
            written by an incompatible lensflow, or belongs to other base weights.
    """
    text = str(name_or_path)
    if text in SIGNAL_KINDS:
        path = control_path(model, text)
        if not path.is_file():
            have = ", ".join(available_feedback(model)) or "none"
            raise CheckpointError(
                f"no {text} control net for model {_base_ref(model)} ({path.name} not found); "
                f"available: {have} (train one with lensflow finetune)"
            )
    else:
        path = Path(text)
        if not path.exists() and "/" not in text and (_models_dir() / f"{text}.json").is_file():
            path = _models_dir() / f"{text}.json"
        path = path.with_suffix(".json") if path.suffix in ("", ".safetensors") else path
        if not path.is_file():
            raise CheckpointError(f"{path}: control net sidecar not found")
    meta = _read_control_meta(path)
    if _series(meta.get("lensflow_version", "0.0")) != _series(__version__):
        raise CheckpointError(
            f"{path}: written by lensflow {meta.get('lensflow_version')}, incompatible with "
            f"{__version__}"
        )
    digest = weights_hash(model.posterior)
    if meta.get("base_sha256") != digest:
        raise CheckpointError(
            f"{path}: trained on base weights {str(meta.get('base_sha256'))[:12]} "
            f"({meta.get('base')}), but the model's are {digest[:12]}"
        )
    try:
        state = load_file(str(path.with_suffix(".safetensors")))
        control = ControlNet(meta["dim"], meta["signal_dim"], width=meta["width"],
                             n_blocks=meta["n_blocks"], time_dim=meta["time_dim"])  # fmt: skip
        control.load_state_dict(
            {k[8:]: v for k, v in state.items() if k.startswith("control.")}, strict=True
        )
        encoder = None
        if meta["signal_kind"] == "learned":
            encoder = make_signal("learned", None, meta["dim"], encoder=meta["encoder"]).encoder
            prefix = "signal.encoder."
            encoder.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
                strict=True,
            )
    except Exception as err:  # noqa: BLE001 - safetensors and torch raise several types
        first = " ".join(str(err).strip().splitlines()[:2])
        raise CheckpointError(f"{path}: unreadable control weights ({first})") from None
    ref = next(model.posterior.parameters())
    control = control.to(device=ref.device, dtype=ref.dtype).eval().requires_grad_(False)
    if encoder is not None:
        encoder = encoder.to(device=ref.device, dtype=ref.dtype).eval().requires_grad_(False)
    return TrainedControl(
        meta["signal_kind"], control, encoder, model, float(meta["t_start"]),
        int(meta["n_steps"]), str(meta["solver"]), meta, path,
        control_steps=meta.get("control_steps"),  # absent before 2026-11-26: the share
        base_solver=meta.get("base_solver"),  # absent before 2026-11-27: the solver's
    )  # fmt: skip
