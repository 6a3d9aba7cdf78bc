"""Tuning of Beam's Python SDK harness, for every process that runs beamops operators.

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

from apache_beam.runners.worker import statesampler

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


end_bundles_promptly()
