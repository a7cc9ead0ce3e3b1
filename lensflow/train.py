"""Stage 4: pretraining the flow-matching posterior on simulated lenses.

``fit`` is one plain loop: AdamW with linear warmup and cosine decay, global gradient-norm
clipping, an exponential moving average (EMA) of the weights, a validation loss of the EMA
weights on a fixed held-out set, a tqdm progress bar and resumable checkpoints. It works
on one device and under ``torchrun`` (``torch.distributed`` initialized by the caller; the
loss module is wrapped in ``DistributedDataParallel``, each rank draws its own data, rank 0
writes the checkpoints).

Seeding: the caller seeds the weight initialization (``torch.manual_seed``); ``fit`` draws
all data, flow times and base noise from one generator seeded by ``config.seed`` and the
rank. The checkpoint holds the weights, the EMA, the optimizer moments and the generator
states, so a resumed run continues bit for bit as an uninterrupted one.

Checkpoint files in ``checkpoint_dir``: ``train_state.safetensors`` (tensors, no pickles),
``train_state.json`` (step, loss history, wall time, config) and ``rng_rank<r>.safetensors``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from lensflow.checkpoint import TrainedPosterior, build_posterior, save_model
from lensflow.config import DataConfig, FlowConfig, SimulatorConfig, TrainConfig
from lensflow.data import H5Pairs, Pairs, SimulatedPairs
from lensflow.flow import FlowMatchingLoss, ParamTransform, VectorField

__all__ = [
    "PairSource",
    "TrainResult",
    "device_description",
    "fit",
    "learning_rate",
    "train_model",
    "validation_loss",
]


class PairSource(Protocol):
    """Anything that draws training batches (``SimulatedPairs``, ``H5Pairs``)."""

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Pairs: ...


@dataclass(frozen=True, eq=False)
class TrainResult:
    """Outcome of :func:`fit`.

    Attributes:
        field: A copy of the vector field with the EMA weights (the one to ship).
        steps: Optimizer steps done in total (including before a resume).
        train_loss: Training loss of every step, in order.
        val_steps: Steps at which the validation loss was measured.
        val_loss: Validation loss of the EMA weights at ``val_steps``.
        wall_time_s: Training wall time in seconds, summed over resumed runs.
    """

    field: VectorField
    steps: int
    train_loss: tuple[float, ...]
    val_steps: tuple[int, ...]
    val_loss: tuple[float, ...]
    wall_time_s: float


def learning_rate(step: int, config: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to 0 at ``n_steps``.

    With ``config.time_limit_s`` set, the cosine follows whichever of the step fraction and
    ``elapsed_s / time_limit_s`` is further along (the warmup is counted in steps).

    Example:
        >>> cfg = TrainConfig(n_steps=100, warmup_steps=10, lr=1.0)
        >>> learning_rate(4, cfg), learning_rate(10, cfg), learning_rate(100, cfg)
        (0.5, 1.0, 0.0)
        >>> timed = TrainConfig(n_steps=100, warmup_steps=10, lr=1.0, time_limit_s=60.0)
        >>> learning_rate(10, timed, elapsed_s=30.0), learning_rate(10, timed, elapsed_s=60.0)
        (0.5, 0.0)
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.n_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    if config.time_limit_s is not None:
        progress = max(progress, min(elapsed_s / config.time_limit_s, 1.0))
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validation_loss(
    loss: FlowMatchingLoss, transform: ParamTransform, val: Pairs, *, chunk: int = 256
) -> float:
    """Flow-matching loss on a fixed set with fixed times and noise (seed 0), comparable over
    training.

    Args:
        loss: The loss module (its field is evaluated as is).
        transform: Physical -> standardized parameters.
        val: The held-out set.
        chunk: Examples per forward pass.

    Returns:
        Mean loss over ``val``.
    """
    generator = torch.Generator(val.theta.device).manual_seed(0)
    total = 0.0
    for start in range(0, len(val), chunk):
        batch = val.select(torch.arange(start, min(start + chunk, len(val))))
        total += float(loss(transform.to_u(batch.theta), batch.x, generator=generator)) * len(
            batch
        )
    return total / len(val)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _save(folder: Path, loss: FlowMatchingLoss, ema: VectorField, opt: torch.optim.Optimizer,
          generator: torch.Generator, record: dict) -> None:  # fmt: skip
    rank = _rank()
    save_file({"rng": generator.get_state()}, str(folder / f"rng_rank{rank}.safetensors"))
    if rank != 0:
        return
    tensors = {f"model.{k}": v for k, v in loss.field.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in ema.state_dict().items()}
    opt_state = opt.state_dict()
    for i, state in opt_state["state"].items():
        tensors |= {f"opt.{i}.{k}": v.reshape(-1) for k, v in state.items()}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    tmp = folder / "train_state.tmp.safetensors"
    save_file(tensors, str(tmp))
    tmp.replace(folder / "train_state.safetensors")  # atomic: never a half-written state
    (folder / "train_state.json").write_text(json.dumps(record) + "\n")


def _load(folder: Path, loss: FlowMatchingLoss, ema: VectorField, opt: torch.optim.Optimizer,
          generator: torch.Generator, config: TrainConfig) -> dict:  # fmt: skip
    record = json.loads((folder / "train_state.json").read_text())
    free = ("n_steps", "time_limit_s")  # a resumed run may get more steps or more time
    saved = {k: v for k, v in record["config"].items() if k not in free}
    current = {k: v for k, v in dataclasses.asdict(config).items() if k not in free}
    if saved != current:
        raise ValueError(
            f"{folder}: cannot resume; the checkpoint's TrainConfig {saved} differs from {current}"
        )
    device = next(loss.parameters()).device
    tensors = load_file(str(folder / "train_state.safetensors"), device=str(device))
    loss.field.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state = opt.state_dict()
    params = [p for g in state["param_groups"] for p in g["params"]]
    shapes = [p.shape for g in opt.param_groups for p in g["params"]]
    state["state"] = {
        i: {
            "step": tensors[f"opt.{i}.step"].reshape(()).cpu(),
            "exp_avg": tensors[f"opt.{i}.exp_avg"].reshape(shape),
            "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].reshape(shape),
        }
        for i, shape in zip(params, shapes, strict=True)
        if f"opt.{i}.step" in tensors
    }
    opt.load_state_dict(state)
    generator.set_state(load_file(str(folder / f"rng_rank{_rank()}.safetensors"))["rng"])
    return record


def fit(
    loss: FlowMatchingLoss,
    transform: ParamTransform,
    data: PairSource,
    val: Pairs,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    stop_at_step: int | None = None,
) -> TrainResult:
    """Train ``loss.field`` in place on batches from ``data``.

    Args:
        loss: Flow-matching loss around the vector field to train (on the training device).
        transform: Physical -> standardized parameters (``UnconstrainedTransform``).
        data: Source of training batches on the same device.
        val: Fixed held-out set for the validation loss.
        config: Optimization settings.
        checkpoint_dir: Folder for resumable checkpoints (``None``: no checkpoints).
        resume: Continue from the checkpoint in ``checkpoint_dir`` if there is one.
        progress: Show a tqdm progress bar (rank 0 only).
        stop_at_step: Stop after this step although the schedule spans ``config.n_steps``
            (for time-limited jobs resumed later).

    With ``config.time_limit_s``, training also stops (after a final validation and
    checkpoint) once that much wall time has passed, counting the time of earlier runs
    of a resumed checkpoint. Under DDP every rank uses rank 0's clock for the schedule
    and the stop.

    Returns:
        The EMA field and the training record.

    Raises:
        ValueError: If resuming from a checkpoint with another ``TrainConfig`` (other than
            ``n_steps``).
    """
    rank = _rank()
    device = next(loss.parameters()).device
    generator = torch.Generator(device).manual_seed(config.seed + 1_000_003 * rank)
    opt = torch.optim.AdamW(loss.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = copy.deepcopy(loss.field).requires_grad_(False)
    ema_loss = FlowMatchingLoss(ema, sigma_min=loss.sigma_min, alpha=loss.alpha)
    record = {"step": 0, "train_loss": [], "val_steps": [], "val_loss": [], "wall_time_s": 0.0,
              "config": dataclasses.asdict(config)}  # fmt: skip
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        if resume and (folder / "train_state.json").is_file():
            record = _load(folder, loss, ema, opt, generator, config)
            record["config"] = dataclasses.asdict(config)
    distributed = dist.is_available() and dist.is_initialized()
    model: nn.Module = nn.parallel.DistributedDataParallel(loss) if distributed else loss
    end = min(config.n_steps, stop_at_step if stop_at_step is not None else config.n_steps)
    start_time = time.perf_counter() - record["wall_time_s"]
    bar = tqdm(range(record["step"], end), initial=record["step"], total=end, unit="step",
               disable=not progress or rank != 0, desc="train")  # fmt: skip
    # One clock read per step (a broadcast under DDP): the end of one step's is the next's.
    elapsed = _elapsed(start_time, config, distributed, device)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, config, elapsed)
        batch = data.sample(config.batch_size, generator=generator)
        value = model(transform.to_u(batch.theta), batch.x, generator=generator)
        opt.zero_grad(set_to_none=True)
        value.backward()
        nn.utils.clip_grad_norm_(loss.parameters(), config.grad_clip)
        opt.step()
        # EMA with a short warmup, so the average of a short run is not stuck at the init.
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), loss.field.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        record["train_loss"].append(float(value.detach()))
        record["step"] = done = step + 1
        elapsed = _elapsed(start_time, config, distributed, device)
        out_of_time = config.time_limit_s is not None and elapsed >= config.time_limit_s
        if out_of_time:
            bar.total = end = done
        if done % config.val_every == 0 or done == config.n_steps or out_of_time:
            record["val_steps"].append(done)
            record["val_loss"].append(validation_loss(ema_loss, transform, val))
            bar.set_postfix(
                loss=f"{float(value.detach()):.3f}", val=f"{record['val_loss'][-1]:.3f}"
            )
        if folder is not None and (done % config.checkpoint_every == 0 or done == end):
            record["wall_time_s"] = time.perf_counter() - start_time
            _save(folder, loss, ema, opt, generator, record)
        if out_of_time:
            break
    bar.close()
    return TrainResult(
        field=ema,
        steps=record["step"],
        train_loss=tuple(record["train_loss"]),
        val_steps=tuple(record["val_steps"]),
        val_loss=tuple(record["val_loss"]),
        wall_time_s=time.perf_counter() - start_time,
    )


def _elapsed(
    start_time: float, config: TrainConfig, distributed: bool, device: torch.device
) -> float:
    """Wall time since ``start_time``, s; rank 0's under DDP when a time limit is set.

    With ``time_limit_s`` the clock sets the learning rate and the stop, so every rank must
    read the same value, or their optimizers would step with different rates.
    """
    elapsed = time.perf_counter() - start_time
    if config.time_limit_s is None or not distributed:
        return elapsed
    clock = torch.tensor([elapsed], dtype=torch.float64, device=device)
    dist.broadcast(clock, src=0)
    return float(clock.item())


def device_description(device: torch.device | str) -> str:
    """The card or CPU a run used, for provenance (``"cpu (2 cores)"``, a GPU's name)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu {platform.machine()} ({cores} cores, {torch.get_num_threads()} torch threads)"


def train_model(
    simulator: SimulatorConfig,
    data: DataConfig,
    flow: FlowConfig,
    config: TrainConfig,
    *,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    pairs_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    stop_at_step: int | None = None,
    provenance: dict[str, Any] | None = None,
) -> TrainResult:
    """Build, train and save a posterior: what ``lensflow train`` runs.

    The weights are initialized from ``config.seed`` (without touching the global RNG); the
    validation set is ``config.n_val`` fresh simulations from a separate seed. Training
    state goes to ``out_dir`` (resumable); the EMA model is written to
    ``out_dir/model.safetensors`` and ``out_dir/model.json`` (rank 0).

    Args:
        simulator: Pixel grid of the training images.
        data: PSF and noise ranges.
        flow: Network hyper-parameters.
        config: Optimization settings.
        out_dir: Output folder.
        device: Training device.
        pairs_path: Train on a stored HDF5 set (:func:`data.write_pairs`) instead of live
            simulations; its simulator and data configs replace ``simulator`` and ``data``.
        resume: Continue from ``out_dir``'s checkpoint.
        progress: Show a progress bar.
        stop_at_step: Stop early at this step (see :func:`fit`).
        provenance: Extra provenance for the sidecar (``config.run_provenance``).

    Returns:
        The training result.
    """
    device = torch.device(device)
    source: PairSource
    if pairs_path is not None:
        stored = H5Pairs(pairs_path, device=device)
        simulator, data, source = stored.simulator_config, stored.data_config, stored
    else:
        source = SimulatedPairs(simulator, data, device=device)
    live = source if isinstance(source, SimulatedPairs) else SimulatedPairs(
        simulator, data, device=device)  # fmt: skip
    val = live.sample(config.n_val,
                      generator=torch.Generator(device).manual_seed(2**31 - 1 - config.seed))  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        posterior = build_posterior(flow, data.prior)
    posterior.to(device)
    loss = FlowMatchingLoss(posterior.field, sigma_min=flow.sigma_min, alpha=flow.alpha,
                            times_per_example=config.times_per_example)  # fmt: skip
    result = fit(loss, posterior.transform, source, val, config, checkpoint_dir=out_dir,
                 resume=resume, progress=progress, stop_at_step=stop_at_step)  # fmt: skip
    if _rank() == 0:
        posterior.field.load_state_dict(result.field.state_dict())
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        training = {
            "steps": result.steps,
            "n_steps_scheduled": config.n_steps,
            "batch_size": config.batch_size,
            "world_size": world,
            "examples_seen": result.steps * config.batch_size * world,
            "wall_time_s": round(result.wall_time_s, 1),
            "device": device_description(device),
            "final_train_loss_mean_last_100": sum(result.train_loss[-100:])
            / max(len(result.train_loss[-100:]), 1),
            "val_steps": list(result.val_steps),
            "val_loss": list(result.val_loss),
            "data_source": str(pairs_path) if pairs_path is not None else "simulated on the fly",
            "train": dataclasses.asdict(config),
        }
        model = TrainedPosterior(posterior.cpu(), simulator, data, flow)
        save_model(Path(out_dir) / "model", model, training=training, provenance=provenance)
    return result
