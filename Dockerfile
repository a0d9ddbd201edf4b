# syntax=docker/dockerfile:1
#
# promptdistill service image. One Dockerfile, two flavours:
#
#   docker build -t promptdistill:cpu .                        # CPU: onnxruntime + faiss-cpu
#   docker build -t promptdistill:gpu --build-arg FLAVOUR=gpu . # CUDA 13: onnxruntime-gpu + faiss-gpu
#
#   docker run --rm -v promptdistill-data:/data promptdistill:cpu promptdistill demo --out /data/demo
#   docker run --rm -p 127.0.0.1:8000:8000 -v promptdistill-data:/data -v promptdistill-state:/state \
#       -e PROMPTDISTILL_API_KEY=... promptdistill:cpu
#
# The install steps are the README's: a virtual environment, then `pip install ".[<flavour>]"`
# (every dependency pinned in pyproject.toml; no -e and no dev extra in an image). One step is
# added for the CPU flavour: torch==2.13.0 is installed first from the PyTorch CPU index, see below.
# The bundle lives on the /data volume (PROMPTDISTILL_BUNDLE, default /data/demo/bundle: where the
# offline demo above writes it), the label-set database on /state (PROMPTDISTILL_STATE_DIR).
# docker-compose.yml runs the demo as a one-shot job when no bundle is there.

ARG FLAVOUR=cpu

# ---------------------------------------------------------------- base images, one per flavour
FROM python:3.11-slim-bookworm AS base-cpu
# pyproject.toml pins torch==2.13.0. PyPI's Linux wheel of it is the CUDA build and pulls several
# GB of nvidia-* wheels; the development machines resolve the pin to a CPU wheel only because pip
# has a local find-links there. The official PyTorch CPU index (2.13.0+cpu, which satisfies the
# ==2.13.0 pin) is the portable equivalent, installed before the package.
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04 AS base-gpu
# CUDA 13 runtime + cuDNN 9 for onnxruntime-gpu 1.31.1 (built for CUDA 13, like torch 2.13's CUDA
# wheels). Ubuntu 24.04's Python is 3.12, which every pinned dependency supports.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# PyPI's torch==2.13.0 is the CUDA build: exactly what this flavour wants.
ENV TORCH_INDEX_URL=https://pypi.org/simple

# ---------------------------------------------------------------- builder: the README's install
# hadolint ignore=DL3006
FROM base-${FLAVOUR} AS builder
ARG FLAVOUR
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first and pinned (its own layer: by far the largest and the least often changed).
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY models ./models
COPY training ./training
COPY service ./service
COPY promptdistill ./promptdistill
# Exactly one flavour extra: onnxruntime/faiss-cpu or onnxruntime-gpu/faiss-gpu (same import names).
# Every dependency is pinned exactly in pyproject.toml, hence DL3013 does not apply.
# hadolint ignore=DL3013
RUN pip install ".[${FLAVOUR}]" \
    && python -c "import models, onnxruntime, faiss; print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

# ---------------------------------------------------------------- runtime
# hadolint ignore=DL3006
FROM base-${FLAVOUR} AS runtime
ARG FLAVOUR
LABEL org.opencontainers.image.title="promptdistill" \
      org.opencontainers.image.description="Prompt-distilled CLIP classifiers served over REST (${FLAVOUR})" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/venv /opt/venv
# Non-root; the volumes' mount points belong to it so named volumes start writable.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/app app \
    && mkdir -p /data /state \
    && chown app:app /data /state
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PROMPTDISTILL_BUNDLE=/data/demo/bundle \
    PROMPTDISTILL_STATE_DIR=/state \
    PROMPTDISTILL_HOST=0.0.0.0 \
    PROMPTDISTILL_PORT=8000 \
    HF_HOME=/data/cache/huggingface
# Listening on 0.0.0.0 needs PROMPTDISTILL_API_KEY (mutating routes then require X-API-Key), or
# PROMPTDISTILL_ALLOW_INSECURE_BIND=1 when the port is published on loopback only or a proxy in
# front authenticates; the server refuses to start otherwise.
VOLUME ["/data", "/state"]
USER 10001:10001
WORKDIR /home/app
EXPOSE 8000
# Readiness, not liveness: /readyz checks bundle, index, database and a probe inference.
# start-period covers loading a large bundle (and the ONNX session) on a slow machine.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PROMPTDISTILL_PORT', '8000'), timeout=4)"]
# SIGTERM (docker stop) drains in-flight requests; give it PROMPTDISTILL_GRACEFUL_SHUTDOWN_S
# (default 30 s) plus margin with `docker stop -t 40` / compose stop_grace_period.
STOPSIGNAL SIGTERM
CMD ["promptdistill", "serve"]
