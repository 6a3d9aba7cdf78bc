"""Helpers to unit-test operators on DirectRunner in a few lines.

    from beamops.testing import ScanSimulation, run_operator, assert_com_close
    from transforms.com_partial import com_partial
    from transforms.com_reduce import com_reduce

    sim = ScanSimulation(scan_shape=(16, 16), events_per_frame=200)
    result = run_operator(lambda frames: frames | com_partial() | com_reduce(), sim.batches(100))
    final = result.final_maps()[sim.scan_number]
    assert_com_close(final, sim.expected_com(), atol=6 * sim.com_standard_error())

``run_operator`` runs on Beam's in-process FnApiRunner (the engine of the
DirectRunner, without its attempt to download Prism) and collects the main
output and the dead letters. ``matches_com`` is a matcher for Beam's
``assert_that`` in ``TestPipeline`` tests.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import BeamAssertException
from apache_beam.transforms.window import TimestampedValue

from beamops.deadletter import DeadLetter
from beamops.operator import dead_letters_going_nowhere
from beamops.results import ComMap
from beamops.simulate import ScanSimulation

__all__ = [
    "RunResult",
    "ScanSimulation",
    "assert_com_close",
    "dense_batches",
    "matcher",
    "matches_com",
    "run_operator",
    "small_scan",
    "sparse_batches",
    "timestamped_stream",
]

BATCH_RUNNER = "FnApiRunner"


def small_scan(**overrides: Any) -> ScanSimulation:
    """A small, fast scan for unit tests: 6x8 positions, 64x64 frames, 20 events/frame."""
    params: dict[str, Any] = {
        "scan_shape": (6, 8),
        "frame_shape": (64, 64),
        "events_per_frame": 20.0,
        "disc_radius": 8.0,
        "shift_amplitude": 4.0,
        "seed": 1,
        "scan_number": 1,
    }
    return ScanSimulation(**{**params, **overrides})


def timestamped_stream(*steps: tuple[Any, Any]) -> TestStream:
    """A TestStream from ``(timestamp_s, element)`` pairs and ``("watermark", t)`` steps.

    The watermark finally moves to 1e6 s, past every timer a test sets (Beam's
    assert_that misses what timers emit only at infinity), then to infinity.
    Run it on ``--runner=BundleBasedDirectRunner``.
    """
    stream = TestStream()
    for first, second in steps:
        if first == "watermark":
            stream = stream.advance_watermark_to(second)
        else:
            stream = stream.add_elements([TimestampedValue(second, first)])
    return stream.advance_watermark_to(1e6).advance_watermark_to_infinity()


def matcher(check: Callable[[list[Any]], None]) -> Callable[[list[Any]], None]:
    """An ``assert_that`` matcher from a function that uses plain asserts."""

    def _match(actual: list[Any]) -> None:
        try:
            check(actual)
        except AssertionError as exc:
            raise BeamAssertException(str(exc)) from exc

    return _match


def sparse_batches(sim: ScanSimulation, batch_size: int) -> list[Any]:
    """All sparse batches of a simulated scan."""
    return list(sim.batches(batch_size))


def dense_batches(sim: ScanSimulation, batch_size: int) -> list[Any]:
    """All batches of a simulated scan as dense uint16 frames."""
    return [sim.dense_batch(i, batch_size) for i in range(sim.n_batches(batch_size))]


_collected: dict[str, list[Any]] = {}
_lock = threading.Lock()


def _collect(element: Any, key: str) -> None:
    with _lock:
        _collected[key].append(element)


@dataclass
class RunResult:
    """What a pipeline produced: main outputs, dead letters, Beam metrics."""

    outputs: list[Any]
    dead_letters: list[DeadLetter]
    metrics: Any = field(repr=False)

    def final_maps(self) -> dict[int, ComMap]:
        """The final ComMap of each scan, by scan number."""
        return {m.scan_number: m for m in self.outputs if isinstance(m, ComMap) and m.final}

    def counter(self, name: str) -> int:
        """Sum of a beamops counter over all steps."""
        from apache_beam.metrics import MetricsFilter

        found = self.metrics.query(MetricsFilter().with_namespace("beamops").with_name(name))["counters"]
        return sum(c.committed for c in found)


def run_operator(
    transform: beam.PTransform | Callable[[beam.PCollection], Any],
    inputs: Iterable[Any],
    *,
    runner: str = BATCH_RUNNER,
    options: Sequence[str] = (),
) -> RunResult:
    """Run ``transform`` (an operator, or a function chaining several) over ``inputs``.

    The main output and the dead letters are collected in this process, which
    works on the in-process runners (FnApiRunner, BundleBasedDirectRunner).
    """
    items = list(inputs)
    key = uuid.uuid4().hex
    out_key, dead_key = f"{key}-out", f"{key}-dead"
    with _lock:
        _collected[out_key], _collected[dead_key] = [], []
    pipeline = beam.Pipeline(options=PipelineOptions([f"--runner={runner}", *options]))
    create = beam.Create(items)
    if items:
        create = create.with_output_types(type(items[0]))
    source = pipeline | "Inputs" >> create
    result = transform(source) if not isinstance(transform, beam.PTransform) else source | transform
    if isinstance(result, dict):
        main = result.main if hasattr(result, "main") else result
        dead = result.get("dead_letter")
    else:
        main, dead = result, None
    main | "CollectOutputs" >> beam.Map(_collect, out_key)
    # Every dead letter, also of operators whose named port the chain went on from (which does not
    # carry them on): the result says what went to dead letters, whatever the chain returned.
    dead_letters = [dead] if dead is not None else []
    dead_letters += [p for p in dead_letters_going_nowhere(pipeline) if p is not dead]
    if dead_letters:
        dead_letters | "AllDeadLetters" >> beam.Flatten() | "CollectDeadLetters" >> beam.Map(_collect, dead_key)
    run = pipeline.run()
    run.wait_until_finish()
    with _lock:
        outputs, dead_letters = _collected.pop(out_key), _collected.pop(dead_key)
    return RunResult(outputs, dead_letters, run.metrics())


def assert_com_close(
    actual: ComMap,
    expected: ComMap | tuple[np.ndarray, np.ndarray],
    *,
    atol: float = 1e-4,
) -> None:
    """Assert two COM maps agree within ``atol`` px; NaN must match NaN."""
    ex, ey = (expected.x, expected.y) if isinstance(expected, ComMap) else expected
    for axis, got, want in (("x", actual.x, ex), ("y", actual.y, ey)):
        got = np.asarray(got, np.float64)
        want = np.asarray(want, np.float64)
        if got.shape != want.shape:
            raise AssertionError(f"COM {axis}: shape {got.shape} != expected {want.shape}")
        nan_mismatch = np.isnan(got) != np.isnan(want)
        if nan_mismatch.any():
            where = np.argwhere(nan_mismatch)[:5].tolist()
            raise AssertionError(f"COM {axis}: NaN at different positions, e.g. (row, col) {where}")
        diff = np.abs(np.nan_to_num(got - want))
        if diff.max(initial=0.0) > atol:
            worst = np.unravel_index(np.argmax(diff), diff.shape)
            raise AssertionError(
                f"COM {axis}: max difference {diff.max():.3g} px > {atol:g} px at (row, col) {tuple(map(int, worst))}: "
                f"{got[worst]} vs expected {want[worst]}"
            )


def matches_com(
    expected: dict[int, tuple[np.ndarray, np.ndarray]], *, atol: float = 1e-4, final_only: bool = True
) -> Callable[[list[Any]], None]:
    """A matcher for ``assert_that``: the final map of each scan equals ``expected[scan]``."""

    def _match(actual: list[Any]) -> None:
        finals = {m.scan_number: m for m in actual if not final_only or m.final}
        if set(finals) != set(expected):
            raise BeamAssertException(f"final maps for scans {sorted(finals)}, expected {sorted(expected)}")
        for scan, want in expected.items():
            try:
                assert_com_close(finals[scan], want, atol=atol)
            except AssertionError as exc:
                raise BeamAssertException(f"scan {scan}: {exc}") from exc

    return _match
