"""beamops.harness: bundles end without waiting up to 200 ms for Beam's state-sampler thread, and Beam
inspects each DoFn's state and timer parameters once."""

from __future__ import annotations

import gc
import subprocess
import sys
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.worker import statesampler
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import userstate

from beamops.harness import STATE_SAMPLING_PERIOD_MS, _inspected_once
from beamops.runner import HARNESS_PLUGIN, flink_defaults
from beamops.scan_reduce import ScanReduceFn
from transforms.com_reduce import ComReduceParams, _ComReduceFn

FLINK = ["--runner=FlinkRunner", "--flink_job_server_jar=/not/needed.jar"]  # no jar lookup


def _sampling_period_ms(_: Any) -> int:
    return statesampler.get_current_tracker().sampling_period_ms


def test_a_bundle_samples_its_state_every_10_ms_so_it_ends_at_most_that_late() -> None:
    # The sampler of the bundle running this very DoFn, as Beam's BundleProcessor builds it.
    with BeamTestPipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        periods = p | beam.Create([0, 1]) | beam.Map(_sampling_period_ms)
        assert_that(periods, equal_to([STATE_SAMPLING_PERIOD_MS] * 2))
    assert STATE_SAMPLING_PERIOD_MS < statesampler.DEFAULT_SAMPLING_PERIOD_MS


def test_an_sdk_worker_process_applies_it_at_start_from_its_beam_plugins() -> None:
    # What Beam's sdk_worker_main does with --beam_plugins before it takes its first bundle.
    assert f"--beam_plugins={HARNESS_PLUGIN}" in flink_defaults(FLINK)
    code = (
        "from apache_beam.runners.worker import sdk_worker_main, statesampler\n"
        f"sdk_worker_main._import_beam_plugins([{HARNESS_PLUGIN!r}])\n"
        "print(statesampler.StateSampler('stage', None).sampling_period_ms)\n"
        "from apache_beam.transforms import userstate\n"
        "print(hasattr(userstate.get_dofn_specs, '__wrapped__'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == [str(STATE_SAMPLING_PERIOD_MS), "True"]


def test_the_users_own_beam_plugins_are_kept_and_ours_is_added_once() -> None:
    given = [*FLINK, "--beam_plugins=their.plugin"]
    args = flink_defaults(given)
    plugins = [a for a in args if a.startswith("--beam_plugins")]
    assert plugins == ["--beam_plugins=their.plugin", f"--beam_plugins={HARNESS_PLUGIN}"]
    assert flink_defaults(args).count(f"--beam_plugins={HARNESS_PLUGIN}") == 1


class _Plain(beam.DoFn):
    def process(self, element: int) -> Any:
        yield element


class _NoWeakReferences:
    __slots__ = ()  # a DoFn always has __weakref__; an object passed in its place may not


def test_beam_gets_the_same_state_and_timer_specs_it_would_inspect_itself() -> None:
    beams_own = userstate.get_dofn_specs.__wrapped__
    stateful, plain = _ComReduceFn("com_reduce", ComReduceParams()), _Plain()
    for fn in (stateful, plain, stateful, plain):
        assert userstate.get_dofn_specs(fn) == beams_own(fn)
    states, timers = userstate.get_dofn_specs(stateful)
    assert {s.name for s in states} == {ScanReduceFn.STATE.name}
    assert {t.name for t in timers} == {ScanReduceFn.TIMEOUT.name}
    assert userstate.is_stateful_dofn(stateful) and not userstate.is_stateful_dofn(plain)


def test_each_dofn_object_is_inspected_once_while_it_lives() -> None:
    calls: list[Any] = []

    def inspect_specs(dofn: Any) -> tuple[set[Any], set[Any]]:
        calls.append(dofn)
        return {"state"}, {"timer"}

    specs = _inspected_once(inspect_specs)
    first, second = _Plain(), _Plain()
    for _ in range(3):
        assert specs(first) == ({"state"}, {"timer"})
        assert specs(second) == ({"state"}, {"timer"})
    assert calls == [first, second]
    states, _ = specs(first)
    states.add("changed by a caller")  # every caller gets sets of its own
    assert specs(first) == ({"state"}, {"timer"})
    calls.clear()
    del first
    gc.collect()
    specs(_Plain())  # a new object, even at the old one's address, is inspected anew
    assert len(calls) == 1


def test_an_object_without_weak_references_is_inspected_every_time() -> None:
    calls: list[Any] = []

    def inspect_specs(dofn: Any) -> tuple[set[Any], set[Any]]:
        calls.append(dofn)
        return set(), set()

    specs, fn = _inspected_once(inspect_specs), _NoWeakReferences()
    specs(fn)
    specs(fn)
    assert len(calls) == 2
