"""Tests of lensflow.sbi: tasks against sbibm's stored data, transforms, a tiny benchmark run."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lensflow.sbi import BenchConfig, get_task, load_reference, run_benchmark
from lensflow.sbi.bench import StandardizedTransform, simulate_budget
from lensflow.sbi.reference import N_OBSERVATIONS
from lensflow.sbi.tasks import SIR, TASKS, LotkaVolterra

NAMES = sorted(TASKS)


@pytest.mark.parametrize("name", NAMES)
def test_task_prior_and_simulator_shapes(name):
    task = get_task(name)
    g = torch.Generator().manual_seed(0)
    theta = task.sample_prior(64, generator=g)
    x = task.simulate(theta, generator=g)
    assert theta.shape == (64, task.dim_parameters)
    assert x.shape == (64, task.dim_data)
    assert torch.isfinite(task.prior().log_prob(theta)).all()
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", NAMES)
def test_task_unconstrained_round_trip_and_jacobian(name):
    task = get_task(name)
    theta = task.sample_prior(8, generator=torch.Generator().manual_seed(1)).double()
    y = task.to_unconstrained(theta)
    torch.testing.assert_close(task.from_unconstrained(y), theta)
    jac = torch.func.vmap(torch.func.jacrev(task.to_unconstrained))(theta)
    torch.testing.assert_close(task.log_abs_det(theta), torch.linalg.slogdet(jac).logabsdet)


def test_standardized_transform_round_trip():
    task = get_task("slcp")
    theta = task.sample_prior(16, generator=torch.Generator().manual_seed(2)).double()
    tr = StandardizedTransform(
        task, torch.full((5,), 0.3).double(), torch.full((5,), 2.0).double()
    )
    torch.testing.assert_close(tr.from_u(tr.to_u(theta)), theta)


@pytest.mark.parametrize("name", NAMES)
def test_reference_files_load(name):
    task = get_task(name)
    for k in (1, N_OBSERVATIONS):
        ref = load_reference(name, k)
        assert ref.observation.shape == (1, task.dim_data)
        assert ref.true_parameters.shape == (1, task.dim_parameters)
        assert ref.samples.shape == (10_000, task.dim_parameters)
        assert torch.isfinite(task.prior().log_prob(ref.samples)).all()


@pytest.mark.parametrize("name", ["two_moons", "slcp", "lotka_volterra"])
def test_task_reproduces_sbibm_observations_from_seeds(name):
    # sbibm drew each truth from the prior and then simulated, right after
    # torch.manual_seed(seed); the same draws in the same order give its stored numbers.
    task = get_task(name)
    refs = [load_reference(name, k) for k in range(1, N_OBSERVATIONS + 1)]
    gens = [torch.Generator().manual_seed(r.seed) for r in refs]
    theta = torch.cat([task.sample_prior(1, generator=g) for g in gens])
    torch.testing.assert_close(theta, torch.cat([r.true_parameters for r in refs]))
    if name == "lotka_volterra":  # one batched ODE solve, then each seed's noise
        mean = task.forward(theta)
        eps = torch.cat([torch.randn(1, task.dim_data, generator=g) for g in gens])
        x = torch.exp(torch.log(mean) + task.noise_scale * eps)
    else:
        x = torch.cat(
            [task.simulate(t[None], generator=g) for t, g in zip(theta, gens, strict=True)]
        )
    torch.testing.assert_close(x, torch.cat([r.observation for r in refs]), rtol=1e-5, atol=1e-6)


def test_sir_observations_are_typical_of_the_simulator():
    # Binomial draws are not reproducible across samplers, so compare distributions: at its
    # true parameters, each stored observation's log-likelihood lies inside the range of the
    # simulator's own draws, and the truths themselves reproduce from the seeds.
    task = get_task("sir")
    refs = [load_reference("sir", k) for k in range(1, N_OBSERVATIONS + 1)]
    theta = torch.cat([task.sample_prior(1, generator=torch.Generator().manual_seed(r.seed))
                       for r in refs])  # fmt: skip
    torch.testing.assert_close(theta, torch.cat([r.true_parameters for r in refs]))
    x_obs = torch.cat([r.observation for r in refs])
    n_draws = 1000
    theta_rep = theta.repeat(n_draws, 1)
    x_sim = task.simulate(theta_rep, generator=torch.Generator().manual_seed(0))
    ll_sim = task.log_likelihood(theta_rep, x_sim).reshape(n_draws, -1)
    ll_obs = task.log_likelihood(theta, x_obs)
    quantile = (ll_sim < ll_obs).double().mean(0)
    # Observation 10 sits in the lower 0.5% tail (its late counts 1 and 2 where about 0.4
    # and 0.1 are expected); no observation is more extreme than every draw, and on
    # average they are typical.
    assert ((quantile > 0) & (quantile < 1)).all(), quantile
    assert 0.3 < quantile.mean() < 0.7, quantile


@pytest.mark.parametrize("name", ["slcp", "lotka_volterra", "sir"])
def test_log_likelihood_is_finite_and_differentiable(name):
    task = {"lotka_volterra": LotkaVolterra(n_sub=5), "sir": SIR(n_sub=2)}.get(name) or get_task(
        name
    )
    g = torch.Generator().manual_seed(3)
    theta = task.sample_prior(4, generator=g).double()
    x = task.simulate(theta, generator=g)
    theta.requires_grad_(True)
    ll = task.log_likelihood(theta, x)
    (grad,) = torch.autograd.grad(ll.sum(), theta)
    assert ll.shape == (4,)
    assert torch.isfinite(ll).all() and torch.isfinite(grad).all()


def test_slcp_log_likelihood_matches_torch():
    task = get_task("slcp")
    g = torch.Generator().manual_seed(4)
    theta = task.sample_prior(6, generator=g).double()
    x = task.simulate(theta, generator=g)
    s1, s2, rho = theta[:, 2] ** 2, theta[:, 3] ** 2, torch.tanh(theta[:, 4])
    cov = torch.stack([torch.stack([s1**2 + 1e-6, rho * s1 * s2], -1),
                       torch.stack([rho * s1 * s2, s2**2 + 1e-6], -1)], -2)  # fmt: skip
    mvn = torch.distributions.MultivariateNormal(theta[:, None, :2], cov[:, None])
    expected = mvn.log_prob(x.reshape(-1, 4, 2)).sum(-1)
    torch.testing.assert_close(task.log_likelihood(theta, x), expected)


def test_simulate_budget_drops_nothing_finite():
    theta, x = simulate_budget(get_task("two_moons"), 100, generator=torch.Generator())
    assert theta.shape == (100, 2) and x.shape == (100, 2)


def test_get_task_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("gaussian_linear")


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer:UserWarning")  # capped C2ST epochs
def test_benchmark_two_moons_small_budget_runs(one_thread):
    pytest.importorskip("sklearn")
    cfg = dataclasses.replace(
        BenchConfig(), width=64, n_blocks=2, embed_dim=32, encoder_width=64, max_epochs=60,
        patience=60, batch_size=64, n_samples=1000, n_steps=16, c2st_max_iter=200,
    )  # fmt: skip
    result = run_benchmark(get_task("two_moons"), 1000, cfg, seed=0, num_observations=(1,))
    assert result.c2st.shape == (1,)
    # The pipeline check only: so short a run is far from converged (the benchmark's own
    # numbers are in docs/sbi-benchmark.md).
    assert 0.5 <= result.c2st.item() <= 1.0, result.c2st
    assert result.train_s > 0 and result.score_s > 0


@pytest.mark.parametrize("name", ["lotka_volterra", "sir"])
def test_feedback_cost_is_small_at_the_truth(name):
    from lensflow.flow import FlowPosterior
    from lensflow.sbi.bench import build_posterior
    from lensflow.sbi.control import observed_data, task_cost

    task = get_task(name)
    g = torch.Generator().manual_seed(5)
    theta, x = simulate_budget(task, 64, generator=g)
    posterior: FlowPosterior = build_posterior(task, theta, x, BenchConfig(width=16, n_blocks=1))
    cost = task_cost(task, posterior, n_sub=5)
    u = posterior.transform.to_u(theta)
    at_truth = cost(u, observed_data(task, x))
    shifted = cost(u + 0.5, observed_data(task, x))
    assert at_truth.shape == (64,)
    assert at_truth.median() < 3 and shifted.median() > at_truth.median()


@pytest.mark.filterwarnings("ignore:Stochastic Optimizer:UserWarning")  # capped C2ST epochs
def test_feedback_benchmark_smoke(one_thread):
    # A few seconds: tiny networks, few samples, a capped C2ST classifier.
    pytest.importorskip("sklearn")
    from lensflow.feedback import FinetuneConfig
    from lensflow.sbi.control import run_feedback_benchmark

    cfg = BenchConfig(width=32, n_blocks=1, embed_dim=16, encoder_width=32, max_epochs=3,
                      n_samples=200, n_steps=8, c2st_max_iter=50)  # fmt: skip
    fcfg = FinetuneConfig(n_steps=3, batch_size=32, width=16, n_blocks=1, n_steps_sample=10,
                          solver="euler")  # fmt: skip
    seen = []
    results = run_feedback_benchmark(get_task("sir"), 200, ("flow", "gradient", "learned", "zero"),
                                     cfg, fcfg, n_sub=1, num_observations=(1,),
                                     on_result=seen.append)  # fmt: skip
    assert seen == results
    assert [r.method for r in results] == ["flow", "flow+gradient", "flow+learned", "flow+zero"]
    assert all(0.4 <= r.c2st.item() <= 1.0 for r in results)
    # 10 Euler steps with control for t > 0.8: 2 controlled steps, one ODE solve each.
    assert [r.sim_calls_per_sample for r in results] == [0, 2, 2, 0]
    assert [r.finetune_sim_calls for r in results] == [0, 3 * 32, 3 * 32, 0]
    assert results[0].sampler == "euler 10"
    assert results[1].sampler == "euler 10, control t > 0.8"
    # A fresh control net is zero-initialized and the zero signal carries no information:
    # three finetuning steps move it little, so it samples almost like the base flow.
    assert abs(results[3].c2st.item() - results[0].c2st.item()) < 0.2


def test_feedback_benchmark_rejects_unknown_method():
    from lensflow.feedback import FinetuneConfig
    from lensflow.sbi.control import run_feedback_benchmark

    with pytest.raises(ValueError, match="unknown feedback methods"):
        run_feedback_benchmark(get_task("sir"), 10, ("oracle",), BenchConfig(), FinetuneConfig())


def _bench_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "sbi_bench.py"
    spec = importlib.util.spec_from_file_location("sbi_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_joins_observation_splits_per_sampler(tmp_path):
    import json

    base = {"task": "sir", "n_simulations": 1000, "seed": 0, "n_epochs": 7, "train_s": 1.0,
            "config": {"solver": "midpoint", "n_steps": 32}}  # fmt: skip
    rows = [
        base | {"method": "flow", "c2st": [0.8], "num_observations": [1], "score_s": 2.0},
        base | {"method": "flow", "c2st": [0.6], "num_observations": [2], "score_s": 3.0},
        # The same network scored with the feedback sampler is a separate row.
        base | {"method": "flow", "sampler": "euler 40", "c2st": [0.7, 0.8],
                "num_observations": [1, 2], "score_s": 1.0},
        base | {"method": "flow+gradient", "sampler": "euler 40, control t > 0.8",
                "c2st": [0.55, 0.65], "num_observations": [1, 2], "score_s": 4.0,
                "sim_calls_per_sample": 8},
    ]  # fmt: skip
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = _bench_script().render_table([path]).splitlines()
    assert len(table) == 2 + 3
    joined = next(line for line in table if "| midpoint 32 |" in line)
    assert "| 0.700 ± 0.141 | 0.600–0.800 | 1–2 |" in joined and "| 5 |" in joined
    gradient = next(line for line in table if "flow+gradient" in line)
    assert "| 0.600 ± 0.071 |" in gradient and "| 8 |" in gradient
    # The published sbibm NPE number of the same task and budget (sir, 10^3).
    assert all(line.endswith("| 0.815 (published) |") for line in table[2:])
    # Paired differences: the Euler-40 base row against the variant, per observation.
    # Gradient 0.55, 0.65 against the base's 0.70, 0.80: -0.15 on both observations.
    paired = _bench_script().render_paired([path]).splitlines()
    assert len(paired) == 3
    assert paired[2] == ("| sir | 1e+03 | 1–2 | \u22120.150 ± 0.000 (2/2 better by > 0.001) | - "
                         "| - |")  # fmt: skip


def test_docs_table_is_the_rendering_of_the_shipped_rows():
    # docs/sbi-benchmark.md's table is generated: --table docs/sbi-benchmark-results.jsonl
    # --docs docs/sbi-benchmark.md must leave it unchanged.
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "docs"
    script = _bench_script()
    table = script.render_table([root / "sbi-benchmark-results.jsonl"])
    start, end = script.DOCS_MARKERS
    text = (root / "sbi-benchmark.md").read_text()
    assert f"{start}\n{table}\n{end}" in text, (
        "regenerate with: python scripts/sbi_bench.py --table docs/sbi-benchmark-results.jsonl "
        "--docs docs/sbi-benchmark.md"
    )
