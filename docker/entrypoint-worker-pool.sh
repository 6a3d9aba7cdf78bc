#!/usr/bin/env bash
# Entrypoint of the Beam Python worker-pool sidecar (docker/worker-pool.Dockerfile): one per GPU
# TaskManager, in the TaskManager's network namespace, pinned to that TaskManager's GPU.
#
# Flink's GPU plugin only declares GPUs; Beam's Python DoFns run in SDK worker processes that
# this pool starts and cannot see which GPU Flink assigned. So the GPU is pinned here, per
# TaskManager, with CUDA_VISIBLE_DEVICES, and the job runs with
#   --environment_type=EXTERNAL --environment_config=localhost:50000
# so that every TaskManager starts its SDK workers through its own sidecar.
#
# Usage: entrypoint-worker-pool.sh [--check] [extra worker_pool_main args...]
#   --check   validate the environment and print the plan (GPU, port, interpreter, Beam/numba
#             versions) without starting the pool. Works without a GPU.
#
# Environment:
#   CUDA_VISIBLE_DEVICES      REQUIRED, may be empty. One GPU, as an index or a GPU-/MIG- UUID, as
#                             the CONTAINER numbers them: a container given one GPU
#                             (compose device_ids: ["1"]) sees it as index 0. Empty = no GPU:
#                             operators with device=auto run on the CPU, device=cuda fails.
#   BEAMOPS_WORKER_POOL_PORT  port of the pool's gRPC service (default 50000)
#   PYTHON                    interpreter with apache-beam and beamops (default python3). The pool
#                             starts each SDK worker as beamops-sdk-worker from the same
#                             environment (beamops.services.sdk_worker), with the job's options.
#   BEAMOPS_BEAM_VERSION      the Beam version the job server runs (default 2.73.0); a different
#                             SDK version in $PYTHON is reported as a warning.
#   BEAMOPS_NETNS_WATCH_SECONDS  (image default 5; unset or 0 = off) check this often whether the
#                             network namespace still has an interface besides lo. A sidecar
#                             shares its TaskManager's namespace (network_mode: service:...);
#                             when the TaskManager container restarts it gets a new namespace
#                             and the sidecar is left behind in the old, empty one, unreachable
#                             for good. The pool then exits, so that its restart policy restarts
#                             it into the TaskManager's new namespace.
#
# Locally, without a GPU:
#   CUDA_VISIBLE_DEVICES= BEAMOPS_WORKER_POOL_PORT=50123 PYTHON=.venv/bin/python \
#       docker/entrypoint-worker-pool.sh
# Note: Beam's worker_pool_main listens on all interfaces ([::]:PORT) and has no option to
# restrict that; in compose the port is never published, only the TaskManager reaches it.
set -euo pipefail

log() { printf '[entrypoint-worker-pool] %s\n' "$*"; }
warn() { printf '[entrypoint-worker-pool] WARNING: %s\n' "$*" >&2; }
die() { printf '[entrypoint-worker-pool] ERROR: %s\n' "$*" >&2; exit 1; }

CHECK=0
if [[ "${1:-}" == "--check" ]]; then CHECK=1; shift; fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0; fi

# --- port --------------------------------------------------------------------------------------
PORT="${BEAMOPS_WORKER_POOL_PORT:-50000}"
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || (( 10#$PORT < 1 || 10#$PORT > 65535 )); then
  die "BEAMOPS_WORKER_POOL_PORT='$PORT' is not a port number (1-65535)"
fi

# --- GPU pin -----------------------------------------------------------------------------------
[[ -n "${CUDA_VISIBLE_DEVICES+set}" ]] \
  || die "CUDA_VISIBLE_DEVICES is not set. Set it to the one GPU this worker pool may use" \
         "(e.g. 0), or to an empty value for CPU only. Unset, CUDA would hand every visible GPU" \
         "to every SDK worker."
GPU="$CUDA_VISIBLE_DEVICES"
# CUDA numbers devices fastest-first by default; nvidia-smi, Docker's device_ids and Flink's
# discovery script number them in PCI bus order. Make CUDA agree with them.
export CUDA_DEVICE_ORDER="${CUDA_DEVICE_ORDER:-PCI_BUS_ID}"

GPU_LINE=""
if [[ -z "$GPU" ]]; then
  GPU_PLAN="none (CUDA_VISIBLE_DEVICES is empty): operators with device=auto run on the CPU, device=cuda fails"
else
  [[ "$GPU" != *,* ]] \
    || die "CUDA_VISIBLE_DEVICES='$GPU' names several GPUs; a worker pool is pinned to exactly one" \
           "(its TaskManager has one slot per GPU, and one GPU)"
  [[ "$GPU" =~ ^[0-9]+$ || "$GPU" =~ ^(GPU|MIG)-[0-9A-Za-z/-]+$ ]] \
    || die "CUDA_VISIBLE_DEVICES='$GPU' is neither a GPU index nor a GPU-/MIG- UUID"
  if command -v nvidia-smi >/dev/null 2>&1 \
     && listing="$(nvidia-smi --query-gpu=index,uuid,name,pci.bus_id,memory.total --format=csv,noheader 2>&1)"; then
    while IFS= read -r row; do
      idx="${row%%,*}"
      rest="${row#*, }"
      uuid="${rest%%,*}"
      if [[ "$idx" == "$GPU" || "$uuid" == "$GPU" ]]; then GPU_LINE="$row"; fi
    done <<<"$listing"
    if [[ -z "$GPU_LINE" ]]; then
      die "CUDA_VISIBLE_DEVICES=$GPU is not among the GPUs this container sees:" \
          "$(tr '\n' ';' <<<"$listing")" \
          "A container renumbers the GPUs it was given from 0: with compose device_ids: [\"$GPU\"]" \
          "the GPU is index 0 inside, so set CUDA_VISIBLE_DEVICES=0."
    fi
    GPU_PLAN="CUDA_VISIBLE_DEVICES=$GPU -> $GPU_LINE"
  else
    GPU_PLAN="CUDA_VISIBLE_DEVICES=$GPU (not verified: nvidia-smi is not available here)"
    warn "nvidia-smi is not available, so GPU '$GPU' cannot be checked; in a container request" \
         "the 'utility' capability as well as 'compute' to have it"
  fi
fi

# --- interpreter -------------------------------------------------------------------------------
PYTHON="${PYTHON:-python3}"
PYTHON_PATH="$(command -v "$PYTHON" 2>/dev/null)" || die "PYTHON='$PYTHON' is not an executable"
# Left alone, worker_pool_main starts every SDK worker as a bare SdkHarness (`python -c ...`), which
# never reads the job's pipeline options: no --beam_plugins (beamops.harness), no state cache size.
# beamops-sdk-worker, installed beside $PYTHON, is the worker it runs instead: it asks the job for its
# options and starts Beam's sdk_worker_main with them, as Beam's own (Go) boot loader would.
SDK_WORKER="$(dirname "$PYTHON_PATH")/beamops-sdk-worker"
[[ -x "$SDK_WORKER" ]] || die "$SDK_WORKER not found: install beamops in the environment of PYTHON='$PYTHON'"

# What the SDK workers will import, checked with the `python` they will run.
probe='import sys, apache_beam
print("python", sys.executable, "%d.%d.%d" % sys.version_info[:3])
print("apache-beam", apache_beam.__version__)
try:
    import beamops
    print("beamops", getattr(beamops, "__version__", "installed"))
except ImportError as exc:
    print("beamops", "MISSING", exc)
'
if [[ $CHECK -eq 1 ]]; then
  # numba's CUDA target (numba-cuda when installed); only in --check: the long-running pool
  # process itself never touches the GPU, its SDK workers do.
  probe+='
try:
    import numba
    from numba import cuda
    print("numba", numba.__version__, "cuda-target", getattr(cuda, "implementation", "?"),
          "cuda-available", cuda.is_available())
except Exception as exc:
    print("numba", "UNAVAILABLE", type(exc).__name__, exc)
'
fi
versions="$("$PYTHON_PATH" -c "$probe" 2>&1)" \
  || die "the SDK workers' interpreter cannot import apache_beam: $(tail -n 1 <<<"$versions")"
beam_version="$(awk '$1 == "apache-beam" {print $2}' <<<"$versions")"
want="${BEAMOPS_BEAM_VERSION:-2.73.0}"
if [[ "$beam_version" != "$want" ]]; then
  warn "apache-beam $beam_version here, but the job server is $want: SDK and runner must match"
fi
if grep -q '^beamops MISSING' <<<"$versions"; then
  warn "beamops is not importable: beamops' operators will fail in the SDK workers"
fi

# --- plan --------------------------------------------------------------------------------------
CMD=("$PYTHON_PATH" -m apache_beam.runners.worker.worker_pool_main "--service_port=$PORT"
     "--container_executable=$SDK_WORKER" "$@")
log "GPU:    $GPU_PLAN"
log "port:   $PORT (jobs: --environment_type=EXTERNAL --environment_config=localhost:$PORT)"
while IFS= read -r l; do log "$l"; done <<<"$versions"
log "CUDA_DEVICE_ORDER=$CUDA_DEVICE_ORDER"
log "command: ${CMD[*]}"

# --- network-namespace watchdog ----------------------------------------------------------------
NET_DEV="${BEAMOPS_PROC_NET_DEV:-/proc/net/dev}"
WATCH="${BEAMOPS_NETNS_WATCH_SECONDS:-0}"
[[ "$WATCH" =~ ^[0-9]+$ ]] || die "BEAMOPS_NETNS_WATCH_SECONDS='$WATCH' is not a number of seconds"
interfaces() { awk -F: 'NR > 2 { gsub(/ /, "", $1); if ($1 != "lo") print $1 }' "$NET_DEV" 2>/dev/null; }
if (( 10#$WATCH > 0 )); then
  initial="$(interfaces | tr '\n' ' ')"
  if [[ -n "$initial" ]]; then
    log "netns watchdog: every ${WATCH}s, exits when none of [ ${initial}] is left"
  else
    warn "netns watchdog off: no interface besides lo to watch"
  fi
fi
if [[ $CHECK -eq 1 ]]; then
  log "check OK"
  exit 0
fi
if (( 10#$WATCH > 0 )) && [[ -n "$initial" ]]; then
  pool_pid=$$   # the PID the pool keeps after the exec below
  (
    while sleep "$WATCH"; do
      kill -0 "$pool_pid" 2>/dev/null || exit 0
      if [[ -z "$(interfaces)" ]]; then
        warn "the network namespace lost all its interfaces (its TaskManager restarted):" \
             "stopping the worker pool so that it is restarted next to the new TaskManager"
        kill -TERM "$pool_pid" 2>/dev/null || true
        for _ in 1 2 3 4 5 6 7 8 9 10; do
          sleep 1
          kill -0 "$pool_pid" 2>/dev/null || exit 0
        done
        kill -KILL "$pool_pid" 2>/dev/null || true
        exit 0
      fi
    done
  ) &
fi
exec "${CMD[@]}"
