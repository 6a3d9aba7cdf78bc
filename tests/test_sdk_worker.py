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
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from beamops.runner import HARNESS_PLUGIN
from beamops.services._local import free_port

EXECUTABLE = Path(sys.executable).with_name("beamops-sdk-worker")
JOB_TIMEOUT_S = 180


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{process.args} exited with {process.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s: {process.args}")


@contextmanager
def _service(args: list[str], port: int) -> Iterator[None]:
    """``python -m <args>`` listening on ``port``, stopped (by PID) at the end as Ctrl-C would."""
    process = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process)
        yield
    finally:
        process.send_signal(signal.SIGINT)  # the pool then stops the workers it started
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def test_the_console_script_is_installed() -> None:
    assert EXECUTABLE.is_file() and os.access(EXECUTABLE, os.X_OK), EXECUTABLE
    assert shutil.which("beamops-sdk-worker", path=str(EXECUTABLE.parent)) == str(EXECUTABLE)


def test_a_pool_worker_starts_with_the_jobs_options_and_plugins() -> None:
    pool_port = free_port()
    pool = ["beamops.services.worker_pool", f"--port={pool_port}", f"--sdk_worker={EXECUTABLE}"]
    with _service(pool, pool_port):
        options = PipelineOptions(
            [
                "--runner=PortableRunner",
                "--job_endpoint=embed",  # Beam's job service in this process, which honours the environment
                "--environment_type=EXTERNAL",
                f"--environment_config=localhost:{pool_port}",
                f"--beam_plugins={HARNESS_PLUGIN}",
            ]
        )
        outcome: dict[str, BaseException] = {}

        def job() -> None:
            try:
                with beam.Pipeline(options=options) as p:
                    seen = (
                        p
                        | beam.Create([0])
                        | beam.Map(lambda _: (HARNESS_PLUGIN in sys.modules, Path(sys.argv[0]).name))
                    )
                    # Beam's sdk_worker_main in a process of its own (not a thread of the pool, not a
                    # bare `python -c` harness), which imported the harness from the job's --beam_plugins.
                    assert_that(seen, equal_to([(True, "sdk_worker_main.py")]))
            except BaseException as exc:
                outcome["error"] = exc

        # A worker that cannot start leaves the job waiting for it: bounded here.
        running = threading.Thread(target=job, daemon=True)
        running.start()
        running.join(JOB_TIMEOUT_S)
        assert not running.is_alive(), f"the job did not finish within {JOB_TIMEOUT_S} s (its SDK worker never came?)"
        assert "error" not in outcome, outcome
