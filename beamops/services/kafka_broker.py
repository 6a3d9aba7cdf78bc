"""A local single-node Apache Kafka 4.x broker (KRaft, combined broker+controller) on 127.0.0.1.

    from beamops.services.kafka_broker import KafkaBroker

    with KafkaBroker(ephemeral=True) as broker:  # a free port; a temp dir removed on stop
        broker.create_topic("frames", partitions=4)
        producer = Producer({"bootstrap.servers": broker.bootstrap_servers})

    broker = KafkaBroker(9092)  # state in ~/.cache/beamops/run/kafka-9092/, data in its data/
    broker.start()
    broker.status()
    broker.restart()
    broker.stop()

The broker is a ``java kafka.Kafka`` process run with the machine's Java 17 from the jars that
``scripts/install_components.sh`` caches (found through ``$BEAMOPS_KAFKA_LIBS`` or
``~/.cache/beamops/components.env``). Both its client and its controller listener are bound to
127.0.0.1 only. It runs detached (its own session), so it outlives the Python process that started it;
the state directory holds ``state.json`` (pid, ports, paths, start time), ``server.properties`` and
``server.log``. A process is only signalled after ``/proc/<pid>/cmdline`` shows it is this broker's
``java ... kafka.Kafka <server.properties>``, so a stale state file never gets another process killed.

Environment: ``BEAMOPS_CACHE`` (default ``~/.cache/beamops``), ``BEAMOPS_RUN_DIR`` (state directories,
default ``$BEAMOPS_CACHE/run``), ``BEAMOPS_KAFKA_LIBS``, ``BEAMOPS_KAFKA_LOG4J_CONFIG``,
``BEAMOPS_KAFKA_VERSION`` (override ``components.env``), ``JAVA_HOME``.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from base64 import urlsafe_b64encode
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# HOST, Progress, cache_dir, run_dir, free_port, port_is_free and STATE_FILE stay importable from here.
from beamops.io.kafka_config import MAX_MESSAGE_BYTES
from beamops.services._local import (
    HOST,
    LocalServer,
    Progress,
    choose_port,
    cli_error,
    cli_print,
    cli_status,
    cmdline,
    components_env_file,
    duration,
    env_setting,
    ephemeral_port_warning,
    free_port,
    log_tail,
    port_holders,
    port_is_free,
    read_env_file,
    read_json,
    require_java,
    run_dir,
    running_elsewhere,
    spawn,
    terminate,
    wait_exit,
    write_json,
)
from beamops.services._local import STATE_FILE as STATE_FILE
from beamops.services._local import cache_dir as cache_dir

log = logging.getLogger(__name__)

DEFAULT_PORT = 9092
# Written into the data dir: the controller port it was formatted with, reused on restarts.
DATA_INFO_FILE = "beamops-kafka.json"
_LOG_TAIL_LINES = 30


class KafkaBrokerError(RuntimeError):
    """The broker could not be found, started, reached or stopped."""


# ---------------------------------------------------------------------------------------------------
# Components: java and the cached jars


@dataclass(frozen=True)
class KafkaComponents:
    java: Path
    libs: Path
    log4j_config: Path
    tools_log4j_config: Path
    version: str

    @property
    def classpath(self) -> str:
        return f"{self.libs}/*"


def find_java() -> Path:
    return require_java(KafkaBrokerError, "Java 17+")


def find_components() -> KafkaComponents:
    """Java and the Kafka jars, from the environment or ``$BEAMOPS_CACHE/components.env``."""
    env_file = components_env_file()
    from_file = read_env_file(env_file) if env_file.is_file() else {}

    def setting(name: str) -> str:
        return env_setting(name, from_file)

    hint = (
        "run scripts/install_components.sh (it caches the jars and writes "
        f"{env_file}), or set BEAMOPS_KAFKA_LIBS to a directory of Kafka broker jars"
    )
    libs_setting = setting("BEAMOPS_KAFKA_LIBS")
    if not libs_setting:
        raise KafkaBrokerError(f"the Kafka broker jars are not installed: {hint}")
    libs = Path(libs_setting).expanduser()
    server_jars = sorted(libs.glob("kafka_2.13-*.jar"))
    if not server_jars:
        raise KafkaBrokerError(f"no kafka_2.13-*.jar in {libs}: {hint}")
    version = setting("BEAMOPS_KAFKA_VERSION") or server_jars[-1].stem.removeprefix("kafka_2.13-")
    log4j_setting = setting("BEAMOPS_KAFKA_LOG4J_CONFIG")
    log4j = Path(log4j_setting).expanduser() if log4j_setting else libs.parent / "config" / "log4j2.properties"
    if not log4j.is_file():
        # Without a config log4j2 prints only errors, which hides why a broker does not start.
        raise KafkaBrokerError(f"Kafka's log4j2 config {log4j} is missing: {hint}")
    tools_log4j = log4j.with_name("tools-log4j2.properties")
    return KafkaComponents(
        java=find_java(),
        libs=libs,
        log4j_config=log4j,
        tools_log4j_config=tools_log4j if tools_log4j.is_file() else log4j,
        version=version,
    )


# ---------------------------------------------------------------------------------------------------
# Processes (ports and /proc: beamops.services._local)


def is_kafka_process(pid: int, properties: Path | str | None = None) -> bool:
    """Whether ``pid`` is alive and is ``java ... kafka.Kafka [properties]``."""
    if pid <= 0:
        return False
    args = cmdline(pid)
    if not args or not Path(args[0]).name.startswith("java") or "kafka.Kafka" not in args:
        return False
    return properties is None or str(properties) in args


def _random_cluster_id() -> str:
    """Like Kafka's ``Uuid.randomUuid()``: url-safe base64 of a v4 UUID, never starting with '-'."""
    while True:
        cid = urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _quiet_rdkafka_logger() -> logging.Logger:
    # librdkafka logs every refused connection at ERROR while a broker starts or restarts.
    logger = logging.getLogger(f"{__name__}.rdkafka")  # not kafka_config.RDKAFKA_LOGGER: this one drops all
    logger.propagate = False
    logger.addHandler(logging.NullHandler())
    return logger


def _admin(bootstrap: str, quiet: bool = False) -> Any:
    from confluent_kafka.admin import AdminClient

    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "reconnect.backoff.ms": 50,
        "reconnect.backoff.max.ms": 500,
    }
    if quiet:
        conf["logger"] = _quiet_rdkafka_logger()
    return AdminClient(conf)


def _metadata_ready(md: Any, topics: list[str] | None = None) -> bool:
    """A broker is registered and every (named) topic exists with a leader for each partition."""
    if not md.brokers:
        return False
    names = topics if topics is not None else list(md.topics)
    for name in names:
        topic = md.topics.get(name)
        if topic is None or topic.error is not None or not topic.partitions:
            return False
        if any(p.leader < 0 or p.error is not None for p in topic.partitions.values()):
            return False
    return True


def wait_until_ready(
    bootstrap: str,
    timeout: float = 30.0,
    topics: list[str] | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Wait until the broker answers metadata requests and the topics' partitions have leaders.

    ``alive``, when given, is asked between attempts; waiting ends as soon as it returns False.
    """
    from confluent_kafka import KafkaException

    admin = _admin(bootstrap, quiet=True)
    deadline = time.monotonic() + timeout
    last: object = "no answer"
    while True:
        if alive is not None and not alive():
            raise KafkaBrokerError("the broker process exited")
        try:
            md = admin.list_topics(timeout=1.0)
            if _metadata_ready(md, topics):
                return
            last = "partitions without a leader"
        except KafkaException as exc:
            last = exc
        if time.monotonic() > deadline:
            raise KafkaBrokerError(f"{bootstrap} not ready within {timeout:.0f}s ({last})")
        time.sleep(0.1)


def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    *,
    config: Mapping[str, str] | None = None,
    exist_ok: bool = False,
    timeout: float = 30.0,
) -> None:
    """Create a topic (replication factor 1) and wait until all its partitions have a leader."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    admin = _admin(bootstrap)
    new = NewTopic(name, num_partitions=partitions, replication_factor=1, config=dict(config or {}))
    future = admin.create_topics([new], operation_timeout=timeout, request_timeout=timeout)[name]
    try:
        future.result(timeout=timeout)
    except KafkaException as exc:
        if not (exist_ok and exc.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise KafkaBrokerError(f"cannot create topic {name!r} on {bootstrap}: {exc}") from exc
    wait_until_ready(bootstrap, timeout, topics=[name])


def delete_topic(bootstrap: str, name: str, *, missing_ok: bool = True, timeout: float = 30.0) -> None:
    """Delete a topic and wait until the broker no longer lists it."""
    from confluent_kafka import KafkaError, KafkaException

    admin = _admin(bootstrap)
    future = admin.delete_topics([name], operation_timeout=timeout, request_timeout=timeout)[name]
    try:
        future.result(timeout=timeout)
    except KafkaException as exc:
        if not (missing_ok and exc.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            raise KafkaBrokerError(f"cannot delete topic {name!r} on {bootstrap}: {exc}") from exc
    deadline = time.monotonic() + timeout
    while name in admin.list_topics(timeout=timeout).topics:
        if time.monotonic() > deadline:
            raise KafkaBrokerError(f"topic {name!r} still listed {timeout:g}s after its deletion")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------
# The broker


@dataclass(frozen=True)
class KafkaStatus:
    running: bool
    pid: int | None
    bootstrap: str
    data_dir: Path
    uptime: float | None  # seconds since start, when running
    port: int
    controller_port: int | None
    log_path: Path
    state_file: Path
    stale: bool = False  # a state file names a PID that is not this broker (it died or the PID was reused)

    def describe(self) -> str:
        if self.running:
            return (
                f"running: pid {self.pid}, bootstrap {self.bootstrap}, controller {HOST}:{self.controller_port}, "
                f"up {duration(self.uptime or 0)}, data {self.data_dir}, log {self.log_path}"
            )
        stale = f" (stale state file {self.state_file} names pid {self.pid})" if self.stale else ""
        return f"not running on {self.bootstrap}{stale}"


class KafkaBroker(LocalServer):
    """One Kafka broker+controller on 127.0.0.1:``port``, its data in ``data_dir``.

    ``port``: the client port (a free one when None). ``controller_port``: when None, the one the data dir
    was last run with, else ``port + 1`` if free, else a free one. ``state_dir`` defaults to
    ``$BEAMOPS_RUN_DIR/kafka-<port>`` and ``data_dir`` to ``<state_dir>/data``. ``ephemeral=True``
    puts both in a new temp dir that ``stop()`` deletes (``restart()`` keeps it). ``quick_start``
    (default: ``ephemeral``) runs the JVM with C1 only, which halves the start-up time (about 4 s
    instead of 8 s here) at some cost in peak throughput; leave it off for benchmarks.
    ``jvm_options`` (and ``$BEAMOPS_KAFKA_JVM_OPTS``) are added to the java command line. ``config``
    adds or overrides server.properties entries (the listeners must stay on 127.0.0.1).
    """

    _log = log

    def __init__(
        self,
        port: int | None = None,
        *,
        controller_port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        ephemeral: bool = False,
        heap: str = "512m",
        heap_initial: str = "256m",
        quick_start: bool | None = None,
        jvm_options: list[str] | None = None,
        config: Mapping[str, str] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.port = port if port is not None else free_port()
        self._requested_controller_port = controller_port
        self.ephemeral = ephemeral
        if ephemeral and state_dir is None:
            state_dir = tempfile.mkdtemp(prefix=f"beamops-kafka-{self.port}-")
        self.state_dir = Path(state_dir) if state_dir is not None else run_dir() / f"kafka-{self.port}"
        self.data_dir = Path(data_dir) if data_dir is not None else self.state_dir / "data"
        self._data_dir_given = data_dir is not None
        self.heap = heap
        self.heap_initial = heap_initial
        self.quick_start = ephemeral if quick_start is None else quick_start
        self.jvm_options = list(jvm_options or []) + shlex.split(os.environ.get("BEAMOPS_KAFKA_JVM_OPTS", ""))
        self.extra_config = dict(config or {})
        self.progress = progress
        self._proc: subprocess.Popen[bytes] | None = None
        self._components: KafkaComponents | None = None

    # -- paths and state --------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "server.log"

    @property
    def properties_path(self) -> Path:
        return self.state_dir / "server.properties"

    @property
    def components(self) -> KafkaComponents:
        if self._components is None:
            self._components = find_components()
        return self._components

    @property
    def pid(self) -> int | None:
        """The running broker's PID, or None."""
        return self._live_pid(self._read_state())

    @property
    def controller_port(self) -> int | None:
        state = self._read_state()
        if state:
            return state.get("controller_port")
        return self._requested_controller_port or self._data_info().get("controller_port")

    def _data_info(self) -> dict[str, Any]:
        return read_json(self.data_dir / DATA_INFO_FILE, {})

    def _child(self, pid: int) -> subprocess.Popen[bytes] | None:
        """The broker this object launched, if it has ``pid``."""
        return self._proc if self._proc is not None and self._proc.pid == pid else None

    def _live_pid(self, state: dict[str, Any] | None) -> int | None:
        """The state file's PID if it is this broker's running java process."""
        if not state:
            return None
        pid = int(state.get("pid") or 0)
        if self._proc is not None and self._proc.pid == pid and self._proc.poll() is not None:
            return None  # our child exited; poll() reaped it
        properties = state.get("properties", str(self.properties_path))
        return pid if is_kafka_process(pid, properties) else None

    # -- status -----------------------------------------------------------------------------------

    def status(self) -> KafkaStatus:
        state = self._read_state()
        pid = self._live_pid(state)
        running = pid is not None
        data_dir = Path(state["data_dir"]) if state and state.get("data_dir") else self.data_dir
        return KafkaStatus(
            running=running,
            pid=pid if running else (state or {}).get("pid"),
            bootstrap=self.bootstrap_servers,
            data_dir=data_dir,
            uptime=time.time() - float(state["started_at"]) if running and state else None,
            port=self.port,
            controller_port=(state or {}).get("controller_port", self.controller_port),
            log_path=self.log_path,
            state_file=self.state_path,
            stale=state is not None and not running,
        )

    def is_running(self) -> bool:
        return self._live_pid(self._read_state()) is not None

    # -- start ------------------------------------------------------------------------------------

    def _choose_controller_port(self) -> int:
        if self._requested_controller_port is not None:
            return self._requested_controller_port
        remembered = self._data_info().get("controller_port")
        return choose_port((remembered, self.port + 1), self.port)

    def server_properties(self, controller_port: int) -> dict[str, str]:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "message.max.bytes": str(MAX_MESSAGE_BYTES),
            # Tests replay by timestamp, often old ones: never delete by age or size.
            "log.retention.ms": "-1",
            "log.retention.bytes": "-1",
            # The cleaner's default 128 MiB buffer is a quarter of the small heap.
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        }
        props.update(self.extra_config)
        for key in ("listeners", "advertised.listeners", "controller.quorum.voters"):
            if f"//{HOST}:" not in props[key] and f"@{HOST}:" not in props[key]:
                raise KafkaBrokerError(f"{key}={props[key]!r}: this broker listens on {HOST} only")
        return props

    def _format_storage(self, comps: KafkaComponents) -> str:
        meta = self.data_dir / "meta.properties"
        if meta.is_file():
            for line in meta.read_text().splitlines():
                if line.startswith("cluster.id="):
                    return line.partition("=")[2].strip()
        cluster_id = _random_cluster_id()
        t0 = time.monotonic()
        # Static quorum (controller.quorum.voters), hence no --standalone.
        cmd = [
            str(comps.java),
            "-XX:TieredStopAtLevel=1",  # a short-lived tool: C2 would only cost start-up time
            f"-Dlog4j2.configurationFile={comps.tools_log4j_config}",
            "-cp",
            comps.classpath,
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "-t",
            cluster_id,
            "-c",
            str(self.properties_path),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise KafkaBrokerError(f"formatting {self.data_dir} failed:\n{done.stdout}{done.stderr}")
        self._say(f"formatted {self.data_dir} (cluster id {cluster_id}) in {time.monotonic() - t0:.1f}s")
        return cluster_id

    def start(self, timeout: float = 60.0) -> KafkaBroker:
        """Start the broker (formatting the data dir the first time) and wait until it serves clients.

        Returns once it serves clients if it already runs. Raises KafkaBrokerError with the log's last
        lines when the process exits or is not ready within ``timeout`` seconds (a broker this call
        launched is then killed).
        """
        t0 = time.monotonic()
        with self._locked():
            state = self._read_state()
            pid = self._live_pid(state)
            launched = pid is None
            if pid is not None:
                running_on = Path(state["data_dir"]) if state and state.get("data_dir") else self.data_dir
                if self._data_dir_given and running_on.resolve() != self.data_dir.resolve():
                    raise KafkaBrokerError(
                        f"a broker already runs on {self.bootstrap_servers} (pid {pid}) with its data in "
                        f"{running_on}, not {self.data_dir}: stop it first (`beamops kafka down --port {self.port}`), "
                        "or give another --port"
                    )
                self._say(f"already running on {self.bootstrap_servers} (pid {pid}), data {running_on}")
            else:
                pid = self._launch()
        try:
            wait_until_ready(
                self.bootstrap_servers,
                timeout=max(1.0, timeout - (time.monotonic() - t0)),
                alive=lambda: self._live_pid(self._read_state()) == pid,
            )
        except KafkaBrokerError as exc:
            child = self._child(pid)
            code = child.poll() if child is not None else None
            if launched:  # never kill a broker that someone else started (it may still be starting)
                self._abort(pid)
            reason = f"{exc} with status {code}" if code is not None else str(exc)
            raise KafkaBrokerError(f"Kafka on {self.bootstrap_servers} did not start: {reason}{self._tail()}") from exc
        self._say(f"ready on {self.bootstrap_servers} (pid {pid}) after {time.monotonic() - t0:.1f}s")
        return self

    def _launch(self) -> int:
        comps = self.components
        if not port_is_free(self.port):
            raise KafkaBrokerError(f"{HOST}:{self.port} is already in use by another process{port_holders(self.port)}")
        controller_port = self._choose_controller_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self.server_properties(controller_port)
        self.properties_path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        cluster_id = self._format_storage(comps)
        write_json(
            self.data_dir / DATA_INFO_FILE,
            {"cluster_id": cluster_id, "port": self.port, "controller_port": controller_port},
        )
        self._say(
            f"starting Kafka {comps.version} on {self.bootstrap_servers} "
            f"(controller {HOST}:{controller_port}), data {self.data_dir}"
        )
        cmd = [
            str(comps.java),
            f"-Xmx{self.heap}",
            f"-Xms{self.heap_initial}",
            # C1 only: the broker is ready in about half the time, at some cost in peak throughput.
            *(["-XX:TieredStopAtLevel=1"] if self.quick_start else []),
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            # Bind IPv4 sockets (they show up in /proc/net/tcp as 127.0.0.1, not as ::ffff:127.0.0.1).
            "-Djava.net.preferIPv4Stack=true",
            f"-Dlog4j2.configurationFile={comps.log4j_config}",
            *self.jvm_options,
            "-cp",
            comps.classpath,
            "kafka.Kafka",
            str(self.properties_path),
        ]
        self._proc, self._log_offset = spawn(cmd, self.log_path, self.state_dir)
        self._write_state(
            {
                "pid": self._proc.pid,
                "port": self.port,
                "controller_port": controller_port,
                "bootstrap": self.bootstrap_servers,
                "data_dir": str(self.data_dir),
                "log_path": str(self.log_path),
                "properties": str(self.properties_path),
                "kafka_version": comps.version,
                "started_at": time.time(),
            },
        )
        # Fail fast when the JVM exits during start-up (bad port, Java too old, corrupt data dir).
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline and self._proc.poll() is None:
            time.sleep(0.05)
        if self._proc.poll() is not None:
            code = self._proc.returncode
            self.state_path.unlink(missing_ok=True)
            raise KafkaBrokerError(f"Kafka exited with status {code} at once{self._tail()}")
        return self._proc.pid

    def _abort(self, pid: int) -> None:
        if (child := self._child(pid)) is not None:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        elif is_kafka_process(pid, self.properties_path):
            os.kill(pid, signal.SIGKILL)
        self.state_path.unlink(missing_ok=True)

    def _tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, getattr(self, "_log_offset", 0), lines)

    # -- stop -------------------------------------------------------------------------------------

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        return wait_exit(pid, timeout, self._child(pid))

    def stop(self, timeout: float = 30.0, *, remove_data: bool | None = None) -> bool:
        """SIGTERM the recorded PID (if it is this broker), SIGKILL after ``timeout``, remove the state file.

        ``remove_data`` (default: ``ephemeral``) then deletes the data dir, and for an ephemeral broker
        its whole temp dir. Returns whether a running broker was stopped.
        """
        if not self.state_dir.exists():  # nothing ever ran here: no state dir to make just for the lock
            return False
        stopped = False
        t0 = time.monotonic()
        with self._locked():
            state = self._read_state()
            pid = self._live_pid(state)
            if pid is None:
                if state is not None:
                    self._say(f"removing stale state file {self.state_path} (pid {state.get('pid')} is not Kafka)")
            else:
                self._say(f"stopping Kafka on {self.bootstrap_servers} (pid {pid})")
                terminate([pid], timeout, wait=self._wait_exit, say=self._say, error=KafkaBrokerError)
                stopped = True
                self._say(f"stopped after {time.monotonic() - t0:.1f}s")
            self.state_path.unlink(missing_ok=True)
            self._proc = None
        if remove_data if remove_data is not None else self.ephemeral:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            if self.ephemeral:
                shutil.rmtree(self.state_dir, ignore_errors=True)
        return stopped

    def restart(self, timeout: float = 60.0) -> KafkaBroker:
        """Stop and start on the same ports and data (also for an ephemeral broker)."""
        self.stop(remove_data=False)
        return self.start(timeout)

    def __repr__(self) -> str:
        return f"KafkaBroker({self.bootstrap_servers}, data_dir={str(self.data_dir)!r}, ephemeral={self.ephemeral})"

    # -- topics -----------------------------------------------------------------------------------

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        config: Mapping[str, str] | None = None,
        exist_ok: bool = False,
        timeout: float = 30.0,
    ) -> str:
        create_topic(self.bootstrap_servers, name, partitions, config=config, exist_ok=exist_ok, timeout=timeout)
        return name

    def delete_topic(self, name: str, *, missing_ok: bool = True, timeout: float = 30.0) -> None:
        delete_topic(self.bootstrap_servers, name, missing_ok=missing_ok, timeout=timeout)

    def list_topics(self, timeout: float = 10.0) -> list[str]:
        md = _admin(self.bootstrap_servers).list_topics(timeout=timeout)
        return sorted(t for t in md.topics if not t.startswith("__"))


# ---------------------------------------------------------------------------------------------------
# Used by the CLI: `beamops kafka up|down|status`; each prints progress and returns an exit status.


def _print(message: str) -> None:
    cli_print("kafka", message)


def up(port: int = DEFAULT_PORT, data_dir: str | os.PathLike[str] | None = None, timeout: float = 60.0) -> int:
    """Start (or find running) a broker on 127.0.0.1:port; 0 when it serves clients."""
    broker = KafkaBroker(port, data_dir=data_dir, progress=_print)
    warning = ephemeral_port_warning(port)
    if warning:
        _print(f"warning: {warning}")
    try:
        broker.start(timeout)
    except KafkaBrokerError as exc:
        return cli_error("kafka", exc)
    st = broker.status()
    _print(f"bootstrap servers {st.bootstrap}; log {st.log_path}; stop with `beamops kafka down --port {port}`")
    return 0


def down(port: int = DEFAULT_PORT, timeout: float = 30.0) -> int:
    """Stop the broker on 127.0.0.1:port (by its recorded PID); 0 also when none was running."""
    broker = KafkaBroker(port, progress=_print)
    data_dir = broker.status().data_dir
    try:
        if not broker.stop(timeout, remove_data=False):
            elsewhere = running_elsewhere("kafka", port, lambda p: KafkaBroker(p).status().running)
            _print(f"no broker running on {broker.bootstrap_servers}{elsewhere}")
            return 0
    except KafkaBrokerError as exc:
        return cli_error("kafka", exc)
    again = "" if data_dir == broker.data_dir else f" --data-dir {data_dir}"
    _print(f"its topics stay in {data_dir}: `beamops kafka up --port {port}{again}` serves them again")
    return 0


def status(port: int = DEFAULT_PORT, as_json: bool = False) -> int:
    """Print the broker's status; 0 when running, 3 when not (as LSB init scripts do)."""
    return cli_status("kafka", KafkaBroker(port).status(), as_json, lambda p: KafkaBroker(p).status().running)
