# syntax=docker/dockerfile:1
# The egressgw image: wheels built in a first stage, installed into a virtual environment,
# which alone is copied into the final stage (no compiler, no pip, no build files), run as an
# unprivileged numeric user on a read-only root filesystem (docs/deploy.md, "The image").
#
# The base is pinned to an exact release; pin its digest too for reproducible builds:
#   docker build --build-arg PYTHON_IMAGE=python:3.11.7-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY egressgw ./egressgw
COPY feeds ./feeds
COPY siem ./siem
# Every dependency ships binary wheels for CPython 3.11 on x86_64 and arm64: no compiler here
# either; a dependency without one fails the build rather than pulling a toolchain in.
RUN pip wheel --only-binary=:all: --no-binary=egressgw --wheel-dir /wheels .
RUN python -m venv /opt/egressgw \
 && /opt/egressgw/bin/pip install --no-index --find-links=/wheels egressgw \
 && /opt/egressgw/bin/pip uninstall --yes pip \
 && /opt/egressgw/bin/python -m compileall -q /opt/egressgw

# What both images share: the environment built above, nothing else.
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="egressgw" \
      org.opencontainers.image.description="Egress gateway for Kubernetes clusters" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/egressgw /opt/egressgw
# Read-only root filesystem: no bytecode written at run time (compiled above), logs unbuffered.
ENV PATH=/opt/egressgw/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /var/lib/egressgw
EXPOSE 3128 9090
# No HEALTHCHECK: Kubernetes ignores it and probes /healthz and /readyz itself; the image has
# no HTTP client to run one with.
ENTRYPOINT ["/opt/egressgw/bin/egressgw"]
CMD ["run", "--config", "/etc/egressgw/egressgw.yaml"]

# Per-node mode (`docker build --target node`): the node rules and the node firewall run the
# `nft` program, so this image adds Debian's nftables package (no recommends, no apt lists
# kept). It runs as the user the DaemonSet gives it (0, every capability dropped but NET_ADMIN
# and NET_RAW: docs/deploy.md).
FROM runtime AS node
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables \
 && rm -rf /var/lib/apt/lists/*
EXPOSE 15001 53/udp 53/tcp

# Explicit mode, the default target: nothing added, an unprivileged numeric user.
FROM runtime
USER 10001:10001
