"""Publish frame batches to a Kafka topic: the detector side of the pipeline.

    client = KafkaClientConfig.load("127.0.0.1:9092")
    with FramePublisher(client, "frames", rate=20_000) as publisher:
        for batch in ScanSimulation(scan_number=7).batches(1000):
            publisher.publish(batch)
    print(publisher.stats())

Each batch becomes one message, as the Kafka source reads it: value = the batch's Arrow IPC
stream, key = the scan number (decimal ASCII), headers ``content-type`` and
``beamops-schema-version``.

Partitions. ``"round-robin"`` (the default) sends consecutive batches to consecutive
partitions, so one scan is spread over all of them and its frames reach the reduce from
several readers; ``"by-scan"`` leaves the choice to the key hash, so a scan stays in one
partition, in order.

Delivery. The producer is idempotent (``enable.idempotence``, ``acks=all``): librdkafka
retries until ``message.timeout.ms`` (five minutes by default here) and never writes a
message twice or out of order, so a broker that restarts while a scan is published loses
nothing and duplicates nothing. While the broker is away ``publish`` keeps queueing (and
blocks when the local queue is full) and ``flush`` waits. A message that still fails is
recorded; ``flush`` (and leaving the ``with`` block) raises :class:`PublishError` naming the
failures, so nothing is dropped silently. A fatal producer error also fails the next ``publish``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from beamops.frames import CONTENT_TYPE, SCHEMA_VERSION, FrameBatch
from beamops.io.kafka import CONTENT_TYPE_HEADER, SCHEMA_VERSION_HEADER
from beamops.io.kafka_config import (
    MAX_MESSAGE_BYTES,
    KafkaClientConfig,
    list_topics,
    rdkafka_logger,
    redact,
    unreachable,
)

log = logging.getLogger(__name__)

Partitioner = Literal["round-robin", "by-scan"]
PARTITIONERS: tuple[str, ...] = ("round-robin", "by-scan")
DEFAULT_MESSAGE_TIMEOUT_MS = 300_000
Header = tuple[str, bytes | str]


class PublishError(RuntimeError):
    """Messages could not be delivered, or the topic cannot be written to."""


class TopicNotFoundError(PublishError):
    """The topic does not exist (and is not created automatically)."""


class RateLimiter:
    """Paces batches so that frames leave at ``rate`` frames/s on average.

    Schedule-based: a batch of ``n`` frames is due ``n / rate`` seconds after the previous
    one, as if a detector had just finished acquiring it, so the first batch also waits. A
    publisher that falls behind catches up by bursting, but by at most ``max_lag_s`` worth
    of frames; a batch ready after it was due never waits, and counts in ``late_frames``.
    ``rate`` None or 0 means no limit.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        max_lag_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate is not None and rate < 0:
            raise ValueError(f"rate must be >= 0 frames/s (0 or None: unlimited), got {rate}")
        self.rate = rate or None
        self.max_lag_s = max_lag_s
        self._clock = clock
        self._sleep = sleep
        self._due: float | None = None
        #: Total time spent waiting, s.
        self.waited_s = 0.0
        #: Frames that were ready only after their time: behind the schedule (a burst after a stall too).
        self.late_frames = 0

    def wait(self, frames: int) -> float:
        """Sleep until ``frames`` more frames may leave; returns the time slept (s)."""
        if self.rate is None:
            return 0.0
        now = self._clock()
        span = frames / self.rate
        if self._due is not None and now >= self._due + span - 1e-6:
            self.late_frames += frames  # ready after the schedule had it due: the publisher is behind
        if self._due is None:
            self._due = now + span
        else:  # a stall earns a burst of at most max_lag_s worth, and a batch made late never waits
            self._due = max(self._due + span, min(now - self.max_lag_s + span, now))
        delay = self._due - now
        if delay < 1e-6:  # on time (up to float rounding)
            return 0.0
        self._sleep(delay)
        self.waited_s += delay
        return delay


@dataclass(frozen=True)
class PublishStats:
    """Counters of a FramePublisher. Rates are over ``elapsed_s``, first publish to last activity."""

    frames: int  # queued for delivery, delivered or not
    batches: int
    messages: int
    bytes: int
    delivered_frames: int  # acknowledged by the broker
    delivered_messages: int
    delivered_bytes: int
    failed_messages: int
    queued_messages: int
    elapsed_s: float
    throttled_s: float
    late_frames: int  # frames ready only after the rate limit's schedule said they were due

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def describe(self) -> str:
        return (
            f"{self.frames} frames in {self.batches} batches ({self.delivered_frames} delivered), "
            f"{self.bytes / 1e6:.1f} MB, {self.elapsed_s:.2f} s, "
            f"{self.frames_per_s:,.0f} frames/s, {self.mb_per_s:.1f} MB/s"
        )


class FramePublisher:
    """An idempotent Kafka producer of encoded frame batches (see the module docstring).

    ``partitioner``: ``"round-robin"`` or ``"by-scan"``. ``rate``: frames/s, None or 0 for as
    fast as possible. ``message_timeout_ms``: how long librdkafka keeps retrying a message
    (default: the client's ``message.timeout.ms``, else 300000). ``producer_settings`` are
    added to the client's settings; ``enable.idempotence`` and ``acks`` are always forced.
    Topic auto-creation is off unless the settings say ``allow.auto.create.topics=true``, so
    a missing topic is :class:`TopicNotFoundError` at construction.
    """

    def __init__(
        self,
        client: KafkaClientConfig,
        topic: str,
        *,
        partitioner: Partitioner | str = "round-robin",
        rate: float | None = None,
        message_timeout_ms: int | None = None,
        producer_settings: dict[str, Any] | None = None,
        metadata_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        from confluent_kafka import Producer

        if partitioner not in PARTITIONERS:
            raise ValueError(f"partitioner must be one of {', '.join(PARTITIONERS)}, got {partitioner!r}")
        self.client = client
        self.topic = topic
        self.partitioner = partitioner
        self._clock = clock
        self.limiter = RateLimiter(rate, clock=clock, sleep=sleep)
        settings: dict[str, Any] = {
            "linger.ms": 5,
            "message.max.bytes": MAX_MESSAGE_BYTES,
            "allow.auto.create.topics": False,
            "message.timeout.ms": DEFAULT_MESSAGE_TIMEOUT_MS,
        }
        settings.update(client.settings)
        settings.update(producer_settings or {})
        if message_timeout_ms is not None:
            settings["message.timeout.ms"] = message_timeout_ms
        # What makes a broker restart lose and duplicate nothing; not negotiable.
        settings.update({"enable.idempotence": True, "acks": "all"})
        settings["bootstrap.servers"] = client.bootstrap_servers
        settings["error_cb"] = self._on_error
        settings["logger"] = rdkafka_logger()  # a broker away for a minute is one line, not one per retry
        log.debug("producer for %r with %r", topic, redact({k: str(v) for k, v in settings.items()}))

        self._fatal: str | None = None
        self._failures: list[tuple[str, str]] = []
        self._last_warning: dict[str, float] = {}
        self._frames = self._batches = self._messages = self._bytes = 0
        self._delivered_frames = self._delivered_messages = self._delivered_bytes = self._failed = 0
        self._started: float | None = None
        self._last_activity: float | None = None
        self._next = 0

        self._producer = Producer(settings)
        self.partition_ids = self._partitions(metadata_timeout_s)

    # -- setup ------------------------------------------------------------------------------------

    def _partitions(self, timeout: float) -> list[int]:
        from confluent_kafka import KafkaError, KafkaException

        try:
            meta = list_topics(self._producer, self.topic, timeout)
        except KafkaException as exc:
            raise PublishError(unreachable(self.client.bootstrap_servers, timeout, exc)) from exc
        info = meta.topics.get(self.topic)
        if info is None or (info.error is not None and info.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            raise TopicNotFoundError(f"Kafka topic {self.topic!r} does not exist on {self.client.bootstrap_servers}")
        if info.error is not None:
            raise PublishError(f"cannot write to Kafka topic {self.topic!r}: {info.error.str()}")
        if not info.partitions:
            raise TopicNotFoundError(f"Kafka topic {self.topic!r} has no partitions")
        return sorted(info.partitions)

    # -- callbacks --------------------------------------------------------------------------------

    def _on_error(self, err: Any) -> None:
        if err.fatal():
            self._fatal = f"{err.name()}: {err.str()}"
            log.error("Kafka producer failed: %s", self._fatal)
            return
        now = time.monotonic()
        name = err.name()
        if now - self._last_warning.get(name, -1e9) >= 10.0:
            self._last_warning[name] = now
            log.warning(
                "Kafka %s: %s (librdkafka keeps retrying; queued messages wait up to message.timeout.ms)",
                name,
                err.str(),
            )

    def _on_delivery(self, frames: int, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed += 1
            key = msg.key()
            where = f"{msg.topic()}[{msg.partition()}] key={key.decode(errors='replace') if key else None}"
            self._failures.append((err.str(), where))
        else:
            self._delivered_frames += frames
            self._delivered_messages += 1
            self._delivered_bytes += len(msg.value() or b"")

    # -- producing --------------------------------------------------------------------------------

    def _choose_partition(self) -> int | None:
        if self.partitioner == "by-scan":
            return None  # the producer's partitioner hashes the key
        partition = self.partition_ids[self._next % len(self.partition_ids)]
        self._next += 1
        return partition

    def _produce(
        self, value: bytes, key: bytes | None, headers: list[Header] | None, partition: int | None, frames: int = 0
    ) -> None:
        if self._fatal is not None:
            raise PublishError(f"the Kafka producer for {self.topic!r} failed: {self._fatal}")
        on_delivery = functools.partial(self._on_delivery, frames)
        kwargs: dict[str, Any] = {"value": value, "key": key, "headers": headers, "on_delivery": on_delivery}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._producer.produce(self.topic, **kwargs)
                break
            except BufferError:  # the local queue is full (e.g. the broker is away): drain, then retry
                self._producer.poll(0.1)
                if self._fatal is not None:
                    raise PublishError(f"the Kafka producer for {self.topic!r} failed: {self._fatal}") from None
        self._producer.poll(0)
        self._messages += 1
        self._bytes += len(value)
        self._last_activity = self._clock()

    def publish(self, batch: FrameBatch) -> None:
        """Queue one batch (after the rate limiter allows it); delivery is confirmed by :meth:`flush`."""
        if self._started is None:
            self._started = self._clock()
        self.limiter.wait(batch.n_frames)
        headers: list[Header] = [
            (CONTENT_TYPE_HEADER, CONTENT_TYPE),
            (SCHEMA_VERSION_HEADER, str(SCHEMA_VERSION)),
        ]
        key = str(batch.header.scan_number).encode()
        self._produce(batch.to_bytes(), key, headers, self._choose_partition(), batch.n_frames)
        self._frames += batch.n_frames
        self._batches += 1

    def publish_all(self, batches: Iterable[FrameBatch]) -> None:
        for batch in batches:
            self.publish(batch)

    def publish_raw(
        self,
        value: bytes,
        key: bytes | str | None = None,
        headers: list[Header] | None = None,
        *,
        partition: int | None = None,
    ) -> None:
        """Queue arbitrary bytes (e.g. a malformed message for a dead-letter test); not rate limited.

        ``partition`` None follows the partitioner.
        """
        if self._started is None:
            self._started = self._clock()
        if isinstance(key, str):
            key = key.encode()
        self._produce(value, key, headers, self._choose_partition() if partition is None else partition)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued message is delivered (or has failed for good).

        ``timeout`` None waits as long as librdkafka retries (``message.timeout.ms``). Raises
        :class:`PublishError` if any message failed since the last flush, or is still queued
        when ``timeout`` runs out.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 1.0 if deadline is None else max(min(1.0, deadline - time.monotonic()), 0.0)
            remaining = self._producer.flush(step)
            if remaining == 0 or self._fatal is not None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
        if self._started is not None:
            self._last_activity = self._clock()
        failures, self._failures = self._failures, []
        if failures or remaining or self._fatal:
            problems = []
            if failures:
                reasons = Counter(reason for reason, _ in failures)
                first = {}
                for reason, where in failures:
                    first.setdefault(reason, where)
                shown = "; ".join(f"{n}x {reason} (first: {first[reason]})" for reason, n in reasons.most_common(3))
                problems.append(f"{len(failures)} messages failed: {shown}")
            if remaining:
                waited = "" if timeout is None else f" after {timeout:g} s"
                problems.append(f"{remaining} messages still undelivered{waited}")
            if self._fatal:
                problems.append(f"the producer failed: {self._fatal}")
            raise PublishError(f"Kafka delivery to {self.topic!r} failed: {', '.join(problems)}")

    def __len__(self) -> int:
        """Messages queued and not yet delivered."""
        return len(self._producer)

    # -- metrics ----------------------------------------------------------------------------------

    def stats(self) -> PublishStats:
        elapsed = 0.0
        if self._started is not None:
            elapsed = max((self._last_activity or self._started) - self._started, 0.0)
        return PublishStats(
            frames=self._frames,
            batches=self._batches,
            messages=self._messages,
            bytes=self._bytes,
            delivered_frames=self._delivered_frames,
            delivered_messages=self._delivered_messages,
            delivered_bytes=self._delivered_bytes,
            failed_messages=self._failed,
            queued_messages=len(self._producer),
            elapsed_s=elapsed,
            throttled_s=self.limiter.waited_s,
            late_frames=self.limiter.late_frames,
        )

    # -- context manager --------------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Flush (raising on failures); the producer needs no other cleanup."""
        self.flush(timeout)

    def __enter__(self) -> FramePublisher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.flush()
            return
        # Already failing: deliver what is queued if that is quick, but never hide the original error.
        try:
            self.flush(timeout=10.0)
        except PublishError as flush_error:
            log.error("while handling %s: %s", exc_type.__name__, flush_error)
