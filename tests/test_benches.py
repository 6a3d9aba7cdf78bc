"""Every benchmark that needs no server still runs: each one, at its smallest sizes, to its last line.

The figures are not checked (the benchmarks measure; they always exit 0), only that a change in the
library has not left one of them broken, which no other test would notice.
"""

from __future__ import annotations

import pytest
from helpers import run_bench

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("module", "args", "last_words"),
    [
        ("sparse_com", ["--quick", "--scan", "16", "--repeat", "1", "--stempy-repeat", "1", "--v0-positions", "64",
                        "--events", "20"], "target >= 10x"),
        ("dense_com", ["--quick", "--pool", "1", "--passes", "1", "--repeat", "1", "--bw-mib", "8"],
         "4D Camera rate 87,000 frames/s"),
        ("pipeline_overhead", ["--quick", "--scan", "16", "--scans", "2", "--rounds", "1", "--bytes-repeat", "1"],
         "4D Camera rate 87,000 frames/s"),
        ("new_kernels", ["--quick", "--scan", "16", "--repeat", "1", "--stempy-repeat", "1", "--dense-frames", "4",
                         "--dpc-scan", "16", "--dpc-maps", "1"], "DPC phase"),
    ],
)  # fmt: skip
def test_the_benchmark_runs(module: str, args: list[str], last_words: str) -> None:
    assert last_words in run_bench(module, *args)
