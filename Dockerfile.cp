# syntax=docker/dockerfile:1
# The Synapse control plane image: `synapse controlplane` (HTTP 8080, gRPC 50051).
#
#   docker build -f Dockerfile.cp -t synapse-controlplane:0.1.0 .
#
# Two stages: `build` installs the package and its runtime dependencies into a venv at
# /opt/synapse (dependencies first, from pyproject.toml, so that a source change does not
# reinstall them); `runtime` copies only that venv onto the same slim base. No compiler,
# no pip cache, no tests, no dev tools. The `embed` extra (PyTorch, sentence-transformers)
# is NOT installed: embeddings come from the agents (Node.Embed).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/synapse
WORKDIR /src
COPY pyproject.toml README.md ./
# runtime dependencies only, read from pyproject.toml (no extras)
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && /opt/synapse/bin/pip install --no-cache-dir -r /tmp/requirements.txt
COPY protos ./protos
COPY synapse_common ./synapse_common
COPY synapse_cli ./synapse_cli
COPY controlplane ./controlplane
COPY agent ./agent
COPY simulator ./simulator
RUN /opt/synapse/bin/pip install --no-cache-dir --no-deps . \
    && /opt/synapse/bin/synapse --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="synapse-controlplane" \
      org.opencontainers.image.description="Synapse control plane: OpenAI-compatible API, predicted-TTFT router, semantic cache, Admin gRPC" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.11.14-slim-bookworm"
RUN groupadd --system --gid 10001 synapse \
    && useradd --system --uid 10001 --gid synapse --home-dir /var/lib/synapse \
       --shell /usr/sbin/nologin synapse \
    && mkdir -p /var/lib/synapse /etc/synapse \
    && chown synapse:synapse /var/lib/synapse
COPY --from=build /opt/synapse /opt/synapse
ENV PATH=/opt/synapse/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SYNAPSE_CONFIG_PATH=/etc/synapse/config.yaml
WORKDIR /var/lib/synapse
USER 10001:10001
EXPOSE 8080 50051
# liveness of the HTTP API (the Kubernetes manifests use their own probes)
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["synapse"]
CMD ["controlplane"]
