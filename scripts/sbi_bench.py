"""SBI benchmark: train the base flow per task and budget, score C2ST on sbibm observations.

Each finished (task, budget, method) appends one JSON line to ``--out`` (so a long run can be
resumed or split across processes: finished rows are skipped). ``--table`` renders JSON-lines
files as the markdown table of docs/sbi-benchmark.md instead of running anything (runs of
one training split over observations are joined).

With ``--feedback gradient learned zero`` (Lotka-Volterra and SIR only) each task and budget
trains the base flow once, finetunes one control net per signal on the same simulations and
scores the base flow (method ``flow``) and every ``flow+<signal>`` with the feedback sampler
(``--fb-solver``, ``--fb-steps``, control for ``t > --t-start``).

Example:
    python scripts/sbi_bench.py --tasks two_moons slcp --budgets 1000 10000 \
        --out results/sbi.jsonl
    python scripts/sbi_bench.py --tasks sir --budgets 1000 --feedback gradient learned zero \
        --out results/sbi_feedback.jsonl
    python scripts/sbi_bench.py --table results/sbi.jsonl more.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from lensflow import __version__
from lensflow.docs_table import replace_block
from lensflow.feedback import FinetuneConfig
from lensflow.sbi import BenchConfig, BenchResult, get_task, run_benchmark
from lensflow.sbi.control import run_feedback_benchmark

#: Published NPE C2ST (mean over sbibm observations 1-10) per task and simulation budget:
#: sbibm's NPE with the neural spline flow (NPE-NSF, the paper's main NPE configuration,
#: Lueckmann et al. 2021, AISTATS), from `benchmarking_sbi/results/
#: supplement_hyperparameters_snpe.csv` in github.com/sbi-benchmark/results (commit 2a49a57),
#: averaged here. Not lensflow's numbers.
PUBLISHED_NPE = {
    "two_moons": {1000: 0.725, 10000: 0.606, 100000: 0.542},
    "slcp": {1000: 0.975, 10000: 0.901, 100000: 0.831},
    "lotka_volterra": {1000: 0.999, 10000: 0.997, 100000: 0.981},
    "sir": {1000: 0.815, 10000: 0.680, 100000: 0.585},
}


#: Markers of the generated table in docs/sbi-benchmark.md (``--table ... --docs``).
DOCS_MARKERS = ("<!-- sbi-bench:start -->", "<!-- sbi-bench:end -->")


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _sampler(row: dict) -> str:
    """The row's sampler (rows written before the field existed: the base config's)."""
    return row.get("sampler") or f"{row['config']['solver']} {row['config']['n_steps']}"


def _done(path: Path) -> set[tuple[str, int, str, str]]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["n_simulations"], r["method"], _sampler(r)) for r in rows}


def merge_rows(paths: list[Path]) -> list[dict]:
    """Rows of several JSON-lines files; runs split by observation are joined.

    Rows with the same task, budget, method, sampler, seed and epoch count come from the
    same (deterministic) training run scored on different observations: their C2ST lists are
    concatenated and their scoring times added.
    """
    merged: dict[tuple, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            key = (r["task"], r["n_simulations"], r["method"], _sampler(r), r["seed"],
                   r["n_epochs"])  # fmt: skip
            if key not in merged:
                merged[key] = r
                continue
            m = merged[key]
            pairs = sorted(zip(m["num_observations"] + r["num_observations"],
                               m["c2st"] + r["c2st"], strict=True))  # fmt: skip
            m["num_observations"] = [k for k, _ in pairs]
            m["c2st"] = [c for _, c in pairs]
            m["score_s"] += r["score_s"]
            for field in ("sample_s", "c2st_s"):
                if field in m and field in r:
                    m[field] += r[field]
    return list(merged.values())


def render_table(paths: list[Path]) -> str:
    """Markdown table of the JSON lines in ``paths`` (mean +/- std over observations)."""
    rows = merge_rows(paths)
    lines = [
        (
            "| task | simulations | method | sampler | C2ST mean ± std | min–max | observations | "
            "epochs / steps | train (s) | sample+C2ST (s) | simulator calls per sample | "
            "published NPE, same budget |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        rows,
        key=lambda r: (r["task"], r["n_simulations"], _sampler(r), r["method"], -len(r["c2st"])),
    ):
        c = torch.tensor(r["c2st"])
        std = c.std().item() if len(c) > 1 else float("nan")
        obs = r["num_observations"]
        obs_txt = f"{obs[0]}–{obs[-1]}" if obs == list(range(obs[0], obs[-1] + 1)) else str(obs)
        published = PUBLISHED_NPE.get(r["task"], {}).get(int(r["n_simulations"]), float("nan"))
        lines.append(
            f"| {r['task']} | {r['n_simulations']:.0e} | {r['method']} | {_sampler(r)} | "
            f"{c.mean():.3f} ± {std:.3f} | {c.min():.3f}–{c.max():.3f} | {obs_txt} | "
            f"{r['n_epochs']} | {r['train_s']:.0f} | {r['score_s']:.0f} | "
            f"{r.get('sim_calls_per_sample', 0)} | {published:.3f} (published) |"
        )
    return "\n".join(lines)


def render_paired(paths: list[Path]) -> str:
    """Markdown table of paired differences C2ST(feedback variant) - C2ST(base flow).

    Per task and budget, the base-flow row scored with a feedback run's sampler (solver and
    steps, e.g. ``euler 40``) is paired observation by observation with each feedback variant
    of that sampler (same network, same base noise); mean +/- std over the shared
    observations, and how many improved.
    """
    groups: dict[tuple, dict[str, dict[int, float]]] = {}
    for r in merge_rows(paths):
        solver_steps = _sampler(r).split(",")[0]  # "euler 40, control t > 0.8" -> "euler 40"
        by_obs = dict(zip(r["num_observations"], r["c2st"], strict=True))
        groups.setdefault((r["task"], r["n_simulations"], solver_steps), {})[r["method"]] = by_obs
    lines = [
        "| task | simulations | observations | flow+gradient | flow+learned | flow+zero |",
        "|---|---|---|---|---|---|",
    ]
    for (task, n, _), methods in sorted(groups.items()):
        base = methods.get("flow")
        if base is None or len(methods) < 2:
            continue
        cells = []
        for method in ("flow+gradient", "flow+learned", "flow+zero"):
            obs = sorted(set(base) & set(methods.get(method, {})))
            if len(obs) < 2:
                cells.append("-")
                continue
            d = torch.tensor([methods[method][o] - base[o] for o in obs])
            better = int((d < -0.001).sum())
            mean = f"{d.mean():+.3f}".replace("-", "\u2212")
            cells.append(f"{mean} ± {d.std():.3f} ({better}/{len(obs)} better by > 0.001)")
        lines.append(f"| {task} | {n:.0e} | {min(base)}–{max(base)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tasks", nargs="+", default=["two_moons", "slcp", "lotka_volterra", "sir"]
    )
    parser.add_argument("--budgets", nargs="+", type=int, default=[1000, 10000])
    parser.add_argument("--observations", nargs="+", type=int, default=list(range(1, 11)),
                        help="sbibm observation numbers to score (1..10)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-train-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("results/sbi.jsonl"))
    parser.add_argument("--feedback", nargs="+", choices=["gradient", "learned", "zero"],
                        help="finetune and score these control signals (and the base flow "
                        "with the same sampler); lotka_volterra and sir only")  # fmt: skip
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--finetune-batch", type=int, default=128)
    parser.add_argument("--fb-solver", default="euler")
    parser.add_argument("--fb-steps", type=int, default=40, help="solver steps over [0, 1]")
    parser.add_argument("--t-start", type=float, default=0.8)
    parser.add_argument("--n-sub", type=int, default=2,
                        help="RK4 steps per save interval of the feedback cost's ODE solve")  # fmt: skip
    parser.add_argument("--table", type=Path, nargs="+", help="render these JSON-lines files")
    parser.add_argument("--docs", type=Path, metavar="MD",
                        help="with --table: also put the table between the "
                        "<!-- sbi-bench:start/end --> markers of this Markdown file")  # fmt: skip
    parser.add_argument("--paired", type=Path, nargs="+",
                        help="render the paired feedback differences of these JSON-lines files")  # fmt: skip
    args = parser.parse_args()
    if args.table:
        table = render_table(args.table)
        print(table)
        if args.docs:
            replace_block(args.docs, table, start=DOCS_MARKERS[0], end=DOCS_MARKERS[1])
        return
    if args.paired:
        print(render_paired(args.paired))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(args.out)
    cfg = BenchConfig(max_train_s=args.max_train_s)
    obs = tuple(args.observations)
    fcfg = FinetuneConfig(
        n_steps=args.finetune_steps, batch_size=args.finetune_batch, t_start=args.t_start,
        n_steps_sample=args.fb_steps, solver=args.fb_solver,
    )  # fmt: skip
    started = time.perf_counter()

    git = _git_sha()  # the code this process runs (HEAD may move while it runs)

    def write(result: BenchResult) -> None:
        row = {
            "task": result.task, "n_simulations": result.n_simulations,
            "method": result.method, "sampler": result.sampler, "c2st": result.c2st.tolist(),
            "num_observations": list(obs), "train_s": result.train_s,
            "score_s": result.score_s, "sample_s": result.sample_s, "c2st_s": result.c2st_s,
            "sim_calls_per_sample": result.sim_calls_per_sample,
            "finetune_sim_calls": result.finetune_sim_calls,
            "total_s": time.perf_counter() - started, "n_epochs": result.n_epochs,
            "seed": args.seed, "threads": args.threads, "config": vars(cfg) | {},
            "lensflow": __version__, "git": git, "host": platform.processor()
            or platform.machine(), "cpus": os.cpu_count(),
        }  # fmt: skip
        if args.feedback:
            row["finetune_config"] = vars(fcfg) | {"n_sub": args.n_sub}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{result.task} {result.n_simulations} {result.method}: c2st "
              f"{result.c2st.mean():.3f} ± {result.c2st.std() if len(result.c2st) > 1 else 0:.3f} "
              f"({row['total_s']:.0f} s since start)", flush=True)  # fmt: skip

    # Budget-major, so that every task gets its small budget before any large one.
    for budget in args.budgets:
        for name in args.tasks:
            if args.feedback:
                methods = ("flow", *args.feedback)
                sampler = f"{args.fb_solver} {args.fb_steps}"
                todo = tuple(
                    m for m in methods
                    if (name, budget, m if m == "flow" else f"flow+{m}",
                        sampler if m == "flow"
                        else f"{sampler}, control t > {args.t_start:g}") not in done
                )  # fmt: skip
                if not todo:
                    print(f"skip {name} {budget} feedback (done)", flush=True)
                    continue
                started = time.perf_counter()
                run_feedback_benchmark(
                    get_task(name), budget, todo, cfg, fcfg, seed=args.seed, n_sub=args.n_sub,
                    num_observations=obs, on_result=write,
                    log=lambda line, n=name, b=budget: print(f"{n} {b}: {line}", flush=True),
                )  # fmt: skip
                continue
            if (name, budget, "flow", f"{cfg.solver} {cfg.n_steps}") in done:
                print(f"skip {name} {budget} flow (done)", flush=True)
                continue
            started = time.perf_counter()
            # Network initialization draws from the global generator: reseed per run, so
            # that a row does not depend on which runs came before it in this process.
            torch.manual_seed(args.seed)
            write(run_benchmark(get_task(name), budget, cfg, seed=args.seed,
                                num_observations=obs))  # fmt: skip


if __name__ == "__main__":
    main()
