"""Benchmark reporting: the JSON records, the Markdown block and the figures of ``lensflow bench``.

``bench.run_bench`` measures and returns a ``bench.BenchReport``; this module only turns one
into outputs. ``bench_json`` gives the strict-JSON tree (non-finite floats written as
``null``) and ``load_report`` reads it back, re-deriving the goals with ``bench.judge_goals``.
``markdown_report`` renders the per-lens table, the per-method summary, the speed-ups, issue
3's goals and the figure links; ``replace_docs_block`` puts that block between the
``DOCS_START`` / ``DOCS_END`` markers of docs/benchmarks.md. ``write_figures`` draws the
coverage and corner plots through ``lensflow.plots`` (the only module importing matplotlib).

Conventions: times in seconds; ``n/a`` in a table for a missing or non-finite number; a
record's ``tau_max`` of ``None`` (read back from JSON) is a chain too short to estimate tau.
"""

from __future__ import annotations

__all__ = [
    "DOCS_END",
    "DOCS_START",
    "bench_json",
    "load_report",
    "markdown_report",
    "replace_docs_block",
    "write_figures",
]

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lensflow.baselines.bench import (
    METHODS,
    BenchConfig,
    BenchReport,
    flag_off_mode,
    judge_goals,
    stack_samples,
    start_mode_problem,
)
from lensflow.docs_table import replace_block

#: Markers of the generated block in docs/benchmarks.md.
DOCS_START, DOCS_END = "<!-- bench:start -->", "<!-- bench:end -->"


def _jsonable(value: Any) -> Any:  # noqa: ANN401 - any JSON-able tree
    """Non-finite floats become ``None`` (strict JSON), tuples lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def load_report(path: str | Path) -> BenchReport:
    """A report read back from ``bench_json`` output (goals re-derived; no samples).

    Args:
        path: The JSON file.

    Returns:
        The report without samples and truths (enough for ``markdown_report``).
    """
    import json

    tree = json.loads(Path(path).read_text())
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in tree["config"].items() if k in fields})  # fmt: skip
    summary = dict(tree["summary"])
    # Files written before the mode flags existed: derive them from the records.
    flag_off_mode(summary["per_method"], summary["speedups"], tree["records"])
    summary["goals"] = judge_goals(summary["per_method"], summary["speedups"])
    return BenchReport(cfg, tuple(tree["records"]), summary, tree["hardware"],
                       tuple(tree["notes"]))  # fmt: skip


def bench_json(report: BenchReport, *, command: str = "", provenance: dict | None = None) -> dict:
    """The report as a strict-JSON tree (no NaN): config, hardware, records, summary.

    Args:
        report: The report.
        command: The command line that produced it.
        provenance: ``config.run_provenance`` output (version, git SHA, time).

    Returns:
        JSON-able dict.
    """
    return _jsonable({
        "command": command,
        "provenance": provenance or {},
        "config": dataclasses.asdict(report.config),
        "hardware": report.hardware,
        "notes": list(report.notes),
        "records": list(report.records),
        "summary": report.summary,
    })  # fmt: skip


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


def _mode_note(r: dict[str, Any]) -> str:
    """``bench.start_mode_problem`` as a suffix of the convergence cell ("" when none)."""
    why = start_mode_problem(r)
    return f"; {why}" if why else ""


def _convergence(r: dict[str, Any]) -> str:
    if r["method"] in ("flow", "flow+feedback"):
        return "n/a (independent samples)"
    if r["method"] == "flow+smc":
        yes = "yes" if r["converged"] else "**no**"
        return (f"{yes} (sanity flag): {len(r['temperatures']) - 1} temperatures, "
                f"{r['moves_per_particle']:.0f} moves per particle")  # fmt: skip
    if r["method"] == "nuts":
        yes = "yes" if r["converged"] else "**no**"
        text = f"{yes}: R-hat {_fmt(r['r_hat_max'], '.3f')}, min ESS {_fmt(r['ess_min'], '.0f')}"
        return text + _mode_note(r)
    tau = r["tau_max"]  # None when read back from JSON (NaN: the chain was too short)
    tau = float("nan") if tau is None else tau
    if r["converged"]:
        text = f"yes: {r['n_steps']} steps >= 50 tau ({_fmt(tau, '.0f')})"
    else:
        text = (f"**no**: {r['n_steps']} steps < 50 tau = {_fmt(50 * tau, '.0f')} "
                f"(tau {_fmt(tau, '.0f')})")  # fmt: skip
    if r.get("time_limited"):
        text += "; cut by the wall-time limit"
    return text + _mode_note(r)


def markdown_report(report: BenchReport, *, command: str = "", figures: Sequence[str] = ()) -> str:
    """The generated Markdown block: hardware, per-lens table, summary, goals, figures.

    Args:
        report: The report.
        command: The command line, quoted in the block.
        figures: Figure paths relative to the Markdown file, embedded at the end.

    Returns:
        Markdown text (no markers).
    """
    hw, cfg = report.hardware, report.config
    gpu = hw["gpu"] or "none"
    lines = [
        f"Generated by `lensflow bench` (config `{cfg.name}`); do not edit by hand.",
        "",
        "```bash",
        command or "lensflow bench",
        "```",
        "",
        (
            f"Hardware: {hw['cpu']}, {hw['cpu_cores']} cores, {hw['torch_threads']} torch "
            f"thread(s), device `{hw['device']}`, GPU: {gpu}; load average at start "
            f"{_fmt(hw['load_average_1min'], '.1f')}; torch {hw['torch_version']}."
        ),
        "",
        (
            f"Settings: {cfg.n_flow_samples:,} flow samples per lens; emcee {cfg.emcee_walkers} "
            f"walkers x ({cfg.emcee_burn} burn-in + {cfg.emcee_steps} steps"
            + (f", at most {cfg.emcee_max_wall_s} s" if cfg.emcee_max_wall_s else "")
            + ") from "
            f"`optimize_posterior` ({cfg.n_opt_starts} broad starts); C2ST on up to "
            f"{cfg.c2st_samples:,} samples per side (equal sides); reduced chi^2 of "
            f"{cfg.n_chi2_samples} re-simulated samples."
        ),
        "",
    ]
    lines += [f"- {n}" for n in report.notes]
    if report.notes:
        lines.append("")
    lines += [
        (
            "| lens | method | wall time [s] | time to 10,000 samples [s] | converged | "
            "abs. error theta_E [arcsec] | mean reduced chi^2 | C2ST vs emcee |"
        ),
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for r in report.records:
        if r["status"] != "ok":
            lines.append(f"| {r['lens']} | {r['method']} | {r['status']}: {r['note']} | | | | | |")
            continue
        lines.append(
            f"| {r['lens']} | {r['method']} | {_fmt(r['wall_time_s'], '.1f')} | "
            f"{_fmt(r['time_to_10k_samples_s'], '.1f')} | {_convergence(r)} | "
            f"{_fmt(r.get('lens_theta_e_abs_error'), '.2g')} | "
            f"{_fmt(r['chi2_red_samples'], '.2f')} | {_fmt(r.get('c2st_vs_emcee'), '.3f')} |"
        )
    lines += [
        "",
        "Per method (mean over lenses; coverage across lenses, mean over the 21 parameters):",
        "",
        (
            "| method | lenses | median time to 10,000 samples [s] | mean abs. error theta_E "
            "[arcsec] | mean reduced chi^2 | coverage 68% | coverage 95% | mean C2ST vs emcee |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, e in report.summary["per_method"].items():
        cov = e.get("coverage", {}).get("mean_over_params", [None, None])
        lines.append(
            f"| {m} | {e['n_lenses']} | {_fmt(e['median_time_to_10k_samples_s'], '.1f')} | "
            f"{_fmt(e['mean_lens_theta_e_abs_error'], '.3f')} | "
            f"{_fmt(e['mean_chi2_red_samples'], '.2f')} | {_fmt(cov[0], '.2f')} | "
            f"{_fmt(cov[1], '.2f')} | {_fmt(e['mean_c2st_vs_emcee'], '.3f')} |"
        )
    speedups = report.summary["speedups"]
    pairs = {tuple(s[k]) for s in speedups for k in s if k.endswith("_timed_on")}
    lines += [
        "",
        "Speed-ups (MCMC time to 10,000 samples / flow time for 10,000 samples, same run, "
        + ("same machine unless marked †):" if pairs else "same machine):"),
        "",
        "| lens | flow | vs emcee | vs NUTS | vs lenstronomy |",
        "|---|---|---:|---:|---:|",
    ]

    off = any(k.endswith("_off_mode") for s in speedups for k in s)

    def ratio(s: dict[str, Any], ref: str) -> str:
        mark = " †" if f"vs_{ref}_timed_on" in s else ""
        mark += " ‡" if s.get(f"vs_{ref}_off_mode") else ""
        return _fmt(s.get(f"vs_{ref}"), ".3g") + mark

    for s in speedups:
        lines.append(f"| {s['lens']} | {s['flow']} | {ratio(s, 'emcee')} | {ratio(s, 'nuts')} | "
                     f"{ratio(s, 'lenstronomy')} |")  # fmt: skip
    if pairs:
        lines += ["", "† The two runs were timed on different machines (flow / MCMC): "
                  + "; ".join(f"{a} / {b}" for a, b in sorted(pairs, key=str)) + "."]  # fmt: skip
    if off:
        lines += ["", ("‡ The MCMC chain started in another mode than the truth's (see its "
                       "convergence cell): no reference; left out of the goals.")]  # fmt: skip
    lines += ["", "Issue 3's goals:", "", "| goal | target | measured | met | note |",
              "|---|---|---:|---|---|"]  # fmt: skip
    for g in report.summary["goals"]:
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} ({g['method']}) | {g['target']} | "
                     f"{_fmt(g['measured'], '.3g')} | {met} | {g['note']} |")  # fmt: skip
    for f in figures:
        lines += ["", f"![{Path(f).stem}]({f})"]
    return "\n".join(lines) + "\n"


def replace_docs_block(path: str | Path, block: str) -> Path:
    """Put ``block`` between the bench markers of a Markdown file (appended if absent).

    Args:
        path: The Markdown file (created if missing).
        block: The generated text.

    Returns:
        The path written.

    Raises:
        ValueError: If only one marker is present, or they are in the wrong order.
    """
    return replace_block(path, block, start=DOCS_START, end=DOCS_END)


def write_figures(
    report: BenchReport, folder: str | Path, *, prefix: str = "bench_"
) -> list[Path]:
    """Coverage plots per method and a flow-vs-emcee corner plot of the first lens.

    Args:
        report: The report.
        folder: Output folder (created).
        prefix: File-name prefix.

    Returns:
        The PNG files written.
    """
    from lensflow.fit import CORNER_PARAMS
    from lensflow.params import NAMES
    from lensflow.plots import corner_plot, coverage_plot

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for m, e in report.summary["per_method"].items():
        lenses = [r["lens"] for r in report.records
                  if r["method"] == m and r["status"] == "ok" and r["lens"] in report.truths]  # fmt: skip
        if len(lenses) < 2 or "coverage" not in e:
            continue
        stacked = stack_samples(report.samples, lenses, m, report.config.n_coverage_samples)
        truth = torch.stack([report.truths[lens] for lens in lenses])
        path = folder / f"{prefix}coverage_{m.replace('+', '_')}.png"
        out.append(coverage_plot(stacked, truth, path,
                                 title=f"{m}: coverage over {len(lenses)} lenses"))  # fmt: skip
    first = report.records[0]["lens"] if report.records else None
    posts = [(m, report.samples[(first, m)]) for m in METHODS if (first, m) in report.samples]
    if posts:
        truth = report.truths.get(first)
        idx = [NAMES.index(p) for p in CORNER_PARAMS]
        path = folder / f"{prefix}corner_{first}.png"
        corner_plot([p for _, p in posts], [path], labels=[m for m, _ in posts],
                    params=CORNER_PARAMS, title=f"{first}: flow vs MCMC",
                    truths=None if truth is None else [float(truth[i]) for i in idx])  # fmt: skip
        out.append(path)
    return out
