"""jobs.simulate and FramePublisher against a real Kafka broker (the session's ``kafka_broker``)."""

from __future__ import annotations

import logging
import os
import re
import signal
import time
import uuid
from dataclasses import replace

import numpy as np
import pytest
from confluent_kafka import Consumer
from helpers import Background, read_topic
from stempy.io import SparseArray, load_electron_counts

from beamops import FrameDecodeError, SparseFrameBatch, decode_batch
from beamops.frames import CONTENT_TYPE, SCHEMA_VERSION
from beamops.io.kafka_config import KafkaClientConfig
from beamops.io.publish import FramePublisher, PublishError, RateLimiter, TopicNotFoundError
from beamops.simulate import ScanSimulation
from jobs import simulate

pytestmark = pytest.mark.integration

SIM = ScanSimulation(
    scan_shape=(8, 10),
    frame_shape=(64, 72),
    events_per_frame=20,
    frames_per_position=2,
    disc_radius=10,
    shift_amplitude=3,
    seed=11,
)
SIM_ARGS = [
    "--scan_rows=8",
    "--scan_cols=10",
    "--frame_rows=64",
    "--frame_cols=72",
    "--events_per_frame=20",
    "--frames_per_position=2",
    "--disc_radius=10",
    "--shift_amplitude=3",
    "--seed=11",
    "--progress=off",
]


def decoded(messages: list) -> list[SparseFrameBatch]:
    batches = []
    for msg in messages:
        headers = dict(msg.headers() or [])
        assert headers["content-type"] == CONTENT_TYPE.encode()
        assert headers["beamops-schema-version"] == str(SCHEMA_VERSION).encode()
        batch = decode_batch(msg.value())
        assert isinstance(batch, SparseFrameBatch)
        assert msg.key() == str(batch.header.scan_number).encode()
        batches.append(batch)
    return batches


def frames_by_number(batches: list[SparseFrameBatch]) -> dict[tuple[int, int], tuple[int, np.ndarray]]:
    """(scan, frame number) -> (scan position, events); fails on a duplicate frame."""
    frames = {}
    for batch in batches:
        for i in range(batch.n_frames):
            key = (batch.header.scan_number, int(batch.frame_numbers[i]))
            assert key not in frames, f"frame {key} published twice"
            frames[key] = (int(batch.scan_positions[i]), batch.frame(i))
    return frames


def run(kafka_broker, topic: str, *args: str) -> int:
    return simulate.main(["--bootstrap_servers", kafka_broker.bootstrap_servers, "--topic", topic, *args])


def test_simulated_scans_arrive_whole_and_spread_over_all_partitions(kafka_broker, capsys):
    topic = kafka_broker.new_topic(partitions=4)
    status = run(kafka_broker, topic, *SIM_ARGS, "--batch_size=16", "--n_scans=2", "--first_scan_number=5")
    assert status == 0
    assert "published 320 frames in 20 batches" in capsys.readouterr().out

    messages = read_topic(kafka_broker.bootstrap_servers, topic)
    assert len(messages) == 20
    assert {m.partition() for m in messages} == {0, 1, 2, 3}
    batches = decoded(messages)
    assert {m.key() for m in messages} == {b"5", b"6"}
    frames = frames_by_number(batches)
    assert len(frames) == 2 * SIM.n_frames
    for scan in (5, 6):
        sim = replace(SIM, scan_number=scan)
        assert all(b.header == sim.header for b in batches if b.header.scan_number == scan)
        for index in range(sim.n_batches(16)):
            want = sim.batch(index, 16)
            for i in range(want.n_frames):
                position, events = frames[(scan, int(want.frame_numbers[i]))]
                assert position == want.scan_positions[i]
                np.testing.assert_array_equal(events, want.frame(i))


def test_by_scan_keeps_each_scan_in_one_partition(kafka_broker):
    topic = kafka_broker.new_topic(partitions=4)
    assert run(kafka_broker, topic, *SIM_ARGS, "--batch_size=40", "--n_scans=3", "--partitioner=by-scan") == 0
    messages = read_topic(kafka_broker.bootstrap_servers, topic)
    assert len(messages) == 3 * 4
    partitions_of = {}
    for msg in messages:
        partitions_of.setdefault(msg.key(), set()).add(msg.partition())
    assert sorted(partitions_of) == [b"1", b"2", b"3"]
    assert all(len(p) == 1 for p in partitions_of.values()), partitions_of


def test_a_second_run_publishes_the_next_scan_number(kafka_broker, caplog):
    """As a detector numbers its acquisitions: with scan 1 again, a reduce would take the second run's frames
    for the first run's delivered twice, skip them, and its map would be the first run's."""
    topic = kafka_broker.new_topic(partitions=3)
    caplog.set_level(logging.INFO, logger="jobs.simulate")
    assert run(kafka_broker, topic, *SIM_ARGS, "--batch_size=50", "--n_scans=2") == 0
    assert run(kafka_broker, topic, *SIM_ARGS, "--batch_size=50", "--seed=3") == 0
    keys = [m.key() for m in read_topic(kafka_broker.bootstrap_servers, topic)]
    assert sorted(set(keys)) == [b"1", b"2", b"3"] and keys.count(b"3") == 4
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("publishing")]
    assert [line.split(" to ")[0] for line in said] == [
        "publishing 320 frames (scans 1-2)",
        "publishing 160 frames (scan 3)",
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("stop", "said"), [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "stopped by SIGTERM")])
def test_a_stop_names_the_scan_left_unfinished(kafka_broker, caplog, monkeypatch, stop, said):
    """Ctrl-C said "interrupted after N frames" without naming the scan left half in the topic; SIGTERM ended the
    simulator at once, its queued messages lost."""

    class StoppedAtTheFifthBatch(simulate.FramePublisher):
        def publish(self, batch):
            if self.stats().batches == 4:
                os.kill(os.getpid(), stop)
                time.sleep(5)  # stopped long before
            super().publish(batch)

    monkeypatch.setattr(simulate, "FramePublisher", StoppedAtTheFifthBatch)
    topic = kafka_broker.new_topic(partitions=1)
    caplog.set_level(logging.INFO, logger="jobs.simulate")
    assert run(kafka_broker, topic, *SIM_ARGS, "--batch_size=10") == 128 + stop
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert re.fullmatch(
        rf"{said} after 40 frames in 4 batches \(40 delivered\).*; scan 1 was not published in full", line
    )
    assert len(read_topic(kafka_broker.bootstrap_servers, topic)) == 4  # what was queued is delivered


def test_a_stempy_file_is_published_event_for_event(kafka_broker, tmp_path):
    rng = np.random.default_rng(5)
    scan_shape, frame_shape, per_position = (6, 5), (40, 48), 3
    data = np.empty((30, per_position), dtype=object)
    for index in np.ndindex(data.shape):
        data[index] = np.sort(rng.integers(0, 40 * 48, rng.integers(0, 25))).astype(np.uint32)
    path = tmp_path / "scan_electrons.h5"
    SparseArray(data, scan_shape, frame_shape).write_to_hdf5(str(path))  # stempy's own writer

    topic = kafka_broker.new_topic(partitions=4)
    assert run(kafka_broker, topic, "--hdf5", str(path), "--batch_size=7", "--first_scan_number=15") == 0

    batches = decoded(read_topic(kafka_broker.bootstrap_servers, topic))
    assert {(b.header.scan_number, b.header.scan_shape, b.header.frame_shape) for b in batches} == {
        (15, scan_shape, frame_shape)
    }
    frames = frames_by_number(batches)
    assert len(frames) == data.size == batches[0].header.total_frames
    stempy_view = load_electron_counts(str(path))
    for (_, row), (position, events) in frames.items():
        assert position == row // per_position
        np.testing.assert_array_equal(events, stempy_view.data[position, row % per_position])


def test_the_rate_limit_is_respected(kafka_broker, capsys, caplog):
    topic = kafka_broker.new_topic(partitions=2)
    args = [*SIM_ARGS, "--scan_rows=20", "--scan_cols=50", "--batch_size=100", "--rate=4000"]
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="jobs.simulate"):
        assert run(kafka_broker, topic, *args) == 0
    elapsed = time.monotonic() - started
    assert not [r for r in caplog.records if r.name == "jobs.simulate"]  # it kept up: no "could not" warning
    assert 0.45 <= elapsed < 10, elapsed  # 2000 frames at 4000 frames/s: 0.5 s
    summary = capsys.readouterr().out
    assert "published 2000 frames in 20 batches" in summary and "(target 4,000)" in summary
    achieved = float(summary.split(" s, ")[1].split(" frames/s")[0].replace(",", ""))
    assert achieved <= 4000 * 1.1, summary
    assert len(read_topic(kafka_broker.bootstrap_servers, topic)) == 20


def test_a_rate_the_simulator_cannot_reach_is_reported(kafka_broker, caplog):
    topic = kafka_broker.new_topic(partitions=2)
    args = [*SIM_ARGS, "--scan_rows=20", "--scan_cols=50", "--batch_size=100", "--rate=1e9"]
    with caplog.at_level(logging.WARNING, logger="jobs.simulate"):
        assert run(kafka_broker, topic, *args) == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "jobs.simulate"]
    assert re.fullmatch(r"(9\d|100)% of the frames were ready only after --rate 1,000,000,000 frames/s .*", warning)
    assert len(read_topic(kafka_broker.bootstrap_servers, topic)) == 20


def test_rate_limiter_schedule():
    """No broker needed: a batch is due n/rate after the previous one; catching up is capped."""
    now = [0.0]
    slept = []

    def sleep(seconds):
        slept.append(round(seconds, 6))
        now[0] += seconds

    limiter = RateLimiter(1000, max_lag_s=0.5, clock=lambda: now[0], sleep=sleep)
    for _ in range(4):
        limiter.wait(100)
    assert slept == [0.1] * 4 and now[0] == pytest.approx(0.4)
    now[0] += 2.0  # the publisher stalled for 2 s: it may burst 0.5 s worth (500 frames), no more
    slept.clear()
    for _ in range(6):
        limiter.wait(100)
    assert slept == [0.1]  # five batches go at once, the sixth waits
    assert limiter.late_frames == 500
    # Batches that each take longer to make than max_lag_s are all late (the catch-up cap aside).
    slow = RateLimiter(500, max_lag_s=1.0, clock=lambda: now[0], sleep=sleep)
    slept.clear()
    for _ in range(5):
        slow.wait(1000)  # due every 2 s
        now[0] += 3.0  # made in 3 s
    assert slow.late_frames == 4000  # all but the first
    assert slept == [2.0]  # the first batch waits its 2 s; the late ones go at once
    assert RateLimiter(None).wait(10**6) == 0.0 and RateLimiter(0).rate is None


def test_a_missing_topic_is_a_clear_error_and_is_not_created(kafka_broker, capsys):
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    assert run(kafka_broker, missing, *SIM_ARGS) == 2  # a bad --topic, as for the jobs
    err = capsys.readouterr().err
    assert f"Kafka topic {missing!r} does not exist on {kafka_broker.bootstrap_servers}" in err
    assert "--create_topic" in err
    assert "delivered" not in err  # no progress line: nothing was published
    consumer = Consumer({"bootstrap.servers": kafka_broker.bootstrap_servers, "group.id": "probe"})
    try:
        assert missing not in consumer.list_topics(timeout=10).topics
    finally:
        consumer.close()

    try:
        assert run(kafka_broker, missing, *SIM_ARGS, "--create_topic", "--partitions=3", "--batch_size=10") == 0
        messages = read_topic(kafka_broker.bootstrap_servers, missing)
        assert len(messages) == 16 and {m.partition() for m in messages} == {0, 1, 2}
    finally:
        kafka_broker.delete_topic(missing)


def test_a_mistyped_topic_names_the_topic_of_the_closest_name(kafka_broker, capsys):
    meant = kafka_broker.new_topic()
    assert run(kafka_broker, f"{meant}z", *SIM_ARGS) == 2
    assert f"does not exist on {kafka_broker.bootstrap_servers} (did you mean {meant!r}?); create it" in (
        capsys.readouterr().err
    )


def test_a_mistyped_option_names_the_option_meant(capsys):
    with pytest.raises(SystemExit) as exited:
        simulate.parse_args(["--topic", "t", "--scan-rows", "8"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --scan-rows 8 (did you mean --scan_rows?)" in capsys.readouterr().err


def test_frames_the_broker_acknowledged_slower_than_the_rate_are_reported(kafka_broker, caplog, monkeypatch):
    class SlowBroker(simulate.FramePublisher):
        def stats(self):  # as if every acknowledgement had taken ten times as long
            real = super().stats()
            return replace(real, elapsed_s=real.elapsed_s * 10)

    monkeypatch.setattr(simulate, "FramePublisher", SlowBroker)
    topic = kafka_broker.new_topic(partitions=2)
    args = [*SIM_ARGS, "--scan_rows=20", "--scan_cols=50", "--batch_size=100", "--rate=4000"]
    with caplog.at_level(logging.WARNING, logger="jobs.simulate"):
        assert run(kafka_broker, topic, *args) == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "jobs.simulate"]
    slow = r"the frames went out at [34]\d\d frames/s, below --rate 4,000: the broker acknowledged them more slowly .*"
    assert re.fullmatch(slow, warning)


def test_a_short_publish_is_not_called_slow(kafka_broker, caplog, monkeypatch):
    """160 frames at 87,000 frames/s take 2 ms, and the last acknowledgement a few more: the rate it then
    reports is no sign of a slow broker (it was said to be one)."""

    class ShortRun(simulate.FramePublisher):
        def stats(self):  # every frame made in time, the last acknowledged 0.5 s after the first was sent
            return replace(super().stats(), elapsed_s=0.5, late_frames=0)

    monkeypatch.setattr(simulate, "FramePublisher", ShortRun)
    topic = kafka_broker.new_topic(partitions=2)
    with caplog.at_level(logging.WARNING, logger="jobs.simulate"):
        assert run(kafka_broker, topic, *SIM_ARGS, "--batch_size=20", "--rate=87000") == 0
    assert not [r.getMessage() for r in caplog.records if r.name == "jobs.simulate"]  # 320 frames/s, not "slow"


def test_a_delivery_failure_fails_the_job(kafka_broker, capsys):
    topic = kafka_broker.new_topic(partitions=1, config={"max.message.bytes": "2000"})
    assert run(kafka_broker, topic, *SIM_ARGS, "--batch_size=50") == 1
    err = capsys.readouterr().err
    assert f"Kafka delivery to {topic!r} failed" in err and "messages failed" in err


def test_publisher_raw_messages_and_metrics(kafka_broker):
    topic = kafka_broker.new_topic(partitions=3)
    client = KafkaClientConfig.load(kafka_broker.bootstrap_servers, overrides=["linger.ms=1"])
    with FramePublisher(client, topic) as publisher:
        publisher.publish_raw(b"not arrow", key="9", headers=[("content-type", "text/plain")])
        publisher.publish_all(SIM.batches(50))
        publisher.publish_raw(b"\xff" * 10, partition=2)
    stats = publisher.stats()
    assert (stats.frames, stats.batches, stats.messages) == (SIM.n_frames, 4, 6)
    assert stats.delivered_messages == 6 and stats.failed_messages == 0 and stats.queued_messages == 0
    assert stats.bytes == stats.delivered_bytes > 0 and stats.frames_per_s > 0

    messages = read_topic(kafka_broker.bootstrap_servers, topic)
    raw = [m for m in messages if m.value() in (b"not arrow", b"\xff" * 10)]
    assert len(raw) == 2
    assert {m.key() for m in raw} == {b"9", None} and [m.partition() for m in raw if m.key() is None] == [2]
    for msg in raw:
        with pytest.raises(FrameDecodeError):
            decode_batch(msg.value())
    assert {m.partition() for m in messages} == {0, 1, 2}

    with pytest.raises(TopicNotFoundError, match="does not exist"):
        FramePublisher(client, f"missing-{uuid.uuid4().hex[:8]}")


def test_a_broker_restart_while_publishing_loses_and_duplicates_nothing(kafka_broker):
    if kafka_broker.external:
        pytest.skip("restarts only a broker the fixture started")
    topic = kafka_broker.new_topic(partitions=4)
    sim = replace(SIM, scan_shape=(20, 40), frames_per_position=1)  # 800 frames
    args = [*SIM_ARGS, "--scan_rows=20", "--scan_cols=40", "--frames_per_position=1", "--batch_size=20"]
    job = Background(lambda: run(kafka_broker, topic, *args, "--rate=800"), "the simulator")
    try:
        time.sleep(0.3)  # a few batches out, most still to come
        kafka_broker.restart()
    finally:
        status = job.result(120)
    assert status == 0

    messages = read_topic(kafka_broker.bootstrap_servers, topic)
    assert len(messages) == sim.n_batches(20)
    frames = frames_by_number(decoded(messages))  # fails on a duplicate
    assert sorted(number for _, number in frames) == list(range(sim.n_frames))


def test_frames_queued_while_the_broker_is_away_are_not_counted_as_delivered(kafka_broker):
    """The simulator's progress counts acknowledged frames: queued ones would show a stalled run as progressing."""
    if kafka_broker.external:
        pytest.skip("stops only a broker the fixture started")
    topic = kafka_broker.new_topic(partitions=2)
    client = KafkaClientConfig.load(kafka_broker.bootstrap_servers, overrides=["linger.ms=1"])
    batches = list(SIM.batches(20))  # 160 frames in 8 batches
    with FramePublisher(client, topic) as publisher:
        publisher.publish_all(batches[:4])
        publisher.flush(30)
        kafka_broker.stop()
        try:
            publisher.publish_all(batches[4:])
            with pytest.raises(PublishError, match="4 messages still undelivered after 2 s"):
                publisher.flush(2)  # serves the delivery callbacks, which would count what was delivered
            away = publisher.stats()
        finally:
            kafka_broker.start()
    stats = publisher.stats()
    assert (away.frames, away.delivered_frames) == (SIM.n_frames, 80)
    assert "160 frames in 8 batches (80 delivered)" in away.describe()
    assert stats.delivered_frames == SIM.n_frames and stats.delivered_messages == 8
    assert len(read_topic(kafka_broker.bootstrap_servers, topic)) == 8
