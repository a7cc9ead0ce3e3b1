# Sourced by run_demo.sh and run_tests.sh: create or reuse .venv and install lensflow into it.
# Torch comes first and pinned (2.13.0): on these machines that is a CPU wheel on disk, while an
# unpinned torch would pull a multi-GB CUDA build. An existing torch in the venv is kept.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LENSFLOW_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x "$VENV/bin/python" ]; then
    echo ">> creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
    echo ">> installing torch==2.13.0"
    python -m pip install -q "torch==2.13.0"
fi
stamp="$VENV/.lensflow-installed-$1"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    echo ">> installing lensflow[$1] (editable)"
    python -m pip install -q -e "$ROOT[$1]"
    touch "$stamp"
fi
# glibc malloc churn makes CPU torch timings erratic (shared/docs/conventions-notes.md, 4).
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456
cd "$ROOT"
