"""Tuning of Beam's Python SDK, for every process that builds or runs beamops pipelines.

Importing this module applies it; ``beamops`` imports it, so it holds in the process that
runs a pipeline on FnApiRunner or with LOOPBACK workers, and in ``beamops.services.worker_pool``'s
workers. An SDK worker started as a process of its own (Beam's ``worker_pool_main`` in the
docker images) imports it at start-up through ``--beam_plugins=beamops.harness``, which
``beamops.runner.flink_defaults`` adds: there, beamops itself is imported only when the first
bundle's DoFns are unpickled, after that bundle's state sampler exists.
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

from apache_beam.runners.worker import statesampler
from apache_beam.transforms import userstate

# Long enough that the sampler thread costs nothing measurable (100 wake-ups a second while a
# bundle runs), short enough that ending a bundle waits at most this long for it.
STATE_SAMPLING_PERIOD_MS = 10
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
    inspect_specs = userstate.get_dofn_specs
    if getattr(inspect_specs, "__wrapped__", None) is not None:  # already applied
        return
    if list(inspect.signature(inspect_specs).parameters) != ["dofn"]:
        log.warning("Beam's userstate.get_dofn_specs has changed: DoFns are inspected as Beam has it")
        return
    userstate.get_dofn_specs = _inspected_once(inspect_specs)


def _inspected_once(
    inspect_specs: Callable[[Any], tuple[set[Any], set[Any]]],
) -> Callable[[Any], tuple[set[Any], set[Any]]]:
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

    get_dofn_specs.__wrapped__ = inspect_specs  # type: ignore[attr-defined]
    get_dofn_specs.__doc__ = inspect_specs.__doc__
    return get_dofn_specs


end_bundles_promptly()
inspect_each_dofn_once()
