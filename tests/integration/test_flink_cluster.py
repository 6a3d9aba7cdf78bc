"""The local Flink cluster (beamops.services.flink_cluster) on the real Flink 1.20.5 distribution.

One cluster (a free REST port, a temp state dir) serves the whole module; the tests run in file
order and the last one stops it. Together about a minute here: start ~15 s, a real job ~10 s,
replacing the TaskManager ~20 s, stop ~1 s.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from beamops.services import flink_cluster as fc
from beamops.services.flink_cluster import FlinkCluster, FlinkClusterError, JobServerJarMissingError

pytestmark = pytest.mark.integration

LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1 in /proc/net/tcp and tcp6

# A real Flink job, built here because the pip-installed distribution ships no example jars: a
# parallel source, a network exchange between the two slots, and the results collected by the client.
SMOKE_JOB = """
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.util.CloseableIterator;

public class BeamopsSmokeJob {
    public static void main(String[] args) throws Exception {
        long n = Long.parseLong(args[0]);
        StreamExecutionEnvironment env = StreamExecutionEnvironment.getExecutionEnvironment();
        env.setParallelism(2);
        long count = 0;
        long sum = 0;
        try (CloseableIterator<Long> it = env.fromSequence(1, n)
                .rebalance()
                .map(x -> x * x).returns(Types.LONG)
                .executeAndCollect("beamops-smoke")) {
            while (it.hasNext()) {
                sum += it.next();
                count++;
            }
        }
        System.out.println("BEAMOPS_SMOKE count=" + count + " sum=" + sum);
    }
}
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = FlinkCluster(None, state_dir=tmp_path_factory.mktemp("flink"), quick_start=True, progress=print)
    t0 = time.monotonic()
    c.start(timeout=150)
    print(f"cluster started in {time.monotonic() - t0:.1f}s")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def smoke_jar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = fc.find_flink_home()
    java = fc.find_java().resolve()
    javac, jar_tool = java.with_name("javac"), java.with_name("jar")
    if not (javac.exists() and jar_tool.exists()):
        pytest.fail(f"no javac/jar next to {java}: a JDK 17 is needed to build the smoke job")
    work = tmp_path_factory.mktemp("smoke-job")
    (work / "BeamopsSmokeJob.java").write_text(SMOKE_JOB)
    subprocess.run(
        [str(javac), "-cp", f"{home}/lib/*", "-d", str(work / "classes"), str(work / "BeamopsSmokeJob.java")],
        check=True,
        timeout=120,
    )
    jar = work / "smoke.jar"
    subprocess.run(
        [
            str(jar_tool),
            "--create",
            "--file",
            str(jar),
            "--main-class",
            "BeamopsSmokeJob",
            "-C",
            str(work / "classes"),
            ".",
        ],
        check=True,
        timeout=60,
    )
    return jar


def test_overview_shows_one_taskmanager_with_two_slots(cluster: FlinkCluster) -> None:
    ov = cluster.overview()
    assert ov["taskmanagers"] == 1
    assert ov["slots-total"] == 2
    assert ov["flink-version"] == "1.20.5"
    st = cluster.status()
    assert st.running and st.jobmanager_pid == cluster.jobmanager_pid
    assert [t.pid for t in st.taskmanagers] == [t.pid for t in cluster.taskmanagers]
    assert [t["id"] for t in cluster.registered_taskmanagers()] == [st.taskmanagers[0].resource_id]
    # The rendered config: this cluster's ports and directories, the profile's checkpointing.
    conf = yaml.safe_load((cluster.conf_dir / "config.yaml").read_text())
    assert conf["rest.port"] == cluster.port
    assert conf["jobmanager.rpc.port"] == st.rpc_port
    assert conf["execution.checkpointing.dir"] == cluster.checkpoint_dir.resolve().as_uri()
    assert conf["execution.checkpointing.interval"] == "10 s"
    assert conf["restart-strategy.type"] == "exponential-delay"  # a fixed count ran out before a new TM came
    assert conf["taskmanager.numberOfTaskSlots"] == 2
    assert list(cluster.log_dir.glob("flink-beamops-standalonesession-*.log"))
    assert list(cluster.log_dir.glob("flink-beamops-taskexecutor-*.log"))


def test_listens_on_loopback_only(
    cluster: FlinkCluster, listening_sockets: Callable[[int], list[tuple[str, int]]]
) -> None:
    jm = cluster.jobmanager_pid
    (tm,) = cluster.taskmanagers
    jm_sockets, tm_sockets = listening_sockets(jm), listening_sockets(tm.pid)
    assert {cluster.port, cluster.rpc_port} <= {p for _, p in jm_sockets}
    assert tm_sockets, "the TaskManager listens on nothing (no RPC or data port?)"
    wild = [(pid, a, p) for pid, s in ((jm, jm_sockets), (tm.pid, tm_sockets)) for a, p in s if a not in LOOPBACK_HEX]
    assert not wild, f"sockets not bound to 127.0.0.1: {wild}"


def test_runs_a_real_flink_job(cluster: FlinkCluster, smoke_jar: Path) -> None:
    n = 2000
    env = dict(os.environ, FLINK_CONF_DIR=str(cluster.conf_dir), FLINK_LOG_DIR=str(cluster.log_dir))
    t0 = time.monotonic()
    done = subprocess.run(
        [str(cluster.flink_home / "bin" / "flink"), "run", "-m", cluster.flink_master, str(smoke_jar), str(n)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"flink run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    print(f"flink run took {time.monotonic() - t0:.1f}s")
    expected = n * (n + 1) * (2 * n + 1) // 6
    assert f"BEAMOPS_SMOKE count={n} sum={expected}" in done.stdout, done.stdout
    match = re.search(r"JobID ([0-9a-f]{32})", done.stdout)
    assert match, done.stdout
    job_id = match.group(1)
    job = cluster.job(job_id)
    assert job["state"] == "FINISHED"
    assert job["name"] == "beamops-smoke"
    assert any(j["jid"] == job_id and j["state"] == "FINISHED" for j in cluster.jobs())
    # Both slots worked: the map ran as 2 subtasks.
    assert max(v["parallelism"] for v in job["vertices"]) == 2
    # The profile's checkpointing reached the job (the client read it from FLINK_CONF_DIR).
    ckpt = cluster.rest(f"/jobs/{job_id}/checkpoints/config")
    assert ckpt["mode"] == "exactly_once"
    assert ckpt["interval"] == 10_000
    assert ckpt["externalization"] == {"enabled": True, "delete_on_cancellation": False}
    assert ckpt["checkpoint_storage"] == "FileSystemCheckpointStorage"


def test_killed_taskmanager_is_replaced(cluster: FlinkCluster) -> None:
    t0 = time.monotonic()
    old = cluster.kill_taskmanager()
    assert not alive(old.pid)
    assert cluster.taskmanagers == []
    new = cluster.start_taskmanager(timeout=90)
    assert new.pid != old.pid and alive(new.pid)
    # The dead one stays listed until the JobManager misses its heartbeats (~10 s with the profile).
    ov = cluster.wait_for_taskmanagers(1, timeout=60, slots=2)
    assert ov["slots-available"] == 2
    assert [t["id"] for t in cluster.registered_taskmanagers()] == [new.resource_id]
    assert [t.pid for t in cluster.taskmanagers] == [new.pid]
    print(f"TaskManager replaced in {time.monotonic() - t0:.1f}s")


def test_stop_leaves_no_process(cluster: FlinkCluster) -> None:
    pids = [cluster.jobmanager_pid, *(t.pid for t in cluster.taskmanagers)]
    assert all(pids) and len(pids) == 2
    # the smoke job's jar, kept by the TaskManager (before: 160 MB a Beam job, for ever)
    assert list(cluster.tmp_dir.glob("*/blobStorage/job_*"))
    t0 = time.monotonic()
    assert cluster.stop() is True
    print(f"cluster stopped in {time.monotonic() - t0:.1f}s")
    assert not [p for p in pids if alive(p)]
    assert not cluster.state_path.exists()
    assert not cluster.tmp_dir.exists()
    st = cluster.status()
    assert not st.running and not st.stale
    assert fc.port_is_free(cluster.port)
    with pytest.raises(OSError):
        cluster.overview(timeout=2)
    assert cluster.stop() is False  # idempotent


# ---------------------------------------------------------------------------------------------------
# Without processes of the cluster


def test_stale_state_file_never_signals_a_foreign_pid(tmp_path: Path) -> None:
    """A state file naming a PID that is not this cluster's JVM (reused PID) is not signalled."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        c = FlinkCluster(None, state_dir=tmp_path)
        c.state_path.write_text(
            f'{{"conf_dir": "{c.conf_dir}", "jobmanager": {{"pid": {sleeper.pid}, "started_at": 0}},'
            f' "taskmanagers": [{{"pid": {sleeper.pid}, "resource_id": "x", "started_at": 0}}]}}'
        )
        st = c.status()
        assert not st.running and st.stale
        assert c.stop() is False
        assert sleeper.poll() is None, "stop() signalled a process that is not this cluster's"
        with pytest.raises(FlinkClusterError, match="no running TaskManager"):
            c.kill_taskmanager()
    finally:
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()


def test_config_stays_on_loopback(tmp_path: Path) -> None:
    c = FlinkCluster(None, state_dir=tmp_path, config={"rest.bind-address": "0.0.0.0"})
    with pytest.raises(FlinkClusterError, match=r"rest.bind-address='0.0.0.0'.*127.0.0.1 only"):
        c.flink_config(6123)


def test_flink_runner_args_without_a_job_server_jar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEAMOPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BEAMOPS_FLINK_JOB_SERVER_JAR", raising=False)
    assert fc.job_server_jar() is None
    with pytest.raises(JobServerJarMissingError) as err:
        fc.flink_runner_args("127.0.0.1:8081")
    message = str(err.value)
    assert f"org.apache.beam:beam-runners-flink-1.20-job-server:{fc.beam_version()}" in message
    assert "BEAMOPS_FLINK_JOB_SERVER_JAR=/path/to/" in message


def test_flink_runner_args_with_a_job_server_jar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jar = tmp_path / "job-server.jar"
    jar.write_bytes(b"PK")
    monkeypatch.setenv("BEAMOPS_FLINK_JOB_SERVER_JAR", str(jar))
    assert fc.flink_runner_args("127.0.0.1:8081") == [
        "--flink_version=1.20",
        "--flink_master=127.0.0.1:8081",
        f"--flink_job_server_jar={jar}",
    ]
    monkeypatch.setenv("BEAMOPS_FLINK_JOB_SERVER_JAR", str(tmp_path / "missing.jar"))
    with pytest.raises(JobServerJarMissingError, match="does not exist"):
        fc.flink_runner_args("127.0.0.1:8081")
