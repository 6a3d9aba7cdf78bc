# Beam Python worker pool for beamops' GPU TaskManagers: CUDA user-space libraries, Python 3.11,
# apache-beam 2.73.0 (the pin in pyproject.toml, = the Flink job server's version), numba with
# NVIDIA's numba-cuda target, and beamops itself (beamops/, transforms/, jobs/), so that the SDK
# workers can import every operator a job names.
#
# Build from the repository root (the context must contain pyproject.toml and the packages):
#   docker build -f docker/worker-pool.Dockerfile -t beamops/worker-pool:0.1.0 .
# docker/worker-pool.Dockerfile.dockerignore keeps .venv, caches and outputs out of the context.
#
# CUDA version: the container runs on the host's driver, which must support it. Pick CUDA_VERSION
# no newer than the "CUDA Version" in the header of `nvidia-smi` on the GPU nodes (12.4 needs a
# driver >= 550; 12.6 >= 560). CUDA_MINOR must match it: numba-cuda's compiler (NVVM), runtime
# and NVRTC come as pip wheels of that version, and PTX from a newer NVVM than the driver knows
# cannot be loaded. Pull nvidia/cuda from the image registry your deployment uses (override
# CUDA_IMAGE to point at a mirror).
ARG CUDA_VERSION=12.4.1
ARG CUDA_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG CUDA_MINOR=12.4
# numba-cuda: NVIDIA's CUDA target for numba, developed outside numba; installed, it takes over
# `numba.cuda` (the image build asserts that). Its [cu12] extra brings NVVM and libdevice as
# wheels: the CUDA *runtime* base image has neither, and numba needs both to compile kernels
# (numba's built-in target only looks for them in a CUDA toolkit or conda environment).
ARG NUMBA_CUDA_VERSION=0.30.4
# Ubuntu 22.04's venv comes with an old pip; this is the one the project's dev venv uses.
ARG PIP_VERSION=26.3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 (the project requires >=3.11,<3.12) from Ubuntu 22.04's own packages. No version
# pins on apt packages: the distribution's security updates should land on every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

# The venv first on PATH (the pool starts its SDK workers as the venv's beamops-sdk-worker).
# CUDA's default device order is fastest-first; nvidia-smi and Docker number GPUs by PCI bus.
# numba and matplotlib write their caches under /tmp: the unprivileged user's home is read-only.
# The netns watchdog restarts a sidecar left behind when its TaskManager's container restarted
# (see docker/entrypoint-worker-pool.sh).
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHON=/opt/venv/bin/python \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BEAMOPS_WORKER_POOL_PORT=50000 \
    BEAMOPS_NETNS_WATCH_SECONDS=5 \
    CUDA_DEVICE_ORDER=PCI_BUS_ID \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/beamops/src

# Dependencies first, in their own layer: only pyproject.toml is needed to resolve them, so a
# change to beamops' code does not reinstall Beam, numba and the CUDA wheels. The package dirs
# are stubs here and are replaced below.
COPY pyproject.toml README.md ./
RUN mkdir -p beamops transforms jobs \
    && touch beamops/__init__.py transforms/__init__.py jobs/__init__.py \
    && pip install --no-cache-dir "pip==${PIP_VERSION}" \
    && pip install --no-cache-dir . \
        "numba-cuda[cu12]==${NUMBA_CUDA_VERSION}" \
        "cuda-toolkit[cccl,cudart,nvcc,nvrtc]==${CUDA_MINOR}.*" \
    && pip uninstall -y beamops \
    && rm -rf beamops transforms jobs build ./*.egg-info

COPY beamops ./beamops
COPY transforms ./transforms
COPY jobs ./jobs
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && pip check \
    && python -c "import apache_beam, beamops, jobs.com_pipeline, transforms._cuda_kernels; \
from numba import cuda; \
assert apache_beam.__version__ == '2.73.0', apache_beam.__version__; \
assert cuda.implementation == 'NVIDIA', 'numba.cuda is not numba-cuda: ' + cuda.implementation"

COPY --chmod=0755 docker/entrypoint-worker-pool.sh /opt/beamops/entrypoint-worker-pool.sh

# The SDK workers need no privileges; the NVIDIA toolkit's device nodes are world-accessible.
RUN useradd --system --uid 9998 --home-dir /opt/beamops --shell /usr/sbin/nologin beam
USER 9998
WORKDIR /opt/beamops

EXPOSE 50000
# tini as PID 1 reaps the SDK worker processes the pool starts and forwards SIGTERM to the pool
# (Python as PID 1 would ignore it, and `docker stop` would SIGKILL it after 10 s).
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/beamops/entrypoint-worker-pool.sh"]
