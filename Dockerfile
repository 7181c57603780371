# One image for both roles: `abn serve` (the backend) and `abn worker` (training).
# Build: docker build -t abn-backend .   Compose: docker compose up (backend, worker, Redis).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    MODEL_DIR=/data/model_dir
WORKDIR /app

COPY requirements.txt .
RUN pip install -r requirements.txt
COPY pyproject.toml README.md ./
COPY model model
COPY backend backend
COPY label_config label_config
RUN pip install --no-deps --no-build-isolation -e . \
    && useradd --create-home --uid 1000 abn && mkdir -p /data && chown abn /data
USER abn
VOLUME /data
EXPOSE 9090
CMD ["abn", "serve", "--host", "0.0.0.0", "--port", "9090", "--workers", "2"]
