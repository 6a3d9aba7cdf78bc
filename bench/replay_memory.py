"""Replay memory: jobs.replay over a topic of >= 2 GB in a child process, its RSS sampled every 0.5 s.

    python -m bench.replay_memory             # a 2 GB topic
    python -m bench.replay_memory --gb 0.5    # quick mode

The benchmark starts its own broker (``KafkaBroker(ephemeral=True)``, a free
127.0.0.1 port, data in a temp dir that ``stop()`` removes; retention is
unlimited by the broker's default) and refuses to run, with a message, when the
file system of that temp dir has less than 3x the topic's size free. It then:

1. publishes ``--gb`` GB of simulated scans (``--scan`` x ``--scan`` positions,
   576x576 frames, Poisson ``--events`` events/frame, ``--batch-size`` frames per
   message, round robin over ``--partitions`` partitions) with ``FramePublisher``
   as fast as it goes: one scan's batches are simulated once and published under
   scan numbers 1..N, so every scan has the same events (and the same COM map);
2. runs ``python -m jobs.replay --start earliest --stop latest --out_dir <tmp>
   --png false`` (read_kafka_frames bounded earliest..latest, no consumer group
   -> com_partial -> com_reduce -> one .npz per final map) on FnApiRunner in a
   child process, reading its ``VmRSS`` and ``VmHWM`` from ``/proc/<pid>/status``
   every ``--interval`` s;
3. checks that the child wrote one complete final map per scan, each equal (bit
   for bit) to the same computation without Kafka, and no dead letters;
4. deletes the topic and stops the broker.

It reports the replay's duration and throughput, peak RSS (sampled, and the
kernel's high-water mark VmHWM), RSS at 25/50/75/100% of the run's duration, and
whether memory stays flat: the peak RSS of the whole replay <= 1.3x the peak of
its first 25% (PASS/FAIL; RSS swings by tens of MB from one sample to the next,
so a single sample at 25% is too noisy a reference; it is printed too). The
percentages are of the replay proper, from the moment the child logs that its
Kafka reader started (before that it imports Python modules and builds the
pipeline, whatever the topic's size) to its exit; RSS at 25/50/75/100% of the
whole run is printed too.

Target (DESIGN.md section 7): replaying a topic much larger than RAM would allow
keeps RSS flat.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np

from beamops.frames import SparseFrameBatch
from beamops.io.kafka_config import KafkaClientConfig
from beamops.simulate import ScanSimulation
from bench._common import machine_line, table
from bench.kafka_e2e import Reducer, finals, start_broker, topic_ranges

FLAT = 1.3  # peak RSS <= FLAT x the RSS at 25% of the run
DISK_FACTOR = 3
KAFKA_MAX_MESSAGE = 1_000_000  # librdkafka's message.max.bytes and about the broker's default


@dataclasses.dataclass(frozen=True)
class Sample:
    t: float  # s since the child started
    rss_kb: int
    hwm_kb: int
    maps_written: int
    reading: bool  # the child has logged that its Kafka reader started


READ_STARTED = b"kafka reader for"  # logged by read_kafka_frames' reading DoFn in setup()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB) of ``pid``; empty once it has exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def mb(kb: float) -> float:
    return kb / 1024


def run_replay(
    bootstrap: str, topic: str, out_dir: Path, interval: float, extra: list[str]
) -> tuple[list[Sample], float, int, Path]:
    """Run jobs.replay in a child; sample its memory. Returns (samples, duration s, exit status, log path)."""
    log_path = out_dir.parent / "replay.log"
    cmd = [
        sys.executable,
        "-m",
        "jobs.replay",
        "--bootstrap_servers",
        bootstrap,
        "--input_topic",
        topic,
        "--start",
        "earliest",
        "--stop",
        "latest",
        "--out_dir",
        str(out_dir),
        "--png",
        "false",
        "--runner=FnApiRunner",
        *extra,
    ]
    samples: list[Sample] = []
    reading = False
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while child.poll() is None:
                status = proc_status(child.pid)
                if "VmRSS" in status:
                    t = time.perf_counter() - started
                    written = sum(1 for _ in out_dir.glob("scan_*_com.npz")) if out_dir.is_dir() else 0
                    reading = reading or READ_STARTED in log_path.read_bytes()
                    samples.append(Sample(t, status["VmRSS"], status.get("VmHWM", 0), written, reading))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(interval)
        except BaseException:
            child.kill()  # our own child, by its Popen handle
            child.wait()
            raise
        duration = time.perf_counter() - started
    return samples, duration, child.returncode, log_path


def at(samples: list[Sample], t: float) -> Sample:
    """The last sample taken at or before ``t`` (the first one if none)."""
    before = [s for s in samples if s.t <= t]
    return before[-1] if before else samples[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="topic size in GB (default 2; 0.5 is a quick mode)")
    parser.add_argument("--scan", type=int, default=128, help="each scan is SCAN x SCAN positions (default 128)")
    parser.add_argument("--events", type=float, default=500.0, help="mean events per frame (default 500)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=400,
        help="frames per message (default 400: about 0.8 MB at 500 events/frame, under Kafka's 1 MB message limit)",
    )
    parser.add_argument("--partitions", type=int, default=4, help="topic partitions (default 4)")
    parser.add_argument(
        "--partitioner",
        choices=("round-robin", "by-scan"),
        default="round-robin",
        help="FramePublisher's partitioner (default round-robin: every scan spreads over all partitions)",
    )
    parser.add_argument("--interval", type=float, default=0.5, help="RSS sampling interval, s (default 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "replay_args", nargs="*", help="extra arguments for jobs.replay after --, e.g. -- --kafka_config k=v"
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("beamops.io.publish.rdkafka").setLevel(logging.ERROR)  # "coordinator load in progress"
    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()
    print(machine_line())
    print(
        f"apache-beam {version('apache-beam')}, confluent-kafka {version('confluent-kafka')}; "
        "jobs.replay on FnApiRunner in a child process"
    )

    # One scan's batches, simulated once; every scan number reuses them.
    sim = ScanSimulation(
        scan_shape=(args.scan, args.scan), frame_shape=(576, 576), events_per_frame=args.events, seed=args.seed
    )
    batches = list(sim.batches(args.batch_size))
    scan_bytes = sum(len(b.to_bytes()) for b in batches)
    largest = max(len(b.to_bytes()) for b in batches)
    n_scans = max(1, math.ceil(args.gb * 1e9 / scan_bytes))
    topic_bytes = n_scans * scan_bytes
    n_frames = n_scans * sim.n_frames

    broker = start_broker()
    try:
        # --- disk space, before anything is written ---
        where = broker.state_dir
        free = shutil.disk_usage(where).free
        print(
            f"disk: {gb(free)} free on the file system of {where} (the broker's data dir); the topic needs "
            f"{gb(topic_bytes)}, {DISK_FACTOR}x that is {gb(DISK_FACTOR * topic_bytes)}"
        )
        if free < DISK_FACTOR * topic_bytes:
            print(
                f"refusing to run: less than {DISK_FACTOR}x the topic size ({gb(DISK_FACTOR * topic_bytes)}) is free "
                f"on the file system of {where}. Free some space, set TMPDIR to a larger file system, or pass a "
                "smaller --gb.",
                file=sys.stderr,
            )
            return 1

        t0 = time.perf_counter()
        broker.start()
        print(f"broker: Kafka {broker.components.version} on {broker.bootstrap_servers}, started in "
              f"{time.perf_counter() - t0:.1f} s, data {broker.data_dir}")  # fmt: skip
        topic = f"bench-replay-{uuid.uuid4().hex[:8]}"
        topic_config, producer_settings = {}, {}
        if largest > KAFKA_MAX_MESSAGE:
            topic_config["max.message.bytes"] = str(2 * largest)
            producer_settings["message.max.bytes"] = 2 * largest
        broker.create_topic(topic, partitions=args.partitions, config=topic_config)
        client = KafkaClientConfig(broker.bootstrap_servers)

        # --- publish ---
        from beamops.io.publish import FramePublisher

        t0 = last_report = time.perf_counter()
        with FramePublisher(
            client, topic, partitioner=args.partitioner, producer_settings=producer_settings
        ) as publisher:
            for n in range(1, n_scans + 1):
                header = dataclasses.replace(sim.header, scan_number=n)
                for batch in batches:
                    publisher.publish(dataclasses.replace(batch, header=header))
                if time.perf_counter() - last_report > 10:
                    last_report = time.perf_counter()
                    st = publisher.stats()
                    print(f"  publishing: {n}/{n_scans} scans, {gb(st.bytes)}, {st.mb_per_s:.0f} MB/s", flush=True)
        stats = publisher.stats()
        publish_s = time.perf_counter() - t0
        ranges = topic_ranges(client, topic)
        on_disk = sum(f.stat().st_size for f in broker.data_dir.rglob(f"{topic}-*/*") if f.is_file())
        print(
            f"topic: {n_scans} scans of {args.scan}x{args.scan}, 576x576 frames, Poisson {args.events:g} "
            f"events/frame: {n_frames:,} frames in {stats.messages:,} messages of up to {args.batch_size} frames "
            f"({largest / 1e6:.2f} MB max), {gb(stats.bytes)} ({gb(on_disk)} on disk), {args.partitions} partitions "
            f"{args.partitioner} "
            f"({', '.join(f'{p}: {hi - lo}' for p, (lo, hi) in ranges.items())} messages); published in "
            f"{publish_s:.1f} s, {stats.bytes / 1e6 / publish_s:.0f} MB/s, {stats.frames / publish_s:,.0f} frames/s"
        )
        if stats.delivered_messages != stats.messages or sum(hi - lo for lo, hi in ranges.values()) != stats.messages:
            raise AssertionError("not every message reached the topic")

        # --- replay in a child process ---
        with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
            out_dir = Path(tmp, "out")
            samples, duration, code, log_path = run_replay(
                broker.bootstrap_servers, topic, out_dir, args.interval, args.replay_args
            )
            child_log = log_path.read_text(errors="replace")
            if code != 0 or not samples:
                print(child_log[-5000:], file=sys.stderr)
                raise RuntimeError(f"jobs.replay exited with status {code}")

            # --- check the maps ---
            reference = Reducer(emit_every=0)
            for batch in batches:
                assert isinstance(batch, SparseFrameBatch)
                reference.add(batch)
            want = finals(reference.maps)[sim.scan_number]
            files = sorted(out_dir.glob("scan_*_com.npz"))
            if len(files) != n_scans:
                raise AssertionError(f"{len(files)} final maps written for {n_scans} scans")
            for path in files:
                with np.load(path) as got:
                    if not (bool(got["final"]) and bool(got["complete"])) or int(got["frames_seen"]) != sim.n_frames:
                        raise AssertionError(f"{path.name}: not a complete final map of {sim.n_frames} frames")
                    if not (
                        np.array_equal(got["x"], want.x, equal_nan=True)
                        and np.array_equal(got["y"], want.y, equal_nan=True)
                    ):
                        raise AssertionError(f"{path.name}: COM map differs from the no-Kafka computation")
            dead = list(Path(tmp).rglob("dead_letters/*"))
            if dead:
                raise AssertionError(f"{len(dead)} dead letters, e.g. {dead[0]}")
        print(
            f"  verified: {n_scans} complete final maps written, each identical to the no-Kafka computation; "
            "no dead letters"
        )

        # --- report ---
        # Progress by time over the replay proper: from the first sample after the child logged that its Kafka
        # reader started (Python and Beam start-up before that do not depend on the topic) to its exit.
        read_start = next((s.t for s in samples if s.reading), samples[0].t)
        startup = at(samples, read_start)
        replay_s = duration - read_start
        during = [s for s in samples if s.t >= read_start]
        hwm = max(s.hwm_kb for s in samples)
        peak = max(during, key=lambda s: s.rss_kb)
        first_map = next((s.t for s in samples if s.maps_written), None)
        points = [(f"{p}% of the replay", at(samples, read_start + replay_s * p / 100)) for p in (25, 50, 75, 100)]
        rss25 = points[0][1].rss_kb
        rows = [["start-up done (reader started)", startup.t, mb(startup.rss_kb), f"{startup.rss_kb / rss25:.2f}x", 0]]
        rows += [[label, s.t, mb(s.rss_kb), f"{s.rss_kb / rss25:.2f}x", s.maps_written] for label, s in points]
        rows.append(["peak (sampled)", peak.t, mb(peak.rss_kb), f"{peak.rss_kb / rss25:.2f}x", peak.maps_written])
        rows.append(["peak (VmHWM, whole run)", "", mb(hwm), f"{hwm / rss25:.2f}x", ""])
        for p in (25, 50, 75, 100):  # the brief's reading: by time since the child started
            s = at(samples, duration * p / 100)
            rows.append([f"info: {p}% of the whole run", s.t, mb(s.rss_kb), f"{s.rss_kb / rss25:.2f}x", s.maps_written])
        print(
            f"\nreplay: {duration:.1f} s in all for {gb(stats.bytes)} ({stats.bytes / 1e6 / duration:.0f} MB/s, "
            f"{n_frames / duration:,.0f} frames/s, {n_frames / duration / 87_000:.1f}x the 4D Camera's 87,000 "
            f"frames/s); start-up {read_start:.1f} s, replay proper {replay_s:.1f} s "
            f"({stats.bytes / 1e6 / replay_s:.0f} MB/s, {n_frames / replay_s:,.0f} frames/s); first final map "
            f"written after {first_map or float('nan'):.1f} s ({((first_map or 0) - read_start) / replay_s:.0%} "
            f"of the replay); {len(samples)} RSS samples every {args.interval:g} s"
        )
        print(table(["point of the run (by time)", "t s", "RSS MB", "vs 25%", "maps written"], rows))
        top = max(peak.rss_kb, hwm)
        timeline = [at(samples, read_start + replay_s * p / 10) for p in range(11)]
        print(
            "  RSS over the replay, every 10% (MB): "
            + " ".join(f"{mb(s.rss_kb):.0f}" for s in timeline)
            + f"\n  growth from the reader's start to the peak: {mb(top - startup.rss_kb):.0f} MB for "
            f"{gb(stats.bytes)}, {n_frames / 1e6:.2f} M frames ({mb(top - startup.rss_kb) / (stats.bytes / 1e9):.0f} "
            f"MB per GB of topic, {(top - startup.rss_kb) * 1024 / n_frames:.0f} bytes per frame; upper bounds: "
            "it includes librdkafka's prefetch queue and the kernels' code)"
        )
        # com_reduce keeps one ScanAccumulator per open scan: float64 sums of x and y, int64 counts and uint32
        # frame counts per position, plus one bit per frame. On one worker FnApiRunner reads the partitions one
        # after another, so with round-robin partitioning every scan stays open until the last partition is read.
        state = n_scans * (sim.n_positions * 28 + sim.n_frames // 8)
        print(
            f"  com_reduce state if all {n_scans} scans are open at once: {state / 2**20:.0f} MB "
            "(the SDK's state cache and the runner's pickled copy can double it)"
        )
        # RSS swings by tens of MB between samples (message buffers come and go), so the verdict compares the
        # peak of the whole replay with the peak of its first quarter; the single 25% sample is printed too.
        early = max(s.rss_kb for s in during if s.t <= read_start + replay_s / 4)
        ratio = top / early
        verdict = "PASS" if ratio <= FLAT else "FAIL"
        print(
            f"  memory stays flat: peak {mb(top):.0f} MB = {ratio:.2f}x the peak of the first 25% of the replay "
            f"({mb(early):.0f} MB), {top / rss25:.2f}x the RSS sampled at 25% (target <= {FLAT}x)  {verdict}"
        )

        # --- clean up the topic ---
        t0 = time.perf_counter()
        broker.delete_topic(topic)
        print(f"  topic {topic} deleted in {time.perf_counter() - t0:.1f} s")
    finally:
        broker.stop()
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s (broker stopped, its temp dir removed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
