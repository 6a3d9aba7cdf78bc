"""Kafka client settings and the start/stop positions of a read.

Any librdkafka setting (SASL and SSL included) can be given, from a file
(Java-properties ``key=value`` lines, or a JSON object) and from ``key=value``
overrides. Values whose key looks secret (password, secret, token, private
key) never appear in ``repr``, logs or metrics.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

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


def _parse_properties(text: str, source: str) -> dict[str, str]:
    settings = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{source}:{number}: expected key=value, got {line!r}")
        settings[key.strip()] = value.strip()
    return settings


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

    def client(self, **extra: str | int | bool) -> dict[str, str | int | bool]:
        return {"bootstrap.servers": self.bootstrap_servers, **self.settings, **extra}


def _timestamp_ms(text: str) -> int:
    """Milliseconds since the epoch from an int (ms) or an ISO-8601 time (UTC if no zone)."""
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _offsets(text: str) -> int | dict[int, int]:
    if "=" not in text:
        return int(text)
    pairs = (item.split("=", 1) for item in text.split(","))
    return {int(p): int(o) for p, o in pairs}


StartKind = Literal["earliest", "latest", "committed", "offset", "timestamp"]
StopKind = Literal["never", "latest", "offset", "timestamp"]


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
