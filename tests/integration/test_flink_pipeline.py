"""jobs.com_pipeline on the real local Flink 1.20 cluster: Kafka in, ComMaps out, in streaming mode.

The job runs as users run it (``python -m jobs.com_pipeline --runner=FlinkRunner ...``) in a
child process, reading an unbounded topic (``--stop never``) while the detector simulator is
still publishing, with Beam's job server (the cached jar that scripts/install_components.sh
provides) and checkpointing on. A streaming job never finishes by itself: the test cancels it
through Flink's REST API once every final map is on the output topic, then compares those maps,
byte for byte, with the DirectRunner's over the same messages.

Two SDK environments: LOOPBACK (the job's own process runs the Python workers: development) and
EXTERNAL, the production path: a worker pool beside the TaskManager that starts each SDK worker as
``beamops-sdk-worker``, a process of its own with the job's pipeline options (``python -m
beamops.services.worker_pool --sdk_worker ...``: docker/entrypoint-worker-pool.sh's pool, bound to
127.0.0.1). About a minute each here.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from helpers import child, sdk_worker_pool

from beamops import ComMap
from beamops.io.kafka_config import KafkaClientConfig
from beamops.io.publish import FramePublisher
from beamops.runner import HARNESS_PLUGIN
from beamops.services._local import cmdline, environ
from beamops.services.flink_cluster import FlinkCluster
from beamops.simulate import ScanSimulation
from jobs import com_pipeline

# The jobs get --finish_bundle_before_checkpointing from beamops.runner.flink_defaults: without it
# a checkpoint taken while the Kafka reader's first bundle is in flight sometimes left the reader
# never running again, with no error on either side. Select these tests with -m flink_streaming.
pytestmark = [pytest.mark.integration, pytest.mark.flink_streaming]

SIM = ScanSimulation(
    scan_shape=(32, 32), frame_shape=(64, 64), events_per_frame=30.0, disc_radius=8.0, shift_amplitude=3.0, seed=5
)
BATCH = 64  # 16 messages per scan
EMIT_EVERY = 256  # 3 progressive maps per scan before its final one
JOB_START_S = 120.0  # job server start + submission + first SDK worker, on a loaded 2-core machine
MAPS_S = 180.0


@pytest.fixture(scope="module")
def flink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlinkCluster]:
    cluster = FlinkCluster(None, state_dir=tmp_path_factory.mktemp("flink"), quick_start=True, progress=print)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def children(pid: int) -> list[int]:
    """The PIDs of ``pid``'s child processes (/proc/PID/task/*/children needs a kernel option this one lacks)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == pid:  # field 4, the parent's PID, after the parenthesised command name
            found.append(int(stat.parent.name))
    return found


def sdk_workers(pool_pid: int) -> dict[int, tuple[list[str], dict[str, object]]]:
    """The pool's SDK worker processes: PID -> (command line, the pipeline options in its environment).

    The options are what beamops-sdk-worker got from the job's provision service (Flink's) and handed
    to Beam's ``sdk_worker_main``, by name; a worker that is a thread of the pool is not here at all.
    """
    workers = {}
    for pid in children(pool_pid):
        options = json.loads(environ(pid).get("PIPELINE_OPTIONS", "{}"))
        # The runner sends them by their portable names, beam:option:NAME:v1.
        workers[pid] = (
            cmdline(pid),
            {k.removeprefix("beam:option:").removesuffix(":v1"): v for k, v in options.items()},
        )
    return workers


def running_job(flink: FlinkCluster, job: subprocess.Popen[bytes], log: Path) -> str:
    """The id of the one RUNNING job, once Flink reports it (the job's process must stay alive)."""
    deadline = time.monotonic() + JOB_START_S
    while True:
        running = [j["jid"] for j in flink.jobs() if j["state"] == "RUNNING"]
        if running:
            assert len(running) == 1, f"more than one job runs: {running}"
            return running[0]
        assert job.poll() is None, f"the job exited with {job.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no RUNNING job after {JOB_START_S:g} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


@contextmanager
def map_reader(bootstrap: str, topic: str) -> Iterator[Consumer]:
    """A consumer of an output topic from its start (a fresh group)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    try:
        yield consumer
    finally:
        consumer.close()


def read_maps(
    consumer: Consumer, arrived: list, finals: dict[int, bytes], until: Callable[[], bool], timeout: float, what: str
) -> None:
    """Read maps until ``until()``; fail after ``timeout`` s saying ``what`` is missing.

    Appends ``(when the job wrote it: the message's timestamp in s, ComMap)`` for every map to
    ``arrived`` and puts the bytes of each final map in ``finals`` (scan -> bytes).
    """
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"{what} missing after {timeout:g} s"
        msg = consumer.poll(0.5)
        if msg is None or msg.error() is not None:
            continue
        com = ComMap.from_bytes(msg.value())
        arrived.append((msg.timestamp()[1] / 1000, com))
        if com.final:
            assert com.scan_number not in finals, f"two final maps of scan {com.scan_number}"
            finals[com.scan_number] = msg.value()


def collect_maps(consumer: Consumer, scans: set[int], timeout: float, arrived: list, finals: dict[int, bytes]) -> None:
    """:func:`read_maps` until ``finals`` holds every scan in ``scans``."""
    read_maps(consumer, arrived, finals, lambda: scans <= set(finals), timeout, f"final maps of {sorted(scans)}")


def direct_runner_finals(kafka_broker, frames_in: str, scans: set[int]) -> dict[int, bytes]:
    """The final maps (bytes) jobs.com_pipeline writes on the DirectRunner over all of ``frames_in``."""
    reference = kafka_broker.new_topic(prefix="ref")
    argv = ["--bootstrap_servers", kafka_broker.bootstrap_servers, "--input_topic", frames_in,
            "--output_topic", reference, "--start", "earliest", "--stop", "latest",
            "--emit_every", str(EMIT_EVERY)]  # fmt: skip
    assert com_pipeline.main(argv) == 0
    expected: dict[int, bytes] = {}
    with map_reader(kafka_broker.bootstrap_servers, reference) as consumer:
        collect_maps(consumer, scans, 60, [], expected)
    return expected


@pytest.mark.parametrize("environment", ["LOOPBACK", "EXTERNAL"])
def test_com_pipeline_streams_on_flink_and_matches_the_direct_runner(flink, kafka_broker, tmp_path, environment):
    frames_in, maps_out = kafka_broker.new_topic(partitions=2, prefix="in"), kafka_broker.new_topic(prefix="out")
    dead_out = kafka_broker.new_topic(prefix="dead")
    bootstrap = kafka_broker.bootstrap_servers
    client = KafkaClientConfig(bootstrap)
    # Scan 9 is on the topic before the job starts (a backlog); scans 1 and 2 come while it runs.
    with FramePublisher(client, frames_in) as publisher:
        publisher.publish_all(replace(SIM, scan_number=9).batches(BATCH))
    job_args = [
        sys.executable, "-m", "jobs.com_pipeline", "--runner=FlinkRunner", *flink.beam_args(),
        "--bootstrap_servers", bootstrap, "--input_topic", frames_in, "--output_topic", maps_out,
        "--dead_letter_topic", dead_out, "--group_id", f"live-{uuid.uuid4().hex[:8]}",
        "--start", "earliest", "--stop", "never", "--emit_every", str(EMIT_EVERY),
        "--parallelism=2",
    ]  # fmt: skip
    arrived: list[tuple[float, ComMap]] = []
    finals: dict[int, bytes] = {}
    with ExitStack() as stack:
        maps = stack.enter_context(map_reader(bootstrap, maps_out))
        pool_log = tmp_path / "worker-pool.log"
        pool_pid = None
        if environment == "EXTERNAL":
            pool, pool_pid = stack.enter_context(sdk_worker_pool(pool_log))
            job_args += ["--environment_type=EXTERNAL", f"--environment_config={pool}"]
        else:
            job_args += ["--environment_type=LOOPBACK"]
        job_log = tmp_path / "job.log"
        job = stack.enter_context(child(job_args, job_log))
        job_id = running_job(flink, job, job_log)
        collect_maps(maps, {9}, MAPS_S, arrived, finals)
        if pool_pid is not None:
            # The maps came from Beam's sdk_worker_main in processes of the pool's own, started with the
            # job's options (so with beamops.harness imported): neither threads of the pool nor bare harnesses.
            workers = sdk_workers(pool_pid)
            assert workers, f"no SDK worker process under the pool:\n{pool_log.read_text()[-2000:]}"
            for argv, options in workers.values():
                assert argv[1:] == ["-m", "apache_beam.runners.worker.sdk_worker_main"], argv
                assert HARNESS_PLUGIN in options.get("beam_plugins", []), options
                assert options.get("environment_config") == pool, options

        # The detector: one message every 0.3 s, so a scan takes about 5 s to publish.
        published: list[float] = []
        with FramePublisher(client, frames_in) as publisher:
            for n in (1, 2):
                for batch in replace(SIM, scan_number=n).batches(BATCH):
                    publisher.publish(batch)
                    publisher.flush()
                    published.append(time.time())
                    time.sleep(0.3)
        collect_maps(maps, {1, 2, 9}, MAPS_S, arrived, finals)
        flink.cancel_job(job_id)
        assert job.wait(60) is not None
        if pool_pid is not None:  # Flink stopped the job's workers through the pool: none outlives it
            deadline = time.monotonic() + 30
            while left := sdk_workers(pool_pid):
                assert time.monotonic() < deadline, f"SDK workers left 30 s after the job: {sorted(left)}"
                time.sleep(0.5)

    # Streaming: the job wrote maps of scan 1 to the output topic while the simulator was still publishing.
    timeline = [(round(t - published[0], 1), com.scan_number, com.frames_seen) for t, com in arrived]
    early = [com for t, com in arrived if published[0] < t < published[-1]]
    assert early, f"no map while publishing (0 to {published[-1] - published[0]:.1f} s): (s, scan, frames) {timeline}"
    progressive = {
        n: [com.frames_seen for _, com in arrived if com.scan_number == n and not com.final] for n in (1, 2, 9)
    }
    assert progressive == {n: [256, 512, 768] for n in (1, 2, 9)}, timeline

    # The DirectRunner over the same messages writes the same final maps, byte for byte.
    expected = direct_runner_finals(kafka_broker, frames_in, {1, 2, 9})
    for scan in (1, 2, 9):
        got = ComMap.from_bytes(finals[scan])
        assert (got.final, got.complete, got.frames_seen) == (True, True, SIM.n_frames)
        assert finals[scan] == expected[scan], f"scan {scan}: Flink's final map differs from the DirectRunner's"


def test_a_bounded_run_on_flink_ends_and_commits_after_its_maps(flink, kafka_broker, tmp_path):
    """--stop latest on Flink: the job finishes by itself and moves the group to the end it read."""
    frames_in, maps_out = kafka_broker.new_topic(partitions=2, prefix="in"), kafka_broker.new_topic(prefix="out")
    bootstrap = kafka_broker.bootstrap_servers
    group = f"batch-{uuid.uuid4().hex[:8]}"
    with FramePublisher(KafkaClientConfig(bootstrap), frames_in) as publisher:
        publisher.publish_all(replace(SIM, scan_number=4).batches(BATCH))
    job_args = [
        sys.executable, "-m", "jobs.com_pipeline", "--runner=FlinkRunner", *flink.beam_args(),
        "--environment_type=LOOPBACK", "--bootstrap_servers", bootstrap, "--input_topic", frames_in,
        "--output_topic", maps_out, "--dead_letter_topic", kafka_broker.new_topic(prefix="dead"),
        "--group_id", group, "--start", "committed", "--stop", "latest", "--emit_every", str(EMIT_EVERY),
    ]  # fmt: skip
    job_log = tmp_path / "job.log"
    with child(job_args, job_log) as job:
        status = job.wait(JOB_START_S + MAPS_S)
    assert status == 0, job_log.read_text()[-4000:]
    finals: dict[int, bytes] = {}
    with map_reader(bootstrap, maps_out) as consumer:
        collect_maps(consumer, {4}, 60, [], finals)
    assert finals[4] == direct_runner_finals(kafka_broker, frames_in, {4})[4]
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        partitions = [TopicPartition(frames_in, p) for p in (0, 1)]
        committed = [tp.offset for tp in consumer.committed(partitions, timeout=10)]
        ends = [consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in partitions]
    finally:
        consumer.close()
    assert committed == ends == [8, 8]


def completed_checkpoints(flink: FlinkCluster, job_id: str) -> int:
    return int(flink.rest(f"/jobs/{job_id}/checkpoints")["counts"]["completed"])


def wait_for_a_checkpoint(flink: FlinkCluster, job_id: str) -> None:
    deadline = time.monotonic() + MAPS_S
    while completed_checkpoints(flink, job_id) < 1:
        assert time.monotonic() < deadline, f"no checkpoint of {job_id} completed in {MAPS_S:g} s"
        time.sleep(0.5)


@contextmanager
def ended(flink: FlinkCluster) -> Iterator[list[str]]:
    """Collects job ids; on the way out, cancels those still running (a failed test leaves no job behind)."""
    ids: list[str] = []
    try:
        yield ids
    finally:
        for job_id in ids:
            if flink.job(job_id)["state"] not in ("CANCELED", "FAILED", "FINISHED"):
                flink.cancel_job(job_id)


def live_job_args(flink: FlinkCluster, kafka_broker) -> list[str]:
    """jobs.com_pipeline reading fresh topics for ever on ``flink`` (LOOPBACK, a checkpoint a second)."""
    return [
        sys.executable, "-m", "jobs.com_pipeline", "--runner=FlinkRunner", *flink.beam_args(),
        "--environment_type=LOOPBACK", "--checkpointing_interval=1000",
        "--bootstrap_servers", kafka_broker.bootstrap_servers, "--input_topic", kafka_broker.new_topic(prefix="in"),
        "--output_topic", kafka_broker.new_topic(prefix="out"),
        "--dead_letter_topic", kafka_broker.new_topic(prefix="dead"), "--start", "earliest", "--stop", "never",
    ]  # fmt: skip


def test_a_live_job_stopped_with_a_savepoint_says_where_to_go_on_from(flink, kafka_broker, tmp_path):
    """Before, the client said "done" and exited 0 as if the live job had ended by itself."""
    job_log = tmp_path / "job.log"
    with child(live_job_args(flink, kafka_broker), job_log) as job, ended(flink) as ids:
        ids.append(running_job(flink, job, job_log))
        job_id = ids[0]
        wait_for_a_checkpoint(flink, job_id)  # then every task runs: a savepoint can be taken
        stop = urllib.request.Request(
            f"{flink.rest_url}/jobs/{job_id}/stop", data=b'{"drain": false}', method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        urllib.request.urlopen(stop, timeout=10).close()
        assert job.wait(120) == 0, job_log.read_text()[-4000:]
    said = job_log.read_text()
    savepoint = said.split("stopped with a savepoint; to go on, submit it again with --savepoint_path=")[1].split()[0]
    assert "/savepoint-" in savepoint and Path(savepoint.removeprefix("file:")).exists(), savepoint


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_on_a_live_loopback_job_cancels_it_on_the_cluster(flink, kafka_broker, tmp_path, stop):
    """Before, the client said "interrupted" and exited 130 while Flink restarted the job for ever: its
    SDK workers had been the client's own threads (LOOPBACK). A SIGTERM (`kill`, `timeout`, a service
    manager) ended the client at once, with the same result."""
    job_log = tmp_path / "job.log"
    with child(live_job_args(flink, kafka_broker), job_log) as job, ended(flink) as ids:
        ids.append(running_job(flink, job, job_log))
        job_id = ids[0]
        wait_for_a_checkpoint(flink, job_id)
        job.send_signal(stop)
        assert job.wait(90) == 128 + stop, job_log.read_text()[-4000:]
    assert flink.job(job_id)["state"] == "CANCELED"
    said = job_log.read_text()
    name = flink.job(job_id)["name"]
    assert name.startswith("com-pipeline-"), name  # the name the client found its job by
    assert f"cancelled the Flink job {name} ({job_id}): its workers ran in this process" in said, said[-4000:]
    checkpoint = said.split("submit it again with --savepoint_path=")[1].split()[0]
    assert f"/{job_id}/chk-" in checkpoint, checkpoint


def test_a_killed_taskmanager_resumes_from_the_last_checkpoint_with_an_exact_map(flink, kafka_broker, tmp_path):
    """SIGKILL the TaskManager in the middle of a scan; a new one takes over from the last checkpoint.

    The Kafka read positions (the splittable DoFn's restrictions) and com_reduce's per-scan state
    are in the checkpoint, so the frames after it are read again and counted once: the final map
    equals the DirectRunner's byte for byte. The output topic is at-least-once: maps the job wrote
    between that checkpoint and the kill can be written again after the restart.
    """
    frames_in, maps_out = kafka_broker.new_topic(partitions=2, prefix="in"), kafka_broker.new_topic(prefix="out")
    bootstrap = kafka_broker.bootstrap_servers
    client = KafkaClientConfig(bootstrap)
    batches = list(replace(SIM, scan_number=1).batches(BATCH))
    job_args = [
        sys.executable, "-m", "jobs.com_pipeline", "--runner=FlinkRunner", *flink.beam_args(),
        "--environment_type=LOOPBACK", "--checkpointing_interval=2000",
        "--bootstrap_servers", bootstrap, "--input_topic", frames_in, "--output_topic", maps_out,
        "--dead_letter_topic", kafka_broker.new_topic(prefix="dead"), "--group_id", f"live-{uuid.uuid4().hex[:8]}",
        "--start", "earliest", "--stop", "never", "--emit_every", str(EMIT_EVERY),
    ]  # fmt: skip
    arrived: list[tuple[float, ComMap]] = []
    finals: dict[int, bytes] = {}
    with ExitStack() as stack:
        maps = stack.enter_context(map_reader(bootstrap, maps_out))
        job_log = tmp_path / "job.log"
        job = stack.enter_context(child(job_args, job_log))
        job_id = running_job(flink, job, job_log)
        publisher = stack.enter_context(FramePublisher(client, frames_in))
        half = len(batches) // 2
        publisher.publish_all(batches[:half])
        publisher.flush()
        read_maps(maps, arrived, finals, lambda: bool(arrived), MAPS_S, "a progressive map of the first half")
        before = completed_checkpoints(flink, job_id)
        deadline = time.monotonic() + 60
        while completed_checkpoints(flink, job_id) < before + 1:  # a checkpoint that holds part of the scan
            assert time.monotonic() < deadline, "no checkpoint completed within 60 s"
            time.sleep(0.5)

        killed = flink.kill_taskmanager()
        flink.start_taskmanager()
        restarted = flink.job(job_id)
        publisher.publish_all(batches[half:])
        publisher.flush()
        collect_maps(maps, {1}, MAPS_S, arrived, finals)
        restarts = flink.rest(f"/jobs/{job_id}/exceptions").get("exceptionHistory", {}).get("entries", [])
        # The client says so (it polls every 5 s): before, a job Flink restarted was silence on the client.
        deadline = time.monotonic() + 20
        while "Flink restarted the job" not in job_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        flink.cancel_job(job_id)
        assert job.wait(60) is not None
    assert killed.pid not in [tm.pid for tm in flink.taskmanagers]
    assert restarts, f"the job did not fail over (state after the kill: {restarted['state']})"
    said = re.search(
        r"Flink restarted the job \S+ \((\w+)\) after a failure, (\d+) times? so far: (.+)", job_log.read_text()
    )
    assert said and said[1] == job_id and int(said[2]) >= 1, job_log.read_text()[-3000:]

    expected = direct_runner_finals(kafka_broker, frames_in, {1})
    got = ComMap.from_bytes(finals[1])
    assert (got.final, got.complete, got.frames_seen) == (True, True, SIM.n_frames)
    assert finals[1] == expected[1], "the final map after recovery differs from the DirectRunner's"
