# One image for both roles: `abn serve` (the backend) and `abn worker` (training).
# Build: docker build -t abn-backend .   Deploy: docs/deploy.md (docker compose).
# BASE_IMAGE: any Debian-like image; one without Python gets Debian's python3 (3.11 on bookworm).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH MODEL_DIR=/data/model_dir
SHELL ["/bin/sh", "-eu", "-c"]
WORKDIR /app

# hadolint ignore=DL3008
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/venv

# Runtime dependencies only, from the lock (no test or lint tools), then the project itself,
# not editable. PIP_* build arguments may point pip at local wheels for the build alone.
ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_EXTRA_INDEX_URL
COPY requirements.lock /tmp/requirements.lock
RUN pip install -r /tmp/requirements.lock && rm /tmp/requirements.lock
COPY pyproject.toml README.md ./
COPY model model
COPY backend backend
COPY label_config label_config
COPY scripts/healthcheck.py /app/healthcheck.py
RUN pip install --no-deps . && rm -rf build ./*.egg-info \
    && useradd --create-home --uid 1000 abn && mkdir -p /data && chown abn /data

USER 1000
VOLUME /data
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python3", "/app/healthcheck.py"]
CMD ["abn", "serve", "--host", "0.0.0.0", "--port", "9090", "--workers", "2"]
