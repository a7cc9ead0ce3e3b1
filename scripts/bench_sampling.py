"""Benchmark the amortized posterior: time to N samples for one lens, and lenses/s in a batch.

Usage (repository root):
    python scripts/bench_sampling.py --model euclid --device cpu --threads 2 \
        --one-lens-samples 10000 --batch-lenses 1000 --batch-samples 100

Measures ``FlowPosterior.sample`` on the network inputs of simulated lenses (the observation
is embedded once per lens and reused by every ODE step and sample), with the model's default
solver and step count unless overridden. Prints a Markdown row per case and the hardware.
"""

import argparse
import os
import platform
import time

import torch

from lensflow.checkpoint import load_model
from lensflow.data import SimulatedPairs
from lensflow.solvers import SOLVERS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up call."""
    start = time.perf_counter()
    fn()
    _sync(device)
    print(f"<!-- warm-up call {time.perf_counter() - start:.3f} s -->", flush=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _table(cases: list, sample, device: torch.device, repeats: int) -> None:
    """Print the Markdown table of ``sample(lenses, samples_per_lens)`` timed per case."""
    print("| case | lenses | samples per lens | wall time [s] | lenses/s | samples/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, b, n in cases:
        t = _time(lambda b=b, n=n: sample(b, n), device, repeats)
        print(f"| {label} | {b} | {n} | {t:.3f} | {b / t:.1f} | {b * n / t:,.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="euclid")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one-lens-samples", type=int, default=10_000)
    parser.add_argument("--batch-lenses", type=int, default=1000)
    parser.add_argument("--batch-samples", type=int, default=100)
    parser.add_argument("--n-steps", type=int, default=None)
    parser.add_argument("--solver", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--feedback", default="none",
                        help="also time sampling with this shipped control net (gradient, "
                        "learned) through sampling.sample_posteriors, on --feedback-lenses "
                        "observations")  # fmt: skip
    parser.add_argument("--feedback-lenses", type=int, default=100)
    parser.add_argument("--control-steps", type=int, default=None,
                        help="feedback: solver steps on [t_start, 1] (default: the control "
                        "net's)")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="feedback: render through torch.compile (lens_cost(compile=True)); "
                        "the warm-up call, timed apart, compiles")  # fmt: skip
    parser.add_argument("--feedback-samplers", nargs="+", default=None,
                        metavar="SOLVER:N_STEPS[:CONTROL_STEPS]",
                        help="feedback: time each of these samplers, e.g. euler:40:8 "
                        "midpoint:20:2 (default: the control net's own, with "
                        "--control-steps)")  # fmt: skip
    args = parser.parse_args()
    if args.feedback_samplers:
        try:
            args.feedback_samplers = [_parse_sampler(s) for s in args.feedback_samplers]
        except ValueError as err:
            parser.error(str(err))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(args.model)
    post = model.posterior.to(device).eval()
    n_steps = args.n_steps or post.n_steps
    solver = args.solver or post.solver
    pairs = SimulatedPairs(model.simulator, model.data, device=device)
    x = pairs.sample(args.batch_lenses, generator=torch.Generator(device).manual_seed(0)).x
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads, device {device} (GPU: {gpu}), "
        f"model {args.model}, solver {solver} x {n_steps} steps "
        f"({SOLVERS[solver][1] * n_steps} field evaluations), load {os.getloadavg()[0]:.2f}"
    )

    def flow(b: int, n: int) -> None:
        with torch.no_grad():
            post.sample(x[:b], n, n_steps=n_steps, solver=solver)

    cases = [
        ("one lens", 1, args.one_lens_samples),
        ("batch", args.batch_lenses, args.batch_samples),
    ]
    _table(cases, flow, device, args.repeats)
    if args.feedback != "none":
        _bench_feedback(model, pairs, args, device)


def _bench_feedback(model, pairs: SimulatedPairs, args, device: torch.device) -> None:
    """Time ``sample_posteriors`` with a control net: the user's path, observations in."""
    from lensflow.checkpoint import load_control
    from lensflow.sampling import describe_sampler, sample_posteriors, sampler_settings

    control = load_control(args.feedback, model)
    test = pairs.sample(args.feedback_lenses, generator=torch.Generator(device).manual_seed(1))
    observations = pairs.observations(test)
    # The control net's own sampler by default; an explicit SOLVER applies to both segments.
    samplers = args.feedback_samplers or [(None, None, args.control_steps)]
    for solver, n_steps, control_steps in samplers:
        s = sampler_settings(model, control, n_steps=n_steps, solver=solver,
                             control_steps=control_steps)  # fmt: skip
        print(f"\n# feedback {control.kind} ({control.path}): {describe_sampler(s)}")

        def feedback(b: int, n: int, s=s) -> None:
            sample_posteriors(observations[:b], model, n, feedback=control,
                              generator=torch.Generator(device).manual_seed(0),
                              solver=s["solver"], n_steps=s["n_steps"],
                              control_steps=s["control_steps"], base_solver=s["base_solver"],
                              compile=args.compile)  # fmt: skip

        cases = [
            ("one lens, feedback", 1, args.one_lens_samples),
            ("batch, feedback", args.feedback_lenses, args.batch_samples),
        ]
        _table(cases, feedback, device, args.repeats)


def _parse_sampler(text: str) -> tuple[str, int, int | None]:
    """``"midpoint:20:2"`` -> ``("midpoint", 20, 2)``; the control steps are optional."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in SOLVERS:
        raise ValueError(f"sampler {text!r}: want SOLVER:N_STEPS[:CONTROL_STEPS] with SOLVER "
                         f"one of {', '.join(SOLVERS)}")  # fmt: skip
    try:
        numbers = [int(v) for v in parts[1:]]
    except ValueError:
        raise ValueError(f"sampler {text!r}: steps must be integers") from None
    return parts[0], numbers[0], numbers[1] if len(numbers) == 2 else None


if __name__ == "__main__":
    main()
