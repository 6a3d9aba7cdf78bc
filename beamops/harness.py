"""Tuning of Beam's Python SDK, for every process that builds or runs beamops pipelines.

Importing this module applies it; ``beamops`` imports it, so it holds in the process that
runs a pipeline on FnApiRunner or with LOOPBACK workers, and in ``beamops.services.worker_pool``'s
workers. An SDK worker started as a process of its own (``beamops-sdk-worker``, which Beam's
``worker_pool_main`` runs in the docker images) imports it at start-up through
``--beam_plugins=beamops.harness``, which ``beamops.runner.flink_defaults`` adds: there, beamops
itself is imported only when the first bundle's DoFns are unpickled, after that bundle's state
sampler exists.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import inspect
import logging
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

from apache_beam.options import pipeline_options
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.worker import statesampler
from apache_beam.transforms import core, userstate

# Long enough that the sampler thread costs nothing measurable (100 wake-ups a second while a
# bundle runs), short enough that ending a bundle waits at most this long for it.
STATE_SAMPLING_PERIOD_MS = 10
LOOPBACK_HOST = "127.0.0.1"  # where LOOPBACK's worker pool listens (serve_loopback_workers_on_127_0_0_1)
log = logging.getLogger("beamops.harness")


def end_bundles_promptly() -> None:
    """Make the end of a bundle wait for Beam's state-sampler thread at most 10 ms, instead of up to 200.

    Each bundle starts a thread that samples which step is running (Beam's msec counters). It
    sleeps 2 ms at first, 1.2x longer each time up to ``sampling_period_ms`` (200 ms), and the
    end of the bundle joins it, so waits for the sleep under way to end ("May have to wait up to
    sampling_period_ms", apache_beam/runners/worker/statesampler_fast.pyx; the ramp-up of
    apache/beam#5466 spares only bundles shorter than about a second). A bundle that reads a
    2 GB topic ends 0-200 ms late, 131 ms at the median of 8 runs here, against 24 ms with this
    (2026-12-07). The SDK harness takes no option for it: BundleProcessor builds its sampler
    with the class's default period, which is what this sets.
    """
    init = statesampler.StateSampler.__init__
    last = list(inspect.signature(init).parameters)[-1]
    beams = getattr(statesampler, "DEFAULT_SAMPLING_PERIOD_MS", None)
    if last != "sampling_period_ms" or init.__defaults__ not in ((beams,), (STATE_SAMPLING_PERIOD_MS,)):
        log.warning("Beam's StateSampler has changed: bundles wait for its sampler thread as Beam has it")
        return
    init.__defaults__ = (STATE_SAMPLING_PERIOD_MS,)


def _wrap_once(owner: Any, name: str, parameters: list[str], wrap: Callable[[Any], Any], otherwise: str) -> None:
    """Replace Beam's ``owner.name`` by ``wrap(it)``, with Beam's as its ``__wrapped__`` and Beam's docstring,
    once, if it still takes ``parameters``; if not, warn that Beam has changed and that ``otherwise``, and
    leave it."""
    beams = getattr(owner, name)
    if getattr(beams, "__wrapped__", None) is not None:  # already applied
        return
    if list(inspect.signature(beams).parameters) != parameters:
        log.warning("Beam's %s.%s has changed: %s", getattr(owner, "__name__", owner), name, otherwise)
        return
    wrapper = wrap(beams)
    function = getattr(wrapper, "__func__", wrapper)  # a classmethod's function
    function.__wrapped__ = beams
    function.__doc__ = beams.__doc__
    setattr(owner, name, wrapper)


def inspect_each_dofn_once() -> None:
    """Make Beam look for a DoFn's state and timer parameters once per DoFn object, not 8-9 times.

    ``userstate.get_dofn_specs`` builds a signature of every method of the DoFn each time it is
    called (0.3-0.5 ms for ours), and Beam calls it for the same object from ``ParDo.__init__``,
    every ``DoFnSignature`` and ``to_runner_api``: 120 times for the 14 ParDos of the Kafka -> COM
    pipeline, a quarter of the 0.2 s that pipeline takes over an empty topic (0.20 -> 0.14-0.15 s
    with this, 2026-12-07). The answer depends only on the object's methods, which Beam's callers
    take as fixed too; it is kept while the object lives (a weak reference). An object that cannot be
    weakly referenced (a DoFn always can) is inspected every time, as before.
    """
    _wrap_once(userstate, "get_dofn_specs", ["dofn"], _inspected_once, "DoFns are inspected as Beam has it")


def _inspected_once(
    inspect_specs: Callable[[Any], tuple[set[Any], set[Any]]],
) -> Callable[[Any], tuple[set[Any], set[Any]]]:
    # Keyed by id, not by the object: a DoFn may define __eq__ and __hash__ by its parameters.
    known: dict[int, tuple[weakref.ref[Any], frozenset[Any], frozenset[Any]]] = {}
    lock = threading.Lock()  # the SDK harness builds bundle processors on several threads

    def forget(key: int) -> Callable[[Any], None]:
        def drop(_ref: Any) -> None:
            with lock:
                known.pop(key, None)

        return drop

    def get_dofn_specs(dofn: Any) -> tuple[set[Any], set[Any]]:
        key = id(dofn)
        with lock:
            entry = known.get(key)
        if entry is not None and entry[0]() is dofn:
            return set(entry[1]), set(entry[2])  # callers get sets of their own, as from Beam
        states, timers = inspect_specs(dofn)
        try:
            ref = weakref.ref(dofn, forget(key))
        except TypeError:  # no weak references to it: nothing to key the answer by
            return states, timers
        with lock:
            known[key] = (ref, frozenset(states), frozenset(timers))
        return states, timers

    return get_dofn_specs


def parse_each_list_of_flags_once() -> None:
    """Make ``options.view_as(cls)`` parse a given list of flags once per options class of Beam's.

    A view is a new object of the class asked for, which builds an argparse parser of that class's
    options and parses the flags with it (0.2-0.4 ms). Beam asks for views all the time: twice per
    transform it applies (``TypeOptions``, to see whether to check types), and for every options
    class when it validates them; 100 views for the Kafka -> COM pipeline, 25-35 ms of the 0.15-0.2 s
    it takes over an empty topic (2026-12-07). What a list of flags parses to is kept, and each new
    view gets a deep copy of it; the view is otherwise the one Beam builds: its values live in the
    options' shared dict, an override already there wins, and a value set through it is seen by
    every view. Only the classes of ``apache_beam.options.pipeline_options`` whose defaults are
    fixed take this path; flags that are not a list or tuple of strings (None: ``sys.argv``),
    ``CrossLanguageOptions`` (its defaults come from the environment) and every other class (a
    user's options may have defaults of any kind) go to Beam as before.
    """
    _wrap_once(PipelineOptions, "view_as", ["self", "cls"], _parsed_once, "options views are built as Beam has it")


_PARSED_FLAG_LISTS = 256  # (class, flags) pairs kept; a process builds pipelines from a few lists


def _fixed_defaults(cls: type) -> bool:
    """Whether what ``cls`` parses depends on the flags alone: one of Beam's own options classes, built
    by PipelineOptions' constructor, whose defaults do not come from the environment."""
    return (
        cls.__module__ == pipeline_options.__name__
        and issubclass(cls, PipelineOptions)
        and cls is not pipeline_options.CrossLanguageOptions
        and cls.__init__ is PipelineOptions.__init__
    )


def _parsed_once(view_as: Callable[[Any, type], Any]) -> Callable[[Any, type], Any]:
    parsed: dict[tuple[type, tuple[str, ...]], argparse.Namespace] = {}  # what cls parses of the flags
    lock = threading.Lock()

    def view_as_(self: PipelineOptions, cls: type) -> Any:
        flags = self._flags
        if (
            not isinstance(flags, list | tuple)
            or not all(isinstance(f, str) for f in flags)
            or not _fixed_defaults(cls)
        ):
            return view_as(self, cls)
        key = (cls, tuple(flags))
        with lock:
            namespace = parsed.get(key)
        if namespace is None:
            view = view_as(self, cls)
            with lock:
                if len(parsed) >= _PARSED_FLAG_LISTS:
                    parsed.clear()
                parsed[key] = copy.deepcopy(view._visible_options)
            return view
        view = object.__new__(cls)
        view._flags = flags
        view._visible_options = copy.deepcopy(namespace)  # lists in it are the view's own, as from Beam
        for name, value in vars(view._visible_options).items():
            self._all_options.setdefault(name, value)  # as view_as does: a value already there wins
        view._all_options = self._all_options
        return view

    return view_as_


def inspect_each_function_once() -> None:
    """Make Beam read the arguments of a function or method once, not each time it looks at them.

    ``core.get_function_args_defaults`` builds the function's ``inspect.signature`` (20-40 µs), and
    Beam calls it for every method of every DoFn it wraps, validates or unpickles: about 1,000 times
    for the Kafka -> COM pipeline (half while it is built, half while its stages' bundle processors
    are), a fifth of the 0.15-0.2 s it takes over an empty topic (2026-12-07). A DoFn's methods are
    the same function objects in every stage and every pipeline; the answer is kept per function (a
    weak reference) while its code and its defaults (a tuple, changed only by replacing it) stay the
    ones it was read from. A callable that is not a plain function or a method of one, or that
    carries ``__wrapped__`` or ``__signature__`` (its signature is another object's), is read every
    time.
    """
    _wrap_once(core, "get_function_args_defaults", ["f"], _arguments_read_once, "arguments are read as Beam has it")


def _arguments_read_once(
    read_arguments: Callable[[Any], tuple[list[str], list[Any]]],
) -> Callable[[Any], tuple[list[str], list[Any]]]:
    # function -> (code, defaults, bound, args, defaults found); keyword-only arguments are not in the answer
    known: weakref.WeakKeyDictionary[Any, tuple[Any, ...]] = weakref.WeakKeyDictionary()
    lock = threading.Lock()  # the SDK harness builds bundle processors on several threads

    def get_function_args_defaults(f: Any) -> tuple[list[str], list[Any]]:
        bound = isinstance(f, types.MethodType)
        function = f.__func__ if bound else f
        if (
            type(function) is not types.FunctionType
            or "__wrapped__" in vars(function)
            or "__signature__" in vars(function)
        ):
            return read_arguments(f)
        made_of = (function.__code__, function.__defaults__, bound)
        with lock:
            entry = known.get(function)
        if entry is not None and all(a is b for a, b in zip(entry[:3], made_of, strict=True)):
            return list(entry[3]), list(entry[4])  # callers get lists of their own, as from Beam
        args, defaults = read_arguments(f)
        with lock:
            known[function] = (*made_of, tuple(args), tuple(defaults))
        return args, defaults

    return get_function_args_defaults


def serve_loopback_workers_on_127_0_0_1() -> None:
    """LOOPBACK's worker pool listens on 127.0.0.1, not on every interface.

    With ``--environment_type=LOOPBACK`` Beam's portable runner starts a worker pool in the submitting
    process (``BeamFnExternalWorkerPoolServicer.start``, apache_beam/runners/worker/worker_pool_main.py),
    bound to ``[::]`` whatever the host: whoever reaches that port can have the process start an SDK worker
    against a control service of theirs, which runs the code it is sent. It takes no bind option; this
    starts the same servicer on 127.0.0.1, which is where the runner's TaskManager, on this machine or
    reached through it, calls it.
    """
    from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer, kill_process_gracefully

    def wrap(beams: Callable[..., Any]) -> Any:
        def start(
            cls: type[BeamFnExternalWorkerPoolServicer],
            use_process: bool = False,
            port: int = 0,
            state_cache_size: int = 0,
            data_buffer_time_limit_ms: int = -1,
            container_executable: str | None = None,
        ) -> tuple[str, Any]:
            from beamops.services.worker_pool import serve

            servicer = cls(
                use_process=use_process,
                container_executable=container_executable,
                state_cache_size=state_cache_size,
                data_buffer_time_limit_ms=data_buffer_time_limit_ms,
            )
            server, bound = serve(servicer, port, LOOPBACK_HOST)
            if use_process:  # as Beam's: the worker processes do not outlive this one
                atexit.register(lambda: [kill_process_gracefully(p) for p in list(servicer._worker_processes.values())])
            return f"{LOOPBACK_HOST}:{bound}", server

        return classmethod(start)

    parameters = ["use_process", "port", "state_cache_size", "data_buffer_time_limit_ms", "container_executable"]
    _wrap_once(
        BeamFnExternalWorkerPoolServicer, "start", parameters, wrap, "LOOPBACK's workers listen on every interface"
    )


end_bundles_promptly()
inspect_each_dofn_once()
parse_each_list_of_flags_once()
inspect_each_function_once()
serve_loopback_workers_on_127_0_0_1()
