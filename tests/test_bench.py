"""The flow-vs-MCMC benchmark harness (baselines.bench, baselines.report, ``lensflow bench``)."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("emcee")
pytest.importorskip("sklearn")

from lensflow import cli
from lensflow.baselines import bench, report
from lensflow.params import NAMES
from lensflow.sampling import read_samples

#: Tiny sizes: one lens, 256 flow samples, a 10-step chain (far below 50 tau), and a
#: lenstronomy PSO of 4 particles x 2 iterations with a 4-step chain.
TINY = bench.BenchConfig(
    name="tiny", n_lenses=1,
    methods=("flow", "flow+feedback", "flow+smc", "emcee", "lenstronomy"),
    n_flow_samples=256, smc_particles=64,
    n_opt_starts=2, n_opt_steps=3, n_polish=1, n_polish_steps=3, emcee_walkers=42,
    emcee_burn=2, emcee_steps=10, lt_particles=4, lt_iterations=2, lt_walkers=38, lt_burn=0,
    lt_steps=4, c2st_samples=128, c2st_max_iter=30, n_chi2_samples=4, n_coverage_samples=128,
)  # fmt: skip


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """``lensflow bench`` end to end on the tiny config, with --docs into a scratch file."""
    tmp = tmp_path_factory.mktemp("bench")
    docs = tmp / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text(f"# Benchmarks\n\nkept above\n\n{report.DOCS_START}\nold\n{report.DOCS_END}\n"
                    "\nkept below\n")  # fmt: skip
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning at 30 epochs
        mp.setitem(bench.BENCH_CONFIGS, "small", TINY)
        status = cli.main(["bench", "--config", "small", "--out", str(tmp / "out"),
                           "--docs", str(docs), "--quiet"])  # fmt: skip
    torch.set_num_threads(threads)
    assert status == 0
    tree = json.loads((tmp / "out" / "bench-tiny.json").read_text())
    return tmp, docs, tree


def _record(tree, method):
    return next(r for r in tree["records"] if r["method"] == method)


def test_bench_flow_record_has_every_field_with_finite_numbers(bench_run):
    _, _, tree = bench_run
    r = _record(tree, "flow")
    assert r["status"] == "ok" and r["lens"] == "demo_00" and r["n_samples"] == 256
    for key in ("wall_time_s", "time_to_10k_samples_s", "chi2_red_samples", "chi2_red_median",
                "lens_theta_e_abs_error", "c2st_vs_emcee"):  # fmt: skip
        assert math.isfinite(r[key]), key
    assert set(r["abs_error"]) == set(NAMES) and set(r["median"]) == set(NAMES)
    assert all(math.isfinite(v) and v >= 0 for v in r["abs_error"].values())
    # The error is |median - truth| of the demo truth table (lens_theta_e of demo_00).
    truth = bench.load_demo_lenses(1)[0].truth
    assert r["abs_error"]["lens_theta_e"] == pytest.approx(
        abs(r["median"]["lens_theta_e"] - float(truth[0])), abs=1e-12
    )
    # 256 samples -> 10,000: the time is scaled linearly.
    assert r["time_to_10k_samples_s"] == pytest.approx(r["wall_time_s"] * 10_000 / 256)
    assert 0.0 <= r["c2st_vs_emcee"] <= 1.0
    assert r["chi2_red_samples"] > 0.5  # noise-dominated residuals cannot fit below ~1


def test_bench_short_chain_is_marked_not_converged(bench_run):
    _, _, tree = bench_run
    r = _record(tree, "emcee")
    assert r["status"] == "ok"
    assert r["converged"] is False
    assert (r["n_walkers"], r["n_burn"], r["n_steps"]) == (42, 2, 10)
    assert r["time_limited"] is False  # no emcee_max_wall_s: the chain ran in full
    for key in ("wall_time_s", "init_time_s", "time_per_step_s", "chi2_red_samples",
                "start_log_posterior", "truth_log_posterior", "acceptance_fraction"):  # fmt: skip
        assert math.isfinite(r[key]), key
    assert r["wall_time_s"] >= r["init_time_s"] + 12 * r["time_per_step_s"] * 0.99
    assert "broad starts" in r["start"]
    assert set(r["tau"]) == set(NAMES)


def test_bench_lenstronomy_record_says_whether_its_pso_found_the_truth_s_mode(bench_run):
    """A 4 x 2 PSO ends far below the truth (here at a negative solved source amplitude,
    outside the prior box): the record and the table say so."""
    tmp, _, tree = bench_run
    r = _record(tree, "lenstronomy")
    assert r["status"] == "ok" and r["start"] == "PSO from the prior-box centre"
    assert r["likelihood_border"] == "pad" and r["run_key"]["lt_border"] == "pad"
    assert (r["n_walkers"], r["n_burn"], r["n_steps"]) == (38, 0, 4) and not r["converged"]
    for key in ("truth_log_posterior", "init_time_s", "wall_time_s"):
        assert math.isfinite(r[key]), key
    emcee = _record(tree, "emcee")  # the same float64 posterior at the same truth
    assert r["truth_log_posterior"] == pytest.approx(emcee["truth_log_posterior"], rel=1e-9)
    lp = r["start_log_posterior"]  # None in JSON: -inf
    assert lp is None or r["truth_log_posterior"] - lp > 10
    row = next(line for line in (tmp / "out" / "bench-tiny.md").read_text().splitlines()
               if line.startswith("| demo_00 | lenstronomy |"))  # fmt: skip
    assert ("start outside the prior box" if lp is None else "(another mode)") in row
    md = (tmp / "out" / "bench-tiny.md").read_text()
    assert "‡ The MCMC chain started in another mode" in md
    assert report._mode_note({"start_log_posterior": -math.inf, "truth_log_posterior": 1.0})
    assert report._mode_note({"start_log_posterior": 0.0, "truth_log_posterior": 5.0}) == ""
    assert report._mode_note({"method": "flow"}) == ""
    # Such a chain is no reference: the speed goal against it is not judged.
    speed = tree["summary"]["speedups"][0]
    assert speed["vs_lenstronomy_off_mode"] is True and "vs_emcee" in speed
    assert tree["summary"]["per_method"]["lenstronomy"]["n_off_mode"] == 1
    goal = next(g for g in tree["summary"]["goals"]
                if g["goal"].startswith("speed-up vs lenstronomy") and g["method"] == "flow+smc")  # fmt: skip
    assert goal["met"] is None and "another mode than the truth's on 1 of 1" in goal["note"]


def test_judge_goals_leaves_out_lenses_whose_mcmc_sat_in_another_mode():
    """A reference chain in another mode than the truth's is no reference: its lenses drop
    out of the speed-up median, and with all of them out (or emcee's off on any lens, for
    the accuracy goals) the goal is not judged, with the reason in the note."""
    per_method = {
        "flow+feedback": {"n_lenses": 2, "mean_chi2_red_samples": 1.01, "mean_c2st_vs_emcee": 0.6},
        "emcee": {"n_lenses": 2, "n_converged": 2, "mean_chi2_red_samples": 1.0, "n_off_mode": 0},
        "lenstronomy": {"n_lenses": 2, "n_converged": 2, "n_off_mode": 1},
    }
    rows = [
        {"lens": "a", "flow": "flow+feedback", "vs_emcee": 500.0, "vs_lenstronomy": 9e4,
         "vs_lenstronomy_off_mode": True},
        {"lens": "b", "flow": "flow+feedback", "vs_emcee": 50.0, "vs_lenstronomy": 1500.0},
    ]  # fmt: skip
    goals = {
        g["goal"].split(" at ")[0].split(" (")[0]: g for g in bench.judge_goals(per_method, rows)
    }
    assert goals["speed-up vs emcee"]["measured"] == 275.0 and goals["speed-up vs emcee"]["met"]
    lt = goals["speed-up vs lenstronomy"]
    assert lt["measured"] == 1500.0 and lt["met"] is True  # lens a left out
    assert "on 1 of 2 lenses: those lenses left out" in lt["note"]
    assert goals["C2ST vs emcee"]["met"] is True and goals["C2ST vs emcee"]["note"] == ""
    # Every lenstronomy chain off: measured, not judged.
    rows[1]["vs_lenstronomy_off_mode"] = True
    lt = {g["goal"]: g for g in bench.judge_goals(per_method, rows)}
    lt = next(g for k, g in lt.items() if k.startswith("speed-up vs lenstronomy"))
    assert lt["met"] is None and lt["measured"] == pytest.approx(np.median([9e4, 1500.0]))
    assert "no reference, not judged" in lt["note"]
    # emcee off on one lens: the accuracy goals against it are not judged.
    per_method["emcee"]["n_off_mode"] = 1
    for g in bench.judge_goals(per_method, rows):
        if g["goal"].startswith(("mean reduced chi^2", "C2ST")):
            assert g["met"] is None and "emcee's start was in another mode" in g["note"]
            assert g["measured"] is not None
    # No emcee run: the accuracy goals say so, not "not converged".
    del per_method["emcee"]
    per_method["flow+feedback"]["mean_c2st_vs_emcee"] = None
    for g in bench.judge_goals(per_method, rows):
        if g["goal"].startswith(("mean reduced chi^2", "C2ST")):
            assert g["met"] is None and g["note"] == "emcee not run"
    # The rule itself: 10 nats below the truth or more, or outside the box.
    assert bench.start_mode_problem({"start_log_posterior": -12.0, "truth_log_posterior": -2.0})
    assert not bench.start_mode_problem(
        {"start_log_posterior": -11.9, "truth_log_posterior": -2.0}
    )
    assert not bench.start_mode_problem(
        {"start_log_posterior": -50.0, "truth_log_posterior": None}
    )
    assert bench.start_mode_problem({"start_log_posterior": None}) == "start outside the prior box"


def test_bench_lenstronomy_can_start_its_pso_at_the_optimizer(tmp_path):
    """--set lt_start_optimizer=1: the PSO is centred on optimize_posterior's result."""
    cfg = dataclasses.replace(TINY, methods=("lenstronomy",))
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setitem(bench.BENCH_CONFIGS, "small", cfg)
        mp.setitem(bench.BENCH_CONFIGS, "tiny", cfg)  # the name the outputs carry
        status = cli.main(["bench", "--config", "small", "--out", str(out), "--quiet",
                           "--set", "lt_start_optimizer=1"])  # fmt: skip
    torch.set_num_threads(threads)
    assert status == 0
    r = json.loads((out / "bench-tiny.json").read_text())["records"][0]
    assert r["status"] == "ok" and r["start"].startswith("PSO around optimize_posterior")
    assert r["run_key"]["overrides"] == {"lt_start_optimizer": 1}
    assert r["init_time_s"] < r["wall_time_s"] and math.isfinite(r["truth_log_posterior"])
    # The optimizer's result is inside the box and the PSO keeps the best point it has
    # seen, so its end point is no worse than the start the emcee test gets.
    assert r["start_log_posterior"] is not None and math.isfinite(r["start_log_posterior"])


def test_bench_smc_refines_the_flow_samples_and_records_its_run(bench_run):
    _, _, tree = bench_run
    r = _record(tree, "flow+smc")
    assert r["status"] == "ok" and r["n_particles"] == 64 and r["n_samples"] == 64
    assert r["temperatures"][0] == 0.0 and r["temperatures"][-1] == 1.0
    base = _record(tree, "flow+feedback")
    base = base if base["status"] == "ok" else _record(tree, "flow")
    # The flow's time (reused from its own run) plus SMC's, scaled to 10,000 particles.
    assert r["flow_time_s"] == pytest.approx(base["time_to_10k_samples_s"])
    assert r["time_to_10k_samples_s"] == pytest.approx(
        r["flow_time_s"] + r["smc_time_s"] * 10_000 / 64
    )
    for key in ("chi2_red_samples", "c2st_vs_emcee", "log_evidence", "unique_fraction"):
        assert math.isfinite(r[key]), key
    speedups = [s for s in tree["summary"]["speedups"] if s["flow"] == "flow+smc"]
    # A 10-step chain has no tau, so the ratio itself is null here; the row exists.
    assert len(speedups) == 1 and "vs_emcee" in speedups[0]


def test_bench_feedback_is_run_or_skipped_with_a_note(bench_run):
    _, _, tree = bench_run
    r = _record(tree, "flow+feedback")
    if r["status"] == "skipped":
        assert "no control net" in r["note"]
        assert any("flow+feedback skipped" in n for n in tree["notes"])
    else:
        assert r["status"] == "ok" and math.isfinite(r["chi2_red_samples"])


def test_bench_json_summary_and_hardware(bench_run):
    tmp, _, tree = bench_run
    # Strict JSON: no NaN tokens anywhere.
    json.dumps(tree, allow_nan=False)
    assert tree["hardware"]["cpu_cores"] >= 1 and tree["hardware"]["torch_threads"] == 1
    assert tree["config"]["name"] == "tiny"
    assert tree["command"].startswith("lensflow bench --config small --methods flow,")
    flow = tree["summary"]["per_method"]["flow"]
    cov = flow["coverage"]
    assert cov["levels"] == [0.68, 0.95] and cov["n_lenses"] == 1
    assert all(v in (0.0, 1.0) for pair in cov["per_param"].values() for v in pair)
    goals = {g["goal"].split(" ")[0] for g in tree["summary"]["goals"]}
    assert {"speed-up", "mean", "C2ST", "coverage"} <= goals
    # The goals are judged for flow + feedback, then again for the SMC refinement.
    judged = [g["method"] for g in tree["summary"]["goals"]]
    assert judged == ["flow+feedback"] * 5 + ["flow+smc"] * 5
    speed = tree["summary"]["speedups"][0]
    assert speed["lens"] == "demo_00" and speed["flow"] == "flow"
    assert (tmp / "out" / "figures" / "bench_corner_demo_00.png").stat().st_size > 1000
    # Read back: the same table from the JSON alone.
    again = report.load_report(tmp / "out" / "bench-tiny.json")
    md = report.markdown_report(again, command=tree["command"])
    assert "| demo_00 | emcee |" in md and again.summary["goals"] == tree["summary"]["goals"]


def test_bench_markdown_table_and_docs_block(bench_run):
    tmp, docs, _ = bench_run
    md = (tmp / "out" / "bench-tiny.md").read_text()
    assert "| lens | method | wall time [s] |" in md
    assert "| demo_00 | flow |" in md and "| demo_00 | emcee |" in md
    assert "**no**: 10 steps < 50 tau" in md
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nkept above\n") and text.endswith("\nkept below\n")
    assert "\nold\n" not in text and text.count(report.DOCS_START) == 1
    assert "| demo_00 | emcee |" in text
    assert "figures/bench_corner_demo_00.png" in text
    assert (docs.parent / "figures" / "bench_corner_demo_00.png").is_file()
    assert (docs.parent / "bench-tiny.json").is_file()


def test_parse_methods_orders_and_rejects():
    assert bench.parse_methods("emcee, flow,flow") == ("flow", "emcee")
    with pytest.raises(ValueError, match="unknown method.*'hmc'.*choose from flow"):
        bench.parse_methods("flow,hmc")
    with pytest.raises(ValueError, match="empty"):
        bench.parse_methods(" , ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "flow,mcmc"], "unknown method(s) 'mcmc'"),
        (["--methods", ""], "--methods is empty"),
        (["--n-lenses", "13"], "--n-lenses must be 1 to 12"),
        (["--set", "foo=1"], "--set: 'foo=1' is not FIELD=VALUE with FIELD one of"),
        (["--set", "emcee_steps=0"], "--set: emcee_steps must be a positive integer"),
        (["--set", "methods=flow"], "--set: 'methods=flow' is not FIELD=VALUE"),
    ],
)
def test_bench_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    status = cli.main(["bench", *argv, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("lensflow: error: ") and message in err and "\n" not in err


def test_config_overrides_are_the_changed_sizes_only():
    full = bench.BENCH_CONFIGS["full"]
    assert bench.config_overrides(full) == {}
    changed = dataclasses.replace(full, emcee_steps=25_000, methods=("flow",), n_lenses=1)
    assert bench.config_overrides(changed) == {"emcee_steps": 25_000}  # not what runs
    assert bench.config_overrides(dataclasses.replace(full, name="mine")) == {}


def test_replace_docs_block_appends_and_rejects_broken_markers(tmp_path):
    path = tmp_path / "a.md"
    path.write_text("# Title\n")
    report.replace_docs_block(path, "first")
    report.replace_docs_block(path, "second")
    text = path.read_text()
    assert text == f"# Title\n\n{report.DOCS_START}\nsecond\n{report.DOCS_END}\n"
    path.write_text(f"{report.DOCS_END}\n{report.DOCS_START}\n")
    with pytest.raises(ValueError, match="broken"):
        report.replace_docs_block(path, "x")


def test_emcee_times_follow_the_50_tau_and_10k_rules():
    # 64 walkers: 10,000 / 64 = 156.25 tau > 50 tau; opt 3 s, 0.1 s/step, 100 burn-in, tau 20.
    t = bench._emcee_times(3.0, 0.1, 100, 64, 20.0)
    assert t["time_to_50tau_s"] == pytest.approx(3.0 + 0.1 * (100 + 50 * 20))
    assert t["time_to_10k_samples_s"] == pytest.approx(3.0 + 0.1 * (100 + 156.25 * 20))
    # 1000 walkers: the 50-tau floor binds.
    t = bench._emcee_times(0.0, 1.0, 0, 1000, 10.0)
    assert t["time_to_10k_samples_s"] == pytest.approx(500.0)


def test_bench_config_full_reaches_50_tau_of_issue_3():
    full = bench.BENCH_CONFIGS["full"]
    assert full.n_lenses == 12 and full.methods == bench.METHODS
    assert full.emcee_steps >= 50 * 530  # issue 3: tau ~ 530 steps on the H100 reference
    assert dataclasses.replace(full, n_lenses=1).n_lenses == 1


def test_load_real_lenses_skips_cleanly_when_absent(tmp_path):
    lenses, notes = bench.load_real_lenses(tmp_path / "nowhere")
    assert lenses == [] and notes == [
        f"real lenses skipped: {tmp_path / 'nowhere'} is not a folder"
    ]
    (tmp_path / "EuclidQ1_x").mkdir()  # a system folder without an image
    lenses, notes = bench.load_real_lenses(tmp_path)
    assert lenses == [] and notes == ["EuclidQ1_x: no image FITS, skipped"]


def test_c2st_vs_uses_equal_sizes_so_chance_is_one_half():
    """Same distribution, 2,000 reference rows against 200: 0.5, not 2000 / 2200 = 0.91."""
    from lensflow.sampling import PosteriorSamples

    g = torch.Generator().manual_seed(11)
    ref = PosteriorSamples(torch.randn(2000, len(NAMES), generator=g, dtype=torch.float64))
    other = PosteriorSamples(torch.randn(200, len(NAMES), generator=g, dtype=torch.float64))
    cfg = dataclasses.replace(TINY, c2st_samples=1000, c2st_max_iter=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning
        score = bench._c2st_vs(ref, other, cfg, seed=0)
    assert abs(score - 0.5) < 0.1


def test_subsets_of_an_ensemble_chain_mix_the_walkers():
    """A 40-walker chain stored step-major (row = step x 40 + walker): an evenly spaced
    subset follows 4-8 walkers at a time; the C2ST and thinning subsets must not."""
    from lensflow.sampling import PosteriorSamples

    walker = torch.arange(40).repeat(250)  # 10,000 rows
    evenly = walker[torch.linspace(0, 9999, 1000).long()]
    assert max(len(evenly[i : i + 100].unique()) for i in range(0, 1000, 100)) <= 8
    picked = bench._pick(10_000, 1000)
    assert len(picked.unique()) == 1000 and bool((picked.diff() > 0).all())
    assert torch.equal(picked, bench._pick(10_000, 1000))  # seeded
    runs = walker[picked]
    assert min(len(runs[i : i + 100].unique()) for i in range(0, 1000, 100)) >= 30
    theta = walker[:, None].double().repeat(1, len(NAMES))
    assert torch.equal(bench._subset(theta, 1000)[:, 0].long(), runs)
    thinned = bench._thin(PosteriorSamples(theta, log_prob=walker.double()), 1000)
    assert torch.equal(thinned.theta[:, 0].long(), runs) and torch.equal(
        thinned.log_prob.long(), runs
    )
    assert torch.equal(bench._pick(50, 1000), torch.arange(50))  # fewer rows: all of them


def test_walker_ball_at_the_prior_edge_is_inside_and_not_degenerate():
    import numpy as np

    from lensflow.prior import Prior

    prior = Prior(dtype=torch.float64)
    walkers = bench._walker_ball(prior.low, 64, seed=0)
    assert torch.isfinite(prior.log_prob(walkers)).all()
    # emcee refuses an initial ensemble whose covariance has a condition number above 1e8.
    assert np.linalg.cond(np.cov(walkers.numpy().T)) < 1e8
    spread = walkers.std(dim=0) / (prior.high - prior.low)
    torch.testing.assert_close(spread, torch.full_like(spread, 6e-4), rtol=0.35, atol=0)


def test_every_bench_size_is_in_a_run_key_or_used_only_at_merge():
    """A new BenchConfig field must say which stored runs it shapes (bench._RUN_FIELDS)."""
    fields = {f.name for f in dataclasses.fields(bench.BenchConfig)}
    per_method = {name for names in bench._RUN_FIELDS.values() for name in names}
    groups = [per_method, set(bench._RUN_COMMON), set(bench._MERGE_FIELDS),
              set(bench._SELECTION_FIELDS)]  # fmt: skip
    assert set().union(*groups) == fields
    assert sum(map(len, groups[1:])) + len(per_method) == len(fields)  # disjoint
    assert set(bench._RUN_FIELDS) == set(bench.METHODS)


def test_run_key_keeps_only_the_method_s_sizes_and_old_keys_still_match(tmp_path):
    """Runs stored with every override of their process (before per-method keys) merge."""
    overrides = {"emcee_steps": 9, "lt_steps": 5, "smc_particles": 100, "n_kept_samples": 50}
    assert bench.run_key("full", "euclid", 3, "lenstronomy", overrides)["overrides"] == {
        "lt_steps": 5, "n_kept_samples": 50}  # fmt: skip
    assert bench.run_key("full", "euclid", 3, "flow", {"emcee_steps": 9}) == {
        "config": "full", "model": "euclid", "seed": 3}  # fmt: skip
    from lensflow.sampling import PosteriorSamples

    table_theta = torch.tensor([[0.1] * len(NAMES), [0.2] * len(NAMES)], dtype=torch.float64)
    post = PosteriorSamples(table_theta)
    folder = tmp_path / "emcee"
    old_key = {"config": "full", "model": "euclid", "seed": 3, "overrides": overrides}
    bench._save_run(folder, {"lens": "x", "method": "emcee", "run_key": old_key}, post)
    same = {"emcee_steps": 9, "n_kept_samples": 50, "lt_steps": 77, "smc_particles": 1}
    key = bench.run_key("full", "euclid", 3, "emcee", same)
    loaded = bench._load_run(folder, key, "emcee")
    assert loaded is not None and torch.equal(loaded[0].theta, table_theta)
    for other in ({"emcee_steps": 10, "n_kept_samples": 50}, {"emcee_steps": 9}, {}):
        assert bench._load_run(folder, bench.run_key("full", "euclid", 3, "emcee", other),
                               "emcee") is None  # fmt: skip
    assert bench._load_run(folder, bench.run_key("full", "euclid", 4, "emcee", overrides),
                           "emcee") is None  # fmt: skip
    (folder / "record.json").write_text('{"run_key": [1]}')  # damaged: run again
    assert bench._load_run(folder, key, "emcee") is None
    # A lenstronomy run stored before the padded likelihood dropped the PSF border: it is
    # reused only by a run that asks for that (--set lt_mask_border=1).
    folder = tmp_path / "lenstronomy"
    old_key = {"config": "full", "model": "euclid", "seed": 3}
    bench._save_run(folder, {"lens": "x", "method": "lenstronomy", "run_key": old_key}, post)
    pad_key = bench.run_key("full", "euclid", 3, "lenstronomy", {})
    mask_key = bench.run_key("full", "euclid", 3, "lenstronomy", {"lt_mask_border": 1})
    assert pad_key["lt_border"] == "pad" and mask_key["lt_border"] == "mask"
    assert bench._load_run(folder, pad_key, "lenstronomy") is None
    assert bench._load_run(folder, mask_key, "lenstronomy") is not None
    bench._save_run(folder, {"lens": "x", "method": "lenstronomy", "run_key": pad_key}, post)
    assert bench._load_run(folder, pad_key, "lenstronomy") is not None
    assert bench._load_run(folder, mask_key, "lenstronomy") is None


def test_bench_resume_reuses_stored_runs_and_lenses_keep_their_seed(tmp_path, capsys):
    """A --lenses subset stores each run; --resume reads them back with the same numbers."""
    out = tmp_path / "out"
    cfg = dataclasses.replace(TINY, methods=("flow", "emcee"))
    threads = torch.get_num_threads()
    args = ["bench", "--config", "small", "--lenses", "demo_02", "--out", str(out), "--quiet"]
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setitem(bench.BENCH_CONFIGS, "small", cfg)
        mp.setitem(bench.BENCH_CONFIGS, "tiny", cfg)  # the name the outputs carry
        assert cli.main(args) == 0
        first = json.loads((out / "bench-tiny.json").read_text())
        # Spoil the flow run's record key: that run must be made again, emcee's reused.
        folder = bench.run_folder(out, "demo_02", "flow")
        record = json.loads((folder / "record.json").read_text())
        assert record["run_key"] == {"config": "tiny", "model": "euclid", "seed": 2}
        record["run_key"]["seed"] = 99
        (folder / "record.json").write_text(json.dumps(record))
        # Say the emcee run was timed elsewhere (a GPU lease): reused, and the run notes it.
        folder = bench.run_folder(out, "demo_02", "emcee")
        record = json.loads((folder / "record.json").read_text())
        record["timed_on"] = "NVIDIA H100 80GB HBM3 + a 16-core host"
        (folder / "record.json").write_text(json.dumps(record))
        assert cli.main([*args, "--resume"]) == 0
        second = json.loads((out / "bench-tiny.json").read_text())
        second_md = (out / "bench-tiny.md").read_text()
        # Other emcee sizes (--set): the emcee run is made again and its key records the
        # change; the flow's key holds only the flow's sizes, so its run is reused.
        assert cli.main([*args, "--set", "emcee_steps=12", "--resume"]) == 0
        third = json.loads((out / "bench-tiny.json").read_text())
        bad = cli.main(["bench", "--config", "small", "--lenses", "nope", "--out", str(out)])
    torch.set_num_threads(threads)
    assert bad != 0 and "unknown lens(es) nope; available: demo_00" in capsys.readouterr().err
    assert [r["lens"] for r in first["records"]] == ["demo_02", "demo_02"]
    by1 = {r["method"]: r for r in first["records"]}
    by2 = {r["method"]: r for r in second["records"]}
    assert not by1["emcee"]["reused"] and by2["emcee"]["reused"]
    here = by1["emcee"]["timed_on"]
    assert "torch threads" in here and by2["flow"]["timed_on"] == here
    assert by2["emcee"]["timed_on"] == "NVIDIA H100 80GB HBM3 + a 16-core host"
    assert any("timed on another machine" in n and "H100" in n for n in second["notes"])
    assert not any("timed on another machine" in n for n in first["notes"])
    # The speed-up pairs a flow timed here with a chain timed there, and says so.
    mixed = [here, "NVIDIA H100 80GB HBM3 + a 16-core host"]
    assert second["summary"]["speedups"][0]["vs_emcee_timed_on"] == mixed
    assert "vs_emcee_timed_on" not in first["summary"]["speedups"][0]
    assert "same machine unless marked †" in second_md and " †" in second_md.split("† The")[0]
    assert f"† The two runs were timed on different machines (flow / MCMC): {here} / " in second_md
    goal = next(g for g in second["summary"]["goals"] if g["goal"].startswith("speed-up vs emcee"))
    assert "timed on different machines" in goal["note"]
    assert not by2["flow"]["reused"]  # key mismatch: run again, with the lens's own seed
    assert by2["emcee"]["median"] == by1["emcee"]["median"]
    assert by2["flow"]["median"] == pytest.approx(by1["flow"]["median"], rel=1e-6)
    assert by2["flow"]["c2st_vs_emcee"] == pytest.approx(by1["flow"]["c2st_vs_emcee"])
    assert "--lenses demo_02 --resume" in second["command"]
    by3 = {r["method"]: r for r in third["records"]}
    assert by3["flow"]["reused"] and not by3["emcee"]["reused"]
    assert by3["emcee"]["run_key"]["overrides"] == {"emcee_steps": 12}
    assert "overrides" not in by3["flow"]["run_key"]
    assert "--set emcee_steps=12" in third["command"]
    assert any("emcee_steps=12" in n for n in third["notes"])
    samples, meta = read_samples(bench.run_folder(out, "demo_02", "emcee"))
    assert samples.theta.shape == (42 * 12, len(NAMES)) and meta["method"] == "emcee"  # third
