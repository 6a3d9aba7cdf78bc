#!/usr/bin/env bash
# The README's second command: install everything (Python packages and the external
# components in ~/.cache/beamops), then run ruff and the whole suite, whose fixtures start
# the Kafka broker and the Flink cluster the tests need and stop them. Extra arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(scripts/bootstrap.sh)"
PYTHON="$PY" scripts/install_components.sh

echo "[test] ruff" >&2
"$PY" -m ruff check .
"$PY" -m ruff format --check .

echo "[test] pytest" >&2
# GPU tests need a real GPU (the CUDA kernels are still tested here under numba's simulator) and
# docker tests the compose plugin. Pass your own -m (for example -m gpu on a GPU machine) to choose.
select=(-m "not gpu and not docker")
for arg in "$@"; do [[ "$arg" == -m* ]] && select=(); done
set +e
"$PY" -m pytest "${select[@]}" "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
    echo "[test] pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit $status
