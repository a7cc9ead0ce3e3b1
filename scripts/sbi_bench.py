"""SBI benchmark: train the base flow per task and budget, score C2ST on sbibm observations.

Each finished (task, budget, method) appends one JSON line to ``--out`` (so a long run can be
resumed or split across processes: finished rows are skipped). ``--table`` renders JSON-lines
files as the markdown table of docs/sbi-benchmark.md instead of running anything (runs of
one training split over observations are joined).

Example:
    python scripts/sbi_bench.py --tasks two_moons slcp --budgets 1000 10000 \
        --out results/sbi.jsonl
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
from lensflow.sbi import BenchConfig, get_task, run_benchmark

#: Published NPE (NSF) C2ST at 10^5 simulations, read from the sbibm paper's figure
#: (Lueckmann et al. 2021); approximate, and not lensflow's numbers.
PUBLISHED_NPE_1E5 = {"two_moons": 0.54, "slcp": 0.83, "lotka_volterra": 0.98, "sir": 0.59}


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _done(path: Path) -> set[tuple[str, int, str]]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["n_simulations"], r["method"]) for r in rows}


def merge_rows(paths: list[Path]) -> list[dict]:
    """Rows of several JSON-lines files; runs split by observation are joined.

    Rows with the same task, budget, method, seed and epoch count come from the same
    (deterministic) training run scored on different observations: their C2ST lists are
    concatenated and their scoring times added.
    """
    merged: dict[tuple, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            key = (r["task"], r["n_simulations"], r["method"], r["seed"], r["n_epochs"])
            if key not in merged:
                merged[key] = r
                continue
            m = merged[key]
            pairs = sorted(zip(m["num_observations"] + r["num_observations"],
                               m["c2st"] + r["c2st"], strict=True))  # fmt: skip
            m["num_observations"] = [k for k, _ in pairs]
            m["c2st"] = [c for _, c in pairs]
            m["score_s"] += r["score_s"]
    return list(merged.values())


def render_table(paths: list[Path]) -> str:
    """Markdown table of the JSON lines in ``paths`` (mean +/- std over observations)."""
    rows = merge_rows(paths)
    lines = [
        (
            "| task | simulations | method | C2ST mean ± std | min–max | observations | "
            "epochs | train (s) | sample+C2ST (s) | published NPE at 10^5 |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(
        rows, key=lambda r: (r["task"], r["n_simulations"], r["method"], -len(r["c2st"]))
    ):
        c = torch.tensor(r["c2st"])
        std = c.std().item() if len(c) > 1 else float("nan")
        obs = r["num_observations"]
        obs_txt = f"{obs[0]}–{obs[-1]}" if obs == list(range(obs[0], obs[-1] + 1)) else str(obs)
        published = PUBLISHED_NPE_1E5.get(r["task"], float("nan"))
        lines.append(
            f"| {r['task']} | {r['n_simulations']:.0e} | {r['method']} | "
            f"{c.mean():.3f} ± {std:.3f} | {c.min():.3f}–{c.max():.3f} | {obs_txt} | "
            f"{r['n_epochs']} | {r['train_s']:.0f} | {r['score_s']:.0f} | {published:.2f} (published) |"
        )
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
    parser.add_argument("--table", type=Path, nargs="+", help="render these JSON-lines files")
    args = parser.parse_args()
    if args.table:
        print(render_table(args.table))
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(args.out)
    cfg = BenchConfig(max_train_s=args.max_train_s)
    obs = tuple(args.observations)
    # Budget-major, so that every task gets its small budget before any large one.
    for budget in args.budgets:
        for name in args.tasks:
            if (name, budget, "flow") in done:
                print(f"skip {name} {budget} flow (done)", flush=True)
                continue
            start = time.perf_counter()
            # Network initialization draws from the global generator: reseed per run, so
            # that a row does not depend on which runs came before it in this process.
            torch.manual_seed(args.seed)
            result = run_benchmark(get_task(name), budget, cfg, seed=args.seed,
                                   num_observations=obs)  # fmt: skip
            row = {
                "task": result.task, "n_simulations": budget, "method": result.method,
                "c2st": result.c2st.tolist(), "num_observations": list(obs),
                "train_s": result.train_s, "score_s": result.score_s,
                "total_s": time.perf_counter() - start, "n_epochs": result.n_epochs,
                "seed": args.seed, "threads": args.threads, "config": vars(cfg) | {},
                "lensflow": __version__, "git": _git_sha(), "host": platform.processor()
                or platform.machine(), "cpus": os.cpu_count(),
            }  # fmt: skip
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} {budget}: c2st {result.c2st.mean():.3f} ± {result.c2st.std():.3f} "
                  f"({row['total_s']:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
