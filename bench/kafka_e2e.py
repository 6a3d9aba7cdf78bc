"""Kafka -> COM map end to end on FnApiRunner vs a bare confluent-kafka consume loop, same topic.

    python -m bench.kafka_e2e            # two topics of 1000-frame messages, 16 scans of 256x256 each:
                                         # Poisson 50 events/frame (0.2 MB messages, 227 MB) and
                                         # Poisson 500 (1.9 MB messages, 2.1 GB)
    python -m bench.kafka_e2e --quick    # 4 scans of each, half as wide, 3 runs per case (< 2 minutes)
    python -m bench.kafka_e2e --events 50 --batch-size 4000   # one topic, other sizes

DESIGN.md's reference batch is 2 MB (1000 frames of about 500 events). Its
topic is 2.1 GB, the size of a replay (bench.replay_memory reads as much),
so the wall time weighs the pipeline's fixed start-up (about 0.11 s, Beam's
mostly) against a read as long as a replay's, not a 0.2 s one. The 0.2 MB
messages show how the ratio falls when the per-message costs weigh ten
times more against the bytes.

The benchmark starts its own broker (``KafkaBroker(ephemeral=True)``, a free
127.0.0.1 port, full JIT: ``quick_start=False``) and stops it at the end. It
publishes simulated scans (``ScanSimulation``, 576x576 frames) with
``FramePublisher`` round robin over 4 partitions, then measures, taking turns
(round robin) so that a noisy neighbour slows every case alike:

* **bare consume**: one confluent-kafka ``Consumer`` with the reader's own
  settings (``beamops.io.kafka.consumer_settings``) and all partitions
  assigned at their first offset (like read_kafka_frames, concrete offsets from
  ``get_watermark_offsets``), ``consume()`` in batches of up to 64 messages and
  16 MiB until every partition reaches its end (a batch larger than
  librdkafka's 64 MiB local queue would wait for its timeout on every call);
  each value is copied out of librdkafka (``msg.value()``) and one byte per
  64-byte cache line is read.
  Timed from creating the consumer to the last message (wall), and from
  ``assign()``, when fetching starts, to the last message (steady; not from the
  first message: by then librdkafka has prefetched a good part of a small topic).
* **bare poll, one partition at a time**: ``poll()`` one message at a
  time, one consumer per partition in turn: read_kafka_frames' access pattern.
  Which bare loop is faster depends on the message size and the day, so the
  faster one (by median) is the reference every ratio is taken against: the
  raw consume rate of the topic.
* **bare consume + decode + COM, no Beam** (info): the bare consume loop plus
  ``decode_batch`` -> ``com_partial().process`` -> ``ScanAccumulator``, i.e. what
  one Python thread can do at best; and **decode + COM only** (info), the same
  work over the messages held in memory, no Kafka at all, each message decoded
  as soon as a copy of it is made (only the work is timed, not the copy): in a
  pipeline, poll() has just copied it out of librdkafka. **The same, while
  another process reads the topic** (info): decode + COM only again, timed
  while a child process runs the bare poll loop over the topic, pass after
  pass. End to end, the broker and librdkafka keep the machine's other core
  busy; on a 2-core machine that slows the Python thread's own work too.
* **single-thread budget**: 70% of the reference (assign -> last msg) allows
  reference / 0.7. One Python thread has to take every message out of
  librdkafka (the CPU time the reference loop's own thread spends from
  ``assign()`` to its last message, ``time.thread_time()``; librdkafka fetches
  in its own threads, which may overlap) and decode, COM and reduce it (decode +
  COM only, while another process reads). What is left of the allowance is
  what the framework, the shuffle and the state may cost; the line also says
  how much the end-to-end run (first in -> last out) spent over those two. Nothing left means no
  one-thread pipeline can reach the target at that message size.
* **end to end**: ``read_kafka_frames`` (earliest..latest, no group: jobs.replay
  semantics) | ``com_partial()`` | ``com_reduce()`` on ``--runner=FnApiRunner``,
  maps collected in this process (FnApiRunner runs the SDK worker in-process).
  Reported as: wall (building the pipeline to ``wait_until_finish()``); wall
  minus the wall of the same pipeline over an empty 4-partition topic (best
  minus best, median minus median);
  first in -> last out (from the first batch leaving the Kafka read to the last
  map leaving com_reduce, in-process probes). The walls time the job's own
  chain; first in -> last out comes from runs of their own (taking turns with
  the others) with one more step, a Map after the read that notes the first
  batch: that step costs every message, so it stays out of the timed walls.
* **the read alone** (info): ``read_kafka_frames`` by itself, its decoded
  batches counted and dropped: what any pipeline reading with it can reach at
  best (wall, and first in -> last batch out).
* **end to end, 2 threads** (info): the same pipeline with
  ``--direct_num_workers=2 --direct_running_mode=multi_threading`` (FnApiRunner
  splits each stage's input between two in-process workers, so two partitions
  are read at once).

Before timing, the final COM map of every scan from each end-to-end variant
and from the bare consume + compute loop must equal (bit for bit) the same
computation on the published batches without Kafka, and the bare loop must
receive exactly the published bytes. After timing, one end-to-end run runs
under cProfile and the benchmark prints where its time goes.

Target (DESIGN.md section 7): Kafka -> COM map end to end keeps >= 70% of the
raw confluent-kafka consume throughput on the same topic; frames/s are shown
next to the 4D Camera's 87,000 frames/s.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import logging
import math
import multiprocessing
import pstats
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np

from beamops.frames import SparseFrameBatch, decode_batch
from beamops.io.kafka_config import KafkaClientConfig
from beamops.results import ComMap
from beamops.simulate import ScanSimulation
from bench import _probe
from bench._common import Derived, Timing, machine_line, measure_interleaved, robust_line, table
from transforms.com_partial import com_partial
from transforms.com_reduce import ScanAccumulator

TARGET = 0.70
CAMERA_HZ = 87_000
DEFAULT_SCAN = 256
BATCH_BYTES = 16 << 20  # what one consume() call of the bare loop asks for, at most
THREADS = ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]


# --- broker and topic ----------------------------------------------------------------------------


def start_broker(progress: Callable[[str], None] | None = None) -> Any:
    """Our own broker on a free 127.0.0.1 port, with full JIT; the caller stops it."""
    from beamops.services.kafka_broker import KafkaBroker

    return KafkaBroker(ephemeral=True, quick_start=False, progress=progress)


def consumer_settings(client: KafkaClientConfig) -> dict[str, Any]:
    """The settings read_kafka_frames gives its consumers (with a throw-away group)."""
    from beamops.io.kafka import consumer_settings as reader_settings

    return reader_settings(client, f"bench-{uuid.uuid4().hex}")


def topic_ranges(client: KafkaClientConfig, topic: str) -> dict[int, tuple[int, int]]:
    """partition -> (low, high) offsets."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(consumer_settings(client))
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30) for p in partitions}
    finally:
        consumer.close()


def simulations(scans: int, scan: int, events: float, seed: int, first: int = 1) -> list[ScanSimulation]:
    return [
        ScanSimulation(
            scan_shape=(scan, scan), frame_shape=(576, 576), events_per_frame=events, seed=seed, scan_number=first + s
        )
        for s in range(scans)
    ]


# --- the no-Kafka reference ----------------------------------------------------------------------


class Reducer:
    """What com_partial -> com_reduce computes, without Beam: final (and progressive) maps per scan."""

    def __init__(self, emit_every: int) -> None:
        self.op = com_partial()
        self.emit_every = emit_every
        self.open: dict[int, ScanAccumulator] = {}
        self.maps: list[ComMap] = []

    def add(self, batch: SparseFrameBatch) -> None:
        partial = self.op.process(batch)
        scan = partial.header.scan_number
        acc = self.open.get(scan) or ScanAccumulator.empty(partial.header, self.emit_every)
        acc.add(partial)
        if acc.complete:
            self.open.pop(scan, None)
            self.maps.append(acc.com_map(final=True, replace_nans=False))
            return
        if self.emit_every and acc.frames_seen >= acc.next_emit:
            acc.next_emit = (acc.frames_seen // self.emit_every + 1) * self.emit_every
            self.maps.append(acc.com_map(final=False, replace_nans=False))
        self.open[scan] = acc


def finals(maps: list[ComMap]) -> dict[int, ComMap]:
    out = {m.scan_number: m for m in maps if m.final}
    if len(out) != sum(m.final for m in maps):
        raise AssertionError("more than one final map for a scan")
    return out


def check_same(got_maps: list[ComMap], want: Mapping[int, ComMap], what: str) -> str:
    got = finals(got_maps)
    if set(got) != set(want):
        raise AssertionError(f"{what}: final maps for scans {sorted(got)}, expected {sorted(want)}")
    for scan, m in want.items():
        g = got[scan]
        if not (g.complete and m.complete and g.frames_seen == m.frames_seen):
            raise AssertionError(f"{what}: scan {scan} final map incomplete, or frame counts differ")
        for axis in ("x", "y"):
            if not np.array_equal(getattr(g, axis), getattr(m, axis), equal_nan=True):
                diff = np.nanmax(np.abs(getattr(g, axis) - getattr(m, axis)))
                raise AssertionError(f"{what}: scan {scan} COM {axis} differs from the no-Kafka maps (max {diff:g} px)")
    return f"final COM maps of {len(want)} scans identical to the no-Kafka computation, {len(got_maps)} maps in all"


# --- bare consumer loops -------------------------------------------------------------------------


@dataclass
class ConsumeRun:
    wall: float  # creating the consumer -> last message
    steady: float  # assign() (the first fetch starts) -> last message
    thread_cpu: float  # CPU time of the calling thread over ``steady``
    messages: int
    bytes: int


def bare_consume(
    client: KafkaClientConfig,
    topic: str,
    *,
    one_partition_at_a_time: bool = False,
    on_value: Callable[[int, int, bytes], None] | None = None,
    batch: int = 64,
    stops: Mapping[int, int] | None = None,
) -> ConsumeRun:
    """Read the topic from earliest to ``stops`` (partition -> offset; default latest); see the module docstring.

    Messages a fetch brings beyond a partition's stop are dropped unread.
    """
    from confluent_kafka import Consumer, TopicPartition

    started = time.perf_counter()
    assigned = last = None
    cpu_at_assign = 0.0
    n = n_bytes = 0
    consumer = Consumer(consumer_settings(client))
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=30).topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=30) for p in partitions}
        if stops is not None:
            ends = {p: (lo, min(hi, stops.get(p, lo))) for p, (lo, hi) in ends.items()}
        groups = [[p] for p in partitions] if one_partition_at_a_time else [partitions]
        for i, group in enumerate(groups):
            if i:
                consumer.close()
                consumer = Consumer(consumer_settings(client))
            if assigned is None:
                assigned, cpu_at_assign = time.perf_counter(), time.thread_time()
            consumer.assign([TopicPartition(topic, p, ends[p][0]) for p in group])
            left = sum(ends[p][1] - ends[p][0] for p in group)
            while left > 0:
                if one_partition_at_a_time:
                    msg = consumer.poll(0.5)
                    msgs = [] if msg is None else [msg]
                else:
                    msgs = consumer.consume(min(batch, left), 0.5)
                    if msgs:  # ask for no more than about BATCH_BYTES at once (see the module docstring)
                        mean = sum(len(m.value() or b"") for m in msgs) / len(msgs)
                        batch = max(1, min(batch, int(BATCH_BYTES // max(mean, 1.0))))
                for msg in msgs:
                    if msg.error() is not None or msg.offset() >= ends[msg.partition()][1]:
                        continue  # end of a partition, or beyond its stop
                    value = msg.value()
                    np.frombuffer(value, np.uint8)[::64].sum()  # touch every cache line
                    if on_value is not None:
                        on_value(msg.partition(), msg.offset(), value)
                    n += 1
                    n_bytes += len(value)
                    left -= 1
        last, cpu_at_last = time.perf_counter(), time.thread_time()
    finally:
        consumer.close()
    if not n or assigned is None or last is None:
        raise AssertionError(f"topic {topic!r} is empty")
    return ConsumeRun(last - started, last - assigned, cpu_at_last - cpu_at_assign, n, n_bytes)


def consume_and_reduce(client: KafkaClientConfig, topic: str, emit_every: int) -> tuple[ConsumeRun, list[ComMap]]:
    reducer = Reducer(emit_every)

    def on_value(_p: int, _o: int, value: bytes) -> None:
        batch = decode_batch(value)
        assert isinstance(batch, SparseFrameBatch)
        reducer.add(batch)

    run = bare_consume(client, topic, on_value=on_value)
    return run, reducer.maps


def compute_only(messages: list[bytes], emit_every: int) -> tuple[list[ComMap], float]:
    """decode + COM + reduce over messages held in memory, no Kafka, no Beam: (maps, seconds of that work).

    Each message is decoded as soon as a copy of it is made, and the copy is not timed: the state poll()
    leaves a message in, just copied out of librdkafka. Read where they lie instead, 2 MB messages come
    from DRAM and take 1.2-1.5x as long."""
    reducer = Reducer(emit_every)
    spent = 0.0
    for m in messages:
        data = bytes(memoryview(m))
        started = time.perf_counter()
        batch = decode_batch(data)
        assert isinstance(batch, SparseFrameBatch)
        reducer.add(batch)
        spent += time.perf_counter() - started
    return reducer.maps, spent


def _keep_reading(bootstrap: str, topic: str, go: Any, busy: Any, idle: Any, stop: Any) -> None:
    """In a child process: read ``topic`` with the bare poll loop, pass after pass, while ``go`` is set."""
    client = KafkaClientConfig(bootstrap)
    while not stop.is_set():
        if not go.wait(0.1):
            continue
        busy.set()
        while go.is_set():
            bare_consume(client, topic, one_partition_at_a_time=True)
        busy.clear()
        idle.set()


class BusyReader:
    """A child process that reads the topic with the bare poll loop on request: the broker and
    librdkafka then keep the machine's other core busy, as they do while a pipeline reads."""

    def __init__(self, client: KafkaClientConfig, topic: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._go, self._busy, self._idle, self._stop = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
        self._process = ctx.Process(
            target=_keep_reading,
            args=(client.bootstrap_servers, topic, self._go, self._busy, self._idle, self._stop),
            daemon=True,
        )
        self._process.start()

    def meanwhile(self, fn: Callable[[], float]) -> float:
        """``fn()`` (a time it measures itself) run while the child reads."""
        self._idle.clear()
        self._go.set()
        self._wait(self._busy, "start reading")
        time.sleep(0.05)  # its consumer is fetching by now
        measured = fn()
        self._go.clear()
        self._wait(self._idle, "finish its pass")  # the next case runs on a quiet machine
        return measured

    def _wait(self, event: Any, what: str) -> None:
        deadline = time.monotonic() + 120
        while not event.wait(1):
            if not self._process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the busy reader (exit code {self._process.exitcode}) did not {what}")

    def close(self) -> None:
        self._stop.set()
        self._go.clear()
        self._process.join(30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)


# --- the Beam pipeline ---------------------------------------------------------------------------


@dataclass
class BeamRun:
    wall: float
    span: float | None  # first batch out of the read -> last map out of com_reduce (last batch: read only)
    to_first: float | None  # pipeline construction -> first batch out of the read
    maps: list[ComMap]  # read only: none
    frames: int  # frames out of the read (read only), or in the final maps


def run_pipeline(
    client: KafkaClientConfig,
    topic: str,
    emit_every: int,
    beam_args: Sequence[str] = (),
    stop: str = "latest",
    read_only: bool = False,
    probed: bool = True,
) -> BeamRun:
    """read_kafka_frames (earliest..``stop``, no group) | com_partial | com_reduce on FnApiRunner.

    ``read_only``: the read alone (decoded batches counted and dropped), the ceiling of any pipeline
    that reads with it. ``probed``: a Map after the read notes when the first batch leaves it (the
    run's ``span`` and ``to_first``); without it (``span`` None) the pipeline is the job's own chain,
    as the end-to-end walls time it: the probe is one more step per message.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beamops.io.kafka import read_kafka_frames
    from transforms.com_reduce import com_reduce

    key = uuid.uuid4().hex
    started = time.perf_counter()
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner", *beam_args]))
    read = pipeline | read_kafka_frames({"topic": topic, "start": "earliest", "stop": stop}, client=client)
    batches = read.frames
    if probed:
        batches = batches | "StampFirst" >> beam.Map(_probe.stamp_first, key).with_output_types(SparseFrameBatch)
    dead = [read.dead_letter]
    if read_only:
        batches | "Tally" >> beam.Map(_probe.tally, key)
    else:
        out = batches | com_partial() | com_reduce(emit_every=emit_every)
        out.com_map | "Collect" >> beam.Map(_probe.collect, key)
        dead.append(out.dead_letter)
    dead | "AllDead" >> beam.Flatten() | "CollectDead" >> beam.Map(_probe.collect, key + "-dead")
    pipeline.run().wait_until_finish()
    wall = time.perf_counter() - started
    collected, first, last = _probe.pop(key)
    letters, _, _ = _probe.pop(key + "-dead")
    if letters:
        raise AssertionError(f"{len(letters)} dead letters, e.g. {letters[0]}")
    span = None if first is None or last is None else last - first
    maps = [] if read_only else collected
    frames = sum(collected) if read_only else sum(m.frames_seen for m in maps if m.final)
    return BeamRun(wall, span, None if first is None else first - started, maps, frames)


# --- profile -------------------------------------------------------------------------------------


# (label, which functions: pstats key (file, line, function) -> "tot" (own time), "cum" (with callees) or None).
# The parts do not overlap: none of them calls another.
def _is(function: str, file: str, how: str) -> Callable[[tuple[str, int, str]], str | None]:
    return lambda k: how if k[2] == function and k[0].endswith(file) else None


def _c_method(name: str) -> Callable[[tuple[str, int, str]], str | None]:
    return lambda k: "tot" if k[2] == f"<method '{name}' of 'cimpl.Consumer' objects>" else None


def _any(*parts: Callable[[tuple[str, int, str]], str | None]) -> Callable[[tuple[str, int, str]], str | None]:
    return lambda k: next((how for how in (p(k) for p in parts) if how), None)


_PROFILE_PARTS: list[tuple[str, Callable[[tuple[str, int, str]], str | None]]] = [
    ("Kafka: Consumer.poll (waits for fetches, copies the message)", _c_method("poll")),
    ("Kafka: get_watermark_offsets (partition ends; lag gauge)", _c_method("get_watermark_offsets")),
    (
        "Kafka: consumer creation, list_topics, close",
        _any(_is("_consumer", "beamops/io/kafka.py", "cum"), _c_method("list_topics"), _c_method("close")),
    ),
    ("decode_batch (Arrow IPC -> SparseFrameBatch)", _is("decode_batch", "beamops/frames.py", "cum")),
    ("com_partial (COM kernel)", _is("com_partial", "transforms/com_partial.py", "cum")),
    (
        "com_reduce: ScanAccumulator.add and .com_map",
        _any(_is("add", "transforms/com_reduce.py", "cum"), _is("com_map", "transforms/com_reduce.py", "cum")),
    ),
    ("Beam: state cache weighing (statecache.get_deep_size)", _is("get_deep_size", "worker/statecache.py", "cum")),
    ("Beam: DoFn signature inspection (get_dofn_specs)", _is("get_dofn_specs", "transforms/userstate.py", "cum")),
    ("Beam: PipelineOptions.view_as (argparse)", _is("view_as", "options/pipeline_options.py", "cum")),
    ("threads: lock waits (worker threads, joins)", lambda k: "tot" if "'acquire' of '_thread.lock'" in k[2] else None),
]


def profile_pipeline(client: KafkaClientConfig, topic: str, emit_every: int) -> tuple[BeamRun, list[list[Any]]]:
    """One pipeline run under cProfile (main thread, where FnApiRunner runs the bundles): where its time goes."""
    profiler = cProfile.Profile()
    profiler.enable()
    run = run_pipeline(client, topic, emit_every)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = max(ct for (_cc, _nc, _tt, ct, _callers) in stats.values())
    rows, accounted = [], 0.0
    for label, match in _PROFILE_PARTS:
        calls = seconds = 0.0
        for key, (_cc, nc, tt, ct, _callers) in stats.items():
            how = match(key)
            if how:
                calls += nc
                seconds += ct if how == "cum" else tt
        accounted += seconds
        rows.append([label, int(calls), seconds, f"{seconds / total:.0%}"])
    rows.append(
        [
            "everything else (Beam runner, SDF, coders, pipeline build)",
            "",
            total - accounted,
            f"{(total - accounted) / total:.0%}",
        ]
    )
    rows.append(["total (profiled)", "", total, "100%"])
    return run, rows


# --- main ----------------------------------------------------------------------------------------


def steady_state(
    args: argparse.Namespace,
    client: KafkaClientConfig,
    topic: str,
    ranges: Mapping[int, tuple[int, int]],
    frames_per_byte: float,
) -> tuple[str, list[str]]:
    """Wall time against the amount read, over reads up to a quarter, half, three quarters and all of
    every partition; the slope (Theil-Sen) is the steady-state cost per byte, every fixed cost is in the
    intercept. Returns the printout and its target lines."""
    fractions = (0.25, 0.5, 0.75, 1.0)
    stops = {f: {p: lo + round(f * (hi - lo)) for p, (lo, hi) in ranges.items()} for f in fractions}
    cases = {"bare consume": "bare", "bare poll, 1 partition at a time": "poll", "end to end": "e2e"}
    points: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}  # (bytes read, wall s)
    for _ in range(args.repeat):
        for f in fractions:
            for name, kind in cases.items():
                gc.collect()
                if kind != "e2e":
                    run = bare_consume(client, topic, stops=stops[f], one_partition_at_a_time=kind == "poll")
                    points[name].append((run.bytes, run.wall))
                    continue
                stop = "offset:" + ",".join(f"{p}={o}" for p, o in stops[f].items())
                beam_run = run_pipeline(client, topic, args.emit_every, stop=stop, probed=False)
                read = sum(m.frames_seen for m in beam_run.maps if m.final) / frames_per_byte
                points[name].append((read, beam_run.wall))
    fits = {name: robust_line(*zip(*pts, strict=True)) for name, pts in points.items()}
    rows, lines = [], []
    for name, (per_byte, fixed) in fits.items():
        mb_s, ref = 1e-6 / per_byte, min(fits["bare consume"][0], fits["bare poll, 1 partition at a time"][0])
        rows.append([name, fixed, mb_s, mb_s * 1e6 * frames_per_byte / 1e3, f"{ref / per_byte:.0%}"])
        if name.startswith("end to end"):
            verdict = "PASS" if ref / per_byte >= TARGET else "FAIL"
            ratio = f"{ref / per_byte:.0%} {verdict}"
            lines.append(f"  {name}: steady state / the faster bare loop (target >= {TARGET:.0%}): {ratio}")
    head = (
        f"\nsteady state: wall time against the amount read (earliest to 25/50/75/100% of every partition, "
        f"{args.repeat} rounds taking turns), slope fitted by Theil-Sen; the intercept holds every fixed cost "
        "(pipeline start-up, consumer creation, metadata)"
    )
    table_ = table(["case", "fixed s", "MB/s", "kframe/s", "vs faster bare loop"], rows)
    return "\n".join([head, table_, *lines]), lines


def single_thread_budget(
    reference: Timing, reference_cpu: Timing, compute: Timing, compute_busy: Timing, span: Timing, messages: int
) -> str:
    """How the target's time splits for a one-thread pipeline (medians); see the module docstring."""
    allowed = reference.median / TARGET
    floor = reference_cpu.median + compute_busy.median
    left, extra = allowed - floor, span.median - floor

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.0f} ms ({seconds / messages * 1e6:.0f} us/message)"

    verdict = (
        f"leaving {ms(left)} for everything else (framework, shuffle, state)"
        if left > 0
        else "more than that already: no one-thread pipeline can reach the target at this message size"
    )
    return (
        f"  single-thread budget: {TARGET:.0%} of the reference allows {ms(allowed)}; one thread must spend "
        f"{ms(reference_cpu.median)} taking the messages out of librdkafka (the reference's own CPU) and "
        f"{ms(compute_busy.median)} decoding, COM and reducing them, each just copied, while the broker serves "
        f"a reader (as it does end to end; {ms(compute.median)} on a quiet machine), {verdict}; "
        f"end to end, first in -> last out, spent {ms(extra)} over those two"
    )


def publish(
    client: KafkaClientConfig,
    topic: str,
    sims: list[ScanSimulation],
    batch_size: int,
    partitioner: str = "round-robin",
) -> tuple[list[bytes], Any]:
    """Publish every scan's batches; return the encoded messages (publish order) and the publisher's stats."""
    from beamops.io.publish import FramePublisher

    messages = []
    with FramePublisher(client, topic, partitioner=partitioner) as publisher:
        for sim in sims:
            for batch in sim.batches(batch_size):
                messages.append(batch.to_bytes())
                publisher.publish(batch)
    return messages, publisher.stats()


def digests(values: Iterator[bytes]) -> list[bytes]:
    return sorted(hashlib.blake2b(v, digest_size=16).digest() for v in values)


def measure_topic(args: argparse.Namespace, broker: Any, plain: KafkaClientConfig, events: float) -> list[str]:
    """Publish one topic of ``events`` per frame, check, time and print; return its target lines."""
    scan = args.scan or DEFAULT_SCAN // (2 if args.quick else 1)
    print(f"\n=== Poisson {events:g} events/frame ===")
    topic, empty_topic = f"bench-frames-{uuid.uuid4().hex[:8]}", f"bench-empty-{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic, partitions=args.partitions)
    broker.create_topic(empty_topic, partitions=args.partitions)

    sims = simulations(args.scans, scan, events, args.seed)
    t0 = time.perf_counter()
    messages, pub = publish(plain, topic, sims, args.batch_size, args.partitioner)
    n_frames, n_bytes = sum(s.n_frames for s in sims), sum(map(len, messages))
    ranges = topic_ranges(plain, topic)
    print(
        f"topic: {args.scans} scans of {scan}x{scan}, 576x576 frames, Poisson {events:g} "
        f"events/frame: {n_frames} frames in {len(messages)} messages of {args.batch_size} frames, "
        f"{n_bytes / 1e6:.1f} MB, {args.partitions} partitions {args.partitioner} "
        f"({', '.join(f'{p}: {hi - lo}' for p, (lo, hi) in ranges.items())} messages); "
        f"generated and published in {time.perf_counter() - t0:.1f} s (publisher: {pub.mb_per_s:.0f} MB/s)"
    )

    # --- correctness, before any timing ---
    want = finals(compute_only(messages, args.emit_every)[0])
    got: list[bytes] = []
    bare_consume(plain, topic, on_value=lambda _p, _o, v: got.append(v))
    if len(got) != len(messages) or digests(iter(got)) != digests(iter(messages)):
        raise AssertionError("the bare consumer did not receive exactly the published messages")
    got.clear()
    print(f"  verified bare consume: the {len(messages)} published messages, byte for byte")
    _, maps = consume_and_reduce(plain, topic, args.emit_every)
    print(f"  verified bare consume + decode + COM: {check_same(maps, want, 'bare consume + COM')}")
    variants = {  # name: Beam arguments
        "end to end": [],
        "end to end, 2 threads": THREADS,
    }
    for name, beam_args in variants.items():
        beam_run = run_pipeline(plain, topic, args.emit_every, beam_args)
        print(f"  verified {name} (FnApiRunner): {check_same(beam_run.maps, want, name)}")
    read_alone = run_pipeline(plain, topic, args.emit_every, read_only=True)
    if read_alone.frames != n_frames:
        raise AssertionError(f"the read alone gave {read_alone.frames} frames, {n_frames} were published")
    print(f"  verified the read alone (FnApiRunner): all {n_frames} frames decoded")

    # --- timing, round robin ---
    spans: dict[str, list[float]] = {
        k: [] for k in ("bare", "poll", "compute only", "compute busy", "read only", *variants)
    }
    thread_cpu: dict[str, list[float]] = {"bare": [], "poll": []}

    def bare(key: str, one_partition_at_a_time: bool) -> Callable[[], None]:
        def run() -> None:
            consumed = bare_consume(plain, topic, one_partition_at_a_time=one_partition_at_a_time)
            spans[key].append(consumed.steady)
            thread_cpu[key].append(consumed.thread_cpu)

        return run

    def e2e(name: str) -> Callable[[], None]:
        return lambda: run_pipeline(plain, topic, args.emit_every, variants[name], probed=False)

    def e2e_probed(name: str) -> Callable[[], None]:
        return lambda: spans[name].append(run_pipeline(plain, topic, args.emit_every, variants[name]).span or math.nan)

    cases = {
        "bare": bare("bare", False),
        "poll": bare("poll", True),
        "compute": lambda: consume_and_reduce(plain, topic, args.emit_every),
        "compute only": lambda: spans["compute only"].append(compute_only(messages, args.emit_every)[1]),
        "compute busy": lambda: spans["compute busy"].append(
            busy.meanwhile(lambda: compute_only(messages, args.emit_every)[1])
        ),
        "empty": lambda: run_pipeline(plain, empty_topic, args.emit_every, probed=False),
        "read only": lambda: spans["read only"].append(
            run_pipeline(plain, topic, args.emit_every, read_only=True).span or math.nan
        ),
        **{name: e2e(name) for name in variants},
        **{f"{name}, probed": e2e_probed(name) for name in variants},
    }
    busy = BusyReader(plain, topic)
    try:
        t = dict(zip(cases, measure_interleaved(list(cases.values()), [args.repeat] * len(cases)), strict=True))
    finally:
        busy.close()
    span = {k: Timing(tuple(v[1:])) for k, v in spans.items()}  # without the warm-up run
    cpu = {k: Timing(tuple(v[1:])) for k, v in thread_cpu.items()}

    def minus_empty(x: Timing) -> Derived:
        """best - the empty pipeline's best, median - its median."""
        return Derived(max(x.best - t["empty"].best, 1e-9), max(x.median - t["empty"].median, 1e-9))

    mb = n_bytes / 1e6
    rows, lines = [], []

    def row(name: str, x: Timing | Derived, ref: Timing | None) -> None:
        if ref is None:
            rows.append([name, "", x.best, x.median, "", "", "", "", "", ""])
            return
        fb, fm = n_frames / x.best, n_frames / x.median
        rb, rm = n_frames / ref.best, n_frames / ref.median
        ratio_b, ratio_m = fb / rb, fm / rm
        rates = [fb / 1e3, fm / 1e3, mb / x.best, mb / x.median]
        rows.append([name, n_frames, x.best, x.median, *rates, f"{ratio_b:.0%}", f"{ratio_m:.0%}"])
        if name.startswith("end to end"):
            verdicts = [
                f"{which} {r:.0%} {'PASS' if r >= TARGET else 'FAIL'}"
                for which, r in (("best", ratio_b), ("median", ratio_m))
            ]
            lines.append(f"  {name} / bare (target >= {TARGET:.0%}): {', '.join(verdicts)}")

    # The reference is the faster bare loop (by median wall): the raw rate of this topic.
    ref = min(("bare", "poll"), key=lambda k: t[k].median)
    for key, label in (("bare", "bare consume"), ("poll", "bare poll, 1 partition at a time")):
        mark = " (reference)" if key == ref else ""
        row(f"{label}{mark}: wall", t[key], t[ref])
        row(f"{label}{mark}: assign -> last msg", span[key], span[ref])
    row("info: bare consume + decode + COM: wall", t["compute"], t[ref])
    row("info: decode + COM only, each message just copied", span["compute only"], t[ref])
    row("info: the same, while another process reads the topic", span["compute busy"], t[ref])
    row("empty topic: same pipeline, wall", t["empty"], None)
    row("info: the read alone (read_kafka_frames): wall", t["read only"], t[ref])
    row("info: the read alone: first in -> last out", span["read only"], span[ref])
    for name in variants:
        label = name if name == "end to end" else f"info: {name}"
        row(f"{label}: wall", t[name], t[ref])
        row(f"{label}: wall - empty", minus_empty(t[name]), t[ref])
        row(f"{label}: first in -> last out", span[name], span[ref])

    headers = [
        "case",
        "frames",
        "best s",
        "median s",
        "kframe/s best",
        "kframe/s med",
        "MB/s best",
        "MB/s med",
        "vs bare best",
        "vs bare med",
    ]
    print(
        f"\ntimes: best and median of {args.repeat} runs per case, taking turns. 'vs bare': walls against the "
        "wall of the faster bare loop (the reference), first in -> last out against its assign -> last msg; "
        "every loop reads with the reader's consumer settings"
    )
    print(table(headers, rows))
    print("\n".join(lines))
    rate = {
        "bare (reference) wall": n_frames / t[ref].median,
        "end to end wall": n_frames / t["end to end"].median,
        "wall - empty": n_frames / minus_empty(t["end to end"]).median,
        "first in -> last out": n_frames / span["end to end"].median,
    }
    budget = single_thread_budget(
        span[ref], cpu[ref], span["compute only"], span["compute busy"], span["end to end"], len(messages)
    )
    print(budget)
    lines.append(budget)
    print(
        "  frames/s (median) vs the 4D Camera's 87,000 frames/s: "
        + "; ".join(f"{k} {v:,.0f} ({v / CAMERA_HZ:.1f}x)" for k, v in rate.items())
    )

    if args.quick:
        print("\nsteady state: skipped with --quick (the topic is too small for a slope)")
    else:
        steady_text, steady_lines = steady_state(args, plain, topic, ranges, n_frames / n_bytes)
        print(steady_text)
        lines += steady_lines

    if not args.no_profile:
        for name in ("end to end",):
            run_p, prows = profile_pipeline(plain, topic, args.emit_every)
            head = (
                f"\nwhere the time goes: one {name} run under cProfile (wall {run_p.wall:.2f} s: "
                f"start -> first batch out of the read {run_p.to_first or 0:.2f} s, "
                f"first in -> last out {run_p.span or 0:.2f} s, "
                f"then {run_p.wall - (run_p.to_first or 0) - (run_p.span or 0):.2f} s to the end)"
            )
            print(head)
            print(table(["part", "calls", "s", "% of total"], prows))
    return [f"{events:g} events/frame ({n_bytes / len(messages) / 1e6:.2f} MB messages):", *lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 scans, half as wide, 3 runs per case (< 2 minutes)")
    parser.add_argument(
        "--scan",
        type=int,
        default=None,
        help=f"each scan is SCAN x SCAN positions (default {DEFAULT_SCAN}, {DEFAULT_SCAN // 2} with --quick)",
    )
    parser.add_argument("--scans", type=int, default=None, help="number of scans (default 16, quick 4)")
    parser.add_argument(
        "--events",
        type=float,
        nargs="+",
        default=[50.0, 500.0],
        help="mean events per frame, one topic each (default 50 and 500: 1000-frame messages of about 0.2 and 2 MB)",
    )
    parser.add_argument("--batch-size", type=int, default=1000, help="frames per message (default 1000)")
    parser.add_argument("--partitions", type=int, default=4, help="topic partitions (default 4)")
    parser.add_argument(
        "--partitioner",
        choices=("round-robin", "by-scan"),
        default="round-robin",
        help="FramePublisher's partitioner (default round-robin: every scan spreads over all partitions)",
    )
    parser.add_argument("--emit-every", type=int, default=10_000, help="com_reduce emit_every (library default)")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per case (default 5, quick 3)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile breakdown")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    args.scans = args.scans or (4 if quick else 16)
    args.repeat = args.repeat or (3 if quick else 5)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    logging.getLogger("transforms").setLevel(logging.ERROR)
    logging.getLogger("beamops.io.publish.rdkafka").setLevel(logging.ERROR)  # "coordinator load in progress"
    warnings.filterwarnings("ignore")
    t_start = time.perf_counter()

    import confluent_kafka

    print(machine_line())
    print(
        f"apache-beam {version('apache-beam')}, confluent-kafka {version('confluent-kafka')} "
        f"(librdkafka {confluent_kafka.libversion()[0]}); FnApiRunner (in-process, 1 worker)"
    )
    broker = start_broker()
    try:
        t0 = time.perf_counter()
        broker.start()
        print(f"broker: Kafka {broker.components.version} on {broker.bootstrap_servers}, started in "
              f"{time.perf_counter() - t0:.1f} s (ephemeral, full JIT), data {broker.data_dir}")  # fmt: skip
        plain = KafkaClientConfig(broker.bootstrap_servers)
        summary = [line for events in args.events for line in measure_topic(args, broker, plain, events)]
        print("\nsummary (target: >= 70% of the faster bare loop):")
        print("\n".join(summary))
    finally:
        broker.stop()
    print(f"\ndone in {time.perf_counter() - t_start:.0f} s (broker stopped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
