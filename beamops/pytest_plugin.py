"""pytest plugin: a real Kafka broker for integration tests, and the ``integration`` marker.

    @pytest.mark.integration
    def test_roundtrip(kafka_broker):
        topic = kafka_broker.new_topic(partitions=4)
        producer = Producer({"bootstrap.servers": kafka_broker.bootstrap_servers})

``kafka_broker`` (session scope) is the broker named by ``$BEAMOPS_KAFKA_BOOTSTRAP`` when that is
set, otherwise one ephemeral :class:`~beamops.services.kafka_broker.KafkaBroker` on a free
127.0.0.1 port, started once per session (about 5 s) and removed with its data at the end.
``restart()``, ``stop()`` and ``start()`` (for fault tests) work only on a broker the fixture started;
on an external one they skip the test. A test that calls ``stop()`` must ``start()`` again (in a
``finally``): the broker is shared by the whole session.

Importing this module needs neither the Kafka jars nor confluent-kafka; only using the fixture does.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from beamops.services.kafka_broker import KafkaBroker, KafkaStatus

BOOTSTRAP_ENV = "BEAMOPS_KAFKA_BOOTSTRAP"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs real external services (Kafka broker, Flink cluster)")


class KafkaFixture:
    """What the ``kafka_broker`` fixture returns."""

    def __init__(self, bootstrap_servers: str, broker: KafkaBroker | None = None) -> None:
        self._bootstrap = bootstrap_servers
        #: The KafkaBroker the fixture started, or None for an external broker.
        self.broker = broker
        self.created_topics: list[str] = []

    @property
    def bootstrap_servers(self) -> str:
        return self.broker.bootstrap_servers if self.broker is not None else self._bootstrap

    @property
    def external(self) -> bool:
        return self.broker is None

    def new_topic(self, partitions: int = 1, prefix: str = "t", config: Mapping[str, str] | None = None) -> str:
        """Create a topic with a unique name and wait until all its partitions have a leader."""
        from beamops.services.kafka_broker import create_topic

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        create_topic(self.bootstrap_servers, name, partitions, config=config)
        self.created_topics.append(name)
        return name

    def delete_topic(self, name: str) -> None:
        from beamops.services.kafka_broker import delete_topic

        delete_topic(self.bootstrap_servers, name)

    def _own(self, action: str) -> KafkaBroker:
        if self.broker is None:
            pytest.skip(f"cannot {action} the external broker {self._bootstrap} (${BOOTSTRAP_ENV} is set)")
        return self.broker

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start the broker on the same port and data; returns once it serves clients again."""
        self._own("restart").restart(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker, keeping its data for ``start()``."""
        self._own("stop").stop(timeout, remove_data=False)

    def start(self, timeout: float = 60.0) -> None:
        self._own("start").start(timeout)

    def status(self) -> KafkaStatus:
        return self._own("inspect").status()

    def __repr__(self) -> str:
        kind = "external" if self.broker is None else "ephemeral"
        return f"<KafkaFixture {kind} {self.bootstrap_servers}>"


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaFixture]:
    """A real Kafka broker for the session: ``$BEAMOPS_KAFKA_BOOTSTRAP`` or one started on a free port."""
    from beamops.services.kafka_broker import KafkaBroker, delete_topic, wait_until_ready

    external = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if external:
        wait_until_ready(external, timeout=30)
        handle = KafkaFixture(external)
        yield handle
        for topic in handle.created_topics:  # leave a shared broker as we found it
            try:
                delete_topic(external, topic, timeout=10)
            except Exception as exc:  # best effort at teardown
                print(f"beamops: could not delete topic {topic} on {external}: {exc}")
        return

    broker = KafkaBroker(ephemeral=True)
    try:
        broker.start()
        yield KafkaFixture(broker.bootstrap_servers, broker)
    finally:
        broker.stop()
