"""Process and environment helpers shared by the local servers (``kafka_broker``, ``flink_cluster``).

Both find their components through the environment or ``$BEAMOPS_CACHE/components.env``, keep a state
directory per server under ``$BEAMOPS_RUN_DIR`` (``state.json``, a lock, logs), run their processes
detached on 127.0.0.1, signal a process only after ``/proc`` shows it is theirs, and back the CLI's
``beamops <service> up|down|status``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

HOST = "127.0.0.1"
STATE_FILE = "state.json"

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------------
# Components: the cache, components.env, java


def cache_dir() -> Path:
    return Path(os.environ.get("BEAMOPS_CACHE") or Path.home() / ".cache" / "beamops").expanduser()


def run_dir() -> Path:
    """Where each server's state directory (``kafka-<port>/``, ``flink-<port>/``) goes."""
    return Path(os.environ.get("BEAMOPS_RUN_DIR") or cache_dir() / "run").expanduser()


def components_env_file() -> Path:
    """``$BEAMOPS_CACHE/components.env``, which scripts/install_components.sh writes."""
    return cache_dir() / "components.env"


def read_env_file(path: Path) -> dict[str, str]:
    """``export KEY=value`` lines (values shell-quoted) as written by install_components.sh.

    Raises OSError when the file cannot be read (:func:`components_env` does not).
    """
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip().removeprefix("export ").strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep:
            words = shlex.split(value)
            values[key.strip()] = words[0] if words else ""
    return values


def components_env() -> dict[str, str]:
    """The settings in ``components.env``; none when it is missing or unreadable."""
    try:
        return read_env_file(components_env_file())
    except OSError:
        return {}


def env_setting(name: str, from_file: Mapping[str, str] | None = None) -> str:
    """``$name``, else its value in ``from_file`` (default: :func:`components_env`), else ''."""
    if value := os.environ.get(name):
        return value
    return (components_env() if from_file is None else from_file).get(name, "")


def require_java(error: type[Exception], requirement: str) -> Path:
    """``$JAVA_HOME/bin/java`` when it is executable, else ``java`` on PATH; ``error`` when there is none."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(Path(java_home, "bin", "java"), os.X_OK):
        return Path(java_home, "bin", "java")
    found = shutil.which("java")
    if not found:
        raise error(f"java not found: put {requirement} on PATH or set JAVA_HOME")
    return Path(found)


# ---------------------------------------------------------------------------------------------------
# Ports


def ephemeral_ports() -> range:
    """The ports the kernel gives clients' connections (Linux's ``ip_local_port_range``; IANA's elsewhere)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 49152, 65535
    return range(low, high + 1)


def free_port() -> int:
    """A free port on 127.0.0.1 below the ephemeral range, if one is: a client that keeps reconnecting to a
    server's port in that range while the server is down can be given that very port and connect to
    itself, and then holds it until the client stops (the server cannot start again)."""
    ephemeral = ephemeral_ports()
    for port in random.sample(range(10000, ephemeral.start), min(64, max(0, ephemeral.start - 10000))):
        if port_is_free(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def ephemeral_port_warning(port: int) -> str | None:
    """What to say of a server port in the ephemeral range (see :func:`free_port`), else None."""
    ephemeral = ephemeral_ports()
    if port not in ephemeral:
        return None
    return (
        f"port {port} is in the range the kernel gives clients' connections ({ephemeral.start}-{ephemeral.stop - 1}): "
        "a client that reconnects while this server is down can take the port, connected to itself, and hold it "
        f"until that client stops; a port below {ephemeral.start} cannot be taken so"
    )


def port_holders(port: int) -> str:
    """`` (held by pid N: command line)`` for this user's processes with a TCP socket on 127.0.0.1:``port``
    (Linux's /proc), saying when one is connected to itself; "" if none is found."""
    inodes: dict[str, bool] = {}  # socket inode -> connected to itself
    lines = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # a JVM's sockets are IPv6 ones, also for 127.0.0.1
        with contextlib.suppress(OSError):
            lines += Path(table).read_text().splitlines()[1:]
    for line in lines:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.rsplit(":", 1)[1], 16) == port and inode != "0":
            inodes[inode] = local == remote
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):  # another user's process, or one that just ended
            links = set()
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):  # closed meanwhile (the listing's own, in this process)
                    links.add(os.readlink(fd))
            for inode, to_itself in inodes.items():
                if f"socket:[{inode}]" in links:
                    raw = (fd_dir.parent / "cmdline").read_bytes().decode(errors="replace")
                    command = " ".join(raw.replace("\0", " ").split())
                    itself = ", a client connected to itself" if to_itself else ""
                    found.append(f"pid {fd_dir.parent.name}{itself}: {command[:120]}")
                    break
    return f" (held by {'; '.join(found)})" if found else ""


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like the JVM's server sockets, so connections in TIME_WAIT after a stop do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def choose_port(candidates: Iterable[int | None], taken: int) -> int:
    """The first candidate that is set, a port number other than ``taken``, and free; else a free port."""
    for candidate in candidates:
        if candidate and candidate != taken and candidate <= 65535 and port_is_free(candidate):
            return candidate
    while (port := free_port()) == taken:
        pass
    return port


# ---------------------------------------------------------------------------------------------------
# Processes: /proc, waiting, signalling, launching, logs


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    # A zombie (exited, not yet reaped) has an empty cmdline, so it counts as not running.
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in pairs}


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # Field 3, after the parenthesised command name: Z (zombie) and X (dead) are gone.
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_exit(pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Whether ``pid`` exits within ``timeout`` seconds; ``proc``, our child with that pid, is reaped."""
    if proc is not None:
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def terminate(
    pids: list[int],
    timeout: float,
    *,
    wait: Callable[[int, float], bool],
    say: Progress,
    error: type[Exception],
) -> None:
    """SIGTERM ``pids`` (already verified to be the server's) all at once, SIGKILL each one still running
    ``timeout`` seconds later. ``wait(pid, seconds)`` tells whether it exited in time; ``error`` is raised
    when a pid survives SIGKILL.
    """
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids:
        if not wait(pid, max(0.0, deadline - time.monotonic())):
            say(f"pid {pid} still running after {timeout:g}s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if not wait(pid, 10):
                raise error(f"pid {pid} survived SIGKILL")


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM the process group that ``proc`` leads (started with ``start_new_session=True``), then
    SIGKILL whatever is left of the group: children such as a JVM the process started go with it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            continue
        time.sleep(1)  # the group's other members may leave after its leader


def spawn(
    cmd: list[str], log_path: Path, cwd: Path, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``cmd`` detached, its output appended to ``log_path`` after a line with the time and command.

    Returns the process and the offset in ``log_path`` where this launch's lines start.
    """
    with open(log_path, "ab") as out:
        offset = out.tell()
        out.write(f"---- beamops: {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,  # Ctrl-C in the starting shell does not reach the server
            close_fds=True,
        )
    return proc, offset


def log_tail(path: Path, offset: int, lines: int) -> str:
    """The last ``lines`` lines of ``path`` after ``offset``, with a header line; '' when none."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    tail = text.splitlines()[-lines:]
    return f"\n--- last {len(tail)} lines of {path}:\n" + "\n".join(tail) if tail else ""


# ---------------------------------------------------------------------------------------------------
# The state directory


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in ``path``; ``default`` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically (through ``<path>.tmp``)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


class LocalServer:
    """What a local server keeps in its state directory: ``state.json`` and a lock; ``with server:``
    starts it and stops it again. Subclasses set ``state_dir``, ``progress`` and ``_log``.
    """

    state_dir: Path
    progress: Progress | None
    _log: logging.Logger

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> bool:
        raise NotImplementedError

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _say(self, message: str) -> None:
        self._log.info("%s", message)
        if self.progress is not None:
            self.progress(message)

    def _read_state(self) -> dict[str, Any] | None:
        return read_json(self.state_path)

    def _write_state(self, state: dict[str, Any]) -> None:
        write_json(self.state_path, state)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise start/stop on one state dir across processes (two `up`s at once)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------
# The CLI, `beamops <service> up|down|status`: output prefixed with the service's name, an exit status


def cli_print(service: str, message: str) -> None:
    print(f"{service}: {message}", flush=True)


def cli_error(service: str, exc: BaseException) -> int:
    print(f"{service}: error: {exc}", file=sys.stderr, flush=True)
    return 1


def running_elsewhere(kind: str, port: int, is_running: Callable[[int], bool]) -> str:
    """For "nothing runs on ``port``": `` (one runs on port N: add --port N)`` naming the servers of
    ``kind`` (``flink``, ``kafka``) this machine's run directory holds on other ports, else ""."""
    ports = sorted(
        int(d.name.split("-", 1)[1])
        for d in run_dir().glob(f"{kind}-*")
        if d.name.split("-", 1)[1].isdigit() and int(d.name.split("-", 1)[1]) != port
    )
    running = [p for p in ports if is_running(p)]
    if not running:
        return ""
    flags = ", ".join(f"--port {p}" for p in running)
    return f" (one runs on port{'s' if len(running) > 1 else ''} {', '.join(map(str, running))}: add {flags})"


def cli_status(service: str, status: Any, as_json: bool, is_running: Callable[[int], bool]) -> int:
    """Print a status dataclass (``describe()``, or its fields as JSON); 0 when running, 3 when not
    (as LSB init scripts do). Not running: also the ports ``service`` runs on (``is_running(port)``)."""
    if as_json:
        data = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(status).items()}
        print(json.dumps(data, indent=2, default=str))
    else:
        elsewhere = "" if status.running else running_elsewhere(service, status.port, is_running)
        cli_print(service, status.describe() + elsewhere)
    return 0 if status.running else 3


def duration(seconds: float) -> str:
    """``seconds`` for people: ``45 s``, ``20 min 47 s``, ``3 h 05 min``, ``2 d 4 h``."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"
