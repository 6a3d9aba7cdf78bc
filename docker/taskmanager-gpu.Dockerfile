# syntax=docker/dockerfile:1
# Flink 1.20 image for beamops' GPU TaskManagers (and the JobManager, same image and config):
# the official Flink image + the GPU external-resource plugin checked/enabled + beamops' GPU
# profile (flink-conf/gpu/config.yaml) + an entrypoint that renders it and checks the GPU.
#
# Build from the repository root (the context must contain flink-conf/ and docker/):
#   docker build -f docker/taskmanager-gpu.Dockerfile -t beamops/flink-gpu:0.1.0 .
#
# The base is the official Flink image (Java 17, Ubuntu 22.04; FLINK_HOME=/opt/flink, user
# flink, uid 9999). Pull it from the image registry your deployment uses (a mirror, or a
# registry that proxies the official images) by overriding FLINK_IMAGE, e.g.
#   --build-arg FLINK_IMAGE=<your-registry>/flink:1.20.4-java17
# 1.20.4 is the newest 1.20 tag of the official image when this was written; the config keys
# were checked against Flink 1.20.5 and are the same in every 1.20.x. Beam's 2.73.0 job server
# is built against Flink 1.20 and runs on any 1.20.x cluster.
ARG FLINK_IMAGE=flink:1.20.4-java17
FROM ${FLINK_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The distribution ships the GPU plugin (flink-external-resource-gpu-<version>.jar and the
# nvidia-gpu-discovery.sh / gpu-discovery-common.sh scripts). Flink loads plugins only from
# plugins/<name>/, so copy it there if this base keeps it elsewhere (opt/), make the scripts
# executable (Flink's GPU driver refuses a non-executable discovery script), and fail the build
# if it is missing. nvidia-smi itself is not in the image: the NVIDIA container toolkit mounts
# the host driver's nvidia-smi into a container that requests the "utility" capability.
USER 0
WORKDIR $FLINK_HOME
RUN set -eux; \
    if [ ! -d plugins/external-resource-gpu ] && [ -d opt/external-resource-gpu ]; then \
      cp -r opt/external-resource-gpu plugins/external-resource-gpu; \
    fi; \
    ls plugins/external-resource-gpu/flink-external-resource-gpu-*.jar; \
    chmod 0755 plugins/external-resource-gpu/*.sh; \
    test -x plugins/external-resource-gpu/nvidia-gpu-discovery.sh; \
    chown -R flink:flink plugins/external-resource-gpu; \
    mkdir -p /opt/beamops/flink-conf /flink-data /tmp/beam-artifact-staging; \
    chown flink:flink /flink-data /tmp/beam-artifact-staging

# The profile is a template: the entrypoint renders it into $FLINK_HOME/conf/config.yaml at start.
COPY --chown=flink:flink flink-conf/gpu/config.yaml /opt/beamops/flink-conf/config.yaml
COPY --chmod=0755 docker/entrypoint-taskmanager.sh /opt/beamops/entrypoint-taskmanager.sh

ENV BEAMOPS_FLINK_CONF_TEMPLATE=/opt/beamops/flink-conf/config.yaml

# Flink runs as the image's unprivileged user flink (uid 9999); /flink-data (checkpoints) is a
# volume it owns.
USER 9999
VOLUME ["/flink-data"]
# 6121 data, 6122 TaskManager RPC, 6123 JobManager RPC, 6124 blob server, 8081 REST/web UI.
EXPOSE 6121 6122 6123 6124 8081

ENTRYPOINT ["/opt/beamops/entrypoint-taskmanager.sh"]
CMD ["taskmanager"]
