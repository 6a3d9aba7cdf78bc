"""Sources and sinks: Kafka."""
