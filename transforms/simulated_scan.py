"""simulated_scan: a simulated 4D-STEM detector, as a source of sparse batches.

Emits the scans of :class:`beamops.simulate.ScanSimulation` (a bright-field
disc whose centre follows a known shift field) in batches of ``batch_size``
frames. Each batch is stamped with the event time of its first frame at
``frame_rate_hz``, and scans follow each other in time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.transforms.window import TimestampedValue
from pydantic import Field

from beamops import DEAD_LETTER, FrameHeader, Operator, OperatorParams, Port, SparseFrameBatch
from beamops.operator import OperatorMetrics
from beamops.simulate import ScanSimulation


class SimulatedScanParams(OperatorParams):
    scan_rows: int = Field(128, ge=1, description="Scan positions along y (rows).")
    scan_cols: int = Field(128, ge=1, description="Scan positions along x (columns).")
    frame_rows: int = Field(576, ge=8, description="Detector rows (px).")
    frame_cols: int = Field(576, ge=8, description="Detector columns (px).")
    events_per_frame: float = Field(100.0, ge=0, description="Mean electrons per frame (Poisson).")
    frames_per_position: int = Field(1, ge=1, description="Frames recorded at each scan position.")
    disc_radius: float = Field(20.0, gt=0, description="Radius of the bright-field disc (px).")
    shift_amplitude: float = Field(8.0, ge=0, description="Amplitude of the known COM shift field (px).")
    batch_size: int = Field(1000, ge=1, description="Frames per emitted batch.")
    n_scans: int = Field(1, ge=1, description="Number of scans, numbered from first_scan_number.")
    first_scan_number: int = Field(1, ge=0, description="Scan number of the first scan.")
    seed: int = Field(
        0, ge=0, description="Random seed; the same seed and batch_size give the same events (each batch has its own)."
    )
    frame_rate_hz: float = Field(87_000.0, gt=0, description="Frame rate used for event timestamps (frames/s).")

    def simulation(self, scan_number: int) -> ScanSimulation:
        return ScanSimulation(
            scan_shape=(self.scan_rows, self.scan_cols),
            frame_shape=(self.frame_rows, self.frame_cols),
            events_per_frame=self.events_per_frame,
            frames_per_position=self.frames_per_position,
            disc_radius=self.disc_radius,
            shift_amplitude=self.shift_amplitude,
            seed=self.seed,
            scan_number=scan_number,
        )


class _SimulateBatchFn(beam.DoFn):
    def __init__(self, params: SimulatedScanParams) -> None:
        self._params = params

    def setup(self) -> None:
        self._metrics = OperatorMetrics("simulated_scan")
        self._scans: dict[int, ScanSimulation] = {}

    def process(self, element: tuple[int, int]) -> Iterator[object]:
        scan_index, batch_index = element
        p = self._params
        number = p.first_scan_number + scan_index
        sim = self._scans.get(number) or self._scans.setdefault(number, p.simulation(number))
        try:
            batch = sim.batch(batch_index, p.batch_size)
        except Exception as exc:
            yield self._metrics.to_dead_letters(element, exc)
            return
        self._metrics.frames_out.inc(batch.n_frames)
        first_frame = scan_index * sim.n_frames + batch_index * p.batch_size
        yield TimestampedValue(batch, first_frame / p.frame_rate_hz)


class simulated_scan(Operator):  # noqa: N801 - catalog names are lowercase like the decorated operators
    """A simulated counted-electron detector with a known center-of-mass shift field."""

    name = "simulated_scan"
    title = "Simulated 4D-STEM scan"
    description = (
        "Counted frames of a bright-field disc whose centre follows a known shift field "
        "(Poisson events per frame), in batches; for tests, demos and benchmarks."
    )
    Params = SimulatedScanParams
    outputs = {"frames": Port(SparseFrameBatch, "Simulated counted frames")}

    def planned_scan(self) -> FrameHeader:
        """The header of the scans it emits, known before it runs (they differ only in scan number):
        a per-scan reduction downstream refuses a scan too large for it before any frame is made."""
        return self.params.simulation(self.params.first_scan_number).header

    def build(self, root: pvalue.PBegin) -> Mapping[str, pvalue.PCollection]:
        p = self.params
        n_batches = p.simulation(p.first_scan_number).n_batches(p.batch_size)
        work = [(s, b) for s in range(p.n_scans) for b in range(n_batches)]
        results = (
            root
            | "BatchIndices" >> beam.Create(work)
            | "Simulate" >> beam.ParDo(_SimulateBatchFn(p)).with_outputs(DEAD_LETTER, main="frames")
        )
        return {"frames": results.frames, DEAD_LETTER: results[DEAD_LETTER]}
