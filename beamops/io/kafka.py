"""Kafka source and sinks in pure Python, on confluent-kafka.

``read_kafka_frames`` reads a topic of encoded frame batches (one Arrow IPC
stream per message, key = scan number) as a splittable DoFn with one
restriction per partition: a partition is the unit of parallelism and the
restriction's position, the next offset, is the resume state. An unbounded
read hands its partition back to the runner (``defer_remainder``) as soon as it
has read all of it, or after ``max_read_s`` of reading: a worker reads its
partitions in turn, so a message waits at most for the others' turns. What
happens on resume: a runner that checkpoints (Flink) restarts each partition at the
offset after the last one whose output it committed; without a checkpoint, a
read with ``start=committed`` resumes at the consumer group's committed offset.
Offsets are committed to the group only for work whose results are safe: a
bounded read after the job's sinks wrote (``read_kafka_frames.commit_after``;
the jobs and pipeline definitions call it), an unbounded read when the runner
finalizes the bundle that read them (on Flink: once the checkpoint holding its
results is complete). A crash re-reads (at-least-once). An in-process runner
finalizes a bundle as soon as it ends, before the stages after a shuffle run:
there an unbounded read's commits can run ahead of its results.

Each message becomes a SparseFrameBatch stamped with the message timestamp
(event time); the watermark of a partition is the largest timestamp read, and
for an unbounded read that has read all of it, now less ``idle_watermark_lag_s``
(so an idle partition does not hold back the others). A
message that does not decode goes to ``dead_letter`` with its raw bytes, key
and headers, its topic, partition, offset and the error, and the read goes on.

The sinks write ComMaps and dead letters with an idempotent producer; a
delivery failure fails the bundle (nothing is dropped silently), and every
bundle ends with a flush.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import GlobalWindow, GlobalWindows, TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from pydantic import Field, field_validator, model_validator

from beamops.deadletter import DeadLetter
from beamops.frames import CONTENT_TYPE, SCHEMA_VERSION, FrameDecodeError, SparseFrameBatch, decode_sparse_batch
from beamops.io.kafka_config import (
    MAX_MESSAGE_BYTES,
    KafkaClientConfig,
    KafkaUnavailableError,
    ReadPosition,
    list_topics,
    never_stops,
    unreachable,
)
from beamops.operator import (
    DEAD_LETTER,
    LONGEST_DURATION_S,
    METRICS_NAMESPACE,
    Operator,
    OperatorMetrics,
    OperatorParameterError,
    OperatorParams,
    Port,
    did_you_mean,
)
from beamops.provenance import PROVENANCE_KEY, Provenance
from beamops.results import ComMap

log = logging.getLogger(__name__)

UNBOUNDED_STOP = sys.maxsize
CONTENT_TYPE_HEADER = "content-type"
SCHEMA_VERSION_HEADER = "beamops-schema-version"


READ_PROGRESS = "read_progress"


@dataclass(frozen=True)
class ReadProgress:
    """A bounded read of a partition got this far: every message before ``next_offset`` was decoded
    or sent to dead letters."""

    topic: str
    partition: int
    next_offset: int


@dataclass
class _ReadState:
    last_done: int | None = None  # the last offset claimed and handled
    watermark: Timestamp | None = None  # the estimator's watermark as this call last saw or set it

    def raise_watermark(self, estimator: ManualWatermarkEstimator, moment: Timestamp) -> None:
        """Move ``estimator`` to ``moment`` unless it is there already: a watermark never goes back.

        Compared with the value this call last set, not read from the estimator per message: only this
        call sets it, and Beam's thread-safe wrapper takes a lock for every read.
        """
        if self.watermark is None or moment > self.watermark:
            estimator.set_watermark(moment)
            self.watermark = moment


# When an unbounded read's next turn comes, at the earliest. Beam's Flink runner keeps only the whole
# seconds of it (BundleCheckpointHandlers), so there the next turn comes as soon as the slot is free.
_NEXT_TURN = Duration(seconds=0.05)

# The read's input comes from Create (through Reshuffle), so every element it reads is in the global
# window: its outputs carry that window directly instead of Beam assigning it per message.
_IN_GLOBAL_WINDOW = (GlobalWindow(),)


@dataclass(frozen=True)
class PartitionRead:
    """One partition's part of a read: offsets [start, stop); stop None = unbounded. ``of``: how many
    partitions the topic had when the read began (0: not known)."""

    topic: str
    partition: int
    start: int
    stop: int | None
    of: int = 0


class ReadFromKafkaParams(OperatorParams):
    topic: str = Field(description="Topic of encoded frame batches.")
    group_id: str | None = Field(
        None,
        description="Consumer group: where start=committed reads from, and where processed offsets are committed.",
    )
    start: str | None = Field(
        None,
        description=(
            "earliest | latest | committed | offset:N | offset:P=N,... | timestamp:T (ms, or ISO-8601: UTC if no "
            "zone). Unset: committed with a group_id (a partition without a commit from the log's start), else "
            "earliest. An offset no longer in the log starts at the log's start, with a warning; one past its end "
            "is an error, unless the stop leaves nothing to read there (stop=latest): then that partition is empty."
        ),
    )
    stop: str = Field(
        "latest",
        description=(
            "Exclusive end: latest (the end when the read starts) | never (unbounded; on Flink) | offset:N | "
            "offset:P=N,... | timestamp:T (a time that has passed)."
        ),
    )
    wait_past_end: bool = Field(
        True,
        description=(
            "A stop offset past the end of a partition's log: wait until the offsets up to it are written "
            "(true), or refuse the read (false; a replay refuses)."
        ),
    )
    commit_offsets: bool = Field(
        True,
        description=(
            "Commit processed offsets to group_id (ignored without one): a bounded read once the job's results are "
            "written, an unbounded one as the runner finalizes its bundles (on Flink: after each checkpoint)."
        ),
    )
    poll_timeout_s: float = Field(0.5, gt=0, description="Longest wait for one message (s).")
    max_read_s: float = Field(
        2.0,
        gt=0,
        description="The longest turn of an unbounded read (s): it yields to the runner after this long even if "
        "messages keep coming (and at once when it has read all of its partition); bounded reads ignore it.",
    )
    idle_watermark_lag_s: float = Field(
        30.0,
        ge=0,
        le=LONGEST_DURATION_S,
        description=(
            "An unbounded read that has read all of a partition moves that partition's watermark to this long "
            "before now (s), so an idle or empty partition does not hold back the event time of the others "
            "(and scans can time out); a message stamped earlier than that which arrives later is late."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _start_where_the_group_left_off(cls, data: Any) -> Any:
        # As any Kafka consumer with a group.id does: a rerun with the same group goes on from its
        # commits instead of reading (and emitting) everything again.
        if isinstance(data, dict) and data.get("start") is None:
            data = {**data, "start": "committed" if data.get("group_id") else "earliest"}
        return data

    @field_validator("start")
    @classmethod
    def _start(cls, value: str) -> str:
        ReadPosition.parse(value, stop=False)
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str) -> str:
        stop = ReadPosition.parse(value, stop=True)
        now_ms = int(time.time() * 1000)
        if stop.kind == "timestamp" and stop.timestamp_ms > now_ms:
            # Kafka finds offsets only for messages already written: the read would stop at today's end.
            raise ValueError(
                f"the stop time {_utc(stop.timestamp_ms)} is in the future (now {_utc(now_ms)}): a read can stop "
                "only at a time that has passed; use stop=never, or run the read after that time"
            )
        return value

    @model_validator(mode="after")
    def _committed_needs_a_group(self) -> ReadFromKafkaParams:
        if self.start.strip() == "committed" and not self.group_id:
            raise ValueError("start=committed needs a group_id (the group whose committed offsets to start from)")
        return self

    @property
    def unbounded(self) -> bool:
        return never_stops(self.stop)


def consumer_settings(client: KafkaClientConfig, group_id: str | None) -> dict[str, Any]:
    """The settings of the reader's consumers: throughput defaults, the user's settings over them, then
    what the reader relies on (manual assignment, no auto commit, end-of-partition events)."""
    # Throughput defaults (measured in bench/kafka_e2e.py); the user's settings win over them.
    tuning = {
        # librdkafka pauses up to 1 s once its local queue is full; a reader drains it at once.
        "fetch.queue.backoff.ms": 20,
        "max.partition.fetch.bytes": 16 * 1024 * 1024,
        # How long the broker holds a fetch that finds nothing new: a read that reached the end of its
        # partition learns it that much later (a live read then yields to the partitions it shares a worker with).
        "fetch.wait.max.ms": 10,
        # librdkafka drops the bootstrap connection once metadata names the broker, and connects to
        # the named one only after reconnect.backoff.ms / 2 (at least 11 ms): with the default 100 ms,
        # every new consumer's first request waits 50 ms (measured: list_topics 56 -> 16 ms).
        "reconnect.backoff.ms": 20,
    }
    return {
        **tuning,
        **client.client(
            **{
                # Partitions are assigned, never subscribed, so a group only matters for commits.
                "group.id": group_id or f"beamops-reader-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                # An offset gone from the log mid-read is handled by the reader, which says so (librdkafka
                # would jump to the log's start silently, or below the range the tracker can claim).
                "auto.offset.reset": "error",
            }
        ),
    }


METADATA_TIMEOUT_S = 30.0  # how long a read waits for the broker to answer before it fails


def _consumer(client: KafkaClientConfig, group_id: str | None) -> Any:
    from confluent_kafka import Consumer

    return Consumer(consumer_settings(client, group_id))


def _utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _offsets_at(consumer: Any, topic: str, ends: dict[int, tuple[int, int]], ms: int) -> dict[int, int]:
    """Per partition, the first offset whose timestamp is >= ``ms`` (the end if there is none)."""
    from confluent_kafka import TopicPartition

    found = consumer.offsets_for_times([TopicPartition(topic, q, ms) for q in ends], timeout=METADATA_TIMEOUT_S)
    _raise_partition_errors(found, topic, f"finding the offset at {_utc(ms)}")
    return {tp.partition: tp.offset if tp.offset >= 0 else ends[tp.partition][1] for tp in found}


def _raise_partition_errors(found: list[Any], topic: str, doing: str) -> None:
    """RuntimeError for a partition the broker answered with an error: read as "none", it would make
    the read skip that partition or start it over."""
    failed = [tp for tp in found if tp.error is not None]
    if failed:
        errors = "; ".join(f"partition {tp.partition}: {tp.error.str()}" for tp in failed)
        raise RuntimeError(f"Kafka topic {topic!r}: {doing} failed: {errors}")


class _ResolvePartitionsFn(beam.DoFn):
    """topic -> one PartitionRead per partition, with concrete start and stop offsets."""

    def __init__(self, client: KafkaClientConfig, params: ReadFromKafkaParams) -> None:
        self._client = client
        self._params = params

    def process(self, topic: str) -> Iterator[PartitionRead]:
        from confluent_kafka import KafkaException, TopicPartition

        p = self._params
        start = ReadPosition.parse(p.start, stop=False)
        stop = ReadPosition.parse(p.stop, stop=True)  # a stop time in the future was refused by the params
        # Said first: an unreachable broker is otherwise silence until the timeout.
        log.info(
            "kafka read %s: asking %s for its partitions (for up to %g s)",
            topic, self._client.bootstrap_servers, METADATA_TIMEOUT_S,
        )  # fmt: skip
        consumer = _consumer(self._client, p.group_id)
        try:
            try:
                meta = list_topics(consumer, topic, METADATA_TIMEOUT_S)
            except KafkaException as exc:
                raise RuntimeError(
                    f"reading topic {topic!r}: {unreachable(self._client.bootstrap_servers, METADATA_TIMEOUT_S, exc)}"
                ) from exc
            info = meta.topics.get(topic)
            if info is None or info.error is not None or not info.partitions:
                raise ValueError(f"Kafka topic {topic!r} does not exist on {self._client.bootstrap_servers}")
            partitions = sorted(info.partitions)
            ends = {
                q: consumer.get_watermark_offsets(TopicPartition(topic, q), timeout=METADATA_TIMEOUT_S)
                for q in partitions
            }
            committed = {}
            if start.kind == "committed":
                if not p.group_id:
                    raise ValueError("start=committed needs a group_id")
                found = consumer.committed([TopicPartition(topic, q) for q in partitions], timeout=METADATA_TIMEOUT_S)
                _raise_partition_errors(found, topic, f"reading group {p.group_id!r}'s committed offsets")
                committed = {tp.partition: tp.offset for tp in found}

            start_times = _offsets_at(consumer, topic, ends, start.timestamp_ms) if start.kind == "timestamp" else {}
            stop_times = _offsets_at(consumer, topic, ends, stop.timestamp_ms) if stop.kind == "timestamp" else {}
        finally:
            consumer.close()

        for position, what in ((start, "start"), (stop, "stop")):
            named = set(position.offsets) if isinstance(position.offsets, dict) else set()
            if named - set(partitions):
                raise ValueError(
                    f"the {what} position names partitions {sorted(named - set(partitions))} that Kafka topic "
                    f"{topic!r} does not have (it has {partitions[0]}..{partitions[-1]})"
                )
        to_read: int | None = 0  # offsets in the read's ranges; None: a range without end
        for q in partitions:
            low, high = ends[q]
            begin = {
                "earliest": low,
                "latest": high,
                "committed": committed.get(q, -1) if committed.get(q, -1) >= 0 else low,
                "offset": start.offset_for(q),
                "timestamp": start_times.get(q),
            }[start.kind]
            end = {
                "never": None,
                "latest": high,
                "offset": stop.offset_for(q),
                "timestamp": stop_times.get(q),
            }[stop.kind]
            if begin is None:
                continue  # offset:P=N lists only some partitions
            if stop.kind == "offset" and end is None:
                end = begin  # the stop map does not name this partition: read nothing from it
            # Two offsets are refused whatever the log holds; any other start only when it is in the log
            # (_start_in_log moves a start before the log, and reads nothing from one past its end).
            if end is not None and end < begin and (start.kind == stop.kind == "offset" or low <= begin <= high):
                raise ValueError(f"Kafka topic {topic!r} partition {q}: the stop ({end}) is before the start ({begin})")
            begin = _start_in_log(topic, q, begin, end, low, high)
            until = "(no end)" if end is None else end
            log.info("kafka read %s[%d]: offsets %d..%s (log %d..%d)", topic, q, begin, until, low, high)
            if end is not None and end > max(begin, high):
                if not p.wait_past_end:
                    raise ValueError(
                        f"Kafka topic {topic!r} partition {q}: the stop offset {end} is past the end of its log "
                        f"(next offset {high}), and this read does not wait for offsets to be written: stop at "
                        f"{high} or before (offset:P=N,... gives each partition its own), or stop=latest"
                    )
                log.warning(
                    "kafka read %s[%d]: the stop offset %d is past the end of the log (next offset %d): "
                    "the read waits for offsets up to it to be written",
                    topic, q, end, high,
                )  # fmt: skip
            to_read = None if end is None or to_read is None else to_read + max(end - begin, 0)
            yield PartitionRead(topic, q, begin, end, of=len(partitions))
        if to_read == 0:  # else a rerun that finds nothing new ends with "done" and no word why
            since = f" (group {p.group_id!r} has read up to there)" if start.kind == "committed" else ""
            log.info("kafka read %s: nothing to read between start %s and stop %s%s", topic, p.start, p.stop, since)


def _start_in_log(topic: str, partition: int, begin: int, end: int | None, low: int, high: int) -> int:
    """Where a read of a partition whose log holds offsets ``low..high-1`` starts, asked for ``begin``.

    Offsets before ``low`` are gone (retention, compaction, deleted records): the read starts at
    ``low`` and says so. A start past ``high`` is refused (Kafka cannot fetch an offset not yet
    written) unless the stop leaves nothing to read, which is said and read as empty. A stop before
    a start in the log is the caller's to refuse.
    """
    if begin < low:
        log.warning(
            "kafka read %s[%d]: offsets %d..%d are no longer in the log (retention or compaction removed "
            "them): the read starts at %d",
            topic, partition, begin, low - 1, low,
        )  # fmt: skip
        return low
    if begin > high and end is not None and end <= begin:
        # e.g. one offset:N for partitions of uneven length, with stop=latest: nothing to read here
        log.warning(
            "kafka read %s[%d]: the start offset %d is past the end of the log (next offset %d): nothing to read",
            topic, partition, begin, high,
        )  # fmt: skip
        return end
    if begin > high:
        raise ValueError(
            f"Kafka topic {topic!r} partition {partition}: the start offset {begin} is past the end of its "
            f"log (next offset {high}); start at {high} or before"
        )
    return begin


class _PartitionRestrictions(RestrictionProvider):
    def initial_restriction(self, read: PartitionRead) -> OffsetRange:
        stop = UNBOUNDED_STOP if read.stop is None else max(read.stop, read.start)
        return OffsetRange(read.start, stop)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, read: PartitionRead, restriction: OffsetRange) -> int:
        return restriction.size()

    def split(self, read: PartitionRead, restriction: OffsetRange) -> Iterator[OffsetRange]:
        yield restriction  # a partition is the unit of parallelism


_RESTRICTION_PARAM = beam.DoFn.RestrictionParam(_PartitionRestrictions())
_WATERMARK_PARAM = beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider())


class _ReadPartitionFn(beam.DoFn):
    """Reads one partition's restriction; decodes each message into a frame batch."""

    def __init__(self, name: str, client: KafkaClientConfig, params: ReadFromKafkaParams) -> None:
        self._name = name
        self._client = client
        self._params = params
        self._run = uuid.uuid4().hex  # one reader of one pipeline, the same in every worker
        self.commits_wired = False  # read_kafka_frames.commit_after was called (bounded reads commit there)

    def setup(self) -> None:
        # Consumers between reads, unassigned. Each read, finished or deferred, hands its consumer
        # back, so the next read of this instance, of any partition, starts on a connected one: a new
        # consumer's first fetch waits 10-70 ms for its connections.
        self._idle: list[Any] = []
        self._committer: Any = None  # commits of unbounded reads, made when first needed
        p = self._params
        if not p.unbounded and p.group_id and p.commit_offsets and not self.commits_wired:
            log.warning(
                "%s: this bounded read of %r commits its offsets to group %r only through "
                "read_kafka_frames.commit_after(<the sinks' outputs>), which this pipeline does not call: "
                "nothing is committed",
                self._name, p.topic, p.group_id,
            )  # fmt: skip
        self._metrics = OperatorMetrics(self._name)
        self._messages = Metrics.counter(METRICS_NAMESPACE, "messages_in")
        self._bytes = Metrics.counter(METRICS_NAMESPACE, "bytes_in")
        self._lost = Metrics.counter(METRICS_NAMESPACE, "offsets_lost")
        self._last_lag_check: dict[tuple[str, int], float] = {}
        log.debug("kafka reader for %r with %r", self._params.topic, self._client)  # once per worker and stage

    def teardown(self) -> None:
        for consumer in [*self._idle, self._committer]:
            if consumer is not None:
                with contextlib.suppress(Exception):  # close the others anyway
                    consumer.close()

    def _take_consumer(self) -> Any:
        return self._idle.pop() if self._idle else _consumer(self._client, self._params.group_id)

    def _give_back(self, consumer: Any) -> None:
        """Unassign ``consumer`` (librdkafka stops prefetching, up to 64 MiB, for a read that may wait
        for a checkpoint) and keep it for the next read."""
        try:
            consumer.unassign()
        except Exception:  # a consumer that cannot even unassign is not worth keeping
            with contextlib.suppress(Exception):  # the read itself went well
                consumer.close()
        else:
            self._idle.append(consumer)

    def process(
        self,
        read: PartitionRead,
        # Beam passes the finalizer positionally and the SDF parameters by name: keep this order.
        finalizer: Any = beam.DoFn.BundleFinalizerParam,
        tracker: OffsetRestrictionTracker = _RESTRICTION_PARAM,
        watermark: ManualWatermarkEstimator = _WATERMARK_PARAM,
    ) -> Iterator[Any]:
        from confluent_kafka import TopicPartition

        restriction = tracker.current_restriction()
        if restriction.start >= restriction.stop:
            return
        bounded = read.stop is not None
        consumer = self._take_consumer()
        state = _ReadState(watermark=watermark.current_watermark())
        try:
            consumer.assign([TopicPartition(read.topic, read.partition, restriction.start)])
            yield from self._read_messages(consumer, read, tracker, watermark, not bounded, state)
            if state.last_done is not None:
                self._report_lag_after_read(read, consumer, state.last_done + 1)
        except BaseException:
            with contextlib.suppress(Exception):  # never hide the exception the read is raising
                consumer.close()
            raise
        self._give_back(consumer)
        if state.last_done is None:
            return
        p = self._params
        if bounded:  # committed after the job's sinks wrote (read_kafka_frames.commit_after)
            yield pvalue.TaggedOutput(READ_PROGRESS, ReadProgress(read.topic, read.partition, state.last_done + 1))
        elif p.group_id and p.commit_offsets:  # when the runner finalizes the bundle (Flink: after its checkpoint)
            if self._committer is None:
                self._committer = _consumer(self._client, p.group_id)
            finalizer.register(
                _Committer(self._committer, self._run, p.group_id, read.topic, read.partition, state.last_done + 1)
            )

    def _read_messages(
        self,
        consumer: Any,
        read: PartitionRead,
        tracker: OffsetRestrictionTracker,
        watermark: ManualWatermarkEstimator,
        unbounded: bool,
        state: _ReadState,
    ) -> Iterator[Any]:
        """Claim and decode messages until the restriction is done; unbounded, until ``max_read_s`` passed or
        the partition is read to its end."""
        from confluent_kafka import KafkaError

        restriction = tracker.current_restriction()
        deadline = time.monotonic() + self._params.max_read_s
        if unbounded:  # once per call (every max_read_s at most), not per message
            _check_partition_count(consumer, read)
        while True:
            if unbounded and time.monotonic() > deadline:
                tracker.defer_remainder(_NEXT_TURN)
                return
            msg = consumer.poll(self._params.poll_timeout_s)
            if msg is None:
                continue
            if msg.topic() is not None and (msg.topic(), msg.partition()) != (read.topic, read.partition):
                continue  # an event of the consumer's previous read (consumers are reused), not an error of it
            if msg.error() is not None:
                err = msg.error()
                if err.code() == KafkaError._PARTITION_EOF:
                    self._report_lag(read, msg.offset(), msg.offset())
                    if msg.offset() >= restriction.stop:
                        # Control records or compaction can leave no message at stop - 1:
                        # claim it anyway, so the commit covers the whole range.
                        if tracker.try_claim(restriction.stop - 1):
                            state.last_done = restriction.stop - 1
                        return
                    if unbounded:
                        # All read: the runner reads the partitions a worker shares in turn, so a message on
                        # one of them waits until the turns of the others end.
                        self._advance_idle_watermark(watermark, state)
                        tracker.defer_remainder(_NEXT_TURN)
                        return
                    continue
                if err.code() == KafkaError._AUTO_OFFSET_RESET:
                    self._resume_after_lost_offsets(consumer, read, msg.offset())
                    continue
                if err.fatal():
                    raise RuntimeError(f"Kafka consumer for {read.topic}[{read.partition}] failed: {err}")
                log.warning("kafka %s[%d]: %s (retrying)", read.topic, read.partition, err)
                continue
            offset = msg.offset()
            if not tracker.try_claim(offset):
                return
            yield from self._decode(msg, read, watermark, state)
            state.last_done = offset
            if offset + 1 >= restriction.stop:
                return

    def _advance_idle_watermark(self, watermark: ManualWatermarkEstimator, state: _ReadState) -> None:
        """All of the partition is read: its event time is now, less the lag a message may still have."""
        state.raise_watermark(watermark, Timestamp.now() - Duration(seconds=self._params.idle_watermark_lag_s))

    def _resume_after_lost_offsets(self, consumer: Any, read: PartitionRead, asked: int) -> None:
        """The broker did not serve offset ``asked``: go on at the log's start if it was deleted, fetch it
        again if it is in the log, else (past the end: a topic deleted and created again) fail."""
        from confluent_kafka import TopicPartition

        low, high = consumer.get_watermark_offsets(
            TopicPartition(read.topic, read.partition), timeout=METADATA_TIMEOUT_S
        )
        if low <= asked <= high:  # the offset is there (a transient error of the broker): fetch it again
            log.warning(
                "kafka %s[%d]: offset %d was reported out of range but is in the log (%d..%d): retrying",
                read.topic, read.partition, asked, low, high - 1,
            )  # fmt: skip
            consumer.assign([TopicPartition(read.topic, read.partition, asked)])
            return
        if asked < low:
            log.warning(
                "kafka %s[%d]: offsets %d..%d were deleted while the read was behind them (retention, "
                "compaction, deleted records): they are lost; the read goes on at %d",
                read.topic, read.partition, asked, low - 1, low,
            )  # fmt: skip
            self._lost.inc(low - asked)
            consumer.assign([TopicPartition(read.topic, read.partition, low)])  # seek fails in this state
            return
        raise RuntimeError(
            f"Kafka topic {read.topic!r} partition {read.partition}: offset {asked} is past the end of its log "
            f"(offsets {low}..{high - 1}); was the topic deleted and created again? Start a new read (replay) of it"
        )

    def _decode(
        self, msg: Any, read: PartitionRead, watermark: ManualWatermarkEstimator, state: _ReadState
    ) -> Iterator[Any]:
        started = time.perf_counter()
        kind, ts_ms = msg.timestamp()
        event_time = Timestamp(micros=ts_ms * 1000) if kind != 0 and ts_ms >= 0 else Timestamp.now()
        state.raise_watermark(watermark, event_time)
        origin = {"topic": read.topic, "partition": read.partition, "offset": msg.offset(), "timestamp_ms": ts_ms}
        raw = msg.value() or b""
        headers = msg.headers()
        self._messages.inc()
        self._bytes.inc(len(raw))
        try:
            _check_headers(headers)
            batch = decode_sparse_batch(raw, origin)
        except FrameDecodeError as exc:
            # The key and headers too, so that a fixed message can be published again as it was.
            letter = DeadLetter.from_raw(self._name, raw, exc, origin, key=msg.key(), headers=headers or ())
            letter = self._metrics.dead_letter(letter)
            yield pvalue.TaggedOutput(DEAD_LETTER, TimestampedValue(letter, event_time))
            return
        self._metrics.observe(batch, started)
        self._metrics.frames_out.inc(batch.n_frames)
        yield WindowedValue(batch, event_time, _IN_GLOBAL_WINDOW)

    def _report_lag_after_read(self, read: PartitionRead, consumer: Any, position: int) -> None:
        """The lag where a read stopped (at most every 5 s per partition), against the end offset of its
        last fetch: asking the broker would wait behind our own long poll."""
        from confluent_kafka import TopicPartition

        if time.monotonic() - self._last_lag_check.get((read.topic, read.partition), 0.0) < 5.0:
            return
        try:
            _, high = consumer.get_watermark_offsets(TopicPartition(read.topic, read.partition), cached=True)
        except Exception:  # lag is informative; never fail a read for it
            return
        if high >= 0:
            self._report_lag(read, high, position)

    def _report_lag(self, read: PartitionRead, high: int, position: int) -> None:
        self._last_lag_check[(read.topic, read.partition)] = time.monotonic()
        Metrics.gauge(METRICS_NAMESPACE, f"consumer_lag.{read.topic}.{read.partition}").set(max(high - position, 0))


PARTITION_CHECK_EVERY_S = 60.0
_partition_checked: dict[str, float] = {}


def _check_partition_count(consumer: Any, read: PartitionRead) -> None:
    """Every PARTITION_CHECK_EVERY_S per topic and process: say so if the topic has partitions this read
    does not (they were added after it began; it reads the partitions it found then)."""
    now = time.monotonic()
    if not read.of or now - _partition_checked.get(read.topic, -float("inf")) < PARTITION_CHECK_EVERY_S:
        return
    _partition_checked[read.topic] = now
    try:
        info = consumer.list_topics(read.topic, timeout=5).topics.get(read.topic)
    except Exception:  # informative only; the read goes on
        return
    if info is not None and info.partitions and len(info.partitions) > read.of:
        unread = sorted(q for q in info.partitions if q >= read.of)
        Metrics.gauge(METRICS_NAMESPACE, f"partitions_not_read.{read.topic}").set(len(unread))
        log.error(
            "Kafka topic %r now has %d partitions; this read began with %d and does not read %s: the frames "
            "published there are missing from its maps. Restart the job (start=committed) to read them all",
            read.topic, len(info.partitions), read.of, unread,
        )  # fmt: skip


def _check_headers(headers: list[tuple[str, bytes]] | None) -> None:
    for key, value in headers or []:
        if key == CONTENT_TYPE_HEADER and value and value.decode(errors="replace") != CONTENT_TYPE:
            raise FrameDecodeError(f"content-type {value!r} is not {CONTENT_TYPE}")
        if key == SCHEMA_VERSION_HEADER and value and value.decode(errors="replace") != str(SCHEMA_VERSION):
            raise FrameDecodeError(f"unknown schema version {value!r} in the message headers")


class _Committer:
    """Commits a partition's next offset once the runner has committed the bundle that read it.

    ``consumer`` is the reader's commit consumer, shared by its committers: the SDK harness may
    finalize bundles on several threads, and librdkafka's commit is thread-safe.
    """

    def __init__(self, consumer: Any, run: str, group_id: str, topic: str, partition: int, offset: int) -> None:
        self._consumer, self._run, self._group_id = consumer, run, group_id
        self._topic, self._partition, self._offset = topic, partition, offset

    def __call__(self) -> None:
        from confluent_kafka import TopicPartition

        try:
            with _committed_lock:  # held across the commit, so a lower one cannot land after a higher one
                if _furthest_commit(self._run, self._group_id, self._topic, self._partition, self._offset):
                    self._consumer.commit(
                        offsets=[TopicPartition(self._topic, self._partition, self._offset)], asynchronous=False
                    )
        except Exception as exc:  # a later commit covers it; re-reading is the at-least-once fallback
            log.warning("commit of %s[%d]@%d failed: %s", self._topic, self._partition, self._offset, exc)


_committed: dict[tuple[str, str, str, int], int] = {}
_committed_lock = threading.Lock()


def _furthest_commit(run: str, group_id: str, topic: str, partition: int, offset: int) -> bool:
    """True if ``offset`` is past what this process committed for the partition in this ``run`` (one
    reader of one pipeline), and records it. Call it holding ``_committed_lock``.

    The SDK harness finalizes bundles on a thread pool, so two commits of one partition can land out
    of order: the later, lower one would move the group back (and a restart re-read more).
    """
    key = (run, group_id, topic, partition)
    if offset <= _committed.get(key, -1):
        return False
    _committed[key] = offset
    return True


_WRITTEN = ""  # the mark of each element a sink wrote


class _CommitFn(beam.DoFn):
    """Commits each partition's furthest read offset to the group, given all progress and written marks."""

    def __init__(self, client: KafkaClientConfig, group_id: str) -> None:
        self._client = client
        self._group_id = group_id

    def setup(self) -> None:
        self._consumer = _consumer(self._client, self._group_id)

    def teardown(self) -> None:
        consumer = getattr(self, "_consumer", None)
        if consumer is not None:
            consumer.close()

    def process(self, grouped: tuple[int, Iterable[str]]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        furthest: dict[tuple[str, int], int] = {}
        for mark in grouped[1]:
            if mark != _WRITTEN:  # what a sink wrote only made this wait
                topic, partition, offset = json.loads(mark)
                furthest[topic, partition] = max(offset, furthest.get((topic, partition), offset))
        for (topic, partition), offset in sorted(furthest.items()):
            try:
                self._consumer.commit(offsets=[TopicPartition(topic, partition, offset)], asynchronous=False)
            except KafkaException as exc:
                raise RuntimeError(
                    f"the results were written, but committing {topic}[{partition}] up to offset {offset} for "
                    f"group {self._group_id!r} failed: {exc.args[0].str()}; a read from the committed offsets "
                    "reads them again"
                ) from exc
            log.info("committed %s[%d] up to offset %d for group %r", topic, partition, offset, self._group_id)


class _CommitAfter(beam.PTransform):
    """ReadProgress -> offsets committed to ``group_id`` once every PCollection in ``written`` is complete."""

    def __init__(self, client: KafkaClientConfig, group_id: str, written: tuple[pvalue.PCollection, ...]) -> None:
        super().__init__()
        self._client = client
        self._group_id = group_id
        self._written = written

    def expand(self, progress: pvalue.PCollection) -> pvalue.PCollection:
        # One GroupByKey over the progress and a mark per written PCollection fires once all its inputs are
        # complete, so the commit follows the sinks. (Side inputs would do it too, but Beam's Flink runner
        # fails to checkpoint the state of a ParDo with side inputs.) The marks are strings, a coder
        # Flink's own state handles.
        marks = [
            progress
            | "ProgressGlobal" >> beam.WindowInto(GlobalWindows())
            | "Progress"
            >> beam.Map(lambda r: (0, json.dumps([r.topic, r.partition, r.next_offset]))).with_output_types(
                tuple[int, str]
            )
        ]
        for i, pc in enumerate(self._written):
            marks.append(
                pc
                | f"WrittenGlobal{i}" >> beam.WindowInto(GlobalWindows())
                # One mark per PCollection, once it is complete (without_defaults: no side input).
                | f"Written{i}" >> beam.CombineGlobally(lambda _: _WRITTEN).without_defaults()
                | f"Mark{i}" >> beam.Map(lambda mark: (0, mark)).with_output_types(tuple[int, str])
            )
        return (
            marks
            | "All" >> beam.Flatten()
            | "WaitForAll" >> beam.GroupByKey()
            | "Commit" >> beam.ParDo(_CommitFn(self._client, self._group_id))
        )


@beam.DoFn.unbounded_per_element()
class _ReadUnboundedPartitionFn(_ReadPartitionFn):
    """The same reader, declared unbounded so streaming runners treat it as a stream."""


class read_kafka_frames(Operator):  # noqa: N801 - catalog names are lowercase like the decorated operators
    """Encoded sparse frame batches from a Kafka topic, one restriction per partition."""

    name = "read_kafka_frames"
    title = "Read frames from Kafka"
    description = (
        "Reads a topic of Arrow-encoded sparse frame batches from a start to a stop position (offsets, "
        "timestamps, the group's committed offsets, or unbounded); undecodable messages go to dead letters."
    )
    Params = ReadFromKafkaParams
    outputs = {"frames": Port(SparseFrameBatch, "Decoded frame batches, stamped with the message time")}

    def __init__(
        self, params: OperatorParams | Mapping[str, Any] | None = None, /, *, client: KafkaClientConfig, **kwargs: Any
    ) -> None:
        super().__init__(params, **kwargs)
        if "group.id" in client.settings:
            # Else the reader would quietly use a group of its own and commit nothing to this one.
            raise OperatorParameterError(
                f"operator {self.name!r}: give the consumer group as group_id (--group_id), not as group.id in "
                "the Kafka settings"
            )
        self.client = client

    def build(self, root: pvalue.PBegin) -> Mapping[str, pvalue.PCollection]:
        p = self.params
        read = beam.ParDo((_ReadUnboundedPartitionFn if p.unbounded else _ReadPartitionFn)(self.name, self.client, p))
        results = (
            root
            | "Topic" >> beam.Create([p.topic])
            | "Partitions" >> beam.ParDo(_ResolvePartitionsFn(self.client, p))
            | "SpreadPartitions" >> beam.Reshuffle()
            | "Read" >> read.with_outputs(DEAD_LETTER, READ_PROGRESS, main="frames")
        )
        # read.fn, not the DoFn given to it: ParDo keeps a copy, the one that is sent to the workers.
        self._reader, self._progress = read.fn, results[READ_PROGRESS]
        return {"frames": results.frames, DEAD_LETTER: results[DEAD_LETTER]}

    def commit_after(self, *written: pvalue.PCollection) -> None:
        """Commit a bounded read's offsets to ``group_id`` once every PCollection in ``written`` is complete.

        Pass the outputs of the job's sinks (maps, dead letters), so a run that fails before its results
        are written commits nothing and the next run from the committed offsets reads the range again.
        Without this call a bounded read commits nothing. An unbounded read commits by itself, when the
        runner finalizes each bundle (on Flink: once the checkpoint holding its results is complete);
        for it, and without a group or with ``commit_offsets`` false, this does nothing. The commit
        step is named after the reader: ``<its label>.commit``.
        """
        p = self.params
        if p.unbounded or not p.group_id or not p.commit_offsets:
            return
        if not hasattr(self, "_progress"):
            raise ValueError("commit_after: apply the reader to the pipeline first")
        if not written:
            raise ValueError("commit_after needs the PCollections the job writes (its sinks' outputs)")
        reader_label = self._progress.producer.full_label.rsplit("/", 2)[0]  # <label>/Read/ParDo(...)
        self._progress | f"{reader_label}.commit" >> _CommitAfter(self.client, p.group_id, written)
        self._reader.commits_wired = True


def ensure_topic(client: KafkaClientConfig, topic: str, partitions: int = 1, replication: int = -1) -> bool:
    """Create ``topic`` unless it exists (replication -1: the broker's default). True if created."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(client.client())
    future = admin.create_topics([NewTopic(topic, partitions, replication)], operation_timeout=30)[topic]
    try:
        future.result(timeout=METADATA_TIMEOUT_S)
    except TimeoutError as exc:
        raise KafkaUnavailableError(
            f"cannot create topic {topic!r}: no answer from Kafka at {client.bootstrap_servers} "
            f"within {METADATA_TIMEOUT_S:g} s"
        ) from exc
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise RuntimeError(f"cannot create topic {topic!r} on {client.bootstrap_servers}: {exc}") from exc
        return False
    log.info("created topic %r with %d partition%s", topic, partitions, "" if partitions == 1 else "s")
    return True


def missing_topics(client: KafkaClientConfig, topics: Iterable[str]) -> list[str]:
    """Those of ``topics`` Kafka does not have, from one metadata request; KafkaUnavailableError if
    Kafka does not answer."""
    topics = list(topics)
    if not topics:
        return []
    existing = topic_names(client)
    return [t for t in topics if t not in existing]


def topic_names(client: KafkaClientConfig) -> set[str]:
    """The topics Kafka has (without an error), from one metadata request."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    try:
        meta = list_topics(AdminClient(client.client()), None, METADATA_TIMEOUT_S)
    except KafkaException as exc:
        raise _unreachable(client, exc) from exc
    return {name for name, topic in meta.topics.items() if topic.error is None}


def _unreachable(client: KafkaClientConfig, exc: Any) -> KafkaUnavailableError:
    """The error for a metadata request that ``exc`` (a KafkaException) says got no answer."""
    return KafkaUnavailableError(unreachable(client.bootstrap_servers, METADATA_TIMEOUT_S, exc))


def closest_topic(topic: str, existing: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for a topic of ``existing`` whose name is close to ``topic`` (not one of
    Kafka's own, ``__consumer_offsets``), else ""."""
    return did_you_mean(topic, [t for t in existing if not t.startswith("__")])


def refuse_missing_topics(client: KafkaClientConfig, checks: Iterable[tuple[list[str], str, str]]) -> None:
    """Before a job runs: OperatorParameterError for the first of ``checks`` (topics, what the message
    starts with, what it ends with) whose topics Kafka does not all have, naming those it lacks (and a
    topic it has of a close name); one metadata request. KafkaUnavailableError if Kafka does not answer."""
    checks = [c for c in checks if c[0]]
    if not checks:
        return
    existing = topic_names(client)
    for topics, prefix, hint in checks:
        absent = [t for t in topics if t not in existing]
        if absent:
            close = "".join(closest_topic(t, existing) for t in absent)
            raise OperatorParameterError(f"{prefix}{_no_such_topics(client, absent)}{close}{hint}")


def _no_such_topics(client: KafkaClientConfig, missing: list[str]) -> str:
    names = ", ".join(repr(t) for t in missing)
    verb = "do not exist" if len(missing) > 1 else "does not exist"
    return f"Kafka topic{'s' if len(missing) > 1 else ''} {names} {verb} on {client.bootstrap_servers}"


def _partition_ends(client: KafkaClientConfig, consumer: Any, topic: str) -> dict[int, tuple[int, int]] | None:
    """Each partition's (first offset, end) of ``topic``, None if it does not exist; KafkaUnavailableError if
    Kafka does not answer."""
    from confluent_kafka import KafkaException, TopicPartition

    try:
        meta = list_topics(consumer, topic, METADATA_TIMEOUT_S).topics.get(topic)
        if meta is None or meta.error is not None:
            return None
        return {
            partition: consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=METADATA_TIMEOUT_S)
            for partition in meta.partitions
        }
    except KafkaException as exc:
        raise _unreachable(client, exc) from exc


def _read(consumer: Any, topic: str, ranges: dict[int, tuple[int, int]]) -> Iterator[Any]:
    """The messages of ``topic`` in ``ranges`` (partition -> (start, end), end exclusive), in offset order per
    partition. A partition whose messages stop coming for the metadata timeout is left, with a warning."""
    from confluent_kafka import KafkaError, TopicPartition

    ends = {p: end for p, (_, end) in ranges.items()}
    waiting = {p for p, (start, end) in ranges.items() if end > start}
    consumer.assign([TopicPartition(topic, p, ranges[p][0]) for p in sorted(waiting)])
    deadline = time.monotonic() + METADATA_TIMEOUT_S
    while waiting and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.partition() not in waiting:
            continue
        deadline = time.monotonic() + METADATA_TIMEOUT_S
        if msg.error() is not None:
            if msg.error().code() == KafkaError._PARTITION_EOF:  # the last offsets held no message (markers)
                waiting.discard(msg.partition())
            continue
        yield msg
        if msg.offset() + 1 >= ends[msg.partition()]:
            waiting.discard(msg.partition())
    if waiting:
        log.warning(
            "could not read %r partition(s) %s to their end within %g s", topic, sorted(waiting), METADATA_TIMEOUT_S
        )


def newest_messages(client: KafkaClientConfig, topic: str) -> list[Any]:
    """The newest message of each partition of ``topic`` (none for a topic that does not exist, or an empty
    partition); joins no group. A partition whose newest message does not come within the metadata timeout
    is left out, with a warning. KafkaUnavailableError if Kafka does not answer."""
    consumer = _consumer(client, None)
    try:
        ends = _partition_ends(client, consumer, topic) or {}
        return list(_read(consumer, topic, {p: (max(low, high - 1), high) for p, (low, high) in ends.items()}))
    finally:
        consumer.close()


def messages_in(client: KafkaClientConfig, topic: str) -> Iterator[Any]:
    """Every message ``topic`` holds when called, in offset order per partition; joins no group. ValueError for
    a topic that does not exist, KafkaUnavailableError if Kafka does not answer."""
    consumer = _consumer(client, None)
    try:
        ends = _partition_ends(client, consumer, topic)
        if ends is None:
            raise ValueError(_no_such_topics(client, [topic]))
        yield from _read(consumer, topic, ends)
    finally:
        consumer.close()


def live_writers_of(client: KafkaClientConfig, topic: str) -> set[str]:
    """The live reads (see :func:`live_reads`) that made the newest message of each partition of ``topic``,
    from their ``beamops-provenance`` headers. Empty for a topic that does not exist or is empty, and for
    messages without provenance (not written by beamops' sinks). KafkaUnavailableError if Kafka does not
    answer."""
    found: set[str] = set()
    for msg in newest_messages(client, topic):
        for key, value in msg.headers() or ():
            if key == PROVENANCE_KEY and value:
                with contextlib.suppress(ValueError, KeyError, TypeError):  # not beamops' JSON: not a map of ours
                    found |= live_reads(Provenance.from_json(value))
    return found


def newest_scan_number(client: KafkaClientConfig, topic: str) -> int | None:
    """The largest scan number among the newest messages of ``topic``'s partitions (a frame message's key is
    its scan number in decimal), None if there is none. KafkaUnavailableError if Kafka does not answer."""
    numbers = [int(key) for msg in newest_messages(client, topic) if (key := msg.key() or b"").isdigit()]
    return max(numbers, default=None)


def live_reads(provenance: Provenance) -> set[str]:
    """The Kafka reads in ``provenance`` that a live job makes, described for people: a read with a
    consumer group (``consumer group 'g'``) or one that never stops (``an unbounded read of 't'``).
    A replay's read is neither."""
    reads = set()
    for step in provenance.steps:
        params = step.params
        if step.operator != read_kafka_frames.name or not isinstance(params, dict):
            continue
        if params.get("group_id"):
            reads.add(f"consumer group {str(params['group_id'])!r}")
        elif isinstance(params.get("stop"), str) and never_stops(params["stop"]):
            reads.add(f"an unbounded read of {str(params.get('topic'))!r}")
    return reads


# --- sinks -------------------------------------------------------------------

Record = tuple[bytes | None, bytes, list[tuple[str, bytes | None]]]


def com_map_record(com: ComMap) -> Record:
    """Key = scan number; value = ComMap Arrow IPC (see ComMap.to_bytes); headers say what it is."""
    headers = [
        (CONTENT_TYPE_HEADER, CONTENT_TYPE.encode()),
        (SCHEMA_VERSION_HEADER, str(SCHEMA_VERSION).encode()),
        ("beamops-kind", b"com_map"),
        ("beamops-final", b"1" if com.final else b"0"),
        ("beamops-complete", b"1" if com.complete else b"0"),
    ]
    return str(com.scan_number).encode(), com.to_bytes(), headers


def dead_letter_record(letter: DeadLetter) -> Record:
    """A dead letter as a Kafka message, from which a fixed message can be published again as it was.

    Key = a Kafka source's message's own key (none if it had none: ``headers`` is not None for such a
    letter), else the operator's name. Value = the original bytes. Headers = the original message's headers
    (if any), then ``beamops-operator``, ``beamops-instance`` (when known), ``beamops-error-type``,
    ``beamops-error``, ``beamops-payload-format``, ``beamops-origin`` (JSON): the original headers
    are those before the last ``beamops-operator`` header.
    """
    instance = [("beamops-instance", letter.instance.encode())] if letter.instance is not None else []
    ours: list[tuple[str, bytes | None]] = [
        ("beamops-operator", letter.operator.encode()),
        *instance,
        ("beamops-error-type", letter.error_type.encode()),
        ("beamops-error", letter.error[:4000].encode(errors="replace")),
        ("beamops-payload-format", letter.payload_format.encode()),
        ("beamops-origin", json.dumps(letter.origin, default=str).encode()),
    ]
    from_a_source = letter.headers is not None
    key = letter.key if from_a_source else letter.operator.encode()
    return key, letter.payload, [*(letter.headers or ()), *ours]


def _drop_queued(producer: Any) -> None:
    """Drop what ``producer`` still has queued or in flight (their delivery reports are served at once)."""
    producer.purge()
    producer.flush(0)


class KafkaWriteParams(OperatorParams):
    topic: str = Field(description="Topic to write to.")
    flush_timeout_s: float = Field(
        120.0,
        gt=0,
        description=(
            "Longest wait for delivery at the end of a bundle (s); librdkafka retries a message this long "
            "(message.timeout.ms) unless the client settings say otherwise."
        ),
    )


class _WriteFn(beam.DoFn):
    def __init__(
        self,
        client: KafkaClientConfig,
        params: KafkaWriteParams,
        encode: Callable[[Any], Record],
        extra_headers: list[tuple[str, bytes]],
    ) -> None:
        self._client = client
        self._params = params
        self._encode = encode
        self._extra_headers = extra_headers

    def setup(self) -> None:
        from confluent_kafka import Producer

        defaults = {
            "message.max.bytes": MAX_MESSAGE_BYTES,
            "linger.ms": 5,
            # A message librdkafka still retries after the flush gave up would be sent again by the
            # bundle's retry: let it fail by then, so the bundle fails with its reason.
            "message.timeout.ms": int(self._params.flush_timeout_s * 1000),
        }
        self._producer = Producer({**defaults, **self._client.client(**{"enable.idempotence": True, "acks": "all"})})
        self._written = Metrics.counter(METRICS_NAMESPACE, "messages_out")

    def teardown(self) -> None:
        producer = getattr(self, "_producer", None)
        if producer is not None:  # nothing is queued after a bundle that finished; after one that failed, drop it
            _drop_queued(producer)

    def start_bundle(self) -> None:
        self._pending: list[tuple[Any, Timestamp, Any]] = []
        self._failures: list[str] = []
        self._delivered: list[tuple[str, Timestamp, Any]] = []

    def process(
        self, element: Any, timestamp: Timestamp = beam.DoFn.TimestampParam, window: Any = beam.DoFn.WindowParam
    ) -> None:
        key, value, headers = self._encode(element)
        if self._extra_headers:
            headers = [*headers, *self._extra_headers]

        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                self._failures.append(err.str())
            else:
                self._delivered.append((f"{msg.topic()}:{msg.partition()}:{msg.offset()}", timestamp, window))

        while True:
            try:
                self._producer.produce(
                    self._params.topic, value=value, key=key, headers=headers, on_delivery=on_delivery
                )
                break
            except BufferError:  # the local queue is full: let deliveries drain, then retry
                self._producer.poll(0.5)
        self._producer.poll(0)

    def finish_bundle(self) -> Iterator[WindowedValue]:
        wait_s = self._params.flush_timeout_s + 5.0  # past message.timeout.ms: the messages that time out say so
        remaining = self._producer.flush(wait_s)
        failures = list(self._failures)
        if failures or remaining:
            problems = ["; ".join(sorted(set(failures))[:3])] if failures else []
            if remaining:
                problems.append(f"{remaining} not delivered within {wait_s:g} s")
            # The bundle is retried: what is still queued must not be delivered after it as well.
            _drop_queued(self._producer)
            raise RuntimeError(
                f"Kafka delivery to {self._params.topic!r} failed for {len(failures) + remaining} of "
                f"{len(failures) + remaining + len(self._delivered)} messages: {'; '.join(problems)}"
            )
        self._written.inc(len(self._delivered))
        for where, timestamp, window in self._delivered:
            yield WindowedValue(where, timestamp, [window or GlobalWindow()])


class _KafkaSink(Operator):
    Params = KafkaWriteParams
    encode: Callable[[Any], Record]
    #: Add a ``beamops-provenance`` header (the operators and parameters that made the element) to each message.
    writes_provenance: ClassVar[bool] = False

    def __init__(
        self, params: OperatorParams | Mapping[str, Any] | None = None, /, *, client: KafkaClientConfig, **kwargs: Any
    ) -> None:
        super().__init__(params, **kwargs)
        self.client = client

    def build(self, main: pvalue.PCollection) -> Mapping[str, pvalue.PCollection]:
        extra = [(PROVENANCE_KEY, self.provenance.to_json().encode())] if self.writes_provenance else []
        written = main | "Produce" >> beam.ParDo(_WriteFn(self.client, self.params, type(self).encode, extra))
        # Delivery failures fail the bundle (Beam retries it), so nothing reaches dead letters here.
        nothing = main.pipeline | "NoDeadLetters" >> beam.Create([]).with_output_types(DeadLetter)
        return {"written": written, DEAD_LETTER: nothing}


class write_com_maps_kafka(_KafkaSink):  # noqa: N801
    """ComMaps (progressive and final) to a Kafka topic, key = scan number, value = Arrow IPC; the
    ``beamops-provenance`` header holds the operators and parameters that made the maps (JSON)."""

    name = "write_com_maps_kafka"
    title = "Write COM maps to Kafka"
    description = "Writes each ComMap as one Arrow IPC message keyed by scan number, with an idempotent producer."
    inputs = {"in": Port(ComMap, "Center-of-mass maps")}
    outputs = {"written": Port(str, "topic:partition:offset of each delivered message")}
    encode = staticmethod(com_map_record)
    writes_provenance = True


class write_dead_letters_kafka(_KafkaSink):  # noqa: N801
    """Dead letters to a Kafka topic: the original bytes, key and headers, then the error and origin in
    beamops-* headers (see :func:`dead_letter_record`)."""

    name = "write_dead_letters_kafka"
    title = "Write dead letters to Kafka"
    description = "Writes each dead letter's original bytes, with operator, error and origin in the message headers."
    inputs = {"in": Port(DeadLetter, "Failed elements")}
    outputs = {"written": Port(str, "topic:partition:offset of each delivered message")}
    encode = staticmethod(dead_letter_record)
