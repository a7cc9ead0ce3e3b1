"""Which lenses set the mean excess chi^2 that feedback leaves? (reads --per-lens JSONs)

Takes two ``scripts/feedback_experiment.py --evaluate --per-lens`` runs on the same lenses
(the flow alone and a feedback variant), and reports how the remaining excess chi^2
(samples' mean reduced chi^2 minus the truth's) is distributed over the lenses: the share
of the total held by the worst 5/10/20%, the per-lens cut, and how the worst decile
differs from the rest in each parameter and in seeing, depth and masking.

Usage:
    python scripts/feedback_tail.py FLOW.json FEEDBACK.json [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("flow", type=Path, help="--per-lens JSON of the flow alone")
    p.add_argument("feedback", type=Path, help="--per-lens JSON of the feedback variant")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    a, b = (json.loads(x.read_text()) for x in (args.flow, args.feedback))
    for d, path in ((a, args.flow), (b, args.feedback)):
        if "lenses" not in d:
            p.error(f"{path}: no per-lens data (run feedback_experiment.py with --per-lens)")
    if a["lenses"]["chi2_truth"] != b["lenses"]["chi2_truth"]:
        p.error("the two runs are not on the same lenses (their truth chi^2 differ)")
    lenses = a["lenses"]
    truth = torch.tensor(lenses["chi2_truth"], dtype=torch.float64)
    flow = torch.tensor(a["results"][0]["per_lens_chi2_mean"], dtype=torch.float64) - truth
    fb = torch.tensor(b["results"][0]["per_lens_chi2_mean"], dtype=torch.float64) - truth
    n = len(truth)
    order = torch.argsort(fb, descending=True)
    total = float(fb.sum())
    out: dict = {"n_lenses": n, "flow": str(args.flow), "feedback": str(args.feedback)}
    print(f"# {n} lenses; excess chi^2 (samples' mean minus truth's), mean: flow "
          f"{float(flow.mean()):.2f}, feedback {float(fb.mean()):.2f} "
          f"(cut {100 * (1 - float(fb.mean()) / float(flow.mean())):.1f}%)")  # fmt: skip
    shares = {}
    for q in (0.05, 0.1, 0.2):
        k = max(1, round(q * n))
        shares[q] = float(fb[order[:k]].sum()) / total
        rest = fb[order[k:]]
        cut_rest = 1 - float(rest.mean()) / float(flow[order[k:]].mean())
        print(f"worst {100 * q:.0f}% ({k} lenses): {100 * shares[q]:.0f}% of the remaining "
              f"excess; the other {n - k} lenses are cut by {100 * cut_rest:.1f}%")  # fmt: skip
    out["share_of_excess_worst"] = shares
    per_lens_cut = 1 - fb / flow.clamp_min(1e-9)
    print(f"per-lens cut: median {100 * float(per_lens_cut.median()):.0f}%; "
          f"{int((per_lens_cut < 0.5).sum())} lenses below 50%, "
          f"{int((fb > flow).sum())} made worse")  # fmt: skip
    worst = torch.zeros(n, dtype=torch.bool)
    worst[order[: max(1, round(0.1 * n))]] = True
    theta = torch.tensor(lenses["theta"], dtype=torch.float64)
    columns = {name: theta[:, j] for j, name in enumerate(lenses["names"])}
    for key in ("psf_fwhm_arcsec", "background_rms", "exposure_time_s", "masked_fraction"):
        columns[key] = torch.tensor(lenses[key], dtype=torch.float64)
    columns["flow_excess"] = flow
    print("\n| quantity | worst 10%: median | others: median | rank-biserial |")
    print("|---|---:|---:|---:|")
    rows = []
    for name, v in columns.items():
        # Rank-biserial correlation (Mann-Whitney): +1 when every worst lens is above every
        # other lens in this quantity, -1 when below, 0 when they are interleaved.
        ranks = torch.argsort(torch.argsort(v)).double() + 1
        k = int(worst.sum())
        u_stat = float(ranks[worst].sum()) - k * (k + 1) / 2
        r = 2 * u_stat / (k * (n - k)) - 1
        rows.append((abs(r), name, float(v[worst].median()), float(v[~worst].median()), r))
    for _, name, w, o, r in sorted(rows, reverse=True):
        print(f"| `{name}` | {w:.4g} | {o:.4g} | {r:+.2f} |")
    out["worst_decile_vs_rest"] = {
        name: {"worst_median": w, "rest_median": o, "rank_biserial": r}
        for _, name, w, o, r in rows
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
