"""Kafka client settings and read positions (no broker needed)."""

from __future__ import annotations

import _thread
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from beamops.io import kafka
from beamops.io.kafka import ReadFromKafkaParams, read_kafka_frames
from beamops.io.kafka_config import (
    RDKAFKA_LOGGER,
    CollapseRepeats,
    KafkaClientConfig,
    KafkaUnavailableError,
    ReadPosition,
    list_topics,
    rdkafka_logger,
    redact,
    unreachable,
)
from beamops.operator import OperatorParameterError
from jobs import com_pipeline


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


def test_a_read_with_a_group_starts_where_the_group_left_off_unless_told_otherwise() -> None:
    assert ReadFromKafkaParams(topic="t", group_id="live").start == "committed"
    assert ReadFromKafkaParams(topic="t").start == "earliest"
    assert ReadFromKafkaParams(topic="t", group_id="live", start="latest").start == "latest"
    reader = read_kafka_frames({"topic": "t", "group_id": "live"}, client=KafkaClientConfig("127.0.0.1:9"))
    assert reader.params.start == "committed"


def test_a_stop_time_in_the_future_is_refused_when_the_pipeline_is_built() -> None:
    with pytest.raises(
        OperatorParameterError, match=r"'stop'.*the stop time 2099-01-01T00:00:00.000Z is in the future"
    ):
        read_kafka_frames({"topic": "t", "stop": "timestamp:2099-01-01"}, client=KafkaClientConfig("127.0.0.1:9"))


def test_a_group_given_as_a_kafka_setting_is_refused_naming_group_id() -> None:
    client = KafkaClientConfig("127.0.0.1:9", {"group.id": "live"})
    with pytest.raises(OperatorParameterError, match=r"give the consumer group as group_id \(--group_id\)"):
        read_kafka_frames({"topic": "t"}, client=client)


def test_settings_from_properties_json_and_overrides(tmp_path: Path) -> None:
    props = tmp_path / "client.properties"
    props.write_text("# SASL\nsecurity.protocol = SASL_SSL\nsasl.mechanism=PLAIN\nsasl.password=hunter2\n")
    config = KafkaClientConfig.load("broker:9093", props, ["sasl.mechanism=SCRAM-SHA-512", "client.id=beamops"])
    settings = config.client()
    assert settings.pop("logger") is logging.getLogger(RDKAFKA_LOGGER)
    assert settings == {
        "bootstrap.servers": "broker:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.password": "hunter2",
        "client.id": "beamops",
    }
    as_json = tmp_path / "client.json"
    as_json.write_text(json.dumps({"ssl.key.password": "s3cret", "linger.ms": 5}))
    assert KafkaClientConfig.load("b:1", as_json).settings == {"ssl.key.password": "s3cret", "linger.ms": "5"}


def test_properties_files_read_as_java_reads_them(tmp_path: Path) -> None:
    props = tmp_path / "client.properties"
    props.write_text(
        "sasl.password: hunter2\nssl.key.password s3cret\nsasl.oauthbearer.config = a=b c=d\n"
        # What java.util.Properties.load gives for these (checked with Java 17): escapes and a continued line.
        "ssl.certificate.location=C:\\\\certs\\\\client.pem\n"
        "ssl.keystore.password=ab\\\\cd\\=ef\n"
        "sasl.kerberos.kinit.cmd=kinit -R \\\n    -k\n"
    )
    assert KafkaClientConfig.load("b:1", props).settings == {
        "sasl.password": "hunter2",
        "ssl.key.password": "s3cret",
        "sasl.oauthbearer.config": "a=b c=d",
        "ssl.certificate.location": "C:\\certs\\client.pem",
        "ssl.keystore.password": "ab\\cd=ef",
        "sasl.kerberos.kinit.cmd": "kinit -R -k",
    }


def test_bad_settings_file_names_the_line_but_never_shows_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.properties"
    bad.write_text("security.protocol=SSL\nhunter2\n")  # a password pasted on a line of its own
    with pytest.raises(ValueError, match=r"bad.properties:2: expected key=value") as raised:
        KafkaClientConfig.load("b:1", bad)
    assert "hunter2" not in str(raised.value)


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


# --- librdkafka's own messages --------------------------------------------------------------------


def _record(level: int, message: str, client: str = "rdkafka#consumer-1") -> logging.LogRecord:
    """A record as confluent-kafka makes it: ("%s [%s] %s", facility, client name, message)."""
    return logging.LogRecord(RDKAFKA_LOGGER, level, __file__, 0, "%s [%s] %s", ("FAIL", client, message), None)


def test_repeated_librdkafka_warnings_pass_once_per_window_with_a_count() -> None:
    now = [100.0]
    repeats = CollapseRepeats(every_s=30.0, clock=lambda: now[0])
    refused = "127.0.0.1:1/bootstrap: Connect failed: Connection refused (after {}ms in state CONNECT)"

    assert repeats.filter(_record(logging.ERROR, refused.format(0)))
    # the same failure, other durations, another consumer of the same job: held back
    held = [_record(logging.ERROR, refused.format(ms), client=f"rdkafka#consumer-{ms}") for ms in range(1, 6)]
    assert not any(repeats.filter(r) for r in held)
    assert repeats.filter(_record(logging.ERROR, "127.0.0.1:1/bootstrap: 1 request(s) timed out"))  # not alike
    assert repeats.filter(_record(logging.DEBUG, refused.format(0)))  # debug output is never held back
    assert repeats.filter(_record(logging.WARNING, refused.format(0)))  # another level is another run

    now[0] += 31.0
    shown = _record(logging.ERROR, refused.format(9))
    assert repeats.filter(shown)
    assert shown.getMessage() == (
        "FAIL [rdkafka#consumer-1] " + refused.format(9) + " (5 more like it in the 31 s since it was last shown)"
    )
    now[0] += 1.0
    assert not repeats.filter(_record(logging.ERROR, refused.format(0)))


def test_a_coordinator_still_loading_is_info_not_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # What the first idempotent producer on a freshly started broker logs, word for word.
    loading = (
        "[thrd:main]: Failed to acquire idempotence PID from broker 127.0.0.1:35287/1: "
        "Broker: Coordinator load in progress: retrying"
    )
    other = "[thrd:main]: 127.0.0.1:35287/1: Broker: Not enough in-sync replicas: retrying"
    logger = rdkafka_logger()
    with caplog.at_level(logging.INFO, logger=RDKAFKA_LOGGER):
        logger.warning("%s [%s] %s", "GETPID", "rdkafka#producer-6", loading)
        logger.warning("%s [%s] %s", "GETPID", "rdkafka#producer-6", other)
    assert [(r.levelname, r.getMessage().endswith(loading)) for r in caplog.records] == [
        ("INFO", True),
        ("WARNING", False),
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=RDKAFKA_LOGGER):
        logger.warning("%s [%s] %s", "GETPID", "rdkafka#producer-7", loading)
    assert caplog.records == []


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A 127.0.0.1 port that refuses connections (bound, never listening) for as long as the test runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_a_client_without_a_broker_logs_one_line_not_one_per_attempt(
    refusing_port: int, capfd: pytest.CaptureFixture[str]
) -> None:
    from confluent_kafka import Consumer, KafkaException

    kept: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = kept.append  # type: ignore[method-assign]
    logger = logging.getLogger(RDKAFKA_LOGGER)
    logger.addHandler(handler)
    consumer = Consumer(kafka.consumer_settings(KafkaClientConfig(f"127.0.0.1:{refusing_port}"), None))
    try:
        with pytest.raises(KafkaException):
            consumer.list_topics("t", timeout=2)  # librdkafka retries the connection many times meanwhile
        for _ in range(5):
            consumer.poll(0.1)  # where a consumer hands its log messages over
    finally:
        consumer.close()
        logger.removeHandler(handler)
    refused = [r for r in kept if "Connection refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in kept]
    assert "Connection refused" not in capfd.readouterr().err  # nothing straight to stderr


@pytest.mark.parametrize("to_topic", [True, False], ids=["checking-the-output-topic", "reading"])
def test_the_job_says_in_one_line_that_it_cannot_reach_kafka(
    refusing_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    to_topic: bool,
) -> None:
    monkeypatch.setattr(kafka, "METADATA_TIMEOUT_S", 2.0)
    args = ["--bootstrap_servers", f"127.0.0.1:{refusing_port}", "--input_topic", "frames"]
    args += ["--output_topic", "maps"] if to_topic else ["--out_dir", str(tmp_path)]
    assert com_pipeline.main(args) == 1  # the brokers are at fault, not the arguments (2)
    # before the pipeline runs, checking the topics: once, whether it has an output topic or not
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"python -m jobs.com_pipeline: error: cannot reach Kafka at 127.0.0.1:{refusing_port}")
    assert "within 2 s" in line


@pytest.mark.parametrize(("environment", "submitted"), [("LOOPBACK", False), ("EXTERNAL", True)])
def test_a_loopback_flink_job_that_cannot_reach_kafka_is_not_submitted(
    refusing_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    environment: str,
    submitted: bool,
) -> None:
    """LOOPBACK workers are this process: what it cannot reach, they cannot either. Before, the job was submitted
    after a warning ("a cluster's workers may reach brokers this machine cannot") and retried for ever."""
    import apache_beam as beam

    from beamops import runner

    runs = []

    def submit(self: beam.Pipeline) -> None:
        runs.append(self)
        raise KeyboardInterrupt  # instead of running it: the client stops there

    monkeypatch.setattr(kafka, "METADATA_TIMEOUT_S", 1.0)
    monkeypatch.setattr(runner, "_flink_unreachable", lambda master: None)
    monkeypatch.setattr(beam.Pipeline, "run", submit)
    args = ["--bootstrap_servers", f"127.0.0.1:{refusing_port}", "--input_topic", "frames", "--output_topic", "maps"]
    args += ["--dead_letter_topic", "dead", "--runner=FlinkRunner", f"--environment_type={environment}"]
    args += ["--flink_job_server_jar=/not/needed.jar"]
    args += ["--environment_config=127.0.0.1:1"] if environment == "EXTERNAL" else []
    status = com_pipeline.main(args)
    err = capsys.readouterr().err
    unreachable = f"cannot reach Kafka at 127.0.0.1:{refusing_port} within 1 s"
    if submitted:  # a cluster's workers may reach brokers this machine cannot: submitted, after a warning
        assert (status, len(runs)) == (130, 1)
        assert f"could not check the topics from here: {unreachable}" in caplog.text
    else:
        assert (status, runs) == (1, [])
        assert f"error: {unreachable}" in err


def test_ctrl_c_ends_a_wait_for_kafka_at_once(refusing_port: int) -> None:
    # librdkafka holds a call for all of its timeout, and Python raises KeyboardInterrupt only between calls.
    from confluent_kafka import Consumer

    consumer = Consumer(KafkaClientConfig(f"127.0.0.1:{refusing_port}").client(**{"group.id": "g"}))
    timer = threading.Timer(0.5, _thread.interrupt_main)
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            list_topics(consumer, "frames", 30.0)
    finally:
        timer.cancel()
        consumer.close()
    assert time.monotonic() - started < 2.0


def test_a_broker_slower_than_the_first_wait_is_still_heard() -> None:
    """A call that times out drops its reply: in 0.25 s calls, a broker answering in 0.8 s (TLS, SASL, a large
    cluster) never got through, and the job said it could not reach Kafka."""
    from confluent_kafka import KafkaError, KafkaException

    asked: list[float] = []

    class SlowBroker:
        def list_topics(self, topic: str | None, timeout: float) -> str:
            asked.append(timeout)
            if timeout < 0.8:
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "Failed to get metadata"))
            return "metadata"

    assert list_topics(SlowBroker(), "frames", 30.0) == "metadata"
    assert asked == [0.25, 0.5, 1.0]


def test_a_broker_on_this_machine_is_named_with_how_to_start_it() -> None:
    from confluent_kafka import KafkaError, KafkaException

    exc = KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata"))
    assert unreachable("127.0.0.1:9092", 30.0, exc) == (
        "cannot reach Kafka at 127.0.0.1:9092 within 30 s: Failed to get metadata; is a broker running there? "
        "`beamops kafka status --port 9092` says, `beamops kafka up --port 9092` starts one"
    )
    # brokers elsewhere, or several: beamops' own commands would not tell
    assert unreachable("kafka-0.cluster:9092", 5.0, exc).endswith("within 5 s: Failed to get metadata")
    assert unreachable("127.0.0.1:9092,127.0.0.1:9093", 5.0, exc).endswith("within 5 s: Failed to get metadata")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "timestamp:1700000000",
            "timestamps are in milliseconds since the epoch (from 1973 on); for 1700000000 s give 1700000000000",
        ),
        (
            "timestamp:0",
            "timestamps are in milliseconds since the epoch (from 1973 on); give a time in ms or ISO-8601, "
            "or earliest to read from the start",
        ),
        ("timestamp:-5", "a timestamp cannot be negative"),
        ("offset:-1", "offset -1 is negative"),
        ("offset:-1=3", "partition -1 is negative"),
        ("offset:0=1,0=2", "a partition is named twice"),
    ],
)
def test_positions_that_would_read_the_wrong_messages_are_refused(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=f"bad start position {re.escape(repr(text))}: {re.escape(says)}"):
        ReadPosition.parse(text, stop=False)


def test_creating_a_topic_without_an_answer_says_so_in_one_line(
    refusing_port: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kafka, "METADATA_TIMEOUT_S", 1.0)
    servers = f"127.0.0.1:{refusing_port}"
    args = ["--bootstrap_servers", servers, "--input_topic", "frames", "--output_topic", "maps", "--create_topics"]
    assert com_pipeline.main(args) == 1  # the input topic is checked first
    assert capsys.readouterr().err.strip() == (
        f"python -m jobs.com_pipeline: error: cannot reach Kafka at {servers} within 1 s: Failed to get metadata: "
        f"Local: Broker transport failure; is a broker running there? `beamops kafka status --port {refusing_port}` "
        f"says, `beamops kafka up --port {refusing_port}` starts one"
    )
    unanswered = f"^cannot create topic 'maps': no answer from Kafka at {servers} within 1 s$"
    with pytest.raises(KafkaUnavailableError, match=unanswered):
        kafka.ensure_topic(KafkaClientConfig(servers), "maps")


def test_every_job_takes_kafka_settings_the_same_way() -> None:
    from jobs import replay, simulate

    given = ["--kafka_config", "security.protocol=SASL_SSL", "sasl.mechanism=PLAIN", "--kafka_config", "linger.ms=3"]
    expected = ["security.protocol=SASL_SSL", "sasl.mechanism=PLAIN", "linger.ms=3"]
    assert simulate.parse_args(["--bootstrap_servers", "b:1", "--topic", "t", *given]).kafka_config == expected
    assert com_pipeline.parse_args(given)[0]["kafka_config"] == expected
    assert replay.parse_args(given)[0]["kafka_config"] == expected


def test_a_commit_that_lands_after_a_later_one_does_not_move_the_group_back() -> None:
    run, group = uuid.uuid4().hex, "g"
    assert kafka._furthest_commit(run, group, "frames", 0, 5)
    assert not kafka._furthest_commit(run, group, "frames", 0, 3)  # finalized out of order: skipped
    assert not kafka._furthest_commit(run, group, "frames", 0, 5)
    assert kafka._furthest_commit(run, group, "frames", 0, 7)
    assert kafka._furthest_commit(run, group, "frames", 1, 2) and kafka._furthest_commit(run, "other", "frames", 0, 1)
    # Another run of the same group (a new pipeline in this process) starts from its own offsets.
    assert kafka._furthest_commit(uuid.uuid4().hex, group, "frames", 0, 3)


def test_a_bounded_read_with_a_group_says_when_its_pipeline_never_commits(caplog: pytest.LogCaptureFixture) -> None:
    import apache_beam as beam

    def reader_fn(wired: bool) -> Any:
        pipeline = beam.Pipeline()
        reader = read_kafka_frames({"topic": "t", "group_id": "g"}, client=KafkaClientConfig("127.0.0.1:9"))
        frames = pipeline | reader
        if wired:
            reader.commit_after(frames.frames)
        return reader._reader

    caplog.set_level(logging.WARNING, logger="beamops.io.kafka")
    for wired in (True, False):
        fn = reader_fn(wired)
        fn.setup()
        fn.teardown()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "commits its offsets to group 'g' only through read_kafka_frames.commit_after" in warning


def test_two_readers_in_one_pipeline_get_commit_steps_of_their_own() -> None:
    import apache_beam as beam

    pipeline = beam.Pipeline()
    for label in ("live", "backlog"):
        reader = read_kafka_frames({"topic": label, "group_id": "g"}, client=KafkaClientConfig("127.0.0.1:9"))
        reader.commit_after((pipeline | label >> reader).frames)
    labels = {t.full_label for t in pipeline.transforms_stack[0].parts}
    assert {"live.commit", "backlog.commit"} <= labels


class _ErrorEvent:
    """What Consumer.poll returns for an error of the whole client: no topic, no partition."""

    def __init__(self, error: Any) -> None:
        self._error = error

    def topic(self) -> None:
        return None

    def partition(self) -> None:
        return None

    def error(self) -> Any:
        return self._error


class _FailedConsumer:
    def __init__(self, error: Any) -> None:
        self.polls = 0
        self._error = error

    def poll(self, _timeout: float) -> _ErrorEvent:
        self.polls += 1
        if self.polls > 100:
            raise AssertionError("the read kept polling a consumer in a fatal state")
        return _ErrorEvent(self._error)


def test_a_fatal_error_of_the_consumer_fails_the_read() -> None:
    """Errors of the client name no partition: the check for events of a reused consumer's previous
    read must not skip them."""
    from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
    from confluent_kafka import KafkaError

    reader = kafka._ReadPartitionFn(
        "read_kafka_frames", KafkaClientConfig("127.0.0.1:1"), ReadFromKafkaParams(topic="t")
    )
    reader.setup()
    consumer = _FailedConsumer(KafkaError(KafkaError._FATAL, "the idempotent producer's epoch was fenced", fatal=True))
    tracker = OffsetRestrictionTracker(OffsetRange(0, 10))
    read = kafka.PartitionRead("t", 0, 0, 10)
    with pytest.raises(RuntimeError, match=r"Kafka consumer for t\[0\] failed: .*fenced"):
        list(reader._read_messages(consumer, read, tracker, ManualWatermarkEstimator(None), False, kafka._ReadState()))
    assert consumer.polls == 1
