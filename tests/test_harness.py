"""beamops.harness: bundles end without waiting up to 200 ms for Beam's state-sampler thread, Beam
inspects each DoFn's state and timer parameters once, parses a list of flags once per options class and reads
the arguments of each function once."""

from __future__ import annotations

import functools
import gc
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.options import pipeline_options
from apache_beam.options.pipeline_options import (
    CrossLanguageOptions,
    DebugOptions,
    PipelineOptions,
    StandardOptions,
    TypeOptions,
)
from apache_beam.runners.worker import statesampler
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import core, userstate

from beamops.harness import STATE_SAMPLING_PERIOD_MS, _arguments_read_once, _inspected_once, _wrap_once
from beamops.runner import HARNESS_PLUGIN, flink_defaults
from beamops.scan_reduce import ScanReduceFn, _with_own_timer
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
        "from apache_beam.transforms import core, userstate\n"
        "from apache_beam.options.pipeline_options import PipelineOptions\n"
        "for patched in (userstate.get_dofn_specs, PipelineOptions.view_as, core.get_function_args_defaults):\n"
        "    print(hasattr(patched, '__wrapped__'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == [str(STATE_SAMPLING_PERIOD_MS), "True", "True", "True"]


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
    stateful, plain = _with_own_timer(_ComReduceFn, "reduce")("com_reduce", ComReduceParams(), "reduce"), _Plain()
    for fn in (stateful, plain, stateful, plain):
        assert userstate.get_dofn_specs(fn) == beams_own(fn)
    states, timers = userstate.get_dofn_specs(stateful)
    assert {s.name for s in states} == {ScanReduceFn.STATE.name}
    assert {t.name for t in timers} == {"ts-timeout-reduce"}  # Beam prefixes "ts-"
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


def _parses(monkeypatch: Any) -> list[Any]:
    """Every argparse parse that options classes make from here on."""
    calls: list[Any] = []
    parse = pipeline_options._BeamArgumentParser.parse_known_args

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return parse(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_options._BeamArgumentParser, "parse_known_args", counted)
    return calls


def test_an_options_view_is_the_one_beam_builds(monkeypatch: Any) -> None:
    flags = ["--runner=FnApiRunner", "--type_check_strictness=ALL_REQUIRED", "--no_pipeline_type_check"]
    PipelineOptions(flags).view_as(TypeOptions)  # the flags are parsed by now
    parses = _parses(monkeypatch)
    options = PipelineOptions(flags, runtime_type_check=True)
    beams, ours = PipelineOptions.view_as.__wrapped__(options, TypeOptions), options.view_as(TypeOptions)  # type: ignore[attr-defined]
    assert len(parses) == 2  # PipelineOptions(flags) and Beam's own view; not ours
    assert type(ours) is TypeOptions and ours is not options.view_as(TypeOptions)
    assert ours.get_all_options() == beams.get_all_options()
    assert ours._visible_option_list() == beams._visible_option_list()
    assert ours.type_check_strictness == "ALL_REQUIRED" and ours.pipeline_type_check is False
    assert ours.runtime_type_check is True  # an override given to the options wins over the flags
    ours.allow_unsafe_triggers = True  # set through one view, seen by the options and every view
    assert beams.allow_unsafe_triggers is True and options.view_as(TypeOptions).allow_unsafe_triggers is True
    ours._visible_options.type_check_additional = "all"  # a view's namespace is its own
    assert options.view_as(TypeOptions)._visible_options.type_check_additional == ""


def test_a_list_value_parsed_once_is_each_views_own() -> None:
    flags = ["--experiments=one"]
    first = PipelineOptions(flags)
    first.view_as(DebugOptions).add_experiment("two")  # appends to the list the view parsed
    assert first.view_as(DebugOptions).experiments == ["one", "two"]
    second = PipelineOptions(flags)
    assert second.view_as(DebugOptions).experiments == ["one"]


def test_each_list_of_flags_is_parsed_for_itself() -> None:
    strict = PipelineOptions(["--type_check_strictness=ALL_REQUIRED", "--streaming"])
    assert strict.view_as(TypeOptions).type_check_strictness == "ALL_REQUIRED"
    assert PipelineOptions([]).view_as(TypeOptions).type_check_strictness == "DEFAULT_TO_ANY"
    assert strict.view_as(TypeOptions).type_check_strictness == "ALL_REQUIRED"
    assert strict.view_as(StandardOptions).streaming is True
    assert PipelineOptions(["--runner=FnApiRunner"]).view_as(StandardOptions).streaming is False


class _UsersOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser: Any) -> None:
        parser.add_argument("--their_flag", default="theirs")


def test_a_users_options_and_defaults_from_the_environment_are_parsed_as_before(monkeypatch: Any) -> None:
    options = PipelineOptions(["--their_flag=given"])
    options.view_as(_UsersOptions)
    options.view_as(CrossLanguageOptions)
    parses = _parses(monkeypatch)
    assert options.view_as(_UsersOptions).their_flag == "given"
    monkeypatch.setenv("BEAM_SERVICE_OVERRIDES", '{"a:b": "c"}')
    assert PipelineOptions(["--their_flag=given"]).view_as(CrossLanguageOptions).beam_services == {"a:b": "c"}
    assert len(parses) == 3  # the user's view, PipelineOptions(...) and the cross-language view


def _arguments(a: int, b: Any = beam.DoFn.TimestampParam, *, c: int = 1) -> None: ...


class _Methods:
    def process(self, element: Any, timestamp: Any = beam.DoFn.TimestampParam) -> None: ...


def test_beam_reads_the_arguments_it_would_read_itself() -> None:
    ours, beams = core.get_function_args_defaults, core.get_function_args_defaults.__wrapped__  # type: ignore[attr-defined]
    for f in (_arguments, _Methods().process, _Methods.process, _arguments, _Methods().process, len, str.strip):
        assert ours(f) == beams(f)
    args, defaults = ours(_Methods().process)
    assert args == ["element", "timestamp"] and defaults == [beam.DoFn.TimestampParam]
    args.append("changed by a caller")  # every caller gets lists of its own
    assert ours(_Methods().process)[0] == ["element", "timestamp"]


def test_each_function_is_read_once_while_its_code_and_defaults_stay() -> None:
    calls: list[Any] = []

    def read_arguments(f: Any) -> tuple[list[str], list[Any]]:
        calls.append(f)
        return core.get_function_args_defaults.__wrapped__(f)  # type: ignore[attr-defined]

    read = _arguments_read_once(read_arguments)

    def f(a: int, b: int = 1) -> None: ...

    for _ in range(3):
        assert read(f) == (["a", "b"], [1])
        assert read(_Methods().process) == (["element", "timestamp"], [beam.DoFn.TimestampParam])
    assert len(calls) == 2
    f.__defaults__ = (2,)
    assert read(f) == (["a", "b"], [2])
    assert read(_Methods.process) == (["self", "element", "timestamp"], [beam.DoFn.TimestampParam])
    assert len(calls) == 4

    @functools.wraps(_arguments)
    def wrapper(*args: Any, **kwargs: Any) -> None: ...

    calls.clear()
    for other in (wrapper, wrapper, len, len):  # another object's signature; not a Python function
        read(other)
    assert len(calls) == 4


def _wrapped(f: Any) -> Any:
    def wrapper(*args: Any) -> Any:
        return f(*args)

    wrapper.__wrapped__ = f  # type: ignore[attr-defined]
    return wrapper


def test_a_beam_function_is_wrapped_once_and_left_alone_if_its_parameters_changed(caplog: Any) -> None:
    def beams(a: int, b: int) -> int:
        return a + b

    owner = types.SimpleNamespace(fn=beams)
    _wrap_once(owner, "fn", ["a"], _wrapped, "left as it is")
    assert owner.fn is beams
    assert "has changed: left as it is" in caplog.text
    _wrap_once(owner, "fn", ["a", "b"], _wrapped, "left as it is")
    wrapper = owner.fn
    assert wrapper is not beams and wrapper.__wrapped__ is beams and wrapper(1, 2) == 3
    _wrap_once(owner, "fn", ["a", "b"], _wrapped, "left as it is")
    assert owner.fn is wrapper  # not wrapped twice


def _listeners(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (Linux's /proc/net/tcp and tcp6, hex)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                found.add(address)
    return found


def test_loopback_workers_listen_on_127_0_0_1_only() -> None:
    """Beam's LOOPBACK worker pool bound '[::]': anyone reaching the submitting machine could have it start an
    SDK worker against a control service of theirs, which runs the code it is sent."""
    from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer

    address, server = BeamFnExternalWorkerPoolServicer.start(state_cache_size=0, data_buffer_time_limit_ms=0)
    try:
        host, port = address.rsplit(":", 1)
        assert host == "127.0.0.1"
        # 127.0.0.1, as IPv4 or as IPv6's ::ffff:127.0.0.1 (gRPC's choice); Beam's own: '::', every interface
        listening = _listeners(int(port))
        assert listening and listening <= {"0100007F", "0000000000000000FFFF00000100007F"}, listening
    finally:
        server.stop(0)
