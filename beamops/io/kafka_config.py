"""Kafka client settings and the start/stop positions of a read.

Any librdkafka setting (SASL and SSL included) can be given, from a file
(Java-properties ``key=value`` lines, or a JSON object) and from ``key=value``
overrides. Values whose key looks secret (password, secret, token, private
key) never appear in ``repr``, logs or metrics.

Every client made from a :class:`KafkaClientConfig` sends librdkafka's own
messages to the Python logger ``beamops.kafka.rdkafka``, which lets the first
of a run of like warnings through and then one per 30 s with a count of the
others: while a broker is unreachable, librdkafka logs each connection attempt,
hundreds a second during a metadata request. Warnings librdkafka retries by
itself while a broker it just reached is still loading (its coordinator) are
logged at INFO.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import javaproperties

# The largest message beamops writes and its broker accepts. Kafka's default is 1 MB, and a batch of
# dense frames (663 KB per 576x576 frame), a batch of 1000 counted frames at 500 events each (2 MB) or
# the COM map of a 512x512 scan (2 MB) is larger. A broker not started by beamops needs its
# ``message.max.bytes`` (or the topic's ``max.message.bytes``) raised as well.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_SECRET = re.compile(r"password|secret|token|private|\.key\.pem|credentials|sasl\.oauthbearer\.config", re.I)


def is_secret(key: str) -> bool:
    return bool(_SECRET.search(key))


def redact(settings: Mapping[str, str]) -> dict[str, str]:
    """The settings with secret values replaced by '***'."""
    return {k: ("***" if is_secret(k) else v) for k, v in settings.items()}


RDKAFKA_LOGGER = "beamops.kafka.rdkafka"
_ELAPSED = re.compile(r"\d+ms\b")  # "(after 12ms in state CONNECT)": the only part that varies between repeats


class CollapseRepeats(logging.Filter):
    """Passes the first of a run of like warnings (or worse), then one per ``every_s`` seconds
    that says how many were held back. Messages that differ only in durations (``12ms``) are
    alike, whichever client logged them; below WARNING everything passes (librdkafka's ``debug``
    output, which a user asks for)."""

    def __init__(self, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._every_s = every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[tuple[int, str], list[float]] = {}  # (level, message) -> [passed at, held back since]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        # confluent-kafka logs ("%s [%s] %s", facility, client name, message): the client name is left out.
        args = record.args if isinstance(record.args, tuple) else ()
        text = f"{args[0]} {args[2]}" if len(args) == 3 else record.getMessage()
        key = (record.levelno, _ELAPSED.sub("#ms", text))
        now = self._clock()
        with self._lock:
            run = self._runs.get(key)
            if run is not None and now - run[0] < self._every_s:
                run[1] += 1
                return False
            held, since = (int(run[1]), now - run[0]) if run is not None else (0, 0.0)
            if len(self._runs) >= 1024:  # forget runs that ended long ago
                self._runs = {k: r for k, r in self._runs.items() if now - r[0] < self._every_s}
            self._runs[key] = [now, 0]
        if held:
            suffix = f" ({held} more like it in the {since:.0f} s since it was last shown)"
            record.msg, record.args = record.getMessage() + suffix, ()
        return True


# Said while a freshly started broker's group or transaction coordinator loads its log; librdkafka
# retries until it has, and a request that never succeeds fails with an error of its own.
_RETRIED_WHILE_LOADING = re.compile(r"Coordinator load in progress: retrying")


class RetriedWhileLoadingIsInfo(logging.Filter):
    """Lowers librdkafka's warnings that a broker's coordinator is still loading, which it retries
    by itself, to INFO: on a broker just started every first idempotent producer says so once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and _RETRIED_WHILE_LOADING.search(record.getMessage()):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        return True


def rdkafka_logger() -> logging.Logger:
    """The logger for librdkafka's messages (confluent-kafka's ``logger`` setting), repeats collapsed.

    Its level is DEBUG, so librdkafka's ``debug`` output shows whatever the root level; librdkafka
    writes debug messages only when that setting asks for them.
    """
    logger = logging.getLogger(RDKAFKA_LOGGER)
    if not any(isinstance(f, CollapseRepeats) for f in logger.filters):
        logger.addFilter(RetriedWhileLoadingIsInfo())  # before CollapseRepeats, which holds back warnings only
        logger.addFilter(CollapseRepeats())
        logger.setLevel(logging.DEBUG)
    return logger


def _parse_properties(text: str, source: str) -> dict[str, str]:
    """Settings from a properties file, read as Java reads one (escapes, continued lines), as Kafka's
    own clients read their client.properties. A line without a value is an error naming its line
    number but not its text: it may be a password pasted on a line of its own."""
    settings = {}
    line = 1
    for item in javaproperties.parse(text):
        if isinstance(item, javaproperties.KeyValue):
            if item.value == "":
                raise ValueError(f"{source}:{line}: expected key=value (or key: value), got a line without a value")
            settings[item.key] = item.value
        line += item.source.count("\n")
    return settings


class KafkaUnavailableError(RuntimeError):
    """Kafka did not answer in time: the brokers are down or unreachable, not the job's arguments."""


_THIS_MACHINE = ("127.0.0.1", "localhost", "[::1]")


def unreachable(bootstrap_servers: str, timeout_s: float, exc: Any) -> str:
    """What to say when a request that ``exc`` (a KafkaException) ended got no answer from Kafka; for one
    broker on this machine, how to see whether it runs."""
    host, _, port = bootstrap_servers.strip().rpartition(":")
    hint = (
        f"; is a broker running there? `beamops kafka status --port {port}` says, "
        f"`beamops kafka up --port {port}` starts one"
        if host in _THIS_MACHINE and port.isdigit()
        else ""
    )
    return f"cannot reach Kafka at {bootstrap_servers} within {timeout_s:g} s: {exc.args[0].str()}{hint}"


# The first metadata call's wait, doubled for each call after it up to the last: Ctrl-C (KeyboardInterrupt) is
# raised only between calls into librdkafka, so a 30 s wait made of one call ignores it for 30 s; and a call
# that times out drops its reply, so a broker slower than the first wait (TLS, SASL, a large cluster) gets
# a longer one.
_METADATA_WAITS_S = (0.25, 0.5, 1.0, 2.0, 4.0)


def list_topics(client: Any, topic: str | None, timeout_s: float) -> Any:
    """``client.list_topics(topic)`` (any confluent-kafka client), waiting up to ``timeout_s`` for an
    answer in calls of 0.25 s, then 0.5, 1, 2 and 4 s each, so that Ctrl-C ends the wait within a few
    seconds. Raises the last call's KafkaException once ``timeout_s`` passed."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout_s
    waits = iter(_METADATA_WAITS_S)
    wait = next(waits)
    while True:
        try:
            return client.list_topics(topic, timeout=max(0.001, min(wait, deadline - time.monotonic())))
        except KafkaException:
            if time.monotonic() >= deadline:
                raise
        wait = next(waits, wait)


@dataclass(frozen=True)
class KafkaClientConfig:
    """Where the brokers are and how to talk to them (any librdkafka setting)."""

    bootstrap_servers: str
    settings: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers is required, e.g. 127.0.0.1:9092")
        if "bootstrap.servers" in self.settings:
            raise ValueError("give bootstrap servers as bootstrap_servers, not in the settings")

    def __repr__(self) -> str:
        return f"KafkaClientConfig(bootstrap_servers={self.bootstrap_servers!r}, settings={redact(self.settings)!r})"

    @classmethod
    def load(
        cls, bootstrap_servers: str, config_file: str | Path | None = None, overrides: Iterable[str] = ()
    ) -> KafkaClientConfig:
        """Settings from ``config_file`` (properties or JSON), then ``key=value`` overrides."""
        settings: dict[str, str] = {}
        if config_file:
            path = Path(config_file)
            text = path.read_text()
            if text.lstrip().startswith("{"):
                settings.update({k: str(v) for k, v in json.loads(text).items()})
            else:
                settings.update(_parse_properties(text, str(path)))
        settings.update(_parse_properties("\n".join(overrides), "--kafka_config"))
        return cls(bootstrap_servers, settings)

    def check(self) -> None:
        """ValueError naming a setting librdkafka refuses (an unknown name, a bad value), before anything
        runs; it contacts no broker. A secret's value is never in the message."""
        from confluent_kafka import KafkaException, Producer

        try:
            Producer(self.client())
        except KafkaException as exc:
            message = exc.args[0].str()
            for key, value in self.settings.items():
                if is_secret(key) and value:
                    message = message.replace(value, "***")
            raise ValueError(f"Kafka client settings: {message}") from None

    def client(self, **extra: str | int | bool) -> dict[str, Any]:
        """The settings of a confluent-kafka client: these, then ``extra``, and the logger librdkafka logs to."""
        return {"bootstrap.servers": self.bootstrap_servers, **self.settings, **extra, "logger": rdkafka_logger()}


# Kafka timestamps are in ms: 10**11 ms is March 1973, and 10**11 s is 30 centuries away.
_SECONDS_NOT_MS = 10**11


def _timestamp_ms(text: str) -> int:
    """Milliseconds since the epoch from an int (ms) or an ISO-8601 time (UTC if no zone)."""
    if re.fullmatch(r"-?\d+", text):
        ms = int(text)
        if ms < 0:
            raise ValueError("a timestamp cannot be negative")
        if ms < _SECONDS_NOT_MS:
            hint = (
                f"for {ms} s give {ms * 1000}"
                if ms * 1000 >= _SECONDS_NOT_MS
                else "give a time in ms or ISO-8601, or earliest to read from the start"
            )
            raise ValueError(f"timestamps are in milliseconds since the epoch (from 1973 on); {hint}")
        return ms
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _offsets(text: str) -> int | dict[int, int]:
    if "=" not in text:
        return _offset(text)
    pairs = [item.split("=", 1) for item in text.split(",")]
    offsets = {_offset(p, "partition"): _offset(o) for p, o in pairs}
    if len(offsets) != len(pairs):
        raise ValueError("a partition is named twice")
    return offsets


def _offset(text: str, what: str = "offset") -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{what} {value} is negative")
    return value


StartKind = Literal["earliest", "latest", "committed", "offset", "timestamp"]
StopKind = Literal["never", "latest", "offset", "timestamp"]


def never_stops(stop: str) -> bool:
    """Whether a read with this stop position is unbounded (``never``); every other one ends."""
    return stop.strip() == "never"


@dataclass(frozen=True)
class ReadPosition:
    """Where a read starts or stops.

    Written as ``earliest``, ``latest``, ``committed`` (start only), ``never``
    (stop only), ``offset:N`` (every partition), ``offset:0=N,1=M`` (per
    partition), or ``timestamp:T`` with T in ms since the epoch or ISO-8601.
    A stop position is exclusive: the read ends before it.
    """

    kind: str
    offsets: int | dict[int, int] | None = None
    timestamp_ms: int | None = None

    @classmethod
    def parse(cls, text: str, *, stop: bool) -> ReadPosition:
        words = ("never", "latest") if stop else ("earliest", "latest", "committed")
        kind, _, value = text.strip().partition(":")
        try:
            if kind in words and not value:
                return cls(kind)
            if kind == "offset" and value:
                return cls(kind, offsets=_offsets(value))
            if kind == "timestamp" and value:
                return cls(kind, timestamp_ms=_timestamp_ms(value))
        except ValueError as exc:
            raise ValueError(f"bad {'stop' if stop else 'start'} position {text!r}: {exc}") from None
        allowed = ", ".join([*words, "offset:N", "offset:P=N,...", "timestamp:T"])
        raise ValueError(f"bad {'stop' if stop else 'start'} position {text!r}; use one of {allowed}")

    def offset_for(self, partition: int) -> int | None:
        if isinstance(self.offsets, dict):
            return self.offsets.get(partition)
        return self.offsets
