"""A Beam Python worker pool for ``--environment_type=EXTERNAL``, listening on one address.

In production every Flink TaskManager has a worker pool beside it (``docker/``); the
TaskManager asks it over gRPC to start an SDK worker for each job, and the job names it with
``--environment_type=EXTERNAL --environment_config=HOST:PORT``. Beam's own
``worker_pool_main`` always listens on every interface (``[::]:PORT``); this one binds the
address it is given, 127.0.0.1 unless told otherwise. It runs each SDK worker as a thread of
its own process, so stopping the pool (SIGTERM, by PID) stops its workers too; or, with
``--sdk_worker``, as that executable in a process of its own, as the docker images' pool does
with ``beamops-sdk-worker`` (the workers are then stopped with the pool).

    python -m beamops.services.worker_pool --port 50000 [--bind 127.0.0.1] [--state_cache_mb 100]
        [--sdk_worker "$(command -v beamops-sdk-worker)"]
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import threading
from types import FrameType

import grpc
from apache_beam.portability.api import beam_fn_api_pb2_grpc
from apache_beam.runners.worker.worker_pool_main import BeamFnExternalWorkerPoolServicer
from apache_beam.utils import thread_pool_executor

log = logging.getLogger("beamops.worker_pool")


def serve(servicer: BeamFnExternalWorkerPoolServicer, port: int, bind: str = "127.0.0.1") -> tuple[grpc.Server, int]:
    """Start a gRPC service of ``servicer`` (Beam's worker pool) on ``bind:port`` (port 0: a free one); return
    it and its port."""
    server = grpc.server(
        thread_pool_executor.shared_unbounded_instance(),
        # The TaskManager keeps the connection open between jobs without traffic.
        options=[("grpc.http2.max_pings_without_data", 0), ("grpc.http2.max_ping_strikes", 0)],
    )
    beam_fn_api_pb2_grpc.add_BeamFnExternalWorkerPoolServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{bind}:{port}")
    if not bound:
        raise OSError(f"cannot listen on {bind}:{port}")
    server.start()
    return server, bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=50000, help="gRPC port (default 50000; 0: any free port)")
    parser.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--state_cache_mb",
        type=int,
        default=100,
        help="each SDK worker's state cache (MB); with --sdk_worker, the job's --max_cache_memory_usage_mb instead",
    )
    parser.add_argument("--sdk_worker", help="run each SDK worker as this executable, a process of its own")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # With --sdk_worker, each worker process takes the job's state cache option instead.
        servicer = BeamFnExternalWorkerPoolServicer(
            use_process=args.sdk_worker is not None,
            container_executable=args.sdk_worker,
            state_cache_size=args.state_cache_mb << 20,
        )
        server, port = serve(servicer, args.port, args.bind)
    except (OSError, RuntimeError) as exc:
        print(f"worker_pool: error: {exc}", file=sys.stderr)
        return 2
    stopped = threading.Event()

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # The line tests and scripts wait for: the pool accepts StartWorker requests from here on.
    print(f"beamops worker pool listening on {args.bind}:{port}", flush=True)
    stopped.wait()
    server.stop(grace=2).wait()
    for worker in servicer._worker_processes.values():  # Beam keeps them there, and stops them only at exit
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
