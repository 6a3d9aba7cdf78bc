"""A local Apache Flink 1.20 session cluster (one JobManager, one TaskManager with 2 slots) on 127.0.0.1.

    from beamops.services.flink_cluster import FlinkCluster

    cluster = FlinkCluster(8081)  # state in ~/.cache/beamops/run/flink-8081/
    cluster.start()               # JobManager + TaskManager; returns when the REST API shows 2 free slots
    cluster.overview()            # GET /overview: {"taskmanagers": 1, "slots-total": 2, ...}
    cluster.jobs()                # GET /jobs/overview
    tm = cluster.kill_taskmanager()   # SIGKILL (recovery tests) ...
    cluster.start_taskmanager()       # ... and a replacement
    cluster.stop()

    with FlinkCluster(None, state_dir=tmp) as cluster:  # a free REST port
        ...

The cluster runs the Flink distribution that ``scripts/install_components.sh`` unpacks (found through
``$FLINK_HOME`` or ``~/.cache/beamops/components.env``) on the machine's Java 17. Each process is the
distribution's ``bin/jobmanager.sh start-foreground`` / ``bin/taskmanager.sh start-foreground``, which
``exec`` the JVM, so the PID we launch *is* the JVM's; they run detached (their own session) and
outlive the Python process that started them.

The profile ``flink-conf/local/config.yaml`` (override with ``conf_dir`` or ``$BEAMOPS_FLINK_CONF_DIR``)
is rendered into ``<state dir>/conf/`` with this cluster's REST and RPC ports and its checkpoint,
savepoint and temp directories filled in, and every listener bound to 127.0.0.1. The state directory
(default ``$BEAMOPS_RUN_DIR/flink-<port>``) also holds ``state.json`` (PIDs, ports, paths), ``log/``
(``flink-beamops-standalonesession-*.log``, ``flink-beamops-taskexecutor-*.log``, ``*.out``,
``*.err``), ``checkpoints/`` and ``savepoints/``. A process is only signalled after
``/proc/<pid>/cmdline`` shows it is the JobManager/TaskManager JVM of this state dir's ``conf/`` (or,
while it is still starting, ``/proc/<pid>/environ`` shows the launcher script was given that
``FLINK_CONF_DIR``), so a stale state file never gets another process killed.

Beam: :func:`flink_runner_args` gives the ``--flink_*`` options of Beam's FlinkRunner, which needs
Beam's Flink job-server jar (:func:`job_server_jar`); it raises :class:`JobServerJarMissingError` with what
to do when there is none.

Environment: ``BEAMOPS_CACHE`` (default ``~/.cache/beamops``), ``BEAMOPS_RUN_DIR`` (state directories,
default ``$BEAMOPS_CACHE/run``), ``FLINK_HOME``, ``BEAMOPS_FLINK_CONF_DIR``,
``BEAMOPS_FLINK_JOB_SERVER_JAR``, ``JAVA_HOME``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

# HOST, Progress, cache_dir, run_dir, free_port, port_is_free and STATE_FILE stay importable from here.
from beamops.services._local import (
    HOST,
    LocalServer,
    Progress,
    cache_dir,
    choose_port,
    cli_error,
    cli_print,
    cli_status,
    cmdline,
    components_env,
    duration,
    env_setting,
    environ,
    ephemeral_port_warning,
    free_port,
    log_tail,
    pid_alive,
    port_holders,
    port_is_free,
    require_java,
    run_dir,
    running_elsewhere,
    spawn,
    terminate,
    wait_exit,
)
from beamops.services._local import STATE_FILE as STATE_FILE

log = logging.getLogger(__name__)

DEFAULT_PORT = 8081
DEFAULT_RPC_PORT = 6123
DEFAULT_SLOTS = 2
FLINK_MINOR = "1.20"
# Must equal the apache-beam Python SDK's version (pyproject pins it; DESIGN.md section 6).
DEFAULT_BEAM_VERSION = "2.73.0"
JOBMANAGER_CLASS = "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint"
TASKMANAGER_CLASS = "org.apache.flink.runtime.taskexecutor.TaskManagerRunner"
# flink-console.sh names the log files flink-<ident>-<service>-<n>-<host>.log.
IDENT = "beamops"
_SERVICES = {"jobmanager": "standalonesession", "taskmanager": "taskexecutor"}
# Keys that must name 127.0.0.1: nothing of the cluster may listen on, or advertise, another address.
LOOPBACK_KEYS = (
    "jobmanager.rpc.address",
    "jobmanager.bind-host",
    "taskmanager.bind-host",
    "taskmanager.host",
    "rest.address",
    "rest.bind-address",
)
_LOG_TAIL_LINES = 25


class FlinkClusterError(RuntimeError):
    """The cluster could not be found, configured, started, reached or stopped."""


class JobServerJarMissingError(FlinkClusterError):
    """Beam's Flink job-server jar is not available on this machine."""


# ---------------------------------------------------------------------------------------------------
# Components: java, the Flink distribution, the profile, Beam's job-server jar


def find_java() -> Path:
    """``$JAVA_HOME/bin/java`` or ``java`` on PATH; Flink 1.20 needs Java 11 or 17 (17 here)."""
    return require_java(FlinkClusterError, "Java 17")


def java_major_version(java: Path) -> int:
    done = subprocess.run(
        [str(java), "-XshowSettings:properties", "-version"], capture_output=True, text=True, timeout=60, check=False
    )
    for line in done.stderr.splitlines():
        key, _, value = line.strip().partition(" = ")
        if key == "java.specification.version":
            return int(value.split(".")[-1] if value.startswith("1.") else value.split(".")[0])
    raise FlinkClusterError(f"cannot tell the version of {java}:\n{done.stderr[-2000:]}")


def find_flink_home(flink_home: str | os.PathLike[str] | None = None) -> Path:
    """The Flink distribution: the argument, ``$FLINK_HOME`` or the one install_components.sh cached."""
    hint = "run scripts/install_components.sh (it unpacks Flink 1.20.5 and writes ~/.cache/beamops/components.env)"
    value = str(flink_home) if flink_home else env_setting("FLINK_HOME")
    if not value:
        raise FlinkClusterError(f"no Flink distribution: set FLINK_HOME or {hint}")
    home = Path(value).expanduser()
    for needed in ("bin/jobmanager.sh", "bin/taskmanager.sh", "bin/config.sh", "lib", "conf"):
        if not (home / needed).exists():
            raise FlinkClusterError(f"{home} is not a Flink distribution (no {needed}): {hint}")
    return home


def flink_version(home: Path) -> str:
    """``1.20.5`` from ``lib/flink-dist-1.20.5.jar``."""
    jars = sorted(home.glob("lib/flink-dist*.jar"))
    if not jars:
        raise FlinkClusterError(f"no lib/flink-dist-*.jar in {home}")
    return jars[-1].stem.rpartition("-")[2]


def default_conf_dir() -> Path:
    """The config profile: ``$BEAMOPS_FLINK_CONF_DIR`` or the repository's ``flink-conf/local``."""
    env = os.environ.get("BEAMOPS_FLINK_CONF_DIR")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2] / "flink-conf" / "local"


def beam_version() -> str:
    try:
        return metadata.version("apache-beam")
    except metadata.PackageNotFoundError:
        return DEFAULT_BEAM_VERSION


def _job_server_name(flink_minor: str, version: str) -> tuple[str, str]:
    artifact = f"beam-runners-flink-{flink_minor}-job-server"
    return artifact, f"{artifact}-{version}.jar"


def job_server_candidates(flink_minor: str = FLINK_MINOR, version: str | None = None) -> list[Path]:
    """Where :func:`job_server_jar` looks, in order (after ``$BEAMOPS_FLINK_JOB_SERVER_JAR``)."""
    version = version or beam_version()
    artifact, name = _job_server_name(flink_minor, version)
    candidates = []
    from_env_file = components_env().get("BEAMOPS_FLINK_JOB_SERVER_JAR")
    if from_env_file:
        candidates.append(Path(from_env_file).expanduser())
    candidates += [
        cache_dir() / f"beam-{version}" / name,  # where install_components.sh puts it
        Path.home() / ".m2" / "repository" / "org" / "apache" / "beam" / artifact / version / name,
        Path.home() / ".apache_beam" / "cache" / "jars" / name,  # Beam's own download cache
    ]
    return candidates


def job_server_jar(flink_minor: str = FLINK_MINOR, version: str | None = None) -> Path | None:
    """Beam's Flink job-server jar for this Flink minor and the installed Beam SDK, or None.

    ``$BEAMOPS_FLINK_JOB_SERVER_JAR`` when set (an error if it names no file), else the first of
    :func:`job_server_candidates` that exists.
    """
    given = os.environ.get("BEAMOPS_FLINK_JOB_SERVER_JAR")
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise JobServerJarMissingError(f"BEAMOPS_FLINK_JOB_SERVER_JAR={given} does not exist")
        return path
    for path in job_server_candidates(flink_minor, version):
        if path.is_file():
            return path
    return None


def flink_runner_args(
    flink_master: str,
    *,
    conf_dir: str | os.PathLike[str] | None = None,
    jar: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The options that point Beam's FlinkRunner at a cluster: version, master and job-server jar.

    ``flink_master`` is ``host:port`` of the REST API (``127.0.0.1:8081``). ``conf_dir``, when given,
    adds ``--flink_conf_dir`` so that Beam's job server reads that cluster's config (parallelism,
    state backend, checkpoint storage). ``jar``: one the user named, taken as it is; else
    :func:`job_server_jar` looks for one. Raises :class:`JobServerJarMissingError` when there is no jar: Beam
    would otherwise try to download it from Maven Central at run time, which fails here.
    """
    jar = jar or job_server_jar()
    if jar is None:
        version = beam_version()
        artifact, _ = _job_server_name(FLINK_MINOR, version)
        looked = "\n".join(f"  {p}" for p in job_server_candidates(FLINK_MINOR, version))
        raise JobServerJarMissingError(
            f"no Beam Flink job-server jar on this machine. The Maven registry it reaches does not serve "
            f"org.apache.beam:{artifact}:{version} (apache/beam#36338), and without --flink_job_server_jar "
            f"Beam's FlinkRunner tries to download it itself, which fails too. scripts/install_components.sh "
            f"builds one from the Beam and Flink artifacts the registry does serve (the README's test command "
            f"runs it), or name one built or downloaded elsewhere: "
            f"BEAMOPS_FLINK_JOB_SERVER_JAR=/path/to/{artifact}-{version}.jar. Looked in:\n{looked}"
        )
    args = [f"--flink_version={FLINK_MINOR}", f"--flink_master={flink_master}", f"--flink_job_server_jar={jar}"]
    if conf_dir is not None:
        args.append(f"--flink_conf_dir={conf_dir}")
    return args


def local_conf_dir(flink_master: str) -> Path | None:
    """The rendered config of the cluster that ``beamops flink up`` runs at ``flink_master``, or None.

    Beam's job server builds each job's checkpoint settings (retention on cancel, timeout, tolerable
    failures, min pause) from the config it reads, not from the cluster's: without it a job gets
    Flink's defaults, whatever the profile says.
    """
    if flink_master.startswith("["):  # [local], [auto]: a Flink the job server starts itself
        return None
    url = urllib.parse.urlsplit(rest_base(flink_master))
    if url.hostname not in (HOST, "localhost") or url.port is None:
        return None
    cluster = FlinkCluster(url.port)
    if cluster.state_path.is_file() and (cluster.conf_dir / "config.yaml").is_file():
        return cluster.conf_dir
    return None


# ---------------------------------------------------------------------------------------------------
# Config rendering


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested YAML maps as Flink's dotted keys (``{"rest": {"port": 1}}`` -> ``{"rest.port": 1}``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def load_profile(conf_dir: Path) -> dict[str, Any]:
    path = conf_dir / "config.yaml"
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise FlinkClusterError(f"cannot read the Flink profile {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise FlinkClusterError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, Mapping):
        raise FlinkClusterError(f"{path} is not a YAML map")
    return flatten(tree)


# ---------------------------------------------------------------------------------------------------
# Processes (ports and /proc: beamops.services._local)


def is_flink_process(pid: int, role: str, conf_dir: Path | str | None = None) -> bool:
    """Whether ``pid`` is the JobManager or TaskManager (``role``) JVM run with ``--configDir conf_dir``.

    A launcher script that has not exec'd the JVM yet (``bash .../bin/<role>.sh start-foreground``)
    counts too when its environment has ``FLINK_CONF_DIR=conf_dir``.
    """
    if pid <= 0 or role not in _SERVICES:
        return False
    args = cmdline(pid)
    for _ in range(5):
        if args or not pid_alive(pid):
            break
        time.sleep(0.02)  # the cmdline reads empty while the process execs the next program
        args = cmdline(pid)
    if not args:
        return False
    cls = JOBMANAGER_CLASS if role == "jobmanager" else TASKMANAGER_CLASS
    if Path(args[0]).name.startswith("java") and cls in args:
        if conf_dir is None:
            return True
        with contextlib.suppress(ValueError, IndexError):
            return args[args.index("--configDir") + 1] == str(conf_dir)
        return False
    names = [Path(a).name for a in args[:3]]  # [/usr/bin/env,] bash, <script>
    launcher = f"{role}.sh" in names or ("flink-console.sh" in names and _SERVICES[role] in args)
    if launcher:
        return conf_dir is None or environ(pid).get("FLINK_CONF_DIR") == str(conf_dir)
    return False


def rest_get(url: str, timeout: float = 5.0) -> Any:
    """GET a Flink REST URL and decode its JSON; FlinkClusterError on HTTP errors."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode())
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")[:2000]
        raise FlinkClusterError(f"GET {url}: HTTP {exc.code}: {body}") from exc


# The port Flink's REST API listens on when a master is named without one (Flink's rest.port default).
FLINK_REST_PORT = 8081


def rest_base(master: str) -> str:
    """The REST URL of a Flink master given as Beam's --flink_master takes it (host:port or a URL; a host
    without a port is Flink's, 8081, as Flink's client reads it). Beam's ``[local]`` and ``[auto]`` have none."""
    if master.startswith("["):
        return f"http://{master}"  # a Flink the job server starts itself
    url = urllib.parse.urlsplit(master if "://" in master else f"http://{master}")
    if url.port is None:
        url = url._replace(netloc=f"{url.netloc}:{FLINK_REST_PORT}")
    return url.geturl().rstrip("/")


def job_named(rest_url: str, name: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """The newest job called ``name`` (GET /jobs/overview: jid, name, state, ...), or None."""
    jobs = [j for j in rest_get(f"{rest_url}/jobs/overview", timeout)["jobs"] if j.get("name") == name]
    return max(jobs, key=lambda j: j.get("start-time", 0)) if jobs else None


def cancel_job(rest_url: str, job_id: str, timeout: float = 30.0) -> None:
    """PATCH /jobs/<id>?mode=cancel, then wait until the job is CANCELED (or otherwise over)."""
    req = urllib.request.Request(f"{rest_url}/jobs/{job_id}?mode=cancel", method="PATCH")
    try:
        urllib.request.urlopen(req, timeout=5).close()
    except urllib.error.HTTPError as exc:
        raise FlinkClusterError(f"cancel {job_id}: HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
    deadline = time.monotonic() + timeout
    while (state := rest_get(f"{rest_url}/jobs/{job_id}")["state"]) not in ("CANCELED", "FAILED", "FINISHED"):
        if time.monotonic() > deadline:
            raise FlinkClusterError(f"job {job_id} still {state} {timeout:g} s after cancel")
        time.sleep(0.25)


def latest_snapshot(rest_url: str, job_id: str, kind: str = "completed", timeout: float = 5.0) -> str | None:
    """Where the job's latest ``kind`` ("completed": a checkpoint or savepoint; "savepoint") snapshot is
    (GET /jobs/<id>/checkpoints), as a path to give --savepoint_path; None if it has none."""
    latest = (rest_get(f"{rest_url}/jobs/{job_id}/checkpoints", timeout).get("latest") or {}).get(kind) or {}
    path = latest.get("external_path")
    return path if path and path != "<checkpoint-not-externally-addressable>" else None


def job_restarts(rest_url: str, job_id: str, timeout: float = 5.0) -> tuple[int, str | None]:
    """How many times Flink has restarted the job (its ``numRestarts`` metric), and the first line of the
    exception that caused the latest restart (GET /jobs/<id>/exceptions), if Flink keeps one."""
    values = rest_get(f"{rest_url}/jobs/{job_id}/metrics?get=numRestarts", timeout)
    restarts = int(next((v["value"] for v in values if v.get("id") == "numRestarts"), 0))
    if not restarts:
        return 0, None
    history = rest_get(f"{rest_url}/jobs/{job_id}/exceptions?maxExceptions=1", timeout)
    entries = (history.get("exceptionHistory") or {}).get("entries") or []
    trace = (entries[0].get("stacktrace") if entries else None) or history.get("root-exception") or ""
    return restarts, trace.strip().splitlines()[0] if trace.strip() else None


# ---------------------------------------------------------------------------------------------------
# The cluster


@dataclass(frozen=True)
class TaskManagerProcess:
    pid: int
    resource_id: str  # the id the REST API lists it under (/taskmanagers)
    started_at: float


@dataclass(frozen=True)
class FlinkStatus:
    running: bool  # the JobManager runs
    port: int
    rest_url: str
    jobmanager_pid: int | None
    taskmanagers: list[TaskManagerProcess]  # the TaskManagers of this cluster that run
    rpc_port: int | None
    uptime: float | None  # seconds since start, when running
    state_dir: Path
    conf_dir: Path
    log_dir: Path
    state_file: Path
    flink_version: str | None = None
    overview: dict[str, Any] | None = None  # GET /overview, when the REST API answered
    stale: bool = False  # a state file names a JobManager PID that is not this cluster's
    dead_taskmanagers: list[int] = field(default_factory=list)

    def describe(self) -> str:
        if self.running:
            tms = ", ".join(f"{t.pid} ({t.resource_id})" for t in self.taskmanagers) or "none"
            ov = self.overview
            rest = (
                f"{ov.get('taskmanagers')} TaskManager(s), {ov.get('slots-available')}/{ov.get('slots-total')} "
                f"slots free, {ov.get('jobs-running')} job(s) running"
                if ov
                else "REST API not answering"
            )
            return (
                f"running: Flink {self.flink_version or '?'} at {self.rest_url}, JobManager pid {self.jobmanager_pid}"
                f" (rpc {HOST}:{self.rpc_port}), TaskManager pid(s) {tms}, up {duration(self.uptime or 0)}; {rest}; "
                f"logs {self.log_dir}"
            )
        stale = f" (stale state file {self.state_file} names pid {self.jobmanager_pid})" if self.stale else ""
        return f"not running on {self.rest_url}{stale}"


class FlinkCluster(LocalServer):
    """A Flink session cluster on 127.0.0.1: one JobManager (REST on ``rest_port``) and its TaskManagers.

    ``rest_port``: a free one when None. ``state_dir`` defaults to ``$BEAMOPS_RUN_DIR/flink-<port>``;
    ``conf_dir`` is the profile to render (``flink-conf/local``); ``flink_home`` the distribution.
    ``config`` adds or overrides config.yaml keys (dotted, like ``{"taskmanager.numberOfTaskSlots": 4}``);
    the addresses must stay 127.0.0.1. ``rpc_port``: the JobManager's RPC port; when None, the one
    this state dir last used, else 6123 for the default REST port if free, else a free one.
    ``quick_start`` runs the JVMs with C1 only (``-XX:TieredStopAtLevel=1``): quicker to start, slower
    at peak; for tests, not for benchmarks.
    """

    _log = log

    def __init__(
        self,
        rest_port: int | None = DEFAULT_PORT,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        conf_dir: str | os.PathLike[str] | None = None,
        flink_home: str | os.PathLike[str] | None = None,
        rpc_port: int | None = None,
        config: Mapping[str, Any] | None = None,
        quick_start: bool = False,
        progress: Progress | None = None,
    ) -> None:
        self.port = rest_port if rest_port is not None else free_port()
        # Absolute: it becomes FLINK_CONF_DIR and --configDir of processes that run in it, and is matched
        # against their /proc cmdline.
        self.state_dir = (Path(state_dir) if state_dir is not None else run_dir() / f"flink-{self.port}").resolve()
        self.profile_dir = Path(conf_dir) if conf_dir is not None else default_conf_dir()
        self._flink_home_arg = flink_home
        self._flink_home: Path | None = None
        self._requested_rpc_port = rpc_port
        self.extra_config = dict(config or {})
        self.quick_start = quick_start
        self.progress = progress
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- paths and state --------------------------------------------------------------------------

    @property
    def rest_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def flink_master(self) -> str:
        """``host:port`` as Beam's ``--flink_master`` and ``flink run -m`` take it."""
        return f"{HOST}:{self.port}"

    @property
    def conf_dir(self) -> Path:
        """The rendered config (FLINK_CONF_DIR of the cluster's processes and of clients like ``flink run``)."""
        return self.state_dir / "conf"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def pid_dir(self) -> Path:
        return self.state_dir / "pid"

    @property
    def checkpoint_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    @property
    def tmp_dir(self) -> Path:
        """The processes' temporary files (``io.tmp.dirs``): removed when the cluster stops or starts."""
        return self.state_dir / "tmp"

    @property
    def savepoint_dir(self) -> Path:
        return self.state_dir / "savepoints"

    @property
    def flink_home(self) -> Path:
        if self._flink_home is None:
            self._flink_home = find_flink_home(self._flink_home_arg)
        return self._flink_home

    @property
    def rpc_port(self) -> int | None:
        state = self._read_state()
        return (state or {}).get("rpc_port") or self._requested_rpc_port

    def _alive(self, pid: int, role: str, conf_dir: str | None = None) -> bool:
        proc = self._procs.get(pid)
        if proc is not None:
            # Our own unreaped child cannot have handed its PID on; and its cmdline reads empty for a
            # moment while it execs (env -> bash -> java), which must not count as an exit.
            return proc.poll() is None
        return is_flink_process(pid, role, conf_dir or str(self.conf_dir))

    def _jobmanager_pid(self, state: dict[str, Any] | None) -> int | None:
        if not state or not state.get("jobmanager"):
            return None
        pid = int(state["jobmanager"].get("pid") or 0)
        return pid if self._alive(pid, "jobmanager", state.get("conf_dir")) else None

    def _taskmanagers(self, state: dict[str, Any] | None) -> list[TaskManagerProcess]:
        if not state:
            return []
        return [
            TaskManagerProcess(int(t["pid"]), t["resource_id"], float(t["started_at"]))
            for t in state.get("taskmanagers", [])
            if self._alive(int(t["pid"]), "taskmanager", state.get("conf_dir"))
        ]

    @property
    def jobmanager_pid(self) -> int | None:
        return self._jobmanager_pid(self._read_state())

    @property
    def taskmanagers(self) -> list[TaskManagerProcess]:
        """The TaskManager processes of this cluster that run."""
        return self._taskmanagers(self._read_state())

    # -- REST -------------------------------------------------------------------------------------

    def rest(self, path: str, timeout: float = 5.0) -> Any:
        """GET ``<rest_url><path>`` as JSON."""
        return rest_get(f"{self.rest_url}{path}", timeout)

    def overview(self, timeout: float = 5.0) -> dict[str, Any]:
        """GET /overview: taskmanagers, slots-total, slots-available, jobs-running, flink-version, ..."""
        return self.rest("/overview", timeout)

    def jobs(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """GET /jobs/overview: one dict per job (jid, name, state, start-time, duration, tasks, ...)."""
        return self.rest("/jobs/overview", timeout)["jobs"]

    def job(self, job_id: str, timeout: float = 5.0) -> dict[str, Any]:
        return self.rest(f"/jobs/{job_id}", timeout)

    def cancel_job(self, job_id: str, timeout: float = 30.0) -> None:
        """PATCH /jobs/<id>?mode=cancel, then wait until the job is CANCELED (or otherwise over)."""
        cancel_job(self.rest_url, job_id, timeout)

    def registered_taskmanagers(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """GET /taskmanagers: the TaskManagers the JobManager knows (id, slotsNumber, freeSlots, ...)."""
        return self.rest("/taskmanagers", timeout)["taskmanagers"]

    def _try_rest(self, path: str) -> tuple[Any, str]:
        try:
            return self.rest(path, timeout=2.0), ""
        except (OSError, FlinkClusterError, ValueError) as exc:
            return None, str(exc)

    # -- status -----------------------------------------------------------------------------------

    def status(self) -> FlinkStatus:
        state = self._read_state()
        jm = self._jobmanager_pid(state)
        tms = self._taskmanagers(state)
        running = jm is not None
        overview = self._try_rest("/overview")[0] if running else None
        live = {t.pid for t in tms}
        return FlinkStatus(
            running=running,
            port=self.port,
            rest_url=self.rest_url,
            jobmanager_pid=jm if running else ((state or {}).get("jobmanager") or {}).get("pid"),
            taskmanagers=tms,
            rpc_port=(state or {}).get("rpc_port"),
            uptime=time.time() - float(state["started_at"]) if running and state else None,
            state_dir=self.state_dir,
            conf_dir=self.conf_dir,
            log_dir=self.log_dir,
            state_file=self.state_path,
            flink_version=(state or {}).get("flink_version"),
            overview=overview,
            stale=state is not None and not running,
            dead_taskmanagers=[int(t["pid"]) for t in (state or {}).get("taskmanagers", []) if t["pid"] not in live],
        )

    def is_running(self) -> bool:
        return self.jobmanager_pid is not None

    # -- config -----------------------------------------------------------------------------------

    def _choose_rpc_port(self, remembered: int | None) -> int:
        if self._requested_rpc_port is not None:
            return self._requested_rpc_port
        preferred = DEFAULT_RPC_PORT if self.port == DEFAULT_PORT else None
        return choose_port((remembered, preferred), self.port)

    def flink_config(self, rpc_port: int) -> dict[str, Any]:
        """The profile with this cluster's ports and directories, as flat Flink keys."""
        conf = load_profile(self.profile_dir)
        conf.update(
            {
                "rest.port": self.port,
                "jobmanager.rpc.port": rpc_port,
                "execution.checkpointing.dir": self.checkpoint_dir.resolve().as_uri(),
                "execution.checkpointing.savepoint-dir": self.savepoint_dir.resolve().as_uri(),
                "io.tmp.dirs": str(self.tmp_dir.resolve()),
                "web.tmpdir": str((self.state_dir / "web").resolve()),
                # Also for clients (`flink run`) given this conf dir: their logs go here, not to FLINK_HOME/log.
                "env.log.dir": str(self.log_dir.resolve()),
                "env.pid.dir": str(self.pid_dir.resolve()),
            }
        )
        conf.update(self.extra_config)
        for key in LOOPBACK_KEYS:
            if str(conf.get(key)) != HOST:
                raise FlinkClusterError(f"{key}={conf.get(key)!r}: this cluster binds to {HOST} only")
        return conf

    def render_config(self, rpc_port: int) -> Path:
        """Write ``<state dir>/conf/``: the distribution's logging files, the profile's, and config.yaml."""
        conf = self.flink_config(rpc_port)
        out = self.conf_dir
        out.mkdir(parents=True, exist_ok=True)
        # The distribution's log4j-cli/session and logback files (for `flink run`, the SQL client), then
        # the profile's own files on top of them.
        for src_dir in (self.flink_home / "conf", self.profile_dir):
            for src in sorted(src_dir.iterdir()):
                if src.is_file() and src.suffix in (".properties", ".xml"):
                    shutil.copyfile(src, out / src.name)
        (out / "flink-conf.yaml").unlink(missing_ok=True)  # would make Flink read the legacy format
        (out / "masters").write_text(f"{HOST}:{self.port}\n")
        (out / "workers").write_text(f"{HOST}\n")
        header = (
            f"# Rendered by beamops.services.flink_cluster from {self.profile_dir / 'config.yaml'}\n"
            f"# for the cluster with REST port {self.port}; edit the profile, not this file.\n"
        )
        body = yaml.safe_dump(conf, sort_keys=False, default_flow_style=False, width=1 << 20)
        tmp = out / "config.yaml.tmp"
        tmp.write_text(header + body)
        tmp.replace(out / "config.yaml")
        return out

    # -- start ------------------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        java = find_java()
        if java.parent.parent == Path(os.environ.get("JAVA_HOME") or "/nonexistent"):
            env["JAVA_HOME"] = os.environ["JAVA_HOME"]
        else:
            # config.sh prefers $JAVA_HOME/bin/java; an unusable JAVA_HOME must not hide PATH's java.
            env.pop("JAVA_HOME", None)
        env.update(
            {
                "FLINK_HOME": str(self.flink_home),
                "FLINK_CONF_DIR": str(self.conf_dir),
                "FLINK_LOG_DIR": str(self.log_dir),
                "FLINK_PID_DIR": str(self.pid_dir),
                "FLINK_IDENT_STRING": IDENT,
            }
        )
        if self.quick_start:
            # C1 only, for the JVMs and for the config-parsing java runs of Flink's scripts.
            env["JVM_ARGS"] = f"{env.get('JVM_ARGS', '')} -XX:TieredStopAtLevel=1".strip()
        return env

    def _launch(self, role: str, args: list[str]) -> int:
        script = self.flink_home / "bin" / f"{role}.sh"
        cmd = [str(script), "start-foreground", *args]
        # Only the script's own lines go to the launch log: with env.stdout-err.redirect-to-file the JVM's
        # stdout and stderr go to <log dir>/*.out and *.err.
        proc, _ = spawn(cmd, self.log_dir / f"{role}-launch.log", self.state_dir, self._env())
        self._procs[proc.pid] = proc
        return proc.pid

    def _check_java(self) -> None:
        java = find_java()
        major = java_major_version(java)
        if major < 11:
            raise FlinkClusterError(f"{java} is Java {major}; Flink 1.20 needs Java 11 or 17 (use 17)")

    def start(self, timeout: float = 120.0) -> FlinkCluster:
        """Start the JobManager and one TaskManager and wait until the REST API shows its slots.

        If the JobManager already runs, only a TaskManager is started when none runs. Raises
        FlinkClusterError with the logs' last lines when a process exits or the cluster is not ready
        within ``timeout`` seconds (processes this call launched are then killed).
        """
        t0 = time.monotonic()
        launched: list[int] = []
        with self._locked():
            state = self._read_state()
            jm = self._jobmanager_pid(state)
            if jm is not None and state is not None:
                tms = self._taskmanagers(state)
                self._say(f"already running at {self.rest_url} (JobManager pid {jm})")
                if tms:
                    expected = [t.resource_id for t in tms]  # it may still be starting (another `up`)
                else:
                    self._say("no TaskManager runs: starting one")
                    tm = self._start_taskmanager_locked(state)
                    launched.append(tm.pid)
                    expected = [tm.resource_id]
            else:
                state, expected = self._launch_cluster()
                launched = [state["jobmanager"]["pid"]] + [t["pid"] for t in state["taskmanagers"]]
        try:
            self._wait_ready(expected, timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except Exception as exc:  # also an unexpected REST answer: never leave half a cluster behind
            self._abort(launched)
            raise FlinkClusterError(f"Flink at {self.rest_url} did not start: {exc}{self._tails()}") from exc
        ov = self.overview()
        self._say(
            f"ready at {self.rest_url} after {time.monotonic() - t0:.1f}s: "
            f"{ov['taskmanagers']} TaskManager(s), {ov['slots-total']} slots"
        )
        return self

    def _launch_cluster(self) -> tuple[dict[str, Any], list[str]]:
        if not port_is_free(self.port):
            raise FlinkClusterError(f"{HOST}:{self.port} is already in use by another process{port_holders(self.port)}")
        home = self.flink_home
        self._check_java()
        old = self._read_state() or {}
        rpc_port = self._choose_rpc_port(old.get("rpc_port"))
        # What a cluster stopped without `stop` (killed) left in its temporary directory is no one's now.
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        for d in (self.log_dir, self.pid_dir, self.checkpoint_dir, self.savepoint_dir):
            d.mkdir(parents=True, exist_ok=True)
        conf = yaml.safe_load((self.render_config(rpc_port) / "config.yaml").read_text())
        # Stale pid files of a killed cluster would only make flink-console.sh number the logs higher.
        for stale in self.pid_dir.glob("*.pid"):
            stale.unlink()
        version = flink_version(home)
        self._say(f"starting Flink {version} at {self.rest_url} (rpc {HOST}:{rpc_port}), state {self.state_dir}")
        self._log_marks = {p: p.stat().st_size for p in self.log_dir.glob("*") if p.is_file()}
        state: dict[str, Any] = {
            "rest_port": self.port,
            "rpc_port": rpc_port,
            "rest_url": self.rest_url,
            "conf_dir": str(self.conf_dir),
            "log_dir": str(self.log_dir),
            "flink_home": str(home),
            "flink_version": version,
            "started_at": time.time(),
            "slots": int(conf.get("taskmanager.numberOfTaskSlots", 1)),
            "next_taskmanager": 1,
            "jobmanager": None,
            "taskmanagers": [],
        }
        jm = self._launch("jobmanager", [])
        state["jobmanager"] = {"pid": jm, "started_at": time.time()}
        self._write_state(state)
        # The TaskManager starts at the same time; it retries registering until the JobManager is up.
        tm = self._start_taskmanager_locked(state)
        return state, [tm.resource_id]

    def _start_taskmanager_locked(self, state: dict[str, Any]) -> TaskManagerProcess:
        n = int(state.get("next_taskmanager", 1))
        # A resource id of our own, so the REST API's /taskmanagers tells which process is which.
        resource_id = f"{IDENT}-tm-{self.port}-{n}"
        pid = self._launch("taskmanager", ["-D", f"taskmanager.resource-id={resource_id}"])
        tm = TaskManagerProcess(pid, resource_id, time.time())
        state["next_taskmanager"] = n + 1
        state.setdefault("taskmanagers", []).append(dataclasses.asdict(tm))
        self._write_state(state)
        return tm

    def _wait_ready(self, resource_ids: list[str], timeout: float) -> None:
        """Until the JobManager answers and lists every TaskManager in ``resource_ids`` with its slots."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            state = self._read_state()
            if self._jobmanager_pid(state) is None:
                raise FlinkClusterError("the JobManager process exited")
            live = {t.resource_id for t in self._taskmanagers(state)}
            if missing := [r for r in resource_ids if r not in live]:
                raise FlinkClusterError(f"the TaskManager process {missing[0]} exited")
            registered, err = self._try_rest("/taskmanagers")
            if registered is None:
                last = err
            elif waiting := sorted(set(resource_ids) - {t["id"] for t in registered["taskmanagers"]}):
                last = f"TaskManager {waiting[0]} not registered yet"
            else:
                ov, err = self._try_rest("/overview")
                slots = int((state or {}).get("slots") or 1) * len(resource_ids)
                if ov is not None and ov["taskmanagers"] >= len(resource_ids) and ov["slots-total"] >= slots:
                    return
                last = err or f"overview {ov}"
            if time.monotonic() > deadline:
                raise FlinkClusterError(f"not ready within {timeout:.0f}s ({last})")
            time.sleep(0.25)

    def _abort(self, pids: list[int]) -> None:
        state = self._read_state()
        for pid in pids:
            proc = self._procs.get(pid)
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            elif any(is_flink_process(pid, role, str(self.conf_dir)) for role in _SERVICES):
                os.kill(pid, signal.SIGKILL)
                self._wait_exit(pid, 10)
        if state is not None:
            jm = state.get("jobmanager") or {}
            if jm.get("pid") in pids:
                self.state_path.unlink(missing_ok=True)
            else:
                state["taskmanagers"] = [t for t in state.get("taskmanagers", []) if t["pid"] not in pids]
                self._write_state(state)

    def _log_files(self) -> list[Path]:
        files = [p for p in self.log_dir.glob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]
        return sorted(files, key=lambda p: p.stat().st_mtime)

    def _tails(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of each log file written since the start began (all when not known)."""
        marks: dict[Path, int] = getattr(self, "_log_marks", {})
        return "".join(log_tail(path, marks.get(path, 0), lines) for path in self._log_files())

    # -- TaskManagers -----------------------------------------------------------------------------

    def start_taskmanager(self, timeout: float = 60.0) -> TaskManagerProcess:
        """Start one more TaskManager and wait until the JobManager lists it."""
        t0 = time.monotonic()
        with self._locked():
            state = self._read_state()
            if self._jobmanager_pid(state) is None or state is None:
                raise FlinkClusterError(f"no JobManager runs at {self.rest_url}: start the cluster first")
            self._log_marks = {p: p.stat().st_size for p in self._log_files()}
            tm = self._start_taskmanager_locked(state)
        try:
            self._wait_ready([tm.resource_id], timeout)
        except Exception as exc:
            self._abort([tm.pid])
            raise FlinkClusterError(f"TaskManager {tm.resource_id} did not register: {exc}{self._tails()}") from exc
        self._say(f"TaskManager {tm.resource_id} (pid {tm.pid}) registered after {time.monotonic() - t0:.1f}s")
        return tm

    def kill_taskmanager(self, pid: int | None = None) -> TaskManagerProcess:
        """SIGKILL a TaskManager of this cluster (``pid``, or the oldest) and wait until it is gone.

        For recovery tests: the JobManager notices the loss only after missed heartbeats (about 10 s
        with the local profile) and then fails over the jobs that ran on it.
        """
        with self._locked():
            state = self._read_state()
            tms = self._taskmanagers(state)
            victims = [t for t in tms if pid is None or t.pid == pid]
            if not victims:
                raise FlinkClusterError(
                    f"no running TaskManager {'with pid ' + str(pid) + ' ' if pid else ''}in this cluster"
                    f" (running: {[t.pid for t in tms]})"
                )
            tm = victims[0]
            self._say(f"killing TaskManager {tm.resource_id} (pid {tm.pid}) with SIGKILL")
            os.kill(tm.pid, signal.SIGKILL)
            if not self._wait_exit(tm.pid, 10):
                raise FlinkClusterError(f"pid {tm.pid} survived SIGKILL")
            assert state is not None
            state["taskmanagers"] = [t for t in state.get("taskmanagers", []) if t["pid"] != tm.pid]
            self._write_state(state)
        return tm

    def wait_for_taskmanagers(self, count: int, timeout: float = 60.0, slots: int | None = None) -> dict[str, Any]:
        """Until GET /overview shows exactly ``count`` TaskManagers (and ``slots`` slots); returns it.

        After :meth:`kill_taskmanager` the dead one stays listed until the JobManager misses its heartbeats.
        """
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            ov, err = self._try_rest("/overview")
            if ov is not None:
                last = ov
                if ov["taskmanagers"] == count and (slots is None or ov["slots-total"] == slots):
                    return ov
            if time.monotonic() > deadline:
                raise FlinkClusterError(
                    f"{self.rest_url}/overview did not show {count} TaskManager(s) within {timeout:g}s "
                    f"(last: {last or err})"
                )
            time.sleep(0.25)

    # -- stop -------------------------------------------------------------------------------------

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        return wait_exit(pid, timeout, self._procs.get(pid))

    def stop(self, timeout: float = 30.0) -> bool:
        """SIGTERM the recorded TaskManagers and JobManager (if they are this cluster's), SIGKILL after
        ``timeout``, and remove the state file and the processes' temporary files (``io.tmp.dirs``: each
        job's jars, 160 MB for a Beam job, which Flink's TaskManager would keep across restarts).
        Checkpoints, savepoints and logs stay in the state dir. Returns whether anything was running.
        """
        if not self.state_dir.exists():  # nothing ever ran here: no state dir to make just for the lock
            return False
        t0 = time.monotonic()
        with self._locked():
            state = self._read_state()
            jm = self._jobmanager_pid(state)
            pids = [t.pid for t in self._taskmanagers(state)] + ([jm] if jm is not None else [])
            if not pids:
                if state is not None:
                    self._say(f"removing stale state file {self.state_path} (no process of it runs)")
                self.state_path.unlink(missing_ok=True)
                return False
            self._say(f"stopping Flink at {self.rest_url} (pids {', '.join(map(str, pids))})")
            # All at once: a TaskManager whose JobManager is gone only retries, and vice versa.
            terminate(pids, timeout, wait=self._wait_exit, say=self._say, error=FlinkClusterError)
            self.state_path.unlink(missing_ok=True)
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            for pid_file in self.pid_dir.glob("*.pid"):
                pid_file.unlink()
            self._procs.clear()
        self._say(f"stopped after {time.monotonic() - t0:.1f}s")
        return True

    def restart(self, timeout: float = 120.0) -> FlinkCluster:
        self.stop()
        return self.start(timeout)

    def __repr__(self) -> str:
        return f"FlinkCluster({self.rest_url}, state_dir={str(self.state_dir)!r})"

    # -- Beam -------------------------------------------------------------------------------------

    def beam_args(self) -> list[str]:
        """:func:`flink_runner_args` for this cluster (also ``--flink_conf_dir`` of its rendered config)."""
        return flink_runner_args(self.flink_master, conf_dir=self.conf_dir)


# ---------------------------------------------------------------------------------------------------
# Used by the CLI: `beamops flink up|down|status`; each prints progress and returns an exit status.


def _print(message: str) -> None:
    cli_print("flink", message)


def up(port: int = DEFAULT_PORT, timeout: float = 120.0) -> int:
    """Start (or find running) a cluster with its REST API on 127.0.0.1:port; 0 when its slots are up."""
    cluster = FlinkCluster(port, progress=_print)
    warning = ephemeral_port_warning(port)
    if warning:
        _print(f"warning: {warning}")
    try:
        cluster.start(timeout)
    except FlinkClusterError as exc:
        return cli_error("flink", exc)
    _print(
        f"web UI and REST API {cluster.rest_url}; FLINK_CONF_DIR={cluster.conf_dir}; logs {cluster.log_dir}; "
        f"stop with `beamops flink down --port {port}`"
    )
    return 0


def down(port: int = DEFAULT_PORT, timeout: float = 30.0) -> int:
    """Stop the cluster on 127.0.0.1:port (by its recorded PIDs); 0 also when none was running."""
    cluster = FlinkCluster(port, progress=_print)
    if cluster.is_running():
        for line in _jobs_stopped_with(cluster.rest_url):
            _print(line)
    try:
        if not cluster.stop(timeout):
            elsewhere = running_elsewhere("flink", port, lambda p: FlinkCluster(p).status().running)
            _print(f"no cluster running at {cluster.rest_url}{elsewhere}")
    except FlinkClusterError as exc:
        return cli_error("flink", exc)
    return 0


def _jobs_stopped_with(rest_url: str) -> list[str]:
    """What stopping the cluster does to its jobs that have not ended, each with its last checkpoint: a
    live job stops with the cluster, and goes on later from there."""
    try:
        jobs = rest_get(f"{rest_url}/jobs/overview", 5.0)["jobs"]
    except (OSError, FlinkClusterError, KeyError, ValueError):
        return []
    said = []
    for job in jobs:
        if job.get("state") in ("FINISHED", "CANCELED", "FAILED"):
            continue
        try:
            checkpoint = latest_snapshot(rest_url, job["jid"])
        except (OSError, FlinkClusterError, KeyError, ValueError):
            checkpoint = None
        again = (
            f"submit it again with --savepoint_path={checkpoint} to go on from its last checkpoint"
            if checkpoint
            else "it has no checkpoint to go on from"
        )
        said.append(f"job {job.get('name')} ({job['jid']}, {job.get('state')}) stops with the cluster; {again}")
    return said


def status(port: int = DEFAULT_PORT, as_json: bool = False) -> int:
    """Print the cluster's status; 0 when running, 3 when not (as LSB init scripts do)."""
    return cli_status("flink", FlinkCluster(port).status(), as_json, lambda p: FlinkCluster(p).status().running)
