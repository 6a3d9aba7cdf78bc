#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) with beamops and its dev tools.
# Idempotent: reinstalls only when pyproject.toml changed. Prints the venv's python path last.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
VENV=.venv
STAMP="$VENV/.beamops-installed"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[bootstrap] creating $VENV with $("$PYTHON_BIN" --version)" >&2
    "$PYTHON_BIN" -m venv "$VENV"
fi
if [[ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]]; then
    echo "[bootstrap] installing beamops and its dependencies into $VENV (first time: a few minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet --progress-bar off -e ".[dev]" >&2
    echo "$WANT" > "$STAMP"
fi
echo "$PWD/$VENV/bin/python"
