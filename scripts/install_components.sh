#!/usr/bin/env bash
# Installs the external (non-Python-package) components that beamops'
# integration tests run against: a Kafka 4.x broker's jars, the Flink 1.20.5
# distribution, and Beam's Flink job-server jar (the official one of the SDK's
# version when the Maven registry serves it, else one shaded from the Beam and
# Flink artifacts it does serve: scripts/maven/beam-jobserver-assembled/pom.xml).
#
# Usage: scripts/install_components.sh [--check] [--retry]
#   --check   also start a throwaway single-node Kafka on 127.0.0.1, send and
#             read one message, and stop it again.
#   --retry   ask Maven again for the job-server jar even if it was found
#             missing within the last day.
#
# Environment:
#   BEAMOPS_CACHE          where everything goes (default ~/.cache/beamops);
#                          it must be outside the repository.
#   PYTHON                 interpreter whose pip installs Flink (default python3)
#                          and which runs the --check client.
#   BEAMOPS_KAFKA_VERSION  Kafka version (default below).
#   BEAMOPS_FLINK_JOB_SERVER_JAR  a job-server jar obtained by other means; it
#                          is copied into the cache instead of resolving one.
#
# Each step ends by writing a marker that records what it installed, and is
# skipped when that marker matches, so reruns take a second or two. The paths
# are printed at the end and written as export lines to $CACHE/components.env.
set -euo pipefail

# Newest 4.x whose kafka-tools module is also served here (4.4.0 and 4.2.2 are
# not), so a later need for the CLI tools does not force a version change.
KAFKA_VERSION="${BEAMOPS_KAFKA_VERSION:-4.3.1}"
FLINK_VERSION="1.20.5"
FLINK_MINOR="1.20"
# Must equal the apache-beam Python SDK version the project pins.
BEAM_VERSION="2.73.0"
MAVEN_DEP_PLUGIN="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
CACHE="${BEAMOPS_CACHE:-$HOME/.cache/beamops}"
PYTHON="${PYTHON:-python3}"

CHECK=0
RETRY=0
for arg in "$@"; do
  case "$arg" in
    --check) CHECK=1 ;;
    --retry) RETRY=1 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

CACHE="$(realpath -m "$CACHE")"
case "$CACHE/" in
  "$(realpath "$REPO_ROOT")/"*)
    # A cache in the work tree would be committed or wiped with it.
    echo "BEAMOPS_CACHE ($CACHE) must be outside the repository" >&2; exit 2 ;;
esac
mkdir -p "$CACHE/logs"

# Two test sessions installing at once would corrupt each other's staging dirs.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.install.lock"
  flock 9
fi

log() { printf '[install_components] %s\n' "$*"; }
die() { printf '[install_components] ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# Run a command with its chatter sent to a per-step log; show the log's tail
# only when it fails.
run_logged() {
  local logfile="$1"; shift
  if ! "$@" >"$logfile" 2>&1; then
    tail -n 25 "$logfile" >&2
    return 1
  fi
}

# The marker holds a key naming the inputs (versions and pom contents), so a
# changed pom or version reinstalls instead of trusting stale output.
marker_ok() { [[ -f "$1/.complete" && "$(cat "$1/.complete")" == "$2" ]]; }
# commit_stage STAGE DIR KEY: replace DIR by the finished STAGE and mark it complete for KEY.
commit_stage() { rm -rf "$2"; mv "$1" "$2"; printf '%s' "$3" >"$2/.complete"; }
file_key() { sha256sum "$1" | cut -c1-16; }

mvn_q() {
  # -B and no colour keep the log readable; ~/.m2 stays the shared download cache.
  mvn -B -q -Dstyle.color=never --no-transfer-progress "$@"
}

check_tools() {
  command -v java >/dev/null || die "java not found (Java 17+ is needed)"
  command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
  command -v unzip >/dev/null || die "unzip not found (apt-get install unzip): it checks the job-server jar"
  local major
  major="$(java -XshowSettings:properties -version 2>&1 \
    | awk -F'= ' '/java.specification.version/ { print $2 }')"
  # Kafka 4's broker refuses anything older than Java 17.
  [[ "${major%%.*}" -ge 17 ]] || die "Java $major found; Kafka 4 needs Java 17+"
}

# ---------------------------------------------------------------------------
KAFKA_DIR="$CACHE/kafka-$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_DIR/libs"
KAFKA_LOG4J="$KAFKA_DIR/config/log4j2.properties"
KAFKA_TOOLS_LOG4J="$KAFKA_DIR/config/tools-log4j2.properties"

install_kafka() {
  local pom="$SCRIPT_DIR/maven/kafka/pom.xml"
  local key
  key="kafka=$KAFKA_VERSION pom=$(file_key "$pom")"
  local t0; t0="$(now)"
  if marker_ok "$KAFKA_DIR" "$key"; then
    log "kafka $KAFKA_VERSION: already installed ($KAFKA_DIR)"
    return
  fi
  log "kafka $KAFKA_VERSION: resolving broker jars with Maven into $KAFKA_LIBS"
  local stage="$KAFKA_DIR.tmp"
  rm -rf "$stage"
  mkdir -p "$stage/config"
  run_logged "$CACHE/logs/kafka.log" mvn_q -f "$pom" \
    "$MAVEN_DEP_PLUGIN:copy-dependencies" \
    -Dkafka.version="$KAFKA_VERSION" -DincludeScope=runtime \
    -DoutputDirectory="$stage/libs" \
    || die "Maven could not resolve Kafka $KAFKA_VERSION (see $CACHE/logs/kafka.log)"

  # The jars carry no logging config (the tarball's config/ dir is not on
  # Maven); without one log4j2 prints only errors, which hides why a broker
  # did not start.
  cat >"$stage/config/log4j2.properties" <<'EOF'
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = STDOUT
# These two repeat every config value and every request at INFO.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = warn
logger.request.name = kafka.request.logger
logger.request.level = warn
EOF
  cat >"$stage/config/tools-log4j2.properties" <<'EOF'
status = warn
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.err.ref = STDERR
EOF

  # Prove the classpath holds the two entry points before calling it done.
  java -Dlog4j2.configurationFile="$stage/config/tools-log4j2.properties" \
    -cp "$stage/libs/*" kafka.tools.StorageTool random-uuid >/dev/null \
    || die "kafka.tools.StorageTool does not run from $stage/libs"
  java -cp "$stage/libs/*" kafka.Kafka --version >/dev/null 2>&1 \
    || die "kafka.Kafka does not run from $stage/libs"

  commit_stage "$stage" "$KAFKA_DIR" "$key"
  log "kafka $KAFKA_VERSION: done in $(elapsed "$t0") ($(du -sh "$KAFKA_DIR" | cut -f1))"
}

# ---------------------------------------------------------------------------
FLINK_DIR="$CACHE/flink-$FLINK_VERSION"

install_flink() {
  local key="flink=$FLINK_VERSION"
  local t0; t0="$(now)"
  if marker_ok "$FLINK_DIR" "$key"; then
    log "flink $FLINK_VERSION: already installed ($(cat "$FLINK_DIR/FLINK_HOME"))"
    return
  fi
  log "flink $FLINK_VERSION: pip-installing apache-flink + apache-flink-libraries into $FLINK_DIR"
  local stage="$FLINK_DIR.tmp"
  rm -rf "$stage"
  # --no-deps because apache-flink pins an old apache-beam; --target keeps it
  # out of every environment, it is only unpacked for its distribution files.
  run_logged "$CACHE/logs/flink.log" "$PYTHON" -m pip install \
    --disable-pip-version-check --no-input --no-deps --target "$stage" \
    "apache-flink==$FLINK_VERSION" "apache-flink-libraries==$FLINK_VERSION" \
    || die "pip could not install Flink $FLINK_VERSION (see $CACHE/logs/flink.log)"

  local home="$stage/pyflink"
  [[ -f "$home/bin/start-cluster.sh" && -d "$home/lib" && -d "$home/conf" \
     && -d "$home/plugins/external-resource-gpu" ]] \
    || die "unexpected layout: no Flink distribution under $home"
  # Wheels do not always keep mode bits, and the cluster scripts exec each other.
  chmod +x "$home"/bin/*.sh "$home/bin/flink" "$home"/plugins/external-resource-gpu/*.sh

  rm -rf "$FLINK_DIR"
  mv "$stage" "$FLINK_DIR"
  home="$FLINK_DIR/pyflink"
  printf '%s\n' "$home" >"$FLINK_DIR/FLINK_HOME"
  FLINK_HOME="$home" "$home/bin/flink" --version >"$CACHE/logs/flink-version.log" 2>&1 \
    || { cat "$CACHE/logs/flink-version.log" >&2; die "bin/flink --version failed"; }
  printf '%s' "$key" >"$FLINK_DIR/.complete"
  log "flink $FLINK_VERSION: done in $(elapsed "$t0") ($(du -sh "$FLINK_DIR" | cut -f1)," \
      "$(grep -o 'Version: [^,]*' "$CACHE/logs/flink-version.log")); FLINK_HOME=$home"
}

# ---------------------------------------------------------------------------
# A shaded job-server jar is >100 MB; anything without the driver is an error page or stub.
# (unzip's own pattern, not a pipe into grep -q: with pipefail, grep closing early fails the pipe.)
is_job_server_jar() { unzip -l "$1" 'org/apache/beam/runners/flink/FlinkJobServerDriver.class' >/dev/null 2>&1; }

BEAM_DIR="$CACHE/beam-$BEAM_VERSION"
JOB_SERVER_JAR="$BEAM_DIR/beam-runners-flink-$FLINK_MINOR-job-server-$BEAM_VERSION.jar"
JOB_SERVER_STATUS="missing"

install_job_server() {
  local pom="$SCRIPT_DIR/maven/beam-jobserver/pom.xml"
  local given="${BEAMOPS_FLINK_JOB_SERVER_JAR:-}"
  # components.env exports this script's own jar: an install from a shell that sourced it must
  # not copy the assembled jar over the official one's name.
  if [[ -n "$given" ]] && { [[ "$given" -ef "$JOB_SERVER_JAR" ]] || [[ "$given" -ef "$ASSEMBLED_JAR" ]]; }; then
    given=""
  fi
  local key
  key="beam=$BEAM_VERSION flink=$FLINK_MINOR pom=$(file_key "$pom")"
  [[ -n "$given" ]] && key="$key given=$(file_key "$given")"
  local t0; t0="$(now)"
  if marker_ok "$BEAM_DIR" "$key" && [[ -f "$JOB_SERVER_JAR" ]]; then
    log "beam job server $BEAM_VERSION: already installed ($JOB_SERVER_JAR)"
    JOB_SERVER_STATUS="ok"
    return
  fi
  local stage="$BEAM_DIR.tmp"
  rm -rf "$stage"
  mkdir -p "$stage"
  if [[ -n "$given" ]]; then
    log "beam job server $BEAM_VERSION: copying the given jar $given"
    [[ -f "$given" ]] || die "BEAMOPS_FLINK_JOB_SERVER_JAR=$given does not exist"
    cp "$given" "$stage/$(basename "$JOB_SERVER_JAR")"
  else
    # Maven needs ~4 s just to re-learn that the artifact is missing; a
    # recent negative answer for the same inputs is reused for a day.
    if [[ -n "$(find "$BEAM_DIR.unavailable" -mmin -1440 2>/dev/null)" \
          && "$(cat "$BEAM_DIR.unavailable")" == "$key" && "$RETRY" == 0 ]]; then
      rmdir "$stage"
      log "beam job server $BEAM_VERSION: not served by the Maven registry" \
          "(known since $(date -r "$BEAM_DIR.unavailable" '+%F %T'); --retry to ask again)"
      install_assembled_job_server
      return
    fi
    log "beam job server $BEAM_VERSION: resolving beam-runners-flink-$FLINK_MINOR-job-server with Maven"
    if ! mvn_q -f "$pom" "$MAVEN_DEP_PLUGIN:copy" -Dbeam.version="$BEAM_VERSION" \
        -Dflink.minor="$FLINK_MINOR" -Djobserver.outputDirectory="$stage" \
        >"$CACHE/logs/beam-jobserver.log" 2>&1; then
      rm -rf "$stage"
      printf '%s' "$key" >"$BEAM_DIR.unavailable"
      log "beam job server $BEAM_VERSION: not served by the Maven registry" \
          "(after $(elapsed "$t0"); details: $CACHE/logs/beam-jobserver.log)"
      install_assembled_job_server
      return
    fi
  fi
  is_job_server_jar "$stage/$(basename "$JOB_SERVER_JAR")" \
    || die "$(basename "$JOB_SERVER_JAR") lacks FlinkJobServerDriver; not a job-server jar"
  commit_stage "$stage" "$BEAM_DIR" "$key"
  rm -f "$BEAM_DIR.unavailable"
  JOB_SERVER_STATUS="ok"
  log "beam job server $BEAM_VERSION: done in $(elapsed "$t0") ($(du -sh "$BEAM_DIR" | cut -f1))"
}

# The official jar of the SDK's version is not served here (apache/beam#36338):
# shade one from the newest Flink runner library and job service that are, with
# Flink 1.20.5's client jars (see the pom's header for why that combination).
ASSEMBLED_BEAM_VERSION="2.70.0"
ASSEMBLED_DIR="$CACHE/beam-jobserver-assembled-$ASSEMBLED_BEAM_VERSION-flink$FLINK_VERSION"
ASSEMBLED_JAR="$ASSEMBLED_DIR/beam-flink-$FLINK_MINOR-job-server-assembled-$ASSEMBLED_BEAM_VERSION.jar"

install_assembled_job_server() {
  local pom="$SCRIPT_DIR/maven/beam-jobserver-assembled/pom.xml"
  local key
  key="pom=$(file_key "$pom")"
  local t0; t0="$(now)"
  if marker_ok "$ASSEMBLED_DIR" "$key" && [[ -f "$ASSEMBLED_JAR" ]]; then
    log "beam job server (assembled, runner $ASSEMBLED_BEAM_VERSION): already built ($ASSEMBLED_JAR)"
    JOB_SERVER_JAR="$ASSEMBLED_JAR"
    JOB_SERVER_STATUS="assembled"
    return
  fi
  local stage="$ASSEMBLED_DIR.tmp"
  rm -rf "$stage"
  mkdir -p "$stage"
  log "beam job server (assembled, runner $ASSEMBLED_BEAM_VERSION): building a shaded jar with Maven" \
      "(first time: ~300 MB of dependencies, about 1-3 min)"
  mvn_q -f "$pom" package -Djobserver.buildDirectory="$stage/build" -Dbeam.version="$ASSEMBLED_BEAM_VERSION" \
      -Dflink.version="$FLINK_VERSION" >"$CACHE/logs/beam-jobserver-assembled.log" 2>&1 \
    || die "could not build the assembled job server (see $CACHE/logs/beam-jobserver-assembled.log)"
  mv "$stage/build/$(basename "$ASSEMBLED_JAR")" "$stage/"
  rm -rf "$stage/build"
  is_job_server_jar "$stage/$(basename "$ASSEMBLED_JAR")" \
    || die "$(basename "$ASSEMBLED_JAR") lacks FlinkJobServerDriver; not a job-server jar"
  commit_stage "$stage" "$ASSEMBLED_DIR" "$key"
  JOB_SERVER_JAR="$ASSEMBLED_JAR"
  JOB_SERVER_STATUS="assembled"
  log "beam job server (assembled): done in $(elapsed "$t0") ($(du -sh "$ASSEMBLED_DIR" | cut -f1))"
}

# ---------------------------------------------------------------------------
free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Formats a KRaft dir, starts a combined broker+controller on loopback ports,
# round-trips one message, and stops the broker by its PID.
check_kafka() {
  local t0; t0="$(now)"
  log "check: starting a throwaway Kafka $KAFKA_VERSION on 127.0.0.1"
  local port cport
  CHECK_TMP="$(mktemp -d "${TMPDIR:-/tmp}/beamops-kafka-check.XXXXXX")"
  CHECK_PID=""
  # A failed check must not leave a broker running or its data dir behind.
  trap 'if [[ -n "$CHECK_PID" ]]; then kill "$CHECK_PID" 2>/dev/null || true; fi; rm -rf "$CHECK_TMP"' EXIT
  local tmp="$CHECK_TMP"
  port="$(free_port)"
  cport="$(free_port)"
  cat >"$tmp/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$tmp/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
  local cid
  cid="$(java -Dlog4j2.configurationFile="$KAFKA_TOOLS_LOG4J" -cp "$KAFKA_LIBS/*" \
    kafka.tools.StorageTool random-uuid)"
  # Static quorum (controller.quorum.voters), so no --standalone: 4.x rejects
  # that flag together with controller.quorum.voters.
  java -Dlog4j2.configurationFile="$KAFKA_TOOLS_LOG4J" -cp "$KAFKA_LIBS/*" \
    kafka.tools.StorageTool format -t "$cid" -c "$tmp/server.properties" \
    >"$tmp/format.log" 2>&1 || { cat "$tmp/format.log" >&2; die "storage format failed"; }

  java -Xmx512m -Dlog4j2.configurationFile="$KAFKA_LOG4J" -cp "$KAFKA_LIBS/*" \
    kafka.Kafka "$tmp/server.properties" >"$tmp/server.log" 2>&1 &
  CHECK_PID=$!
  local pid=$CHECK_PID
  for _ in $(seq 1 120); do
    grep -qs 'Kafka Server started' "$tmp/server.log" && break
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$tmp/server.log" >&2; die "broker exited"; }
    sleep 0.5
  done
  grep -q 'Kafka Server started' "$tmp/server.log" \
    || { tail -n 30 "$tmp/server.log" >&2; die "broker did not start within 60s"; }
  log "check: broker up on 127.0.0.1:$port after $(elapsed "$t0")"

  if "$PYTHON" -c 'import confluent_kafka' 2>/dev/null; then
    "$PYTHON" - "127.0.0.1:$port" <<'EOF' || die "produce/consume round trip failed"
import sys, time
from confluent_kafka import Consumer, Producer
bootstrap = sys.argv[1]
p = Producer({"bootstrap.servers": bootstrap})
p.produce("beamops-check", key=b"k", value=b"hello")
assert p.flush(15) == 0, "message not delivered"
c = Consumer({"bootstrap.servers": bootstrap, "group.id": "beamops-check",
              "auto.offset.reset": "earliest"})
c.subscribe(["beamops-check"])
deadline = time.time() + 30
try:
    while time.time() < deadline:
        m = c.poll(1.0)
        if m is not None and not m.error():
            assert m.value() == b"hello", m.value()
            break
    else:
        raise SystemExit("no message consumed within 30s")
finally:
    c.close()
EOF
    log "check: produced and consumed one message via confluent-kafka ($(elapsed "$t0") so far)"
  else
    # Without the client library, a TCP accept on the listener is the best proof.
    (exec 3<>"/dev/tcp/127.0.0.1/$port") || die "broker port $port not accepting"
    log "check: broker accepts connections (confluent-kafka not importable by $PYTHON)"
  fi

  kill "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
  wait "$pid" 2>/dev/null || true
  CHECK_PID=""
  rm -rf "$tmp"
  trap - EXIT
  log "check: kafka ok in $(elapsed "$t0")"
}

# ---------------------------------------------------------------------------
write_env() {
  local env="$CACHE/components.env" flink_home=""
  [[ -f "$FLINK_DIR/FLINK_HOME" ]] && flink_home="$(cat "$FLINK_DIR/FLINK_HOME")"
  local jar=""
  [[ "$JOB_SERVER_STATUS" != missing ]] && jar="$JOB_SERVER_JAR"
  {
    echo "# Written by scripts/install_components.sh; source it to find the components."
    printf 'export BEAMOPS_KAFKA_VERSION=%q\n' "$KAFKA_VERSION"
    printf 'export BEAMOPS_KAFKA_LIBS=%q\n' "$KAFKA_LIBS"
    printf 'export BEAMOPS_KAFKA_LOG4J_CONFIG=%q\n' "$KAFKA_LOG4J"
    printf 'export FLINK_HOME=%q\n' "$flink_home"
    printf 'export BEAMOPS_FLINK_JOB_SERVER_JAR=%q\n' "$jar"
  } >"$env.tmp"
  mv "$env.tmp" "$env"
}

main() {
  local t0; t0="$(now)"
  check_tools
  log "cache: $CACHE"
  install_kafka
  install_flink
  install_job_server
  write_env
  [[ "$CHECK" == 1 ]] && check_kafka

  log "summary (total $(elapsed "$t0")):"
  log "  BEAMOPS_KAFKA_VERSION=$KAFKA_VERSION"
  log "  BEAMOPS_KAFKA_LIBS=$KAFKA_LIBS   (java -cp \"\$BEAMOPS_KAFKA_LIBS/*\" kafka.Kafka | kafka.tools.StorageTool)"
  log "  BEAMOPS_KAFKA_LOG4J_CONFIG=$KAFKA_LOG4J"
  log "  FLINK_HOME=$(cat "$FLINK_DIR/FLINK_HOME")"
  case "$JOB_SERVER_STATUS" in
    ok) log "  BEAMOPS_FLINK_JOB_SERVER_JAR=$JOB_SERVER_JAR" ;;
    assembled) log "  BEAMOPS_FLINK_JOB_SERVER_JAR=$JOB_SERVER_JAR (assembled: Beam's $BEAM_VERSION jar is not served)" ;;
    *) log "  BEAMOPS_FLINK_JOB_SERVER_JAR= (MISSING)" ;;
  esac
  log "  env file: $CACHE/components.env"
}

main
