#!/usr/bin/env bash
# The test suite: lint, unit/parity tests (not slow), doctests. Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh" dev
echo ">> ruff"
ruff check .
ruff format --check .
echo ">> pytest (not slow)"
python -m pytest "$@"
echo ">> doctests"
python -m pytest lensflow --doctest-modules -q -p no:cacheprovider
