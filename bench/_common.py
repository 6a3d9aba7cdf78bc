"""Shared helpers of the benchmarks: timing, tables and target lines.

The machines are shared and noisy, so every benchmark compares ratios measured
in the same run and repeats each measurement, reporting the best and the median.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Wall times (s) of repeated runs of one measurement."""

    times: tuple[float, ...]

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass(frozen=True)
class Derived:
    """A time derived from other measurements (for example a difference), with a best and a median estimate."""

    best: float
    median: float


def measure(fn: Callable[[], Any], repeat: int, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times timed (GC off while timing)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
    return Timing(tuple(times))


def measure_interleaved(
    fns: Sequence[Callable[[], Any]], repeats: Sequence[int], warmup: int | Sequence[int] = 1
) -> list[Timing]:
    """Like :func:`measure` for several functions, taking turns (round robin) so that a noisy
    neighbour slows all of them alike; function ``i`` is timed ``repeats[i]`` times."""
    warmups = [warmup] * len(fns) if isinstance(warmup, int) else list(warmup)
    for fn, w in zip(fns, warmups, strict=True):
        for _ in range(w):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(max(repeats)):
        for i, fn in enumerate(fns):
            if r >= repeats[i]:
                continue
            gc.collect()
            gc.disable()
            try:
                start = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - start)
            finally:
                gc.enable()
    return [Timing(tuple(t)) for t in times]


def robust_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of ``y = intercept + slope * x`` by Theil-Sen.

    The slope is the median of the slopes between every two points with
    different ``x``, the intercept the median of ``y - slope * x``: one slow
    run of a noisy neighbour moves neither, where a least-squares fit or a
    difference of two runs would follow it.
    """
    slopes = [
        (ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]
    ]
    if not slopes:
        raise ValueError("a line needs points at two different x at least")
    slope = statistics.median(slopes)
    return slope, statistics.median(y - slope * x for x, y in zip(xs, ys, strict=True))


def machine_line() -> str:
    """One line about the machine, to print above every table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"machine: {os.cpu_count()} cores ({cpu}), shared and noisy; python {platform.python_version()}"


def cpu_seconds(pids: Sequence[int] = (), groups: Sequence[int] = ()) -> float:
    """CPU time (user + system, s) so far of the processes ``pids`` and of every process in the process
    groups ``groups``, from /proc (a process that has exited no longer counts)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command, which may hold spaces
        except OSError:
            continue
        # fields[2] is the process group, fields[11] and [12] utime and stime (proc(5), from field 3 on)
        if int(entry) in pids or int(fields[2]) in groups:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table; floats are printed with 3 significant digits (or as given if str)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v == 0 or 0.01 <= abs(v) < 1e6:
                return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
            return f"{v:.3g}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    left = [i == 0 or not any(_numeric(r[i]) for r in cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if lf else v.rjust(w) for v, w, lf in zip(values, widths, left, strict=True))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _numeric(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("x%"))
    except ValueError:
        return False
    return True


def target_line(what: str, value: float, target: float, unit: str = "x") -> str:
    """``what: value (target >= target) PASS|FAIL``."""
    verdict = "PASS" if value >= target else "FAIL"
    if unit == "%":
        return f"  {what}: {value:.0f}% (target >= {target:.0f}%)  {verdict}"
    return f"  {what}: {value:.1f}{unit} (target >= {target:g}{unit})  {verdict}"
