"""Shared fixtures: seeding, dtype/device options, markers, and the shared real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL_LENSES = SHARED / "data" / "real_lenses"


def pytest_addoption(parser):
    parser.addoption(
        "--dtype",
        default="float64",
        choices=["float32", "float64"],
        help="dtype of the numerics tests",
    )
    parser.addoption("--device", default="cpu", help="torch device of the numerics tests")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for tiny networks and images: a second thread only adds contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def dtype(request) -> torch.dtype:
    return getattr(torch, request.config.getoption("--dtype"))


@pytest.fixture
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture
def real_lenses() -> Path:
    """The folder of real HST/Euclid cutouts beside the repo; skips cleanly when absent."""
    if not REAL_LENSES.is_dir():
        pytest.skip(f"real lens data not found at {REAL_LENSES}")
    return REAL_LENSES
