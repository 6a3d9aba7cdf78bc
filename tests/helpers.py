"""Helpers shared by the unit and integration tests: ``from helpers import ...`` (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import pytest
from confluent_kafka import Consumer, Message, TopicPartition

from beamops.frames import SparseFrameBatch
from beamops.services._local import stop_process_group

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
SDK_WORKER = Path(sys.executable).with_name("beamops-sdk-worker")  # the console script, as docker/ runs it


class Background(Generic[T]):
    """``fn()`` in a daemon thread, started at once; :meth:`result` waits for it with a bound."""

    def __init__(self, fn: Callable[[], T], what: str) -> None:
        self.what = what
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True, name=f"bounded-{what}")
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._outcome["result"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            self._outcome["error"] = exc

    def is_alive(self) -> bool:
        """Whether ``fn()`` still runs."""
        return self._thread.is_alive()

    def result(self, timeout: float) -> T:
        """``fn()``'s result, or its exception raised again; a test failure if it still runs after ``timeout`` s."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            pytest.fail(f"{self.what} did not finish within {timeout:g} s")
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["result"]


def call_bounded(fn: Callable[[], T], what: str, timeout: float = 120.0) -> T:
    """``fn()`` in a daemon thread: its result, its exception, or a test failure after ``timeout`` s."""
    return Background(fn, what).result(timeout)


@contextmanager
def child(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in the repository, in a process group of its own (its output in ``log``).

    On the way out the whole group gets SIGTERM, then SIGKILL: a job's process starts Beam's job
    server (a JVM) that would otherwise outlive it.
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop_process_group(proc)


@contextmanager
def sdk_worker_pool(log: Path) -> Iterator[tuple[str, int]]:
    """The production worker pool on a free 127.0.0.1 port, its workers ``beamops-sdk-worker`` processes,
    as a :func:`child` (SIGTERM stops the pool and its workers); yields its ``host:port`` and PID."""
    args = [sys.executable, "-m", "beamops.services.worker_pool", "--port", "0", "--sdk_worker", str(SDK_WORKER)]
    with child(args, log) as proc:
        deadline = time.monotonic() + 60
        while "listening on" not in log.read_text():
            assert proc.poll() is None, f"worker pool exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "worker pool did not start within 60 s"
            time.sleep(0.2)
        yield log.read_text().split("listening on ")[1].split()[0], proc.pid


def new_consumer(bootstrap: str, group_id: str | None = None) -> Consumer:
    """A consumer without auto-commit that reports partition ends (a fresh group unless ``group_id``)."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id or f"test-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )


def read_topic(bootstrap: str, topic: str, timeout: float = 30.0) -> list[Message]:
    """Every message of the topic up to its current end, in (partition, offset) order."""
    consumer = new_consumer(bootstrap)
    try:
        partitions = sorted(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in partitions}
        wanted = {p: high for p, (low, high) in ends.items() if high > low}
        consumer.assign([TopicPartition(topic, p, ends[p][0]) for p in wanted])
        messages = []
        deadline = time.monotonic() + timeout
        while wanted and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            messages.append(msg)
            if msg.offset() + 1 >= wanted.get(msg.partition(), 0):
                wanted.pop(msg.partition(), None)
        assert not wanted, f"partitions {sorted(wanted)} of {topic} not read to their end in {timeout:g} s"
        # Exactly what the log holds: no message missing and none written twice.
        assert len(messages) == sum(high - low for low, high in ends.values()), (len(messages), ends)
        return sorted(messages, key=lambda m: (m.partition(), m.offset()))
    finally:
        consumer.close()


def concat(batches: list[SparseFrameBatch]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Events, frame lengths, scan positions and frame numbers of ``batches``, back to back."""
    events = np.concatenate([b.events for b in batches])
    lengths = np.concatenate([np.diff(b.offsets) for b in batches])
    positions = np.concatenate([b.scan_positions for b in batches])
    numbers = np.concatenate([b.frame_numbers for b in batches])
    return events, lengths, positions, numbers


def assert_same_frames(got: list[SparseFrameBatch], want: list[SparseFrameBatch]) -> None:
    """The same frames in the same order: events, lengths, scan positions and frame numbers."""
    for g, w in zip(concat(got), concat(want), strict=True):
        np.testing.assert_array_equal(g, w)


def run_bench(module: str, *args: str, timeout: float = 300.0) -> str:
    """``python -m bench.<module> args`` from the repository root: its output; fails on a non-zero exit.

    The benchmarks measure and always exit 0: a test of one checks only that it still runs to its end.
    """
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"bench.{module} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


@contextmanager
def fake_flink_rest(answers: dict[str, Any]) -> Iterator[str]:
    """A REST API on 127.0.0.1 that answers GET ``path`` (with its query) with ``answers[path]`` as JSON, and
    404 otherwise; yields its base URL."""
    import http.server
    import json

    class Rest(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in answers:
                self.send_error(404)
                return
            body = json.dumps(answers[self.path]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Rest)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
