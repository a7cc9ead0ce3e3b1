"""Flow vs MCMC benchmark on the same lenses: ``lensflow bench`` as a script.

Usage (repository root; ``--help`` lists the options):
    python scripts/benchmark.py --config small --out runs/bench_small --docs docs/benchmarks.md

Re-executes itself once with the malloc and thread environment of docs/benchmarks.md
(``shared/docs/conventions-notes.md``, pitfalls 4 and 5: glibc reads the malloc settings at
process start), then runs ``lensflow bench`` with the same arguments.
"""

import os
import sys

ENV = {
    "OMP_NUM_THREADS": "1",
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "268435456",
}

if __name__ == "__main__":
    missing = {k: v for k, v in ENV.items() if k not in os.environ}
    if missing:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **missing})
    from lensflow.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
