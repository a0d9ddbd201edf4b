#!/usr/bin/env bash
# The GPU check (bench/gpu.py), sized for one short loan of a CUDA machine that has torch, timm,
# numpy, scikit-learn/-image and a CPU onnxruntime but none of open_clip, FastAPI, pydantic or FAISS,
# and no network. Two steps:
#
#   scripts/gpu-check.sh prepare    # here (network to PyPI): exact pins -> .whl/ (about 26 MB)
#   scripts/gpu-check.sh            # there: install .whl/ into a private folder, run the check
#
# The check writes $OUT/gpu.json (section by section, so a run cut short keeps what it measured),
# $OUT/gpu.log and $OUT/gpu_server.log; without $OUT, bench/results/. Without CUDA it exits 2 and
# writes nothing. `scripts/gpu-check.sh dry-run` runs the same code on the CPU with tiny models.
# GPU_CHECK_SCALE=0.5 halves every section's time box (default 1: about 7 minutes of checks).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
SITE=${GPU_CHECK_SITE:-/tmp/promptdistill-gpu-site}
PYTHON=${PYTHON:-python3}

# What the borrowed machine lacks, at the versions this project pins or resolves (pyproject.toml and
# the CPU virtualenv); --no-deps: everything else the service imports is already there.
PINS=(
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5
    fastapi==0.165.0 starlette==1.10.0 fastapi_offline==1.7.7 uvicorn==0.54.0 python-multipart==0.0.34
    pydantic==2.14.3 pydantic_core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4
    annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
    opentelemetry-api==1.45.2 tenacity==9.2.1 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 sniffio==1.3.1
    faiss-cpu==1.15.1
)

prepare() {
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    # The GPU machines run CPython 3.12 on x86-64 (manylinux).
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$WHEELS" "${PINS[@]}"
    du -cb "$WHEELS"/*.whl | tail -1 | awk '{printf "gpu-check: %.1f MiB of wheels in .whl/ (carry limit 64 MiB with the tree)\n", $1/1048576}'
}

install() {
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu-check: no wheels in $WHEELS/ (run 'scripts/gpu-check.sh prepare' where PyPI is reachable)" >&2
        exit 3
    fi
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
}

case "${1:-run}" in
    prepare) prepare ;;
    run | dry-run)
        out=${OUT:-bench/results}
        if [ "${1:-run}" = run ]; then
            if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)'; then
                echo "gpu-check: torch sees no CUDA device here: nothing measured, nothing written" >&2
                exit 2
            fi
            install
            extra=()
        else
            extra=(--cpu-dry-run)
        fi
        mkdir -p "$out"
        # Our wheels first; the repository itself after them; what the machine has stays visible.
        export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
        "$PYTHON" -c 'import torch; print("gpu-check:", torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())'
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
        set +e
        "$PYTHON" -m bench gpu --out "$out" "${extra[@]}" 2>&1 | tee "$out/gpu.log"
        rc=${PIPESTATUS[0]}
        set -e
        if [ "$rc" = 2 ]; then rm -f "$out/gpu.log"; fi  # no CUDA: nothing written
        exit "$rc"
        ;;
    *)
        echo "usage: scripts/gpu-check.sh [prepare|run|dry-run]" >&2
        exit 64
        ;;
esac
