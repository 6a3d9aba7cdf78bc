"""Keyed per-scan reduction: the machinery shared by com_reduce, diffraction_sum and virtual_images.

An operator of this kind keys its batches by scan number and keeps, per scan,
one accumulator in one ReadModifyWrite state cell (one cell, not several: the
SDK's state cache weighs every cell it commits, at a fixed cost of
milliseconds each). What it emits, per scan:

* progressive outputs (``final=False``) each time ``emit_every`` more frames
  have been added;
* final outputs (``final=True, complete=True``) as soon as the scan is
  complete: every expected frame seen when the header gives ``total_frames``,
  else every position seen;
* final outputs with ``complete=False`` when no frame has arrived for
  ``timeout_s`` seconds of event time (an event-time timer; in a bounded run
  the watermark reaches the end at end of input, so an incomplete scan is
  flushed then).

Frames of a scan that arrive after its final outputs (complete or flushed by
the timeout) go to dead letters (:class:`LateFrameError`) for
``finished_retention_s`` of event time; after that the scan number may start a
new scan. A batch the accumulator rejects goes to dead letters and the scan
goes on; so do the batches of a scan whose header declares shapes that need
more state than ``max_state_mb``. With ``total_frames`` the accumulator keeps
one bit per frame, so a redelivered frame (Kafka is at-least-once) is counted
once and in the ``duplicate_frames`` metric.

An operator provides its parameter model (a :class:`ScanReduceParams`), its
accumulator (a :class:`ScanProgress` that adds one batch and produces its
outputs), a :class:`ScanReduceFn` subclass that creates the accumulator,
says how many bytes it takes and turns it into outputs, and a
:class:`ScanReduceOperator` subclass naming them, which builds the keyed ParDo.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import apache_beam as beam
import numpy as np
import numpy.typing as npt
import objsize
from apache_beam import pvalue
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp
from numba import njit
from pydantic import Field

from beamops.frames import FrameHeader, SparseFrameBatch
from beamops.operator import (
    DEAD_LETTER,
    LONGEST_DURATION_S,
    METRICS_NAMESPACE,
    InstanceLogger,
    Operator,
    OperatorMetrics,
    OperatorParams,
)


class ScanReduceParams(OperatorParams):
    """The parameters of every per-scan reduction; an operator's Params subclass this.

    A subclass words the descriptions of ``emit_every`` and
    ``finished_retention_s`` (and the late-frame and redelivery messages) for
    what it emits by overriding the three class variables below.
    """

    progressive_output: ClassVar[str] = "a progressive output"  # "Emit a progressive map each time ..."
    final_output: ClassVar[str] = "output"  # "... after a scan's final map ..."
    frames_verb: ClassVar[str] = "reduced"  # "... more frames of a scan are reduced"

    emit_every: int = Field(10_000, ge=0, title="Emit every")
    timeout_s: float = Field(
        300.0,
        gt=0,
        le=LONGEST_DURATION_S,
        title="Timeout (s)",
        description="Flush a scan as final, marked incomplete, after this many seconds of event time without frames.",
    )
    finished_retention_s: float = Field(3600.0, gt=0, le=LONGEST_DURATION_S, title="Finished scan retention (s)")
    max_state_mb: float = Field(
        4096.0,
        gt=0,
        title="Largest scan state (MB)",
        description=(
            "The most memory (MB, 10^6 bytes) one scan's running state may take, as its header's shapes "
            "declare it; the batches of a larger scan go to dead letters (ScanTooLargeError) instead of "
            "exhausting the worker's memory."
        ),
    )

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._word_descriptions()

    @classmethod
    def _word_descriptions(cls) -> None:
        fields = cls.model_fields  # this class's own copies of the inherited fields
        fields["emit_every"].description = (
            f"Emit {cls.progressive_output} each time this many more frames of a scan are {cls.frames_verb}; "
            "0: final only."
        )
        fields["finished_retention_s"].description = (
            f"For this many seconds of event time after a scan's final {cls.final_output}, its frames are late "
            "(dead letters); after that its number may start a new scan."
        )
        cls.model_rebuild(force=True, raise_errors=False)  # the JSON schema is built from the descriptions


ScanReduceParams._word_descriptions()


class LateFrameError(ValueError):
    """Frames of a scan whose final output was already emitted."""


class ScanTooLargeError(ValueError):
    """A scan whose declared shapes need more state than ``max_state_mb``."""


def zeroed(shape: int | tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
    """A zero-filled array whose memory is written now, for state that lives as long as a scan.

    ``np.zeros`` of a large array (glibc maps it fresh) leaves its pages
    unbacked; reading them before they are written maps each to the kernel's
    one shared zero page, and a half-written scan is read like that by every
    progressive output. Writing the zeros takes the page faults once, when the
    scan starts, so the cost of an output does not depend on how full the scan
    is. How much that saves depends on the host: on 2026-11-24 a progressive
    COM map of a half-filled 256x256 scan took 2.5-3 ms instead of 45 µs on
    one AMD EPYC VM; on 2026-12-04 another showed no difference (145 µs
    either way, 4.3 ms at 1024x1024).
    """
    array = np.empty(shape, dtype)
    array.fill(0)
    return array


def seen_frames_bytes(header: FrameHeader) -> int:
    """Bytes of the one bit per expected frame every accumulator keeps (none without total_frames)."""
    return -(-(header.total_frames or 0) // 8)


@dataclass
class ScanProgress:
    """How far one scan has got: the base of every per-scan accumulator.

    A subclass adds its running sums as fields, implements ``add(batch) ->
    duplicates`` (validating the batch before touching anything, then calling
    :meth:`count`) and the method that produces its outputs.
    """

    header: FrameHeader
    _: KW_ONLY
    frames_seen: int = 0
    positions_seen: int = 0
    duplicates: int = 0
    next_emit: int = 0
    # one bit per expected frame when the header gives total_frames (redeliveries are skipped), else empty
    seen_frames: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.seen_frames = zeroed(seen_frames_bytes(self.header), np.uint8)

    @property
    def complete(self) -> bool:
        """Every expected frame seen when the header gives total_frames, else every position seen."""
        if self.header.total_frames is not None:
            return self.frames_seen >= self.header.total_frames
        return self.positions_seen == self.header.n_positions

    @property
    def progressive_ready(self) -> bool:
        """Whether a progressive output can be made yet (it is not, and not counted, while False)."""
        return True

    def check_same_scan(self, header: FrameHeader) -> None:
        """ValueError unless a batch with ``header`` has this scan's shapes and total_frames."""
        h, mine = header, self.header
        if (h.scan_shape, h.frame_shape, h.total_frames) != (mine.scan_shape, mine.frame_shape, mine.total_frames):
            raise ValueError(
                f"scan {h.scan_number}: batch has scan_shape {h.scan_shape}, frame_shape {h.frame_shape}, "
                f"total_frames {h.total_frames}, but the scan started with {mine.scan_shape}, "
                f"{mine.frame_shape}, {mine.total_frames}"
            )

    def check_sparse_batch(self, batch: SparseFrameBatch) -> None:
        """ValueError unless sparse ``batch`` belongs to this scan and its CSR and event indices are in range.

        The counting kernels do not check bounds: call this, then :meth:`fresh_in_range` (positions
        and frame numbers), before touching any sum.
        """
        h, mine = batch.header, self.header
        self.check_same_scan(h)
        n = batch.n_frames
        if len(batch.offsets) != n + 1 or len(batch.frame_numbers) != n:
            raise ValueError(f"scan {h.scan_number}: offsets/frame_numbers do not match {n} frames")
        if n and (
            batch.offsets[0] != 0 or batch.offsets[-1] != len(batch.events) or np.any(np.diff(batch.offsets) < 0)
        ):
            raise ValueError(f"scan {h.scan_number}: offsets are not monotonic from 0 to len(events)")
        if len(batch.events) and int(batch.events.max()) >= mine.n_pixels:
            raise ValueError(
                f"scan {h.scan_number}: event index {int(batch.events.max())} out of range "
                f"for frame_shape {mine.frame_shape}"
            )

    def fresh_in_range(
        self, header: FrameHeader, positions: np.ndarray, frame_numbers: np.ndarray | None
    ) -> tuple[np.ndarray, int]:
        """(True per frame not seen before, number of redeliveries), marking the frames seen.

        ValueError, before marking anything, for a scan position or (with total_frames) a frame number
        out of range. Redeliveries can only be told apart when the header gives total_frames (one bit
        per expected frame) and the frames carry their numbers; else every frame counts as fresh.
        """
        mine = self.header
        if frame_numbers is not None and len(frame_numbers) != len(positions):
            raise ValueError(
                f"scan {header.scan_number}: {len(frame_numbers)} frame numbers for {len(positions)} scan positions"
            )
        numbered = mine.total_frames is not None and frame_numbers is not None
        fresh = np.empty(len(positions), np.bool_)
        status, duplicates = _check_and_mark(
            positions,
            frame_numbers if numbered else _NO_FRAME_NUMBERS,
            mine.n_positions,
            mine.total_frames if numbered else 0,
            self.seen_frames,
            fresh,
        )
        if status == _POSITION_OUT_OF_RANGE:
            raise ValueError(
                f"scan {header.scan_number}: scan position {int(positions.max())} out of range "
                f"for scan_shape {mine.scan_shape}"
            )
        if status == _FRAME_OUT_OF_RANGE:
            raise ValueError(
                f"scan {header.scan_number}: frame number {int(frame_numbers.max())} out of range "
                f"for a scan of {mine.total_frames} frames"
            )
        return fresh, duplicates

    def count(self, n_frames: int, new_positions: int, duplicates: int) -> int:
        """Record a batch of ``n_frames`` added, ``duplicates`` of them skipped; return ``duplicates``."""
        self.positions_seen += new_positions
        self.frames_seen += n_frames - duplicates
        self.duplicates += duplicates
        return duplicates


_POSITION_OUT_OF_RANGE, _FRAME_OUT_OF_RANGE = 1, 2
_NO_FRAME_NUMBERS = np.zeros(0, np.uint64)


# One call for what took two numpy reductions, an allocation and a marking kernel: in a pipeline,
# on caches a 2 MB message has just gone through, 47 µs became 13 (measured 2026-12-07).
@njit(cache=True, nogil=True)
def _check_and_mark(
    positions: np.ndarray,
    frame_numbers: np.ndarray,
    n_positions: int,
    total_frames: int,
    seen_frames: np.ndarray,
    fresh: np.ndarray,
) -> tuple[int, int]:
    """(status, duplicates): every position below ``n_positions`` and every frame number below
    ``total_frames`` (status 0, else which is out of range, with nothing marked); then ``fresh[i]``
    unless frame ``i``'s bit is already set (a redelivery), and the bits set. Without frame numbers
    (an empty array) every frame is fresh."""
    for i in range(len(positions)):
        if positions[i] >= n_positions:
            return _POSITION_OUT_OF_RANGE, 0
    frames_limit = np.uint64(total_frames)  # uint64 against int64 would compare in float64
    for i in range(len(frame_numbers)):
        if frame_numbers[i] >= frames_limit:
            return _FRAME_OUT_OF_RANGE, 0
    if len(frame_numbers) == 0:
        fresh[:] = True
        return 0, 0
    duplicates = 0
    for i in range(len(frame_numbers)):
        f = frame_numbers[i]
        byte, bit = f >> 3, np.uint8(1 << (f & 7))
        fresh[i] = not (seen_frames[byte] & bit)
        duplicates += not fresh[i]
        seen_frames[byte] |= bit
    return 0, duplicates


@dataclass
class ScanState:
    """Everything kept for one scan number, in one state cell."""

    acc: ScanProgress | None = None
    finished: bool = False
    latest: Timestamp | None = None  # the latest event time of its frames
    timer_at: Timestamp | None = None  # when the timeout timer is set to fire


class ScanReduceFn(beam.DoFn):
    """The keyed DoFn of a per-scan reduction: state, timeout, emissions, dead letters, metrics, logs.

    Input: ``(scan number, batch)``. A subclass implements
    :meth:`new_accumulator`, :meth:`state_bytes` and :meth:`outputs`, and may rename the progressive
    output counter (``progressive_metric``). :class:`ScanReduceOperator` runs it as a DoFn of the
    instance's own (:func:`_with_own_timer`), whose ``process`` and timer callback call
    :meth:`add_batch` and :meth:`on_timeout`.
    """

    STATE = ReadModifyWriteStateSpec("scan", PickleCoder())
    progressive_metric: ClassVar[str] = "progressive_outputs"

    def __init__(self, name: str, params: ScanReduceParams, instance: str | None = None) -> None:
        """``name``: the catalog name (dead letters, metrics); ``instance``: the label the operator was
        applied with, which starts its log lines (else ``name``)."""
        self._name = name
        self._params = params
        self.instance = instance or name

    # --- what an operator provides ----------------------------------------------------------

    def new_accumulator(self, batch: Any) -> ScanProgress:
        """An empty accumulator for the scan that ``batch`` (its first batch) belongs to."""
        raise NotImplementedError

    def state_bytes(self, header: FrameHeader) -> int:
        """The bytes of the arrays :meth:`new_accumulator` allocates for a scan with ``header``,
        beside the one bit per expected frame that every accumulator keeps."""
        raise NotImplementedError

    def outputs(self, acc: Any, final: bool) -> Iterable[Any]:
        """The elements of one progressive (``final=False``) or final emission."""
        raise NotImplementedError

    # --- the machinery ------------------------------------------------------------------------

    def setup(self) -> None:
        _weigh_state_without_module_scan()
        self._log = InstanceLogger(type(self).__module__, self.instance)
        self._metrics = OperatorMetrics(self._name)
        self._completed = Metrics.counter(METRICS_NAMESPACE, "scans_completed")
        self._timed_out = Metrics.counter(METRICS_NAMESPACE, "scans_timed_out")
        self._progressive = Metrics.counter(METRICS_NAMESPACE, self.progressive_metric)

    def add_batch(self, element: tuple[int, Any], timestamp: Timestamp, state_cell: Any, timeout: Any) -> Iterator[Any]:
        """Add a batch to its scan's accumulator (``process``); emit what is due."""
        scan_number, batch = element
        params = self._params
        started = time.perf_counter()
        state = state_cell.read() or ScanState()
        try:
            if state.finished:
                raise LateFrameError(
                    f"scan {scan_number} already emitted its final {params.final_output}; {batch.n_frames} frames late"
                )
            acc = state.acc or self._start_scan(batch)
            duplicates = acc.add(batch)
        except Exception as exc:  # the batch goes to dead letters; the scan goes on
            yield self._metrics.to_dead_letters(batch, exc)
            return
        finally:
            self._metrics.observe(batch, started)

        self._metrics.skipped_redeliveries(self._log, scan_number, duplicates, params.frames_verb)
        state.latest = max(timestamp, state.latest or timestamp)

        if acc.complete:
            self._retain_finished(state_cell, timeout, state.latest, final_at=state.latest)
            self._completed.inc()
            self._metrics.frames_out.inc(acc.frames_seen)
            self._log.info("scan %d complete: %d frames", scan_number, acc.frames_seen)
            yield from self.outputs(acc, final=True)
            return
        if state.timer_at is None:
            # Set once; flush moves it on when frames came after it was set. Setting it
            # for every batch would cost a timer write per batch.
            state.timer_at = _timer_time(state.latest + Duration.of(params.timeout_s))
            timeout.set(state.timer_at)
        every = params.emit_every
        if every and acc.frames_seen >= acc.next_emit and acc.progressive_ready:
            acc.next_emit = (acc.frames_seen // every + 1) * every
            self._progressive.inc()
            self._log.info("scan %d: %d frames, %d positions so far", scan_number, acc.frames_seen, acc.positions_seen)
            yield from self.outputs(acc, final=False)
        state.acc = acc
        state_cell.write(state)

    def check_fits(self, header: FrameHeader) -> None:
        """ScanTooLargeError if a scan with ``header`` needs more state than ``max_state_mb``: a corrupt
        or mistaken header must not take the worker's memory (its batches go to dead letters)."""
        h = header
        needed = self.state_bytes(h) + seen_frames_bytes(h)
        if needed > self._params.max_state_mb * 1e6:
            frames = f" and {h.total_frames:,} frames" if h.total_frames is not None else ""
            raise ScanTooLargeError(
                f"scan {h.scan_number}: scan_shape {h.scan_shape}, frame_shape {h.frame_shape}{frames} need "
                f"{needed / 1e6:,.0f} MB of state, more than max_state_mb={self._params.max_state_mb:g}; "
                "raise max_state_mb if the workers have the memory"
            )

    def _start_scan(self, batch: Any) -> ScanProgress:
        """:meth:`new_accumulator`, once the scan is known to fit (:meth:`check_fits`)."""
        self.check_fits(batch.header)
        return self.new_accumulator(batch)

    def _retain_finished(self, state_cell: Any, timeout: Any, latest: Timestamp, final_at: Timestamp) -> None:
        """Keep the scan marked finished for ``finished_retention_s`` of event time after its final
        output (at ``final_at``), complete or flushed: its stragglers become dead letters instead of a
        second, incomplete "final" output that would replace the first."""
        timeout.set(final_at + Duration.of(self._params.finished_retention_s))
        state_cell.write(ScanState(finished=True, latest=latest))

    def on_timeout(self, key: int, fired_at: Timestamp, state_cell: Any, timeout: Any) -> Iterator[Any]:
        """The timeout (final, incomplete outputs) or the end of a finished scan's retention (nothing).

        A timeout timer that fires before ``timeout_s`` have passed since the
        scan's latest frame is set again for then.
        """
        state = state_cell.read()
        acc = state.acc if state else None
        due = _timer_time(state.latest + Duration.of(self._params.timeout_s)) if acc is not None else None
        if due is not None and due > fired_at:
            state.timer_at = due
            timeout.set(due)
            state_cell.write(state)
            return
        if acc is None:  # a finished scan's retention is over: its number may start a new scan
            state_cell.clear()
            return
        self._retain_finished(state_cell, timeout, state.latest, final_at=fired_at)
        self._timed_out.inc()
        self._metrics.frames_out.inc(acc.frames_seen)
        self._log.warning(
            "scan %d flushed incomplete (no frames for %.0f s of event time, or the input ended): "
            "%d frames, %d of %d positions",
            key, self._params.timeout_s, acc.frames_seen, acc.positions_seen, acc.header.n_positions,
        )  # fmt: skip
        yield from self.outputs(acc, final=True)


def _timer_time(moment: Timestamp) -> Timestamp:
    """``moment`` rounded up to a whole millisecond: a timer fires at its time cut to milliseconds, so
    one set between two would fire before it, be found early and be set again, for ever (frames at
    87 kHz are stamped 11.5 µs apart)."""
    return Timestamp(micros=-(-moment.micros // 1000) * 1000)


def _weigh_state_without_module_scan() -> None:
    """Make the SDK harness's state-cache weighing cost microseconds instead of milliseconds.

    The harness weighs every state value it caches with objsize: on each read
    of a key not yet cached and twice on each commit (clear, then write), so
    three times per key per bundle. objsize starts each weighing by collecting
    the ids of every loaded module's globals, 1-3 ms with Beam, numba and
    pyarrow loaded, whatever the value (apache/beam#28802 tracks the cache's
    cost). An accumulator holds numpy arrays and a header, nothing from a
    module's globals, so skipping that scan changes no weight; for other
    state it can only make a weight larger, never smaller. objsize documents
    ``default_settings`` as the place to change its defaults, and the harness
    uses them.
    """
    objsize.default_settings.exclude_modules_globals = False


def _scan_key(batch: Any) -> tuple[int, Any]:
    return batch.header.scan_number, batch


@runtime_checkable
class PlansItsScans(Protocol):
    """A source that knows the header of the scans it will emit before it runs (a simulator, a file);
    ``planned_scan`` raises OSError or ValueError when it cannot tell (a file it cannot read)."""

    def planned_scan(self) -> FrameHeader: ...


class ScanReduceOperator(Operator):
    """An operator that is a per-scan reduction: a subclass names its :class:`ScanReduceFn` (``Fn``)
    and the label of its stateful step (``step``; keep it stable, a runner identifies the operator's
    state by it), besides what every operator declares (one input port, one output port)."""

    Fn: ClassVar[type[ScanReduceFn]]
    step: ClassVar[str]

    def reduce_fn(self) -> ScanReduceFn:
        """The DoFn of this instance: ``Fn`` with a timeout timer of its own (:func:`_with_own_timer`)."""
        return _with_own_timer(self.Fn, self.label)(self.name, self.params, self.label)

    def check_fits(self, header: FrameHeader) -> None:
        """ScanTooLargeError if this operator would refuse a scan with ``header`` (more than max_state_mb):
        a pipeline whose source plans its scans (:class:`PlansItsScans`) refuses one before making its frames."""
        self.reduce_fn().check_fits(header)

    def build(self, main: pvalue.PCollection) -> Mapping[str, pvalue.PCollection]:
        """Key by scan number, then the stateful ParDo ``step``."""
        ((output, _),) = self.outputs.items()
        ((_, port),) = self.inputs.items()
        results = (
            main
            | "KeyByScan" >> beam.Map(_scan_key).with_output_types(tuple[int, port.type])
            | self.step >> beam.ParDo(self.reduce_fn()).with_outputs(DEAD_LETTER, main=output)
        )
        return {output: results[output], DEAD_LETTER: results[DEAD_LETTER]}


def _with_own_timer(base: type[ScanReduceFn], instance: str) -> type[ScanReduceFn]:
    """``base`` as the DoFn class Beam runs for ``instance``: ``process`` and a timeout timer named for it.

    One timer name for every reduction lost timeouts: Beam's in-process runner (FnApiRunner) buffers
    the timers a fused stage sets by timer name, not by transform (apache/beam#21995), so of two
    reductions in one stage (two com_reduce on one input, or com_reduce and virtual_images on one
    source) only one flushed its incomplete scans. Beam finds state and timers in the parameter
    defaults of a class's methods, so each instance gets a class of its own. The name, from the
    instance's label, stays the same when the job is built again (a restore from a savepoint).
    """
    timer = TimerSpec(f"timeout-{instance}", TimeDomain.WATERMARK)
    state = ScanReduceFn.STATE

    class InstanceFn(base):
        def process(
            self,
            element: tuple[int, Any],
            timestamp: Timestamp = beam.DoFn.TimestampParam,
            state_cell: Any = beam.DoFn.StateParam(state),
            timeout: Any = beam.DoFn.TimerParam(timer),
        ) -> Iterator[Any]:
            return self.add_batch(element, timestamp, state_cell, timeout)

        @on_timer(timer)
        def flush(
            self,
            key: int = beam.DoFn.KeyParam,
            fired_at: Timestamp = beam.DoFn.TimestampParam,
            state_cell: Any = beam.DoFn.StateParam(state),
            timeout: Any = beam.DoFn.TimerParam(timer),
        ) -> Iterator[Any]:
            return self.on_timeout(key, fired_at, state_cell, timeout)

    InstanceFn.__module__ = base.__module__  # its log lines go to the operator's logger
    InstanceFn.__name__ = InstanceFn.__qualname__ = f"{base.__name__}[{instance}]"
    return InstanceFn
