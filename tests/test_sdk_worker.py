"""beamops-sdk-worker: the SDK worker the docker images' worker pool runs (docker/entrypoint-worker-pool.sh).

The pool here is beamops.services.worker_pool with ``--sdk_worker``: Beam's own pool servicer in
process mode with that executable, as Beam's worker_pool_main runs it in the image, but bound to
127.0.0.1. The job runs on PortableRunner's embedded job service with ``--environment_type=EXTERNAL``
(FnApiRunner alone runs its workers in-process whatever the environment): its SDK worker must
start with the job's pipeline options, so that its --beam_plugins apply (a bare SdkHarness, Beam's
default, never reads them).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from helpers import SDK_WORKER, call_bounded, sdk_worker_pool

from beamops.runner import HARNESS_PLUGIN

JOB_TIMEOUT_S = 180


def _run_on_pool(pool: str, build: Callable[[beam.Pipeline], None], *flags: str) -> None:
    """Run the pipeline ``build`` makes on PortableRunner, its SDK worker from the pool at ``pool`` (host:port)."""
    options = PipelineOptions(
        [
            "--runner=PortableRunner",
            "--job_endpoint=embed",  # Beam's job service in this process, which honours the environment
            "--environment_type=EXTERNAL",
            f"--environment_config={pool}",
            *flags,
        ]
    )

    def job() -> None:
        with beam.Pipeline(options=options) as p:
            build(p)

    # A worker that cannot start, or is stuck, leaves the job waiting for it: bounded here.
    call_bounded(job, "the job (its SDK worker never came, or is stuck)", timeout=JOB_TIMEOUT_S)


def test_the_console_script_is_installed() -> None:
    assert SDK_WORKER.is_file() and os.access(SDK_WORKER, os.X_OK), SDK_WORKER
    assert shutil.which("beamops-sdk-worker", path=str(SDK_WORKER.parent)) == str(SDK_WORKER)


def test_a_pool_worker_starts_with_the_jobs_options_and_plugins(tmp_path: Path) -> None:
    def build(p: beam.Pipeline) -> None:
        seen = p | beam.Create([0]) | beam.Map(lambda _: (HARNESS_PLUGIN in sys.modules, Path(sys.argv[0]).name))
        # Beam's sdk_worker_main in a process of its own (not a thread of the pool, not a
        # bare `python -c` harness), which imported the harness from the job's --beam_plugins.
        assert_that(seen, equal_to([(True, "sdk_worker_main.py")]))

    with sdk_worker_pool(tmp_path / "pool.log") as (pool, _):
        _run_on_pool(pool, build, f"--beam_plugins={HARNESS_PLUGIN}")


PRINTED_LINES = 256  # of 1 KB: four times a pipe's 64 KB buffer


def test_a_pool_worker_that_prints_a_lot_goes_on_and_its_output_is_in_the_pools(tmp_path: Path) -> None:
    """Beam's pool gives the worker a stdout pipe that nothing reads; a worker that wrote to it stopped at
    the 64th KB, for good."""

    # Defined here, not at module level, so that it is pickled by value: the worker cannot import this module.
    def print_lines(n: int) -> int:
        for i in range(PRINTED_LINES):
            print(f"printed by a DoFn {i:4d} " + "x" * 1000)
        return n

    def build(p: beam.Pipeline) -> None:
        assert_that(p | beam.Create([0]) | beam.Map(print_lines), equal_to([0]))

    log = tmp_path / "pool.log"
    with sdk_worker_pool(log) as (pool, _):
        _run_on_pool(pool, build)
    assert log.read_text().count("printed by a DoFn") == PRINTED_LINES
