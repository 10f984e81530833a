FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bridge ./bridge
# Runtime dependencies with the Apprise extra (no dev extras): one image serves every sink.
# The versions are pinned to ranges in pyproject.toml, which DL3013 cannot see.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[apprise]" \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bridge \
    && mkdir -p /data /config \
    && chown bridge /data

COPY config/routes.yaml /config/routes.yaml

# The shipped config listens on 127.0.0.1 outside a container (it answers a demo secret);
# in one, the port must be reachable through the container's own address.
ENV BRIDGE_CONFIG=/config/routes.yaml \
    BRIDGE_STORAGE=sqlite:////data/bridge.db \
    BRIDGE_LISTEN=0.0.0.0:8080

USER 10001
VOLUME ["/data"]
EXPOSE 8080
# Asks the port BRIDGE_LISTEN names (run with -e BRIDGE_LISTEN=0.0.0.0:9000, it follows), from
# inside the container. A plain one-liner: loading the config every 30 s would cost 0.5 s of CPU.
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('BRIDGE_LISTEN', ':8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2)"]
ENTRYPOINT ["bridge"]
CMD ["serve"]
