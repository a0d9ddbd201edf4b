# promptdistill service image, CPU flavour (onnxruntime + faiss-cpu). GPU: Dockerfile.gpu.
#
#   docker build -t promptdistill:cpu .
#
#   docker run --rm -v promptdistill-data:/data promptdistill:cpu promptdistill demo --out /data/demo
#   docker run --rm -p 127.0.0.1:8000:8000 -v promptdistill-data:/data -v promptdistill-state:/state \
#       -e PROMPTDISTILL_API_KEY=... promptdistill:cpu
#
# Behind a firewall or a mirror, every source the build reaches is a build argument (see the
# README, "Docker"): BASE_IMAGE (any Debian/Ubuntu-like image with python3 >= 3.11 and its venv
# module), TORCH_INDEX_URL (empty: take torch from the pip sources below), PIP_INDEX_URL,
# PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST, PIP_NO_INDEX and PIP_CA_CERT (a PEM
# certificate, e.g. --build-arg PIP_CA_CERT="$(cat corp-ca.pem)"). Nothing else is downloaded:
# no Dockerfile frontend (no `# syntax=` line), no other image.
#
# The install steps are the README's: a virtual environment, then `pip install ".[cpu]"` (every
# dependency pinned in pyproject.toml; no -e and no dev extra in an image), with torch==2.13.0
# installed first from the PyTorch CPU index: PyPI's Linux wheel of it is the CUDA build and pulls
# several GB of nvidia-* wheels (2.13.0+cpu satisfies the ==2.13.0 pin).
# The bundle lives on the /data volume (PROMPTDISTILL_BUNDLE, default /data/demo/bundle: where the
# offline demo above writes it), the label-set database on /state (PROMPTDISTILL_STATE_DIR).
# docker-compose.yml runs the demo as a one-shot job when no bundle is there.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# Few instructions, and the metadata ones before the large layers: the legacy builder snapshots
# the whole filesystem for every instruction, which costs minutes per step on the vfs storage
# driver (the one that works where overlayfs does not, e.g. `make docker-smoke`).

# ---------------------------------------------------------------- builder: the README's install
# hadolint ignore=DL3006
FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_TRUSTED_HOST PIP_NO_INDEX PIP_CA_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
COPY docker/pip-install.sh /usr/local/bin/pip-install
# torch first and pinned (its own layer: by far the largest and the least often changed).
RUN python3 -m venv /opt/venv \
    && pip-install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
# The build context is a whitelist (.dockerignore): pyproject.toml, README.md, LICENSE, the packages.
COPY . /src
# Every dependency is pinned exactly in pyproject.toml, hence DL3013 does not apply.
# hadolint ignore=DL3013
RUN pip-install "/src[cpu]" \
    && python -c "import models, onnxruntime, faiss; print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

# ---------------------------------------------------------------- runtime
# hadolint ignore=DL3006
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="promptdistill" \
      org.opencontainers.image.description="Prompt-distilled CLIP classifiers served over REST (cpu)" \
      org.opencontainers.image.licenses="Apache-2.0"
# Listening on 0.0.0.0 needs PROMPTDISTILL_API_KEY (mutating routes then require X-API-Key), or
# PROMPTDISTILL_ALLOW_INSECURE_BIND=1 when the port is published on loopback only or a proxy in
# front authenticates; the server refuses to start otherwise.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PROMPTDISTILL_BUNDLE=/data/demo/bundle \
    PROMPTDISTILL_STATE_DIR=/state \
    PROMPTDISTILL_HOST=0.0.0.0 \
    PROMPTDISTILL_PORT=8000 \
    HF_HOME=/data/cache/huggingface
EXPOSE 8000 8001
# Readiness, not liveness: /readyz checks bundle, index, database and a probe inference.
# start-period covers loading a large bundle (and the ONNX session) on a slow machine.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PROMPTDISTILL_PORT', '8000'), timeout=4)"]
# SIGTERM (docker stop) drains in-flight requests; give it PROMPTDISTILL_GRACEFUL_SHUTDOWN_S
# (default 30 s) plus margin with `docker stop -t 40` / compose stop_grace_period.
STOPSIGNAL SIGTERM
CMD ["promptdistill", "serve"]
# Non-root; the volumes' mount points belong to it so named volumes start writable (created
# before VOLUME: changes inside a declared volume are discarded).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/app app \
    && mkdir -p /data /state \
    && chown app:app /data /state
VOLUME ["/data", "/state"]
WORKDIR /home/app
USER 10001:10001
# Last: the only large layer (owned by root, read-only for the service).
COPY --from=builder /opt/venv /opt/venv
