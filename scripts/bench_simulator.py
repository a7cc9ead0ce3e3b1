"""Benchmark the simulator: images/s and chi^2-gradients/s against batch size.

Three implementations of the same image model (SIE + external shear, elliptical Sersic
source, elliptical Sersic lens light, Gaussian PSF):

* ``lensflow``: :class:`lensflow.simulator.LensSimulator` fed physical ``theta`` ``(B, 21)``
  (columns ``params.NAMES``); includes the e1/e2 -> q/phi conversion and the pixel-area scaling.
* ``caustics``: raw caustics built here with the same configuration, PSF kernel tensor,
  upsampling and pixel grid, called as ``torch.vmap(sim)(columns)`` with 21 column tensors
  already in caustics' q/phi/Re form (what a caustics user would write).
* ``lenstronomy``: single-image, through ``lensflow.baselines.lenstronomy`` (timed as a loop
  over a few images; it has no autodiff, so it has no gradient column).

Timing: warm-up calls, then ``--repeats`` timed blocks per case, each block long enough
(``--min-time``) to be measured reliably; the figure is the median block. lensflow and raw
caustics blocks alternate so that slow drifts of the machine hit both. Each block records
the 1-minute load average and the CPU utilisation of this process; a case whose blocks
look disturbed (utilisation below ``--min-util`` or a large spread) is re-run.

CPU runs re-execute the script with the glibc malloc thresholds from
docs/conventions-notes.md (without them, freeing large autograd buffers makes timings
erratic) and pin torch to ``--threads`` threads.

Example:
    python scripts/bench_simulator.py --dtype float32 --batch-sizes 1 10 100 1000 \
        --out bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "268435456"}
REFERENCE = "reference"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--config",
        default=REFERENCE,
        help="'reference' (100x100, 0.05\"/px, no supersampling, Gaussian PSF FWHM 0.1\") "
        "or a preset name (hst, euclid)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 10, 100, 1000])
    p.add_argument(
        "--grad-batch-sizes",
        type=int,
        nargs="*",
        default=None,
        help="batch sizes for chi^2 gradients (default: --batch-sizes; empty: skip)",
    )
    p.add_argument("--lenstronomy-images", type=int, default=20, help="0 skips lenstronomy")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed block")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--min-util", type=float, default=0.8, help="CPU use below this = disturbed")
    p.add_argument("--max-retries", type=int, default=2, help="re-runs of a disturbed case")
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="vmap chunk_size, for LensSimulator and raw caustics alike (default: LensSimulator's automatic choice: bounded chunks on CPU, whole batch on GPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    p.add_argument("--no-reexec", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def reexec_with_malloc_env(args: argparse.Namespace) -> None:
    """Re-run this process with the malloc thresholds and OMP threads set, if not yet set."""
    want = {**MALLOC_ENV, "OMP_NUM_THREADS": str(args.threads)}
    if args.no_reexec or all(os.environ.get(k) == v for k, v in want.items()):
        return
    env = {**os.environ, **want}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def hardware_info(torch, device: str) -> dict:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_start": os.getloadavg(),
    }
    for pkg in ("caustics", "caskade", "lenstronomy", "numpy"):
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = None
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout
        info["git_sha"] = sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        info["git_sha"] = None
    return info


def build_raw_caustics(config, psf, dtype, device):
    """caustics' LensSource for ``config``, built the way a caustics user would."""
    import caustics
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # FlatLambdaCDM, NumPy 2
        cosmo = caustics.FlatLambdaCDM(name="cosmo")
    sie = caustics.SIE(cosmology=cosmo, name="sie")
    shear = caustics.ExternalShear(cosmology=cosmo, name="shear", x0=0.0, y0=0.0)
    lens = caustics.SinglePlane(
        cosmology=cosmo, lenses=[sie, shear], z_l=0.5, z_s=1.0, name="lens"
    )
    src = caustics.Sersic(name="source", use_lenstronomy_k=True)
    ll = caustics.Sersic(name="lens_light", use_lenstronomy_k=True)
    sim = caustics.LensSource(
        lens=lens,
        source=src,
        lens_light=ll,
        pixelscale=config.pixel_scale_arcsec,
        pixels_x=config.n_pix,
        psf=psf,
        upsample_factor=config.upsample_factor,
        name="sim",
    )
    sim.to(device=torch.device(device), dtype=dtype)
    return sim


class Timer:
    """Median-of-blocks timing with device sync, load and CPU-utilisation records."""

    def __init__(self, torch, device: str, args: argparse.Namespace) -> None:
        self.torch = torch
        self.cuda = device.startswith("cuda")
        self.args = args

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def one_call(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def block(self, fn: Callable[[], object], n_inner: int) -> dict:
        load = os.getloadavg()[0]
        self.sync()
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n_inner):
            fn()
        self.sync()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        return {"s_per_call": wall / n_inner, "util": cpu / wall, "load1": load}

    def compare(self, fns: dict[str, Callable[[], object]]) -> dict[str, dict]:
        """Time several callables on the same footing, alternating their blocks."""
        n_inner = {}
        for name, fn in fns.items():
            for _ in range(max(1, self.args.warmup)):
                t = self.one_call(fn)
            n_inner[name] = max(1, math.ceil(self.args.min_time / max(t, 1e-9)))
        blocks: dict[str, list[dict]] = {name: [] for name in fns}
        names = list(fns)
        for r in range(self.args.repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                blocks[name].append(self.block(fns[name], n_inner[name]))
        out = {}
        for name, bs in blocks.items():
            times = [b["s_per_call"] for b in bs]
            med = statistics.median(times)
            util = statistics.median(b["util"] for b in bs)
            spread = (max(times) - min(times)) / med
            out[name] = {
                "s_per_call": med,
                "s_per_call_all": times,
                "n_inner": n_inner[name],
                "cpu_util": util,
                "spread": spread,
                "load1": [b["load1"] for b in bs],
                # CPU utilisation only means something on CPU (GPU runs wait in sync).
                "disturbed": (not self.cuda and util < self.args.min_util) or spread > 0.5,
            }
        return out

    def robust_compare(self, fns: dict[str, Callable[[], object]], label: str) -> dict:
        """``compare``, re-run (up to ``--max-retries``) while any case looks disturbed."""
        best = None
        for attempt in range(self.args.max_retries + 1):
            res = self.compare(fns)
            n_bad = sum(r["disturbed"] for r in res.values())
            if best is None or n_bad < best[0]:
                best = (n_bad, res)
            if n_bad == 0:
                break
            print(
                f"  [{label}] disturbed (attempt {attempt + 1}, load {os.getloadavg()[0]:.2f})"
                f"; re-running",
                flush=True,
            )
            time.sleep(5)
        for r in best[1].values():
            r["attempts"] = attempt + 1
        return best[1]


def bench_lenstronomy(theta, config, n_images: int, timer: Timer, lensflow_images) -> dict:
    """Single-image lenstronomy renders through the lensflow adapter, timed as loops.

    Two figures: ``render_lenstronomy(theta[:n], config)`` (what the adapter costs per call,
    including building the ``ImageModel`` once per call) and a prebuilt ``image_model`` on
    the same PSF-padded grid with only ``ImageModel.image`` in the loop (the per-image cost
    inside a likelihood). lenstronomy works in float64 and has no autodiff.
    """
    try:
        from lensflow.baselines import lenstronomy as adapter
    except ImportError as err:
        return {"skipped": f"lensflow.baselines.lenstronomy not importable: {err}"}
    theta = theta[:n_images].double().cpu()
    n_pad = adapter.psf_pad_pix(config)
    model = adapter.image_model(config, n_pad=n_pad)
    kwargs = [adapter.to_lenstronomy(t) for t in theta]

    def render() -> object:
        return adapter.render_lenstronomy(theta, config)

    def image_loop() -> None:
        for kw in kwargs:
            model.image(kw.kwargs_lens, kw.kwargs_source, kw.kwargs_lens_light)

    res = timer.robust_compare(
        {"render_lenstronomy": render, "ImageModel.image": image_loop}, "lenstronomy"
    )
    for r in res.values():
        r["images_per_s"] = n_images / r["s_per_call"]
    # Informational parity with lensflow on the first images (lensflow at the bench dtype).
    k = min(n_images, lensflow_images.shape[0])
    ref = render()[:k]
    mine = lensflow_images[:k].double().cpu().numpy()
    return {
        "n_images": n_images,
        "n_pad": n_pad,
        "render_lenstronomy": res["render_lenstronomy"],
        "image_model_loop": res["ImageModel.image"],
        "parity_max_abs_over_peak": float(abs(mine - ref).max() / abs(ref).max()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reexec_with_malloc_env(args)
    # torch is imported only after the re-exec, so that OMP_NUM_THREADS applies to it.
    import torch

    from lensflow.config import PRESETS, SimulatorConfig, preset
    from lensflow.params import to_caustics
    from lensflow.prior import Prior
    from lensflow.simulator import LensSimulator, NoiseModel, chi2

    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.config == REFERENCE:
        config = SimulatorConfig(
            name=REFERENCE,
            n_pix=100,
            pixel_scale_arcsec=0.05,
            upsample_factor=1,
            psf_fwhm_arcsec=0.1,
        )
    elif args.config in PRESETS:
        config = preset(args.config)
    else:
        raise SystemExit(f"--config must be {REFERENCE!r} or one of {sorted(PRESETS)}")
    grad_sizes = args.batch_sizes if args.grad_batch_sizes is None else args.grad_batch_sizes
    info = hardware_info(torch, device)
    print(
        f"# {info['cpu_model']} ({info['cpu_affinity']} cores), device={device} "
        f"{info['gpu'] or ''}, torch {info['torch']} ({info['torch_threads']} threads), "
        f"caustics {info['caustics']}, {args.dtype}, config={config.name}, "
        f"load {info['loadavg_start'][0]:.2f}",
        flush=True,
    )

    timer = Timer(torch, device, args)
    torch.manual_seed(args.seed)  # the noise draw of the observation
    gen = torch.Generator().manual_seed(args.seed)
    n_max = max([*args.batch_sizes, *grad_sizes, args.lenstronomy_images, 1])
    theta_all = Prior(dtype=torch.float64).sample((n_max,), generator=gen)

    sim = LensSimulator(config, dtype=dtype, device=device, chunk_size=args.chunk_size)
    # Same PSF kernel tensor (normalized, at the upsampled pixel scale) as the wrapper.
    raw = build_raw_caustics(config, sim.psf.detach().clone(), dtype, device)
    pixel_area = config.pixel_scale_arcsec**2

    theta_dev = theta_all.to(device=device, dtype=dtype)
    # Raw caustics gets its inputs already in q/phi/Re form, one contiguous tensor per column.
    cols_all = [c.contiguous() for c in to_caustics(theta_all).values()]
    cols_all = [c.to(device=device, dtype=dtype) for c in cols_all]

    # Observation for chi^2: one noisy image; raw caustics works in its own units (mean SB).
    noise = NoiseModel.from_config(config)
    with torch.no_grad():
        x_clean = sim(theta_dev[0])
        sigma = noise.sigma(x_clean)
        x_obs = noise.sample(x_clean, generator=None)
        # Same-configuration check: the wrapper must be raw caustics times the pixel area. Not
        # a parity test: LensSimulator rebuilds caustics' float32 pixel grid in float64 (a
        # ~1e-5 difference), while a wrong PSF, grid or upsampling would differ at O(1).
        check = torch.vmap(raw)([c[:4] for c in cols_all]) * pixel_area
        max_rel = float((sim(theta_dev[:4]) - check).abs().max() / check.abs().max())
    if max_rel > 1e-4:
        raise SystemExit(f"lensflow and raw caustics disagree (max rel {max_rel:.2e})")
    x_obs_raw, sigma_raw = x_obs / pixel_area, sigma / pixel_area
    results: dict = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "config": dataclasses.asdict(config),
        "psf_shape": list(sim.psf.shape),
        "parity_lensflow_vs_caustics_max_rel": max_rel,
        "hardware": info,
        "forward": [],
        "gradient": [],
    }

    for b in args.batch_sizes:
        theta, cols = theta_dev[:b], [c[:b] for c in cols_all]

        def fwd_lensflow(theta=theta) -> object:
            with torch.no_grad():
                return sim(theta)

        def fwd_caustics(cols=cols) -> object:
            with torch.no_grad():
                return torch.vmap(raw, chunk_size=sim.chunk_size)(cols)

        res = timer.robust_compare(
            {"lensflow": fwd_lensflow, "caustics": fwd_caustics}, f"forward B={b}"
        )
        row = _row(b, res)
        results["forward"].append(row)
        print(
            f"forward  B={b:>6}: lensflow {row['lensflow_per_s']:>10.1f}/s, caustics "
            f"{row['caustics_per_s']:>10.1f}/s, ratio {row['overhead_ratio']:.3f} "
            f"(load {row['load1_max']:.2f})",
            flush=True,
        )

    for b in grad_sizes:
        theta, cols = theta_dev[:b], [c[:b] for c in cols_all]

        def grad_lensflow(theta=theta) -> object:
            t = theta.clone().requires_grad_(True)
            chi2(sim(t), x_obs, sigma).sum().backward()
            return t.grad

        def grad_caustics(cols=cols) -> object:
            leaves = [c.clone().requires_grad_(True) for c in cols]
            img = torch.vmap(raw, chunk_size=sim.chunk_size)(leaves)
            (((img - x_obs_raw) / sigma_raw) ** 2).sum().backward()
            return [c.grad for c in leaves]

        res = timer.robust_compare(
            {"lensflow": grad_lensflow, "caustics": grad_caustics}, f"gradient B={b}"
        )
        row = _row(b, res)
        results["gradient"].append(row)
        print(
            f"gradient B={b:>6}: lensflow {row['lensflow_per_s']:>10.1f}/s, caustics "
            f"{row['caustics_per_s']:>10.1f}/s, ratio {row['overhead_ratio']:.3f} "
            f"(load {row['load1_max']:.2f})",
            flush=True,
        )

    if args.lenstronomy_images > 0:
        with torch.no_grad():
            lf_images = sim(theta_dev[: min(4, args.lenstronomy_images)])
        lt = bench_lenstronomy(theta_all, config, args.lenstronomy_images, timer, lf_images)
        results["lenstronomy"] = lt
        if "skipped" in lt:
            print(f"lenstronomy: skipped ({lt['skipped']})")
        else:
            print(
                f"lenstronomy: render_lenstronomy {lt['render_lenstronomy']['images_per_s']:.1f}"
                f" images/s, prebuilt ImageModel.image "
                f"{lt['image_model_loop']['images_per_s']:.1f} images/s ({lt['n_images']} "
                f"images, float64); max|lensflow - lenstronomy|/peak "
                f"{lt['parity_max_abs_over_peak']:.1e}",
                flush=True,
            )

    results["hardware"]["loadavg_end"] = os.getloadavg()
    print()
    print(markdown_tables(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")
    return 0


def _row(batch: int, res: dict) -> dict:
    lf, ca = res["lensflow"], res["caustics"]
    return {
        "batch": batch,
        "lensflow_per_s": batch / lf["s_per_call"],
        "caustics_per_s": batch / ca["s_per_call"],
        # > 1 means the wrapper is slower than raw caustics.
        "overhead_ratio": lf["s_per_call"] / ca["s_per_call"],
        "load1_max": max(*lf["load1"], *ca["load1"]),
        "lensflow": lf,
        "caustics": ca,
    }


def markdown_tables(results: dict) -> str:
    lines = []
    for kind, unit in (("forward", "images/s"), ("gradient", "chi^2 gradients/s")):
        if not results[kind]:
            continue
        lines += [
            (
                f"| batch | lensflow {unit} | raw caustics {unit} | lensflow / caustics time "
                "| load (1 min, max) | CPU util lensflow / caustics |"
            ),
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in results[kind]:
            flag = (
                " (disturbed)" if r["lensflow"]["disturbed"] or r["caustics"]["disturbed"] else ""
            )
            lines.append(
                f"| {r['batch']} | {r['lensflow_per_s']:,.1f} | {r['caustics_per_s']:,.1f} "
                f"| {r['overhead_ratio']:.3f}{flag} | {r['load1_max']:.2f} "
                f"| {r['lensflow']['cpu_util']:.2f} / {r['caustics']['cpu_util']:.2f} |"
            )
        lines.append("")
    lt = results.get("lenstronomy")
    if lt and "skipped" not in lt:
        lines += [
            (
                "| lenstronomy (float64, one image at a time) | images/s | est. FD gradients/s "
                "| load (1 min, max) |"
            ),
            "|---|---:|---:|---:|",
        ]
        for key, label in (
            ("render_lenstronomy", f"`render_lenstronomy` ({lt['n_images']} images per call)"),
            ("image_model_loop", "prebuilt `image_model(...).image` loop"),
        ):
            r = lt[key]
            # No autodiff: a forward-difference gradient costs 21 + 1 renders.
            lines.append(
                f"| {label} | {r['images_per_s']:,.1f} | "
                f"{r['images_per_s'] / 22:,.2f} | {max(r['load1']):.2f} |"
            )
    elif lt:
        lines.append(f"lenstronomy: skipped ({lt['skipped']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
