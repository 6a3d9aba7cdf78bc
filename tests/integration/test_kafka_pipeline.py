"""The COM pipeline on a real Kafka broker (the session's ``kafka_broker``), run on Beam's FnApiRunner.

Every result is checked against a ground truth computed without Kafka: ``run_operator`` over the same
simulated batches (com_partial | com_reduce), whose sums are exact, so the maps must agree bit for bit
whatever the partitioning or the order of delivery.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.metrics import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from helpers import Background, call_bounded, new_consumer, read_topic

from beamops.frames import FrameDecodeError, SparseFrameBatch, decode_batch
from beamops.io.kafka import missing_topics, read_kafka_frames
from beamops.io.kafka_config import KafkaClientConfig
from beamops.io.publish import FramePublisher
from beamops.operator import OperatorOutputs
from beamops.provenance import PROVENANCE_KEY, Provenance
from beamops.results import ComMap
from beamops.simulate import ScanSimulation
from beamops.testing import RunResult, assert_com_close, run_operator
from jobs import com_pipeline, replay
from transforms.com_partial import com_partial
from transforms.com_reduce import com_reduce

pytestmark = pytest.mark.integration

BATCH = 32

# 16x16 positions, two frames per position: 512 frames in 16 batches of 32, and every position's two
# frames are in different batches, so in different partitions when published round-robin.
SIM = ScanSimulation(
    scan_shape=(16, 16),
    frame_shape=(64, 64),
    events_per_frame=20,
    frames_per_position=2,
    disc_radius=10,
    shift_amplitude=3,
    seed=23,
    scan_number=1,
)


def scan(number: int) -> ScanSimulation:
    return replace(SIM, scan_number=number)


# --- running things with a bound ------------------------------------------------------------------


def run_job(main: Callable[[list[str]], int], kafka_broker, *args: str) -> None:
    argv = ["--bootstrap_servers", kafka_broker.bootstrap_servers, *args]
    status = call_bounded(lambda: main(argv), what=f"{main.__module__} {' '.join(args)}")
    assert status == 0, f"{main.__module__} exited with {status}"


def run_source(kafka_broker, topic: str, downstream: Callable[[Any], Any] | None = None, **params: Any) -> RunResult:
    """read_kafka_frames(topic, **params) [| downstream], collecting its main output and dead letters."""

    def build(root: Any) -> OperatorOutputs:
        frames = root.pipeline | read_kafka_frames({"topic": topic, **params}, client=client_of(kafka_broker))
        if downstream is None:
            return frames
        return downstream(frames)

    return call_bounded(lambda: run_operator(build, []), what=f"read of {topic}")


@cache
def reference_maps(sims: tuple[ScanSimulation, ...], skip: frozenset[tuple[int, int]] = frozenset()) -> dict:
    """Final ComMap per scan from com_partial | com_reduce over the batches, without Kafka.

    ``skip``: (scan number, batch index) pairs left out.
    """
    batches = [
        batch for sim in sims for index, batch in enumerate(sim.batches(BATCH)) if (sim.scan_number, index) not in skip
    ]
    return run_operator(lambda frames: frames | com_partial() | com_reduce(), batches).final_maps()


def assert_same_map(actual: ComMap, expected: ComMap) -> None:
    """Bit-identical values and the same bookkeeping."""
    assert actual.header == expected.header
    assert (actual.frames_seen, actual.positions_seen, actual.final, actual.complete) == (
        expected.frames_seen,
        expected.positions_seen,
        expected.final,
        expected.complete,
    )
    assert actual.x.dtype == expected.x.dtype == np.float32
    assert actual.x.tobytes() == expected.x.tobytes(), "x differs"
    assert actual.y.tobytes() == expected.y.tobytes(), "y differs"


# --- Kafka helpers -------------------------------------------------------------------------------------


def client_of(kafka_broker) -> KafkaClientConfig:
    return KafkaClientConfig(kafka_broker.bootstrap_servers)


def publish(kafka_broker, topic: str, batches: list[SparseFrameBatch], **kwargs: Any) -> None:
    """The detector side: FramePublisher, round-robin over the partitions by default."""
    with FramePublisher(client_of(kafka_broker), topic, **kwargs) as publisher:
        publisher.publish_all(batches)


def round_robin_ends(n_messages: int, partitions: int) -> dict[int, int]:
    """End offsets of a fresh topic after n round-robin messages from one FramePublisher."""
    return {p: len(range(p, n_messages, partitions)) for p in range(partitions)}


@dataclass(frozen=True)
class Sent:
    """One message as the broker stored it."""

    partition: int
    offset: int
    timestamp_ms: int
    value: bytes
    frames: int  # frames it carries (0 for bytes that hold none)
    label: str = ""


def produce(kafka_broker, topic: str, records: list[dict[str, Any]]) -> list[Sent]:
    """Produce records (value, partition, and optional key, headers, timestamp, frames, label) in order.

    Returns where each one landed, from the delivery reports.
    """
    producer = Producer(
        {"bootstrap.servers": kafka_broker.bootstrap_servers, "enable.idempotence": True, "linger.ms": 5}
    )
    landed: dict[int, tuple[int, int, int]] = {}
    errors: list[str] = []

    def report(index: int) -> Callable[[Any, Any], None]:
        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(f"record {index}: {err}")
            else:
                landed[index] = (msg.partition(), msg.offset(), msg.timestamp()[1])

        return on_delivery

    for index, record in enumerate(records):
        kwargs = {k: record[k] for k in ("key", "headers", "timestamp") if record.get(k) is not None}
        producer.produce(topic, record["value"], partition=record["partition"], on_delivery=report(index), **kwargs)
        producer.poll(0)
    assert producer.flush(30) == 0, "messages not delivered within 30 s"
    assert not errors, errors
    return [
        Sent(*landed[i], value=r["value"], frames=r.get("frames", 0), label=r.get("label", ""))
        for i, r in enumerate(records)
    ]


def produce_in_transaction(kafka_broker, topic: str, records: list[tuple[bytes, int]]) -> None:
    """(value, partition) records in one committed transaction."""
    producer = Producer(
        {"bootstrap.servers": kafka_broker.bootstrap_servers, "transactional.id": f"tx-{uuid.uuid4().hex[:8]}"}
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for value, partition in records:
        producer.produce(topic, value, partition=partition)
    producer.commit_transaction(30)


def end_offsets(kafka_broker, topic: str) -> dict[int, int]:
    consumer = new_consumer(kafka_broker.bootstrap_servers)
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in partitions}
    finally:
        consumer.close()


def committed_offsets(kafka_broker, group_id: str, topic: str) -> dict[int, int]:
    """The group's committed offset per partition (negative: none)."""
    consumer = new_consumer(kafka_broker.bootstrap_servers, group_id)
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        assert all(tp.error is None for tp in found), found
        return {tp.partition: tp.offset for tp in found}
    finally:
        consumer.close()


def consumer_groups(kafka_broker) -> set[str]:
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap_servers})
    return {g.group_id for g in admin.list_consumer_groups(request_timeout=10).result(timeout=15).valid}


def com_maps(kafka_broker, topic: str) -> list[tuple[ComMap, bytes]]:
    """Every ComMap on an output topic (progressive and final), with its message bytes."""
    found = []
    for msg in read_topic(kafka_broker.bootstrap_servers, topic):
        headers = dict(msg.headers() or [])
        assert headers["beamops-kind"] == b"com_map"
        com = ComMap.from_bytes(msg.value())
        assert headers["beamops-final"] == (b"1" if com.final else b"0")
        assert headers["beamops-complete"] == (b"1" if com.complete else b"0")
        assert msg.key() == str(com.scan_number).encode()
        found.append((com, msg.value()))
    return found


def provenances(kafka_broker, topic: str) -> set[str]:
    """The distinct ``beamops-provenance`` headers of the messages on ``topic`` (every one must have it)."""
    messages = read_topic(kafka_broker.bootstrap_servers, topic)
    return {dict(msg.headers() or [])[PROVENANCE_KEY].decode() for msg in messages}


def final_maps(kafka_broker, topic: str) -> dict[int, tuple[ComMap, bytes]]:
    """The final ComMap of each scan on an output topic, with its message bytes; one per scan."""
    finals: dict[int, tuple[ComMap, bytes]] = {}
    for com, value in com_maps(kafka_broker, topic):
        if com.final:
            assert com.scan_number not in finals, f"two final maps for scan {com.scan_number}"
            finals[com.scan_number] = (com, value)
    return finals


@dataclass(frozen=True)
class Letter:
    headers: dict[str, bytes]
    value: bytes
    key: bytes | None = None
    all_headers: tuple[tuple[str, bytes | None], ...] = ()  # in order, repeats kept

    @property
    def instance(self) -> str:
        return self.headers["beamops-instance"].decode()

    def original_headers(self) -> list[tuple[str, bytes | None]]:
        """The failed message's own headers: those before the last beamops-operator header."""
        names = [name for name, _ in self.all_headers]
        return list(self.all_headers[: len(names) - 1 - names[::-1].index("beamops-operator")])

    @property
    def error_type(self) -> str:
        return self.headers["beamops-error-type"].decode()

    @property
    def error(self) -> str:
        return self.headers["beamops-error"].decode()

    @property
    def operator(self) -> str:
        return self.headers["beamops-operator"].decode()

    @property
    def payload_format(self) -> str:
        return self.headers["beamops-payload-format"].decode()

    @property
    def origin(self) -> dict[str, Any]:
        return json.loads(self.headers["beamops-origin"])

    def decoded_frames(self) -> int | None:
        """Frames in the payload when it decodes (a frame batch, or an operator's ComPartial), else None."""
        if self.payload_format == "arrow-ipc":
            return pa.ipc.open_stream(self.value).read_all().num_rows
        try:
            return decode_batch(self.value).n_frames
        except FrameDecodeError:
            return None


def dead_letters(kafka_broker, topic: str) -> list[Letter]:
    return [
        Letter(dict(m.headers() or []), m.value() or b"", m.key(), tuple(m.headers() or ()))
        for m in read_topic(kafka_broker.bootstrap_servers, topic)
    ]


def job_topics(kafka_broker, input_topic: str) -> list[str]:
    """Fresh output and dead-letter topics; the arguments that name them."""
    out, dead = kafka_broker.new_topic(prefix="com"), kafka_broker.new_topic(prefix="dead")
    return ["--input_topic", input_topic, "--output_topic", out, "--dead_letter_topic", dead]


def topic_arg(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@contextmanager
def log_records(logger: str, level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """Records of ``logger`` (from any thread) while the block runs."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, log = Keep(level), logging.getLogger(logger)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(level)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


# --- malformed messages and frame accounting -------------------------------------------------------------


def corrupt(batch: SparseFrameBatch, **columns: np.ndarray) -> SparseFrameBatch:
    """A copy of ``batch`` with some columns replaced, without validation (as a buggy producer would send)."""
    return replace(batch, **columns)


def test_bad_messages_become_dead_letters_and_every_frame_is_accounted_for(kafka_broker):
    partitions = 3
    topic = kafka_broker.new_topic(partitions=partitions)
    complete_scan, broken_scan = scan(1), scan(2)
    good_1 = list(complete_scan.batches(BATCH))
    good_2 = list(broken_scan.batches(BATCH))
    # Scan 2 loses its batch 5 to a corruption only the reduce can see (a frame number beyond the
    # scan's total), so it never completes and is flushed at the end of input.
    lost = 5
    bad_frame_number = good_2[lost].frame_numbers.copy()
    bad_frame_number[-1] = broken_scan.n_frames + 7
    publish(kafka_broker, topic, good_1 + good_2[:lost] + good_2[lost + 1 :])

    # Scan 1's bad messages are damaged extra copies of its batches: the scan still completes.
    source = good_1[3]
    events = source.events.copy()
    events[5] = 64 * 64  # one past the last pixel
    positions = source.scan_positions.copy()
    positions[7] = complete_scan.n_positions
    version_2 = replace(source, header=replace(source.header, schema_version=2))
    rng = np.random.default_rng(7)
    arrow = source.to_bytes()
    cases = [
        # label, value, frames carried, headers, (error type, error text)
        (
            "random bytes",
            rng.bytes(400),
            0,
            [("trace-id", b"t-1"), ("blob", b"\xff\x00"), ("no value", None)],  # kept in its dead letter
            ("FrameDecodeError", ""),
        ),
        ("null value", None, 0, None, ("FrameDecodeError", "")),  # a tombstone
        ("truncated arrow", arrow[: len(arrow) * 2 // 3], source.n_frames, None, ("FrameDecodeError", "")),
        (
            "schema version 2",
            version_2.to_bytes(),
            source.n_frames,
            None,
            ("FrameDecodeError", "unknown schema version 2"),
        ),
        (
            "schema version 2 header",
            arrow,
            source.n_frames,
            [("beamops-schema-version", b"2")],
            ("FrameDecodeError", "unknown schema version b'2' in the message headers"),
        ),
        (
            "wrong content type",
            arrow,
            source.n_frames,
            [("content-type", b"text/plain")],
            ("FrameDecodeError", "content-type b'text/plain'"),
        ),
        (
            "event out of range",
            corrupt(source, events=events).to_bytes(),
            source.n_frames,
            None,
            ("FrameDecodeError", "event index 4096 out of range for frame_shape (64, 64)"),
        ),
        (
            "position out of range",
            corrupt(source, scan_positions=positions).to_bytes(),
            source.n_frames,
            None,
            ("FrameDecodeError", "scan position 256 out of range for scan_shape (16, 16)"),
        ),
        (
            "dense frames",
            complete_scan.dense_batch(3, BATCH).to_bytes(),
            BATCH,
            None,
            ("FrameDecodeError", "expected sparse frames, got a DenseFrameBatch"),
        ),
        (
            "frame number out of range",
            corrupt(good_2[lost], frame_numbers=bad_frame_number).to_bytes(),
            good_2[lost].n_frames,
            None,
            ("ValueError", f"frame number {broken_scan.n_frames + 7} out of range for a scan of 512 frames"),
        ),
    ]
    sent = produce(
        kafka_broker,
        topic,
        [
            {
                "value": value,
                "key": f"bad-{i}".encode(),
                "headers": headers,
                "partition": i % partitions,
                "frames": frames,
                "label": label,
            }
            for i, (label, value, frames, headers, _) in enumerate(cases)
        ],
    )
    expected_error = {s.label: case[4] for s, case in zip(sent, cases, strict=True)}
    key_and_headers = {
        s.label: (f"bad-{i}".encode(), case[3] or []) for i, (s, case) in enumerate(zip(sent, cases, strict=True))
    }
    published_frames = (
        complete_scan.n_frames + broken_scan.n_frames - good_2[lost].n_frames + sum(s.frames for s in sent)
    )

    args = job_topics(kafka_broker, topic)
    run_job(com_pipeline.main, kafka_broker, *args)

    # Each bad message is one dead letter, with the reason and where it was published; one the
    # source refused also with its key and headers, to publish it again once fixed.
    letters = dead_letters(kafka_broker, topic_arg(args, "--dead_letter_topic"))
    by_place = {(s.partition, s.offset): s for s in sent}
    assert sorted((lt.origin["partition"], lt.origin["offset"]) for lt in letters) == sorted(by_place)
    dead_frames = 0
    for letter in letters:
        origin = letter.origin
        assert origin["topic"] == topic
        message = by_place[(origin["partition"], origin["offset"])]
        assert origin["timestamp_ms"] == message.timestamp_ms
        error_type, text = expected_error[message.label]
        assert letter.error_type == error_type, (message.label, letter.error)
        assert text in letter.error and letter.error, (message.label, letter.error)
        frames = letter.decoded_frames()
        assert letter.instance == letter.operator  # the job applies each operator once, with its default label
        if letter.operator == "read_kafka_frames":  # the original bytes
            assert letter.payload_format == "raw" and letter.value == (message.value or b""), message.label
            assert (letter.key, letter.original_headers()) == key_and_headers[message.label], message.label
        else:  # rejected by the reduce: the payload is the batch's ComPartial
            assert (letter.key, letter.original_headers()) == (b"com_reduce", [])
            assert (letter.operator, letter.payload_format, message.label) == (
                "com_reduce",
                "arrow-ipc",
                "frame number out of range",
            )
            partial = pa.ipc.open_stream(letter.value).read_all()
            assert partial.column("frame_number").to_numpy().tolist() == bad_frame_number.tolist()
        assert frames in (None, message.frames), message.label
        dead_frames += message.frames if frames is None else frames

    # The rest of the stream went on: both scans have their right final map.
    maps = final_maps(kafka_broker, topic_arg(args, "--output_topic"))
    assert sorted(maps) == [1, 2]
    expected = reference_maps((complete_scan, broken_scan), frozenset({(2, lost)}))
    for number, (com, _) in maps.items():
        assert_com_close(com, expected[number], atol=1e-4)
        assert (com.frames_seen, com.positions_seen, com.final, com.complete) == (
            expected[number].frames_seen,
            expected[number].positions_seen,
            True,
            number == 1,
        )
    assert maps[1][0].frames_seen == complete_scan.n_frames
    assert maps[2][0].frames_seen == broken_scan.n_frames - good_2[lost].n_frames
    # Nothing dropped silently: reduced + dead = published.
    assert sum(com.frames_seen for com, _ in maps.values()) + dead_frames == published_frames


def test_a_redelivered_batch_is_counted_once(kafka_broker):
    """At-least-once delivery: copies of batches are skipped (or late), and the map stays exact."""
    topic = kafka_broker.new_topic(partitions=2)
    batches = list(SIM.batches(BATCH))
    again = [batches[1], batches[6], batches[6], batches[15]]
    publish(kafka_broker, topic, batches + again)

    result = run_source(kafka_broker, topic, lambda frames: frames | com_partial() | com_reduce())
    finals = result.final_maps()
    assert sorted(finals) == [SIM.scan_number]
    assert_same_map(finals[SIM.scan_number], reference_maps((SIM,))[SIM.scan_number])
    # A copy that arrives before the scan completes is skipped; one after it is a late dead letter.
    assert all(d.error_type == "LateFrameError" and d.operator == "com_reduce" for d in result.dead_letters)
    late = sum(len(pa.ipc.open_stream(d.payload).read_all()) for d in result.dead_letters)
    duplicates = result.counter("duplicate_frames")
    assert finals[SIM.scan_number].frames_seen + duplicates + late == SIM.n_frames + sum(b.n_frames for b in again)


# --- partitions ------------------------------------------------------------------------------------------


def test_four_partitions_give_the_same_maps_as_one(kafka_broker):
    sims = (scan(4), scan(5))
    # Two scans interleaved batch by batch, so both are open at once.
    batches = [b for pair in zip(*(s.batches(BATCH) for s in sims), strict=True) for b in pair]
    results = {}
    for partitions in (1, 4):
        topic = kafka_broker.new_topic(partitions=partitions)
        publish(kafka_broker, topic, batches)
        assert end_offsets(kafka_broker, topic) == round_robin_ends(len(batches), partitions)
        args = job_topics(kafka_broker, topic)
        run_job(com_pipeline.main, kafka_broker, *args, "--emit_every", "128")
        assert dead_letters(kafka_broker, topic_arg(args, "--dead_letter_topic")) == []
        # Progressive maps every 128 frames (their values depend on the order; their counts do not).
        progressive = sorted(
            (c.scan_number, c.frames_seen)
            for c, _ in com_maps(kafka_broker, topic_arg(args, "--output_topic"))
            if not c.final
        )
        assert progressive == [(sim.scan_number, n) for sim in sims for n in (128, 256, 384)]
        results[partitions] = final_maps(kafka_broker, topic_arg(args, "--output_topic"))

    assert sorted(results[1]) == sorted(results[4]) == [4, 5]
    expected = reference_maps(sims)
    for number in (4, 5):
        one, four = results[1][number], results[4][number]
        assert four[1] == one[1], f"scan {number}: the 4-partition map differs from the 1-partition map"
        assert_same_map(four[0], expected[number])
        assert four[0].complete and four[0].frames_seen == SIM.n_frames
        # And it is the simulated field.
        sim = scan(number)
        assert_com_close(four[0], sim.expected_com(), atol=6 * sim.com_standard_error())


def test_messages_of_several_megabytes_go_through(kafka_broker):
    """Frame batches and COM maps beyond Kafka's 1 MB default message size (MAX_MESSAGE_BYTES)."""
    # 512x512 positions: the map is 2 MiB; 65536 frames per message: about 1.5 MB each.
    sim = ScanSimulation(
        scan_shape=(512, 512), frame_shape=(64, 64), events_per_frame=2, disc_radius=10, seed=5, scan_number=9
    )
    batches = list(sim.batches(65_536))
    topic = kafka_broker.new_topic(partitions=2)
    publish(kafka_broker, topic, batches)
    assert min(len(m.value()) for m in read_topic(kafka_broker.bootstrap_servers, topic)) > 1_100_000
    args = job_topics(kafka_broker, topic)
    run_job(com_pipeline.main, kafka_broker, *args, "--emit_every", "0")
    assert dead_letters(kafka_broker, topic_arg(args, "--dead_letter_topic")) == []
    ((com, value),) = final_maps(kafka_broker, topic_arg(args, "--output_topic")).values()
    assert len(value) > 2 * 1024 * 1024
    expected = run_operator(lambda frames: frames | com_partial() | com_reduce(emit_every=0), batches).final_maps()
    assert_same_map(com, expected[9])
    assert com.complete and com.frames_seen == sim.n_frames


# --- start and stop positions -----------------------------------------------------------------------------

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z, in ms
TINY = ScanSimulation(
    scan_shape=(4, 4), frame_shape=(32, 32), events_per_frame=5, disc_radius=5, shift_amplitude=1, seed=3
)


@pytest.fixture
def numbered_topic(kafka_broker) -> str:
    """16 one-frame messages: message i holds frame i, on partition i % 3, with timestamp T0 + i s."""
    topic = kafka_broker.new_topic(partitions=3)
    records = [
        {"value": b.to_bytes(), "key": b"1", "partition": i % 3, "timestamp": T0 + 1000 * i, "frames": 1}
        for i, b in enumerate(TINY.batches(1))
    ]
    sent = produce(kafka_broker, topic, records)
    assert [(s.partition, s.offset, s.timestamp_ms) for s in sent] == [
        (i % 3, i // 3, T0 + 1000 * i) for i in range(16)
    ]
    return topic


def _origin_and_time(batch: SparseFrameBatch, timestamp: Any = beam.DoFn.TimestampParam) -> tuple:
    o = batch.origin
    return (int(batch.frame_numbers[0]), o["partition"], o["offset"], o["timestamp_ms"], timestamp.micros // 1000)


def read_range(kafka_broker, topic: str, start: str, stop: str) -> list[int]:
    """Frame numbers (= message numbers) a read of [start, stop) yields; checks origins and timestamps."""
    result = run_source(
        kafka_broker,
        topic,
        lambda out: OperatorOutputs({"seen": out.frames | beam.Map(_origin_and_time), "dead_letter": out.dead_letter}),
        start=start,
        stop=stop,
    )
    assert result.dead_letters == []
    numbers = sorted(number for number, *_ in result.outputs)
    assert len(numbers) == len(set(numbers)), f"a message was read twice: {sorted(result.outputs)}"
    for number, partition, offset, message_ms, element_ms in result.outputs:
        # Where it came from, and its event time is the message timestamp.
        assert (partition, offset) == (number % 3, number // 3)
        assert message_ms == element_ms == T0 + 1000 * number
    return numbers


@pytest.mark.parametrize(
    ("start", "stop", "expected"),
    [
        ("earliest", "latest", range(16)),
        ("offset:1", "offset:3", [3, 4, 5, 6, 7, 8]),  # offsets 1 and 2 of every partition
        ("offset:0=2,2=1", "latest", [6, 9, 12, 15, 5, 8, 11, 14]),  # partition 1 not named: not read
        ("earliest", "offset:1=2", [1, 4]),  # only partition 1 has a stop
        ("offset:0=1,1=1,2=1", "offset:0=3,1=2,2=5", [3, 6, 4, 5, 8, 11, 14]),
        ("latest", "latest", []),
    ],
)
def test_start_and_stop_by_offset(kafka_broker, numbered_topic, start, stop, expected):
    assert read_range(kafka_broker, numbered_topic, start, stop) == sorted(expected)


@pytest.mark.parametrize(
    ("start", "stop", "expected"),
    [
        (f"timestamp:{T0 + 3000}", f"timestamp:{T0 + 8000}", range(3, 8)),
        (f"timestamp:{T0 + 2500}", f"timestamp:{T0 + 8001}", range(3, 9)),  # between messages
        ("timestamp:2023-11-14T22:13:30Z", "latest", range(10, 16)),  # ISO-8601, UTC
        ("timestamp:2023-11-14T23:13:25+01:00", "timestamp:2023-11-14T22:13:27", range(5, 7)),  # zones; none = UTC
        ("earliest", f"timestamp:{T0 + 4000}", range(4)),
        (f"timestamp:{T0 + 60_000}", "latest", []),  # after the last message: nothing
        ("offset:2", f"timestamp:{T0 + 12_000}", [6, 7, 8, 9, 10, 11]),
    ],
)
def test_start_and_stop_by_timestamp(kafka_broker, numbered_topic, start, stop, expected):
    assert read_range(kafka_broker, numbered_topic, start, stop) == sorted(expected)


def test_a_reader_reads_partition_after_partition_with_one_consumer(kafka_broker, numbered_topic, monkeypatch):
    """A finished partition read hands its consumer to the next one: a new consumer's first fetch waits
    10-70 ms for its connections, which at 0.2 MB messages is a tenth of a partition's read."""
    from beamops.io import kafka

    made: list[str | None] = []
    make_consumer = kafka._consumer

    def counted(client: KafkaClientConfig, group_id: str | None) -> Any:
        made.append(group_id)
        return make_consumer(client, group_id)

    monkeypatch.setattr(kafka, "_consumer", counted)
    assert read_range(kafka_broker, numbered_topic, "earliest", "latest") == list(range(16))
    # One to find the partitions and their ends, one for the three partition reads.
    assert len(made) == 2, made


def test_a_start_before_deleted_records_reads_what_is_left_and_says_what_is_gone(kafka_broker, numbered_topic):
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap_servers})
    for future in admin.delete_records([TopicPartition(numbered_topic, 0, 2)]).values():
        future.result(timeout=30)  # partition 0 now holds offsets 2..5: messages 6, 9, 12, 15
    with log_records("beamops.io.kafka", logging.WARNING) as warnings:
        numbers = read_range(kafka_broker, numbered_topic, "offset:1", "latest")
    assert numbers == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # offset 1 of partition 0 (message 3) is gone
    gone = [r.getMessage() for r in warnings if "no longer in the log" in r.getMessage()]
    assert gone == [f"kafka read {numbered_topic}[0]: offsets 1..1 are no longer in the log (retention or "
                    "compaction removed them): the read starts at 2"]  # fmt: skip


def test_offsets_deleted_while_the_read_is_behind_them_are_skipped_and_reported(
    kafka_broker, numbered_topic, monkeypatch
):
    from beamops.io import kafka

    # As if the range had been resolved before the records went: the reader meets the gap itself.
    monkeypatch.setattr(kafka, "_start_in_log", lambda topic, partition, begin, end, low, high: begin)
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap_servers})
    for future in admin.delete_records([TopicPartition(numbered_topic, 0, 2)]).values():
        future.result(timeout=30)
    with log_records("beamops.io.kafka", logging.WARNING) as warnings:
        numbers = read_range(kafka_broker, numbered_topic, "offset:1", "latest")
    assert numbers == [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    lost = [r.getMessage() for r in warnings if "deleted while" in r.getMessage()]
    assert lost == [f"kafka {numbered_topic}[0]: offsets 1..1 were deleted while the read was behind them "
                    "(retention, compaction, deleted records): they are lost; the read goes on at 2"]  # fmt: skip


def test_a_read_past_the_end_of_a_recreated_log_fails_saying_so(kafka_broker, numbered_topic, monkeypatch):
    from beamops.io import kafka

    monkeypatch.setattr(kafka, "_start_in_log", lambda topic, partition, begin, end, low, high: begin)
    refused = r"partition 0: offset 9 is past the end of its log \(offsets 0..5\); was the topic deleted and created"
    with pytest.raises(Exception, match=refused):
        run_source(kafka_broker, numbered_topic, start="offset:0=9", stop="offset:0=12")


def test_a_start_past_the_end_with_nothing_to_read_reads_nothing_and_says_so(kafka_broker, numbered_topic):
    """One offset:N for partitions of uneven length (6, 5, 5 messages here), stop=latest."""
    with log_records("beamops.io.kafka", logging.WARNING) as warnings:
        assert read_range(kafka_broker, numbered_topic, "offset:6", "latest") == []  # partition 0 ends at 6 too
    assert sorted(r.getMessage() for r in warnings) == [
        f"kafka read {numbered_topic}[{q}]: the start offset 6 is past the end of the log (next offset 5): "
        "nothing to read"
        for q in (1, 2)
    ]


@pytest.mark.parametrize("stop", ["never", "offset:9"])
def test_a_start_past_the_end_of_the_log_is_refused(kafka_broker, numbered_topic, stop):
    """Kafka cannot fetch offsets not yet written (its consumer would go back to the beginning)."""
    refused = r"partition 0: the start offset 7 is past the end of its log \(next offset 6\)"
    with pytest.raises(Exception, match=refused):
        run_source(kafka_broker, numbered_topic, start="offset:7", stop=stop)


@pytest.mark.parametrize(
    ("start", "stop", "refused"),
    [
        ("offset:2", "offset:1", r"partition 0: the stop \(1\) is before the start \(2\)"),
        # refused whatever the log holds: partition 0 holds 6 messages, so its start 7 is past its end too
        ("offset:7", "offset:1", r"partition 0: the stop \(1\) is before the start \(7\)"),
        (f"timestamp:{T0 + 8000}", f"timestamp:{T0 + 3000}", r"partition 0: the stop \(1\) is before the start \(3\)"),
        (
            "offset:7=0",
            "latest",
            r"the start position names partitions \[7\] that Kafka topic .* does not have \(it has 0..2\)",
        ),
        ("earliest", "offset:0=1,3=1", r"the stop position names partitions \[3\]"),
        (
            "earliest",
            f"timestamp:{int(time.time() * 1000) + 3_600_000}",
            r"the stop time 20\d\d-.*Z is in the future \(now 20\d\d-.*Z\): a read can stop only at a time that has",
        ),
    ],
)
def test_a_range_that_cannot_be_read_is_refused(kafka_broker, numbered_topic, start, stop, refused):
    with pytest.raises(Exception, match=refused):
        run_source(kafka_broker, numbered_topic, start=start, stop=stop)


def test_a_stop_past_the_end_of_the_log_says_the_read_waits_for_it(kafka_broker, numbered_topic):
    from beamops.io.kafka import ReadFromKafkaParams, _ResolvePartitionsFn

    params = ReadFromKafkaParams(topic=numbered_topic, start="earliest", stop="offset:0=9,1=5")
    with log_records("beamops.io.kafka", logging.WARNING) as warnings:
        reads = list(_ResolvePartitionsFn(client_of(kafka_broker), params).process(numbered_topic))
    assert [(r.partition, r.start, r.stop) for r in reads] == [(0, 0, 9), (1, 0, 5), (2, 0, 0)]
    assert [r.getMessage() for r in warnings] == [
        f"kafka read {numbered_topic}[0]: the stop offset 9 is past the end of the log (next offset 6): "
        "the read waits for offsets up to it to be written"
    ]


def test_a_read_that_does_not_wait_refuses_a_stop_past_the_end(kafka_broker, numbered_topic):
    from beamops.io.kafka import ReadFromKafkaParams, _ResolvePartitionsFn

    params = ReadFromKafkaParams(topic=numbered_topic, stop="offset:6", wait_past_end=False)
    refused = r"partition 1: the stop offset 6 is past the end of its log \(next offset 5\), and this read does not"
    with pytest.raises(ValueError, match=refused):
        list(_ResolvePartitionsFn(client_of(kafka_broker), params).process(numbered_topic))


def test_a_replay_past_the_end_of_a_partition_fails_at_once_saying_so(kafka_broker, numbered_topic, capsys):
    # One offset:N for partitions of 6, 5 and 5 messages: a live read would wait for offset 5 of two of them.
    argv = ["--bootstrap_servers", kafka_broker.bootstrap_servers, *job_topics(kafka_broker, numbered_topic)]
    status = call_bounded(lambda: replay.main([*argv, "--start", "earliest", "--stop", "offset:6"]), what="replay")
    assert status != 0
    assert "the stop offset 6 is past the end of its log (next offset 5)" in capsys.readouterr().err


@pytest.mark.parametrize("partition_has_messages", [True, False])
def test_a_live_read_that_has_read_all_of_a_partition_moves_its_watermark_to_now_less_the_lag(
    kafka_broker, numbered_topic, partition_has_messages
):
    """An idle or empty partition must not hold back the event time (and the scan timeouts) of the others."""
    from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
    from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
    from apache_beam.utils.timestamp import Duration, Timestamp

    from beamops.io.kafka import UNBOUNDED_STOP, PartitionRead, ReadFromKafkaParams, _ReadPartitionFn

    topic = numbered_topic if partition_has_messages else kafka_broker.new_topic(partitions=1)
    params = ReadFromKafkaParams(topic=topic, stop="never", max_read_s=1.5, poll_timeout_s=0.2)
    reader = _ReadPartitionFn("read_kafka_frames", client_of(kafka_broker), params)
    reader.setup()
    watermark = ManualWatermarkEstimator(None)
    # As the SDK harness hands it to process(): a view that can defer the remainder.
    tracker = RestrictionTrackerView(
        ThreadsafeRestrictionTracker(OffsetRestrictionTracker(OffsetRange(0, UNBOUNDED_STOP)))
    )
    try:
        before = Timestamp.now()
        out = list(reader.process(PartitionRead(topic, 0, 0, None), None, tracker, watermark))
        after = Timestamp.now()
        # Deferred: until this DoFn reads again (maybe after a checkpoint), its consumer fetches nothing.
        (consumer,) = reader._idle  # kept for the next read, of this partition or another
        assert consumer.assignment() == []
    finally:
        reader.teardown()
    assert len(out) == (6 if partition_has_messages else 0)  # messages 0, 3, ..., 15, stamped T0 .. T0 + 15 s
    lag = Duration(seconds=params.idle_watermark_lag_s)
    assert before - lag <= watermark.current_watermark() <= after - lag


def test_a_live_read_yields_as_soon_as_it_has_read_all_of_its_partition(kafka_broker, numbered_topic):
    """Not after max_read_s: the runner reads the partitions a worker shares in turn, so an idle partition
    that kept its turn would delay the messages of every other by that long (live latency). Its next turn,
    on the same (reused) consumer, yields at once with nothing new, then reads what arrived since."""
    from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
    from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker

    from beamops.io.kafka import UNBOUNDED_STOP, PartitionRead, ReadFromKafkaParams, _ReadPartitionFn

    params = ReadFromKafkaParams(topic=numbered_topic, stop="never", max_read_s=30)
    reader = _ReadPartitionFn("read_kafka_frames", client_of(kafka_broker), params)
    reader.setup()

    def turn(start: int) -> tuple[list[int], float, tuple[int, int]]:
        """One process() call from ``start``: the offsets it read, how long it took, the deferred remainder."""
        threadsafe = ThreadsafeRestrictionTracker(OffsetRestrictionTracker(OffsetRange(start, UNBOUNDED_STOP)))
        started = time.monotonic()
        read = PartitionRead(numbered_topic, 0, start, None)
        out = list(reader.process(read, None, RestrictionTrackerView(threadsafe), ManualWatermarkEstimator(None)))
        took = time.monotonic() - started
        residual, _ = threadsafe.deferred_status()
        return [wv.value.origin["offset"] for wv in out], took, (residual.start, residual.stop)

    try:
        offsets, took, rest = turn(0)
        assert offsets == [0, 1, 2, 3, 4, 5] and rest == (6, UNBOUNDED_STOP)  # partition 0's messages, then its end
        assert took < 3, f"the read kept its turn for {took:.1f} s with nothing to read"
        offsets, took, rest = turn(6)
        assert offsets == [] and rest == (6, UNBOUNDED_STOP) and took < 3, (offsets, took)
        produce(kafka_broker, numbered_topic, [{"value": next(TINY.batches(1)).to_bytes(), "partition": 0}])
        offsets, took, rest = turn(6)
        assert offsets == [6] and rest == (7, UNBOUNDED_STOP) and took < 3, (offsets, took)
        assert len(reader._idle) == 1  # one consumer served the three turns
    finally:
        reader.teardown()


def test_a_live_read_says_when_its_topic_gained_partitions_it_does_not_read(kafka_broker, monkeypatch):
    from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
    from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
    from confluent_kafka.admin import NewPartitions

    from beamops.io import kafka
    from beamops.io.kafka import UNBOUNDED_STOP, ReadFromKafkaParams, _ReadPartitionFn, _ResolvePartitionsFn

    monkeypatch.setattr(kafka, "_partition_checked", {})
    topic = kafka_broker.new_topic(partitions=2)
    params = ReadFromKafkaParams(topic=topic, stop="never", max_read_s=1.0, poll_timeout_s=0.2)
    (first, _) = list(_ResolvePartitionsFn(client_of(kafka_broker), params).process(topic))
    assert first.of == 2
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap_servers})
    admin.create_partitions([NewPartitions(topic, 4)])[topic].result(timeout=30)  # while the job runs
    reader = _ReadPartitionFn("read_kafka_frames", client_of(kafka_broker), params)
    reader.setup()
    tracker = RestrictionTrackerView(
        ThreadsafeRestrictionTracker(OffsetRestrictionTracker(OffsetRange(0, UNBOUNDED_STOP)))
    )
    try:
        with log_records("beamops.io.kafka", logging.ERROR) as errors:
            list(reader.process(first, None, tracker, ManualWatermarkEstimator(None)))
    finally:
        reader.teardown()
    assert [r.getMessage() for r in errors] == [
        f"Kafka topic {topic!r} now has 4 partitions; this read began with 2 and does not read [2, 3]: the frames "
        "published there are missing from its maps. Restart the job (start=committed) to read them all"
    ]


def test_com_pipeline_time_range_selects_one_scan(kafka_broker):
    """--start/--stop by timestamp pick exactly the messages of the middle scan of three."""
    topic = kafka_broker.new_topic(partitions=2)
    sims = [scan(n) for n in (7, 8, 9)]
    records = []
    for k, sim in enumerate(sims):
        for i, batch in enumerate(sim.batches(BATCH)):
            # Scan k is acquired during [T0 + 100 k s, T0 + 100 k s + 16 s).
            timestamp = T0 + 100_000 * k + 1000 * i
            records.append(
                {"value": batch.to_bytes(), "key": b"%d" % sim.scan_number, "partition": i % 2, "timestamp": timestamp}
            )
    produce(kafka_broker, topic, records)

    args = job_topics(kafka_broker, topic)
    stop = "timestamp:2023-11-14T22:16:40Z"  # T0 + 200 s
    run_job(com_pipeline.main, kafka_broker, *args, "--start", f"timestamp:{T0 + 100_000}", "--stop", stop)
    maps = final_maps(kafka_broker, topic_arg(args, "--output_topic"))
    assert sorted(maps) == [8]
    assert_same_map(maps[8][0], reference_maps((sims[1],))[8])
    assert maps[8][0].complete and maps[8][0].frames_seen == SIM.n_frames
    assert dead_letters(kafka_broker, topic_arg(args, "--dead_letter_topic")) == []


# --- live runs, committed offsets and replays ----------------------------------------------------------


def test_live_runs_commit_what_they_processed_and_a_replay_reproduces_them(kafka_broker, capsys, tmp_path):
    partitions = 3
    topic = kafka_broker.new_topic(partitions=partitions)
    group = f"live-{uuid.uuid4().hex[:8]}"
    first, second = scan(11), scan(12)
    live = ["--group_id", group, "--start", "committed", "--stop", "latest"]
    # With a group, resuming from its commits is also the default start.
    resume = ["--group_id", group, "--stop", "latest"]

    publish(kafka_broker, topic, list(first.batches(BATCH)))
    ends_1 = end_offsets(kafka_broker, topic)
    assert ends_1 == round_robin_ends(first.n_batches(BATCH), partitions)
    assert all(offset < 0 for offset in committed_offsets(kafka_broker, group, topic).values())

    # Live run 1: nothing committed yet, so it reads from the start; it commits what it processed.
    live_1 = job_topics(kafka_broker, topic)
    live_dir = str(tmp_path / "live")
    run_job(com_pipeline.main, kafka_broker, *live_1, *live, "--out_dir", live_dir)
    assert committed_offsets(kafka_broker, group, topic) == ends_1
    live_maps = final_maps(kafka_broker, topic_arg(live_1, "--output_topic"))
    assert sorted(live_maps) == [11]
    assert_same_map(live_maps[11][0], reference_maps((first,))[11])
    # Each map says what made it: the read (topic, range, group) and the operators, with their parameters.
    (live_made,) = map(Provenance.from_json, provenances(kafka_broker, topic_arg(live_1, "--output_topic")))
    assert [s.operator for s in live_made.steps] == ["read_kafka_frames", "com_partial", "com_reduce"]
    read = live_made.params_of("read_kafka_frames")
    assert (read["topic"], read["group_id"], read["start"], read["stop"]) == (topic, group, "committed", "latest")

    # The detector goes on with the next scan, which the live job has not read yet.
    publish(kafka_broker, topic, list(second.batches(BATCH)))
    ends_2 = end_offsets(kafka_broker, topic)
    groups_before = consumer_groups(kafka_broker)
    assert group in groups_before

    # Replay the range live run 1 consumed, from before its start to its committed offsets.
    consumed = ["--start", "offset:0=0,1=0,2=0", "--stop", "offset:" + ",".join(f"{p}={o}" for p, o in ends_1.items())]
    replayed = job_topics(kafka_broker, topic)
    run_job(replay.main, kafka_broker, *replayed, *consumed)
    replay_maps = final_maps(kafka_broker, topic_arg(replayed, "--output_topic"))
    assert sorted(replay_maps) == [11]
    assert replay_maps[11][1] == live_maps[11][1], "the replay's ComMap is not byte-identical to the live one"
    (replay_made,) = map(Provenance.from_json, provenances(kafka_broker, topic_arg(replayed, "--output_topic")))
    read = replay_made.params_of("read_kafka_frames")
    assert (read["group_id"], read["start"], read["stop"]) == (None, consumed[1], consumed[3])
    assert replay_made.steps[1:] == live_made.steps[1:]  # the same operators and parameters
    # A replay into the live job's output topic is refused before it reads anything: its maps would be
    # mixed with the live ones. Into its own earlier output (no group) it may go again.
    live_out = topic_arg(live_1, "--output_topic")
    written_before = len(read_topic(kafka_broker.bootstrap_servers, live_out))
    argv = ["--bootstrap_servers", kafka_broker.bootstrap_servers, *consumed]
    refused = [*argv, "--input_topic", topic, "--output_topic", live_out]
    assert call_bounded(lambda: replay.main(refused), what="replay into the live output") == 2
    assert f"holds the maps of a live job (consumer group {group!r})" in capsys.readouterr().err
    assert len(read_topic(kafka_broker.bootstrap_servers, live_out)) == written_before
    refused = [*argv, "--input_topic", topic, "--out_dir", live_dir]
    assert call_bounded(lambda: replay.main(refused), what="replay into the live job's directory") == 2
    assert f"--out_dir '{live_dir}' holds the maps of a live job (consumer group {group!r})" in capsys.readouterr().err
    run_job(replay.main, kafka_broker, *replayed, *consumed)
    assert dead_letters(kafka_broker, topic_arg(replayed, "--dead_letter_topic")) == []
    # The replay neither moved the live group nor left a group of its own.
    assert committed_offsets(kafka_broker, group, topic) == ends_1
    assert consumer_groups(kafka_broker) == groups_before

    # Live run 2 resumes at the committed offsets: the second scan only.
    live_2 = job_topics(kafka_broker, topic)
    run_job(com_pipeline.main, kafka_broker, *live_2, *resume)
    maps_2 = final_maps(kafka_broker, topic_arg(live_2, "--output_topic"))
    assert sorted(maps_2) == [12]
    assert_same_map(maps_2[12][0], reference_maps((second,))[12])
    assert committed_offsets(kafka_broker, group, topic) == ends_2

    # Live run 3 has nothing new to read, and says so.
    live_3 = job_topics(kafka_broker, topic)
    with log_records("beamops.io.kafka") as records:
        run_job(com_pipeline.main, kafka_broker, *live_3, *resume)
    assert f"kafka read {topic}: nothing to read between start committed and stop latest (group {group!r} has " in (
        "\n".join(r.getMessage() for r in records)
    )
    assert read_topic(kafka_broker.bootstrap_servers, topic_arg(live_3, "--output_topic")) == []
    assert read_topic(kafka_broker.bootstrap_servers, topic_arg(live_3, "--dead_letter_topic")) == []
    assert committed_offsets(kafka_broker, group, topic) == ends_2


@pytest.mark.parametrize("downstream_fails", [True, False])
def test_a_bounded_read_commits_only_after_what_it_is_told_to_wait_for(kafka_broker, downstream_fails):
    """On FnApiRunner a bundle is finalized as soon as it ends, before the stages after a shuffle run."""
    topic = kafka_broker.new_topic(partitions=2)
    group = f"live-{uuid.uuid4().hex[:8]}"
    publish(kafka_broker, topic, list(TINY.batches(2)))

    def after_the_shuffle(total: tuple[int, list[int]]) -> int:
        if downstream_fails:
            raise RuntimeError("the sink failed")
        return sum(total[1])

    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    reader = read_kafka_frames({"topic": topic, "group_id": group}, client=client_of(kafka_broker))
    frames = pipeline | reader
    written = frames.frames | beam.Map(lambda b: (0, b.n_frames)) | beam.GroupByKey() | beam.Map(after_the_shuffle)
    reader.commit_after(written)
    if downstream_fails:
        with pytest.raises(Exception, match="the sink failed"):
            call_bounded(lambda: pipeline.run().wait_until_finish(), what="a read whose sink fails")
        assert all(offset < 0 for offset in committed_offsets(kafka_broker, group, topic).values())
    else:
        call_bounded(lambda: pipeline.run().wait_until_finish(), what="a read whose sink works")
        assert committed_offsets(kafka_broker, group, topic) == end_offsets(kafka_broker, topic)


def test_a_run_that_fails_before_its_maps_are_written_commits_nothing(kafka_broker, capsys):
    """The offsets are committed after the sinks wrote, so the next run reads the range again."""
    topic = kafka_broker.new_topic(partitions=2)
    group = f"live-{uuid.uuid4().hex[:8]}"
    publish(kafka_broker, topic, list(SIM.batches(BATCH)))
    refusing = kafka_broker.new_topic(prefix="com", config={"max.message.bytes": "2000"})  # a map is larger
    dead = kafka_broker.new_topic(prefix="dead")
    args = ["--bootstrap_servers", kafka_broker.bootstrap_servers, "--input_topic", topic, "--output_topic", refusing,
            "--dead_letter_topic", dead, "--group_id", group, "--start", "committed"]  # fmt: skip
    assert call_bounded(lambda: com_pipeline.main(args), what="a job whose map the broker refuses") == 1
    assert "Message size too large" in capsys.readouterr().err.strip().splitlines()[-1]
    assert all(offset < 0 for offset in committed_offsets(kafka_broker, group, topic).values())

    again = job_topics(kafka_broker, topic)
    run_job(com_pipeline.main, kafka_broker, *again, "--group_id", group, "--start", "committed")
    maps = final_maps(kafka_broker, topic_arg(again, "--output_topic"))
    assert_same_map(maps[SIM.scan_number][0], reference_maps((SIM,))[SIM.scan_number])
    assert committed_offsets(kafka_broker, group, topic) == end_offsets(kafka_broker, topic)


def com_definition(kafka_broker, tmp_path: Path, source_params: str, maps_topic: str) -> Path:
    """A pipeline definition file: read_kafka_frames (``source_params``, YAML) -> COM -> ``maps_topic``."""
    definition = tmp_path / "live.yaml"
    definition.write_text(
        f"""\
name: live
kafka: {{bootstrap_servers: "{kafka_broker.bootstrap_servers}"}}
dead_letters: {{params: {{out_dir: "{tmp_path / "dead"}"}}}}
operators:
  source: {{operator: read_kafka_frames, params: {source_params}}}
  partial: {{operator: com_partial, input: source.frames}}
  reduce: {{operator: com_reduce, input: partial.com_partial}}
  maps: {{operator: write_com_maps_kafka, input: reduce.com_map, params: {{topic: {maps_topic}}}}}
"""
    )
    return definition


def test_a_pipeline_definition_reading_kafka_commits_after_its_sinks(kafka_broker, tmp_path):
    from beamops.cli import main as beamops_main

    topic = kafka_broker.new_topic(partitions=2)
    group = f"live-{uuid.uuid4().hex[:8]}"
    publish(kafka_broker, topic, list(SIM.batches(BATCH)))
    out = kafka_broker.new_topic(prefix="com")
    definition = com_definition(kafka_broker, tmp_path, f"{{topic: {topic}, group_id: {group}, start: committed}}", out)
    assert call_bounded(lambda: beamops_main(["pipeline", "run", str(definition)]), what="beamops pipeline run") == 0
    maps = final_maps(kafka_broker, out)
    assert_same_map(maps[SIM.scan_number][0], reference_maps((SIM,))[SIM.scan_number])
    assert committed_offsets(kafka_broker, group, topic) == end_offsets(kafka_broker, topic)


@pytest.mark.parametrize("missing", ["source", "maps"])
def test_a_pipeline_definition_with_a_missing_topic_is_refused_before_it_runs(
    kafka_broker, tmp_path: Path, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    """Before, a missing source topic failed the run in a worker, with a traceback, and a missing sink
    topic failed it once the input was read."""
    from beamops.cli import main as beamops_main

    topics = {"source": kafka_broker.new_topic(), "maps": kafka_broker.new_topic(prefix="com")}
    topics[missing] = f"missing-{uuid.uuid4().hex[:8]}"
    source = f"{{topic: {topics['source']}, start: earliest, stop: latest}}"
    definition = com_definition(kafka_broker, tmp_path, source, topics["maps"])
    assert beamops_main(["pipeline", "run", str(definition)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    hint = "; set create_topics: true in the kafka section to create it" if missing == "maps" else ""
    assert line == (
        f"beamops pipeline run: error: {definition}: {missing}: Kafka topic {topics[missing]!r} does not exist on "
        f"{kafka_broker.bootstrap_servers}{hint}"
    )
    if missing == "source":  # with create_topics, the source's topic is checked before the sinks' are made
        definition.write_text(definition.read_text().replace("kafka: {", "kafka: {create_topics: true, "))
        assert beamops_main(["pipeline", "run", str(definition)]) == 2
        assert f"{missing}: Kafka topic {topics[missing]!r} does not exist" in capsys.readouterr().err
        assert missing_topics(client_of(kafka_broker), [topics["maps"]]) == []  # it existed already
        made_here = f"com-{uuid.uuid4().hex[:8]}"
        definition.write_text(definition.read_text().replace(f"topic: {topics['maps']}", f"topic: {made_here}"))
        assert beamops_main(["pipeline", "run", str(definition)]) == 2
        assert missing_topics(client_of(kafka_broker), [made_here]) == [made_here]  # not made


def test_a_live_run_commits_up_to_the_end_of_a_transactional_topic(kafka_broker):
    """A transactional producer leaves a commit marker after its messages: the group must get past it."""
    topic = kafka_broker.new_topic(partitions=2)
    group = f"live-{uuid.uuid4().hex[:8]}"
    produce_in_transaction(kafka_broker, topic, [(b.to_bytes(), i % 2) for i, b in enumerate(SIM.batches(BATCH))])
    # 8 messages and a commit marker per partition. The markers are written after commit_transaction
    # returns, and a read_committed client sees the end (the last stable offset) move only then.
    ends = {0: 8 + 1, 1: 8 + 1}
    wait_for(lambda: end_offsets(kafka_broker, topic) == ends, 30, "transaction markers")

    args = job_topics(kafka_broker, topic)
    run_job(com_pipeline.main, kafka_broker, *args, "--group_id", group, "--start", "committed")
    maps = final_maps(kafka_broker, topic_arg(args, "--output_topic"))
    assert_same_map(maps[SIM.scan_number][0], reference_maps((SIM,))[SIM.scan_number])
    assert committed_offsets(kafka_broker, group, topic) == ends


@pytest.mark.parametrize(
    ("job", "extra", "message"),
    [
        (com_pipeline, ["--start", "offset:abc"], "bad start position 'offset:abc'"),
        (replay, ["--start", "earliest", "--stop", "sometime"], "bad stop position 'sometime'"),
        pytest.param(
            com_pipeline,
            ["--start", "committed"],
            "group",
            id="committed-without-group",
        ),
        pytest.param(
            replay,
            ["--start", "committed", "--stop", "latest"],
            "group",
            id="replay-from-committed",
        ),
    ],
)
def test_bad_read_positions_are_refused_before_the_pipeline_runs(kafka_broker, capsys, job, extra, message):
    """DESIGN §3: an invalid parameter is a clear error (exit 2) when the pipeline is built, not in a worker."""
    topic = kafka_broker.new_topic()
    argv = ["--bootstrap_servers", kafka_broker.bootstrap_servers, "--input_topic", topic]
    argv += ["--output_topic", kafka_broker.new_topic(prefix="com"), *extra]
    status = call_bounded(lambda: job.main(argv), what=job.__name__)
    assert status == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("job", [com_pipeline, replay])
def test_a_missing_output_topic_is_refused_before_the_input_is_read(kafka_broker, capsys, job):
    """Else the sink would find out only at its first write, after the whole input was reduced."""
    topic = kafka_broker.new_topic()
    publish(kafka_broker, topic, list(SIM.batches(BATCH)))
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    argv = ["--bootstrap_servers", kafka_broker.bootstrap_servers, "--input_topic", topic, "--start", "earliest"]
    argv += ["--stop", "latest", "--output_topic", missing]
    with log_records("beamops.io.kafka") as records:
        status = call_bounded(lambda: job.main(argv), what=job.__name__)
    assert status == 2
    assert f"Kafka topic {missing!r} does not exist on {kafka_broker.bootstrap_servers}" in capsys.readouterr().err
    assert not any("kafka read" in r.getMessage() for r in records)  # nothing was read


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stop", "never"], "a replay needs a bounded --stop"),
        (["--stop", "latest", "--output_topic", "SAME"], "--output_topic must differ from --input_topic"),
    ],
)
def test_a_replay_refuses_an_unbounded_range_or_its_input_as_output(kafka_broker, capsys, extra, message):
    topic = kafka_broker.new_topic()
    argv = ["--bootstrap_servers", kafka_broker.bootstrap_servers, "--input_topic", topic, "--start", "earliest"]
    status = call_bounded(lambda: replay.main(argv + [topic if a == "SAME" else a for a in extra]), what="replay")
    assert status == 2
    assert message in capsys.readouterr().err


def test_a_replay_refuses_a_group_id(kafka_broker, capsys):
    """A replay never uses a consumer group: --group_id is an error, and nothing is committed."""
    topic = kafka_broker.new_topic(partitions=2)
    group = f"live-{uuid.uuid4().hex[:8]}"
    publish(kafka_broker, topic, list(TINY.batches(4)))
    args = job_topics(kafka_broker, topic)
    with pytest.raises(SystemExit) as exit_info:
        replay.main(["--bootstrap_servers", kafka_broker.bootstrap_servers, *args, "--start", "earliest",
                     "--stop", "latest", "--group_id", group])  # fmt: skip
    assert exit_info.value.code == 2
    assert "never uses a consumer group" in capsys.readouterr().err
    assert committed_offsets(kafka_broker, group, topic) == {0: -1001, 1: -1001}


# --- sinks ---------------------------------------------------------------------------------------------------


def test_a_map_the_broker_refuses_fails_the_job_saying_why(kafka_broker):
    from beamops.io.kafka import write_com_maps_kafka

    topic = kafka_broker.new_topic(partitions=1, config={"max.message.bytes": "2000"})
    big = ComMap(SIM.header, *np.zeros((2, *SIM.header.scan_shape), np.float32), 16, 16, True, True)
    assert len(big.to_bytes()) > 2000
    client = KafkaClientConfig(kafka_broker.bootstrap_servers)
    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))
    _ = pipeline | beam.Create([big]) | write_com_maps_kafka(client=client, topic=topic)
    refused = rf"Kafka delivery to {topic!r} failed for 1 of 1 messages: Broker: Message size too large \[while"
    with pytest.raises(Exception, match=refused):
        pipeline.run().wait_until_finish()


# --- consumer lag -------------------------------------------------------------------------------------------


def lag_gauges(result: RunResult) -> dict[str, int]:
    found = result.metrics.query(MetricsFilter().with_namespace("beamops"))["gauges"]
    return {g.key.metric.name: g.committed.value for g in found if g.key.metric.name.startswith("consumer_lag.")}


def test_consumer_lag_of_a_read_that_stops_early(kafka_broker):
    topic = kafka_broker.new_topic(partitions=1)
    publish(kafka_broker, topic, list(TINY.batches(2)))  # 8 messages
    result = run_source(kafka_broker, topic, start="offset:1", stop="offset:6")
    assert sum(b.n_frames for b in result.outputs) == 10
    assert lag_gauges(result) == {f"consumer_lag.{topic}.0": 8 - 6}


def test_every_partition_reports_its_consumer_lag(kafka_broker):
    topic = kafka_broker.new_topic(partitions=3)
    publish(kafka_broker, topic, list(TINY.batches(2)))  # 8 messages: 3, 3, 2
    result = run_source(kafka_broker, topic, stop="offset:0=2,1=3,2=1")
    assert sum(b.n_frames for b in result.outputs) == 2 * (2 + 3 + 1)
    assert lag_gauges(result) == {
        f"consumer_lag.{topic}.0": 1,
        f"consumer_lag.{topic}.1": 0,
        f"consumer_lag.{topic}.2": 1,
    }


# --- a broker restart while the detector publishes and the pipeline reads -------------------------------


def test_a_broker_restart_while_reading_and_publishing_loses_nothing(kafka_broker):
    if kafka_broker.external:
        pytest.skip("restarts only a broker the fixture started")
    partitions = 3
    topic = kafka_broker.new_topic(partitions=partitions)
    group = f"live-{uuid.uuid4().hex[:8]}"
    batches = list(SIM.batches(BATCH))
    ends = round_robin_ends(len(batches), partitions)  # known in advance: one publisher, round-robin
    args = job_topics(kafka_broker, topic)
    stop = "offset:" + ",".join(f"{p}={n}" for p, n in ends.items())

    publisher = FramePublisher(client_of(kafka_broker), topic)
    head = 5
    publisher.publish_all(batches[:head])
    publisher.flush(30)

    published_at: list[float] = []

    def rest() -> int:
        # The rest of the scan, one batch every 0.4 s (about 4.5 s): across the restart.
        for batch in batches[head:]:
            publisher.publish(batch)
            published_at.append(time.monotonic())
            time.sleep(0.4)
        publisher.flush(90)
        return publisher.stats().batches

    argv = ["--bootstrap_servers", kafka_broker.bootstrap_servers, *args, "--group_id", group, "--stop", stop]
    with log_records("beamops.io.kafka") as records:
        reader = Background(lambda: com_pipeline.main(argv), "the pipeline")
        # The partitions are resolved, so the pipeline is reading and waits for the rest of the scan.
        wait_for(lambda: sum("]: offsets" in r.getMessage() for r in list(records)) >= partitions, 60, "read start")
        time.sleep(1.0)
        # On failure the message is its exit status (or its exception is raised here).
        assert reader.is_alive(), f"the pipeline ended before the rest of the scan was published: {reader.result(0)}"
        writer = Background(rest, "the publisher")
        time.sleep(0.5)
        old_pid = kafka_broker.status().pid
        restarting = time.monotonic()
        kafka_broker.restart()
        restarted = time.monotonic()
        published = writer.result(120)
        status = reader.result(120)
    assert published == len(batches)
    assert status == 0
    # It was a real restart, and the detector went on publishing while the broker was away.
    assert kafka_broker.status().pid != old_pid
    assert any(restarting < t < restarted for t in published_at), (restarting, restarted, published_at)

    assert end_offsets(kafka_broker, topic) == ends  # nothing lost, nothing written twice
    maps = final_maps(kafka_broker, topic_arg(args, "--output_topic"))
    assert sorted(maps) == [SIM.scan_number]
    com = maps[SIM.scan_number][0]
    assert com.complete and com.frames_seen == SIM.n_frames
    assert_same_map(com, reference_maps((SIM,))[SIM.scan_number])
    assert dead_letters(kafka_broker, topic_arg(args, "--dead_letter_topic")) == []
    assert committed_offsets(kafka_broker, group, topic) == ends


@pytest.mark.parametrize("job", [com_pipeline, replay])
def test_a_missing_input_topic_is_refused_before_the_job_runs(
    kafka_broker, tmp_path: Path, capsys: pytest.CaptureFixture[str], job: ModuleType
) -> None:
    """Else the running job failed in a worker, with a traceback and exit 1. Checked before the output
    topics are made (they were left behind), with the topic of the closest name."""
    meant = kafka_broker.new_topic()
    missing = f"{meant}s"  # a typo
    out = f"com-{uuid.uuid4().hex[:8]}"
    argv = ["--bootstrap_servers", kafka_broker.bootstrap_servers, "--input_topic", missing]
    argv += ["--start", "earliest", "--stop", "latest", "--out_dir", str(tmp_path)]
    argv += ["--output_topic", out, "--create_topics"]
    assert job.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        f"python -m {job.__name__}: error: Kafka topic {missing!r} does not exist on {kafka_broker.bootstrap_servers} "
        f"(did you mean {meant!r}?); check --input_topic (the topic the frames are published to)"
    ]
    assert missing_topics(client_of(kafka_broker), [out]) == [out]  # not made


def test_beamops_maps_lists_the_newest_map_of_each_scan_in_an_output_topic(kafka_broker, capsys):
    """On call, checking that every scan got a complete final map took a consumer script by hand."""
    from beamops.cli import main as beamops_main

    topic = kafka_broker.new_topic(partitions=2, prefix="maps")
    header_of = {n: replace(ScanSimulation(scan_shape=(3, 4), scan_number=n).header) for n in (1, 2)}

    def com_map(scan: int, frames: int, final: bool) -> bytes:
        zeros = np.zeros((3, 4), np.float32)
        return ComMap(header_of[scan], zeros, zeros, frames, min(frames, 12), final, final and frames == 12).to_bytes()

    with FramePublisher(KafkaClientConfig(kafka_broker.bootstrap_servers), topic) as publisher:
        for scan, frames, final in [(1, 6, False), (2, 4, False), (1, 12, True), (2, 9, True)]:
            publisher.publish_raw(com_map(scan, frames, final), key=str(scan), partition=scan - 1)
        publisher.publish_raw(b"not a map", key="x", partition=0)  # a topic others write to as well
    assert beamops_main(["maps", "--bootstrap_servers", kafka_broker.bootstrap_servers, "--topic", topic]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"scan 1: final, 12 frames, 12/12 positions  {topic}[0]@1",
        f"scan 2: final, INCOMPLETE, 9 frames, 9/12 positions  {topic}[1]@1",
    ]
    missing = f"{topic}-gone"
    assert beamops_main(["maps", "--bootstrap_servers", kafka_broker.bootstrap_servers, "--topic", missing]) == 2
    assert f"Kafka topic {missing!r} does not exist on {kafka_broker.bootstrap_servers}" in capsys.readouterr().err
