#!/usr/bin/env bash
# The README's first command: install what is needed, then run the COM pipeline on a
# built-in simulated scan (DirectRunner engine, no servers). Extra arguments go to the job.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(scripts/bootstrap.sh)"
exec "$PY" -m jobs.com_pipeline "$@"
