"""Notebooks run end to end (code cells executed in order, without Jupyter).

``00_simulator`` runs in the default suite (seconds); the others fit, train and sample with
their ``FAST = True`` settings (tens of seconds to a few minutes each) and are ``slow``:
``python -m pytest tests/test_notebooks.py -m slow``.
"""

import json
import time
from pathlib import Path

import pytest
import torch

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
FAST_NOTEBOOKS = ("00_simulator.ipynb",)

PARAMS = [
    pytest.param(p, id=p.name, marks=() if p.name in FAST_NOTEBOOKS else pytest.mark.slow)
    for p in NOTEBOOKS
]


def _code_cells(path):
    nb = json.loads(path.read_text())
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stripped_and_has_fast_flag(path):
    code = _code_cells(path)
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), "strip outputs"
    if path.name not in FAST_NOTEBOOKS:
        # One flag controls the tiny settings; the tests run them.
        assert "FAST = True" in "".join(code[0]["source"])


@pytest.mark.parametrize("path", PARAMS)
def test_notebook_runs(path, capsys):
    threads = torch.get_num_threads()
    namespace: dict = {"__name__": "__main__"}
    t0 = time.perf_counter()
    try:
        for cell in _code_cells(path):
            exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)  # noqa: S102
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print(f"\n{path.name}: {time.perf_counter() - t0:.1f} s")
