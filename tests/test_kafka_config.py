"""Kafka client settings and read positions (no broker needed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from beamops.io.kafka import ReadFromKafkaParams, read_kafka_frames
from beamops.io.kafka_config import KafkaClientConfig, ReadPosition, redact
from beamops.operator import OperatorParameterError


def test_positions_parse() -> None:
    assert ReadPosition.parse("earliest", stop=False) == ReadPosition("earliest")
    assert ReadPosition.parse("committed", stop=False).kind == "committed"
    assert ReadPosition.parse("never", stop=True).kind == "never"
    assert ReadPosition.parse("offset:42", stop=True).offset_for(3) == 42
    per_partition = ReadPosition.parse("offset:0=5,2=7", stop=False)
    assert (per_partition.offset_for(0), per_partition.offset_for(1), per_partition.offset_for(2)) == (5, None, 7)
    assert ReadPosition.parse("timestamp:1700000000000", stop=True).timestamp_ms == 1_700_000_000_000
    assert ReadPosition.parse("timestamp:2023-11-14T22:13:20Z", stop=False).timestamp_ms == 1_700_000_000_000
    # No zone means UTC, so the same instant.
    assert ReadPosition.parse("timestamp:2023-11-14T22:13:20", stop=False).timestamp_ms == 1_700_000_000_000


@pytest.mark.parametrize(
    ("text", "stop"),
    [
        ("never", False),
        ("committed", True),
        ("offset:", True),
        ("offset:x", False),
        ("timestamp:soon", True),
        ("", False),
    ],
)
def test_bad_positions_are_clear_errors(text: str, stop: bool) -> None:
    with pytest.raises(ValueError, match="position"):
        ReadPosition.parse(text, stop=stop)


def test_bad_position_is_rejected_when_the_pipeline_is_built() -> None:
    with pytest.raises(OperatorParameterError, match=r"read_kafka_frames.*stop"):
        read_kafka_frames(client=KafkaClientConfig("127.0.0.1:9"), topic="t", stop="tomorrow")
    assert ReadFromKafkaParams(topic="t", stop="never").unbounded
    assert not ReadFromKafkaParams(topic="t").unbounded


def test_settings_from_properties_json_and_overrides(tmp_path: Path) -> None:
    props = tmp_path / "client.properties"
    props.write_text("# SASL\nsecurity.protocol = SASL_SSL\nsasl.mechanism=PLAIN\nsasl.password=hunter2\n")
    config = KafkaClientConfig.load("broker:9093", props, ["sasl.mechanism=SCRAM-SHA-512", "client.id=beamops"])
    assert config.client() == {
        "bootstrap.servers": "broker:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.password": "hunter2",
        "client.id": "beamops",
    }
    as_json = tmp_path / "client.json"
    as_json.write_text(json.dumps({"ssl.key.password": "s3cret", "linger.ms": 5}))
    assert KafkaClientConfig.load("b:1", as_json).settings == {"ssl.key.password": "s3cret", "linger.ms": "5"}


def test_bad_settings_file_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.properties"
    bad.write_text("security.protocol=SSL\nthis line has no equals sign\n")
    with pytest.raises(ValueError, match=r"bad.properties:2"):
        KafkaClientConfig.load("b:1", bad)


def test_secrets_never_appear_in_repr_logs_or_specs(caplog: pytest.LogCaptureFixture) -> None:
    secrets = {
        "sasl.password": "hunter2",
        "ssl.key.password": "s3cret",
        "sasl.oauthbearer.client.secret": "t0ken",
        "sasl.oauthbearer.config": "principal=me secret=abc",
    }
    config = KafkaClientConfig("b:1", {**secrets, "security.protocol": "SASL_SSL"})
    shown = repr(config) + str(redact(config.client()))
    assert "SASL_SSL" in shown
    for value in secrets.values():
        assert value not in shown
    op = read_kafka_frames(client=config, topic="detector-7-topic")
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("client %r", op.client)
    assert all(value not in caplog.text for value in secrets.values())
    exported = op.spec().to_json()
    assert all(value not in exported for value in secrets.values())
    assert "detector-7-topic" not in exported  # parameter values are not part of a spec either
