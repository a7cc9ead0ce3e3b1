"""SBI benchmark tasks (sbibm's Two Moons, SLCP, Lotka-Volterra, SIR), reference data and driver.

The tasks reuse lensflow's generic flow and feedback code; nothing here knows about lenses.
"""

from lensflow.sbi.bench import BenchConfig, BenchResult, run_benchmark, train_posterior
from lensflow.sbi.reference import Reference, load_reference
from lensflow.sbi.tasks import SIR, SLCP, LotkaVolterra, Task, TwoMoons, get_task

__all__ = [
    "SIR",
    "SLCP",
    "BenchConfig",
    "BenchResult",
    "LotkaVolterra",
    "Reference",
    "Task",
    "TwoMoons",
    "get_task",
    "load_reference",
    "run_benchmark",
    "train_posterior",
]
