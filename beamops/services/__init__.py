"""Real external services that beamops runs locally (a Kafka broker, ...) for development and tests."""

from beamops.services.kafka_broker import (
    KafkaBroker,
    KafkaBrokerError,
    KafkaComponents,
    KafkaStatus,
    find_components,
)

__all__ = ["KafkaBroker", "KafkaBrokerError", "KafkaComponents", "KafkaStatus", "find_components"]
