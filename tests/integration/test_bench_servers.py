"""The benchmarks that start their own Kafka broker and Flink cluster still run, at their smallest sizes.

As in tests/test_benches.py, the figures are not checked, only that each benchmark runs to its end.
"""

from __future__ import annotations

import pytest
from helpers import run_bench

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_kafka_benchmark_runs() -> None:
    out = run_bench("kafka_e2e", "--quick", "--scans", "1", "--scan", "32", "--events", "20", "--repeat", "1",
                    "--partitions", "2")  # fmt: skip
    assert "end to end: wall / bare (target >= 70%)" in out and "(broker stopped)" in out


def test_the_replay_memory_benchmark_runs() -> None:
    out = run_bench("replay_memory", "--gb", "0.01", "--scan", "32")
    assert "(broker stopped, its temp dir removed)" in out


def test_the_flink_benchmark_runs() -> None:
    out = run_bench("flink_e2e", "--quick", "--scans", "1", "--scan", "16", "--probes", "1", "--idle-s", "1",
                    timeout=600)  # fmt: skip
    for runner in ("Flink, parallelism 1, streaming", "Flink, parallelism 2, streaming"):
        assert f"verified {runner}: final maps of 1 scans identical to the DirectRunner's" in out
