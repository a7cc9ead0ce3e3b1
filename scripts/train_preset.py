"""Train a posterior for an instrument preset (thin driver over ``lensflow.train.train_model``).

Example (the shipped CPU model, docs/training.md)::

    python scripts/train_preset.py --preset euclid --steps 3000 --batch-size 64 \
        --threads 1 --out runs/euclid_cpu

A GPU run with a wall-clock budget (docs/training.md, "Shipped models")::

    python scripts/train_preset.py --preset hst --device cuda --time-limit 330 \
        --steps 100000 --batch-size 256 --base-channels 40 --width 512 --n-blocks 4 \
        --embed-dim 256 --tf32 --out runs/hst_gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

import torch

from lensflow.config import FlowConfig, TrainConfig, data_preset, preset, run_provenance
from lensflow.prior import TRAINING_PRIORS
from lensflow.train import train_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="euclid")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--base-channels", type=int, default=FlowConfig().base_channels)
    p.add_argument("--width", type=int, default=FlowConfig().width, help="residual MLP width")
    p.add_argument("--n-blocks", type=int, default=FlowConfig().n_blocks)
    p.add_argument("--embed-dim", type=int, default=FlowConfig().embed_dim)
    p.add_argument("--warmup", type=int, default=TrainConfig().warmup_steps)
    p.add_argument("--ema-decay", type=float, default=TrainConfig().ema_decay)
    p.add_argument("--n-val", type=int, default=TrainConfig().n_val)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--time-limit", type=float, default=None,
                   help="wall-clock budget in s (TrainConfig.time_limit_s)")  # fmt: skip
    p.add_argument("--times-per-example", type=int, default=1,
                   help="(t, z) draws per simulated image (TrainConfig.times_per_example)")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tf32", action="store_true",
                   help="allow TF32 matrix products on CUDA (the network; the simulator's "
                   "FFT convolution is unaffected)")  # fmt: skip
    p.add_argument("--mask-probability", type=float, default=0.0,
                   help="fraction of training images with random likelihood masks "
                   "(DataConfig.mask_probability; the shipped CPU models used 0)")  # fmt: skip
    p.add_argument("--mask-max-fraction", type=float, default=None, metavar="F",
                   help="largest masked fraction of an image (DataConfig.mask_max_fraction; "
                   "default: the preset's, 0.15); the reliable flag's mask check scales with it")  # fmt: skip
    p.add_argument("--normalize-flux", action="store_true",
                   help="DataConfig.normalize_flux: train in flux units normalized to each "
                   "image's background noise")  # fmt: skip
    p.add_argument("--rms-range-factor", type=float, default=1.0, metavar="F",
                   help="widen the preset's background-RMS range by F at each end, about its "
                   "geometric middle (reference_rms unchanged); with --normalize-flux this "
                   "widens the amplitude-to-noise range the model learns by F each way")  # fmt: skip
    p.add_argument("--prior", default="default", choices=TRAINING_PRIORS,
                   help="training prior (DataConfig.prior): broad covers the real reference "
                   "lenses (prior.BROAD_RANGES)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stop-at-step", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    sim = preset(args.preset)
    if not args.rms_range_factor >= 1:
        p.error(f"--rms-range-factor {args.rms_range_factor} must be >= 1")
    base = data_preset(args.preset)
    if args.mask_max_fraction is not None:
        if not 0 < args.mask_max_fraction < 1:
            p.error(f"--mask-max-fraction {args.mask_max_fraction} must be in (0, 1)")
        base = dataclasses.replace(base, mask_max_fraction=args.mask_max_fraction)
    data = dataclasses.replace(base, mask_probability=args.mask_probability,
                               normalize_flux=args.normalize_flux, prior=args.prior,
                               background_rms_min=base.background_rms_min / args.rms_range_factor,
                               background_rms_max=base.background_rms_max * args.rms_range_factor)  # fmt: skip
    flow = FlowConfig(base_channels=args.base_channels, width=args.width,
                      n_blocks=args.n_blocks, embed_dim=args.embed_dim)  # fmt: skip
    train = TrainConfig(n_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup_steps=args.warmup, ema_decay=args.ema_decay, n_val=args.n_val,
                        val_every=args.val_every, checkpoint_every=args.checkpoint_every,
                        seed=args.seed, time_limit_s=args.time_limit,
                        times_per_example=args.times_per_example)  # fmt: skip
    prov = run_provenance(
        args.seed, {"simulator": sim, "data": data, "flow": flow, "train": train}
    )
    prov["command"] = "python " + shlex.join(sys.argv)
    result = train_model(sim, data, flow, train, out_dir=args.out, resume=args.resume,
                         device=args.device,
                         progress=True, stop_at_step=args.stop_at_step, provenance=prov)  # fmt: skip
    summary = {
        k: v for k, v in dataclasses.asdict(result).items() if k not in ("field", "train_loss")
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
