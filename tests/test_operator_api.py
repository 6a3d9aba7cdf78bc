"""The operator API: decorator and class forms, parameters, typed ports, dead letters, metrics."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import apache_beam as beam
import numpy as np
import pytest
from apache_beam import pvalue
from apache_beam.metrics import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from pydantic import Field, ValidationError, model_validator

from beamops import (
    DEAD_LETTER,
    BatchOperator,
    ComMap,
    ComPartial,
    DeadLetter,
    DenseFrameBatch,
    NoParams,
    Operator,
    OperatorDefinitionError,
    OperatorOutputs,
    OperatorParameterError,
    OperatorParams,
    Port,
    PortTypeError,
    SparseFrameBatch,
    decode_batch,
    operator,
    register_port_type,
    runner,
)
from beamops.operator import OperatorMetrics
from beamops.spec import OperatorSpec, ParameterType, stable_operator_id
from beamops.testing import RunResult, ScanSimulation, run_operator
from transforms.com_partial import com_partial
from transforms.com_reduce import com_reduce
from transforms.simulated_scan import simulated_scan

# --- operators under test ----------------------------------------------------


class ThresholdParams(OperatorParams):
    min_events: int = Field(1, ge=0, le=1000, title="Minimum events", description="Keep frames with this many events.")
    mode: Literal["keep", "drop"] = Field("keep", description="drop: emit nothing for a batch that keeps no frame.")
    fail_on_batch: int = Field(-1, description="Raise on the batch whose origin 'batch' is this (dead-letter tests).")


@operator(
    output_name="frames",
    title="Threshold frames",
    input_description="Counted frames",
    output_description="Frames with enough events",
)
def threshold_frames(batch: SparseFrameBatch, params: ThresholdParams) -> SparseFrameBatch | None:
    """Keep the frames of a batch that have at least ``min_events`` events.

    This second paragraph is not part of the spec description.
    """
    if batch.origin and batch.origin.get("batch") == params.fail_on_batch:
        raise RuntimeError(f"refusing batch {params.fail_on_batch} of scan {batch.header.scan_number}")
    keep = [i for i in range(batch.n_frames) if len(batch.frame(i)) >= params.min_events]
    if not keep and params.mode == "drop":
        return None
    return SparseFrameBatch.from_frames(
        batch.header, [batch.frame(i) for i in keep], batch.scan_positions[keep], batch.frame_numbers[keep]
    ).with_origin(batch.origin or {})


@operator
def split_frames(batch: SparseFrameBatch) -> Iterator[SparseFrameBatch]:
    """One single-frame batch per frame."""
    for i in range(batch.n_frames):
        yield SparseFrameBatch.from_frames(
            batch.header, [batch.frame(i)], batch.scan_positions[i : i + 1], batch.frame_numbers[i : i + 1]
        )


@operator
def explode_late(batch: SparseFrameBatch) -> Iterator[SparseFrameBatch]:
    """Yields the batch, then fails."""
    yield batch
    raise RuntimeError("failed after the first item")


@dataclass(frozen=True)
class EventTotals:
    scan_number: int
    frames: int
    events: int


register_port_type(EventTotals, "test_event_totals")


class TotalsParams(OperatorParams):
    min_events: int = Field(0, ge=0, description="Frames with fewer events count as empty.")
    unit: Literal["events", "frames"] = Field("events", description="What the totals count.")


class _TotalsFn(beam.DoFn):
    def __init__(self, min_events: int) -> None:
        self._min_events = min_events

    def process(self, batch: SparseFrameBatch) -> Iterator[Any]:
        lengths = np.diff(batch.offsets)
        yield EventTotals(batch.header.scan_number, batch.n_frames, int(lengths.sum()))
        empty = int((lengths < self._min_events).sum())
        yield pvalue.TaggedOutput("empty", EventTotals(batch.header.scan_number, empty, 0))


class count_events(Operator):  # noqa: N801 - catalog names are lowercase
    name = "count_events"
    title = "Count events"
    description = "Totals per batch, and the number of empty frames per batch."
    Params = TotalsParams
    inputs = {"frames": Port(SparseFrameBatch, "Counted frames")}
    outputs = {
        "totals": Port(EventTotals, "Frames and events per batch", title="Totals"),
        "empty": Port(EventTotals, "Empty frames per batch"),
    }

    def build(self, main: pvalue.PCollection) -> Mapping[str, pvalue.PCollection]:
        results = main | "Count" >> beam.ParDo(_TotalsFn(self.params.min_events)).with_outputs(
            "empty", DEAD_LETTER, main="totals"
        )
        return {"totals": results.totals, "empty": results.empty, DEAD_LETTER: results[DEAD_LETTER]}


class Unregistered:
    """Not a registered port type."""


# --- helpers -----------------------------------------------------------------

SIM = ScanSimulation(
    scan_shape=(4, 4), frame_shape=(64, 64), events_per_frame=20, disc_radius=6, shift_amplitude=2, seed=3
)
BATCH = 5
BATCHES = list(SIM.batches(BATCH))  # 16 frames: 5 + 5 + 5 + 1


def new_pipeline() -> beam.Pipeline:
    return beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"]))


def typed_input(p: beam.Pipeline, label: str, items: list[Any], kind: type) -> pvalue.PCollection:
    return p | label >> beam.Create(items).with_output_types(kind)


def step_metrics(result: RunResult, step_prefix: str) -> dict[str, Any]:
    """beamops metrics of the steps whose name starts with ``step_prefix``, by metric name."""
    found = result.metrics.query(MetricsFilter().with_namespace("beamops"))
    out: dict[str, Any] = {}
    for kind in ("counters", "distributions"):
        for m in found[kind]:
            if m.key.step.startswith(step_prefix):
                assert m.key.metric.namespace == "beamops"
                out[m.key.metric.name] = m.committed
    return out


def same_frames(a: SparseFrameBatch, b: SparseFrameBatch) -> bool:
    return (
        a.header == b.header
        and np.array_equal(a.events, b.events)
        and np.array_equal(a.offsets, b.offsets)
        and np.array_equal(a.scan_positions, b.scan_positions)
        and np.array_equal(a.frame_numbers, b.frame_numbers)
    )


# --- specs of the two forms ----------------------------------------------------


def test_decorator_makes_a_batch_operator_class() -> None:
    assert isinstance(threshold_frames, type)
    assert issubclass(threshold_frames, BatchOperator)
    assert issubclass(threshold_frames, beam.PTransform)
    assert threshold_frames.name == "threshold_frames"
    assert threshold_frames.Params is ThresholdParams
    assert threshold_frames.__module__ == __name__


def test_decorator_spec() -> None:
    spec = threshold_frames.spec()
    assert spec.id == stable_operator_id("threshold_frames")
    assert spec.label == "Threshold frames"
    assert spec.description == "Keep the frames of a batch that have at least ``min_events`` events."
    assert [(p.name, p.type, p.description) for p in spec.inputs or []] == [("in", "sparse_frames", "Counted frames")]
    assert [(p.name, p.type, p.description) for p in spec.outputs or []] == [
        ("frames", "sparse_frames", "Frames with enough events")
    ]
    assert spec.parallel_config is not None and spec.parallel_config.type.value == "embarrassing"
    params = {p.name: p for p in spec.parameters or []}
    assert list(params) == list(ThresholdParams.model_fields)
    assert params["min_events"].type is ParameterType.INT
    assert (params["min_events"].default, params["min_events"].minimum, params["min_events"].maximum) == (1, 0, 1000)
    assert params["min_events"].label == "Minimum events"
    assert params["mode"].type is ParameterType.STR_ENUM
    assert params["mode"].options == ["keep", "drop"]
    assert params["mode"].default == "keep"
    assert params["mode"].description == ThresholdParams.model_fields["mode"].description
    assert OperatorSpec.model_validate_json(spec.to_json()) == spec


def test_decorator_defaults_without_arguments() -> None:
    spec = split_frames.spec()
    assert spec.label == "Split frames"
    assert spec.description == "One single-frame batch per frame."
    assert [(p.name, p.type) for p in spec.inputs or []] == [("in", "sparse_frames")]
    # Iterator[SparseFrameBatch] is a stream of SparseFrameBatch.
    assert [(p.name, p.type) for p in spec.outputs or []] == [("out", "sparse_frames")]
    assert spec.parameters is None
    assert split_frames.Params is NoParams


def test_class_form_spec() -> None:
    spec = count_events.spec()
    assert spec.id == stable_operator_id("count_events")
    assert spec.label == "Count events"
    assert spec.description == count_events.description
    assert [(p.name, p.type) for p in spec.inputs or []] == [("frames", "sparse_frames")]
    assert [(p.name, p.label, p.type) for p in spec.outputs or []] == [
        ("totals", "Totals", "test_event_totals"),
        ("empty", "Empty", "test_event_totals"),
    ]
    params = {p.name: p for p in spec.parameters or []}
    assert params["min_events"].minimum == 0
    assert params["unit"].options == ["events", "frames"]
    assert spec.parallel_config is not None and spec.parallel_config.type.value == "none"
    assert OperatorSpec.model_validate_json(spec.to_json()) == spec


# --- parameters ------------------------------------------------------------------


def test_parameters_are_validated_and_frozen() -> None:
    op = threshold_frames(min_events="7", mode="drop")
    assert op.params == ThresholdParams(min_events=7, mode="drop")
    assert threshold_frames({"min_events": 3}, min_events=4).params.min_events == 4
    assert threshold_frames(ThresholdParams(min_events=5)).params.min_events == 5
    assert threshold_frames().params == ThresholdParams()
    with pytest.raises(ValidationError):
        op.params.min_events = 9  # type: ignore[misc]


@pytest.mark.parametrize(
    ("make", "op_name", "param", "reason"),
    [
        (lambda: threshold_frames(min_evnts=3), "threshold_frames", "min_evnts", "unknown parameter"),
        (lambda: threshold_frames(min_events=-1), "threshold_frames", "min_events", "greater than or equal to 0"),
        (lambda: threshold_frames(min_events=1001), "threshold_frames", "min_events", "less than or equal to 1000"),
        (lambda: threshold_frames(min_events="many"), "threshold_frames", "min_events", "valid integer"),
        (lambda: threshold_frames(min_events=2.5), "threshold_frames", "min_events", "valid integer"),
        (lambda: threshold_frames(mode="sometimes"), "threshold_frames", "mode", "'keep' or 'drop'"),
        (lambda: threshold_frames({"mode": "sometimes"}), "threshold_frames", "mode", "'keep' or 'drop'"),
        (lambda: count_events(unit="bytes"), "count_events", "unit", "'events' or 'frames'"),
        (lambda: count_events(min_events=-5), "count_events", "min_events", "greater than or equal to 0"),
        (lambda: count_events(colour="red"), "count_events", "colour", "unknown parameter"),
        (lambda: split_frames(anything=1), "split_frames", "anything", "unknown parameter"),
        (lambda: com_partial(crop_radius=-1), "com_partial", "crop_radius", "greater than or equal to 0"),
        (lambda: com_partial(init_centre_x=3), "com_partial", "init_centre_x", "unknown parameter"),
        (lambda: com_reduce(emit_every="often"), "com_reduce", "emit_every", "valid integer"),
        (lambda: com_reduce(timeout_s=0), "com_reduce", "timeout_s", "greater than 0"),
        # A duration that would overflow Beam's event time fails here, not while the job runs.
        (lambda: com_reduce(timeout_s=float("inf")), "com_reduce", "timeout_s", "finite number"),
        (lambda: com_reduce(timeout_s=1e300), "com_reduce", "timeout_s", "less than or equal to"),
        (lambda: com_reduce(finished_retention_s=1e13), "com_reduce", "finished_retention_s", "less than or equal"),
        # Every float parameter of every operator is finite, without each field saying so.
        (lambda: com_reduce(timeout_s=float("nan")), "com_reduce", "timeout_s", "finite number"),
        (lambda: com_partial(crop_radius=float("inf")), "com_partial", "crop_radius", "finite number"),
        # pydantic alone reads True as 1
        (lambda: com_reduce(emit_every=True), "com_reduce", "emit_every", "True is a bool, not a number"),
        (lambda: com_partial(crop_radius=False), "com_partial", "crop_radius", "False is a bool, not a number"),
        (lambda: com_reduce(replace_nans="perhaps"), "com_reduce", "replace_nans", "valid boolean"),
    ],
)
def test_invalid_parameter_is_an_error_at_construction(make: Any, op_name: str, param: str, reason: str) -> None:
    with pytest.raises(OperatorParameterError) as info:
        make()
    message = str(info.value)
    assert f"'{op_name}'" in message
    assert f"'{param}'" in message
    assert reason in message


def test_unknown_parameter_lists_the_known_ones() -> None:
    with pytest.raises(OperatorParameterError, match=r"known parameters: \['fail_on_batch', 'min_events', 'mode'\]"):
        threshold_frames(bogus=1)
    with pytest.raises(OperatorParameterError, match="known parameters: none"):
        split_frames(bogus=1)


def test_cross_field_parameter_error_names_the_operator_and_the_fields() -> None:
    with pytest.raises(OperatorParameterError, match=r"operator 'com_partial'.*init_center_y"):
        com_partial(init_center_x=10.0)


def test_parameters_of_the_wrong_kind() -> None:
    with pytest.raises(OperatorParameterError, match=r"operator 'threshold_frames'.*ThresholdParams or a mapping"):
        threshold_frames(5)  # type: ignore[arg-type]
    with pytest.raises(OperatorParameterError, match=r"operator 'threshold_frames'.*must be a ThresholdParams"):
        threshold_frames(TotalsParams())  # another operator's parameter model


# --- typed ports ---------------------------------------------------------------


def test_sparse_frames_into_com_reduce_is_a_port_type_error() -> None:
    p = new_pipeline()
    frames = typed_input(p, "Frames", BATCHES, SparseFrameBatch)
    with pytest.raises(PortTypeError) as info:
        frames | "Reduce" >> com_reduce()
    message = str(info.value)
    assert "Frames" in message and "SparseFrameBatch" in message and "sparse_frames" in message
    assert "Reduce.in" in message and "ComPartial" in message


def test_com_map_into_com_partial_is_a_port_type_error() -> None:
    p = new_pipeline()
    maps = typed_input(p, "Maps", [], ComMap)
    with pytest.raises(PortTypeError, match=r"cannot connect Maps.*ComMap.*com_map.*Partial\.in.*SparseFrameBatch"):
        maps | "Partial" >> com_partial()


def test_operator_output_into_an_incompatible_operator_names_both_operators() -> None:
    p = new_pipeline()
    frames = typed_input(p, "Frames", BATCHES, SparseFrameBatch)
    maps = frames | "Partial" >> com_partial() | "Reduce" >> com_reduce()
    with pytest.raises(PortTypeError, match=r"cannot connect Reduce\b.*ComMap.*to PartialAgain\.in"):
        maps | "PartialAgain" >> com_partial()
    totals = frames | "Count" >> count_events()
    with pytest.raises(PortTypeError, match=r"Count\b.*EventTotals \[test_event_totals\].*ReduceTotals\.in"):
        totals.totals | "ReduceTotals" >> com_reduce()


def test_dense_frames_into_com_partial_is_a_port_type_error() -> None:
    p = new_pipeline()
    dense = typed_input(p, "Dense", [], DenseFrameBatch)
    with pytest.raises(PortTypeError, match=r"DenseFrameBatch.*dense_frames.*SparseFrameBatch"):
        dense | com_partial()


def test_compatible_chain_builds_and_types_its_outputs() -> None:
    p = new_pipeline()
    frames = typed_input(p, "Frames", BATCHES, SparseFrameBatch)
    partial = frames | com_partial()
    reduced = partial | com_reduce()
    assert partial.main.element_type is ComPartial
    assert reduced.main.element_type is ComMap
    assert reduced.dead_letter.element_type is DeadLetter


# --- running: dead letters, metrics, outputs ------------------------------------------


@pytest.fixture(scope="module")
def chain_with_a_bad_batch() -> RunResult:
    return run_operator(
        lambda frames: frames | threshold_frames(min_events=0, fail_on_batch=1) | com_partial() | com_reduce(),
        BATCHES,
    )


def test_upstream_dead_letters_are_carried_through_the_chain(chain_with_a_bad_batch: RunResult) -> None:
    result = chain_with_a_bad_batch
    (dead,) = result.dead_letters
    bad = BATCHES[1]
    assert isinstance(dead, DeadLetter)
    assert dead.operator == "threshold_frames"
    assert dead.error_type == "RuntimeError"
    assert "refusing batch 1 of scan 1" in dead.error
    assert "RuntimeError" in dead.traceback
    assert dead.origin == bad.origin == {"source": "simulator", "scan": SIM.scan_number, "batch": 1}
    assert dead.payload_format == "arrow-ipc"
    assert same_frames(decode_batch(dead.payload), bad)


def test_run_operator_reports_the_dead_letters_of_an_operator_left_by_a_named_port() -> None:
    # A named port does not carry its operator's dead letters on; before, the result said "none".
    result = run_operator(
        lambda frames: (frames | threshold_frames(min_events=0, fail_on_batch=1)).frames | com_partial() | com_reduce(),
        BATCHES,
    )
    assert [(d.operator, d.origin["batch"]) for d in result.dead_letters] == [("threshold_frames", 1)]


def test_two_branches_of_one_operator_carry_its_dead_letters_on_once() -> None:
    """Each upstream letter once in the branches' ends flattened (before: once per branch)."""

    def branches(frames: beam.PCollection) -> OperatorOutputs:
        kept = frames | threshold_frames(min_events=0, fail_on_batch=1)
        ends = [kept | "one" >> com_partial(), kept | "two" >> split_frames()]
        return OperatorOutputs({"out": ends[1].main, DEAD_LETTER: [e.dead_letter for e in ends] | beam.Flatten()})

    result = run_operator(branches, BATCHES)
    assert [(d.operator, d.origin["batch"]) for d in result.dead_letters] == [("threshold_frames", 1)]


def test_a_job_whose_dead_letters_go_nowhere_is_refused_before_it_runs(capsys: pytest.CaptureFixture[str]) -> None:
    def build(pipeline: beam.Pipeline, _values: dict[str, Any]) -> None:
        frames = pipeline | beam.Create(BATCHES)
        kept = (frames | "keep" >> threshold_frames()).frames | com_partial()
        kept.dead_letter | "Drop" >> beam.Map(lambda _: None)

    assert runner.run({}, [], build, prog="test") == 2
    assert capsys.readouterr().err == (
        "test: error: the dead letters of keep go nowhere: flatten them into the dead-letter sink\n"
    )


def test_other_batches_still_produce_output(chain_with_a_bad_batch: RunResult) -> None:
    result = chain_with_a_bad_batch
    (final,) = result.final_maps().values()
    assert final.scan_number == SIM.scan_number
    assert final.frames_seen == SIM.n_frames - BATCHES[1].n_frames
    assert not final.complete  # one batch is missing: flushed at the end of input
    missing = np.zeros(SIM.n_positions, bool)
    missing[BATCHES[1].scan_positions] = True
    x, y = final.x.reshape(-1), final.y.reshape(-1)
    assert np.isnan(x[missing]).all() and np.isnan(y[missing]).all()
    assert np.isfinite(x[~missing]).all() and np.isfinite(y[~missing]).all()
    ex, ey = SIM.expected_com()
    tolerance = 8 * SIM.com_standard_error()
    assert np.abs(x[~missing] - ex.reshape(-1)[~missing]).max() < tolerance
    assert np.abs(y[~missing] - ey.reshape(-1)[~missing]).max() < tolerance


def test_metrics_are_reported_in_the_beamops_namespace(chain_with_a_bad_batch: RunResult) -> None:
    result = chain_with_a_bad_batch
    first = step_metrics(result, "threshold_frames/")
    assert first["batches"] == len(BATCHES)
    assert first["frames_in"] == SIM.n_frames
    assert first["errors"] == 1
    assert first["frames_out"] == SIM.n_frames - BATCHES[1].n_frames
    latency = first["batch_latency_us"]
    assert latency.count == len(BATCHES)
    assert 0 <= latency.min <= latency.max

    partial = step_metrics(result, "com_partial/")
    assert partial["batches"] == len(BATCHES) - 1
    assert partial["frames_in"] == SIM.n_frames - BATCHES[1].n_frames
    assert partial["errors"] == 0  # there at 0 before any error, so an alert on it can be set up
    assert partial["batch_latency_us"].count == len(BATCHES) - 1

    reduce = step_metrics(result, "com_reduce/")
    assert reduce["frames_in"] == SIM.n_frames - BATCHES[1].n_frames
    assert reduce["errors"] == 0
    assert result.counter("errors") == 1


def test_iterator_result_emits_each_item() -> None:
    result = run_operator(split_frames(), BATCHES)
    assert len(result.outputs) == SIM.n_frames
    assert all(isinstance(b, SparseFrameBatch) and b.n_frames == 1 for b in result.outputs)
    got = sorted((int(b.frame_numbers[0]), b.frame(0).tolist()) for b in result.outputs)
    want = sorted((int(n), batch.frame(i).tolist()) for batch in BATCHES for i, n in enumerate(batch.frame_numbers))
    assert got == want
    assert result.dead_letters == []
    metrics = step_metrics(result, "split_frames/")
    assert metrics["batches"] == len(BATCHES)
    assert metrics["frames_out"] == SIM.n_frames


def test_none_result_emits_nothing() -> None:
    result = run_operator(threshold_frames(min_events=1000, mode="drop"), BATCHES)
    assert result.outputs == []
    assert result.dead_letters == []
    assert step_metrics(result, "threshold_frames/")["batches"] == len(BATCHES)
    # The same operator in "keep" mode emits one (empty) batch per input batch.
    kept = run_operator(threshold_frames(min_events=1000, mode="keep"), BATCHES)
    assert sorted(b.n_frames for b in kept.outputs) == [0] * len(BATCHES)


def test_exception_inside_an_iterator_result_goes_to_dead_letters() -> None:
    result = run_operator(explode_late(), BATCHES[:1])
    assert [d.operator for d in result.dead_letters] == ["explode_late"]


def test_dead_letters_are_logged_at_once_then_once_per_interval_with_a_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    caplog.set_level(logging.WARNING, logger="beamops.deadletter")
    metrics = OperatorMetrics("threshold_frames", clock=lambda: now[0])
    letters = [DeadLetter("op", "ValueError", f"bad {i}", b"", "none", origin={"batch": i}) for i in range(5)]
    for letter in letters[:3]:
        assert metrics.dead_letter(letter) is letter
        now[0] += 1.0
    now[0] += OperatorMetrics.LOG_EVERY_S
    metrics.dead_letter(letters[3])
    metrics.dead_letter(letters[4])
    assert [r.getMessage() for r in caplog.records] == [
        "threshold_frames: an element (batch=0) went to dead letters: bad 0",
        "threshold_frames: 3 more elements went to dead letters, the latest (batch=3): bad 3",
    ]


def test_a_job_that_dead_letters_logs_it_while_running_and_sums_it_up_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def build(pipeline: beam.Pipeline, _values: dict[str, Any]) -> None:
        batches = pipeline | beam.Create(BATCHES)
        letters = [
            (batches | f"fail_{failing}" >> threshold_frames(fail_on_batch=failing)).dead_letter for failing in (0, 2)
        ]
        letters | beam.Flatten() | "Drop" >> beam.Map(lambda _: None)  # a job must read them (runner.run checks)

    caplog.set_level(logging.INFO)
    assert runner.run({}, [], build, prog="test") == 0
    logged = [r.getMessage() for r in caplog.records if r.name == "beamops.deadletter"]
    assert sorted(logged) == [
        f"threshold_frames: an element (source=simulator scan=1 batch={b}) went to dead letters: "
        f"refusing batch {b} of scan 1"
        for b in (0, 2)
    ]
    (summary,) = [r for r in caplog.records if r.name == "beamops.runner" and "dead letters" in r.getMessage()]
    assert summary.levelno == logging.WARNING
    assert summary.getMessage() == "2 elements went to dead letters (fail_0 1, fail_2 1)"


def test_process_runs_the_kernel_outside_beam() -> None:
    batch = BATCHES[0]
    kept = threshold_frames(min_events=20).process(batch)
    lengths = np.diff(batch.offsets)
    assert isinstance(kept, SparseFrameBatch)
    assert kept.n_frames == int((lengths >= 20).sum())
    assert kept.frame_numbers.tolist() == batch.frame_numbers[lengths >= 20].tolist()
    assert threshold_frames(min_events=1000, mode="drop").process(batch) is None
    with pytest.raises(RuntimeError, match="refusing batch 0"):
        threshold_frames(fail_on_batch=0).process(batch)
    assert [b.n_frames for b in split_frames().process(batch)] == [1] * batch.n_frames

    partial = com_partial().process(batch)
    assert isinstance(partial, ComPartial)
    cols = SIM.frame_shape[1]
    for i in range(batch.n_frames):
        events = batch.frame(i).astype(np.int64)
        assert partial.sum_x[i] == (events % cols).sum()  # x = column
        assert partial.sum_y[i] == (events // cols).sum()  # y = row
        assert partial.counts[i] == len(events)


# --- OperatorOutputs ------------------------------------------------------------------


def test_operator_outputs_main_and_attributes() -> None:
    p = new_pipeline()
    frames = typed_input(p, "Frames", BATCHES, SparseFrameBatch)
    out = frames | "Threshold" >> threshold_frames()
    assert isinstance(out, OperatorOutputs)
    assert sorted(out) == ["dead_letter", "frames"]
    assert out.main is out["frames"] is out.frames
    assert out.dead_letter is out[DEAD_LETTER]
    assert out.frames.element_type is SparseFrameBatch
    with pytest.raises(AttributeError, match=r"no output named 'framez'.*\['dead_letter', 'frames'\]"):
        _ = out.framez


def test_operator_outputs_main_is_ambiguous_with_two_outputs() -> None:
    p = new_pipeline()
    frames = typed_input(p, "Frames", BATCHES, SparseFrameBatch)
    out = frames | "Count" >> count_events()
    assert sorted(out) == ["dead_letter", "empty", "totals"]
    assert out.totals.element_type is EventTotals
    assert out.empty is out["empty"]
    with pytest.raises(AttributeError, match="main"):
        _ = out.main
    with pytest.raises(TypeError, match=r"apply it to one of them by name"):
        out | "Reduce" >> com_reduce()


def test_operator_outputs_as_a_plain_mapping() -> None:
    outputs = OperatorOutputs({"only": "a", DEAD_LETTER: "b"})
    assert outputs.main == "a" and outputs.only == "a" and outputs.dead_letter == "b"
    with pytest.raises(AttributeError, match=r"no output named 'other'; outputs are \['dead_letter', 'only'\]"):
        _ = outputs.other
    with pytest.raises(AttributeError, match="main"):
        _ = OperatorOutputs({DEAD_LETTER: "b"}).main
    with pytest.raises(AttributeError, match="main"):
        _ = OperatorOutputs({"a": 1, "b": 2, DEAD_LETTER: "c"}).main


def test_ambiguous_main_says_so() -> None:
    with pytest.raises(AttributeError, match=r"ambiguous.*\['a', 'b'\].*pick one by name"):
        _ = OperatorOutputs({"a": 1, "b": 2, DEAD_LETTER: "c"}).main


def test_class_form_runs() -> None:
    result = run_operator(lambda frames: (frames | count_events(min_events=15)).totals, BATCHES)
    assert sorted(t.frames for t in result.outputs) == sorted(b.n_frames for b in BATCHES)
    assert sum(t.events for t in result.outputs) == sum(len(b.events) for b in BATCHES)


# --- sources ------------------------------------------------------------------------------


def test_source_applied_to_a_pcollection_is_an_error() -> None:
    p = new_pipeline()
    frames = typed_input(p, "Frames", BATCHES, SparseFrameBatch)
    with pytest.raises(TypeError, match=r"'simulated_scan' is a source.*apply it to the pipeline"):
        frames | simulated_scan()


def test_source_applied_to_the_pipeline_builds() -> None:
    p = new_pipeline()
    out = p | simulated_scan(scan_rows=2, scan_cols=2, frame_rows=64, frame_cols=64, disc_radius=5)
    assert sorted(out) == ["dead_letter", "frames"]
    assert out.main.element_type is SparseFrameBatch


def test_transform_applied_to_the_pipeline_root_is_an_error() -> None:
    with pytest.raises(TypeError, match=r"operator 'threshold_frames'.*expected a PCollection"):
        new_pipeline() | threshold_frames()


# --- definition errors (at class-definition time) -----------------------------------------


@pytest.mark.parametrize("bad_name", ["BadName", "1st", "with-dash", "", "_private", "spaced name"])
def test_bad_operator_name_is_a_definition_error(bad_name: str) -> None:
    with pytest.raises(OperatorDefinitionError, match=r"operator class .*Bad.*name"):

        class Bad(Operator):
            name = bad_name
            title = "Bad"
            description = "A badly named operator."
            inputs = {"in": Port(SparseFrameBatch)}
            outputs = {"out": Port(SparseFrameBatch)}


def test_unregistered_port_type_is_a_definition_error() -> None:
    with pytest.raises(OperatorDefinitionError, match=r"unregistered_port.*not a registered port type"):

        class unregistered_port(Operator):  # noqa: N801
            name = "unregistered_port"
            title = "Unregistered"
            description = "Produces a type nobody registered."
            inputs = {"in": Port(SparseFrameBatch)}
            outputs = {"out": Port(Unregistered)}


def test_decorated_function_with_unregistered_type_is_a_definition_error() -> None:
    with pytest.raises(OperatorDefinitionError, match="not a registered port type"):

        @operator
        def to_unregistered(batch: SparseFrameBatch) -> Unregistered:
            """Nope."""
            return Unregistered()


def test_decorated_function_without_annotations_is_a_definition_error() -> None:
    with pytest.raises(OperatorDefinitionError, match=r"annotate.*return"):

        @operator
        def unannotated(batch: SparseFrameBatch):  # type: ignore[no-untyped-def]
            return batch


def test_decorated_function_with_too_many_arguments_is_a_definition_error() -> None:
    with pytest.raises(OperatorDefinitionError, match=r"fn\(batch, params\)"):

        @operator
        def three(batch: SparseFrameBatch, params: NoParams, extra: int) -> SparseFrameBatch:
            return batch


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"Params": dict}, "Params must subclass beamops.OperatorParams"),
        ({"inputs": {"a": Port(SparseFrameBatch), "b": Port(SparseFrameBatch)}}, "at most one input port"),
        ({"outputs": {DEAD_LETTER: Port(SparseFrameBatch)}}, "bad port name 'dead_letter'"),
        ({"outputs": {"Out": Port(SparseFrameBatch)}}, "bad port name 'Out'"),
    ],
)
def test_other_definition_errors(attrs: dict[str, Any], message: str) -> None:
    base = {
        "name": "misdeclared",
        "title": "Misdeclared",
        "description": "An operator declared wrongly.",
        "inputs": {"in": Port(SparseFrameBatch)},
        "outputs": {"out": Port(SparseFrameBatch)},
    }
    with pytest.raises(OperatorDefinitionError, match=message):
        type("misdeclared", (Operator,), {**base, **attrs})


def test_intermediate_base_class_without_a_name_is_allowed() -> None:
    class SharedBase(Operator):
        title = "Shared"

    assert "name" not in SharedBase.__dict__


def test_build_returning_undeclared_outputs_is_an_error() -> None:
    class forgetful(Operator):  # noqa: N801
        name = "forgetful"
        title = "Forgetful"
        description = "Forgets its dead-letter output."
        inputs = {"in": Port(SparseFrameBatch)}
        outputs = {"out": Port(SparseFrameBatch)}

        def build(self, main: pvalue.PCollection) -> Mapping[str, pvalue.PCollection]:
            return {"out": main | beam.Map(lambda b: b)}

    p = new_pipeline()
    frames = typed_input(p, "Frames", BATCHES, SparseFrameBatch)
    with pytest.raises(OperatorDefinitionError, match=r"'forgetful'.*build\(\) returned outputs \['out'\]"):
        frames | forgetful()


def test_the_log_lines_of_a_per_scan_reduction_name_its_instance(caplog: pytest.LogCaptureFixture) -> None:
    """Two com_reduce in one pipeline log to one logger, their module's: only the label tells their lines apart."""
    sims = [ScanSimulation(scan_shape=(4, 4), frame_shape=(64, 64), scan_number=n) for n in (5, 6)]
    complete, cut = list(sims[0].batches(4)), list(sims[1].batches(4))[:-1]  # scan 6 is flushed incomplete
    frames = [*complete[:2], complete[0], *complete[2:], *cut]  # a redelivered batch among scan 5's

    def two_instances(source: beam.PCollection) -> Any:
        partials = source | com_partial()
        return [partials | label >> com_reduce(emit_every=8) for label in ("com_a", "com_b")][-1]

    caplog.set_level(logging.INFO, logger="transforms.com_reduce")
    run_operator(two_instances, frames)
    records = [r for r in caplog.records if r.name == "transforms.com_reduce"]
    for label in ("com_a", "com_b"):
        mine = [r for r in records if r.instance == label]
        assert sorted(r.getMessage() for r in mine) == [
            f"{label}: scan 5 complete: 16 frames",
            f"{label}: scan 5: 8 frames, 8 positions so far",
            f"{label}: scan 5: skipped 4 frames already reduced (delivered again, or another run published under "
            "the same scan number)",
            f"{label}: scan 6 flushed incomplete (no frames for 300 s of event time, or the input ended): "
            "12 frames, 12 of 16 positions",
            f"{label}: scan 6: 8 frames, 8 positions so far",
        ]
        assert {r.funcName for r in mine} == {"add_batch", "on_timeout"}  # the operator's lines, not the logger's
    assert len(records) == 10


# --- what a kernel returns, checked against its annotation ---------------------------------------------------


class ReturnParams(OperatorParams):
    result: Literal["nothing", "one", "list", "dict", "generator"] = Field(
        "one", description="What the kernel returns."
    )


def _returned(batch: SparseFrameBatch, params: ReturnParams) -> Any:
    return {
        "nothing": None,
        "one": batch,
        "list": [batch, batch],
        "dict": {"frames": batch},
        "generator": (b for b in (batch, batch)),
    }[params.result]


@operator
def returns_one(batch: SparseFrameBatch, params: ReturnParams) -> SparseFrameBatch:
    """-> X: one result per batch."""
    return _returned(batch, params)


@operator
def returns_one_or_none(batch: SparseFrameBatch, params: ReturnParams) -> SparseFrameBatch | None:
    """-> X | None: None emits nothing."""
    return _returned(batch, params)


@operator
def returns_a_list(batch: SparseFrameBatch, params: ReturnParams) -> list[SparseFrameBatch]:
    """-> list[X]: each item goes out."""
    return _returned(batch, params)


@pytest.mark.parametrize(
    ("op", "result", "emitted", "error"),
    [
        (returns_one, "one", 1, None),
        (returns_one, "nothing", 0, "returned None, but its annotation is -> SparseFrameBatch: return a result, or "
         "annotate -> SparseFrameBatch | None to emit nothing for some batches"),
        (returns_one, "list", 0, "returned a list for port 'out', which carries SparseFrameBatch "
         "(-> SparseFrameBatch); annotate -> Iterator[...] to emit several"),
        (returns_one, "dict", 0, "returned a dict for port 'out', which carries SparseFrameBatch"),
        (returns_one_or_none, "nothing", 0, None),
        (returns_a_list, "list", 2, None),
        (returns_a_list, "generator", 2, None),
        (returns_a_list, "one", 1, None),  # one result where several may go: emitted, not refused
        (returns_a_list, "nothing", 0, "returned None, but its annotation is -> list[SparseFrameBatch]"),
    ],
)  # fmt: skip
def test_what_a_kernel_returns_is_checked_against_its_annotation(
    op: type[BatchOperator], result: str, emitted: int, error: str | None
) -> None:
    # Before, None from a kernel annotated -> X dropped every batch unseen (exit 0, no output), and a
    # list or a dict failed the job in the coder ("'list' object has no attribute 'header'").
    out = run_operator(op(result=result), BATCHES)
    batches = BATCHES
    assert len(out.outputs) == emitted * len(batches)
    assert all(isinstance(b, SparseFrameBatch) for b in out.outputs)
    if error is None:
        assert out.dead_letters == []
    else:
        assert [d.error_type for d in out.dead_letters] == ["TypeError"] * len(batches)
        assert all(error in d.error for d in out.dead_letters), out.dead_letters[0].error


def test_the_coder_of_a_batch_type_names_what_it_got_instead() -> None:
    from beamops.coders import ArrayRecordCoder

    coder = ArrayRecordCoder(SparseFrameBatch)
    for call in (coder.encode, coder.estimate_size):
        with pytest.raises(TypeError, match=r"got a list: a step emitted a type its output port does not declare"):
            call([1, 2])


def test_outputs_applied_to_a_plain_beam_transform_say_to_pick_one() -> None:
    p = new_pipeline()
    outputs = typed_input(p, "Frames", BATCHES, SparseFrameBatch) | threshold_frames()
    with pytest.raises(AttributeError, match=r"apply Beam transforms to one output \(outputs\['frames'\]\)"):
        outputs | beam.Map(print)


class _Range(OperatorParams):
    low: int = 10
    high: int = 5

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if self.low >= self.high:
            raise ValueError("low must be below high")
        return self


def test_parameter_defaults_that_the_model_rejects_fail_when_the_operator_is_defined() -> None:
    # Before, only building the operator failed ("parameter '(all)': low must be below high").
    with pytest.raises(OperatorDefinitionError, match=r"its parameters' defaults are invalid.*low must be below high"):

        @operator
        def ranged(batch: SparseFrameBatch, params: _Range) -> SparseFrameBatch:
            return batch
