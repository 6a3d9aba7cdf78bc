"""The same Kafka topic through jobs.com_pipeline on DirectRunner and on the local Flink cluster.

    python -m bench.flink_e2e            # 8 scans of 128x128, Poisson 50 events/frame, 1000-frame messages
    python -m bench.flink_e2e --quick    # 4 scans, 2 latency probes

The benchmark starts its own broker and Flink 1.20.5 cluster (1 TaskManager, 2 slots, full JIT)
on free 127.0.0.1 ports and stops both at the end. It publishes the scans to a topic of 2
partitions (``--partitions``), then runs:

* **DirectRunner** (FnApiRunner, one in-process worker): ``jobs.com_pipeline`` in this process,
  bounded (earliest to latest). frames/s = frames / wall, start-up included.
* **Flink, parallelism 1 and 2** (``--runner=FlinkRunner``, LOOPBACK, checkpoints every 10 s):
  ``jobs.com_pipeline`` as a child process reading a fresh topic unbounded.
  - *start-up*: from submission to the final map of a warm-up scan;
  - *frames/s*: the scans are then published at once; frames / (first frame published -> last
    final map), from the output messages' timestamps;
  - *latency*: once the job has caught up, each probe scan is published as fast as possible, and
    the latency is its final map's timestamp minus the time its last frame was acknowledged by the
    broker. Median of the probes;
  - *idle CPU*: then, with nothing to read, the CPU time of the job's processes (the SDK worker, Beam's
    job server) and of the TaskManager over ``--idle-s``, as % of one core.

Every final map, on both runners, must equal (byte for byte) the DirectRunner's. A Flink job that
produces no map within ``--timeout`` is reported as stalled (apache/beam#20668, see
tests/integration/test_flink_pipeline.py), not retried.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer

from beamops import ComMap
from beamops.io.kafka_config import KafkaClientConfig
from beamops.io.publish import FramePublisher
from beamops.services._local import stop_process_group
from beamops.services.flink_cluster import FlinkCluster
from beamops.services.kafka_broker import KafkaBroker
from beamops.simulate import ScanSimulation
from bench._common import cpu_seconds, machine_line, table
from jobs import com_pipeline

CAMERA_HZ = 87_000
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Maps:
    """Maps read from an output topic: (message timestamp s, ComMap, bytes)."""

    seen: list[tuple[float, ComMap, bytes]] = field(default_factory=list)

    def finals(self) -> dict[int, tuple[float, bytes]]:
        return {com.scan_number: (t, raw) for t, com, raw in self.seen if com.final}


def read_until(consumer: Consumer, maps: Maps, scans: set[int], timeout: float) -> bool:
    """Read maps until every scan in ``scans`` has a final one; False on timeout."""
    deadline = time.monotonic() + timeout
    while not scans <= set(maps.finals()):
        if time.monotonic() > deadline:
            return False
        msg = consumer.poll(0.5)
        if msg is None or msg.error() is not None:
            continue
        maps.seen.append((msg.timestamp()[1] / 1000, ComMap.from_bytes(msg.value()), msg.value()))
    return True


def map_consumer(bootstrap: str, topic: str) -> Consumer:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    return consumer


def publish_scan(client: KafkaClientConfig, topic: str, sim: ScanSimulation, batch_size: int) -> float:
    """Publish a scan as fast as possible; the time (s since the epoch) the broker had all of it."""
    with FramePublisher(client, topic) as publisher:
        publisher.publish_all(sim.batches(batch_size))
        publisher.flush()
    return time.time()


def run_flink(
    cluster: FlinkCluster,
    broker: KafkaBroker,
    args: argparse.Namespace,
    parallelism: int,
    sims: list[ScanSimulation],
    probes: list[ScanSimulation],
    log: Path,
) -> dict[str, object]:
    """One streaming job on a fresh topic: warm up on ``probes[0]``, then time the scans, then probe latency."""
    topic, out = (f"{kind}-p{parallelism}-{uuid.uuid4().hex[:6]}" for kind in ("frames", "maps"))
    broker.create_topic(topic, partitions=args.partitions)
    broker.create_topic(out, partitions=1)
    client = KafkaClientConfig(broker.bootstrap_servers)
    cmd = [
        sys.executable, "-m", "jobs.com_pipeline", "--runner=FlinkRunner", *cluster.beam_args(),
        "--environment_type=LOOPBACK", f"--parallelism={parallelism}",
        "--bootstrap_servers", broker.bootstrap_servers, "--input_topic", topic, "--output_topic", out,
        "--start", "earliest", "--stop", "never", "--emit_every", str(args.emit_every), *args.flink_arg,
    ]  # fmt: skip
    consumer = map_consumer(broker.bootstrap_servers, out)
    maps = Maps()
    submitted = time.time()
    with log.open("wb") as sink:
        # A process group of its own: the job starts Beam's job server (a JVM) that must go with it.
        job = subprocess.Popen(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        warm_up, *latency_probes = probes
        publish_scan(client, topic, warm_up, args.batch_size)
        if not read_until(consumer, maps, {warm_up.scan_number}, args.timeout):
            return {"stalled": True, "maps": maps}
        ready = time.time()
        started = time.time()
        for sim in sims:
            publish_scan(client, topic, sim, args.batch_size)
        if not read_until(consumer, maps, {s.scan_number for s in sims}, args.timeout):
            return {"stalled": True, "maps": maps}
        last = max(maps.finals()[s.scan_number][0] for s in sims)
        latencies = []
        for probe in latency_probes:
            published = publish_scan(client, topic, probe, args.batch_size)
            if not read_until(consumer, maps, {probe.scan_number}, args.timeout):
                return {"stalled": True, "maps": maps}
            latencies.append(maps.finals()[probe.scan_number][0] - published)
        # What the job costs between scans: its own processes (the SDK worker and Beam's job server) and
        # the TaskManagers, which run nothing else.
        taskmanagers = [t.pid for t in cluster.taskmanagers]
        before = cpu_seconds(taskmanagers, groups=[job.pid])
        time.sleep(args.idle_s)
        idle_cpu = (cpu_seconds(taskmanagers, groups=[job.pid]) - before) / args.idle_s
        return {
            "stalled": False,
            "maps": maps,
            "burst_s": last - started,
            "start_up_s": ready - submitted,
            "latencies": latencies,
            "idle_cpu": idle_cpu,
        }
    finally:
        consumer.close()
        for job_info in cluster.jobs():
            if job_info["state"] == "RUNNING":
                cluster.cancel_job(job_info["jid"])
        stop_process_group(job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 scans, 2 latency probes")
    parser.add_argument("--scans", type=int, default=None, help="scans in the topic (default 8, quick 4)")
    parser.add_argument("--scan", type=int, default=128, help="each scan is SCAN x SCAN positions (default 128)")
    parser.add_argument("--events", type=float, default=50.0, help="mean events per frame (default 50)")
    parser.add_argument("--partitions", type=int, default=2, help="partitions of the frames topics (default 2)")
    parser.add_argument("--batch-size", type=int, default=1000, help="frames per message (default 1000)")
    parser.add_argument("--probes", type=int, default=None, help="latency probe scans (default 3, quick 2)")
    parser.add_argument("--emit-every", type=int, default=10_000, help="com_reduce emit_every (library default)")
    parser.add_argument("--timeout", type=float, default=240.0, help="longest wait for a scan's final map (s)")
    parser.add_argument("--idle-s", type=float, default=20.0, help="how long the idle job's CPU is measured (s)")
    parser.add_argument(
        "--flink-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more option for the Flink jobs, e.g. --flink-arg=--max_bundle_time_mills=200 (repeatable)",
    )
    args = parser.parse_args(argv)
    args.scans = args.scans or (4 if args.quick else 8)
    args.probes = args.probes or (2 if args.quick else 3)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("apache_beam", "transforms", "jobs", "beamops"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    def sim(n: int) -> ScanSimulation:
        return ScanSimulation(scan_shape=(args.scan, args.scan), events_per_frame=args.events, seed=n, scan_number=n)

    sims = [sim(n) for n in range(1, args.scans + 1)]
    frames = sum(s.n_frames for s in sims)
    print(machine_line())
    work = Path(tempfile.mkdtemp(prefix="beamops-bench-flink-"))
    broker = KafkaBroker(ephemeral=True, quick_start=False)
    cluster = FlinkCluster(None, state_dir=work / "flink")
    broker.start()
    try:
        cluster.start()
        topic = f"frames-{uuid.uuid4().hex[:6]}"
        broker.create_topic(topic, partitions=args.partitions)
        client = KafkaClientConfig(broker.bootstrap_servers)
        for s in sims:
            publish_scan(client, topic, s, args.batch_size)
        print(
            f"topic: {args.scans} scans of {args.scan}x{args.scan}, Poisson {args.events:g} events/frame, "
            f"{frames} frames in messages of {args.batch_size}, {args.partitions} partitions; "
            f"broker {broker.bootstrap_servers}, "
            f"Flink {cluster.rest_url} (1 TaskManager, 2 slots)"
            + (f"; Flink jobs also given {' '.join(args.flink_arg)}" if args.flink_arg else "")
        )

        # DirectRunner: the reference maps and the batch engine's rate
        ref = f"direct-{uuid.uuid4().hex[:6]}"
        broker.create_topic(ref, partitions=1)
        started = time.perf_counter()
        argv_d = ["--bootstrap_servers", broker.bootstrap_servers, "--input_topic", topic, "--output_topic", ref,
                  "--start", "earliest", "--stop", "latest", "--emit_every", str(args.emit_every)]  # fmt: skip
        if com_pipeline.main(argv_d) != 0:
            raise RuntimeError("the DirectRunner job failed")
        direct_wall = time.perf_counter() - started
        reference = Maps()
        consumer = map_consumer(broker.bootstrap_servers, ref)
        read_until(consumer, reference, {s.scan_number for s in sims}, 60)
        consumer.close()
        expected = {n: raw for n, (_, raw) in reference.finals().items()}

        rows = [["DirectRunner (FnApiRunner), bounded replay", f"{frames / direct_wall:,.0f}", "", "", "", "", ""]]
        notes = []
        probe_number = 1000
        for parallelism in (1, 2):
            probes = [sim(probe_number + i) for i in range(args.probes + 1)]
            probe_number += 100
            log = work / f"job-p{parallelism}.log"
            result = run_flink(cluster, broker, args, parallelism, sims, probes, log)
            name = f"Flink, parallelism {parallelism}, streaming"
            if result["stalled"]:
                rows.append([name, "stalled", "", "", "", "", ""])
                notes.append(f"  {name}: no final map of every scan within {args.timeout:g} s (job log {log})")
                continue
            finals = result["maps"].finals()  # type: ignore[union-attr]
            for n, raw in expected.items():
                if finals[n][1] != raw:
                    raise AssertionError(f"{name}: scan {n}'s final map differs from the DirectRunner's")
            lat = result["latencies"]
            rows.append([
                name,
                f"{frames / result['burst_s']:,.0f}",  # type: ignore[operator]
                f"{result['start_up_s']:.1f}",
                f"{statistics.median(lat):.2f}",  # type: ignore[arg-type]
                f"{min(lat):.2f}",  # type: ignore[type-var]
                f"{max(lat):.2f}",  # type: ignore[type-var]
                f"{100 * result['idle_cpu']:.0f}",  # type: ignore[operator]
            ])  # fmt: skip
            notes.append(f"  verified {name}: final maps of {len(expected)} scans identical to the DirectRunner's")
        print("\n".join(notes))
        headers = [
            "runner",
            "frames/s",
            "start-up s",
            "latency s med",
            "min",
            "max",
            "idle CPU %",
        ]
        print(table(headers, rows))
        print(
            f"  frames/s: DirectRunner = frames / wall of the bounded replay (start-up included); Flink = frames / "
            f"(first frame published -> last final map) for the {args.scans} scans published at once to the warm "
            f"job. Start-up: job submitted -> final map of a warm-up scan. Latency: last frame of a probe scan "
            f"acknowledged -> its final map, {args.probes} probes of {sims[0].n_frames} frames. Idle CPU: "
            f"the job's processes and the TaskManager over {args.idle_s:g} s after the probes, % of one core. "
            f"4D Camera: {CAMERA_HZ:,} frames/s."
        )
    finally:
        cluster.stop()
        broker.stop()
    # Flink's state and logs take 300 MB a run: kept only when a job stalled, for its logs.
    if any("no final map" in note for note in notes):
        print(f"  kept {work} for the logs")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
