"""Running a job: the default runner, FlinkRunner defaults, one-line errors.

Shared by the jobs (``python -m jobs.<name>``) and ``beamops pipeline run``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from beamops.operator import OperatorParameterError

# Beam's in-process batch engine (the DirectRunner's FnApiRunner), named so it never tries to download Prism.
DEFAULT_RUNNER = "FnApiRunner"
log = logging.getLogger("beamops.runner")


def _given(beam_args: list[str], name: str) -> str | None:
    for i, arg in enumerate(beam_args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(beam_args):
            return beam_args[i + 1]
    return None


def flink_defaults(beam_args: list[str]) -> list[str]:
    """For --runner=FlinkRunner, add what a user should not have to type.

    ``--flink_version=1.20``, ``--flink_master=localhost:8081``, the cached job-server jar,
    ``--environment_type=LOOPBACK`` (development; production passes EXTERNAL with its worker
    pool), ``--checkpointing_interval=10000`` (Beam's Flink runner checkpoints only when asked) and
    ``--finish_bundle_before_checkpointing``. Without the last, a checkpoint taken while the Kafka
    reader's first bundle is in flight sometimes leaves the reader never running again: no error,
    no output (7 of about 30 jobs here; none of 17 with it, none of 7 without checkpoints).
    Options the user gave win.
    """
    from beamops.services.flink_cluster import flink_runner_args

    master = _given(beam_args, "flink_master") or "localhost:8081"
    extra = [] if _given(beam_args, "flink_job_server_jar") else flink_runner_args(master)
    defaults = {
        "environment_type": "LOOPBACK",
        "checkpointing_interval": "10000",
        "finish_bundle_before_checkpointing": None,
        "streaming": None,
    }
    for name, value in defaults.items():
        if _given(beam_args, name) is None and f"--{name}" not in beam_args:
            extra.append(f"--{name}" if value is None else f"--{name}={value}")
    return [*beam_args, *(a for a in extra if _given(beam_args, a[2:].split("=")[0]) is None)]


def run(values: dict[str, Any], beam_args: list[str], build_fn: Callable[[beam.Pipeline, dict[str, Any]], None]) -> int:
    """Build and run the pipeline: 0 when it finished; a bad option is a one-line error (exit 2) before
    anything runs; a pipeline that fails is one too (exit 1), after the runner's own log of it."""
    runner = _given(beam_args, "runner")
    if runner is None:
        beam_args = [f"--runner={DEFAULT_RUNNER}", *beam_args]
    started = time.monotonic()
    try:
        if runner is not None and runner.lower().removesuffix("runner") == "flink":
            beam_args = flink_defaults(beam_args)
        pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
        build_fn(pipeline, values)
    except (OperatorParameterError, ValueError, OSError, RuntimeError) as exc:
        print(f"{_program()}: error: {exc}", file=sys.stderr)
        return 2
    log.info("running on %s", pipeline.options.get_all_options()["runner"])
    try:
        pipeline.run().wait_until_finish()
    except Exception as exc:  # the worker's traceback is in the runner's log; here its message is enough
        log.debug("pipeline failed", exc_info=True)
        took = time.monotonic() - started
        print(f"{_program()}: error: the pipeline failed after {took:.1f} s: {exc}", file=sys.stderr)
        return 1
    log.info("done in %.1f s", time.monotonic() - started)
    return 0


def _program() -> str:
    return sys.argv[0] if sys.argv else "job"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
