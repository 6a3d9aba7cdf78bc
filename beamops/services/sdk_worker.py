"""An SDK worker for Beam's worker pool in process mode: ``worker_pool_main --container_executable``.

Beam's ``worker_pool_main`` starts each SDK worker as a bare ``SdkHarness``, which never sees the
job's pipeline options: no ``--beam_plugins`` (so not :mod:`beamops.harness`), no state cache size,
no log levels. Given an executable, it runs that instead, with the endpoints of Beam's container
contract. Beam's own boot loader for that contract is a Go binary that comes only in Beam's SDK
images; this is the part of it that a worker image holding every package already needs: ask the
job's provision service for its pipeline options, then run Beam's ``sdk_worker_main`` with them.
Artifacts are not staged (the image must hold the job's code, as beamops' worker-pool image does).

    python -m apache_beam.runners.worker.worker_pool_main --service_port=50000 \\
        --container_executable="$(command -v beamops-sdk-worker)"
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence

PROVISION_TIMEOUT_S = 60.0


def provision_info(endpoint: str, worker_id: str, timeout: float = PROVISION_TIMEOUT_S) -> object:
    """The job's ProvisionInfo (pipeline options, runner capabilities, endpoints) from ``endpoint``; the
    service tells its workers apart by the ``worker_id`` in the call's metadata."""
    import grpc
    from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc

    with grpc.insecure_channel(endpoint) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
        request = beam_provision_api_pb2.GetProvisionInfoRequest()
        return stub.GetProvisionInfo(request, timeout=timeout, metadata=(("worker_id", worker_id),)).info


def harness_environment(args: argparse.Namespace, info: object, semi_persistent_dir: str) -> dict[str, str]:
    """What ``sdk_worker_main`` reads from its environment, as Beam's boot loader sets it."""
    from apache_beam.portability.api import endpoints_pb2
    from google.protobuf import json_format, text_format

    def descriptor(url: str) -> str:
        return text_format.MessageToString(endpoints_pb2.ApiServiceDescriptor(url=url))

    env = {
        "WORKER_ID": args.id,
        "PIPELINE_OPTIONS": json_format.MessageToJson(info.pipeline_options),  # type: ignore[attr-defined]
        "CONTROL_API_SERVICE_DESCRIPTOR": descriptor(args.control_endpoint),
        "LOGGING_API_SERVICE_DESCRIPTOR": descriptor(args.logging_endpoint),
        "RUNNER_CAPABILITIES": " ".join(info.runner_capabilities),  # type: ignore[attr-defined]
        "SEMI_PERSISTENT_DIRECTORY": semi_persistent_dir,
    }
    if info.HasField("status_endpoint"):  # type: ignore[attr-defined]
        env["STATUS_API_SERVICE_DESCRIPTOR"] = descriptor(info.status_endpoint.url)  # type: ignore[attr-defined]
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="beamops-sdk-worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--id", required=True, help="worker id")
    for name in ("logging", "artifact", "provision", "control"):
        parser.add_argument(f"--{name}_endpoint", required=True, help=f"{name} service, host:port")
    parser.add_argument("--semi_persist_dir", help="the worker's scratch directory (default: a new temporary one)")
    args, _ = parser.parse_known_args(argv)
    try:
        info = provision_info(args.provision_endpoint, args.id)
    except Exception as exc:  # grpc's errors: the worker cannot start without its options
        print(f"beamops-sdk-worker {args.id}: no provision info from {args.provision_endpoint}: {exc}", file=sys.stderr)
        return 1
    scratch = args.semi_persist_dir or tempfile.mkdtemp(prefix=f"beam-worker-{args.id}-")
    env = {**os.environ, **harness_environment(args, info, scratch)}
    # Beam's pool starts the worker with stdout a pipe that nothing reads: once a DoFn or a library has
    # printed 64 KB (the pipe's buffer) the next write blocks, and the worker with it, for good. Its
    # stdout goes where its stderr goes instead, the pool's own output (the container's log).
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # exec: the pool stops a worker by its PID, which is then the harness's own.
    os.execve(sys.executable, [sys.executable, "-m", "apache_beam.runners.worker.sdk_worker_main"], env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
