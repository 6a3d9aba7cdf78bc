#!/usr/bin/env bash
# Entrypoint of the GPU TaskManager image (docker/taskmanager-gpu.Dockerfile). It renders
# beamops' Flink config (flink-conf/gpu/config.yaml) for this container, checks the GPU the way
# Flink's GPU plugin will, and execs Flink in the foreground. The JobManager runs the same image
# and config with the role "jobmanager".
#
# Usage: entrypoint-taskmanager.sh [--check] [taskmanager|jobmanager] [extra Flink args...]
#   taskmanager  (default) a TaskManager with one task slot per GPU it sees
#   jobmanager   a standalone-session JobManager (no GPU checks)
#   --check      validate, render into a temporary directory, let Flink's own config parser and
#                memory calculator read the result, print the plan, and exit without starting
#                anything. Runs without a GPU and outside a container, e.g.
#                  source ~/.cache/beamops/components.env && docker/entrypoint-taskmanager.sh --check
#
# Environment (each NAME below replaces the value of the template lines marked "(env: NAME)"
# when it is set and not empty; otherwise the template's value stays):
#   FLINK_HOME                        Flink distribution (default /opt/flink, the official image's)
#   BEAMOPS_FLINK_CONF_TEMPLATE       template (default: /opt/beamops/flink-conf/config.yaml in
#                                     the image, else flink-conf/gpu/config.yaml of this checkout)
#   FLINK_CONF_DIR                    where the rendered conf/ goes (default $FLINK_HOME/conf;
#                                     with --check always a temporary directory)
#   JOB_MANAGER_RPC_ADDRESS           the JobManager's host name (template: jobmanager)
#   FLINK_BIND_HOST                   address Flink listens on (template: 0.0.0.0)
#   BEAMOPS_TM_GPUS                   GPUs of this TaskManager (default: counted with nvidia-smi)
#   TASK_MANAGER_NUMBER_OF_TASK_SLOTS slots (default: = BEAMOPS_TM_GPUS, one slot per GPU)
#   TASK_MANAGER_MEMORY_PROCESS_SIZE, JOB_MANAGER_MEMORY_PROCESS_SIZE, FLINK_PARALLELISM_DEFAULT,
#   FLINK_CHECKPOINT_DIR, FLINK_SAVEPOINT_DIR
#   DISABLE_JEMALLOC=true             do not preload jemalloc (the official image's switch)
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DISCOVERY_SCRIPT="plugins/external-resource-gpu/nvidia-gpu-discovery.sh"
GPU_PLUGIN_DIR="plugins/external-resource-gpu"
# Names a template line may take its value from; anything else in "(env: ...)" is an error.
ALLOWED_VARS=(JOB_MANAGER_RPC_ADDRESS FLINK_BIND_HOST BEAMOPS_TM_GPUS TASK_MANAGER_NUMBER_OF_TASK_SLOTS
  TASK_MANAGER_MEMORY_PROCESS_SIZE JOB_MANAGER_MEMORY_PROCESS_SIZE FLINK_PARALLELISM_DEFAULT
  FLINK_CHECKPOINT_DIR FLINK_SAVEPOINT_DIR)

log() { printf '[entrypoint-taskmanager] %s\n' "$*"; }
warn() { printf '[entrypoint-taskmanager] WARNING: %s\n' "$*" >&2; }
die() { printf '[entrypoint-taskmanager] ERROR: %s\n' "$*" >&2; exit 1; }

CHECK=0
ROLE=taskmanager
while [[ $# -gt 0 ]]; do
  case "$1" in
    --check) CHECK=1; shift ;;
    taskmanager|jobmanager) ROLE="$1"; shift; break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) break ;;
  esac
done
EXTRA_ARGS=("$@")

# --- inputs ------------------------------------------------------------------------------------
FLINK_HOME="${FLINK_HOME:-/opt/flink}"
[[ -x "$FLINK_HOME/bin/$ROLE.sh" ]] || die "FLINK_HOME=$FLINK_HOME has no executable bin/$ROLE.sh"

if [[ -z "${BEAMOPS_FLINK_CONF_TEMPLATE:-}" ]]; then
  for candidate in /opt/beamops/flink-conf/config.yaml "$SCRIPT_DIR/../flink-conf/gpu/config.yaml"; do
    if [[ -f "$candidate" ]]; then BEAMOPS_FLINK_CONF_TEMPLATE="$candidate"; break; fi
  done
fi
TEMPLATE="${BEAMOPS_FLINK_CONF_TEMPLATE:-}"
[[ -n "$TEMPLATE" && -f "$TEMPLATE" ]] || die "config template not found (set BEAMOPS_FLINK_CONF_TEMPLATE)"

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }
# Values go into YAML unquoted: allow only characters that cannot change its structure.
is_plain() { [[ "$1" =~ ^[A-Za-z0-9._:/@+-]+$ ]]; }

for name in "${ALLOWED_VARS[@]}"; do
  value="${!name-}"
  [[ -z "$value" ]] || is_plain "$value" || die "$name='$value': only letters, digits and ._:/@+- are allowed"
done
for name in BEAMOPS_TM_GPUS TASK_MANAGER_NUMBER_OF_TASK_SLOTS FLINK_PARALLELISM_DEFAULT; do
  value="${!name-}"
  [[ -z "$value" ]] || { is_uint "$value" && (( 10#$value > 0 )); } || die "$name='$value' is not a positive integer"
done

# --- GPUs (TaskManager only) -------------------------------------------------------------------
GPU_LINES=""
GPU_SOURCE=""
if [[ "$ROLE" == taskmanager ]]; then
  for f in "$GPU_PLUGIN_DIR/flink-external-resource-gpu-*.jar" "$DISCOVERY_SCRIPT" \
           "$GPU_PLUGIN_DIR/gpu-discovery-common.sh"; do
    compgen -G "$FLINK_HOME/$f" >/dev/null || die "the GPU plugin is incomplete: no $FLINK_HOME/$f"
  done
  [[ -x "$FLINK_HOME/$DISCOVERY_SCRIPT" ]] \
    || die "$FLINK_HOME/$DISCOVERY_SCRIPT is not executable (Flink's GPU driver refuses to run it)"
  grep -q "path: $DISCOVERY_SCRIPT" "$TEMPLATE" \
    || die "$TEMPLATE does not set the discovery script path to $DISCOVERY_SCRIPT"

  if command -v nvidia-smi >/dev/null 2>&1 \
     && GPU_LINES="$(nvidia-smi --query-gpu=index,uuid,name,pci.bus_id --format=csv,noheader 2>&1)"; then
    visible=$(grep -c . <<<"$GPU_LINES" || true)
    GPU_SOURCE="nvidia-smi"
  else
    visible=""
    GPU_LINES=""
  fi

  if [[ -n "${BEAMOPS_TM_GPUS:-}" ]]; then
    GPU_SOURCE="BEAMOPS_TM_GPUS"
    if [[ -n "$visible" && "$visible" -lt "$BEAMOPS_TM_GPUS" ]]; then
      die "BEAMOPS_TM_GPUS=$BEAMOPS_TM_GPUS but nvidia-smi lists only $visible GPU(s) in this container"
    fi
  elif [[ -n "$visible" && "$visible" -gt 0 ]]; then
    BEAMOPS_TM_GPUS="$visible"
  elif [[ $CHECK -eq 1 ]]; then
    BEAMOPS_TM_GPUS=1
    GPU_SOURCE="assumed for --check: no GPU visible here (nvidia-smi missing or failing)"
  else
    die "no GPU visible: nvidia-smi is missing or lists none. Start the container with a GPU" \
        "(compose: deploy.resources.reservations.devices with capabilities [gpu, utility])," \
        "or run a CPU-only TaskManager from the stock Flink image instead."
  fi
  if (( BEAMOPS_TM_GPUS > 1 )); then
    warn "this TaskManager has $BEAMOPS_TM_GPUS GPUs but its worker-pool sidecar pins one:" \
         "all its slots' Python work would share that GPU. Reserve one GPU per TaskManager."
  fi
  TASK_MANAGER_NUMBER_OF_TASK_SLOTS="${TASK_MANAGER_NUMBER_OF_TASK_SLOTS:-$BEAMOPS_TM_GPUS}"
  if (( TASK_MANAGER_NUMBER_OF_TASK_SLOTS != BEAMOPS_TM_GPUS )); then
    warn "TASK_MANAGER_NUMBER_OF_TASK_SLOTS=$TASK_MANAGER_NUMBER_OF_TASK_SLOTS differs from the" \
         "$BEAMOPS_TM_GPUS GPU(s): the profile is one slot per GPU"
  fi
  export BEAMOPS_TM_GPUS TASK_MANAGER_NUMBER_OF_TASK_SLOTS
fi

# --- render ------------------------------------------------------------------------------------
# Copies the template line by line; a line "key: value ... (env: NAME)" gets $NAME as its value
# when NAME is set. RENDER_REPORT collects "dotted.key = value  (source)" for the plan.
RENDER_REPORT=()
render() {
  local template="$1" out="$2" line key indent name value origin path i
  local re_key='^( *)([A-Za-z0-9_.-]+):'
  local re_env='^( *[A-Za-z0-9_.-]+: *)([^ #]+)( +#.*\(env: ([A-Za-z0-9_]+)\).*)$'
  local -a stack_keys=() stack_indent=()
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" =~ $re_key ]]; then
      indent=${#BASH_REMATCH[1]}
      key=${BASH_REMATCH[2]}
      while (( ${#stack_indent[@]} > 0 )) && (( stack_indent[-1] >= indent )); do
        unset 'stack_indent[-1]' 'stack_keys[-1]'
      done
      stack_indent+=("$indent")
      stack_keys+=("$key")
    fi
    if [[ "$line" =~ $re_env ]]; then
      name=${BASH_REMATCH[4]}
      local allowed=0
      for i in "${ALLOWED_VARS[@]}"; do [[ "$i" == "$name" ]] && allowed=1; done
      (( allowed )) || die "$template: unknown variable in '(env: $name)'"
      value="${!name-}"
      if [[ -n "$value" ]]; then
        line="${BASH_REMATCH[1]}${value}${BASH_REMATCH[3]}"
        origin="from \$$name"
      else
        value=${BASH_REMATCH[2]}
        origin="template default; \$$name unset"
      fi
      path=$(IFS=.; echo "${stack_keys[*]}")
      RENDER_REPORT+=("$(printf '%-45s = %-32s (%s)' "$path" "$value" "$origin")")
    fi
    printf '%s\n' "$line"
  done <"$template" >"$out"
}

if [[ $CHECK -eq 1 ]]; then
  CONF_DIR="$(mktemp -d "${TMPDIR:-/tmp}/beamops-flink-conf.XXXXXX")"
  trap 'rm -rf "$CONF_DIR"' EXIT
else
  CONF_DIR="${FLINK_CONF_DIR:-$FLINK_HOME/conf}"
fi
mkdir -p "$CONF_DIR"
if [[ "$(cd "$CONF_DIR" && pwd -P)" != "$(cd "$FLINK_HOME/conf" && pwd -P)" ]]; then
  # Keep the distribution's log4j/logback files next to the rendered config.
  cp -R "$FLINK_HOME/conf/." "$CONF_DIR/"
fi
if [[ -e "$CONF_DIR/flink-conf.yaml" ]]; then
  # Flink 1.20 reads a legacy flink-conf.yaml in preference to config.yaml.
  warn "moving the legacy $CONF_DIR/flink-conf.yaml aside: it would shadow config.yaml"
  mv "$CONF_DIR/flink-conf.yaml" "$CONF_DIR/flink-conf.yaml.ignored"
fi
render "$TEMPLATE" "$CONF_DIR/config.yaml"
export FLINK_CONF_DIR="$CONF_DIR"

# --- plan --------------------------------------------------------------------------------------
log "role:        $ROLE"
log "FLINK_HOME:  $FLINK_HOME"
log "template:    $TEMPLATE"
log "config:      $CONF_DIR/config.yaml"
if [[ "$ROLE" == taskmanager ]]; then
  log "GPUs:        $BEAMOPS_TM_GPUS (${GPU_SOURCE:-nvidia-smi})"
  if [[ -n "$GPU_LINES" ]]; then
    while IFS= read -r l; do log "  visible:   $l"; done <<<"$GPU_LINES"
  fi
  log "slots:       $TASK_MANAGER_NUMBER_OF_TASK_SLOTS (one per GPU)"
fi
log "rendered values:"
for l in "${RENDER_REPORT[@]}"; do log "  $l"; done

# The GPU check Flink itself only warns about: run the plugin's discovery script exactly as the
# GPU driver will ("<script> <amount> <args>" from FLINK_HOME) and refuse to start if it fails.
if [[ "$ROLE" == taskmanager ]]; then
  if [[ "$GPU_SOURCE" == assumed* ]]; then
    log "discovery:   skipped (no GPU here); in the container Flink runs" \
        "'$DISCOVERY_SCRIPT $BEAMOPS_TM_GPUS'"
  elif indexes="$(cd "$FLINK_HOME" && "./$DISCOVERY_SCRIPT" "$BEAMOPS_TM_GPUS" 2>&1)"; then
    log "discovery:   '$DISCOVERY_SCRIPT $BEAMOPS_TM_GPUS' -> GPU index(es) $indexes"
  else
    msg="the GPU discovery script failed: $indexes"
    if [[ $CHECK -eq 1 ]]; then warn "$msg"; else die "$msg"; fi
  fi
fi

if [[ $CHECK -eq 1 ]]; then
  java_bin="java"
  [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]] && java_bin="$JAVA_HOME/bin/java"
  dist_jar="$(compgen -G "$FLINK_HOME/lib/flink-dist*.jar" | head -n 1 || true)"
  if command -v "$java_bin" >/dev/null 2>&1 && [[ -n "$dist_jar" ]]; then
    cp_="$FLINK_HOME/bin/bash-java-utils.jar:$dist_jar"
    run_java_utils() {
      "$java_bin" -classpath "$cp_" org.apache.flink.runtime.util.bash.BashJavaUtils "$1" --configDir "$CONF_DIR" 2>&1
    }
    # 1. Flink's own YAML parser reads the rendered file (a syntax error fails here).
    parsed="$(run_java_utils UPDATE_AND_GET_FLINK_CONFIGURATION)" \
      || die "Flink could not parse $CONF_DIR/config.yaml:" \
             "$(grep -m 1 -E 'Exception' <<<"$parsed" || tail -n 5 <<<"$parsed")"
    loaded=$(grep -c 'Loading configuration property:' <<<"$parsed" || true)
    log "flink parse: OK, $loaded keys; the GPU and address keys as Flink reads them:"
    grep -E 'Loading configuration property: (external-resource|taskmanager\.numberOfTaskSlots|jobmanager\.rpc\.address|rest\.address)' \
      <<<"$parsed" | sed 's/^.*Loading configuration property: /[entrypoint-taskmanager]     /' || true
    # 2. The memory model the start script computes (a size too small for the fixed parts fails).
    cmd=GET_TM_RESOURCE_PARAMS
    [[ "$ROLE" == jobmanager ]] && cmd=GET_JM_RESOURCE_PARAMS
    if ! resources="$(run_java_utils "$cmd")" || ! grep -q '^BASH_JAVA_UTILS_EXEC_RESULT:' <<<"$resources"; then
      die "Flink rejected the memory configuration:" \
          "$(grep -m 1 -E 'Exception' <<<"$resources" || tail -n 5 <<<"$resources")"
    fi
    log "flink memory: $(grep '^BASH_JAVA_UTILS_EXEC_RESULT:' <<<"$resources" | head -n 1 \
      | sed 's/^BASH_JAVA_UTILS_EXEC_RESULT://')"
  else
    log "flink parse: skipped (no java or no lib/flink-dist*.jar)"
  fi
  log "would run:   $FLINK_HOME/bin/$ROLE.sh start-foreground ${EXTRA_ARGS[*]:-}"
  log "check OK"
  exit 0
fi

# --- start -------------------------------------------------------------------------------------
# jemalloc, as the official image's entrypoint does (less RSS growth from glibc malloc arenas).
if [[ "${DISABLE_JEMALLOC:-false}" == false ]]; then
  for lib in "/usr/lib/$(uname -m)-linux-gnu/libjemalloc.so" /usr/lib/x86_64-linux-gnu/libjemalloc.so; do
    if [[ -f "$lib" ]]; then export LD_PRELOAD="${LD_PRELOAD:+$LD_PRELOAD:}$lib"; break; fi
  done
fi

log "exec $FLINK_HOME/bin/$ROLE.sh start-foreground ${EXTRA_ARGS[*]:-}"
if [[ "$(id -u)" == 0 ]] && command -v gosu >/dev/null 2>&1 && id flink >/dev/null 2>&1; then
  # Started as root (e.g. with --user 0): drop to the image's flink user like the official image.
  exec gosu flink "$FLINK_HOME/bin/$ROLE.sh" start-foreground "${EXTRA_ARGS[@]}"
fi
exec "$FLINK_HOME/bin/$ROLE.sh" start-foreground "${EXTRA_ARGS[@]}"
