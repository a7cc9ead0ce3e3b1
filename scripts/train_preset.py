"""Train a posterior for an instrument preset (thin driver over ``lensflow.train.train_model``).

Example (the shipped CPU model, docs/training.md)::

    python scripts/train_preset.py --preset euclid --steps 3000 --batch-size 64 \
        --threads 1 --out runs/euclid_cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys

import torch

from lensflow.config import FlowConfig, TrainConfig, data_preset, preset, run_provenance
from lensflow.train import train_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="euclid")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--base-channels", type=int, default=FlowConfig().base_channels)
    p.add_argument("--mask-probability", type=float, default=0.0,
                   help="fraction of training images with random likelihood masks "
                   "(DataConfig.mask_probability; the shipped CPU models used 0)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stop-at-step", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sim = preset(args.preset)
    data = dataclasses.replace(data_preset(args.preset), mask_probability=args.mask_probability)
    flow = FlowConfig(base_channels=args.base_channels)
    train = TrainConfig(n_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        val_every=250, checkpoint_every=250, seed=args.seed)  # fmt: skip
    prov = run_provenance(
        args.seed, {"simulator": sim, "data": data, "flow": flow, "train": train}
    )
    prov["command"] = "python " + shlex.join(sys.argv)
    result = train_model(sim, data, flow, train, out_dir=args.out, resume=args.resume,
                         progress=True, stop_at_step=args.stop_at_step, provenance=prov)  # fmt: skip
    summary = {
        k: v for k, v in dataclasses.asdict(result).items() if k not in ("field", "train_loss")
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
