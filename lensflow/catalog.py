"""Stage 7: catalog analysis: a table of observed lenses in, one results table out.

``read_catalog`` reads and validates a catalog (ECSV, FITS or CSV; one row per lens; format
in docs/catalog.md and catalogs/README.md). ``run_catalog`` fits every lens with
``fit.fit_lenses`` and writes, under ``OUT``:

* ``lenses/<id>/``: what ``fit.write_fit`` writes (samples, summary, figures, provenance)
  and, last, ``result.json`` (status, reason, summary row, diagnostics, timings). A lens is
  finished exactly when its ``result.json`` exists; every file is written to a temporary
  name and renamed, so a killed run never leaves a partial file that looks like a result.
* ``results.ecsv`` and ``results.fits``: the input columns plus ``status``, ``reason``,
  ``preset``, ``feedback``, ``seed``, ``wall_time_s``, the summary columns (units set) and
  the reliability diagnostics, in catalog order, rebuilt from the ``result.json`` files at
  the end (so a resumed run writes the same table as an uninterrupted one).
* ``run.json``: the settings that determine the results (``n``, ``feedback``, ``seed``,
  ``preset``, ``model``); a rerun with other settings into the same folder is refused.

Resuming: a rerun skips finished lenses (status ``ok`` with unchanged inputs), redoes
unfinished ones (their folders are cleared first) and retries ``failed`` ones. Batches are
fixed slices of the catalog (rows ``k B .. k B + B - 1``) and a batch holding any unfinished
lens is recomputed whole, so each lens's samples come from the same batched call as in an
uninterrupted run: the results agree bit for bit on the same machine. (Across batch sizes
they agree to float32 round-off only; batched kernels round differently.)

Per-lens seeds are ``lens_seed(seed, id)``: they depend on the run's seed and the lens id,
not on the row order, the batching or the worker.

Execution: observations are read in the calling process (so workers need no access to the
input files); each batch is one call of ``_fit_batch``, which fits, renders the per-lens
files into a temporary folder and returns them as bytes; the caller writes them into
``OUT``. Without a scheduler batches run in this process; ``scheduler="local"`` starts a
``dask.distributed.LocalCluster`` and any other string is the address of a running Dask
scheduler. Workers need only lensflow installed and load each model once per process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import astropy.units as u
import numpy as np
from astropy.table import MaskedColumn, Table
from astropy.utils.exceptions import AstropyWarning

from lensflow import __version__
from lensflow.config import PRESETS
from lensflow.observation import Observation, load_observation
from lensflow.params import REGISTRY
from lensflow.prior import PRIOR_CHOICES

if TYPE_CHECKING:
    from lensflow.fit import FitResult

__all__ = ["FEEDBACK_KINDS", "lens_seed", "read_catalog", "results_table", "run_catalog"]

#: Values of ``feedback`` (``auto``: the shipped control network when there is one).
FEEDBACK_KINDS = ("auto", "gradient", "learned", "none")
#: Catalog columns lensflow understands (any other column is carried through).
REQUIRED_COLUMNS = ("id", "image")
OPTIONAL_COLUMNS = ("noise", "weight", "psf", "mask", "pixel_scale", "ra", "dec", "center_x",
                    "center_y", "preset", "band", "z_lens", "z_source")  # fmt: skip
_PATH_COLUMNS = ("image", "noise", "weight", "psf", "mask")
_ID_RE = re.compile(r"^[A-Za-z0-9_.+\-]+$")
#: Diagnostics columns (``fit.Diagnostics`` fields; its ``reason`` is ``unreliable_reason``).
_DIAGNOSTICS = {"chi2_red_median": None, "chi2_red_samples": None, "residual_coherence": None,
                "psf_fwhm_arcsec": "arcsec", "noise_rms": None, "masked_fraction": None}  # fmt: skip
_SUMMARY_SUFFIXES = ("median", "p16", "p84", "p2p5", "p97p5")
_SUMMARY_COLUMNS = tuple(f"{p.name}_{s}" for p in REGISTRY for s in _SUMMARY_SUFFIXES)
_OUTPUT_COLUMNS = ("status", "reason", "feedback", "seed", "wall_time_s", "method",
                   "n_samples", *_SUMMARY_COLUMNS, *_DIAGNOSTICS, "reliable",
                   "unreliable_reason", "flow_reliable", "fallback", "fallback_converged",
                   "fallback_init")  # fmt: skip


# --- reading -------------------------------------------------------------------------------


def _cell(table: Table, row: int, name: str) -> Any:  # noqa: ANN401 - a table cell
    """A cell's value, or None when the column is absent, masked, empty or NaN."""
    if name not in table.colnames:
        return None
    value = table[name][row]
    if value is np.ma.masked or (np.ma.isMaskedArray(value) and value.mask):
        return None
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    return value.item() if hasattr(value, "item") else value


def _to_unit(table: Table, name: str, unit: u.Unit, where: str) -> None:
    """Convert a numeric column in place to ``unit`` (no unit: taken to be ``unit``)."""
    col = table[name]
    try:
        values = np.ma.asarray(col, dtype=np.float64)
        if col.unit is not None:
            values = np.ma.MaskedArray(
                u.Quantity(np.ma.getdata(values), col.unit).to_value(unit), np.ma.getmask(values)
            )
    except (u.UnitConversionError, u.UnitsError):
        raise ValueError(
            f"{where}: column {name}: unit {col.unit} is not convertible to {unit}"
        ) from None
    except (TypeError, ValueError):
        raise ValueError(f"{where}: column {name} is not numeric") from None
    unit = None if unit == u.dimensionless_unscaled else unit
    table[name] = MaskedColumn(values, unit=unit, description=col.description)


def read_catalog(path: str | Path) -> Table:
    """Read and validate a lens catalog.

    Required columns are ``id`` and ``image``; the optional ones are ``OPTIONAL_COLUMNS``
    (docs/catalog.md). Paths are relative to the catalog's folder. ``pixel_scale`` is
    converted to arcsec, ``ra``/``dec`` to deg and ``center_x``/``center_y`` to pixels
    (columns without units are taken to be in those units). Empty or masked cells mean "not
    given". Other columns are kept.

    Args:
        path: ECSV, FITS or CSV table.

    Returns:
        The table, with ``meta["catalog_path"]`` set to the resolved path.

    Raises:
        ValueError: For a missing or unreadable file, an empty table, a missing required
            column, a column whose name is reserved for the results, non-numeric or wrongly
            united numeric columns, a duplicate, empty or unsafe id, or an unknown preset;
            the message names the file and row.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: catalog not found")
    try:
        csv = path.suffix.lower() in (".csv", ".txt")
        table = Table.read(path, format="ascii.csv") if csv else Table.read(path)
    except Exception as err:  # noqa: BLE001 - astropy raises many types for bad tables
        raise ValueError(f"{path}: cannot read as a table (ECSV, FITS or CSV): {err}") from None
    _validate(table, str(path))
    table.meta["catalog_path"] = str(path.resolve())
    return table


def _validate(table: Table, path: str) -> None:
    """Check and normalize a catalog in place (``read_catalog``'s rules)."""
    if len(table) == 0:
        raise ValueError(f"{path}: the catalog has no rows")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.colnames]
    if missing:
        raise ValueError(
            f"{path}: missing required column(s) {', '.join(missing)}; found "
            f"{', '.join(table.colnames)} (docs/catalog.md lists the columns)"
        )
    reserved = [c for c in table.colnames if c in _OUTPUT_COLUMNS]
    if reserved:
        raise ValueError(
            f"{path}: column(s) {', '.join(reserved)} are reserved for the results; rename them"
        )
    for name, unit in (("pixel_scale", u.arcsec), ("ra", u.deg), ("dec", u.deg),
                       ("center_x", u.pix), ("center_y", u.pix),
                       ("z_lens", u.dimensionless_unscaled),
                       ("z_source", u.dimensionless_unscaled)):  # fmt: skip
        if name in table.colnames:
            _to_unit(table, name, unit, str(path))
    seen: dict[str, int] = {}
    for k in range(len(table)):
        lens_id = _cell(table, k, "id")
        lens_id = None if lens_id is None else str(lens_id)
        if lens_id is None or not _ID_RE.match(lens_id):
            raise ValueError(
                f"{path}: row {k}: id {lens_id!r} is not usable as a folder name "
                "(letters, digits, '_', '-', '.', '+' only)"
            )
        if lens_id in seen:
            raise ValueError(f"{path}: rows {seen[lens_id]} and {k} have the same id {lens_id!r}")
        seen[lens_id] = k
        preset = _cell(table, k, "preset")
        if preset is not None and preset != "auto" and preset not in PRESETS:
            raise ValueError(
                f"{path}: row {k} (id {lens_id}): unknown preset {preset!r}; "
                f"use auto or one of {', '.join(sorted(PRESETS))}"
            )
    table["id"] = [str(_cell(table, k, "id")) for k in range(len(table))]


def lens_seed(seed: int, lens_id: str) -> int:
    """The seed of one lens: a hash of the run's seed and the lens id, in ``[0, 2^31)``.

    Args:
        seed: The run's seed.
        lens_id: The lens id.

    Returns:
        The lens's seed, independent of row order, batching and worker.

    Example:
        >>> lens_seed(0, "demo_00") == lens_seed(0, "demo_00") != lens_seed(1, "demo_00")
        True
    """
    digest = hashlib.sha256(f"lensflow-catalog/{seed}/{lens_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# --- one lens: inputs, outcome --------------------------------------------------------------


@dataclass(frozen=True)
class _Lens:
    """A catalog row, resolved: its inputs (JSON-able) and the run settings for it."""

    id: str
    row: int
    inputs: dict[str, Any]
    preset: str
    seed: int


@dataclass(frozen=True)
class _Task:
    """A loaded lens shipped to a worker."""

    id: str
    observation: Observation
    preset: str
    seed: int
    center_pix: tuple[float, float] | None
    center_radec: tuple[float, float] | None


@dataclass(frozen=True)
class _Outcome:
    """What a worker returns for one lens: status, result record and the files as bytes."""

    id: str
    status: str
    reason: str
    record: dict[str, Any]
    files: dict[str, bytes]
    wall_time_s: float


def _lens_inputs(table: Table, k: int, base: Path, preset: str) -> dict[str, Any]:
    """The row's inputs as a JSON-able dict: resolved paths, scale, centre, preset, band."""
    inputs: dict[str, Any] = {}
    for name in _PATH_COLUMNS:
        value = _cell(table, k, name)
        inputs[name] = None if value is None else str((base / str(value)).resolve())
    for name in ("pixel_scale", "ra", "dec", "center_x", "center_y", "z_lens", "z_source"):
        value = _cell(table, k, name)
        inputs[name] = None if value is None else float(value)
    inputs["band"] = None if _cell(table, k, "band") is None else str(_cell(table, k, "band"))
    inputs["preset"] = str(_cell(table, k, "preset") or preset)
    return inputs


def _load_task(lens: _Lens) -> _Task:
    """Read a lens's observation and resolve its preset and centre (ValueError if bad)."""
    from lensflow.fit import resolve_preset

    i = lens.inputs
    if i["image"] is None:
        raise ValueError("the image cell is empty")
    if i["noise"] is not None and i["weight"] is not None:
        raise ValueError("give noise or weight, not both")
    with warnings.catch_warnings():
        # astropy's complaints about a broken file; the error that follows names the file.
        warnings.simplefilter("ignore", AstropyWarning)
        obs = load_observation(
            i["image"], noise=i["noise"], weight=i["weight"], psf=i["psf"], mask=i["mask"],
            pixel_scale_arcsec=i["pixel_scale"], band=i["band"], name=lens.id,
        )  # fmt: skip
    obs = dataclasses.replace(obs, z_lens=i["z_lens"], z_source=i["z_source"])
    pix = (i["center_x"], i["center_y"])
    radec = (i["ra"], i["dec"])
    for name, pair in (("center_x, center_y", pix), ("ra, dec", radec)):
        if (pair[0] is None) != (pair[1] is None):
            raise ValueError(f"only one of {name} is given")
    center_pix = None if pix[0] is None else pix
    # Pixel centres win over sky positions (a catalog may carry both).
    center_radec = None if center_pix is not None or radec[0] is None else radec
    preset = resolve_preset(obs, lens.preset)
    return _Task(lens.id, obs, preset, lens.seed, center_pix, center_radec)


def _failure(lens_id: str, err: BaseException, t0: float) -> _Outcome:
    """A failed lens; non-ValueError/OSError exceptions keep their type in the reason."""
    message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
    if not isinstance(err, ValueError | OSError | KeyError):
        message = f"{type(err).__name__}: {message}"
    message = " ".join(message.split())  # one line
    return _Outcome(lens_id, "failed", message, {}, {}, time.perf_counter() - t0)


def _record(result: FitResult) -> dict[str, Any]:
    """The JSON-able summary of a ``fit.FitResult`` kept in ``result.json``."""
    from lensflow.fit import summary_row

    summary = {
        k: float(v.value) if isinstance(v, u.Quantity) else float(v)
        for k, v in summary_row(result.samples).items()
    }
    diag = dataclasses.asdict(result.diagnostics)
    return {
        "preset": result.preset,
        "feedback": result.feedback,
        "method": result.samples.method,
        "n_samples": int(result.samples.theta.shape[0]),
        "summary": summary,
        "diagnostics": {k: diag[k] for k in _DIAGNOSTICS},
        "reliable": bool(diag["reliable"]),
        "unreliable_reason": diag["reason"],
        "timings_s": dict(result.timings),
        "fallback": result.fallback,
    }


def _render(result: FitResult, plots: bool) -> dict[str, bytes]:
    """``fit.write_fit`` into a temporary folder; the files as bytes (workers need no OUT)."""
    from lensflow.fit import write_fit

    with tempfile.TemporaryDirectory(prefix="lensflow-") as tmp:
        written = write_fit(result, tmp, plots=plots)
        return {p.name: p.read_bytes() for p in written.values()}


def _fit_batch(
    tasks: Sequence[_Task],
    *,
    n: int,
    feedback: str,
    model: str | None,
    device: str,
    plots: bool,
    fallback: str = "none",
    pad: bool = False,
    fallback_prior: str = "default",
    compile: bool = False,
    sampler: dict[str, Any] | None = None,
) -> list[_Outcome]:
    """Fit a batch in one ``fit_lenses`` call and render its files (the unit of work).

    A failing call is split in halves until the failing lens is alone, so one bad lens
    costs its batch a few extra calls and fails only itself.
    """
    from lensflow.fit import fit_lenses

    t0 = time.perf_counter()
    try:
        results = fit_lenses(
            [t.observation for t in tasks], preset=[t.preset for t in tasks], model=model,
            feedback=feedback, n=n, seeds=[t.seed for t in tasks],
            centers_pix=[t.center_pix for t in tasks],
            centers_radec=[t.center_radec for t in tasks],
            names=[t.id for t in tasks], device=device, fallback=fallback, pad=pad,
            fallback_prior=fallback_prior, compile=compile, **(sampler or {}),
        )  # fmt: skip
    except Exception as err:  # noqa: BLE001 - one bad lens must not stop the catalog
        if len(tasks) == 1:
            return [_failure(tasks[0].id, err, t0)]
        half = len(tasks) // 2
        kw = {"n": n, "feedback": feedback, "model": model, "device": device, "plots": plots,
              "fallback": fallback, "pad": pad, "fallback_prior": fallback_prior,
              "compile": compile, "sampler": sampler}  # fmt: skip
        return _fit_batch(tasks[:half], **kw) + _fit_batch(tasks[half:], **kw)
    share = (time.perf_counter() - t0) / len(tasks)
    outcomes = []
    for task, result in zip(tasks, results, strict=True):
        t1 = time.perf_counter()
        try:
            record, files = _record(result), _render(result, plots)
        except Exception as err:  # noqa: BLE001 - e.g. a plot failing on odd data
            outcomes.append(_failure(task.id, err, t1))
            continue
        outcomes.append(_Outcome(task.id, "ok", "", record, files,
                                 share + time.perf_counter() - t1))  # fmt: skip
    return outcomes


# --- output folder --------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` beside ``path``, flush it to disk and rename it onto ``path``."""
    from lensflow.fit import atomic_write

    atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=True)


def _read_result(path: Path) -> dict[str, Any] | None:
    """A lens's ``result.json``, or None when absent or unreadable (an unfinished lens)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (
        record if isinstance(record, dict) and record.get("status") in ("ok", "failed") else None
    )


def _write_outcome(out: Path, lens: _Lens, outcome: _Outcome) -> None:
    """Write a lens's files, then its ``result.json`` (last: it marks the lens finished)."""
    folder = out / "lenses" / lens.id
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in outcome.files.items():
        _atomic_write(folder / name, data)
    record = {
        "id": lens.id,
        "status": outcome.status,
        "reason": outcome.reason,
        "seed": lens.seed,
        "wall_time_s": outcome.wall_time_s,
        "inputs": lens.inputs,
        "lensflow_version": __version__,
        **outcome.record,
    }
    record.setdefault("preset", lens.inputs["preset"])
    _atomic_write(folder / "result.json", (json.dumps(record, indent=2) + "\n").encode())


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write ``run.json``, or refuse when ``out`` holds a run with other settings."""
    path = out / "run.json"
    old = _read_json(path)
    if old is not None:
        # Runs written before these settings existed had their defaults.
        defaults = {"fallback": "none", "pad": False, "fallback_prior": "default",
                    "n_steps": None, "control_steps": None, "solver": None,
                    "base_solver": None}  # fmt: skip
        previous = {**defaults, **old.get("settings", {})}
        changed = [k for k in settings if previous.get(k) != settings[k]]
        if changed:
            was = ", ".join(f"{k}={previous.get(k)!r}" for k in changed)
            raise ValueError(
                f"{out}: holds a catalog run with {was}; rerun with those settings to resume "
                "it, or choose another --out"
            )
        return
    record = {"settings": settings, "lensflow_version": __version__}
    _atomic_write(path, (json.dumps(record, indent=2) + "\n").encode())


def _check_sampler(sampler: dict[str, Any], feedback: str) -> None:
    """Refuse bad sampler settings before any lens is fitted (not as one failure per lens)."""
    from lensflow.solvers import get_solver

    for key in ("solver", "base_solver"):
        if sampler[key] is not None:
            get_solver(sampler[key])
    for key, least in (("n_steps", 1 if feedback == "none" else 2), ("control_steps", 1)):
        k = sampler[key]
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < least):
            raise ValueError(f"{key} must be an integer >= {least}, got {k!r}")
    if feedback == "none":
        for key in ("control_steps", "base_solver"):
            if sampler[key] is not None:
                raise ValueError(f"{key}={sampler[key]!r} needs feedback, but it is 'none'")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def results_table(catalog: Table, out: str | Path) -> Table:
    """The results table of a (finished or partial) run, rebuilt from its ``result.json``.

    Args:
        catalog: The catalog (``read_catalog``).
        out: The run's output folder.

    Returns:
        The input columns plus ``preset`` (the one used), ``status`` (``ok``, ``failed`` or
        ``pending``), ``reason``, ``feedback``, ``seed``, ``wall_time_s`` [s], ``method``,
        ``n_samples``, the summary columns ``<param>_{median,p16,p84,p2p5,p97p5}``
        (registry units; NaN unless ok), the diagnostics, ``reliable`` and
        ``unreliable_reason``, in catalog order.
    """
    out = Path(out)
    records = [_read_result(out / "lenses" / str(i) / "result.json") for i in catalog["id"]]
    table = catalog.copy(copy_data=True)
    table.meta = {k: v for k, v in catalog.meta.items() if k != "catalog_path"}
    units = {p.name: p.unit for p in REGISTRY}

    def column(key: Callable[[dict[str, Any]], object], default: object) -> list[object]:
        return [default if r is None else key(r) for r in records]

    def ok(key: Callable[[dict[str, Any]], Any]) -> list[float]:
        return [key(r) if r is not None and r["status"] == "ok" else math.nan for r in records]

    table["preset"] = column(lambda r: str(r.get("preset", "")), "")
    table["status"] = column(lambda r: r["status"], "pending")
    table["reason"] = column(lambda r: r.get("reason", ""), "")
    table["feedback"] = column(lambda r: r.get("feedback", ""), "")
    table["seed"] = column(lambda r: int(r["seed"]), -1)
    table["wall_time_s"] = u.Quantity(column(lambda r: float(r["wall_time_s"]), math.nan), u.s)
    table["method"] = column(lambda r: r.get("method", ""), "")
    table["n_samples"] = column(lambda r: int(r.get("n_samples", 0)), 0)
    for name in _SUMMARY_COLUMNS:
        param = name.rsplit("_", 1)[0]
        table[name] = ok(lambda r, name=name: r["summary"][name])
        table[name].unit = u.Unit(units[param]) if units[param] else None
    for name, unit in _DIAGNOSTICS.items():
        # Records written before a diagnostic existed lack it: NaN.
        table[name] = ok(lambda r, name=name: r["diagnostics"].get(name, math.nan))
        table[name].unit = unit
    table["reliable"] = column(lambda r: bool(r.get("reliable", False)), False)
    table["unreliable_reason"] = column(lambda r: r.get("unreliable_reason", ""), "")

    def fb(r: dict[str, Any]) -> dict[str, Any]:
        return r.get("fallback") or {}

    table["flow_reliable"] = column(
        lambda r: bool(fb(r)["flow_diagnostics"]["reliable"]) if fb(r) else bool(
            r.get("reliable", False)), False)  # fmt: skip
    table["fallback"] = column(lambda r: fb(r).get("method", ""), "")
    table["fallback_converged"] = column(lambda r: bool(fb(r).get("converged", False)), False)
    table["fallback_init"] = column(lambda r: fb(r).get("init", ""), "")
    table["fallback"].description = "emcee or smc: the flagged lens's re-run (--fallback)"
    table["status"].description = "ok, failed (see reason) or pending (not run yet)"
    table["reliable"].description = "False when a reliability diagnostic fired (docs/fit.md)"
    table["seed"].description = "per-lens seed, lens_seed(run seed, id)"
    return table


def _write_results(table: Table, out: Path) -> None:
    """Write ``results.ecsv`` and ``results.fits`` atomically (FITS gets 8-character keys)."""
    settings = table.meta.get("settings", {})
    fits_table = table.copy(copy_data=False)
    fits_table.meta = {"LFVERS": __version__, "NSAMPLES": settings.get("n"),
                       "FEEDBACK": settings.get("feedback"), "SEED": settings.get("seed")}  # fmt: skip
    for name, fmt, t in (("results.ecsv", "ascii.ecsv", table),
                         ("results.fits", "fits", fits_table)):  # fmt: skip
        with tempfile.TemporaryDirectory(dir=out, prefix=".results-") as tmp:
            part = Path(tmp) / name
            t.write(part, format=fmt, overwrite=True)
            os.replace(part, out / name)


# --- the driver -----------------------------------------------------------------------------


def _batches(lenses: Sequence[_Lens], size: int) -> Iterator[list[_Lens]]:
    for start in range(0, len(lenses), size):
        yield list(lenses[start : start + size])


def run_catalog(
    catalog: Table | str | Path,
    out: str | Path,
    *,
    n: int = 1000,
    feedback: str = "auto",
    seed: int = 0,
    preset: str = "auto",
    model: str | None = None,
    batch_size: int | None = None,
    scheduler: str | None = None,
    n_workers: int = 1,
    device: str = "auto",
    plots: bool = True,
    progress: bool = True,
    fallback: str = "none",
    pad: bool = False,
    fallback_prior: str = "default",
    compile: bool = False,
    n_steps: int | None = None,
    control_steps: int | None = None,
    solver: str | None = None,
    base_solver: str | None = None,
) -> Table:
    """Fit every lens of a catalog, resumably; write per-lens folders and a results table.

    Args:
        catalog: Catalog table (``read_catalog``) or its path.
        out: Output folder (created; a rerun into it resumes).
        n: Posterior samples per lens.
        feedback: One of ``FEEDBACK_KINDS``.
        seed: Run seed; lens seeds are ``lens_seed(seed, id)``.
        preset: Preset for rows without a ``preset`` value (``"auto"``: by pixel scale).
        model: A model path (or shipped name) for every lens instead of the presets'.
        batch_size: Lenses per ``fit_lenses`` call (one task); default 64 with CUDA, else 1.
        scheduler: None (in this process), ``"local"`` (a ``LocalCluster`` of ``n_workers``
            one-thread processes) or a Dask scheduler address (``tcp://host:8786``).
        n_workers: Workers of the local cluster.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (resolved on each worker).
        plots: Write the corner and residual figures of every lens.
        progress: Show a progress bar with an ETA.
        fallback: ``"mcmc"`` re-runs every lens whose flow posterior is flagged unreliable
            with emcee on the same likelihood (``fit.run_fallback``); ``method`` then says
            ``emcee`` and ``fallback_converged`` whether its chain reached 50 tau.
            ``"smc"`` re-runs them with tempered SMC (``method`` ``smc``;
            ``fallback_converged`` is its sanity flag, ``baselines.smc.SmcDiagnostics``).
        pad: Mask the part of a model's field that reaches beyond a cutout instead of
            failing the lens (``fit.fit_lenses(pad=True)``).
        fallback_prior: The fallback's prior, ``"default"`` (the model's training prior),
            ``"broad"`` or ``"wide"`` (``fit.run_fallback(prior=...)``).
        compile: Render the feedback through ``torch.compile`` (``fit.fit_lenses``): each
            worker compiles once (tens of seconds on a GPU) and then fits faster. Not a
            setting of the run: the results agree with uncompiled ones to float32 rounding.
        n_steps: ODE steps (default: the control net's with feedback, else the model's).
        control_steps: With feedback, steps on ``[t_start, 1]``, one simulator call per
            sample each (default: the control net's).
        solver: ODE solver (default: the control net's, else the model's).
        base_solver: With feedback, the solver on ``[0, t_start]`` (default: ``solver``
            where given, else the control net's). The four sampler settings are settings of the run (``run.json``); each
            lens's resolved sampler is in its ``provenance.json``.

    Returns:
        The results table (also written to ``out/results.ecsv`` and ``.fits``), with
        ``meta`` ``n_ok``, ``n_failed``, ``n_skipped`` (finished before this call) and
        ``wall_time_s``.

    Raises:
        ValueError: For a bad catalog, argument, or an ``out`` holding another run.
    """
    t0 = time.perf_counter()
    if isinstance(catalog, Table):
        catalog = catalog.copy()
        _validate(catalog, "catalog")
    else:
        catalog = read_catalog(catalog)
    if feedback not in FEEDBACK_KINDS:
        raise ValueError(
            f"unknown feedback {feedback!r}; choose one of {', '.join(FEEDBACK_KINDS)}"
        )
    if preset != "auto" and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use auto or one of {', '.join(PRESETS)}")
    from lensflow.fit import FALLBACKS

    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; choose {', '.join(FALLBACKS)}")
    if fallback_prior not in PRIOR_CHOICES:
        raise ValueError(f"unknown fallback prior {fallback_prior!r}; choose "
                         f"{', '.join(PRIOR_CHOICES)}")  # fmt: skip
    sampler = {"n_steps": n_steps, "control_steps": control_steps, "solver": solver,
               "base_solver": base_solver}  # fmt: skip
    _check_sampler(sampler, feedback)
    if n < 1 or (batch_size is not None and batch_size < 1) or n_workers < 1:
        raise ValueError(f"n, batch_size and workers must be >= 1 (got {n}, {batch_size}, "
                         f"{n_workers})")  # fmt: skip
    if batch_size is None:
        import torch

        batch_size = 64 if device != "cpu" and torch.cuda.is_available() else 1
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"n": n, "feedback": feedback, "seed": seed, "preset": preset,
                "model": None if model is None else str(model), "fallback": fallback,
                "pad": pad, "fallback_prior": fallback_prior, **sampler}  # fmt: skip
    _check_settings(out, settings)
    base = Path(catalog.meta.get("catalog_path", "catalog")).parent
    lenses = []
    for k, lens_id in enumerate(catalog["id"]):
        inputs = _lens_inputs(catalog, k, base, preset)
        lenses.append(_Lens(str(lens_id), k, inputs, inputs["preset"], lens_seed(seed, lens_id)))

    def finished(lens: _Lens) -> bool:
        r = _read_result(out / "lenses" / lens.id / "result.json")
        return r is not None and r["status"] == "ok" and r.get("inputs") == lens.inputs

    done = {x.id for x in lenses if finished(x)}
    # A batch with any unfinished lens is redone whole (same batched call as uninterrupted).
    todo = [b for b in _batches(lenses, batch_size) if any(x.id not in done for x in b)]
    for batch in todo:  # clear what a killed run may have left of unfinished lenses
        for lens in batch:
            if lens.id not in done:
                shutil.rmtree(out / "lenses" / lens.id, ignore_errors=True)
    counts = {"ok": 0, "failed": 0}
    options = {"n": n, "feedback": feedback, "model": model, "device": device, "plots": plots,
               "fallback": fallback, "pad": pad, "fallback_prior": fallback_prior,
               "compile": compile, "sampler": sampler}  # fmt: skip
    from tqdm import tqdm

    with tqdm(total=len(lenses), initial=len(done), unit="lens", desc="catalog",
              disable=not progress, dynamic_ncols=True) as bar:  # fmt: skip

        def record(batch: list[_Lens], outcomes: Sequence[_Outcome]) -> None:
            by_id = {x.id: x for x in batch}
            for outcome in outcomes:
                if outcome.id in done:  # recomputed only to keep the batch whole
                    continue
                _write_outcome(out, by_id[outcome.id], outcome)
                counts[outcome.status] += 1
                bar.update(1)
            bar.set_postfix(failed=counts["failed"], refresh=False)

        def load(batch: list[_Lens]) -> list[_Task]:
            """Read a batch's observations; unreadable rows are recorded as failed here."""
            tasks = []
            for lens in batch:
                t1 = time.perf_counter()
                try:
                    tasks.append(_load_task(lens))
                except Exception as err:  # noqa: BLE001 - a bad row must not stop the run
                    record(batch, [_failure(lens.id, err, t1)])
            return tasks

        if scheduler is None and n_workers == 1:
            for batch in todo:
                tasks = load(batch)
                if tasks:
                    record(batch, _fit_batch(tasks, **options))
        else:
            _run_dask(todo, load, record, options, scheduler or "local", n_workers)
    table = results_table(catalog, out)
    wall = time.perf_counter() - t0
    table.meta.update({"lensflow_version": __version__, "settings": settings})
    _write_results(table, out)
    table.meta.update({"n_ok": counts["ok"], "n_failed": counts["failed"],
                       "n_skipped": len(done), "wall_time_s": wall})  # fmt: skip
    return table


def _run_dask(
    batches: Sequence[list[_Lens]],
    load: Callable[[list[_Lens]], list[_Task]],
    record: Callable[[list[_Lens], Sequence[_Outcome]], None],
    options: dict[str, Any],
    scheduler: str,
    n_workers: int,
) -> None:
    """Run the batches as Dask tasks, about two per worker thread in flight."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ValueError(
            "Dask is needed for --workers > 1 or --scheduler: pip install 'dask[distributed]'"
        ) from None
    cluster = None
    try:
        if scheduler == "local":
            import logging

            import dask

            # Dask's default MALLOC_TRIM_THRESHOLD_=65536 makes glibc return memory after
            # every torch op: the diagnostics ran 10x slower (2.4 s vs 0.2 s per lens).
            environ = {"MALLOC_TRIM_THRESHOLD_": 268435456, "MALLOC_MMAP_THRESHOLD_": 33554432}
            with dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v
                                  for k, v in environ.items()}):  # fmt: skip
                cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                       dashboard_address=None, silence_logs=logging.ERROR)  # fmt: skip
            client = Client(cluster)
        else:
            try:
                client = Client(scheduler, timeout=30)
            except OSError as err:
                raise ValueError(
                    f"cannot connect to the Dask scheduler {scheduler}: {err}"
                ) from None
        with client:
            queue = iter(batches)
            running = as_completed()
            in_flight: dict[Any, tuple[list[_Lens], list[_Task]]] = {}

            def fill() -> None:
                """Keep two batches per worker thread in flight (workers may join later)."""
                while len(in_flight) < max(2, 2 * sum(client.nthreads().values())):
                    batch = next(queue, None)
                    if batch is None:
                        return
                    tasks = load(batch)
                    if tasks:
                        future = client.submit(_fit_batch, tasks, pure=False, **options)
                        in_flight[future] = (batch, tasks)
                        running.add(future)

            fill()
            for future in running:
                batch, tasks = in_flight.pop(future)
                try:
                    outcomes = future.result()
                except Exception as err:  # noqa: BLE001 - a lost worker fails its batch only
                    t = time.perf_counter()
                    detail = traceback.format_exception_only(type(err), err)[-1].strip()
                    outcomes = [
                        _failure(x.id, RuntimeError(f"worker: {detail}"), t) for x in tasks
                    ]
                record(batch, outcomes)
                fill()
    finally:
        if cluster is not None:
            cluster.close()
