"""The local Kafka broker (beamops.services.kafka_broker) and the kafka_broker fixture, on a real broker."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer

from beamops.services import kafka_broker as kb
from beamops.services.kafka_broker import KafkaBroker, KafkaBrokerError, is_kafka_process

pytestmark = pytest.mark.integration

LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1 in /proc/net/tcp and tcp6


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    errors = []
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=lambda err, _m: err and errors.append(err))
    assert producer.flush(30) == 0, "messages not delivered within 30 s"
    assert not errors, errors


def consume(bootstrap: str, topic: str, count: int, timeout: float = 30.0) -> list:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    messages = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            messages.append(msg)
    finally:
        consumer.close()
    assert len(messages) == count, f"read {len(messages)} of {count} messages from {topic} in {timeout:g} s"
    return messages


def own_broker(fixture) -> KafkaBroker:
    if fixture.broker is None:
        pytest.skip("needs a broker started by the fixture, not $BEAMOPS_KAFKA_BOOTSTRAP")
    return fixture.broker


def test_status_of_the_running_broker(kafka_broker):
    broker = own_broker(kafka_broker)
    status = kafka_broker.status()
    assert status.running and not status.stale
    assert status.bootstrap == kafka_broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
    assert status.pid == broker.pid and is_kafka_process(status.pid, broker.properties_path)
    assert status.data_dir.is_dir() and (status.data_dir / "meta.properties").is_file()
    assert status.uptime is not None and status.uptime > 0
    state = json.loads(broker.state_path.read_text())
    assert state["pid"] == status.pid and state["port"] == broker.port
    assert {"controller_port", "data_dir", "log_path", "started_at"} <= state.keys()

    t0 = time.monotonic()
    broker.start()  # idempotent: already running, so the same JVM, found in about a second
    assert time.monotonic() - t0 < 10 and broker.pid == status.pid


def test_produce_and_consume_on_four_partitions(kafka_broker):
    topic = kafka_broker.new_topic(partitions=4, prefix="roundtrip")
    records = [(f"key-{i}".encode(), f"value-{i}".encode()) for i in range(400)]
    produce(kafka_broker.bootstrap_servers, topic, records)

    messages = consume(kafka_broker.bootstrap_servers, topic, len(records))
    assert sorted((m.key(), m.value()) for m in messages) == sorted(records)
    assert {m.partition() for m in messages} == {0, 1, 2, 3}
    for partition in range(4):  # offsets within each partition are 0..n-1
        offsets = [m.offset() for m in messages if m.partition() == partition]
        assert offsets == list(range(len(offsets)))


def test_stop_then_start_and_restart_keep_the_data(kafka_broker):
    broker = own_broker(kafka_broker)
    topic = kafka_broker.new_topic(partitions=2, prefix="durable")
    bootstrap = kafka_broker.bootstrap_servers
    produce(bootstrap, topic, [(b"a", b"before-stop")])
    first_pid = broker.pid

    kafka_broker.stop()
    try:
        status = broker.status()
        assert not status.running and not status.stale
        assert not broker.state_path.exists()
        assert not is_kafka_process(first_pid)
        assert kb.port_is_free(broker.port)
        assert broker.data_dir.is_dir()  # stop() of the fixture keeps the data
    finally:
        kafka_broker.start()
    assert broker.status().running and broker.pid != first_pid
    assert kafka_broker.bootstrap_servers == bootstrap  # same port

    produce(bootstrap, topic, [(b"b", b"before-restart")])
    second_pid = broker.pid
    kafka_broker.restart()
    assert broker.pid not in (None, second_pid)

    values = sorted(m.value() for m in consume(bootstrap, topic, 2))
    assert values == [b"before-restart", b"before-stop"]


def test_listens_only_on_loopback(kafka_broker, listening_sockets):
    broker = own_broker(kafka_broker)
    status = broker.status()
    sockets = listening_sockets(status.pid)
    assert {port for _, port in sockets} >= {broker.port, status.controller_port}
    assert all(address in LOOPBACK_HEX for address, _ in sockets), sockets
    props = broker.properties_path.read_text()
    assert f"listeners=PLAINTEXT://127.0.0.1:{broker.port},CONTROLLER://127.0.0.1:{status.controller_port}" in props


def test_a_stale_state_file_is_not_trusted(tmp_path, kafka_broker):
    broker = KafkaBroker(kb.free_port(), state_dir=tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # A live process that is not Kafka, and a Kafka process that is not this broker.
        for pid in (sleeper.pid, getattr(kafka_broker.broker, "pid", None)):
            if pid is None:
                continue
            state = {"pid": pid, "port": broker.port, "controller_port": 1, "started_at": time.time()}
            broker.state_path.write_text(json.dumps(state))
            status = broker.status()
            assert not status.running and status.stale and status.pid == pid
            assert "stale state file" in status.describe()
            assert broker.pid is None
            assert broker.stop(timeout=2) is False  # nothing signalled ...
            assert not broker.state_path.exists()  # ... and the stale file is gone
        assert sleeper.poll() is None
        assert kafka_broker.broker is None or kafka_broker.broker.status().running
    finally:
        sleeper.kill()
        sleeper.wait()


def test_missing_jars_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("BEAMOPS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BEAMOPS_KAFKA_LIBS", str(tmp_path / "nowhere"))
    with pytest.raises(KafkaBrokerError, match=r"scripts/install_components\.sh"):
        KafkaBroker(kb.free_port(), state_dir=tmp_path / "state").start()
    monkeypatch.delenv("BEAMOPS_KAFKA_LIBS")
    with pytest.raises(KafkaBrokerError, match=r"not installed: run scripts/install_components\.sh"):
        kb.find_components()


def test_cli_functions_up_status_down(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BEAMOPS_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("BEAMOPS_KAFKA_JVM_OPTS", "-XX:TieredStopAtLevel=1")  # start as fast as the fixture
    port = kb.free_port()
    try:
        assert kb.up(port) == 0
        out = capsys.readouterr().out
        assert f"ready on 127.0.0.1:{port}" in out and "formatted" in out
        assert (tmp_path / f"kafka-{port}" / "data" / "meta.properties").is_file()

        assert kb.status(port) == 0
        assert f"running: pid {KafkaBroker(port).pid}, bootstrap 127.0.0.1:{port}" in capsys.readouterr().out
        other = kb.free_port()
        assert kb.status(other) == 3  # the status of another port names this one, as `down` does
        said = f"not running on 127.0.0.1:{other} (one runs on port {port}: add --port {port})"
        assert said in capsys.readouterr().out
        assert kb.up(port) == 0
        data = tmp_path / f"kafka-{port}" / "data"
        assert (
            f"already running on 127.0.0.1:{port} (pid {KafkaBroker(port).pid}), data {data}" in capsys.readouterr().out
        )
        # another data dir while it runs: refused, not "already running" on the other one's topics
        assert kb.up(port, data_dir=tmp_path / "other") == 1
        err = capsys.readouterr().err
        assert f"a broker already runs on 127.0.0.1:{port}" in err and f"with its data in {data}, not " in err
        assert not (tmp_path / "other").exists()
    finally:
        assert kb.down(port) == 0
    out = capsys.readouterr().out
    assert "stopped after" in out
    assert f"its topics stay in {data}: `beamops kafka up --port {port}` serves them again" in out
    assert kb.status(port) == 3
    assert "not running" in capsys.readouterr().out
    assert kb.down(port) == 0
    assert "no broker running" in capsys.readouterr().out
