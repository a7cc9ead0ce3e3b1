"""Reference data of the SBI benchmark: sbibm's observations 1-10 and reference posteriors.

The files under ``lensflow/sbi/data/<task>/num_observation_<k>/`` are copied verbatim from
the sbibm 1.1.0 wheel (MIT licence, see ``data/README.md``): ``observation.csv``,
``true_parameters.csv``, ``observation_seed.csv`` and
``reference_posterior_samples.csv.bz2`` (10,000 samples). They are read offline; nothing is
fetched at run time. This is an I/O edge, so numpy reads the CSV files.
"""

from __future__ import annotations

import bz2
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch import Tensor

__all__ = ["N_OBSERVATIONS", "Reference", "load_reference"]

#: sbibm ships observations 1..10 for every task.
N_OBSERVATIONS = 10


@dataclass(frozen=True)
class Reference:
    """One sbibm observation with its truth and reference posterior.

    Attributes:
        task: sbibm task name.
        num_observation: 1..10.
        seed: The torch seed sbibm drew the truth and the observation with.
        observation: Observed data, shape ``(1, dim_data)``, float32.
        true_parameters: Parameters that generated it, shape ``(1, D)``, float32.
        samples: Reference posterior samples, shape ``(10000, D)``, float32.
    """

    task: str
    num_observation: int
    seed: int
    observation: Tensor
    true_parameters: Tensor
    samples: Tensor


def _read_csv(path: resources.abc.Traversable) -> np.ndarray:
    opener = bz2.open if path.name.endswith(".bz2") else open
    with opener(path, "rt") as f:  # type: ignore[operator]
        return np.atleast_2d(np.loadtxt(f, delimiter=",", skiprows=1, dtype=np.float64))


def load_reference(task: str, num_observation: int) -> Reference:
    """Load sbibm's observation ``num_observation`` of ``task`` from the shipped files.

    Args:
        task: ``"two_moons"``, ``"slcp"``, ``"lotka_volterra"`` or ``"sir"``.
        num_observation: Observation number, 1..10.

    Returns:
        The observation, its true parameters, seed and reference posterior samples.

    Raises:
        ValueError: For an unknown task or observation number.

    Example:
        >>> ref = load_reference("two_moons", 1)
        >>> ref.observation.shape, ref.samples.shape
        (torch.Size([1, 2]), torch.Size([10000, 2]))
    """
    root = resources.files("lensflow.sbi") / "data" / task
    if not root.is_dir():
        raise ValueError(f"no reference data for task {task!r}")
    if not 1 <= num_observation <= N_OBSERVATIONS:
        raise ValueError(f"num_observation must be in 1..{N_OBSERVATIONS}, got {num_observation}")
    folder = root / f"num_observation_{num_observation}"

    def load(name: str) -> Tensor:
        # sbibm stored float32 values; round-trip through float32 to get its exact numbers.
        return torch.from_numpy(_read_csv(folder / name).astype(np.float32))

    return Reference(
        task=task,
        num_observation=num_observation,
        seed=int(_read_csv(folder / "observation_seed.csv")[0, 0]),
        observation=load("observation.csv"),
        true_parameters=load("true_parameters.csv"),
        samples=load("reference_posterior_samples.csv.bz2"),
    )
